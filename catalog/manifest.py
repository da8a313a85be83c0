"""Manifests: the change-set of one version as a SQLite file (DESIGN.md, "Manifests").

Tables:
    files(path, parent, name, kind, size, sha256, mode, mtime_ns, pack, offset, chunks, target)
        kind 'f' regular file, 'l' symlink (target = link text), 'x' external link
        (target = URL). A small file lives at (pack, offset, size); a large one in
        chunks = the concatenated 32-byte sha256 digests of its fixed-size chunks.
    dirs(path, parent, name, mode, mtime_ns, explicit): every directory the version's own
        entries need, so a listing is one indexed query; explicit=1 marks directories the
        user added (empty directories survive).
    removed(path): paths hidden from the parents (a folder hides everything under it).
    meta(key, value): version id, format.

Lookups and listings are indexed queries; nothing loads a whole manifest into Python
objects unless a caller iterates it. A `Manifest` keeps one SQLite connection per thread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

from strata.catalog import paths
from strata.catalog.errors import InvalidPath

FORMAT = 1

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE files(
    path TEXT PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT, mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    pack TEXT, offset INTEGER NOT NULL DEFAULT 0, chunks BLOB, target TEXT);
CREATE TABLE dirs(path TEXT PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL,
    mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, explicit INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE removed(path TEXT PRIMARY KEY) WITHOUT ROWID;
"""
# built after the bulk insert: cheaper than maintaining them row by row
INDEXES = """
CREATE INDEX files_parent ON files(parent, name);
CREATE INDEX dirs_parent ON dirs(parent, name);
"""

FILE_COLUMNS = "path, kind, size, sha256, mode, mtime_ns, pack, offset, chunks, target"


def chunk_ids(chunks: bytes | None) -> list[str]:
    """The blob ids in a file's `chunks` column (its chunk digests, 32 bytes each)."""
    c = chunks or b""
    return [c[i:i + 32].hex() for i in range(0, len(c), 32)]


@dataclass(frozen=True, slots=True)
class Entry:
    """A file, symlink or external link of a version. `version` is the id of the version
    whose change-set supplied it (set when read from a manifest)."""
    path: str
    kind: str
    size: int
    sha256: str | None
    mode: int
    mtime_ns: int
    pack: str | None = None
    offset: int = 0
    chunks: bytes | None = None
    target: str | None = None
    version: str = ""

    @property
    def chunk_ids(self) -> list[str]:
        return chunk_ids(self.chunks)

    def blob_ids(self) -> list[str]:
        if self.pack:
            return [self.pack]
        return self.chunk_ids

    def same_content(self, other: "Entry") -> bool:
        return (self.kind == other.kind and self.size == other.size
                and self.sha256 == other.sha256 and self.target == other.target)


@dataclass(frozen=True, slots=True)
class DirEntry:
    path: str
    mode: int
    mtime_ns: int
    explicit: bool
    version: str = ""


def _entry(row, version: str) -> Entry:
    if not paths.is_safe(row[0]):
        raise InvalidPath(f"manifest of version {version} holds an unsafe path {row[0]!r}")
    return Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                 row[9], version)


