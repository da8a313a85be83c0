"""`strata repo init` and `strata repo info` on every backend (local folder, S3 on moto,
GCS on fake-gcs-server, Azure on Azurite), and the bad input around them: malformed URLs,
unknown schemes, missing buckets and containers, wrong credentials, unreachable stores and
locations that are not strata repositories. Each mistake is one line on stderr that names
the URL and says what to do, exit 1, and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from strata.catalog.dataset import Dataset
from strata.cli.main import cli
from strata.storage import open_storage

from tests.cli.conftest import assert_error
from tests.conftest import MotoServer, apply_s3_env, free_port
from tests.storage.emulators import (
    AZURE_HOST,
    apply_azure_env,
    apply_gcs_env,
    azurite_connection_string,
)

BACKENDS = ("local", "s3", "gcs", "azure")
_URL_FIXTURES = {"s3": "s3_url", "gcs": "gcs_url", "azure": "azure_url"}
CHUNK = 64 * 1024


def strata(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args) -> str:
    result = strata(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path) -> str:
    """A fresh, empty location on one backend (nothing initialised), its environment set."""
    if request.param == "local":
        return str(tmp_path / "repo")
    return request.getfixturevalue(_URL_FIXTURES[request.param])


def canonical(url: str) -> str:
    return open_storage(url, retry=False).url


def keys(url: str) -> list[str]:
    return sorted(info.key for info in open_storage(url).list(""))


# ---- the happy path on every backend ----------------------------------------------------
def test_init_then_info(location, src):
    url = canonical(location)
    result = strata("repo", "init", "--chunk-size", "64K", location)
    assert result.exit_code == 0, result.output
    assert result.stdout == url + "\n"
    assert "initialised an empty strata repository" in result.stderr
    assert keys(location) == ["strata.json"]

    again = strata("repo", "init", location)   # an existing repository is left as it is
    assert again.exit_code == 0 and again.stdout == url + "\n"
    assert "already a strata repository" in again.stderr

    empty = json.loads(ok("repo", "info", location, "--json"))
    assert empty == {"url": url, "format": 1, "hash": "sha256", "chunk_size": CHUNK,
                     "pack_size": 64 << 20, "datasets": 0, "versions": 0, "labels": 0,
                     "blobs": 0, "blob_bytes": 0, "manifests": 0, "manifest_bytes": 0}

    ds = Dataset.create("n", "p", repo=location)
    ds.add_files(str(src))            # a.txt, d/b.txt and d/big.bin of 200_000 bytes
    ds.finalize(auto_upload=True)
    info = json.loads(ok("--json", "repo", "info", location))   # the global --json too
    storage = open_storage(location)
    blobs = [i for i in storage.list("blobs/")]
    manifests = [i for i in storage.list("manifests/")]
    assert (info["datasets"], info["versions"], info["labels"], info["manifests"]) == \
        (1, 1, 1, 1)
    assert info["blobs"] == len(blobs) == 4 + 1   # big.bin in 4 chunks, one pack
    assert info["blob_bytes"] == sum(i.size for i in blobs) >= 200_000 + 11
    assert info["manifest_bytes"] == sum(i.size for i in manifests) > 0

    lines = ok("repo", "info", location).splitlines()
    assert lines[0] == f"repository:  {url}"
    assert "chunk size:  64.0 KiB" in lines and "versions:    1" in lines
    assert any(line.startswith("blobs:       5 (") for line in lines)


def test_info_and_init_default_to_the_configured_repository(tmp_path, monkeypatch):
    url = str(tmp_path / "configured")
    monkeypatch.setenv("STRATA_REPO", url)
    assert ok("repo", "init") == canonical(url) + "\n"
    assert json.loads(ok("repo", "info", "--json"))["url"] == canonical(url)
    other = str(tmp_path / "other")
    ok("--repo", other, "repo", "init")
    assert json.loads(ok("--repo", other, "repo", "info", "--json"))["url"] == \
        canonical(other)


def test_init_keeps_the_chunk_size_of_an_existing_repository(tmp_path):
    url = f"file://{tmp_path}/repo"   # the file:// form of a local path
    ok("repo", "init", "--chunk-size", "1M", url)
    line = assert_error(strata("repo", "init", "--chunk-size", "2M", url),
                        contains=canonical(url))
    assert "chunk size 1048576" in line and "new location" in line
    assert json.loads(ok("repo", "info", url, "--json"))["chunk_size"] == 1 << 20


# ---- locations that are not strata repositories -----------------------------------------
def test_a_non_empty_location_is_refused_and_left_alone(location):
    url = canonical(location)
    open_storage(location).write("notes/readme.txt", b"someone else's")
    line = assert_error(strata("repo", "init", location), contains=url)
    assert "not empty" in line and "notes/readme.txt" in line and "empty location" in line
    assert keys(location) == ["notes/readme.txt"]

    line = assert_error(strata("repo", "info", location), contains=url)
    assert "not a strata repository" in line and "strata.json" in line
    assert_error(strata("--repo", location, "list"), contains=url)
    assert keys(location) == ["notes/readme.txt"]


def test_info_on_an_empty_location_says_how_to_make_one(location):
    url = canonical(location)
    line = assert_error(strata("repo", "info", location), contains=url)
    assert "not a strata repository" in line and f"strata repo init {url}" in line
    assert keys(location) == []   # info never creates anything


def test_a_corrupt_marker_is_named(tmp_path):
    url = str(tmp_path / "repo")
    open_storage(url).write("strata.json", b"not json")
    line = assert_error(strata("repo", "info", url), contains=canonical(url))
    assert "strata.json" in line


def test_a_file_where_the_folder_should_be(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    line = assert_error(strata("repo", "init", path), contains=f"file://{path}")
    assert "not a folder" in line
    assert path.read_text() == "x"


# ---- malformed URLs and unknown schemes ------------------------------------------------
@pytest.mark.parametrize("url, why", [
    ("s3:/bucket/x", "missing '//'"),
    ("s3://", "invalid bucket name"),
    ("s3://Bad_Bucket/x", "invalid bucket name"),
    ("gs://ab/x", "invalid bucket name"),
    ("azure://account/container/x", "expected azure://<account>.blob.core.windows.net"),
    ("azure://acct.blob.core.windows.net/-bad-/x", "invalid Azure container name"),
    ("s3://bucket/a/../../x", "unsafe prefix"),
    ("file://host/x", "absolute path"),
    ("ftp://host/x", "unknown scheme 'ftp'"),
    ("s3://[::1/x", "cannot be parsed"),
    ("http://example.com/x", "read-only links"),
])
@pytest.mark.parametrize("command", ["init", "info"])
def test_malformed_and_unknown_urls(command, url, why):
    line = assert_error(strata("repo", command, url), contains=url)
    assert why in line
    assert "expected a plain path, file:///abs/path, s3://bucket/prefix" in line


# ---- an installation without the cloud SDKs ---------------------------------------------
# Run in a fresh interpreter whose imports of the cloud SDKs fail, as after a plain
# `pip install strata`: a local repository works, and a cloud URL is one line naming the
# extra to install.
_WITHOUT_SDKS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('boto3', 'botocore', 'google', 'azure'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from strata.cli.main import main
try:
    main(sys.argv[1:])
finally:
    loaded = [m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'google',
                                                            'azure')]
    assert not loaded, loaded
"""


