"""POSIX behaviour of a writable mount, one system call at a time, as docs/semantics.md
states it. Where an action changes the tree it is applied to a plain local folder too,
and the commit's child version must equal that folder."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path
import random
import subprocess

import pytest

from strata.catalog.dataset import Dataset
from strata.vfs.core import XATTR_VERSION
from tests.e2e.conftest import CHUNK, EMPTY_DIR, File, Link, WritableEnv, run, strata

RNG = random.Random(5)
BIG = RNG.randbytes(2 * CHUNK + 5)
SPEC = {
    "lower.txt": b"lower\n",
    "folder/a.txt": b"a in folder\n",
    "folder/sub/big.bin": BIG,
    "folder/link": Link("a.txt"),
    "folder/empty": EMPTY_DIR,
    "exec.sh": File(b"#!/bin/sh\necho hi\n", 0o755),
}


@pytest.fixture
def env(build, mounts, tmp_path) -> WritableEnv:
    return WritableEnv(build, mounts, tmp_path, SPEC)


def errno_of(action) -> int:
    with pytest.raises(OSError) as e:
        action()
    return e.value.errno


def write_file(path, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               mode: int = 0o644) -> None:
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def uploaded_bytes(child: str, repo_url: str) -> int:
    return Dataset.get(child, repo=repo_url).record.uploaded_bytes


# ---- create / open flags -----------------------------------------------------------
def test_create_exclusive_on_an_existing_file_is_eexist(env):
    def act(root):
        excl = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for existing in ("lower.txt", "folder", "folder/link"):
            assert errno_of(lambda p=root / existing: os.open(p, excl)) == errno.EEXIST
        write_file(root / "new.txt", b"new\n", excl)
        assert errno_of(lambda: os.open(root / "new.txt", excl)) == errno.EEXIST
    env.both(act)
    assert (env.mnt / "lower.txt").read_bytes() == b"lower\n"   # untouched
    env.check()


def test_o_trunc_and_o_append(env):
    def act(root):
        write_file(root / "lower.txt", b"T", os.O_WRONLY | os.O_TRUNC)   # lower: no copy
        write_file(root / "folder/a.txt", b"", os.O_WRONLY | os.O_TRUNC)
        for part in (b"one\n", b"two\n"):                                # two opens
            write_file(root / "log.txt", part, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        fd = os.open(root / "exec.sh", os.O_WRONLY | os.O_APPEND)        # a lower file
        try:
            os.write(fd, b"echo two\n")
            os.lseek(fd, 0, os.SEEK_SET)          # O_APPEND writes at the end regardless
            os.write(fd, b"echo three\n")
        finally:
            os.close(fd)
    env.both(act)
    assert (env.mnt / "lower.txt").read_bytes() == b"T"
    assert (env.mnt / "log.txt").read_bytes() == b"one\ntwo\n"
    assert (env.mnt / "exec.sh").read_bytes() == b"#!/bin/sh\necho hi\necho two\necho three\n"
    assert os.stat(env.mnt / "folder/a.txt").st_size == 0
    env.check()


def test_sparse_write_at_a_large_offset(env):
    offset = 64 << 20

    def act(root):
        with open(root / "sparse.bin", "wb") as f:
            f.seek(offset)
            f.write(b"end")
        with open(root / "folder/sub/big.bin", "r+b") as f:   # a lower file grows a hole
            f.seek(3 * CHUNK + 17)
            f.write(b"tail")
    env.both(act)
    st = os.stat(env.mnt / "sparse.bin")
    assert st.st_size == offset + 3
    with open(env.mnt / "sparse.bin", "rb") as f:
        f.seek(offset - 10)
        assert f.read() == bytes(10) + b"end"
        f.seek(12345)
        assert f.read(4096) == bytes(4096)
    data = (env.mnt / "folder/sub/big.bin").read_bytes()
    assert data == BIG + bytes(3 * CHUNK + 17 - len(BIG)) + b"tail"
    env.check()


def test_truncate_and_ftruncate_grow_and_shrink(env):
    def act(root):
        os.truncate(root / "folder/sub/big.bin", CHUNK + 3)     # shrink a lower file
        os.truncate(root / "lower.txt", 100)                    # grow a lower file
        write_file(root / "t.bin", b"0123456789")
        fd = os.open(root / "t.bin", os.O_RDWR)
        try:
            os.ftruncate(fd, 4)
            assert os.pread(fd, 100, 0) == b"0123"
            os.ftruncate(fd, 8)
            assert os.pread(fd, 100, 0) == b"0123" + bytes(4)
            os.pwrite(fd, b"X", 6)
        finally:
            os.close(fd)
    env.both(act)
    assert (env.mnt / "folder/sub/big.bin").read_bytes() == BIG[:CHUNK + 3]
    assert (env.mnt / "lower.txt").read_bytes() == b"lower\n" + bytes(94)
    assert (env.mnt / "t.bin").read_bytes() == b"0123\0\0X\0"
    env.check()


# ---- unlink, rmdir, rename ----------------------------------------------------------
def test_unlink_of_an_open_file_keeps_it_readable_through_the_descriptor(env):
    def act(root):
        write_file(root / "scratch", b"scratch data")
        for name, data in (("scratch", b"scratch data"), ("lower.txt", b"lower\n")):
            fd = os.open(root / name, os.O_RDONLY)
            try:
                os.unlink(root / name)
                assert not os.path.exists(root / name)
                assert os.pread(fd, 100, 0) == data
            finally:
                os.close(fd)
        fd = os.open(root / "folder/a.txt", os.O_RDWR)   # written after its unlink
        try:
            os.unlink(root / "folder/a.txt")
            os.pwrite(fd, b"A", 0)
            assert os.pread(fd, 100, 0) == b"A in folder\n"
        finally:
            os.close(fd)
    env.both(act)
    # no hidden name was left behind (libfuse's high-level API kept such files as
    # .fuse_hidden* until closed; strata's adapter drops the name at once)
    assert not [n for n in os.listdir(env.mnt) + os.listdir(env.mnt / "folder")
                if n.startswith(".fuse_hidden")]
    assert sorted((c["change"], c["path"]) for c in env.pending()) == [
        ("removed", "folder/a.txt"), ("removed", "lower.txt")]
    env.check()


def test_rmdir(env):
    def act(root):
        assert errno_of(lambda: os.rmdir(root / "folder")) == errno.ENOTEMPTY
        assert errno_of(lambda: os.rmdir(root / "folder/sub")) == errno.ENOTEMPTY
        assert errno_of(lambda: os.rmdir(root / "lower.txt")) == errno.ENOTDIR
        os.rmdir(root / "folder/empty")                      # an empty lower folder
        os.unlink(root / "folder/sub/big.bin")
        os.rmdir(root / "folder/sub")                        # emptied, then removed
        os.mkdir(root / "fresh")
        os.rmdir(root / "fresh")
    env.both(act)
    env.check()


def test_rename_over_an_existing_file_replaces_it_atomically(env):
    def act(root):
        with open(root / "lower.txt", "rb") as old:          # the replaced file, open
            write_file(root / "lower.txt.tmp", b"replacement\n")
            os.rename(root / "lower.txt.tmp", root / "lower.txt")
            assert old.read() == b"lower\n"                   # still the old bytes
        assert (root / "lower.txt").read_bytes() == b"replacement\n"
        assert not os.path.exists(root / "lower.txt.tmp")
        os.rename(root / "folder/a.txt", root / "exec.sh")    # lower over lower
    env.both(act)
    assert {(c["change"], c["path"]) for c in env.pending()} >= {("modified", "lower.txt")}
    env.check()


def test_renames_of_lower_files_and_folders_commit_metadata_only(env):
    def act(root):
        os.rename(root / "folder", root / "renamed")    # a lower folder, a chunked file inside
        os.rename(root / "renamed/sub", root / "sub-moved")
        os.rename(root / "lower.txt", root / "renamed/lower-moved.txt")
        os.chmod(root / "exec.sh", 0o700)                     # metadata of a lower file
        os.utime(root / "exec.sh", ns=(1_500_000_000_000_000_000,) * 2)
    env.both(act)
    assert (env.mnt / "sub-moved/big.bin").read_bytes() == BIG
    changes = {(c["change"], c["path"], c.get("from")) for c in env.pending()}
    assert changes == {("renamed", "renamed", "folder"),
                       ("renamed", "sub-moved", "folder/sub"),
                       ("renamed", "renamed/lower-moved.txt", "lower.txt"),
                       ("modified", "exec.sh", None)}
    child = env.check(mtimes=True)
    assert uploaded_bytes(child, env.repo_url) == 0        # no byte was copied or uploaded


def test_rename_flags_noreplace_and_exchange(env):
    """renameat2's flags reach strata (RENAME2 requests): RENAME_NOREPLACE is honoured
    (EEXIST), RENAME_EXCHANGE is refused (EINVAL)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(old, new, flags) -> int:
        if libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) == 0:
            return 0
        return ctypes.get_errno()

    m = env.mnt
    assert renameat2(m / "lower.txt", m / "exec.sh", 1) == errno.EEXIST        # NOREPLACE
    assert renameat2(m / "lower.txt", m / "exec.sh", 2) == errno.EINVAL        # EXCHANGE
    assert renameat2(m / "lower.txt", m / "moved.txt", 1) == 0
    assert (m / "moved.txt").read_bytes() == b"lower\n"
    assert (m / "exec.sh").read_bytes() == SPEC["exec.sh"].data
    run("mv", "-n", m / "moved.txt", m / "exec.sh", cwd=m)                      # no clobber
    assert (m / "exec.sh").read_bytes() == SPEC["exec.sh"].data
    assert (m / "moved.txt").exists()