def write(path: str, version_id: str, files: Iterable[Entry], removed: Iterable[str],
          explicit_dirs: Iterable[DirEntry]) -> None:
    """Write a manifest to the local file `path` (replaced atomically)."""
    tmp = f"{path}.tmp{os.getpid()}"
    if os.path.exists(tmp):
        os.unlink(tmp)
    db = sqlite3.connect(tmp)
    try:
        db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)
        db.executemany("INSERT INTO meta VALUES (?, ?)",
                       [("format", str(FORMAT)), ("version", version_id)])
        dirs: dict[str, DirEntry] = {}
        for d in explicit_dirs:
            dirs[d.path] = d
        # Invariant from here on: every directory in `dirs` has all its ancestors in it too,
        # so the walk up from a file can stop at the first one already known.
        for d in list(dirs.values()):
            for anc in paths.ancestors(d.path):
                dirs.setdefault(anc, DirEntry(anc, 0o755, d.mtime_ns, False))

        def rows():
            for e in files:
                parent = paths.parent_of(e.path)
                for anc in (parent, *paths.ancestors(parent)) if parent else ():
                    if anc in dirs:
                        break
                    dirs[anc] = DirEntry(anc, 0o755, e.mtime_ns, False)
                yield (e.path, parent, paths.name_of(e.path), e.kind, e.size, e.sha256,
                       e.mode, e.mtime_ns, e.pack, e.offset, e.chunks, e.target)

        db.executemany("INSERT INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows())
        db.executemany("INSERT INTO dirs VALUES (?,?,?,?,?,?)",
                       [(d.path, paths.parent_of(d.path), paths.name_of(d.path), d.mode,
                         d.mtime_ns, int(d.explicit)) for d in dirs.values()])
        db.executemany("INSERT INTO removed VALUES (?)", [(r,) for r in removed])
        db.executescript(INDEXES)
        db.commit()
    finally:
        db.close()
    os.replace(tmp, path)


class Manifest:
    """Read access to one version's manifest file (immutable, so opened read-only)."""

    def __init__(self, path: str, version_id: str):
        self.path = path
        self.version_id = version_id
        self._local = threading.local()

    @property
    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True,
                                 check_same_thread=False)
            self._local.db = db
        return db

    def lookup(self, path: str) -> Entry | None:
        row = self.db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE path=?",
                              (path,)).fetchone()
        return _entry(row, self.version_id) if row else None

    def lookup_dir(self, path: str) -> DirEntry | None:
        row = self.db.execute("SELECT path, mode, mtime_ns, explicit FROM dirs WHERE path=?",
                              (path,)).fetchone()
        return DirEntry(row[0], row[1], row[2], bool(row[3]), self.version_id) if row else None

    def is_removed(self, path: str) -> bool:
        """True if `path` or one of its ancestors is in this version's removed set."""
        candidates = [path, *paths.ancestors(path)]
        q = "SELECT 1 FROM removed WHERE path IN (%s) LIMIT 1" % ",".join("?" * len(candidates))
        return self.db.execute(q, candidates).fetchone() is not None

    def removed_names_under(self, folder: str) -> set[str]:
        """Names of the direct children of `folder` that this version removes."""
        if folder:
            lo, hi = folder + "/", folder + "0"  # '0' sorts right after '/'
            rows = self.db.execute("SELECT path FROM removed WHERE path > ? AND path < ?",
                                   (lo, hi))
            start = len(lo)
        else:
            rows = self.db.execute("SELECT path FROM removed")
            start = 0
        return {p[start:] for (p,) in rows if "/" not in p[start:]}

    def children(self, folder: str) -> tuple[list[Entry], list[DirEntry]]:
        files = [_entry(r, self.version_id) for r in self.db.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE parent=? ORDER BY name", (folder,))]
        dirs = [DirEntry(r[0], r[1], r[2], bool(r[3]), self.version_id) for r in self.db.execute(
            "SELECT path, mode, mtime_ns, explicit FROM dirs WHERE parent=? ORDER BY name",
            (folder,))]
        return files, dirs

    def files(self) -> Iterator[Entry]:
        for row in self.db.execute(f"SELECT {FILE_COLUMNS} FROM files ORDER BY path"):
            yield _entry(row, self.version_id)

    def files_in(self, exact: Iterable[str], folders: Iterable[str]) -> Iterator[Entry]:
        """Entries at the paths `exact` or below one of `folders`, each once: what a
        scoped merge (merge.Scope) reads instead of every file."""
        for row in self._rows_in(f"SELECT {FILE_COLUMNS} FROM files", "", exact, folders):
            yield _entry(row, self.version_id)

    def dirs_in(self, exact: Iterable[str], folders: Iterable[str]) -> Iterator[DirEntry]:
        """Explicit folders at `exact` or below one of `folders`, each once."""
        for r in self._rows_in("SELECT path, mode, mtime_ns, explicit FROM dirs",
                               "explicit=1 AND ", exact, folders):
            yield DirEntry(r[0], r[1], r[2], True, self.version_id)

    def _rows_in(self, select: str, also: str, exact: Iterable[str],
                 folders: Iterable[str]) -> Iterator[tuple]:
        """Rows of `select` (path first) whose path is in `exact` or below one of
        `folders` ('' is the whole tree), each once; `also` is a further condition."""
        queries = []
        exact = list(exact)
        for i in range(0, len(exact), 500):
            batch = exact[i:i + 500]
            queries.append((f"path IN ({','.join('?' * len(batch))})", batch))
        for folder in folders:   # '0' sorts right after '/': the range is the subtree
            queries.append(("path > ? AND path < ?", (folder + "/", folder + "0"))
                           if folder else ("path > ?", ("",)))
        seen: set[str] = set()
        for cond, args in queries:
            for row in self.db.execute(f"{select} WHERE {also}{cond}", args):
                if row[0] not in seen:
                    seen.add(row[0])
                    yield row

    def dirs(self, explicit_only: bool = False) -> Iterator[DirEntry]:
        q = "SELECT path, mode, mtime_ns, explicit FROM dirs"
        if explicit_only:
            q += " WHERE explicit=1"
        for r in self.db.execute(q + " ORDER BY path"):
            yield DirEntry(r[0], r[1], r[2], bool(r[3]), self.version_id)

    def removed(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM removed ORDER BY path")]

    def blob_ids(self) -> set[str]:
        out: set[str] = set()
        for pack, chunks in self.db.execute("SELECT pack, chunks FROM files"):
            if pack:
                out.add(pack)
            elif chunks:
                out.update(chunk_ids(chunks))
        return out

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM files").fetchone()[0]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

