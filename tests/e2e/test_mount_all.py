"""`strata mount --all`: every version of a repository in one read-only mount, each
resolved when a path first reaches it; the catalog folders follow new versions."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from strata.catalog.dataset import Dataset
from tests.e2e.conftest import Link, snapshot, strata, wait_for


def mount_all(build, mounts):
    mnt = mounts.folder()
    run = strata("--repo", build.repo_url, "mount", "--all", mnt)
    assert run.returncode == 0, run.stderr
    assert "every version" in run.stderr + run.stdout
    return mnt


def test_every_version_by_id_and_by_name_equals_its_local_copy(build, mounts):
    big = os.urandom(3 * 256 * 1024 + 17)   # several chunks
    v1 = build.version({"a.txt": b"one\n", "d/big.bin": big, "l": Link("a.txt")},
                       project="vision", name="cats")
    v2 = build.version({"a.txt": b"two\n", "new/x": b"x"}, parents=[v1], remove=["d/big.bin"],
                       project="vision", name="cats")
    other = build.version({"t.csv": b"1,2\n"}, project="nlp/corpora", name="wiki")
    mnt = mount_all(build, mounts)

    assert sorted(os.listdir(mnt)) == ["by-id", "by-name"]
    assert sorted(os.listdir(mnt / "by-id")) == sorted([v1, v2, other])
    for vid in (v1, v2, other):
        assert snapshot(mnt / "by-id" / vid) == build.expected(vid)
    cats = mnt / "by-name" / "vision" / "cats"
    assert sorted(os.listdir(cats)) == ["1.0.0", "1.0.1", "latest"]
    assert os.readlink(cats / "1.0.0") == f"../../../by-id/{v1}"
    assert os.readlink(cats / "latest") == "1.0.1"
    assert snapshot(cats / "latest" / "") == build.expected(v2)
    assert (cats / "1.0.0" / "d" / "big.bin").read_bytes() == big
    # a project with a '/' shows as it is spelled in the repository's names/ keys
    projects = os.listdir(mnt / "by-name")
    assert "vision" in projects and len(projects) == 2
    wiki = mnt / "by-name" / next(p for p in projects if p != "vision") / "wiki"
    assert (wiki / "latest" / "t.csv").read_bytes() == b"1,2\n"
    # where each file came from, as on a one-version mount
    assert os.getxattr(cats / "latest" / "a.txt", "user.strata.version") == v2.encode()
    assert os.getxattr(cats / "latest" / "new" / "x", "user.strata.version") == v2.encode()
    assert os.getxattr(cats / "1.0.0" / "a.txt", "user.strata.version") == v1.encode()
    # real programs through the symlinks
    out = subprocess.run(["find", "-L", str(cats / "latest"), "-type", "f"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert sorted(os.path.relpath(p, cats / "latest") for p in out) == ["a.txt", "l", "new/x"]


def test_new_versions_appear_and_latest_moves_while_mounted(build, mounts):
    v1 = build.version({"a.txt": b"one\n"}, project="p", name="n")
    mnt = mount_all(build, mounts)
    latest = mnt / "by-name" / "p" / "n" / "latest"
    assert (latest / "a.txt").read_bytes() == b"one\n"
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "by-name" / "p" / "m")    # looked up while missing ...

    v2 = build.version({"a.txt": b"two\n"}, parents=[v1], project="p", name="n")
    v3 = build.version({"b.txt": b"b\n"}, project="p", name="m")
    # ... and found once it exists: negative entries of the catalog expire quickly
    wait_for(lambda: os.path.exists(mnt / "by-name" / "p" / "m" / "latest" / "b.txt"),
             15, "the new dataset to appear")
    wait_for(lambda: os.readlink(latest) == "1.0.1", 15, "latest to move to 1.0.1")
    assert (latest / "a.txt").read_bytes() == b"two\n"
    wait_for(lambda: v2 in os.listdir(mnt / "by-id") and v3 in os.listdir(mnt / "by-id"),
             15, "by-id to list the new versions")
    # the old version stays readable under its own label
    assert (mnt / "by-name" / "p" / "n" / "1.0.0" / "a.txt").read_bytes() == b"one\n"
    run = strata("unmount", mnt)
    assert run.returncode == 0, run.stderr
    assert not os.path.ismount(mnt) and os.listdir(mnt) == []


def test_drafts_and_unknown_ids_are_not_there(build, mounts):
    v1 = build.version({"a.txt": b"one\n"}, project="p", name="n")
    draft = Dataset.create("n", "p", parent_datasets=[v1], repo=build.repo_url)
    mnt = mount_all(build, mounts)
    assert os.listdir(mnt / "by-id") == [v1]
    assert os.listdir(mnt / "by-name" / "p" / "n") == ["1.0.0", "latest"]
    for missing in (f"by-id/{draft.id}", "by-id/" + "0" * 32, "by-id/not-an-id",
                    "by-name/p/n/9.9.9", "by-name/nobody", "elsewhere"):
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / missing)
    with pytest.raises(OSError) as e:
        (mnt / "by-id" / v1 / "new.txt").write_bytes(b"x")
    assert e.value.errno == errno.EROFS


def test_mistakes_fail_in_one_line(build, mounts):
    vid = build.version({"a.txt": b"one\n"})
    mnt = mounts.folder()
    for extra, says in ((["--id", vid], "--all mounts every version"),
                        (["--writable"], "--all is read-only")):
        run = strata("--repo", build.repo_url, "mount", "--all", *extra, mnt)
        assert run.returncode == 2 and says in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
        assert not os.path.ismount(mnt)
