"""URL parsing, key checks and the backend registry."""

from __future__ import annotations

import os

import pytest

from strata.storage import (
    InvalidKey,
    InvalidURL,
    MissingDependency,
    StorageURL,
    check_key,
    check_prefix,
    open_storage,
    parse_url,
)
from strata.storage import url as url_module
from strata.storage.local import LocalStorage
from strata.storage.retry import RetryingStorage
from strata.storage.url import parse_link


@pytest.mark.parametrize("text, expected", [
    ("s3://bucket", StorageURL("s3", bucket="bucket")),
    ("s3://bucket/", StorageURL("s3", bucket="bucket")),
    ("s3://my-bucket/a/b/", StorageURL("s3", bucket="my-bucket", prefix="a/b")),
    ("gs://bucket_1/data", StorageURL("gs", bucket="bucket_1", prefix="data")),
    ("S3://bucket/p", StorageURL("s3", bucket="bucket", prefix="p")),
    ("file:///srv/repo", StorageURL("file", path="/srv/repo")),
    ("file:///srv/repo/", StorageURL("file", path="/srv/repo")),
    ("file://localhost/srv/repo", StorageURL("file", path="/srv/repo")),
    ("azure://acct.blob.core.windows.net/container/pre/fix",
     StorageURL("azure", bucket="container", prefix="pre/fix",
                host="acct.blob.core.windows.net")),
    ("azure://devstoreaccount1.blob.core.windows.net/data",
     StorageURL("azure", bucket="data", host="devstoreaccount1.blob.core.windows.net")),
])
def test_good_urls(text: str, expected: StorageURL) -> None:
    assert parse_url(text) == expected


def test_canonical_form_round_trips() -> None:
    for text in ("s3://bucket/a/b", "gs://bucket", "file:///srv/repo",
                 "azure://acct.blob.core.windows.net/container/p"):
        assert parse_url(text).url == text
        assert parse_url(parse_url(text).url) == parse_url(text)
    assert parse_url("azure://acct.blob.core.windows.net/cont/p").account == "acct"


def test_plain_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_url("repo") == StorageURL("file", path=str(tmp_path / "repo"))
    assert parse_url("./a/../repo").path == str(tmp_path / "repo")
    assert parse_url(tmp_path / "x").path == str(tmp_path / "x")  # os.PathLike
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_url("~/data").path == str(tmp_path / "data")


@pytest.mark.parametrize("text", [
    "", "   ", "ftp://host/x", "s3:/bucket", "s3:bucket", "s3://", "s3:///prefix",
    "s3://Bucket/x", "s3://b/x", "s3://bucket/../x", "s3://bucket/a/../../x",
    "s3://bucket/a\\b", "s3://bucket/a?x=1", "s3://bucket/a#frag", "gs://bucket/./x",
    "file://relative/path", "file:relative", "file:///a\x00b",
    "azure://blob.core.windows.net/c", "azure://acct.blob.core.windows.net/",
    "azure://acct.blob.core.windows.net/UPPER/x", "azure://a.blob.core.windows.net/c",
    "https://example.com/repo", "s3://bucket/a//b", "s3://[::1/x", "azure://[acct/c/x",
    "https://[::1/x",
])
def test_hostile_or_malformed_urls(text: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_url(text)
    message = str(info.value)
    assert "s3://bucket/prefix" in message  # lists the accepted forms
    if text.strip() and "\x00" not in text:
        assert text in message


def test_links_may_be_http() -> None:
    link = parse_link("https://example.com:8443/data/f.bin?sig=abc")
    assert (link.scheme, link.host, link.prefix, link.query) == (
        "https", "example.com:8443", "data/f.bin", "sig=abc")
    assert link.url == "https://example.com:8443/data/f.bin?sig=abc"


@pytest.mark.parametrize("key", ["a", "a/b/c.txt", "blobs/ab/abcdef", "names/p/n/1.0.0",
                                 "with space", "ünïcode", "a..b", "..a", ".hidden"])
def test_good_keys(key: str) -> None:
    assert check_key(key, "s3://b") == key


@pytest.mark.parametrize("key", ["", "/", "/etc/passwd", "..", "../x", "a/..", "a/../b",
                                 "a/./b", ".", "a//b", "a/", "a\\b", "..\\x", "a\x00",
                                 "a\nb", None])
def test_hostile_keys(key) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key, "s3://b/repo")
    assert "s3://b/repo" in str(info.value)


def test_prefixes() -> None:
    assert check_prefix("", "u") == ""
    assert check_prefix("blobs/", "u") == "blobs/"
    assert check_prefix("blobs/a", "u") == "blobs/a"
    for bad in ("/", "../", "a//", "/a/", "a/../"):
        with pytest.raises(InvalidKey):
            check_prefix(bad, "u")


def test_open_storage_picks_and_wraps_the_backend(tmp_path) -> None:
    storage = open_storage(tmp_path)
    assert isinstance(storage, RetryingStorage) and isinstance(storage.inner, LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}", retry=False), LocalStorage)
    assert storage.url == f"file://{tmp_path}"


def test_a_missing_backend_module_is_one_clear_line(monkeypatch) -> None:
    monkeypatch.setitem(url_module.BACKENDS, "gs", "strata.storage.not_written_yet")
    with pytest.raises(MissingDependency) as info:
        open_storage("gs://bucket/p")
    message = str(info.value)
    assert "gs://" in message and "strata.storage.not_written_yet" in message
    assert "\n" not in message


def test_a_backend_whose_sdk_is_missing_names_the_package(tmp_path, monkeypatch) -> None:
    (tmp_path / "fake_backend_mod.py").write_text("import not_a_real_sdk_strata\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(url_module.BACKENDS, "azure", "fake_backend_mod")
    with pytest.raises(MissingDependency, match=r"not_a_real_sdk_strata.*strata\[azure\]"):
        open_storage("azure://acct.blob.core.windows.net/container")


def test_unknown_scheme_lists_accepted_forms() -> None:
    with pytest.raises(InvalidURL, match="unknown scheme 'hdfs'.*file:///abs/path"):
        open_storage("hdfs://namenode/x")


def test_path_objects_and_urls_agree(tmp_path) -> None:
    assert parse_url(os.fspath(tmp_path)) == parse_url(f"file://{tmp_path}")


def test_a_sas_token_in_an_azure_url_says_where_it_goes() -> None:
    with pytest.raises(InvalidURL, match="AZURE_STORAGE_SAS_TOKEN"):
        parse_url("azure://acct.blob.core.windows.net/container/p?sv=2024&sig=abc")
