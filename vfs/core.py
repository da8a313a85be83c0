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

from strata.vfs.errors import BadHandle, IsADirectory, NoAttribute, NoEntry, ReadOnly
from strata.vfs.reader import Stream
from strata.vfs.views import DIR, LINK, Node, View

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
            raise NoEntry(path)
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
        perm = (perm or 0o644) | 0o444
        if not self.writable:
            perm &= ~0o222
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
    def open(self, path: str, flags: int) -> int:
        n = self.node(path)
        if n.kind == DIR:
            raise IsADirectory(path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND) and not self.writable:
            raise ReadOnly(path)
        fh = next(self._next)
        with self._lock:
            self._handles[fh] = Handle(n, Stream())
        return fh

    def read(self, fh: int, offset: int, size: int) -> bytes:
        with self._lock:
            h = self._handles.get(fh)
        if h is None:
            raise BadHandle(str(fh))
        return self.view.read(h.node, offset, size, h.stream)

    def release(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    def read_path(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """Convenience for tests: open, read, release."""
        fh = self.open(path, os.O_RDONLY)
        try:
            n = self._handles[fh].node
            return self.read(fh, offset, n.size - offset if size is None else size)
        finally:
            self.release(fh)
