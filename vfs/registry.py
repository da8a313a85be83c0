"""Which strata mounts exist: the registry, the kernel's mount table, stale mounts, and
the two things done to a live mount from outside it (a control request, an unmount).

A registry file per mountpoint in the workspace (mounts/<hash>.json) records the server's
pid, version and log, so `unmount`, `status` and the next `mount` can tell a live mount
from one left by a killed process. This module is light on purpose: `strata status`,
`commit`, `discard` and `unmount` import it and strata.vfs.control, not the filesystem.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from strata.catalog import config
from strata.vfs.errors import MountError

# The process name (comm) of a mount server forked from its starter, whose command line
# is the starter's (and need not name strata: any program may call start_background).
SERVER_NAME = "strata-mount"
FSTYPE = "fuse.strata"      # the type of every strata mount (vfs.fuse: subtype "strata")


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


def control_path(mountpoint: str) -> str:
    """A short path for the control socket (Unix socket paths are limited to 108 bytes):
    a private folder under the runtime dir, keyed like the registry entry."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    folder = os.path.join(base, f"strata-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    key = hashlib.sha256(f"{config.workspace_dir()}|{_real(mountpoint)}".encode()).hexdigest()
    return os.path.join(folder, key[:20] + ".sock")


def register(info: MountInfo) -> None:
    path = _registry_path(info.mountpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1))
    os.replace(tmp, path)


def unregister(mountpoint: str) -> None:
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


def mountinfo_line(mountpoint: str) -> list[str] | None:
    """The fields of the mount at `mountpoint` (the last one: mounts stack), or None."""
    target = _real(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    found = fields
    except FileNotFoundError:
        pass
    return found


def foreign_mount(mountpoint: str) -> str | None:
    """What is mounted at `mountpoint` if it is not a strata mount ("ext4 /dev/sda1"),
    else None: strata never unmounts or detaches another file system."""
    fields = mountinfo_line(mountpoint)
    if fields is None or "-" not in fields[6:]:
        return None
    kind = fields[fields.index("-", 6) + 1:]
    if kind and kind[0] == FSTYPE:
        return None
    return " ".join(_unescape(x) for x in kind[:2])


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def is_mounted(mountpoint: str) -> bool:
    return mountinfo_line(mountpoint) is not None


def _alive(pid: int) -> bool:
    """True if `pid` is a running mount server (not a zombie, not a reused pid): a forked
    server names itself SERVER_NAME; a server program has strata in its command line."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            comm, _, rest = f.read().partition("(")[2].rpartition(")")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = rest.split()[:1]
    if not state or state[0] in ("Z", "X"):
        return False
    return comm == SERVER_NAME or b"strata" in cmdline


def _fusermount(mountpoint: str, lazy: bool = False):
    import subprocess   # only unmounting needs it: status and commit do not pay for it
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
    saying what was cleaned, or None if there was nothing stale (or the mount is not
    strata's)."""
    if foreign_mount(mountpoint):
        return None
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
    unregister(mountpoint)
    who = f" (pid {info.pid}, version {info.version})" if info else ""
    return f"cleaned up a stale mount at {mountpoint} left by a process that died{who}"


# ---- acting on a live mount ----------------------------------------------------------
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


def unmount(mountpoint: str, timeout: float = 30.0) -> str:
    """Unmount cleanly; a stale mount is detached. Returns a message for the user."""
    mountpoint = os.path.abspath(mountpoint)
    other = foreign_mount(mountpoint)
    if other:
        raise MountError(f"{mountpoint} is not a strata mount (it is {other}); "
                         f"strata unmounts only its own")
    stale = clean_stale(mountpoint)
    if stale:
        return stale
    if not is_mounted(mountpoint):
        unregister(mountpoint)
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
    unregister(mountpoint)
    return f"unmounted {mountpoint}"
