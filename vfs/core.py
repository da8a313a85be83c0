"""The filesystem core: POSIX-shaped operations over a view, in plain Python.

Tests drive this class directly, without FUSE; the adapter in strata.vfs.fuse only maps
calls and errors. Paths here are dataset paths ('' is the root, no leading '/').

Attributes come from manifests only (no data is fetched for getattr or readdir). Files
and folders belong to the user running the mount; a read-only mount shows no write bits.
"""

from __future__ import annotations

import itertools
import os
import stat as stat_mod
import threading
from dataclasses import dataclass

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


class Filesystem:
    def __init__(self, view: View, *, writable: bool = False):
        self.view = view
        self.writable = writable
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._lock = threading.Lock()

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

    def readdir(self, path: str) -> list[tuple[str, Attr]]:
        return [(n.name, self.attr_of(n)) for n in self.view.listdir(path)]

    def readlink(self, path: str) -> str:
        n = self.node(path)
        if n.kind != LINK:
            raise NoEntry(f"{path} is not a symlink")
        return n.entry.target

    def getxattr(self, path: str, name: str) -> bytes:
        n = self.node(path)
        if name == XATTR_VERSION:
            return n.version.encode()
        raise NoAttribute(name)

    def listxattr(self, path: str) -> list[str]:
        self.node(path)
        return [XATTR_VERSION]

    def statfs(self) -> dict:
        files, size = self.view.totals() if hasattr(self.view, "totals") else (0, 0)
        blocks = max(1, (size + BLOCK - 1) // BLOCK)
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": files, "f_ffree": 0, "f_namemax": 255}

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
            return self._new_handle(Handle(self.node(path), Stream(), path,
                                           os.open(up, os.O_RDWR)))
        if n.upper:
            return self._new_handle(Handle(n, Stream(), path, os.open(n.upper, os.O_RDONLY)))
        return self._new_handle(Handle(n, Stream(), path))

    def read(self, fh: int, offset: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.fd is None and self.writable:
            # another handle may have copied the file up since this one opened it:
            # read-your-writes across handles
            n = self.view.lookup(h.path)
            if n is not None and n.upper:
                h.fd = os.open(n.upper, os.O_RDONLY)
        if h.fd is not None:
            return os.pread(h.fd, size, offset)
        return self.view.read(h.node, offset, size, h.stream)

    def release(self, fh: int) -> None:
        with self._lock:
            h = self._handles.pop(fh, None)
        if h is not None and h.fd is not None:
            os.close(h.fd)

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
        up = self._overlay(path).create(path, mode, exclusive=bool(flags & os.O_EXCL))
        return self._new_handle(Handle(self.node(path), Stream(), path, os.open(up, os.O_RDWR)))

    def write(self, fh: int, offset: int, data: bytes) -> int:
        h = self._handle(fh)
        if h.fd is None:
            raise BadHandle(f"{h.path} is not open for writing")
        return os.pwrite(h.fd, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        h = self._handle(fh) if fh is not None else None
        if h is not None and h.fd is not None:
            os.ftruncate(h.fd, length)
        else:
            self._overlay(path).truncate(path, length)

    def fsync(self, fh: int) -> None:
        h = self._handle(fh)
        if h.fd is not None:
            os.fsync(h.fd)

    def unlink(self, path: str) -> None:
        self._overlay(path).unlink(path)

    def mkdir(self, path: str, mode: int) -> None:
        self._overlay(path).mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self._overlay(path).rmdir(path)

    def rename(self, old: str, new: str) -> None:
        self._overlay(old).rename(old, new)

    def symlink(self, path: str, target: str) -> None:
        self._overlay(path).symlink(path, target)

    def chmod(self, path: str, mode: int) -> None:
        self._overlay(path).chmod(path, mode)

    def utimens(self, path: str, mtime_ns: int) -> None:
        self._overlay(path).utimens(path, mtime_ns)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.node(path)
        if uid not in (-1, self.uid) or gid not in (-1, self.gid):
            raise NotPermitted(f"{path}: files in a strata mount belong to the mounting user")

    def link(self, path: str, target: str) -> None:
        raise NotPermitted("hard links are not supported in strata mounts")
