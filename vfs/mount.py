"""Mount lifecycle: build the filesystem for a version, serve it (foreground), start it as
a background process that logs to a file, unmount, and clean up stale mounts.

A background mount is this module run as a program (`python -m strata.vfs.mount ...`)
in its own session; the starter returns once the mountpoint is live, or reports the
child's last log line if it died first. Which mounts exist, stale-mount cleanup and
unmounting are in strata.vfs.registry.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from strata.catalog import config
from strata.catalog.dataset import open_repo
from strata.storage.cache import UnitCache
from strata.vfs.core import Filesystem
from strata.vfs.errors import MountError
from strata.vfs.reader import Reader
from strata.vfs.registry import (  # noqa: F401  (re-exported: callers use strata.vfs.mount)
    MountInfo, _registry_path, all_mounts, clean_stale, control_call, control_path,
    is_mounted, mountinfo_line, register, registered, unmount, unregister)
from strata.vfs.views import VersionView

log = logging.getLogger("strata.vfs")

READY_TIMEOUT = 60.0
READ_AHEAD_KB = 1024


# ---- building and serving -----------------------------------------------------------
def open_cache(cache_size: int | None = None) -> UnitCache:
    cfg = config.load()
    size = cache_size or cfg.cache_size or config.default_cache_size(cfg.cache_dir)
    return UnitCache(cfg.cache_dir, size)


def build(repo_url: str | None, version_id: str, *, cache_size: int | None = None):
    repo = open_repo(repo_url)
    cache = open_cache(cache_size)
    reader = Reader(repo, cache)
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


def serve_foreground(repo_url: str | None, version_id: str, mountpoint: str, *,
                     cache_size: int | None = None, log_path: str = "",
                     debug: bool = False, writable: bool = False,
                     overlay: str | None = None) -> None:
    from strata.vfs.fuse import FuseOperations, serve   # the only import of the binding
    mountpoint = os.path.abspath(mountpoint)
    message = clean_stale(mountpoint)
    if message:
        log.warning("%s", message)
    check_mountpoint(mountpoint)
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
            server = _serve_control(control, session, ops)
        register(info)
        log.info("mounted version %s of %s at %s%s", version_id, repo.url, mountpoint,
                 f" (writable, overlay {overlay})" if writable else "")

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
        log.info("unmounted %s", mountpoint)


def _serve_control(path: str, session, ops):
    from strata.vfs import control

    def status() -> dict:
        return session.status()

    def commit(name=None, version=None, description=None, tags=None) -> dict:
        child = session.commit(name=name, version=version, description=description,
                               tags=tags)
        return child.summary()

    def discard() -> dict:
        paths = [r.path for r in session.live.rows()]
        dropped = session.discard()
        for p in sorted(set(paths), key=lambda p: -p.count("/")):
            ops.invalidate(p)
        return {"discarded": dropped}

    return control.serve(path, {"status": status, "commit": commit, "discard": discard})


def logs_dir() -> Path:
    return config.load().cache_dir / "logs"


def start_background(repo_url: str | None, version_id: str, mountpoint: str, *,
                     cache_size: int | None = None, writable: bool = False,
                     overlay: str | None = None,
                     timeout: float = READY_TIMEOUT) -> tuple[MountInfo, str | None]:
    """Start a mount server process and return once the mount is live.
    Returns (info, message about a cleaned stale mount or None)."""
    mountpoint = os.path.abspath(mountpoint)
    cleaned = clean_stale(mountpoint)
    check_mountpoint(mountpoint)
    repo = open_repo(repo_url)
    repo.record(version_id)  # fail here, with a clear message, on an unknown version
    folder = logs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log_path = str(folder / f"mount-{version_id[:12]}-{int(time.time())}-{os.getpid()}.log")
    args = [sys.executable, "-m", "strata.vfs.mount", "--repo", repo.url, "--id", version_id,
            "--log", log_path]
    if cache_size:
        args += ["--cache-size", str(cache_size)]
    if writable:
        args.append("--writable")
    if overlay:
        args += ["--overlay", overlay]
    args.append(mountpoint)
    with open(log_path, "ab") as logf:
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if registered(mountpoint) is not None and is_mounted(mountpoint):
            return registered(mountpoint), cleaned
        code = child.poll()
        if code is not None:
            raise MountError(f"mount failed: {_last_line(log_path)} (log: {log_path})")
        time.sleep(0.02)  # polling a readiness condition, bounded by the deadline
    child.terminate()
    raise MountError(f"mount did not become ready within {timeout:.0f} s (log: {log_path})")


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
    p.add_argument("mountpoint")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        serve_foreground(a.repo, a.id, a.mountpoint, cache_size=a.cache_size,
                         log_path=a.log, debug=a.debug, writable=a.writable,
                         overlay=a.overlay)
    except Exception as e:  # noqa: BLE001 - the program boundary
        from strata.storage.errors import StrataError
        if isinstance(e, StrataError):
            print(f"strata: error: {e}", file=sys.stderr)
            return 1
        log.exception("mount server failed")
        return 3
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
