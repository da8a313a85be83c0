"""Mount lifecycle: build the filesystem for a version, serve it (foreground), and start it
in the background, returning once the mountpoint is live.

A background mount server runs in its own session, logs to a file, and is started in one
of two ways:
- forked from the starter (`start_background(..., fork=True)`): the strata CLI does this,
  and so does this module's `--background` program, which `Dataset.mount` runs. The
  server then costs no second interpreter start and no second import of strata (about
  200 ms on a small VM). Only a short-lived, single-threaded starter may ask for it (a
  forked child of a threaded process can inherit a lock some thread held); with other
  threads running, the server is started as a program instead.
- as this module run as a program (`python -m strata.vfs.mount ...`).
Either way the server reports readiness over a socket pair, and the starter reports
the server's last log line if it died first. Which mounts exist, stale-mount cleanup and
unmounting are in strata.vfs.registry.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from strata.catalog import config
from strata.catalog.repo import open_repo
from strata.storage.cache import UnitCache
from strata.storage.errors import StrataError
from strata.vfs.core import Filesystem
from strata.vfs.errors import MountError
from strata.vfs.reader import Reader
from strata.vfs.registry import (  # noqa: F401  (re-exported: callers use strata.vfs.mount)
    SERVER_NAME, MountInfo, _registry_path, all_mounts, clean_stale, control_call,
    control_path, is_mounted, mountinfo_line, register, registered, unmount, unregister)
from strata.vfs.repoview import ALL_VERSIONS, RepositoryView
from strata.vfs.views import VersionView

log = logging.getLogger("strata.vfs")

READY_TIMEOUT = 60.0
READ_AHEAD_KB = 1024
READY = b"1"   # what the server sends its starter once the mount is live


# ---- building and serving -----------------------------------------------------------
def open_cache(cache_size: int | None = None) -> UnitCache:
    cfg = config.load()
    size = cache_size or cfg.cache_size or config.default_cache_size(cfg.cache_dir)
    return UnitCache(cfg.cache_dir, size)


def build(repo_url, version_id: str, *, cache_size: int | None = None):
    """The filesystem of a version; `repo_url` may also be an open Repository."""
    repo = open_repo(repo_url)
    cache = open_cache(cache_size)
    reader = Reader(repo, cache)
    if version_id == ALL_VERSIONS:
        view = RepositoryView(repo, reader)
    else:
        view = VersionView(repo, version_id, reader)
    return Filesystem(view), reader, cache


def _raise_read_ahead(mountpoint: str) -> None:
    """A 1 MiB kernel readahead for the mount; no mount option sets it, only sysfs."""
    fields = mountinfo_line(mountpoint)
    if not fields:
        return
    try:
        with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("could not raise readahead of %s: %s", mountpoint, e)


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.isdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not an existing folder")
    if is_mounted(mountpoint):
        info = registered(mountpoint)
        who = f" by strata (version {info.version}, pid {info.pid})" if info else ""
        raise MountError(f"{mountpoint} is already mounted{who}; "
                         f"run 'strata unmount {mountpoint}' first")
    if os.listdir(mountpoint):
        raise MountError(f"mountpoint {mountpoint} is not empty")


def serve_foreground(repo_url, version_id: str, mountpoint: str, *,
                     cache_size: int | None = None, log_path: str = "",
                     debug: bool = False, writable: bool = False,
                     overlay: str | None = None, ready_fd: int | None = None,
                     checked: bool = False) -> None:
    """Serve the version at `mountpoint` until unmounted or signalled. `repo_url` may be
    an open Repository. Once the mount is live, READY is written to `ready_fd` (if
    given). `checked`: the starter has just cleaned a stale mount and checked the
    mountpoint, so that is not done again."""
    from strata.vfs.fuse import FuseOperations, serve   # the only import of the adapter
    _keep_freed_memory()
    mountpoint = os.path.abspath(mountpoint)
    if not checked:
        message = clean_stale(mountpoint)
        if message:
            log.warning("%s", message)
        check_mountpoint(mountpoint)
    if writable and version_id == ALL_VERSIONS:
        raise MountError("a mount of every version is read-only; mount one version "
                         "with --writable to change it")
    fs, reader, cache = build(repo_url, version_id, cache_size=cache_size)
    repo = fs.view.repo
    session = server = None
    control = ""
    if writable:
        from strata.vfs.session import Session, default_overlay_name
        overlay = overlay or default_overlay_name(mountpoint)
        session = Session(repo, overlay, version_id, reader)
        fs = Filesystem(session.build_view(), writable=True)
        session.fs = fs
        control = control_path(mountpoint)
    info = MountInfo(mountpoint, os.getpid(), version_id, repo.url, log_path, writable,
                     time.time(), overlay or "", control)
    ops = FuseOperations(fs)

    def after_init() -> None:
        # the kernel applies the init reply's readahead after this callback returns, so
        # raise it from a thread whose stat() of the root waits for that reply
        try:
            os.stat(mountpoint)
        except OSError:
            return
        _raise_read_ahead(mountpoint)

    def ready() -> None:
        nonlocal server
        threading.Thread(target=after_init, name="strata-readahead-setup",
                         daemon=True).start()
        if session is not None:
            server = _serve_control(control, session, ops, on_commit=lambda child_id: register(
                replace(registered(mountpoint) or info, version=child_id)))
        register(info)
        log.info("mounted %s of %s at %s%s", "every version" if version_id == ALL_VERSIONS
                 else f"version {version_id}", repo.url, mountpoint,
                 f" (writable, overlay {overlay})" if writable else "")
        if ready_fd is not None:
            _signal_ready(ready_fd)

    ops.on_ready = ready
    try:
        serve(fs, mountpoint, fsname=f"strata:{version_id[:12]}", debug=debug,
              operations=ops)
    finally:
        if server is not None:
            server.close()
            try:
                os.unlink(control)
            except FileNotFoundError:
                pass
        reader.close()
        cache.close()
        unregister(mountpoint)
        st = cache.stats
        log.info("unmounted %s (cache: %d hits, %d fetches of %.1f MB, %d corrupt, %d "
                 "evicted, readahead held for the disk %d times)", mountpoint, st.hits,
                 st.fetches, st.bytes_fetched / 1e6, st.corrupt, st.evicted, st.throttled)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8   # <malloc.h>


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse. Every fetched chunk is a new 8 MiB
    buffer; by default glibc returns freed blocks this large to the kernel at once, so the
    next download faults in and zeroes fresh pages: 15% of the mount's CPU during a cold
    S3 read (perf), 3.3 -> 2.4 CPU seconds per GiB with this. Retained memory is
    bounded by the readahead window and the in-memory hot map, as before; the trim
    threshold still returns a larger surplus. Two arenas instead of glibc's eight per
    core: each thread's arena keeps what it freed, so a dozen download threads each held
    their own free chunks (peak RSS of a cold 1 GiB read 330-410 -> 280-300 MB, rate
    unchanged). Only the mount server does this (it runs in a process of its own)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return   # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)    # glibc's maximum; chunks come from the heap
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    mallopt(_M_ARENA_MAX, 2)


def _signal_ready(fd: int) -> None:
    # a socket rather than a pipe: with MSG_NOSIGNAL, a starter that is gone (timed out,
    # interrupted) is an error here, not a SIGPIPE that kills the live server
    try:
        with socket.socket(fileno=fd) as s:
            s.send(READY, socket.MSG_NOSIGNAL)
    except OSError:
        pass   # nobody is waiting any more: serve all the same


def _serve_control(path: str, session, ops, on_commit: Callable[[str], None]):
    """The control channel of a writable mount; `on_commit(child id)` after each commit
    (the mount now shows that version: its registry entry says so)."""
    from strata.vfs import control

    def status() -> dict:
        return session.status()

    def commit(name=None, version=None, description=None, tags=None) -> dict:
        child = session.commit(name=name, version=version, description=description,
                               tags=tags)
        on_commit(child.id)
        return child.summary()

    def discard() -> dict:
        paths = [r.path for r in session.live.rows()]
        dropped = session.discard()
        for p in sorted(set(paths), key=lambda p: -p.count("/")):
            ops.invalidate(p)
        return {"discarded": dropped}

    return control.serve(path, {"status": status, "commit": commit, "discard": discard})


def _run_server(serve: Callable[[], None]) -> int:
    """The program boundary of a mount server: its exit status, errors on stderr (the
    log of a background server), one line for a StrataError."""
    try:
        serve()
    except StrataError as e:
        print(f"strata: error: {e}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - the program boundary
        log.exception("mount server failed")
        return 3
    return 0


def _log_to_stderr(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


# ---- starting a background server -----------------------------------------------------
def logs_dir() -> Path:
    return config.load().cache_dir / "logs"


def start_background(repo_url, version_id: str, mountpoint: str, *,
                     cache_size: int | None = None, writable: bool = False,
                     overlay: str | None = None, timeout: float = READY_TIMEOUT,
                     fork: bool = False,
                     version_known: bool = False) -> tuple[MountInfo, str | None]:
    """Start a mount server and return once the mount is live. `repo_url` may be an
    open Repository. Returns (info, message about a cleaned stale mount or None).

    fork: serve from a child of this process rather than a new program (see the module
    docstring); only for a short-lived starter that has nothing left to do but exit.
    version_known: the caller has just read the version's record, so it is not read
    again here (it is read here to fail with a clear message on an unknown version)."""
    mountpoint = os.path.abspath(mountpoint)
    cleaned = clean_stale(mountpoint)
    check_mountpoint(mountpoint)
    repo = open_repo(repo_url)
    if not version_known and version_id != ALL_VERSIONS:
        repo.record(version_id)
    folder = logs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = str(folder / f"mount-{version_id[:12]}-{int(time.time())}-{os.getpid()}.log")
    ours, theirs = socket.socketpair()
    ready_fd = theirs.fileno()
    try:
        if fork and _single_threaded():
            def serve() -> None:
                serve_foreground(repo, version_id, mountpoint, cache_size=cache_size,
                                 log_path=log_path, writable=writable, overlay=overlay,
                                 ready_fd=ready_fd, checked=True)
            server = _ForkedServer(serve, log_path, ours, theirs)
        else:
            server = _ProgramServer(repo.url, version_id, mountpoint, log_path, ready_fd,
                                    cache_size=cache_size, writable=writable,
                                    overlay=overlay)
    finally:
        theirs.close()   # the server holds its end now: end-of-file means it is gone
    with ours:
        return _wait_ready(server, ours, mountpoint, log_path, timeout), cleaned


def _wait_ready(server, ready: socket.socket, mountpoint: str, log_path: str,
                timeout: float) -> MountInfo:
    readable, _, _ = select.select([ready], [], [], timeout)
    if not readable:
        server.stop()
        raise MountError(f"mount did not become ready within {timeout:.0f} s "
                         f"(log: {log_path})")
    if ready.recv(1) != READY:   # end-of-file: the server exited before the mount was live
        server.reap()
        raise MountError(f"mount failed: {_last_line(log_path)} (log: {log_path})")
    info = registered(mountpoint)
    if info is None or not is_mounted(mountpoint):   # unmounted again at once
        raise MountError(f"mount failed: {_last_line(log_path)} (log: {log_path})")
    return info


def _single_threaded() -> bool:
    """True when this process runs one thread (counting threads Python did not start)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


