"""The mounted tree equals the merged tree, byte for byte: parents overriding each other,
removals, a deep chain, a 100k-file folder. The reference is `get_mutable_local_copy` of the
same version (the catalog's eager merge); the mount resolves the DAG lazily, so any
disagreement between the two is a bug in one of them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from strata.catalog import manifest as manifest_mod
from strata.catalog.manifest import Entry
from strata.catalog.dataset import Dataset
from strata.catalog.records import VersionRecord
from strata.catalog.repo import Repository
from strata.vfs.core import XATTR_VERSION
from tests.e2e.conftest import CHUNK, EMPTY_DIR, File, Link, snapshot


def xattr_version(path) -> str:
    return os.getxattr(path, XATTR_VERSION).decode()


def assert_read_only_files(root) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                assert st.st_mode & 0o444 == 0o444 and not st.st_mode & 0o222, (name, st)


def test_two_parents_override_each_other(build, mounts, tmp_path):
    rng = random.Random(1)
    a = build.version({
        "common.txt": b"from A\n",
        "only_a.txt": b"A only\n",
        "dir/f1.txt": b"A f1\n",
        "dir/deep/x.bin": rng.randbytes(CHUNK * 2 + 1000),
        "run.sh": File(b"#!/bin/sh\necho a\n", 0o755),
        "secret.txt": File(b"secret\n", 0o600),
        "link_to_common": Link("common.txt"),
        "dir/link_up": Link("../only_a.txt"),
        "empty_a": EMPTY_DIR,
        "edge/empty.txt": b"",
        "edge/below.bin": rng.randbytes(CHUNK - 1),    # the largest packed file
        "edge/exact.bin": rng.randbytes(CHUNK),        # the smallest chunked file
        "edge/two.bin": rng.randbytes(2 * CHUNK),
        "names/with space/ünïcødé ✓.txt": b"unicode\n",
        "names/#%&'()+,;=@[]{}~.txt": b"punctuation\n",
        "names/a/b/c/d/e/f/g/h/deep.txt": b"deep\n",
    }, name="a")
    b = build.version({
        "common.txt": b"from B\n",
        "dir/f1.txt": b"B f1\n",
        "dir/deep/x.bin": rng.randbytes(CHUNK * 3 + 7),
        "only_b.txt": b"B only\n",
        "link_to_common": Link("only_b.txt"),
        "empty_b/inner": EMPTY_DIR,
    }, name="b")
    c = build.version({"c.txt": b"child\n", "dir/f2.txt": b"child f2\n"},
                      parents=[a, b], name="c")
    d = build.version({}, parents=[b, a], name="d")
    expected_c, expected_d = build.expected(c), build.expected(d)
    # the reference itself follows the merge rule: a later parent overrides an earlier one
    assert expected_c["common.txt"][1] == hashlib.sha256(b"from B\n").hexdigest()
    assert expected_d["common.txt"][1] == hashlib.sha256(b"from A\n").hexdigest()
    assert expected_c["link_to_common"] == ("link", "only_b.txt")
    assert expected_d["link_to_common"] == ("link", "common.txt")
    assert expected_c["empty_a"] == expected_c["empty_b/inner"] == ("dir",)

    mc = mounts.folder("mc")
    md = mounts.folder("md")
    mounts.start(c, build.repo_url, "mc")
    mounts.start(d, build.repo_url, "md")
    assert snapshot(mc) == expected_c
    assert snapshot(md) == expected_d
    assert_read_only_files(mc)
    assert os.stat(mc / "run.sh").st_mode & 0o111  # the executable bit survives

    # real programs see the same tree: cp -r keeps symlinks as symlinks and empty folders
    subprocess.run(["cp", "-r", str(mc), str(tmp_path / "copy_c")], check=True)
    assert snapshot(tmp_path / "copy_c") == expected_c
    assert subprocess.run(["cmp", str(md / "dir/deep/x.bin"),
                           str(tmp_path / "src-0/dir/deep/x.bin")]).returncode == 0
    assert (mc / "link_to_common").read_bytes() == b"B only\n"  # followed through the mount

    # user.strata.version names the version whose change-set supplied each file
    assert xattr_version(mc / "c.txt") == c
    assert xattr_version(mc / "dir/f2.txt") == c
    assert xattr_version(mc / "common.txt") == b
    assert xattr_version(mc / "dir/deep/x.bin") == b
    assert xattr_version(mc / "only_a.txt") == a
    assert xattr_version(mc / "run.sh") == a
    assert xattr_version(md / "common.txt") == a
    assert xattr_version(md / "only_b.txt") == b
    assert XATTR_VERSION in os.listxattr(mc / "c.txt")


def test_removals(build, mounts):
    rng = random.Random(2)
    g = build.version({
        "keep.txt": b"keep\n",
        "gone.txt": b"gone\n",
        "folder/a.txt": b"a\n",
        "folder/b.txt": b"b\n",
        "folder/sub/c.txt": b"c\n",
        "folder/big.bin": rng.randbytes(CHUNK * 2 + 5),
        "solo/only.txt": b"the only file of solo\n",
        "other/x.txt": b"x\n",
        "other/y.txt": b"y\n",
    })
    # removes a file, a folder (then re-adds files in it), the only file of a folder
    p = build.version({"folder/readded.txt": b"re-added\n", "folder/a.txt": b"new a\n"},
                      parents=[g], remove=["gone.txt", "folder", "solo/only.txt",
                                           "other/x.txt"])
    # re-adds a file in a folder its parent removed, and a removed file
    q = build.version({"folder/b.txt": b"b again\n", "gone.txt": b"back\n"}, parents=[p],
                      remove=["folder/readded.txt"])
    expected_p, expected_q = build.expected(p), build.expected(q)
    assert "gone.txt" not in expected_p and "folder/sub" not in expected_p
    assert "folder/b.txt" not in expected_p and "folder/readded.txt" in expected_p

    mp, mq = mounts.folder("mp"), mounts.folder("mq")
    mounts.start(p, build.repo_url, "mp")
    mounts.start(q, build.repo_url, "mq")
    # lookups of removed names first (nothing listed yet, so nothing memoised by a listing)
    for gone in ("gone.txt", "folder/b.txt", "folder/sub", "folder/sub/c.txt",
                 "folder/big.bin", "solo/only.txt", "other/x.txt"):
        assert not os.path.lexists(mp / gone), gone
    assert (mp / "folder/readded.txt").read_bytes() == b"re-added\n"
    assert snapshot(mp) == expected_p
    assert snapshot(mq) == expected_q
    assert sorted(os.listdir(mp / "folder")) == ["a.txt", "readded.txt"]
    assert sorted(os.listdir(mq / "folder")) == ["a.txt", "b.txt"]
    assert (mq / "gone.txt").read_bytes() == b"back\n"
    assert xattr_version(mq / "folder/a.txt") == p
    assert xattr_version(mq / "folder/b.txt") == q
    assert xattr_version(mq / "keep.txt") == g


def test_a_history_that_loops_answers_eio_and_the_mount_goes_on(build, mounts):
    base = build.version({"base.txt": b"base\n"})
    side = build.version({"side.txt": b"side\n"}, parents=[base])
    top = build.version({"own.txt": b"own\n"}, parents=[base, side])
    # records altered by hand: the oldest version now names its child as its parent
    record = Path(build.repo_url) / "versions" / f"{base}.json"
    fields = json.loads(record.read_text())
    fields["parents"] = [side]
    record.write_text(json.dumps(fields))
    for vid, name in ((top, "top"), (side, "side")):   # a merge, and single parents
        info = mounts.start(vid, build.repo_url, name)
        mp = Path(info.mountpoint)
        # a name is looked up until found: these are, before the walk comes round again
        assert (mp / "base.txt").read_bytes() == b"base\n"
        assert (mp / "side.txt").read_bytes() == b"side\n"
        # a listing, or a name found nowhere, walks the whole history
        for walk in (lambda: os.listdir(mp), lambda: os.stat(mp / "missing.txt")):
            with pytest.raises(OSError) as e:
                walk()
            assert e.value.errno == errno.EIO
        assert f"the history of version {vid} is a loop" in Path(info.log).read_text()
        assert (mp / "side.txt").read_bytes() == b"side\n"   # and the server goes on


def test_external_links_are_read_by_range_and_a_changed_object_fails(build, mounts,
                                                                     tmp_path):
    rng = random.Random(4)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    big, small = rng.randbytes(CHUNK * 3 + 11), b"small link\n"
    (outside / "big.bin").write_bytes(big)
    (outside / "sub" / "small.txt").write_bytes(small)
    ds = Dataset.create("links", "p", repo=build.repo_url)
    assert ds.add_external_files(f"file://{outside}", dataset_path="ext") == 2
    ds.finalize(auto_upload=True)
    mp = Path(mounts.start(ds.id, build.repo_url).mountpoint)
    assert (mp / "ext/sub/small.txt").read_bytes() == small
    with open(mp / "ext/big.bin", "rb") as f:   # ranges, out of order
        for off in (CHUNK * 2 + 5, 7, CHUNK - 3):
            f.seek(off)
            assert f.read(4096) == big[off:off + 4096]
    assert subprocess.run(["cmp", mp / "ext/big.bin", outside / "big.bin"]).returncode == 0
    assert xattr_version(mp / "ext/big.bin") == ds.id

    with open(outside / "big.bin", "ab") as f:   # the object changes after it was added
        f.write(b"more")
    info = mounts.start(ds.id, build.repo_url, "again")
    with pytest.raises(OSError) as e:
        (Path(info.mountpoint) / "ext/big.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert "it changed since" in Path(info.log).read_text()
    assert (Path(info.mountpoint) / "ext/sub/small.txt").read_bytes() == small


def test_deep_chain_of_50_versions(build, mounts, tmp_path):
    rng = random.Random(3)
    big = bytearray(rng.randbytes(CHUNK * 4))
    ids = [build.version({"counter.txt": b"0\n", "base/keep.txt": b"base\n",
                          "big.bin": bytes(big), "v00/own.txt": b"version 0\n"})]
    for i in range(1, 50):
        spec = {"counter.txt": f"{i}\n".encode(), f"v{i:02d}/own.txt": f"version {i}\n".encode()}
        remove = [f"v{i - 3:02d}"] if i % 5 == 0 else []
        if i % 10 == 0:  # change one chunk of the big file in place
            at = (i // 10) * CHUNK + 100
            big[at:at + 8] = f"{i:08d}".encode()
            spec["big.bin"] = bytes(big)
        ids.append(build.version(spec, parents=[ids[-1]], remove=remove))
    top = ids[-1]
    expected = build.expected(top)
    assert "v02" not in expected and "v42/own.txt" not in expected
    assert "v03/own.txt" in expected and "v45/own.txt" in expected

    mnt = mounts.folder("mnt")
    mounts.start(top, build.repo_url)
    assert snapshot(mnt) == expected
    # tar through a pipe: the mount read by a real archiver, unpacked locally
    out = tmp_path / "untarred"
    out.mkdir()
    tar = subprocess.Popen(["tar", "-C", str(mnt), "-cf", "-", "."], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-C", str(out), "-xf", "-"], stdin=tar.stdout, check=True)
    tar.stdout.close()
    assert tar.wait(timeout=60) == 0
    assert snapshot(out) == expected
    assert (mnt / "big.bin").read_bytes() == bytes(big)
    assert xattr_version(mnt / "counter.txt") == top
    assert xattr_version(mnt / "base/keep.txt") == ids[0]
    assert xattr_version(mnt / "big.bin") == ids[40]
    assert xattr_version(mnt / "v03/own.txt") == ids[3]


def synthetic_version(repo_url: str, files: dict[str, bytes], *, project="p",
                      name="many") -> str:
    """A final version written directly in the repository format (one pack, one manifest,
    label, record): 100k files in a second, where add_files would spend half a minute
    creating and hashing them."""
    repo = Repository.open(repo_url)
    vid = uuid.uuid4().hex
    now = time.time_ns()
    pack = bytearray()
    entries = []
    paths = sorted(files)
    for p in paths:
        data = files[p]
        entries.append((p, len(pack), data))
        pack += data
    pack_id = hashlib.sha256(pack).hexdigest()
    repo.put_blob(pack_id, bytes(pack))
    rows = [Entry(p, "f", len(d), hashlib.sha256(d).hexdigest(), 0o644, now, pack_id, off)
            for p, off, d in entries]
    local = str(repo.cache_dir / f"{vid}.manifest")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    manifest_mod.write(local, vid, rows, [], [])
    sha = repo.put_manifest(vid, local)
    os.unlink(local)
    assert repo.claim_label(project, name, "1.0.0", vid)
    repo.create_record(VersionRecord(id=vid, project=project, name=name, version="1.0.0",
                                     created=time.time(), manifest_sha256=sha,
                                     files=len(files), size=len(pack), added=len(files)))
    return vid


def test_100k_files_in_one_folder(repo_url, mounts):
    n = 100_000
    files = {f"many/f{i:06d}.txt": f"file {i}\n".encode() for i in range(n)}
    files["top.txt"] = b"top\n"
    vid = synthetic_version(repo_url, files)
    mnt = mounts.folder("mnt")
    mounts.start(vid, repo_url)

    # a cold find + stat: the attributes come from the READDIRPLUS replies
    found = subprocess.run(["find", str(mnt), "-type", "f", "-printf", "%s %P\n"],
                           capture_output=True, text=True, check=True, timeout=120)
    sizes = dict(reversed(line.split(" ", 1)) for line in found.stdout.splitlines())
    assert sizes == {p: str(len(data)) for p, data in files.items()}
    names = os.listdir(mnt / "many")
    assert sorted(names) == sorted(p.split("/")[1] for p in files if p.startswith("many/"))
    sample = random.Random(4).sample(sorted(files), 300)
    for p in sample:
        assert (mnt / p).read_bytes() == files[p], p
    # a real program reading a run of neighbours (one pack, read sequentially)
    run = [f"many/f{i:06d}.txt" for i in range(5000, 5200)]
    cat = subprocess.run(["cat", *run], cwd=mnt, capture_output=True, check=True)
    assert cat.stdout == b"".join(files[p] for p in run)
