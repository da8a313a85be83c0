"""Drafts: a version being built, kept in the local workspace until it is finalized.

A draft is a small SQLite file (workspace/drafts/<id>.db) holding the version's fields,
the entries added (with the local file each came from and, once uploaded, where its bytes
now live; a folder repository stores them already at add, and upload then checks their
sources), the paths removed and the directories added. Nothing in the repository refers
to a draft, so a half-built version is never visible to readers; an interrupted upload
resumes from what the draft has recorded as placed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

from strata.catalog import config, layout
from strata.catalog.blobs import Placed, Staged
from strata.catalog.errors import DamagedDraft, UnknownVersion
from strata.catalog.manifest import DirEntry, Entry
from strata.storage.errors import disk_full

log = logging.getLogger("strata.catalog")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(
    path TEXT PRIMARY KEY, kind TEXT NOT NULL, source TEXT, size INTEGER NOT NULL,
    sha256 TEXT, mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, chunks BLOB, target TEXT,
    pack TEXT, offset INTEGER NOT NULL DEFAULT 0, placed INTEGER NOT NULL DEFAULT 0,
    stamp TEXT);
CREATE TABLE IF NOT EXISTS removed(path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dirs(path TEXT PRIMARY KEY, mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL);
"""

STORED = 2   # entries.placed: 0 not stored, 1 placed, STORED stored by add, sources unchecked


def drafts_dir() -> Path:
    return config.workspace_dir() / "drafts"


def draft_path(version_id: str) -> Path:
    return drafts_dir() / f"{version_id}.db"


def exists(version_id: str) -> bool:
    return draft_path(version_id).exists()


class Draft:
    def __init__(self, version_id: str, *, create: bool = False):
        path = draft_path(version_id)
        if not create and not path.exists():
            raise UnknownVersion(f"no draft {version_id} in this workspace")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.id = version_id
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=30)
        try:
            self.db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                                  + SCHEMA)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(entries)")}
            if "stamp" not in columns:   # a draft begun by an earlier strata
                self.db.execute("ALTER TABLE entries ADD COLUMN stamp TEXT")
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise
            self.db.close()
            if disk_full(e):
                if create:
                    remove_files(version_id)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise DamagedDraft(version_id, path, str(e)) from None

    # ---- fields --------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, **fields: Any) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(k, json.dumps(v)) for k, v in fields.items()])

    @property
    def fields(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    # ---- change-set ----------------------------------------------------------------
    def stage(self, rows: list[tuple]) -> None:
        """rows: (path, kind, source, size, sha256, mode, mtime_ns, chunks, target,
        pack, offset, placed[, stamp]). Replaces earlier entries at the same paths. Removals stay:
        the version's own entries apply after them, and a removed parent folder must
        stay hidden under a file that replaces it."""
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r if len(r) == 13 else (*r, None) for r in rows))

    def unstage(self, paths: list[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM entries WHERE path=?", [(p,) for p in paths])

    def unstage_under(self, folder: str) -> int:
        with self.db:
            cur = self.db.execute("DELETE FROM entries WHERE path=? OR path LIKE ? ESCAPE '\\'",
                                  (folder, _like_prefix(folder)))
            self.db.execute("DELETE FROM dirs WHERE path=? OR path LIKE ? ESCAPE '\\'",
                            (folder, _like_prefix(folder)))
            return cur.rowcount

    def remove(self, paths: list[str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO removed VALUES (?)",
                                [(p,) for p in paths])

    def add_dirs(self, dirs: list[tuple[str, int, int]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO dirs VALUES (?,?,?)", dirs)

    def entries(self) -> Iterator[Entry]:
        for r in self.db.execute(
                "SELECT path, kind, size, sha256, mode, mtime_ns, pack, offset, chunks, target "
                "FROM entries ORDER BY path"):
            yield Entry(*r, version=self.id)

    def entry_sources(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, source FROM entries WHERE source IS NOT NULL"))

    def removed(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM removed ORDER BY path")]

    def dirs(self) -> list[DirEntry]:
        return [DirEntry(p, m, t, True, self.id) for p, m, t in
                self.db.execute("SELECT path, mode, mtime_ns FROM dirs ORDER BY path")]

    def unplaced(self) -> list[Staged]:
        return [Staged(*r) for r in self.db.execute(
            "SELECT path, source, size, sha256, chunks, stamp FROM entries "
            "WHERE placed=0 AND kind='f' ORDER BY path")]

    def stored_unchecked(self) -> list[tuple[Staged, str | None, int]]:
        """Files whose bytes add stored already (placed=STORED), with their pack and
        offset: upload still checks that their sources did not change since."""
        return [(Staged(*r[:6]), r[6], r[7]) for r in self.db.execute(
            "SELECT path, source, size, sha256, chunks, stamp, pack, offset FROM entries "
            "WHERE placed=? AND kind='f' ORDER BY path", (STORED,))]

    def unplaced_count(self) -> int:
        """Files not uploaded yet, including those stored at add but not checked."""
        return self.db.execute(
            "SELECT count(*) FROM entries WHERE placed!=1 AND kind='f'").fetchone()[0]

    def confirm_stored(self, missing: list[str]) -> None:
        """Files stored at add are checked: `missing` (their blobs are gone) are to be
        uploaded like any other, the rest are placed."""
        with self.db:
            self.db.executemany("UPDATE entries SET pack=NULL, offset=0, placed=0 "
                                "WHERE path=?", [(p,) for p in missing])
            self.db.execute("UPDATE entries SET placed=1 WHERE placed=?", (STORED,))

    def unplace(self, paths: list[str]) -> None:
        """These files' blobs are gone: upload stores them again."""
        with self.db:
            self.db.executemany("UPDATE entries SET pack=NULL, offset=0, placed=0 "
                                "WHERE path=?", [(p,) for p in paths])

    def place(self, placed: list[Placed]) -> None:
        with self.db:
            self.db.executemany(
                "UPDATE entries SET pack=?, offset=?, chunks=coalesce(?, chunks), placed=1 "
                "WHERE path=?", [(p.pack, p.offset, p.chunks, p.path) for p in placed])

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def destroy(self) -> None:
        self.db.close()
        remove_files(self.id)


def remove_files(version_id: str) -> None:
    """Delete a draft's database files (a damaged one cannot be opened to destroy it)."""
    path = draft_path(version_id)
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def open_all() -> Iterator[Draft]:
    """Every draft of this workspace that can be opened; a damaged one is left out with
    a warning (it would hide all the others)."""
    folder = drafts_dir()
    if not folder.exists():
        return
    for p in sorted(folder.glob("*.db")):
        if not layout.is_version_id(p.stem):
            continue
        try:
            yield Draft(p.stem)
        except DamagedDraft as e:
            log.warning("%s", e)


def _like_prefix(folder: str) -> str:
    esc = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return esc + "/%"


def new_draft(version_id: str, **fields: Any) -> Draft:
    d = Draft(version_id, create=True)
    try:
        d.set(created=time.time(), **fields)
    except BaseException:   # a full disk: no empty draft database is left behind
        d.db.close()
        remove_files(d.id)
        raise
    return d