class _ProgramServer:
    """A server started as `python -m strata.vfs.mount` (a new interpreter)."""

    def __init__(self, repo_url: str, version_id: str, mountpoint: str, log_path: str,
                 ready_fd: int, *, cache_size: int | None, writable: bool,
                 overlay: str | None):
        args = [sys.executable, "-m", "strata.vfs.mount", "--repo", repo_url,
                "--id", version_id, "--log", log_path, "--ready-fd", str(ready_fd)]
        if cache_size:
            args += ["--cache-size", str(cache_size)]
        if writable:
            args.append("--writable")
        if overlay:
            args += ["--overlay", overlay]
        args.append(mountpoint)
        with open(log_path, "ab") as logf:
            self.child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf,
                                          stderr=logf, start_new_session=True,
                                          close_fds=True, pass_fds=(ready_fd,))

    def stop(self) -> None:
        self.child.terminate()

    def reap(self) -> None:
        try:
            self.child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class _ForkedServer:
    """A server forked from this process. The child starts its own session, sends its
    output to the log, and never returns into the caller's code: it exits when the
    mount ends.

    What the child shares with this process, and why that is safe:
    - this process runs one thread (checked by the caller), so no lock is held by a
      thread the child lacks;
    - it has opened neither the cache nor a manifest (SQLite connections must not cross
      a fork): the child opens its own;
    - the repository's storage client (a local folder, or an SDK's connection pool)
      passes to the child; this process does not use it again, it only exits;
    - descriptors that are pipes, FIFOs or terminals came from whoever started this
      process (strata opens none): the child closes them, as a new program's close_fds
      would, so that no reader of such a pipe waits for the end of the mount."""

    def __init__(self, serve: Callable[[], None], log_path: str, ours: socket.socket,
                 theirs: socket.socket):
        self.log_path = log_path
        for stream in (sys.stdout, sys.stderr):   # or the child writes their buffers too
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self.pid = os.fork()
        if self.pid == 0:
            ours.close()
            theirs.detach()   # its descriptor now belongs to the serving code
            self._child(serve)   # never returns

    def _child(self, serve: Callable[[], None]) -> None:
        code = 3
        try:
            os.setsid()
            _name_process(SERVER_NAME)
            _redirect_stdio(self.log_path)
            _close_inherited_pipes()
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # as the server program has it
            _log_to_stderr(debug=False)
            code = _run_server(serve)
        except BaseException:   # noqa: BLE001 - a forked child must never unwind into its parent's code
            try:
                log.exception("mount server failed")
            except BaseException:  # noqa: BLE001
                pass
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(code)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)  # its ready socket closed at its exit: it is exiting now