def strata_without_sdks(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_SDKS, *map(str, args)],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy(),
                          check=False)


def test_a_local_repository_needs_no_cloud_sdk(tmp_path):
    url = tmp_path / "repo"
    for args in (("repo", "init", url), ("repo", "info", url), ("--repo", url, "search")):
        result = strata_without_sdks(*args)
        assert result.returncode == 0, (args, result.stderr)


@pytest.mark.parametrize("url, line", [
    ("s3://bucket/repo", "s3:// storage needs boto3: pip install 'strata[s3]'"),
    ("gs://bucket/repo", "gs:// storage needs google-cloud-storage: pip install 'strata[gcs]'"),
    (f"azure://{AZURE_HOST}/container/repo",
     "azure:// storage needs azure-storage-blob: pip install 'strata[azure]'"),
])
@pytest.mark.parametrize("args", [("repo", "info"), ("repo", "init"), ("search",)],
                         ids=["info", "init", "search"])
def test_a_missing_sdk_names_the_extra(url, line, args):
    argv = ["--repo", url, *args] if args == ("search",) else [*args, url]
    result = strata_without_sdks(*argv)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"strata: error: {line}"]


# ---- buckets and containers that do not exist -------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
@pytest.mark.parametrize("command", ["init", "info", "search", "get"])
def test_missing_bucket_or_container(request, monkeypatch, tmp_path, kind, command):
    request.getfixturevalue(_URL_FIXTURES[kind])   # the emulator and its environment
    url = {"s3": "s3://no-such-bucket-strata/repo", "gcs": "gs://no-such-bucket-strata/repo",
           "azure": f"azure://{AZURE_HOST}/no-such-container/repo"}[kind]
    args = {"search": ["--repo", url, "search"],   # any command that opens the repository
            "get": ["--repo", url, "get", "--id", "0" * 32, "--copy", tmp_path / "out"]
            }.get(command, ["repo", command, url])
    line = assert_error(strata(*args), contains=url)
    assert "does not exist" in line and "create it first" in line
    assert "not a strata repository" not in line


