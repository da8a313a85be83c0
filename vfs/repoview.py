"""The repository view: every completed version of a repository in one tree, each
resolved on first access (`strata mount --all`).

    by-id/<version id>/...                   the merged tree of that version
    by-name/<project>/<name>/<label>         -> ../../../by-id/<version id>  (symlink)
    by-name/<project>/<name>/latest          -> <highest label>              (symlink)

Projects and names appear as they are spelled in the repository's names/ keys (a `/` in
a project is escaped there). A version's tree is a `VersionView`, built when a path
first reaches it, so the time to a version's first byte is a record read, a manifest
fetch and one chunk, with no mount command in between.

Versions never change; the catalog around them does. The folders that list the catalog
(the root, by-id, by-name and below, and the symlinks) are *volatile*: re-listed from
storage at most every REFRESH seconds, and their mtime moves when their listing changes,
which is how the kernel learns to drop a listing it cached (the adapter also gives
volatile names short entry and attribute timeouts). Drafts are not shown; a version
appears once it is final.
"""

from __future__ import annotations

import logging
import threading
import time

from cachetools import LRUCache

from strata.catalog import layout
from strata.catalog.errors import DamagedRecord
from strata.catalog.manifest import Entry
from strata.catalog.records import VersionRecord, highest
from strata.vfs.views import DIR, LINK, EntryReads, Node, VersionView, folder_node, moved

log = logging.getLogger("strata.vfs")

ALL_VERSIONS = "all"   # the version argument of a repository mount (not a version id)
BY_ID, BY_NAME, LATEST = "by-id", "by-name", "latest"
REFRESH = 2.0          # seconds a catalog listing is reused


class _Listing:
    """A listing of the catalog, re-read at most every REFRESH seconds; `stamp` is the
    time (ns) its content last changed, the mtime of the folder that shows it."""
    __slots__ = ("read_at", "value", "stamp")

    def __init__(self, value, stamp: int):
        self.read_at = time.monotonic()
        self.value = value
        self.stamp = stamp


