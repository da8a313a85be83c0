"""The life of a mount as users drive it: `strata mount` / `strata unmount`, mistakes that
must fail in one line, signals, kill -9 and the stale mount it leaves, Dataset.mount."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import subprocess
from pathlib import Path

import pytest

from strata.catalog.dataset import Dataset
from strata.storage.errors import StrataError
from strata.vfs import mount as mount_mod
from tests.e2e.conftest import EXIT, alive, in_proc_mounts, strata, wait_for

FILES = {"a.txt": b"alpha\n", "d/b.txt": b"beta\n"}


def one_error_line(run, contains: str) -> str:
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("strata: error: ") and contains in lines[0], lines[0]
    assert "Traceback" not in run.stderr
    return lines[0]


def server_of(mnt) -> int:
    info = mount_mod.registered(str(mnt))
    assert info is not None, f"no registry entry for {mnt}"
    assert alive(info.pid)
    return info.pid


def assert_cleanly_unmounted(mnt, pid: int) -> None:
    wait_for(lambda: not alive(pid), EXIT, f"mount server {pid} to exit")
    assert not in_proc_mounts(mnt)
    assert mount_mod.registered(str(mnt)) is None
    assert os.listdir(mnt) == []   # the plain, empty folder again


def test_mount_returns_when_ready_names_its_log_and_unmounts(build, mounts):
    vid = build.version(FILES)
    mnt = mounts.folder()
    run = strata("--repo", build.repo_url, "mount", "--id", vid, mnt)
    assert run.returncode == 0, run.stderr
    # ready when the command returns: no waiting here
    assert os.path.ismount(mnt) and in_proc_mounts(mnt)
    assert (mnt / "d/b.txt").read_bytes() == b"beta\n"
    message = (run.stdout + run.stderr).strip()
    assert f"at {mnt}" in message and vid in message
    log = message.split("log ", 1)[1].rstrip(")")
    assert os.path.isfile(log) and f"mounted version {vid}" in Path(log).read_text()
    pid = server_of(mnt)
    assert mount_mod.registered(str(mnt)).log == log

    info = strata("cache", "info", "--json")
    assert info.returncode == 0 and str(mnt) in info.stdout, info.stdout + info.stderr

    with open(mnt / "a.txt", "rb") as busy:   # a program still using the mount
        line = one_error_line(strata("unmount", mnt), "cannot unmount")
        assert str(mnt) in line
        assert busy.read() == b"alpha\n" and os.path.ismount(mnt)
    run = strata("unmount", mnt)
    assert run.returncode == 0, run.stderr
    assert f"unmounted {mnt}" in run.stdout + run.stderr
    assert_cleanly_unmounted(mnt, pid)
    one_error_line(strata("unmount", mnt), "is not mounted")


def test_mount_on_a_non_empty_or_mounted_folder_fails_in_one_line(build, mounts):
    vid = build.version(FILES)
    full = mounts.folder("full")
    (full / "someone's file").write_text("keep me")
    line = one_error_line(strata("--repo", build.repo_url, "mount", "--id", vid, full),
                          "not empty")
    assert str(full) in line
    assert not in_proc_mounts(full)
    assert (full / "someone's file").read_text() == "keep me"

    mnt = mounts.folder()
    assert strata("--repo", build.repo_url, "mount", "--id", vid, mnt).returncode == 0
    pid = server_of(mnt)
    line = one_error_line(strata("--repo", build.repo_url, "mount", "--id", vid, mnt),
                          "already mounted")
    assert str(mnt) in line and "strata unmount" in line
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"   # the first mount is untouched
    assert server_of(mnt) == pid
    one_error_line(strata("--repo", build.repo_url, "mount", "--id", "0" * 32,
                          mounts.folder("other")), "0" * 32)


def test_unmount_leaves_other_file_systems_alone(tmp_path):
    src, point = tmp_path / "src", tmp_path / "point"
    src.mkdir()
    point.mkdir()
    (src / "theirs").write_text("keep me")
    subprocess.run(["mount", "--bind", str(src), str(point)], check=True)
    try:
        line = one_error_line(strata("unmount", point), "not a strata mount")
        assert str(point) in line
        assert in_proc_mounts(point) and (point / "theirs").read_text() == "keep me"
    finally:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_background_server_unmounts_cleanly(build, mounts, sig):
    vid = build.version(FILES)
    mnt = mounts.folder()
    info = mounts.start(vid, build.repo_url)
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    os.kill(info.pid, sig)
    assert_cleanly_unmounted(mnt, info.pid)
    log = Path(info.log).read_text()
    assert f"unmounted {mnt}" in log
    assert "Traceback" not in log and "ERROR" not in log, log   # a clean exit, not a crash


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_foreground_mount_unmounts_cleanly(build, mounts, sig):
    vid = build.version(FILES)
    mnt = mounts.folder()
    proc = mounts.foreground(vid, build.repo_url)
    assert (mnt / "d/b.txt").read_bytes() == b"beta\n"
    proc.send_signal(sig)
    assert proc.wait(timeout=EXIT) == 0, proc.stderr.read()
    assert_cleanly_unmounted(mnt, proc.pid)


SYS_TGKILL = {"x86_64": 234, "aarch64": 131}   # <asm/unistd.h>


def test_a_stop_signal_taken_by_a_worker_thread_unmounts_too(build, mounts):
    """A signal sent to the process may be delivered to any of its threads; Python runs
    the handler in the main thread only once that thread wakes. Sent to a FUSE worker
    thread itself (tgkill), SIGTERM still unmounts at once (it used to wait for the main
    thread's hourly wake-up)."""
    vid = build.version(FILES)
    mnt = mounts.folder()
    proc = mounts.foreground(vid, build.repo_url)
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    worker = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    assert worker != proc.pid
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_TGKILL[platform.machine()], proc.pid, worker,
                        signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
    assert proc.wait(timeout=EXIT) == 0, proc.stderr.read()
    assert_cleanly_unmounted(mnt, proc.pid)


def test_kill_9_then_mount_again_and_unmount_a_stale_mount(build, mounts):
    vid = build.version(FILES)
    mnt = mounts.folder()
    assert strata("--repo", build.repo_url, "mount", "--id", vid, mnt).returncode == 0
    pid = server_of(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), EXIT, "the killed server to be gone")
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    # what a killed FUSE server leaves behind (ECONNABORTED if the request raced the exit)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)

    run = strata("--repo", build.repo_url, "mount", "--id", vid, mnt)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert f"cleaned up a stale mount at {mnt}" in out and str(pid) in out
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    pid2 = server_of(mnt)
    assert pid2 != pid

    os.kill(pid2, signal.SIGKILL)
    wait_for(lambda: not alive(pid2), EXIT, "the killed server to be gone")
    run = strata("unmount", mnt)
    assert run.returncode == 0, run.stderr
    assert "stale mount" in run.stdout + run.stderr
    assert not in_proc_mounts(mnt)
    assert mount_mod.registered(str(mnt)) is None
    assert os.listdir(mnt) == []


