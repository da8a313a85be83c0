"""Views: the read-only interface the filesystem core is built on (lookup, listdir, read).

`VersionView` is the merged tree of one version and its DAG, resolved lazily, path by
path: a lookup asks the version's own manifest, then its parents in reverse order (a
later parent overrides an earlier one), recursively; a parent's record and manifest are
fetched only when a lookup reaches it. Results are memoised (cachetools LRU). Along a
chain of single parents the walk is a loop, not recursion, so deep histories cost one
indexed query per version and no copies of listings.

An overlay view (writable mounts) wraps any view with the same interface.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from cachetools import LRUCache

from strata.catalog import paths
from strata.catalog.errors import BrokenHistory
from strata.catalog.manifest import DirEntry, Entry, Manifest
from strata.catalog.merge import parent_record
from strata.vfs.errors import NoEntry, NotADirectory

DIR, FILE, LINK, EXTERNAL = "d", "f", "l", "x"


@dataclass(frozen=True, slots=True)
class Node:
    """One name in a view. `version` is the id of the version whose change-set supplied it."""
    path: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    version: str
    entry: Entry | None = None
    upper: str | None = None    # overlay: the local file holding this file's bytes

    @property
    def name(self) -> str:
        return paths.name_of(self.path)

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR


def node_of_entry(e: Entry) -> Node:
    return Node(e.path, e.kind, e.size, e.mode, e.mtime_ns, e.version, e)


def node_of_dir(d: DirEntry) -> Node:
    return Node(d.path, DIR, 0, d.mode, d.mtime_ns, d.version)


def missing(view, path: str) -> Exception:
    """The error for a path that does not resolve: ENOTDIR when one of its folders is
    not a folder (what the kernel reports walking the path), else ENOENT."""
    parts = path.split("/")
    for i in range(1, len(parts)):
        n = view.lookup("/".join(parts[:i]))
        if n is None:
            break
        if not n.is_dir:
            return NotADirectory(path)
    return NoEntry(path)


class View(Protocol):
    def lookup(self, path: str) -> Node | None: ...

    def listdir(self, path: str) -> list[Node]: ...

    def read(self, node: Node, offset: int, size: int, hint=None) -> bytes: ...

    def copy_to(self, node: Node, fd: int) -> None:
        """Write the file's whole bytes into descriptor `fd` (an overlay's copy-up)."""
        ...

    def read_view(self, node: Node, offset: int, buf: memoryview, hint=None) -> memoryview:
        """`read` of up to len(buf) bytes: a view of `buf` filled, or of memory that
        already holds them."""
        ...


def moved(n: Node, path: str) -> Node:
    """Node `n` shown at another path (a view inside another view)."""
    return Node(path, n.kind, n.size, n.mode, n.mtime_ns, n.version, n.entry, n.upper)


def folder_node(view, path: str) -> Node:
    """The node of folder `path` of `view`; ENOENT if it is missing, ENOTDIR if it is
    not a folder."""
    node = view.lookup(path)
    if node is None:
        raise NoEntry(path)
    if not node.is_dir:
        raise NotADirectory(path)
    return node


class EntryReads:
    """Reads of version files: their manifest entries through `self.reader` (a Reader)."""

    def read(self, node: Node, offset: int, size: int, hint=None) -> bytes:
        return self.reader.read(node.entry, offset, size, hint)

    def read_view(self, node: Node, offset: int, buf: memoryview, hint=None) -> memoryview:
        return self.reader.read_view(node.entry, offset, buf, hint)

    def copy_to(self, node: Node, fd: int) -> None:
        self.reader.copy_to(node.entry, fd)

    def local_file(self, node: Node) -> str | None:
        return self.reader.local_file(node.entry)


class VersionView(EntryReads):
    """The merged, lazily resolved tree of a final version."""

    def __init__(self, repo, version_id: str, reader, *, memo_entries: int = 200_000,
                 memo_dirs: int = 256, record=None):
        self.repo = repo
        self.version_id = version_id
        self.reader = reader
        self._lock = threading.Lock()
        self._parents: dict[str, tuple[str, ...]] = {}
        self._lookups: LRUCache = LRUCache(maxsize=memo_entries)
        self._listings: LRUCache = LRUCache(maxsize=memo_dirs)
        root_record = record if record is not None else repo.record(version_id)
        self._parents[version_id] = root_record.parents
        self._child_of = {p: version_id for p in root_record.parents}   # parent -> a child
        self._shas = {version_id: root_record.manifest_sha256}
        self.record = root_record

    # ---- the DAG, fetched lazily -------------------------------------------------------
    def _parents_of(self, vid: str) -> tuple[str, ...]:
        with self._lock:
            ps = self._parents.get(vid)
        if ps is None:
            with self._lock:
                child = self._child_of.get(vid)
            rec = parent_record(self.repo, vid, child)
            with self._lock:
                self._parents[vid] = rec.parents
                self._shas[vid] = rec.manifest_sha256
                for p in rec.parents:
                    self._child_of.setdefault(p, vid)
            ps = rec.parents
        return ps

    def _step(self, walked: set[str], vid: str) -> None:
        """A walk down the history reaches `vid`; `walked` holds the versions it passed
        (only a repository whose records were altered can lead back to one)."""
        if vid in walked:
            raise BrokenHistory(self.version_id, vid)
        walked.add(vid)

    def _manifest(self, vid: str) -> Manifest:
        self._parents_of(vid)
        return self.repo.manifest(vid, self._shas[vid])

    # ---- lookup ------------------------------------------------------------------------
    def lookup(self, path: str) -> Node | None:
        if path == "":
            return Node("", DIR, 0, 0o755, int(self.record.created * 1e9), self.version_id)
        key = (self.version_id, path)
        with self._lock:
            if key in self._lookups:
                return self._lookups[key]
        node = self._lookup_in(self.version_id, path)
        with self._lock:
            self._lookups[key] = node
        return node

    def _lookup_in(self, vid: str, path: str, below: frozenset[str] = frozenset()) -> Node | None:
        walked = set(below)   # the versions whose history this is: met again, a loop
        while True:
            self._step(walked, vid)
            m = self._manifest(vid)
            e = m.lookup(path)
            if e is not None:
                return node_of_entry(e)
            d = m.lookup_dir(path)
            if d is not None:
                if d.explicit or m.is_removed(path):
                    return node_of_dir(d)
                # a folder implied by the version's files: its mode and time are those of
                # the folder in the parents, if there is one (as `get` merges them)
                older = self._in_parents(vid, path, walked)
                return older if older is not None and older.kind == DIR else node_of_dir(d)
            if m.is_removed(path):
                return None
            ps = self._parents_of(vid)
            if not ps:
                return None
            if len(ps) == 1:
                vid = ps[0]
                continue
            return self._in_parents(vid, path, walked)

    def _in_parents(self, vid: str, path: str, walked: set[str]) -> Node | None:
        """`path` as the parents of `vid` show it (the last parent first), each parent's
        answer memoised."""
        for p in reversed(self._parents_of(vid)):
            key = (p, path)
            with self._lock:
                hit = key in self._lookups
                node = self._lookups.get(key)
            if not hit:
                node = self._lookup_in(p, path, frozenset(walked))
                with self._lock:
                    self._lookups[key] = node
            if node is not None:
                return node
        return None

    # ---- listdir -----------------------------------------------------------------------
    def listdir(self, path: str) -> list[Node]:
        folder_node(self, path)
        children = self._children(self.version_id, path)
        return sorted(children.values(), key=lambda n: n.name)

    def _children(self, vid: str, path: str,
                  below: frozenset[str] = frozenset()) -> dict[str, Node]:
        key = (vid, path)
        with self._lock:
            cached = self._listings.get(key)
        if cached is not None:
            return cached
        top = vid == self.version_id
        out: dict[str, Node] = {}
        hidden: set[str] = set()
        implied: set[str] = set()   # folders only implied by files so far: an older
        walked = set(below)         # folder of that name gives their mode and time
        while True:
            self._step(walked, vid)
            m = self._manifest(vid)
            files, dirs = m.children(path)
            for e in files:
                name = paths.name_of(e.path)
                if name not in out and name not in hidden:
                    out[name] = node_of_entry(e)
            for d in dirs:
                name = paths.name_of(d.path)
                if (name not in out or name in implied) and name not in hidden:
                    out[name] = node_of_dir(d)
                    if d.explicit:
                        implied.discard(name)
                    else:
                        implied.add(name)
            if path and m.is_removed(path):
                break
            hidden |= m.removed_names_under(path)
            ps = self._parents_of(vid)
            if not ps:
                break
            if len(ps) == 1:
                vid = ps[0]
                continue
            for p in reversed(ps):
                for name, n in self._children(p, path, frozenset(walked)).items():
                    if name in hidden:
                        continue
                    if name not in out or (name in implied and n.kind == DIR):
                        out[name] = n
                        implied.discard(name)
            break
        with self._lock:
            self._listings[key] = out
            if top and len(out) <= self._lookups.maxsize // 4:
                # the listing answers the lookups of its children too (ls -l, find)
                for n in out.values():
                    self._lookups[(self.version_id, n.path)] = n
        return out

    def totals(self) -> tuple[int, int]:
        """(files, bytes) of the whole version, from its record (no manifest walk)."""
        return self.record.files, self.record.size
