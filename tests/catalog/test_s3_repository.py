"""The whole catalog workflow on S3 (moto's server on 127.0.0.1): the catalog lives in
the bucket next to the data, so a second 'machine' (a fresh workspace and cache) sees
the versions with nothing but the URL."""

import os

import pytest

from strata.catalog import Dataset
from strata.catalog import repo as repo_mod
from strata.catalog.errors import NotARepository
from strata.catalog.ops import compare, list_datasets
from strata.catalog.repo import Repository
from strata.storage.errors import Unreachable
from tests.catalog.conftest import tree, write


def test_workflow_on_s3_shared_through_the_bucket(tmp_path, s3_url, monkeypatch):
    Repository.open(s3_url, create=True, chunk_size=64 * 1024, pack_size=256 * 1024)
    src = tmp_path / "src"
    files = {"a.txt": b"alpha", "big": os.urandom(300_000), "d/e": b"e" * 5000}
    for rel, data in files.items():
        write(src, rel, data)
    v1 = Dataset.create("imgs", "team", repo=s3_url)
    v1.add_files(src)
    v1.finalize(auto_upload=True)
    write(src, "d/e", b"changed")
    v2 = Dataset.create("imgs", "team", parent_datasets=[v1.id], repo=s3_url)
    v2.sync_folder(src)
    v2.finalize(auto_upload=True)

    # another machine: fresh workspace and cache, same bucket
    other = tmp_path / "other"
    monkeypatch.setenv("XDG_DATA_HOME", str(other / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(other / "cache"))
    repo_mod._repos.clear()
    got = Dataset.get(dataset_project="team", dataset_name="imgs", repo=s3_url)
    assert got.id == v2.id and got.version == "1.0.1"
    out = tmp_path / "out"
    got.get_mutable_local_copy(out)
    assert tree(out) == {**files, "d/e": b"changed"}
    assert got.verify_dataset_hash() == []
    c = compare(Dataset.get(v1.id, repo=s3_url), got)
    assert c.modified == ["d/e"] and c.added == c.removed == []
    assert [d["version"] for d in list_datasets("team", repo=s3_url)] == ["1.0.0", "1.0.1"]


def test_bucket_holding_other_things_is_not_taken_over(s3_server, s3_url):
    bucket, prefix = s3_url[5:].split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/someone-elses.txt", Body=b"x")
    with pytest.raises(NotARepository, match="not empty"):
        Dataset.create("n", "p", repo=s3_url)


def test_unreachable_endpoint_fails_fast_with_the_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "2")
    with pytest.raises(Unreachable, match="s3://nobucket/repo"):
        Dataset.get(dataset_project="p", dataset_name="n", repo="s3://nobucket/repo")
