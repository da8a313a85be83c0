"""The FUSE kernel protocol, spoken over /dev/fuse with no libfuse in between.

strata's FUSE binding (docs/performance.md, "The FUSE binding"). Only strata.vfs.fuse
imports this module. What it does that libfuse 3.14 (Debian bookworm) could not:
- open replies carry every FOPEN_* flag: libfuse's high-level API drops keep_cache and
  cache_readdir on opendir, so the kernel re-read every folder on every `find`;
- passthrough (kernel >= 6.9, FUSE_PASSTHROUGH): an open file whose bytes are a local
  file is read by the kernel from that file, the server sees no READ (libfuse >= 3.17);
- replies are written with one writev from the bytes' own buffer (no ctypes copies).

Layout of the messages: include/uapi/linux/fuse.h, protocol 7.40. Every request starts
with a `fuse_in_header`; every reply with a `fuse_out_header` whose `error` is 0 or a
negative errno; notifications are replies with `unique` 0 and the notify code as error.

Threading: `Channel.serve` runs THREADS workers, each blocking in read(2) on the device
(the kernel hands each request to one reader) with a buffer of its own; a handler runs
in the worker that read its request and replies from there. Replies and notifications
are single writev calls, which the kernel takes whole, so no lock is needed around them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("strata.vfs")

MAJOR, MINOR = 7, 40
ROOT_ID = 1

# opcodes (enum fuse_opcode)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = range(8, 18)
RELEASE, FSYNC = 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS = range(27, 35)
CREATE, INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = range(35, 43)
FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = range(43, 48)
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (flags | flags2 << 32)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# open reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7

# notify codes
NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY = 2, 3

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid extlen -
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
INIT_IN = struct.Struct("<IIIII")            # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_pages map_alignment flags2 stack
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr
ENTRY_OUT = struct.Struct("<QQQQII" + ATTR.format[1:])
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
OPEN_OUT = struct.Struct("<QIi")             # fh open_flags backing_id
DIRENT = struct.Struct("<QQII")              # ino off namelen type
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs
U32_PAIR = struct.Struct("<II")
INVAL_ENTRY = struct.Struct("<QII")          # parent namelen flags
INVAL_INODE = struct.Struct("<Qqq")          # ino off len
BACKING_MAP = struct.Struct("<iIQ")          # fd flags padding

# ioctls on the device: _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
_IOC_WRITE = 1
DEV_IOC_BACKING_OPEN = (_IOC_WRITE << 30) | (BACKING_MAP.size << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2

MAX_WRITE = 1 << 20
BUFFER = MAX_WRITE + 4096    # a request: headers plus at most MAX_WRITE bytes of data
THREADS = 16
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


class ProtocolError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: memoryview     # valid until the handler returns (the worker's buffer)


def pad8(n: int) -> int:
    return (n + 7) & ~7


def cstrings(body: memoryview, count: int) -> list[bytes]:
    """The first `count` NUL-terminated strings of `body`."""
    raw = bytes(body)
    out, start = [], 0
    for _ in range(count):
        end = raw.index(b"\0", start)
        out.append(raw[start:end])
        start = end + 1
    return out


# ---- mounting --------------------------------------------------------------------------
_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(mountpoint: str, *, fsname: str, subtype: str, readonly: bool,
          helper: bool | None = None) -> int:
    """Mount a FUSE file system at `mountpoint`; returns the open /dev/fuse descriptor.
    As root this is mount(2); otherwise (or with helper=True) the setuid fusermount3
    mounts and passes the descriptor back over a socket (what libfuse does)."""
    options = ["default_permissions"]
    if helper is None:
        helper = os.geteuid() != 0
    if not helper:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}",
                         f"group_id={os.getgid()}"] + options)
        flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
        if libc().mount(fsname.encode(), mountpoint.encode(), f"fuse.{subtype}".encode(),
                        ctypes.c_ulong(flags), data.encode()) != 0:
            e = ctypes.get_errno()
            os.close(fd)
            raise OSError(e, f"mount of {mountpoint} failed: {os.strerror(e)}")
        return fd
    return _fusermount(mountpoint, options + [f"fsname={fsname}", f"subtype={subtype}",
                                              "nosuid", "nodev", "ro" if readonly else "rw"])


def _fusermount(mountpoint: str, options: list[str]) -> int:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise OSError(errno.ENOENT, "fusermount3 not found (install the fuse3 package)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        p = subprocess.run([tool, "-o", ",".join(options), "--", mountpoint], env=env,
                           pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True)
        theirs.close()
        if p.returncode != 0:
            raise OSError(errno.EIO, (p.stderr.strip() or f"{tool} failed").splitlines()[-1])
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(errno.EIO, f"{tool} passed no /dev/fuse descriptor")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: open files keep working until closed)."""
    if os.geteuid() == 0:
        if libc().umount2(mountpoint.encode(), MNT_DETACH) == 0:
            return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        subprocess.run([tool, "-u", "-q", "-z", "--", mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True)


# ---- the channel -----------------------------------------------------------------------
@dataclass
class Config:
    passthrough: bool = False       # ask the kernel for FUSE_PASSTHROUGH if it offers it
    cache_symlinks: bool = False


class Channel:
    """One mounted /dev/fuse connection: requests in, replies and notifications out."""

    def __init__(self, fd: int, config: Config):
        self.fd = fd
        self.config = config
        self.passthrough = False    # granted by the kernel at INIT
        self._closed = threading.Event()

    # -- replies
    def reply(self, unique: int, *parts) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        self._write([OUT_HEADER.pack(size, 0, unique), *parts])

    def error(self, unique: int, code: int) -> None:
        self._write([OUT_HEADER.pack(OUT_HEADER.size, -code, unique)])

    def notify(self, code: int, *parts) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        self._write([OUT_HEADER.pack(size, code, 0), *parts], notification=True)

    def _write(self, parts: list, notification: bool = False) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            # ENOENT: the request was interrupted and is gone (or, for a notification,
            # the kernel does not know the inode); ENODEV: unmounted meanwhile
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                if notification:
                    log.debug("notification not delivered: %s", e)
                else:
                    raise

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.notify(NOTIFY_INVAL_ENTRY, INVAL_ENTRY.pack(parent, len(name), 0), name, b"\0")

    def invalidate_inode(self, nodeid: int, offset: int = 0, size: int = 0) -> None:
        """Drop the inode's cached attributes and pages (all of them when size is 0)."""
        self.notify(NOTIFY_INVAL_INODE, INVAL_INODE.pack(nodeid, offset, size))

    # -- passthrough backing files
    def backing_open(self, fd: int) -> int | None:
        """Register `fd` as a backing file; its id for an open reply, None if refused."""
        arg = bytearray(BACKING_MAP.pack(fd, 0, 0))
        try:
            return fcntl.ioctl(self.fd, DEV_IOC_BACKING_OPEN, arg, True)   # the id
        except OSError as e:
            log.debug("passthrough refused for fd %d: %s", fd, e)
            return None

    def backing_close(self, backing_id: int) -> None:
        try:
            fcntl.ioctl(self.fd, DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))
        except OSError as e:
            log.debug("closing backing id %d: %s", backing_id, e)

    # -- the request loop
    def init(self, on_ready: Callable[[], None] | None = None) -> None:
        """Read and answer the kernel's INIT (the first request of every connection)."""
        buf = bytearray(BUFFER)
        while True:
            req = self._read(buf)
            if req is None:
                raise ProtocolError("the mount went away before INIT")
            if req.opcode == INIT:
                break
            self.error(req.unique, errno.EIO)
        major, minor, max_readahead, flags, flags2 = INIT_IN.unpack_from(req.body)
        if major != MAJOR:
            raise ProtocolError(f"kernel FUSE protocol {major}.{minor} is not supported")
        offered = flags | (flags2 << 32 if flags & INIT_EXT else 0)
        want = (ASYNC_READ | ATOMIC_O_TRUNC | BIG_WRITES | AUTO_INVAL_DATA | DO_READDIRPLUS
                | READDIRPLUS_AUTO | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | INIT_EXT)
        if self.config.cache_symlinks:
            want |= CACHE_SYMLINKS
        if self.config.passthrough:
            want |= PASSTHROUGH
        granted = want & offered
        self.passthrough = bool(granted & PASSTHROUGH)
        self.reply(req.unique, INIT_OUT.pack(
            MAJOR, min(minor, MINOR), max_readahead, granted & 0xFFFFFFFF,
            0, 0,                         # max_background, congestion: kernel defaults
            MAX_WRITE, 1,                 # max_write, time granularity (ns)
            MAX_WRITE // 4096, 0,         # max_pages, map_alignment
            granted >> 32,
            1 if self.passthrough else 0))   # max_stack_depth: backing files are local
        if on_ready is not None:
            on_ready()

    def _read(self, buf: bytearray) -> Request | None:
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue   # ENOENT: a request interrupted before it was read
                if e.errno in (errno.ENODEV, errno.EBADF):
                    return None   # unmounted
                raise
            if n < IN_HEADER.size:
                raise ProtocolError(f"short request ({n} bytes)")
            size, opcode, unique, nodeid, uid, gid, pid, _, _ = IN_HEADER.unpack_from(buf)
            return Request(opcode, unique, nodeid, uid, gid, pid,
                           memoryview(buf)[IN_HEADER.size:size])

    def serve(self, handle: Callable[[Request, bytearray], None],
              threads: int = THREADS) -> None:
        """Serve requests until the file system is unmounted. `handle(request, scratch)`
        answers one request; `scratch` is a buffer of the worker's own for read replies."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        wake_lock, wake_open = threading.Lock(), [True]

        def worker() -> None:
            buf = bytearray(BUFFER)
            scratch = bytearray(MAX_WRITE)
            while True:
                req = self._read(buf)
                if req is None:
                    break
                handle(req, scratch)
            self._closed.set()
            with wake_lock:   # not once the descriptor is closed (its number reused)
                if wake_open[0]:
                    try:
                        os.write(wake_w, b"\0")
                    except BlockingIOError:   # full: the main thread is woken anyway
                        pass

        # A signal may be delivered to any thread; Python runs its handler in the main
        # thread, and only once that thread returns from what blocks it. The C-level
        # handler writes to the wakeup descriptor whichever thread it runs in, so the
        # main thread waits on that (with the workers' end): a SIGTERM that landed in a
        # worker left the main thread asleep in Event.wait until its timeout (an hour).
        try:
            previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:   # not the main thread: no Python signal handlers here
            previous = None
        pool = [threading.Thread(target=worker, name=f"strata-fuse-{i}", daemon=True)
                for i in range(threads)]
        for t in pool:
            t.start()
        try:
            while not self._closed.is_set():
                select.select([wake_r], [], [])
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
        finally:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            # the others are blocked in read(2) on a dead connection: they end with it
            for t in pool:
                t.join(timeout=1.0)
            with wake_lock:
                wake_open[0] = False
                os.close(wake_r)
                os.close(wake_w)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
