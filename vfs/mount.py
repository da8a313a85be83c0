"""Mount lifecycle: build the filesystem for a version, serve it (foreground), start it as
a background process that logs to a file, unmount, and clean up stale mounts.

A background mount is this module run as a program (`python -m strata.vfs.mount ...`)
in its own session; the starter returns once the mountpoint is live, or reports the
child's last log line if it died first. A registry file per mountpoint in the workspace
(mounts/<hash>.json) records pid, version and log, so `unmount` and the next `mount` can
tell a live mount from one left by a killed process.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from strata.catalog import config
from strata.catalog.dataset import open_repo
from strata.storage.cache import UnitCache
from strata.vfs.core import Filesystem
from strata.vfs.errors import MountError
from strata.vfs.reader import Reader
from strata.vfs.views import VersionView

log = logging.getLogger("strata.vfs")

READY_TIMEOUT = 60.0
READ_AHEAD_KB = 1024


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    pid: int
    version: str
    repo: str
    log: str
    writable: bool = False
    started: float = 0.0
    overlay: str = ""
    control: str = ""       # Unix socket of the server's control channel (writable mounts)


# ---- registry -----------------------------------------------------------------------
def _registry_path(mountpoint: str) -> Path:
    key = hashlib.sha256(_real(mountpoint).encode()).hexdigest()[:16]
    return config.workspace_dir() / "mounts" / f"{key}.json"


def registered(mountpoint: str) -> MountInfo | None:
    try:
        return MountInfo(**json.loads(_registry_path(mountpoint).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _control_path(mountpoint: str) -> str:
    """A short path for the control socket (Unix socket paths are limited to 108 bytes):
    a private folder under the runtime dir, keyed like the registry entry."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    folder = os.path.join(base, f"strata-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    key = hashlib.sha256(f"{config.workspace_dir()}|{_real(mountpoint)}".encode()).hexdigest()
    return os.path.join(folder, key[:20] + ".sock")


def _register(info: MountInfo) -> None:
    path = _registry_path(info.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1))
    os.replace(tmp, path)


def _unregister(mountpoint: str) -> None:
    _registry_path(mountpoint).unlink(missing_ok=True)


def all_mounts() -> list[MountInfo]:
    folder = config.workspace_dir() / "mounts"
    out = []
    for p in sorted(folder.glob("*.json")) if folder.exists() else ():
        try:
            out.append(MountInfo(**json.loads(p.read_text())))
        except (ValueError, TypeError):
            continue
    return out


# ---- kernel mount table -----------------------------------------------------------
def _real(mountpoint: str) -> str:
    # realpath() of the mountpoint itself would stat it: a FUSE request that deadlocks
    # while the server is still in its init callback. Resolve the parent only.
    mountpoint = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                        os.path.basename(mountpoint))


def _mountinfo_line(mountpoint: str) -> list[str] | None:
    target = _real(mountpoint)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return fields
    except FileNotFoundError:
        pass
    return None


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def is_mounted(mountpoint: str) -> bool:
    return _mountinfo_line(mountpoint) is not None


def _alive(pid: int) -> bool:
    """True if `pid` is a running mount server (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X") and b"strata" in cmdline


def _fusermount(mountpoint: str, lazy: bool = False) -> subprocess.CompletedProcess:
    for tool in ("fusermount3", "fusermount"):
        try:
            args = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
            return subprocess.run(args, capture_output=True, text=True)
        except FileNotFoundError:
            continue
    args = ["umount"] + (["-l"] if lazy else []) + [mountpoint]
    return subprocess.run(args, capture_output=True, text=True)


def clean_stale(mountpoint: str) -> str | None:
    """Detach a mount whose server process is gone (kill -9, crash). Returns a message
    saying what was cleaned, or None if there was nothing stale."""
    info = registered(mountpoint)
    stale = False
    try:
        # statfs, not stat: the kernel answers stat of a dead mount's root from attributes
        # it cached (our attr_timeout is an hour), but always asks the server for statfs
        os.statvfs(mountpoint)
    except OSError as e:
        # ENOTCONN: "Transport endpoint is not connected"; ECONNABORTED when the request
        # was queued while the dying server's threads were still closing /dev/fuse
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            stale = True
    if info is not None and not _alive(info.pid):
        stale = True
    if not stale:
        return None
    if is_mounted(mountpoint):
        _fusermount(mountpoint, lazy=True)
    _unregister(mountpoint)
    who = f" (pid {info.pid}, version {info.version})" if info else ""
    return f"cleaned up a stale mount at {mountpoint} left by a process that died{who}"


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
    fields = _mountinfo_line(mountpoint)
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
        control = _control_path(mountpoint)
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
        _register(info)
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
        _unregister(mountpoint)
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


def control_call(mountpoint: str, op: str, **args) -> dict:
    """Send a control request to the writable mount at `mountpoint`."""
    from strata.vfs import control
    mountpoint = os.path.abspath(mountpoint)
    info = registered(mountpoint)
    if info is None or not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not a strata mount")
    if not info.writable or not info.control:
        raise MountError(f"{mountpoint} is mounted read-only; mount it with --writable "
                         "to change it")
    return control.call(info.control, op, **args)


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


def unmount(mountpoint: str, timeout: float = 30.0) -> str:
    """Unmount cleanly; a stale mount is detached. Returns a message for the user."""
    mountpoint = os.path.abspath(mountpoint)
    stale = clean_stale(mountpoint)
    if stale:
        return stale
    if not is_mounted(mountpoint):
        _unregister(mountpoint)
        raise MountError(f"{mountpoint} is not mounted")
    info = registered(mountpoint)
    result = _fusermount(mountpoint)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise MountError(f"cannot unmount {mountpoint}: "
                         f"{detail[-1] if detail else 'unknown error'}"
                         " (is a program still using it? close it and retry)")
    if info is not None:
        deadline = time.monotonic() + timeout
        while _alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # wait for the server to finish its cleanup
    _unregister(mountpoint)
    return f"unmounted {mountpoint}"


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