# ---- wrong or missing credentials -------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server():
    pytest.importorskip("moto.server")
    # with INITIAL_NO_AUTH_ACTION_COUNT=0 moto checks every request against its IAM
    server = MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    yield server
    server.close()


@pytest.mark.parametrize("command", ["init", "info"])
def test_s3_unknown_credentials(auth_server, monkeypatch, command):
    apply_s3_env(monkeypatch, auth_server.env())
    url = "s3://some-bucket/repo"
    line = assert_error(strata("repo", command, url), contains=url)
    assert "unknown AWS access key id" in line and "AWS_ACCESS_KEY_ID" in line


def test_s3_no_credentials(s3_url, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line = assert_error(strata("repo", "init", s3_url), contains=s3_url)
    assert "no usable AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line


@pytest.mark.parametrize("command", ["init", "info"])
def test_azure_wrong_key(azurite, azure_url, monkeypatch, command):
    wrong = "A" * 86 + "=="   # well-formed base64, not Azurite's key
    apply_azure_env(monkeypatch, {
        "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(key=wrong)})
    line = assert_error(strata("repo", command, azure_url), contains=azure_url)
    assert "AZURE_STORAGE_CONNECTION_STRING" in line and "credentials" in line


def test_gcs_unusable_key_file(tmp_path, monkeypatch):
    pytest.importorskip("google.cloud.storage")
    missing = tmp_path / "key.json"
    apply_gcs_env(monkeypatch, {"GOOGLE_APPLICATION_CREDENTIALS": str(missing),
                                "NO_GCE_CHECK": "True", "CLOUDSDK_CONFIG": str(tmp_path)})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    url = "gs://some-bucket/repo"
    line = assert_error(strata("repo", "info", url), contains=url)
    assert str(missing) in line and "GOOGLE_APPLICATION_CREDENTIALS" in line


# ---- a store that cannot be reached -----------------------------------------------------
@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_unreachable_store_fails_fast(request, monkeypatch, kind):
    dead = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "2")
    if kind == "s3":
        request.getfixturevalue("s3_url")
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
        url = "s3://some-bucket/repo"
    elif kind == "gcs":
        pytest.importorskip("google.cloud.storage")
        apply_gcs_env(monkeypatch, {"STORAGE_EMULATOR_HOST": dead})
        url = "gs://some-bucket/repo"
    else:
        pytest.importorskip("azure.storage.blob")
        apply_azure_env(monkeypatch, {
            "AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(dead)})
        url = f"azure://{AZURE_HOST}/some-container/repo"
    started = time.monotonic()
    line = assert_error(strata("repo", "init", url), contains=url)
    assert time.monotonic() - started < 10
    assert "unreachable" in line and "reachable from here" in line
