"""The whole flow once per backend: local folder, S3 (moto), GCS (fake-gcs-server) and Azure
(Azurite), each on a fresh repository with small chunks and packs so that chunked files,
several packs and dedup all occur.

create, add, close -> a child by sync -> mount it read-only and read every file byte for
byte -> mount it writable, write, modify, delete and rename -> status -> commit -> the
child of the commit, got with `get --copy`, holds exactly the expected tree.

Every step is the real CLI in a subprocess; the mount servers are real processes that
inherit this test's environment, which the backend fixtures set (monkeypatch) before
anything is mounted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from strata.catalog.repo import Repository
from tests.e2e.conftest import CHUNK, strata

PACK = 1 << 20
BACKENDS = ("local", "s3", "gcs", "azure")
_URL_FIXTURES = {"s3": "s3_url", "gcs": "gcs_url", "azure": "azure_url"}


@pytest.fixture(params=BACKENDS)
def backend_repo(request, tmp_path) -> str:
    """A fresh repository URL on one backend; the environment the CLI and the mount servers
    need (endpoint, credentials) is set for the test by the URL fixture."""
    if request.param == "local":
        url = str(tmp_path / "repo")
    else:
        url = request.getfixturevalue(_URL_FIXTURES[request.param])
    Repository.open(url, create=True, chunk_size=CHUNK, pack_size=PACK)
    return url


def ok(*args: str) -> str:
    """Run the CLI; assert success; return stdout."""
    result = strata(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


def new_id(*args: str) -> str:
    last = ok(*args).splitlines()[-1]
    assert len(last) == 32 and all(c in "0123456789abcdef" for c in last), last
    return last


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root`, read through plain open()."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            out[str(full.relative_to(root))] = full.read_bytes()
    return out


def assert_same_tree(actual: dict[str, bytes], expected: dict[str, bytes]) -> None:
    assert sorted(actual) == sorted(expected)
    for rel, data in expected.items():
        assert actual[rel] == data, f"{rel}: {len(actual[rel])} bytes differ from {len(data)}"


def repo_info(url: str) -> dict:
    return json.loads(ok("repo", "info", url, "--json"))


def test_full_flow(backend_repo, tmp_path, mounts):
    url = backend_repo
    rnd = random.Random(5)
    first = {
        "big.bin": rnd.randbytes(5 * CHUNK + 1234),        # 6 chunks, the last one short
        "exact.bin": rnd.randbytes(2 * CHUNK),             # exactly 2 chunks
        "empty.txt": b"",
        "deep/a/b/c.txt": b"deep\n",
        **{f"small/f{i:02}.txt": rnd.randbytes(90_000) for i in range(14)},  # > 1 pack
    }
    src = tmp_path / "src"
    write_tree(src, first)

    # -- create, add, close ---------------------------------------------------------------
    v1 = new_id("--repo", url, "create", "--project", "proj", "--name", "data")
    ok("--repo", url, "add", "--id", v1, "--files", str(src))
    ok("--repo", url, "close", "--id", v1)
    info1 = repo_info(url)
    assert (info1["versions"], info1["datasets"], info1["manifests"]) == (1, 1, 1)
    assert info1["chunk_size"] == CHUNK and info1["pack_size"] == PACK
    assert info1["blobs"] >= 6 + 2 + 2  # chunks of big.bin and exact.bin, at least 2 packs

    # -- a child by sync: one chunk changed, a file edited, one removed, one added ---------
    second = dict(first)
    big = bytearray(first["big.bin"])
    big[2 * CHUNK + 10:2 * CHUNK + 20] = b"X" * 10
    second["big.bin"] = bytes(big)
    second["small/f03.txt"] = b"edited\n"
    del second["small/f05.txt"]
    second["new/added.bin"] = rnd.randbytes(CHUNK + 7)
    shutil.rmtree(src)
    write_tree(src, second)
    v2 = new_id("--repo", url, "sync", "--project", "proj", "--name", "data",
                "--folder", str(src))
    info2 = repo_info(url)
    assert (info2["versions"], info2["manifests"]) == (2, 2)
    # only new bytes are stored: 1 changed chunk, 2 chunks of the new file, 1 pack
    assert info2["blobs"] - info1["blobs"] <= 5, (info1, info2)

    # -- read-only mount: every file, byte for byte ---------------------------------------
    ro = mounts.folder("ro")
    ok("--repo", url, "mount", "--id", v2, str(ro))
    assert os.path.ismount(ro)
    assert_same_tree(read_tree(ro), second)
    ok("unmount", str(ro))
    assert not os.path.ismount(ro)

    # -- writable mount: write, modify, delete, rename; status; commit --------------------
    rw = mounts.folder("rw")
    ok("--repo", url, "mount", "--writable", "--id", v2, str(rw))
    third = dict(second)
    fresh = rnd.randbytes(2 * CHUNK + 5)
    (rw / "written").mkdir()
    (rw / "written/fresh.bin").write_bytes(fresh)
    third["written/fresh.bin"] = fresh
    with open(rw / "small/f01.txt", "ab") as f:
        f.write(b"appended\n")
    third["small/f01.txt"] = second["small/f01.txt"] + b"appended\n"
    with open(rw / "big.bin", "r+b") as f:   # copy-up of a chunked file, then a patch
        f.seek(3 * CHUNK + 100)
        f.write(b"patched")
    big = bytearray(second["big.bin"])
    big[3 * CHUNK + 100:3 * CHUNK + 107] = b"patched"
    third["big.bin"] = bytes(big)
    os.remove(rw / "small/f02.txt")
    del third["small/f02.txt"]
    os.rename(rw / "deep/a/b/c.txt", rw / "deep/moved.txt")
    third["deep/moved.txt"] = third.pop("deep/a/b/c.txt")
    assert_same_tree(read_tree(rw), third)

    status = json.loads(ok("status", str(rw), "--json"))
    changed = {c["path"]: c["change"] for c in status["changes"]}
    assert status["base"] == v2
    assert changed.get("written/fresh.bin") == "added"
    assert changed.get("small/f01.txt") == "modified"
    assert changed.get("big.bin") == "modified"
    assert changed.get("small/f02.txt") == "removed"
    assert "deep/moved.txt" in changed

    v3 = new_id("commit", str(rw), "-m", "changed through the mount")
    assert v3 not in (v1, v2)
    assert json.loads(ok("status", str(rw), "--json"))["changes"] == []
    assert (rw / "written/fresh.bin").read_bytes() == fresh  # the mount shows the child
    ok("unmount", str(rw))

    # -- the committed child, as plain files ----------------------------------------------
    out = tmp_path / "copy"
    ok("--repo", url, "get", "--id", v3, "--copy", str(out))
    assert_same_tree(read_tree(out), third)
    listed = json.loads(ok("--repo", url, "list", "--id", v3, "--json"))
    assert sorted(row["path"] for row in listed) == sorted(third)
    info3 = repo_info(url)
    assert (info3["versions"], info3["datasets"], info3["manifests"]) == (3, 1, 3)