# ---- metadata ------------------------------------------------------------------------
def test_chmod_utime_symlink_readlink(env):
    stamp = 1_234_567_890_123_456_789

    def act(root):
        os.chmod(root / "lower.txt", 0o600)
        os.utime(root / "lower.txt", ns=(stamp, stamp))
        write_file(root / "new.sh", b"#!/bin/sh\n")
        os.chmod(root / "new.sh", 0o750)
        os.utime(root / "new.sh", ns=(stamp, stamp + 1))
        os.symlink("folder/a.txt", root / "to-a")
        os.symlink("folder", root / "to-folder")
        os.symlink("does/not/exist", root / "folder/dangling")
        os.unlink(root / "folder/link")
        os.symlink("sub/big.bin", root / "folder/link")    # a lower symlink replaced
    env.both(act)
    m = env.mnt
    assert os.stat(m / "lower.txt").st_mode & 0o7777 == 0o600
    assert os.stat(m / "lower.txt").st_mtime_ns == stamp
    assert os.stat(m / "new.sh").st_mode & 0o7777 == 0o750
    assert os.stat(m / "new.sh").st_mtime_ns == stamp + 1
    assert os.readlink(m / "to-a") == "folder/a.txt"
    assert (m / "to-a").read_bytes() == b"a in folder\n"
    assert os.listdir(m / "to-folder") == os.listdir(m / "folder")
    assert os.readlink(m / "folder/link") == "sub/big.bin"
    assert (m / "folder/link").read_bytes() == BIG
    env.check(mtimes=True)
    assert os.stat(m / "lower.txt").st_mtime_ns == stamp     # the child keeps them


