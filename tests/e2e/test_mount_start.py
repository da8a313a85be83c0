"""How a background mount server starts: `strata mount` and `Dataset.mount` fork it from a
single-threaded starter (no second interpreter), a threaded caller starts it as a
program, and a server that dies while starting is still reported in one line."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading

import pytest

from strata.catalog.dataset import Dataset
from strata.storage.errors import StrataError
from strata.vfs import mount as mount_mod
from tests.e2e.conftest import (EXIT, READY, alive, in_proc_mounts, server_pids, strata,
                                wait_for)
from tests.e2e.test_lifecycle import FILES, one_error_line


def cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def test_cli_mount_forks_the_server_into_its_own_session(build, mounts):
    vid = build.version(FILES)
    mnt = mounts.folder()
    run = strata("--repo", build.repo_url, "mount", "--id", vid, mnt)
    assert run.returncode == 0, run.stderr
    info = mount_mod.registered(str(mnt))
    assert b"strata.cli.main" in cmdline(info.pid)   # the CLI's process, not a new program
    assert os.getsid(info.pid) == info.pid           # detached from the terminal's session
    assert os.readlink(f"/proc/{info.pid}/fd/2") == info.log
    assert server_pids(mnt) == [info.pid]            # what the teardown would end
    assert (mnt / "d/b.txt").read_bytes() == b"beta\n"
    assert strata("unmount", mnt).returncode == 0
    wait_for(lambda: not alive(info.pid), EXIT, "the server to exit")
    assert not in_proc_mounts(mnt)


def test_forked_server_keeps_no_pipe_of_whoever_started_the_cli(build, mounts):
    """A pipe the CLI inherited reaches end-of-file when the CLI exits, although the
    server it forked lives on (as with a new program started with close_fds)."""
    vid = build.version(FILES)
    mnt = mounts.folder()
    r, w = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "strata.cli.main", "--repo",
                               build.repo_url, "mount", "--id", vid, str(mnt)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              pass_fds=(w,), timeout=READY)
        os.close(w)
        w = -1
        assert proc.returncode == 0, proc.stderr
        readable, _, _ = select.select([r], [], [], READY)
        assert readable and os.read(r, 1) == b""
        assert os.path.ismount(mnt)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert strata("unmount", mnt).returncode == 0


def test_server_dying_after_the_fork_is_reported_in_one_line(build, mounts):
    """The overlay holds changes on v1, so the server for v2 fails while starting: after
    the CLI has forked it. The CLI still exits 1 with the server's error and its log."""
    v1 = build.version(FILES)
    v2 = build.version({"c.txt": b"c\n"}, parents=[v1])
    mnt = mounts.folder()
    assert strata("--repo", build.repo_url, "mount", "--id", v1, "--writable",
                  mnt).returncode == 0
    (mnt / "new.txt").write_bytes(b"pending\n")
    assert strata("unmount", mnt).returncode == 0

    run = strata("--repo", build.repo_url, "mount", "--id", v2, "--writable", mnt)
    line = one_error_line(run, "holds pending changes on version " + v1)
    assert line.startswith("strata: error: mount failed: ") and "(log: " in line
    assert not in_proc_mounts(mnt) and mount_mod.registered(str(mnt)) is None

    with pytest.raises(StrataError, match="holds pending changes"):
        Dataset.get(v2, repo=build.repo_url).mount(mnt, writable=True)
    assert not in_proc_mounts(mnt)


def test_dataset_mount_starts_one_program(build, mounts):
    vid = build.version(FILES)
    mnt = mounts.folder()
    with Dataset.get(vid, repo=build.repo_url).mount(mnt) as m:
        args = cmdline(mount_mod.registered(m.path).pid)
        assert b"strata.vfs.mount" in args and b"--background" in args
        assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    assert not in_proc_mounts(mnt)


def test_a_threaded_caller_gets_a_server_program_instead_of_a_fork(build, mounts):
    vid = build.version(FILES)
    mnt = mounts.folder()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        info, _ = mount_mod.start_background(build.repo_url, vid, str(mnt), fork=True,
                                             timeout=READY)
    finally:
        stop.set()
        thread.join()
    args = cmdline(info.pid)
    assert b"strata.vfs.mount" in args and b"--background" not in args
    assert (mnt / "a.txt").read_bytes() == b"alpha\n"
    mounts.unmount(mnt)


STARTER = """
import sys
from strata.vfs import mount
info, _ = mount.start_background(sys.argv[1], sys.argv[2], sys.argv[3], fork=True)
print(info.pid)
"""


def test_a_forked_server_is_known_live_whatever_program_started_it(build, mounts, tmp_path):
    """The server's command line is its starter's, which need not name strata: unmount
    must still see a live server, not a stale mount."""
    vid = build.version(FILES)
    mnt = mounts.folder()
    starter = tmp_path / "starter.py"
    starter.write_text(STARTER)
    run = subprocess.run([sys.executable, str(starter), build.repo_url, vid, str(mnt)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=READY)
    assert run.returncode == 0, run.stderr
    pid = int(run.stdout.strip())
    assert mount_mod.clean_stale(str(mnt)) is None
    assert mount_mod.unmount(str(mnt)) == f"unmounted {mnt}"
    wait_for(lambda: not alive(pid), EXIT, "the server to exit")


def test_a_server_whose_starter_is_gone_keeps_serving_after_ready():
    """The server program runs with SIGPIPE at its default (death); telling a starter
    that was interrupted meanwhile that the mount is ready must not kill it."""
    code = ("import signal, socket\n"
            "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
            "from strata.vfs.mount import _signal_ready\n"
            "ours, theirs = socket.socketpair()\n"
            "ours.close()\n"
            "_signal_ready(theirs.detach())\n"
            "print('still here')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=READY)
    assert run.returncode == 0 and run.stdout == "still here\n", (run.returncode, run.stderr)
