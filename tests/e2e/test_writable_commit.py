"""Commit, discard and crashes of a writable mount, driven as users drive them: real
writers, `strata status / commit / discard`, kill -9 of the mount server (after writes,
and in the middle of a commit), and mistakes that must fail in one line."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from strata.catalog.dataset import Dataset
from strata.vfs import mount as mount_mod
from strata.vfs.session import overlays_dir
from tests.conftest import small_disk
from tests.e2e.conftest import (CHUNK, EMPTY_DIR, EXIT, READY, File, Link, WritableEnv,
                                alive, in_proc_mounts, start_writable, strata,
                                tree, wait_for)
from tests.e2e.test_lifecycle import one_error_line

RNG = random.Random(9)
BIG = RNG.randbytes(3 * CHUNK + 11)
SPEC = {
    "keep.txt": b"keep\n",
    "edit.txt": b"before\n",
    "gone.txt": b"to be removed\n",
    "big.bin": BIG,
    "folder/a.txt": b"a\n",
    "folder/deeper/b.txt": b"b\n",
    "link": Link("keep.txt"),
    "run.sh": File(b"#!/bin/sh\n", 0o755),
    "hollow": EMPTY_DIR,
}


@pytest.fixture
def env(build, mounts, tmp_path) -> WritableEnv:
    return WritableEnv(build, mounts, tmp_path, SPEC)


def kill_server(mnt) -> int:
    info = mount_mod.registered(str(mnt))
    assert info is not None and alive(info.pid)
    os.kill(info.pid, signal.SIGKILL)
    wait_for(lambda: not alive(info.pid), EXIT, f"mount server {info.pid} to die")
    return info.pid


def remount(env: WritableEnv, version: str | None = None) -> str:
    """`strata mount --writable` at the same (stale) mountpoint; returns its output."""
    r = strata("--repo", env.repo_url, "mount", "--id", version or env.vid, "--writable",
               env.mnt)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def status(mnt) -> dict:
    r = strata("status", "--json", mnt)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def changes(mnt) -> set:
    return {(c["change"], c["path"], c.get("from")) for c in status(mnt)["changes"]}


def versions(repo_url: str) -> list[str]:
    return sorted(d["id"] for d in Dataset.list_datasets(repo=repo_url))


def edit(root) -> None:
    """A bit of every kind of change."""
    (root / "edit.txt").write_bytes(b"after\n")
    with open(root / "big.bin", "r+b") as f:       # one chunk of a chunked lower file
        f.seek(CHUNK + 5)
        f.write(b"patched")
    (root / "new").mkdir()
    (root / "new/one.txt").write_bytes(b"one\n")
    (root / "new/empty").mkdir()
    os.unlink(root / "gone.txt")
    os.rename(root / "folder", root / "renamed")
    os.symlink("renamed/a.txt", root / "to-a")
    os.chmod(root / "run.sh", 0o700)


# ---- commit while writing ----------------------------------------------------------
class Writer(threading.Thread):
    """Writes new files in a loop (each in two writes, then closed) and appends to one
    long-lived open file, until stopped; remembers when each file was closed."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.closed: list[tuple[str, bytes, float]] = []
        self.log = b""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            os.mkdir(self.root / "w")
            log = os.open(self.root / "w/log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            i = 0
            while not self.stop.is_set():
                name = f"w/{i:05d}.txt"
                data = (f"{i}\n" * (1 + i % 200)).encode()
                fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data[:len(data) // 2])
                os.write(fd, data[len(data) // 2:])
                os.close(fd)
                self.closed.append((name, data, time.monotonic()))
                line = f"line {i}\n".encode()
                os.write(log, line)
                self.log += line
                i += 1
            os.close(log)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_commit_while_another_thread_keeps_writing(env):
    (env.mnt / "slow.bin").write_bytes(RNG.randbytes(24 << 20))   # the commit takes a moment
    writer = Writer(env.mnt)
    writer.start()
    try:
        wait_for(lambda: len(writer.closed) >= 50 or writer.error, READY, "the writer")
        started = time.monotonic()
        r = strata("commit", env.mnt, "-m", "while writing")
        finished = time.monotonic()
        assert r.returncode == 0, r.stderr
        child = r.stdout.strip().splitlines()[-1]
        count = len(writer.closed)
        wait_for(lambda: len(writer.closed) >= count + 50 or writer.error, READY,
                 "more files after the commit")
    finally:
        writer.stop.set()
        writer.join(EXIT)
    assert writer.error is None, writer.error
    during = [n for n, _, t in writer.closed if started < t < finished]
    assert during, "no file was closed while the commit ran"

    in_child = env.child_copy(child)
    pending = {c["path"] for c in status(env.mnt)["changes"]}
    for name, data, _ in writer.closed:
        assert (env.mnt / name).read_bytes() == data, name          # never lost
        committed = (in_child / name).exists() and (in_child / name).read_bytes() == data
        assert committed or name in pending, name
    # the open log: the child has what it held at the freeze, the mount all of it
    assert writer.log.startswith((in_child / "w/log").read_bytes())
    assert (env.mnt / "w/log").read_bytes() == writer.log

    grandchild = strata("commit", env.mnt, "-m", "the rest")
    assert grandchild.returncode == 0, grandchild.stderr
    gc = env.child_copy(grandchild.stdout.strip().splitlines()[-1])
    assert sorted(os.listdir(gc / "w")) == sorted(
        [n.split("/")[1] for n, _, _ in writer.closed] + ["log"])
    for name, data, _ in writer.closed:
        assert (gc / name).read_bytes() == data, name
    assert (gc / "w/log").read_bytes() == writer.log
    assert status(env.mnt)["changes"] == []


# ---- crashes -----------------------------------------------------------------------
def test_kill_9_after_writes_then_mount_again_keeps_every_change(env):
    env.both(edit)
    env.both(lambda root: (root / "synced.bin").write_bytes(b""))
    # a file written and fsync'ed but still open when the server dies
    fd = os.open(env.mnt / "synced.bin", os.O_WRONLY)
    os.write(fd, b"fsynced bytes\n")
    os.fsync(fd)
    (env.local / "synced.bin").write_bytes(b"fsynced bytes\n")
    before = changes(env.mnt)
    pid = kill_server(env.mnt)
    try:
        os.close(fd)
    except OSError:
        pass   # the connection is gone; the bytes were fsync'ed already

    out = remount(env)
    assert f"cleaned up a stale mount at {env.mnt}" in out and str(pid) in out
    assert changes(env.mnt) == before
    assert ("added", "synced.bin", None) in before
    assert tree(env.mnt) == tree(env.local)                  # every byte intact
    env.check()


@pytest.mark.parametrize("moment", ["staging", "uploading"])
def test_kill_9_during_a_commit_then_commit_again_gives_one_child(env, moment):
    big = RNG.randbytes(100 << 20)
    env.both(edit)
    env.both(lambda root: (root / "huge.bin").write_bytes(big))
    overlay = overlays_dir() / mount_mod.registered(str(env.mnt)).overlay
    blobs = os.path.join(env.repo_url, "blobs")

    def blob_count() -> int:
        return sum(len(files) for _, _, files in os.walk(blobs))

    def draft_recorded() -> bool:
        try:
            return bool(json.loads((overlay / "state.json").read_text()).get("draft"))
        except (FileNotFoundError, ValueError):
            return False

    start = blob_count()
    reached = draft_recorded if moment == "staging" else (lambda: blob_count() > start + 4)
    commit = subprocess.Popen([sys.executable, "-m", "strata.cli.main", "commit", env.mnt],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: reached() or commit.poll() is not None, READY, moment)
        assert commit.poll() is None, "the commit ended before it could be interrupted"
        kill_server(env.mnt)
        _, err = commit.communicate(timeout=EXIT)
    finally:
        if commit.poll() is None:
            commit.kill()
            commit.wait()
    assert commit.returncode == 1 and "Traceback" not in err, err
    assert versions(env.repo_url) == [env.vid]                  # no child yet

    remount(env)
    st = status(env.mnt)
    assert st["committing"] is True
    # the changes the commit froze are listed (it said "nothing to commit")
    assert {"change": "added", "path": "huge.bin"} in st["committing_changes"]
    assert "huge.bin" in strata("status", env.mnt).stdout
    assert tree(env.mnt) == tree(env.local)     # the frozen changes are still served
    r = strata("commit", env.mnt)
    assert r.returncode == 0, r.stderr
    child = r.stdout.strip().splitlines()[-1]
    assert versions(env.repo_url) == sorted([env.vid, child])   # exactly one child
    search = strata("--repo", env.repo_url, "search", "--json")
    assert sorted(v["id"] for v in json.loads(search.stdout)) == sorted([env.vid, child])
    assert Dataset.get(child, repo=env.repo_url).parents == [env.vid]
    assert tree(env.child_copy(child)) == tree(env.local)
    assert status(env.mnt)["changes"] == [] and not status(env.mnt)["committing"]


# ---- discard -----------------------------------------------------------------------
def test_discard_drops_the_changes_at_once_and_for_good(env):
    m = env.mnt
    os.stat(m / "edit.txt")                  # the kernel caches these attributes
    edit(m)
    with open(m / "keep.txt", "ab") as f:
        f.write(b"a longer keep\n")
    assert os.stat(m / "keep.txt").st_size > len(b"keep\n")
    assert len(status(m)["changes"]) > 5
    r = strata("discard", m)
    assert r.returncode == 0, r.stderr
    # right away, no attribute timeout to wait out: the kernel was told
    cat = subprocess.run(["cat", m / "edit.txt", m / "keep.txt"], capture_output=True,
                         check=True, timeout=30)
    assert cat.stdout == b"before\nkeep\n"
    assert not os.path.exists(m / "new") and not os.path.lexists(m / "to-a")
    assert (m / "gone.txt").read_bytes() == b"to be removed\n"
    assert (m / "folder/deeper/b.txt").read_bytes() == b"b\n"
    assert not os.path.exists(m / "renamed")
    assert (m / "big.bin").read_bytes() == BIG
    assert os.stat(m / "run.sh").st_mode & 0o777 == 0o755
    assert tree(m) == tree(env.local)
    assert status(m)["changes"] == []

    # a remount finds nothing pending either
    r = strata("unmount", m)
    assert r.returncode == 0, r.stderr
    remount(env)
    assert status(m)["changes"] == []
    assert tree(m) == tree(env.local)


def test_after_a_commit_the_mount_is_registered_with_the_child(build, mounts):
    # `mount` at a busy mountpoint and a stale mount's message say which version a mount
    # shows: after a commit, the child it switched to
    vid = build.version({"a.txt": b"a\n"})
    mnt = mounts.folder()
    start_writable(mounts, vid, build.repo_url)
    (mnt / "b.txt").write_bytes(b"b\n")
    r = strata("commit", mnt)
    assert r.returncode == 0, r.stderr
    child = next(v for v in versions(build.repo_url) if v != vid)
    assert mount_mod.registered(str(mnt)).version == child
    r = strata("--repo", build.repo_url, "mount", "--id", vid, mnt)
    assert r.returncode != 0 and f"version {child}" in r.stderr, r.stderr


# ---- mistakes ----------------------------------------------------------------------
def test_status_commit_discard_need_a_writable_mount(build, mounts):
    vid = build.version({"a.txt": b"a\n"})
    ro = mounts.folder("ro")
    mounts.start(vid, build.repo_url, name="ro")
    plain = mounts.folder("plain")
    for args in (["status"], ["status", "--json"], ["commit", "-m", "x"], ["discard"]):
        line = one_error_line(strata(*args[:1], ro, *args[1:]), "read-only")
        assert str(ro) in line and "--writable" in line
        line = one_error_line(strata(*args[:1], plain, *args[1:]), "not a strata mount")
        assert str(plain) in line
        one_error_line(strata(*args[:1], plain / "missing", *args[1:]), "not a strata mount")
    assert not in_proc_mounts(plain)


def test_commit_with_nothing_pending_fails_in_one_line(build, mounts):
    vid = build.version({"a.txt": b"a\n"})
    mnt = mounts.folder()
    start_writable(mounts, vid, build.repo_url)
    one_error_line(strata("commit", mnt), "nothing to commit")
    (mnt / "b.txt").write_bytes(b"b\n")
    os.unlink(mnt / "b.txt")                 # created and removed: still nothing
    one_error_line(strata("commit", mnt), "nothing to commit")
    assert versions(build.repo_url) == [vid]
    r = strata("discard", mnt)
    assert r.returncode == 0 and "discarded 0 pending changes" in r.stdout + r.stderr


def test_a_full_disk_fails_writes_and_commit_with_enospc_and_keeps_the_changes(
        build, mounts, tmp_path, monkeypatch):
    vid = build.version({"a.txt": b"a\n"})
    small = tmp_path / "small"   # the overlay and the workspace live here
    with small_disk(small, "2m"):
        monkeypatch.setenv("XDG_DATA_HOME", str(small))
        mnt = mounts.folder()
        start_writable(mounts, vid, build.repo_url)
        with pytest.raises(OSError) as e, open(mnt / "big.bin", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(64 * 1024))
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:   # the overlay's journal is full too
            (mnt / "hi.txt").write_bytes(b"hi\n")
        assert e.value.errno == errno.ENOSPC
        written = (mnt / "big.bin").read_bytes()
        line = one_error_line(strata("commit", mnt), "No space left on device")
        assert "pending changes are kept" in line
        assert versions(build.repo_url) == [vid]
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        r = strata("commit", mnt)   # once there is room, the same changes are committed
        assert r.returncode == 0, r.stderr
        child = Dataset.get(dataset_project="p", dataset_name="n", repo=build.repo_url)
        assert child.parents == [vid] and "big.bin" in child.list_files()
        assert (mnt / "big.bin").read_bytes() == written
        mounts.unmount(mnt)


def test_changes_refused_by_a_full_journal_leave_the_overlay_whole(
        build, mounts, tmp_path, monkeypatch):
    # Removals and renames on a full disk: each fails whole (ENOSPC) or happens whole.
    # An unlink used to remove the upper file before its journal row, and a full journal
    # kept the row: the folder then failed with EIO, and every commit after it too.
    vid = build.version({"a.txt": b"a\n"})
    small = tmp_path / "small"
    with small_disk(small, "32m"):
        monkeypatch.setenv("XDG_DATA_HOME", str(small))
        mnt = mounts.folder()
        start_writable(mounts, vid, build.repo_url)
        (mnt / "z").mkdir()
        for i in range(200):
            (mnt / "z" / f"e{i}").write_bytes(b"%d\n" % i)
        with pytest.raises(OSError) as e, open(mnt / "filler", "wb") as f:
            while True:
                f.write(bytes(1 << 20))
        assert e.value.errno == errno.ENOSPC
        refused = 0
        for i in range(200):
            try:
                if i % 2:
                    os.unlink(mnt / "z" / f"e{i}")
                else:
                    os.rename(mnt / "z" / f"e{i}", mnt / "z" / f"r{i}")
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                refused += 1
        assert refused, "the disk was never full for the journal"
        os.unlink(mnt / "filler")
        shown = {p: (mnt / "z" / p).read_bytes() for p in os.listdir(mnt / "z")}
        assert len(shown) > 100 - refused
        for name, data in shown.items():   # each file is where one of the two left it
            assert data == b"%d\n" % int(name[1:])
        r = strata("commit", mnt)
        assert r.returncode == 0, r.stderr
        child = Dataset.get(dataset_project="p", dataset_name="n", repo=build.repo_url)
        assert sorted(child.list_files("z/*")) == sorted(f"z/{p}" for p in shown)
        mounts.unmount(mnt)


def test_a_control_client_that_hangs_up_leaves_the_server_running(build, mounts):
    import socket
    vid = build.version({"a.txt": b"a\n"})
    mnt = mounts.folder()
    info = start_writable(mounts, vid, build.repo_url)
    (mnt / "b.txt").write_bytes(b"b\n")
    for _ in range(3):   # as a `strata commit` interrupted by Ctrl-C does
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(mount_mod.registered(str(mnt)).control)
            s.sendall(b'{"op": "status"}\n')
    r = strata("status", mnt)   # answered after the server's reply found no one
    assert r.returncode == 0 and "b.txt" in r.stdout, r.stderr
    assert (mnt / "b.txt").read_bytes() == b"b\n" and alive(info.pid)


def test_a_second_writable_mount_of_one_overlay_is_refused_in_one_line(build, mounts):
    """Two mount servers writing one overlay's journal would corrupt it."""
    vid = build.version({"a.txt": b"a\n"})
    one, two = mounts.folder("one"), mounts.folder("two")
    r = strata("--repo", build.repo_url, "mount", "--id", vid, "--writable",
               "--overlay", "shared", one)
    assert r.returncode == 0, r.stderr
    (one / "b.txt").write_bytes(b"b\n")
    line = one_error_line(strata("--repo", build.repo_url, "mount", "--id", vid,
                                 "--writable", "--overlay", "shared", two),
                          "overlay shared is in use")
    assert "--overlay" in line
    assert not in_proc_mounts(two)
    assert changes(one) == {("added", "b.txt", None)}     # the first one is untouched
    assert strata("unmount", one).returncode == 0
    r = strata("--repo", build.repo_url, "mount", "--id", vid, "--writable",
               "--overlay", "shared", two)
    assert r.returncode == 0, r.stderr
    assert (two / "b.txt").read_bytes() == b"b\n"             # its pending change, resumed