def test_fsync_fdatasync_statvfs_and_locks(env):
    m = env.mnt
    fd = os.open(m / "synced", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)       # kernel-local locks
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 3, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 3, 0)
    finally:
        os.close(fd)
    run("flock", "-n", m / "synced", "true", cwd=m)            # and another process's
    st = os.statvfs(m)
    assert st.f_bsize > 0 and st.f_namemax == 255
    assert st.f_files >= len([p for p in SPEC if not p.endswith("empty")])
    assert st.f_bavail > 0 and st.f_blocks >= st.f_bfree >= st.f_bavail   # room to write
    run("df", m, cwd=m)
    subprocess.run(["sync", "-f", str(m / "synced")], check=True, timeout=30)
    assert (m / "synced").read_bytes() == b"durable"


def test_hard_links_and_chown_to_another_user_are_eperm(env):
    m = env.mnt
    assert errno_of(lambda: os.link(m / "lower.txt", m / "hard")) == errno.EPERM
    assert not os.path.exists(m / "hard")
    other = os.getuid() + 1000
    assert errno_of(lambda: os.chown(m / "lower.txt", other, -1)) == errno.EPERM
    assert errno_of(lambda: os.chown(m / "lower.txt", -1, os.getgid() + 1000)) == errno.EPERM
    os.chown(m / "lower.txt", os.getuid(), os.getgid())          # to oneself: fine
    assert os.stat(m / "lower.txt").st_uid == os.getuid()
    r = run("ln", m / "lower.txt", m / "hard", cwd=m, check=False)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert env.pending() == []
    assert " ERROR " not in Path(env.info.log).read_text()   # answers, not server errors