def test_dataset_mount_context_manager(build, mounts):
    vid = build.version(FILES)
    ds = Dataset.get(vid, repo=build.repo_url)
    mnt = mounts.folder()
    with ds.mount(mnt) as m:
        assert m.path == str(mnt) and os.fspath(m) == str(mnt)
        assert os.path.ismount(mnt)
        assert (mnt / "a.txt").read_bytes() == b"alpha\n"
        assert os.getxattr(mnt / "a.txt", "user.strata.version").decode() == vid
        pid = server_of(mnt)
    assert_cleanly_unmounted(mnt, pid)

    full = mounts.folder("full")
    (full / "x").write_text("x")
    with pytest.raises(StrataError, match="not empty"):
        ds.mount(full)
    assert not in_proc_mounts(full)


def test_stale_mount_without_its_registry_entry_is_cleaned(build, mounts):
    """The registry is in the workspace; a stale mount must be recognised without it too
    (another workspace mounted it, or the workspace was cleared)."""
    vid = build.version(FILES)
    mnt = mounts.folder()
    info = mounts.start(vid, build.repo_url)
    os.listdir(mnt)   # the kernel now holds the root's attributes for an hour
    os.kill(info.pid, signal.SIGKILL)
    wait_for(lambda: not alive(info.pid), EXIT, "the killed server to be gone")
    os.unlink(mount_mod._registry_path(str(mnt)))
    run = strata("--repo", build.repo_url, "mount", "--id", vid, mnt)
    assert run.returncode == 0, run.stderr
    assert f"cleaned up a stale mount at {mnt}" in run.stdout + run.stderr
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    assert strata("unmount", mnt).returncode == 0
    assert not in_proc_mounts(mnt)