class RepositoryView(EntryReads):
    """The read-only tree of every completed version of `repo` (see the module doc)."""

    def __init__(self, repo, reader, *, views: int = 32, memo_entries: int = 50_000,
                 refresh: float = REFRESH):
        self.repo = repo
        self.reader = reader
        self.refresh = refresh
        self.memo_entries = memo_entries
        self.started_ns = time.time_ns()
        self._lock = threading.Lock()
        self._views: LRUCache = LRUCache(maxsize=views)
        self._completed: dict[str, VersionRecord] = {}   # a final version stays final
        self._listings: dict[tuple, _Listing] = {}

    # ---- the catalog ---------------------------------------------------------------
    def _record(self, vid: str) -> VersionRecord | None:
        """The record of a completed version, else None (unknown, or a draft)."""
        with self._lock:
            rec = self._completed.get(vid)
        if rec is not None:
            return rec
        if not layout.is_version_id(vid):
            return None
        try:
            rec = self.repo.try_record(vid)
        except DamagedRecord as e:   # one damaged record must not hide every version
            log.warning("%s", e)
            return None
        if rec is None or not rec.completed:
            return None
        with self._lock:
            self._completed[vid] = rec
        return rec

    def _listing(self, key: tuple, read) -> _Listing:
        with self._lock:
            cur = self._listings.get(key)
        if cur is not None and time.monotonic() - cur.read_at < self.refresh:
            return cur
        value = read()
        with self._lock:
            cur = self._listings.get(key)
            if cur is not None and cur.value == value:
                cur.read_at = time.monotonic()
                return cur
            new = _Listing(value, time.time_ns() if cur is not None else self.started_ns)
            self._listings[key] = new
            return new

    def _ids(self) -> _Listing:
        return self._listing((BY_ID,), lambda: tuple(
            v for v in self.repo.all_version_ids() if self._record(v) is not None))

    def _datasets(self) -> tuple:
        """(project, name) of every label, escaped: one listing of names/ serves the
        folders of every project."""
        return self._listing(("names/",), lambda: tuple(sorted(
            {(layout.escape(p), layout.escape(n)) for p, n, _ in self.repo.datasets()}))
        ).value

    def _projects(self) -> _Listing:
        return self._listing((BY_NAME,), lambda: tuple(sorted(
            {p for p, _ in self._datasets()})))

    def _names(self, project: str) -> _Listing:
        return self._listing((BY_NAME, project), lambda: tuple(
            n for p, n in self._datasets() if p == project))

    def _labels(self, project: str, name: str) -> _Listing:
        """label -> (version id, created ns) of the completed versions of one dataset."""
        def read():
            out = {}
            for label, vid in self.repo.labels(layout.unescape(project),
                                               layout.unescape(name)).items():
                rec = self._record(vid)
                if rec is not None:
                    out[label] = (vid, int(rec.created * 1e9))
            return out
        return self._listing((BY_NAME, project, name), read)

    def _view(self, vid: str) -> VersionView | None:
        with self._lock:
            view = self._views.get(vid)
        if view is not None:
            return view
        rec = self._record(vid)
        if rec is None:
            return None
        view = VersionView(self.repo, vid, self.reader, memo_entries=self.memo_entries,
                           record=rec)
        with self._lock:
            return self._views.setdefault(vid, view)

    # ---- lookup ----------------------------------------------------------------------
    def _dir(self, path: str, mtime_ns: int, version: str = "") -> Node:
        return Node(path, DIR, 0, 0o555, mtime_ns, version)

    @staticmethod
    def _link(path: str, target: str, mtime_ns: int, version: str) -> Node:
        entry = Entry(path, LINK, len(target), None, 0o777, mtime_ns, target=target,
                      version=version)
        return Node(path, LINK, len(target), 0o777, mtime_ns, version, entry)

    def lookup(self, path: str) -> Node | None:
        if path == "":
            return self._dir("", self.started_ns)
        parts = path.split("/")
        top = parts[0]
        if top == BY_ID:
            if len(parts) == 1:
                return self._dir(path, self._ids().stamp)
            rec = self._record(parts[1])
            if rec is None:
                return None
            if len(parts) == 2:
                return self._dir(path, int(rec.created * 1e9), parts[1])
            view = self._view(parts[1])
            if view is None:
                return None
            n = view.lookup("/".join(parts[2:]))
            return None if n is None else moved(n, path)
        if top != BY_NAME or len(parts) > 4:
            return None
        if len(parts) == 1:
            return self._dir(path, self._projects().stamp)
        if parts[1] not in self._projects().value:
            return None
        if len(parts) == 2:
            return self._dir(path, self._names(parts[1]).stamp)
        if parts[2] not in self._names(parts[1]).value:
            return None
        labels = self._labels(parts[1], parts[2])
        if len(parts) == 3:
            return self._dir(path, labels.stamp)
        return self._label_node(path, parts[3], labels.value)

    def _label_node(self, path: str, label: str, labels: dict) -> Node | None:
        if label == LATEST and LATEST not in labels:
            best = highest(labels)
            if best is None:
                return None
            vid, created = labels[best]
            return self._link(path, best, created, vid)
        hit = labels.get(label)
        if hit is None:
            return None
        vid, created = hit
        return self._link(path, f"../../../{BY_ID}/{vid}", created, vid)

    def listdir(self, path: str) -> list[Node]:
        folder_node(self, path)
        parts = path.split("/") if path else []
        if not parts:
            return [self.lookup(BY_ID), self.lookup(BY_NAME)]
        if parts[0] == BY_ID and len(parts) >= 2:
            inner = "/".join(parts[2:])
            return [moved(n, f"{path}/{n.name}") for n in self._view(parts[1]).listdir(inner)]
        if parts[0] == BY_ID:
            names = self._ids().value
        elif len(parts) == 1:
            names = self._projects().value
        elif len(parts) == 2:
            names = self._names(parts[1]).value
        else:
            labels = self._labels(parts[1], parts[2]).value
            names = sorted(labels) + ([LATEST] if labels and LATEST not in labels else [])
        out = (self.lookup(f"{path}/{n}") for n in names)
        return sorted((n for n in out if n is not None), key=lambda n: n.name)

    def volatile(self, path: str) -> bool:
        """True for names whose meaning can change while mounted (the catalog's)."""
        return not path.startswith(BY_ID + "/") or path.count("/") < 2

    def totals(self) -> tuple[int, int]:
        return 0, 0