def _name_process(name: str) -> None:
    """The name `ps` and `top` show; it also tells registry._alive this is a server."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _redirect_stdio(log_path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    logf = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(devnull, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    os.close(devnull)
    os.close(logf)


def _close_inherited_pipes() -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue   # the descriptor listdir itself used
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            os.close(fd)


def _last_line(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip()]
    except FileNotFoundError:
        return "no log"
    for ln in reversed(lines):
        if "error" in ln.lower():
            return ln.split("strata: error: ", 1)[-1]
    return lines[-1] if lines else "no output"


# ---- the mount server program -------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="strata-mount", description="strata mount server")
    p.add_argument("--repo")
    p.add_argument("--id", required=True)
    p.add_argument("--cache-size", type=int)
    p.add_argument("--log", default="")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--writable", action="store_true")
    p.add_argument("--overlay")
    p.add_argument("--ready-fd", type=int,
                   help="a socket to send 1 to once the mount is live")
    p.add_argument("--background", action="store_true",
                   help="start a background server (forked from this process), print "
                        "its registry entry as JSON once the mount is live, and exit")
    p.add_argument("mountpoint")
    a = p.parse_args(argv)
    if a.background:
        return _start_and_report(a)
    _log_to_stderr(a.debug)
    if a.ready_fd is not None:
        os.set_inheritable(a.ready_fd, False)   # not to programs the server runs
    return _run_server(lambda: serve_foreground(
        a.repo, a.id, a.mountpoint, cache_size=a.cache_size, log_path=a.log,
        debug=a.debug, writable=a.writable, overlay=a.overlay, ready_fd=a.ready_fd))


def _start_and_report(a: argparse.Namespace) -> int:
    """`--background`: what Dataset.mount runs (one program start instead of the CLI's
    and then the server's)."""
    try:
        info, cleaned = start_background(a.repo, a.id, a.mountpoint,
                                         cache_size=a.cache_size, writable=a.writable,
                                         overlay=a.overlay, fork=True)
    except StrataError as e:
        print(f"strata: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps({**asdict(info), "cleaned": cleaned}))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