def test_read_your_writes_across_handles_and_the_version_xattr(env):
    m = env.mnt
    assert os.getxattr(m / "lower.txt", XATTR_VERSION).decode() == env.vid
    with open(m / "lower.txt", "rb") as reader:                 # opened before the copy-up
        with open(m / "lower.txt", "r+b") as writer:
            writer.write(b"LOW")
            writer.flush()
            assert reader.read() == b"LOWer\n"
        assert os.getxattr(m / "lower.txt", XATTR_VERSION).decode() == "overlay"
    with open(m / "lower.txt", "rb") as reader:
        with open(m / "lower.txt", "ab") as writer:
            writer.write(b"more\n")
        assert reader.read() == b"LOWer\nmore\n"
    assert os.getxattr(m / "folder/a.txt", XATTR_VERSION).decode() == env.vid
    child = env.commit()
    assert os.getxattr(m / "lower.txt", XATTR_VERSION).decode() == child
    assert os.getxattr(m / "folder/a.txt", XATTR_VERSION).decode() == env.vid


def test_strata_status_json_lists_every_kind_of_change(env):
    m = env.mnt
    write_file(m / "added.txt", b"new\n")
    os.mkdir(m / "added-dir")
    os.symlink("lower.txt", m / "added-link")
    write_file(m / "folder/a.txt", b"changed\n")
    os.unlink(m / "exec.sh")
    os.rename(m / "folder/sub", m / "moved-sub")
    os.rename(m / "lower.txt", m / "moved.txt")
    r = strata("status", "--json", m)
    assert r.returncode == 0, r.stderr
    import json
    st = json.loads(r.stdout)
    assert st["base"] == env.vid and st["committing"] is False
    assert st["changes"] == [
        {"change": "added", "path": "added-dir/"},
        {"change": "added", "path": "added-link"},
        {"change": "added", "path": "added.txt"},
        {"change": "removed", "path": "exec.sh"},
        {"change": "modified", "path": "folder/a.txt"},
        {"change": "renamed", "path": "moved-sub", "from": "folder/sub"},
        {"change": "renamed", "path": "moved.txt", "from": "lower.txt"},
    ]
    text = strata("status", m)
    assert text.returncode == 0
    assert text.stdout.splitlines() == [
        "A added-dir/", "A added-link", "A added.txt", "D exec.sh", "M folder/a.txt",
        "R moved-sub <- folder/sub", "R moved.txt <- lower.txt"]
    write_file(m / "two\nlines.txt", b"x")   # a row stays a row; --json keeps the name
    odd = strata("status", m)
    assert "A two\\nlines.txt" in odd.stdout.splitlines()
    names = [c["path"] for c in json.loads(strata("status", "--json", m).stdout)["changes"]]
    assert "two\nlines.txt" in names
    assert f"on version {env.vid}: 7 changes" in text.stderr


def test_write_only_handles_stay_coherent_with_cached_readers_and_mappings(env):
    # write-only handles bypass the page cache (direct_io): handles that cached the
    # file's pages, and shared mappings, still see every write
    import mmap
    m = env.mnt
    path = str(m / "coherent.bin")
    w = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    r = rw = -1
    try:
        os.write(w, b"A" * 8192)
        r = os.open(path, os.O_RDONLY)
        assert os.pread(r, 8192, 0) == b"A" * 8192                # now in the page cache
        rw = os.open(path, os.O_RDWR)
        with mmap.mmap(rw, 8192) as mapped:
            assert mapped[:4] == b"AAAA"
            os.pwrite(w, b"BBBB", 0)
            os.pwrite(w, b"CC", 4096)
            assert os.pread(r, 4, 0) == b"BBBB" and os.pread(r, 4, 4096) == b"CCAA"
            assert mapped[:4] == b"BBBB" and mapped[4096:4100] == b"CCAA"
        os.write(w, b"D" * 100)                                   # extends the file
        assert os.fstat(r).st_size == 8292
        w2 = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(w2, b"tail")
        os.close(w2)
        assert os.pread(r, 10, 8288) == b"DDDDtail"
    finally:
        for fd in (w, r, rw):
            if fd >= 0:
                os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"BBBB" + b"A" * 4092 + b"CC" + b"A" * 4094 + b"D" * 100 + b"tail"
