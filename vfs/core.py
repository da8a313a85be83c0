"""The filesystem core: POSIX-shaped operations over a view, in plain Python.

Tests drive this class directly, without FUSE; the adapter in strata.vfs.fuse only maps
calls and errors. Paths here are dataset paths ('' is the root, no leading '/').

Attributes come from manifests only (no data is fetched for getattr or readdir). Files
and folders belong to the user running the mount; a read-only mount shows no write bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import stat as stat_mod
import threading
from dataclasses import dataclass, field

from strata.vfs.errors import (BadHandle, IsADirectory, NoAttribute, NoEntry, NotPermitted,
                               ReadOnly)
from strata.vfs.reader import Stream
from strata.vfs.views import DIR, LINK, Node, View, missing

XATTR_VERSION = "user.strata.version"
BLOCK = 4096


@dataclass(frozen=True, slots=True)
class Attr:
    mode: int
    size: int
    mtime_ns: int
    nlink: int
    uid: int
    gid: int
    blocks: int


@dataclass
class Handle:
    node: Node
    stream: Stream
    path: str = ""
    fd: int | None = None       # an upper file (writable mounts)
    upper: str | None = None    # the upper file `fd` is open on
    writable: bool = False
    wrote: bool = False         # a write or truncate went through this handle
    local: int | None = None    # a read-only mount's cached copy of the file, if whole


@dataclass
class Gate:
    """Many operations at once, or one view switch alone; a waiting switch goes first.

    A writable mount's operations that change something (or use an upper file's
    descriptor) run inside `operation()`; `Filesystem.switch_view` runs inside `switch()`,
    so no operation straddles a switch: none writes into an overlay generation after it
    was frozen for a commit."""
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _active: int = 0
    _switching: bool = False

    @contextlib.contextmanager
    def operation(self):
        with self._cond:
            while self._switching:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def switch(self):
        with self._cond:
            while self._switching:
                self._cond.wait()
            self._switching = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._switching = False
                self._cond.notify_all()


class Filesystem:
    def __init__(self, view: View, *, writable: bool = False):
        self.view = view
        self.writable = writable
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()
        # lock order: _gate before the view's locks before _lock
        self._gate = Gate()

    def _op(self):
        return self._gate.operation() if self.writable else contextlib.nullcontext()

    def switch_view(self, view: View, frozen_upper: str | None = None) -> None:
        """Make `view` the one every operation uses, with no operation in flight. Files
        open on an upper file in folder `frozen_upper` (a generation frozen for a commit)
        are copied up into `view` and their handles reopened there: writes through them
        after the switch go to the next overlay, and the frozen bytes stay as they were."""
        with self._gate.switch():
            old, self.view = self.view, view
            if frozen_upper is None:
                return
            with self._lock:
                handles = list(self._handles.values())
            for h in sorted(handles, key=lambda h: not h.writable):   # writers first
                if h.fd is None or h.upper is None or \
                        os.path.dirname(h.upper) != frozen_upper:
                    continue
                path = old.path_of_upper(h.upper)
                if path is None:
                    continue   # unlinked while open: nothing to carry over
                if h.writable:
                    up, flags = view.copy_up(path), os.O_RDWR
                else:
                    n = view.lookup(path)
                    if n is None or not n.upper or n.upper == h.upper:
                        continue
                    up, flags = n.upper, os.O_RDONLY   # a writer copied it up: follow it
                fd = os.open(up, flags)
                os.close(h.fd)
                h.fd, h.upper, h.path = fd, up, path

    # ---- metadata ---------------------------------------------------------------------
    def node(self, path: str) -> Node:
        n = self.view.lookup(path)
        if n is None:
            raise missing(self.view, path)
        return n

    def attr_of(self, n: Node) -> Attr:
        perm = n.mode & 0o7777
        if n.kind == DIR:
            mode = stat_mod.S_IFDIR | ((perm or 0o755) & ~0o222 if not self.writable
                                       else (perm or 0o755))
            return Attr(mode, 0, n.mtime_ns, 2, self.uid, self.gid, 0)
        if n.kind == LINK:
            return Attr(stat_mod.S_IFLNK | 0o777, n.size, n.mtime_ns, 1, self.uid,
                        self.gid, 0)
        if not self.writable:
            perm = ((perm or 0o644) | 0o444) & ~0o222
        return Attr(stat_mod.S_IFREG | perm, n.size, n.mtime_ns, 1, self.uid, self.gid,
                    (n.size + 511) // 512)

    def getattr(self, path: str) -> Attr:
        return self.attr_of(self.node(path))

    def fgetattr(self, fh: int) -> Attr:
        """The attributes of an open file, also once it was unlinked or renamed over."""
        h = self._handle(fh)
        a = self.attr_of(h.node)
        if h.fd is not None:
            st = os.fstat(h.fd)
            a = dataclasses.replace(a, size=st.st_size, mtime_ns=st.st_mtime_ns,
                                    blocks=(st.st_size + 511) // 512)
        return a

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        return [(n.name, self.attr_of(n)) for n in self.view.listdir(path)]

    _TYPES = {DIR: stat_mod.S_IFDIR, LINK: stat_mod.S_IFLNK}

    def readdir_types(self, path: str) -> list[tuple[str, int]]:
        """(name, file type bits): all a FUSE directory listing passes to the kernel."""
        types = self._TYPES
        return [(n.name, types.get(n.kind, stat_mod.S_IFREG)) for n in self.view.listdir(path)]

    def readlink(self, path: str) -> str:
        n = self.node(path)
        if n.kind != LINK:
            raise NoEntry(f"{path} is not a symlink")
        return n.entry.target

    def getxattr(self, path: str, name: str) -> bytes:
        if name != XATTR_VERSION:
            # the kernel asks for security.capability before every write: answer it
            # without a lookup
            raise NoAttribute(name)
        return self.node(path).version.encode()

    def listxattr(self, path: str) -> list[str]:
        self.node(path)
        return [XATTR_VERSION]

    def statfs(self) -> dict:
        files, size = self.view.totals() if hasattr(self.view, "totals") else (0, 0)
        blocks = max(1, (size + BLOCK - 1) // BLOCK)
        free = avail = ffree = 0
        if self.writable and hasattr(self.view, "overlay"):
            # new bytes land in the overlay's upper folder: report the room left there
            # (a writable mount that says "0 bytes free" makes careful programs refuse)
            st = os.statvfs(self.view.overlay.upper_dir)
            free = st.f_bfree * st.f_frsize // BLOCK
            avail = st.f_bavail * st.f_frsize // BLOCK
            ffree = st.f_favail
            blocks += free
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": blocks, "f_bfree": free,
                "f_bavail": avail, "f_files": files + ffree, "f_ffree": ffree,
                "f_favail": ffree, "f_namemax": 255}

    # ---- data -------------------------------------------------------------------------
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND

    def _handle(self, fh: int) -> Handle:
        with self._lock:
            h = self._handles.get(fh)
        if h is None:
            raise BadHandle(str(fh))
        return h

    def _new_handle(self, h: Handle) -> int:
        fh = next(self._next)
        with self._lock:
            self._handles[fh] = h
        return fh

    def open(self, path: str, flags: int) -> int:
        with self._op():
            n = self.node(path)
            if n.kind == DIR:
                raise IsADirectory(path)
            if flags & self.WRITE_FLAGS:
                if not self.writable:
                    raise ReadOnly(path)
                if flags & os.O_TRUNC:
                    up = self.view.truncate(path, 0)
                else:
                    up = self.view.copy_up(path)
                self._follow_copy_up(path, up)
                return self._new_handle(Handle(self.node(path), Stream(), path,
                                               os.open(up, os.O_RDWR), up, writable=True))
            if n.upper:
                return self._new_handle(Handle(n, Stream(), path,
                                               os.open(n.upper, os.O_RDONLY), n.upper))
            return self._new_handle(Handle(n, Stream(), path))

    def _follow_copy_up(self, path: str, upper: str) -> None:
        """Read-your-writes across handles: handles reading the lower file at `path`
        read its upper copy from now on. (Not a lookup by path at read time: a file
        renamed over `path` is another file, and a reader keeps the one it opened.)"""
        with self._lock:
            readers = [h for h in self._handles.values() if h.fd is None and h.path == path]
        for h in readers:
            h.fd, h.upper = os.open(upper, os.O_RDONLY), upper

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh)
        if self.writable:
            with self._gate.operation():
                if h.fd is not None:
                    return os.pread(h.fd, size, offset)
        return self.view.read(h.node, offset, size, h.stream)

    def read_view(self, fh: int, offset: int, buf: memoryview) -> memoryview:
        """`read` of up to len(buf) bytes for a FUSE reply: a view of `buf` filled, or of
        memory that already holds the bytes (a chunk just fetched), written out from there
        without a copy."""
        h = self._handle(fh)
        if self.writable:
            with self._gate.operation():
                if h.fd is not None:
                    return buf[:os.preadv(h.fd, [buf], offset)]
        return self.view.read_view(h.node, offset, buf, h.stream)

    def upper_of(self, fh: int) -> str | None:
        """The upper file a handle reads and writes (writable mounts), or None."""
        with self._lock:
            h = self._handles.get(fh)
        return h.upper if h is not None else None

    def passthrough_fd(self, fh: int) -> int | None:
        """The descriptor of the local file holding all the bytes of a read-only handle
        (an upper file of a writable mount; in a read-only mount, the file's copy in the
        cache when it has a whole one), which the kernel may read directly; None when
        reads must come through `read_view`."""
        h = self._handle(fh)
        if self.writable:
            return h.fd if h.fd is not None and not h.writable else None
        if h.local is None:
            path = self.view.local_file(h.node)
            try:
                h.local = os.open(path, os.O_RDONLY | os.O_CLOEXEC) if path else None
            except FileNotFoundError:   # evicted meanwhile
                return None
        return h.local

    def release(self, fh: int) -> None:
        with self._op():
            with self._lock:
                h = self._handles.pop(fh, None)
            if h is not None:
                h.stream.close()
                if h.fd is not None:
                    os.close(h.fd)
                if h.local is not None:
                    os.close(h.local)
                if h.wrote and not self._writers_of(h.upper):
                    self.view.settled(h.upper)

    def _writers_of(self, upper: str) -> bool:
        with self._lock:
            return any(o.writable and o.upper == upper for o in self._handles.values())

    def read_path(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """Convenience for tests: open, read, release."""
        fh = self.open(path, os.O_RDONLY)
        try:
            n = self.node(path)
            return self.read(fh, offset, n.size - offset if size is None else size)
        finally:
            self.release(fh)

    # ---- changes (writable mounts: the view is an OverlayView) ------------------------
    def _overlay(self, path: str):
        if not self.writable:
            raise ReadOnly(path)
        return self.view

    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        with self._op():
            up = self._overlay(path).create(path, mode, exclusive=bool(flags & os.O_EXCL))
            return self._new_handle(Handle(self.node(path), Stream(), path,
                                           os.open(up, os.O_RDWR), up, writable=True))

    def write(self, fh: int, offset: int, data: bytes) -> int:
        with self._op():
            h = self._handle(fh)
            if h.fd is None:
                raise BadHandle(f"{h.path} is not open for writing")
            h.wrote = True
            self.view.note_write(h.upper, offset, len(data))   # before the bytes change
            try:
                return os.pwrite(h.fd, data, offset)
            finally:
                self.view.change_done(h.upper)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self._op():
            h = self._handle(fh) if fh is not None else None
            if h is not None and h.fd is not None:
                h.wrote = True
                self.view.note_truncate(h.upper)
                try:
                    os.ftruncate(h.fd, length)
                finally:
                    self.view.change_done(h.upper)
            else:
                self._follow_copy_up(path, self._overlay(path).truncate(path, length))

    def fsync(self, fh: int) -> None:
        with self._op():
            h = self._handle(fh)
            if h.fd is not None:
                os.fsync(h.fd)

    def unlink(self, path: str) -> None:
        with self._op():
            self._overlay(path).unlink(path)

    def mkdir(self, path: str, mode: int) -> None:
        with self._op():
            self._overlay(path).mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        with self._op():
            self._overlay(path).rmdir(path)

    def rename(self, old: str, new: str, *, noreplace: bool = False) -> None:
        with self._op():
            self._overlay(old).rename(old, new, noreplace=noreplace)

    def symlink(self, path: str, target: str) -> None:
        with self._op():
            self._overlay(path).symlink(path, target)

    def chmod(self, path: str, mode: int) -> None:
        with self._op():
            self._overlay(path).chmod(path, mode)

    def utimens(self, path: str, mtime_ns: int) -> None:
        with self._op():
            self._overlay(path).utimens(path, mtime_ns)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.node(path)
        if uid not in (-1, self.uid) or gid not in (-1, self.gid):
            raise NotPermitted(f"{path}: files in a strata mount belong to the mounting user")

    def link(self, path: str, target: str) -> None:
        raise NotPermitted("hard links are not supported in strata mounts")
