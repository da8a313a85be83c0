"""The overlay: the writable upper layer of a mount, over any read-only view.

State lives in one folder per overlay (in the workspace, so it survives remounts and
crashes): `upper/` holds the bytes of new and modified files, `journal.db` (SQLite, WAL,
one committed transaction per operation) holds what each changed path now is:

    kind 'f'  a file: its bytes in upper/<upper>, or, after a rename or chmod of a lower
              file, still the lower blobs (`lower` = the lower entry as JSON: no copy-up)
    kind 'l'  a symlink (`target`)
    kind 'd'  a folder; `redirect` names the lower folder its lower contents come from
              (a renamed lower folder: metadata only), `opaque` hides lower contents
              (a folder deleted and created again)
    kind 'w'  a whiteout: the lower path is deleted

A path's lower counterpart is found by walking its components through the journal
(`lower_path`), which is how renamed folders keep showing their lower files.

Copied-up chunks. A large lower file copied up keeps, in `copied`, its lower size and
chunk digests, and `dirty` records each chunk a write touches, in the journal before the
bytes reach the upper file (so a crash can lose a dirty mark only with the write it
covers). A commit then reuses the digest of every chunk that no write touched instead of
hashing it again (`known_chunks`); a truncate forgets the file's lower chunks altogether.

Hashed after close. When the last writer of a large upper file closes it, a background
thread hashes it (whole file and chunks, reusing known chunks) and records the result in
`hashed`, so a commit made later does not read the file again. Every write and truncate
goes through `begin_change` (before the bytes change: it bumps the file's generation and
deletes its `hashed` row in the journal) and `end_change`; a hash is recorded only if the
file's generation did not move and no change was in flight while it was computed, so a
recorded hash always describes the file's bytes, across crashes too. `wait_hashing`
lets a commit wait for hashes already under way rather than start them again.

Concurrency: metadata operations take `_lock` (an RLock); file data is read and written
through descriptors outside it. Lock order: overlay `_lock` before any lock of the lower
view or the cache. Every journal statement runs under `Overlay._db_lock`, the innermost
lock of all, which a batch of row changes (`Overlay.changes`) holds from BEGIN to COMMIT:
no other thread's statement falls into the transaction or is rolled back with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat as stat_mod
import logging
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from strata.catalog import paths
from strata.catalog.blobs import HashStopped, hash_file
from strata.catalog.manifest import Entry
from strata.storage.cache import copy_range
from strata.storage.errors import disk_full
from strata.vfs.errors import (Exists, InvalidArgument, IsADirectory, NotADirectory,
                               NotEmpty, NotPermitted)
from strata.vfs.views import DIR, FILE, LINK, Node, View, folder_node, missing, moved

log = logging.getLogger("strata.vfs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes(
    path TEXT PRIMARY KEY, parent TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    upper TEXT, lower TEXT, redirect TEXT, opaque INTEGER NOT NULL DEFAULT 0,
    mode INTEGER, mtime_ns INTEGER, target TEXT, origin TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nodes_parent ON nodes(parent, name);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS copied(upper TEXT PRIMARY KEY, size INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL, chunks BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dirty(upper TEXT NOT NULL, chunk INTEGER NOT NULL,
    PRIMARY KEY(upper, chunk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hashed(upper TEXT PRIMARY KEY, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, chunks BLOB) WITHOUT ROWID;
"""
COLUMNS = "path, kind, upper, lower, redirect, opaque, mode, mtime_ns, target, origin"
OVERLAY_VERSION = "overlay"   # what user.strata.version says of a pending change


@dataclass(frozen=True)
class Row:
    path: str
    kind: str
    upper: str | None = None
    lower: str | None = None
    redirect: str | None = None
    opaque: int = 0
    mode: int | None = None
    mtime_ns: int | None = None
    target: str | None = None
    origin: str | None = None


def _entry_json(e: Entry) -> str:
    d = asdict(e)
    if d.get("chunks") is not None:
        d["chunks"] = e.chunks.hex()
    return json.dumps(d)


def _entry_from_json(text: str) -> Entry:
    d = json.loads(text)
    if d.get("chunks") is not None:
        d["chunks"] = bytes.fromhex(d["chunks"])
    return Entry(**d)


class Overlay:
    """The journal and upper folder of one overlay (no view logic)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.upper_dir = self.folder / "upper"
        self.upper_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.folder / "journal.db"), isolation_level=None,
                                  check_same_thread=False, timeout=30)
        # every statement runs under this lock, the innermost of all: a batch of row
        # changes (`changes`) is one transaction no other thread's statement falls into
        self._db_lock = threading.RLock()
        self._batch: list[tuple[str, tuple]] | None = None
        self._batch_owner = 0
        self._reserve = self.folder / "reserve"
        self._reserve_missing = not _fill_reserve(self._reserve)
        self._x("PRAGMA journal_mode=WAL")
        self._x("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        # upper name -> (chunk size, chunks written since copy-up), for copied-up files
        self._dirty: dict[str, tuple[int, set[int]]] = {
            upper: (chunk_size, set()) for upper, chunk_size in
            self._x("SELECT upper, chunk_size FROM copied")}
        for upper, chunk in self._x("SELECT upper, chunk FROM dirty"):
            self._dirty[upper][1].add(chunk)
        self._dirty_lock = threading.Lock()
        # hashing after close (see the module docstring); `chunk_size` None: off
        self.chunk_size: int | None = None
        self._hash_lock = threading.Condition()
        self._gen: dict[str, int] = {}        # upper name -> changes begun or ended
        self._inflight: dict[str, int] = {}   # upper name -> changes under way
        self._hashed = {u for (u,) in self._x("SELECT upper FROM hashed")}
        self._queue: queue.SimpleQueue | None = None
        self._queued = 0                      # names queued or being hashed
        self._stopped = False                 # the generation is being dropped
        self._thread: threading.Thread | None = None

    def _x(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        with self._db_lock:
            return self.db.execute(sql, args)

    def _xm(self, sql: str, rows: list) -> sqlite3.Cursor:
        with self._db_lock:
            return self.db.executemany(sql, rows)

    @contextlib.contextmanager
    def changes(self, *, frees: bool = False):
        """Row changes (`put`, `drop`) made inside take effect together when it ends: all
        of them, or none (a full disk, an error) - never a rename half done. Until then
        reads see the rows as they were. Files are removed by the caller after it.

        `frees`: the changes remove something (a file, a folder), and may use the
        reserve on a full disk: their row goes first, then the file's bytes, so without
        it nothing could be removed to make room. The caller calls `refill` after."""
        if self._batch is not None and self._batch_owner == threading.get_ident():
            yield   # nested: part of the outer batch
            return
        self._batch, self._batch_owner = [], threading.get_ident()
        try:
            yield
            batch = self._batch
        finally:
            self._batch, self._batch_owner = None, 0
        self._apply(batch, frees)

    def refill(self) -> None:
        """Take the reserve back if it was used and there is room again."""
        if self._reserve_missing:
            with self._db_lock:
                self._reserve_missing = not _fill_reserve(self._reserve)

    def _write(self, sql: str, args: tuple) -> None:
        if self._batch is not None and self._batch_owner == threading.get_ident():
            self._batch.append((sql, args))
        else:
            self._apply([(sql, args)], False)

    def _apply(self, batch: list[tuple[str, tuple]], frees: bool) -> None:
        """One transaction; on a full disk, a change that `frees` gives up the reserve
        file and is tried once more."""
        with self._db_lock:
            try:
                self._transaction(batch)
            except sqlite3.Error as e:
                if not frees or self._reserve_missing or not disk_full(e):
                    raise
                self._reserve.unlink(missing_ok=True)
                self._reserve_missing = True
                log.warning("the overlay's disk is full: its reserve of %d KiB went to "
                            "the journal, so that a removal can make room",
                            RESERVE // 1024)
                self._transaction(batch)

    def _transaction(self, batch: list[tuple[str, tuple]]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in batch:
                self.db.execute(sql, args)
            self.db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise

    def get(self, path: str) -> Row | None:
        r = self._x(f"SELECT {COLUMNS} FROM nodes WHERE path=?", (path,)).fetchone()
        return Row(*r) if r else None

    def children(self, folder: str) -> list[Row]:
        return [Row(*r) for r in self._x(
            f"SELECT {COLUMNS} FROM nodes WHERE parent=? ORDER BY name", (folder,))]

    def rows(self) -> list[Row]:
        return [Row(*r) for r in self._x(f"SELECT {COLUMNS} FROM nodes ORDER BY path")]

    def under(self, folder: str) -> list[Row]:
        lo, hi = folder + "/", folder + "0"
        return [Row(*r) for r in self._x(
            f"SELECT {COLUMNS} FROM nodes WHERE path > ? AND path < ? ORDER BY path", (lo, hi))]

    def put(self, row: Row) -> None:
        self._write("INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (row.path, paths.parent_of(row.path), paths.name_of(row.path),
                     row.kind, row.upper, row.lower, row.redirect, row.opaque, row.mode,
                     row.mtime_ns, row.target, row.origin))

    def drop(self, path: str) -> None:
        self._write("DELETE FROM nodes WHERE path=?", (path,))

    def upper_path(self, name: str) -> str:
        return str(self.upper_dir / name)

    def new_upper(self) -> str:
        return uuid.uuid4().hex

    def get_meta(self, key: str, default=None):
        r = self._x("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r else default

    def set_meta(self, **values) -> None:
        for k, v in values.items():
            self._x("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, json.dumps(v)))

    def is_empty(self) -> bool:
        return self._x("SELECT 1 FROM nodes LIMIT 1").fetchone() is None

    # ---- chunks of copied-up files -------------------------------------------------------
    def track(self, name: str, size: int, chunk_size: int, chunks: bytes) -> None:
        """Upper file `name` is a copy of a lower file of `size` bytes in `chunks`."""
        with self._dirty_lock:
            self._x("INSERT OR REPLACE INTO copied VALUES (?,?,?,?)",
                    (name, size, chunk_size, chunks))
            self._dirty[name] = (chunk_size, set())

    def note_write(self, name: str, offset: int, length: int) -> None:
        """Bytes [offset, offset+length) of upper file `name` are about to change."""
        tracked = self._dirty.get(name)
        if tracked is None or length <= 0:
            return
        chunk_size, dirty = tracked
        touched = set(range(offset // chunk_size, (offset + length - 1) // chunk_size + 1))
        if touched <= dirty:
            return
        with self._dirty_lock:
            new = touched - dirty
            self._xm("INSERT OR IGNORE INTO dirty VALUES (?, ?)",
                     [(name, c) for c in sorted(new)])
            dirty |= new

    def untrack(self, name: str) -> None:
        """Forget the lower chunks of upper file `name` (truncated, or gone)."""
        if name not in self._dirty:
            return
        with self._dirty_lock:
            self._x("DELETE FROM copied WHERE upper=?", (name,))
            self._x("DELETE FROM dirty WHERE upper=?", (name,))
            self._dirty.pop(name, None)

    # ---- whole-file hashes, computed after the last writer closes ----------------------
    def begin_change(self, name: str) -> None:
        """The bytes of upper file `name` are about to change (a write or a truncate)."""
        with self._hash_lock:
            self._inflight[name] = self._inflight.get(name, 0) + 1
            self._invalidate(name)

    def end_change(self, name: str) -> None:
        with self._hash_lock:
            self._gen[name] = self._gen.get(name, 0) + 1
            self._inflight[name] -= 1

    def settled(self, name: str) -> None:
        """Its last writer closed upper file `name`: hash it in the background if it is
        large (a small file costs a commit less than the bookkeeping)."""
        if self.chunk_size is None:
            return
        try:
            if os.stat(self.upper_path(name)).st_size < self.chunk_size:
                return
        except FileNotFoundError:
            return
        with self._hash_lock:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._hash_loop, args=(self._queue,),
                                                daemon=True, name="strata-hash-closed")
                self._thread.start()
            self._queued += 1
        self._queue.put(name)

    def wait_hashing(self) -> None:
        """Return once every hash asked for so far is recorded (or given up)."""
        with self._hash_lock:
            self._hash_lock.wait_for(lambda: self._queued == 0)

    def hashed(self, name: str, size: int) -> tuple[str, bytes | None] | None:
        """(sha256, chunk digests) of upper file `name` if recorded for its current
        bytes (`size` is what the caller sees now), else None."""
        with self._hash_lock:
            row = self._x("SELECT size, sha256, chunks FROM hashed WHERE upper=?",
                          (name,)).fetchone()
        if row is None or row[0] != size:
            return None
        return row[1], row[2]

    def stop_hashing(self) -> None:
        """This generation is dropped: hashes queued or under way are not wanted, and
        the hashing thread ends."""
        with self._hash_lock:
            self._stopped = True
            if self._queue is not None:
                self._queue.put(None)

    def forget(self, name: str) -> None:
        """Upper file `name` is gone (removed or replaced): no hash of it is wanted, and
        one under way stops at its next chunk."""
        with self._hash_lock:
            self._invalidate(name)

    def _invalidate(self, name: str) -> None:
        """(under _hash_lock) A hash of `name` computed so far no longer holds."""
        self._gen[name] = self._gen.get(name, 0) + 1
        if name in self._hashed:
            self._hashed.discard(name)
            self._x("DELETE FROM hashed WHERE upper=?", (name,))

    def _hash_loop(self, q: queue.SimpleQueue) -> None:
        try:   # the work of a commit done ahead: it yields to whatever the user runs
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError):
            pass
        while True:
            name = q.get()
            if name is None:
                return
            try:
                self._hash_one(name)
            except (FileNotFoundError, HashStopped):
                pass   # removed, or changed: its next close asks again
            except Exception as e:  # noqa: BLE001 - the commit hashes it then
                log.debug("hashing %s after close failed: %s", name, e)
            finally:
                with self._hash_lock:
                    self._queued -= 1
                    self._hash_lock.notify_all()

    def _hash_one(self, name: str) -> None:
        with self._hash_lock:
            if self._stopped or self._inflight.get(name) or name in self._hashed:
                return
            gen = self._gen.get(name, 0)
        path = self.upper_path(name)
        size = os.stat(path).st_size
        with self._dirty_lock:
            known = self.known_chunks(name, size)
        h = hash_file(path, self.chunk_size, frozen=True, known=known,
                      stop=lambda: self._stopped or self._gen.get(name, 0) != gen)
        with self._hash_lock:
            if self._gen.get(name, 0) != gen or self._inflight.get(name):
                return   # changed meanwhile: the bytes hashed may be a mix
            self._x("INSERT OR REPLACE INTO hashed VALUES (?,?,?,?)",
                    (name, h.size, h.sha256, h.chunks))
            self._hashed.add(name)

    def known_chunks(self, name: str, size: int) -> dict[int, bytes] | None:
        """Digests of the chunks of upper file `name` (now `size` bytes) that are still the
        lower file's: whole chunks, in both the lower file and this one, that no write
        touched. None if the file is not a tracked copy."""
        row = self._x("SELECT size, chunk_size, chunks FROM copied WHERE upper=?",
                      (name,)).fetchone()
        if row is None:
            return None
        lower_size, chunk_size, chunks = row
        dirty = {c for (c,) in self._x("SELECT chunk FROM dirty WHERE upper=?", (name,))}
        whole = min(lower_size, size) // chunk_size
        return {i: chunks[i * 32:(i + 1) * 32] for i in range(whole) if i not in dirty}

    def close(self) -> None:
        self.db.close()


class OverlayView:
    """A writable view: the overlay's changes over a read-only `lower` view."""

    def __init__(self, lower: View, overlay: Overlay):
        self.lower = lower
        self.overlay = overlay
        self._lock = threading.RLock()

    # ---- resolving paths -------------------------------------------------------------
    def lower_path(self, path: str) -> str | None:
        """The path in the lower view whose contents show at overlay `path`, or None when
        the overlay hides the lower side there."""
        lp: str | None = ""
        op = ""
        for comp in path.split("/") if path else ():
            op = paths.join(op, comp)
            row = self.overlay.get(op)
            if row is None or (row.kind == DIR and row.redirect is None and not row.opaque):
                lp = None if lp is None else paths.join(lp, comp)
            elif row.kind == DIR:
                # a folder moved here shows its old lower folder, even inside a new
                # (opaque) one; a new folder hides whatever the lower side has below it
                lp = row.redirect
            else:
                return None   # a whiteout, or a file/symlink replacing a folder
        return lp

    def _lower_node(self, path: str) -> Node | None:
        lp = self.lower_path(path)
        if lp is None:
            return None
        n = self.lower.lookup(lp)
        if n is None:
            return None
        # keep `upper`: a lower overlay (the generation being committed) holds bytes there
        return moved(n, path)

    def _node_of_row(self, row: Row) -> Node | None:
        if row.kind == "w":
            return None
        if row.kind == DIR:
            return Node(row.path, DIR, 0, row.mode if row.mode is not None else 0o755,
                        row.mtime_ns or 0, OVERLAY_VERSION)
        if row.kind == LINK:
            e = Entry(row.path, "l", len(row.target.encode()), None, 0o777,
                      row.mtime_ns or 0, target=row.target, version=OVERLAY_VERSION)
            return Node(row.path, LINK, e.size, 0o777, e.mtime_ns, OVERLAY_VERSION, e)
        if row.upper:
            up = self.overlay.upper_path(row.upper)
            st = os.stat(up)
            return Node(row.path, FILE, st.st_size, stat_mod.S_IMODE(st.st_mode),
                        st.st_mtime_ns, OVERLAY_VERSION, None, up)
        e = _entry_from_json(row.lower)
        return Node(row.path, e.kind, e.size, row.mode if row.mode is not None else e.mode,
                    row.mtime_ns if row.mtime_ns is not None else e.mtime_ns, e.version, e)

    def lookup(self, path: str) -> Node | None:
        with self._lock:
            if path == "":
                root = self.overlay.get("")
                return self._node_of_row(root) if root else self.lower.lookup("")
            row = self.overlay.get(path)
            if row is not None:
                return self._node_of_row(row)
            parent = paths.parent_of(path)
            if parent and self.overlay.get(parent) is not None:
                pn = self.lookup(parent)
                if pn is None or not pn.is_dir:
                    return None
            return self._lower_node(path)

    def listdir(self, path: str) -> list[Node]:
        with self._lock:
            folder_node(self, path)
            out: dict[str, Node] = {}
            lp = self.lower_path(path)
            if lp is not None and self.lower.lookup(lp) is not None:
                for n in self.lower.listdir(lp):
                    out[n.name] = moved(n, paths.join(path, n.name))
            for row in self.overlay.children(path):
                name = paths.name_of(row.path)
                n = self._node_of_row(row)
                if n is None:
                    out.pop(name, None)
                else:
                    out[name] = n
            return sorted(out.values(), key=lambda n: n.name)

    def read(self, node: Node, offset: int, size: int, hint=None) -> bytes:
        if node.upper:
            with open(node.upper, "rb") as f:
                return os.pread(f.fileno(), size, offset)
        return self.lower.read(node, offset, size, hint)

    def read_view(self, node: Node, offset: int, buf: memoryview, hint=None) -> memoryview:
        if node.upper:
            with open(node.upper, "rb") as f:
                return buf[:os.preadv(f.fileno(), [buf], offset)]
        return self.lower.read_view(node, offset, buf, hint)

    def copy_to(self, node: Node, fd: int) -> None:
        if not node.upper:
            return self.lower.copy_to(node, fd)
        with open(node.upper, "rb") as f:
            copy_range(f.fileno(), fd, os.fstat(f.fileno()).st_size, 0)

    def totals(self) -> tuple[int, int]:
        return self.lower.totals() if hasattr(self.lower, "totals") else (0, 0)

    def path_of_upper(self, upper_file: str) -> str | None:
        """The path whose bytes this overlay keeps in `upper_file`, if any."""
        with self._lock:
            r = self.overlay._x("SELECT path FROM nodes WHERE upper=?",
                                (os.path.basename(upper_file),)).fetchone()
            return r[0] if r else None

    # ---- changes -----------------------------------------------------------------------
    def _require_dir(self, folder: str) -> None:
        n = self.lookup(folder)
        if n is None:
            raise missing(self, folder)
        if not n.is_dir:
            raise NotADirectory(folder)

    def _lower_has(self, path: str) -> bool:
        """Whether the lower side has something at `path`, whatever the overlay says of
        `path` itself (its folder's mapping still applies)."""
        folder = self.lower_path(paths.parent_of(path)) if paths.parent_of(path) else ""
        if folder is None:
            return False
        return self.lower.lookup(paths.join(folder, paths.name_of(path))) is not None

    def _hide_or_drop(self, path: str) -> None:
        """`path` no longer exists: a whiteout if the lower side has it, else no row."""
        if self._lower_has(path):
            self.overlay.put(Row(path, "w"))
        else:
            self.overlay.drop(path)

    def _discard_upper(self, row: Row | None) -> None:
        if row is not None and row.upper:
            self.overlay.untrack(row.upper)
            self.overlay.forget(row.upper)
            try:
                os.unlink(self.overlay.upper_path(row.upper))
            except FileNotFoundError:
                pass

    def create(self, path: str, mode: int, *, exclusive: bool = True) -> str:
        """A new empty file; returns its upper file path."""
        with self._lock:
            self._require_dir(paths.parent_of(path))
            existing = self.lookup(path)
            if existing is not None:
                if exclusive:
                    raise Exists(path)
                if existing.is_dir:
                    raise IsADirectory(path)
            old = self.overlay.get(path)
            name = self.overlay.new_upper()
            up = self.overlay.upper_path(name)
            fd = os.open(up, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            try:
                os.chmod(up, stat_mod.S_IMODE(mode) or 0o644)
                self.overlay.put(Row(path, FILE, upper=name))
            except BaseException:
                os.unlink(up)
                raise
            self._discard_upper(old)   # once no row points at it
            return up

    def copy_up(self, path: str, *, keep_data: bool = True) -> str:
        """Make `path` an upper file (fetching its lower bytes through the cache unless
        the caller is about to truncate it) and return the upper file path."""
        with self._lock:
            n = self.lookup(path)
            if n is None:
                raise missing(self, path)
            if n.is_dir:
                raise IsADirectory(path)
            row = self.overlay.get(path)
            if row is not None and row.upper:
                return self.overlay.upper_path(row.upper)
            if n.kind == LINK:
                raise NotPermitted(f"{path} is a symlink")
            name = self.overlay.new_upper()
            up = self.overlay.upper_path(name)
            tmp = up + ".copying"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if keep_data and n.size:
                    self.lower.copy_to(n, fd)
            except BaseException:
                os.unlink(tmp)
                raise
            finally:
                os.close(fd)
            os.chmod(tmp, (n.mode & 0o7777) or 0o644)
            os.utime(tmp, ns=(n.mtime_ns, n.mtime_ns))
            os.replace(tmp, up)
            old = self.overlay.get(path)
            origin = old.origin if old is not None else self.lower_path(path)
            self.overlay.put(Row(path, FILE, upper=name, origin=origin))
            chunk_size = getattr(getattr(self.lower, "repo", None), "chunk_size", None)
            if keep_data and chunk_size and not n.upper and n.entry is not None \
                    and n.entry.kind == "f" and n.entry.chunks:
                self.overlay.track(name, n.size, chunk_size, n.entry.chunks)
            return up

    def unlink(self, path: str) -> None:
        with self._lock:
            n = self.lookup(path)
            if n is None:
                raise missing(self, path)
            if n.is_dir:
                raise IsADirectory(path)
            row = self.overlay.get(path)
            with self.overlay.changes(frees=True):
                self._hide_or_drop(path)
            self._discard_upper(row)   # once no row points at it: a failed change keeps it
            self.overlay.refill()

    def mkdir(self, path: str, mode: int) -> None:
        with self._lock:
            self._require_dir(paths.parent_of(path))
            if self.lookup(path) is not None:
                raise Exists(path)
            hides_lower = self._lower_has(path)
            self.overlay.put(Row(path, DIR, opaque=int(hides_lower),
                                 mode=stat_mod.S_IMODE(mode) or 0o755,
                                 mtime_ns=time.time_ns()))

    def rmdir(self, path: str) -> None:
        with self._lock:
            n = self.lookup(path)
            if n is None:
                raise missing(self, path)
            if not n.is_dir:
                raise NotADirectory(path)
            if path == "":
                raise NotPermitted("cannot remove the root")
            if self.listdir(path):
                raise NotEmpty(path)
            with self.overlay.changes(frees=True):
                for row in self.overlay.under(path):   # whiteouts left inside
                    self.overlay.drop(row.path)
                self._hide_or_drop(path)
            self.overlay.refill()

    def symlink(self, path: str, target: str) -> None:
        with self._lock:
            self._require_dir(paths.parent_of(path))
            if self.lookup(path) is not None:
                raise Exists(path)
            self.overlay.put(Row(path, LINK, target=target, mtime_ns=time.time_ns()))

    def rename(self, old: str, new: str, *, noreplace: bool = False) -> None:
        with self._lock:
            # Linux resolves both parent folders before looking at the source itself
            self._require_dir(paths.parent_of(old))
            self._require_dir(paths.parent_of(new))
            src = self.lookup(old)
            if src is None:
                raise missing(self, old)
            if paths.is_under(new, old) and new != old:
                raise InvalidArgument(f"cannot move {old} into itself")
            if paths.is_under(old, new) and new != old:
                raise NotEmpty(new)   # onto one of its own ancestors (Linux says ENOTEMPTY)
            if old == new:
                return
            dst = self.lookup(new)
            if dst is not None and noreplace:
                raise Exists(new)
            replaced = None
            if dst is not None:
                if dst.is_dir and not src.is_dir:
                    raise IsADirectory(new)
                if src.is_dir and not dst.is_dir:
                    raise NotADirectory(new)
                if dst.is_dir and self.listdir(new):
                    raise NotEmpty(new)
                replaced = self.overlay.get(new)
            # a lower file keeps pointing at the same blobs (no copy-up); its row (made
            # before the batch: it may copy up bytes of a generation being committed)
            # travels to the new path, as an upper file's does
            moved = None if src.is_dir else _with(self._meta_row(old), path=new)
            with self.overlay.changes(frees=replaced is not None):   # all of it, or none
                if dst is not None:
                    for row in self.overlay.under(new):
                        self.overlay.drop(row.path)
                if moved is None:
                    self._rename_dir(old, new, src)
                else:
                    self.overlay.drop(old)
                    self._hide_or_drop(old)
                    self.overlay.put(moved)
            self._discard_upper(replaced)
            self.overlay.refill()

    def _rename_dir(self, old: str, new: str, src: Node) -> None:
        lower_src = self.lower_path(old)
        has_lower = lower_src is not None and self.lower.lookup(lower_src) is not None
        row = self.overlay.get(old)
        inner = self.overlay.under(old)
        for r in inner:
            self.overlay.drop(r.path)
        self.overlay.drop(old)
        self._hide_or_drop(old)
        mode = row.mode if row is not None and row.mode is not None else src.mode
        self.overlay.put(Row(new, DIR, redirect=lower_src if has_lower else None,
                             opaque=0 if has_lower else 1, mode=mode,
                             mtime_ns=src.mtime_ns, origin=lower_src if has_lower else None))
        for r in inner:
            self.overlay.put(Row(new + r.path[len(old):], r.kind, r.upper, r.lower,
                                 r.redirect, r.opaque, r.mode, r.mtime_ns, r.target, r.origin))

    def _meta_row(self, path: str) -> Row:
        """A journal row for `path` that can carry mode/mtime without copying data up."""
        n = self.lookup(path)
        if n is None:
            raise missing(self, path)
        row = self.overlay.get(path)
        if row is not None:
            return row
        if n.upper:
            # bytes of the generation being committed, which has no blobs yet: copy up
            self.copy_up(path)
            return self.overlay.get(path)
        if n.is_dir:
            return Row(path, DIR, mode=n.mode, mtime_ns=n.mtime_ns)
        if n.kind == LINK:
            return Row(path, LINK, target=n.entry.target, mtime_ns=n.mtime_ns,
                       origin=self.lower_path(path))
        return Row(path, n.kind, lower=_entry_json(n.entry), mode=n.mode,
                   mtime_ns=n.mtime_ns, origin=self.lower_path(path))

    def chmod(self, path: str, mode: int) -> None:
        with self._lock:
            row = self._meta_row(path)
            if row.upper:
                os.chmod(self.overlay.upper_path(row.upper), stat_mod.S_IMODE(mode))
            elif row.kind != LINK:
                self.overlay.put(_with(row, mode=stat_mod.S_IMODE(mode)))

    def utimens(self, path: str, mtime_ns: int) -> None:
        with self._lock:
            row = self._meta_row(path)
            if row.upper:
                up = self.overlay.upper_path(row.upper)
                os.utime(up, ns=(os.stat(up).st_atime_ns, mtime_ns))
            else:
                self.overlay.put(_with(row, mtime_ns=mtime_ns))

    def truncate(self, path: str, length: int) -> str:
        with self._lock:
            up = self.copy_up(path, keep_data=length > 0)
            name = os.path.basename(up)
            self.overlay.begin_change(name)
            try:
                self.overlay.untrack(name)
                os.truncate(up, length)
            finally:
                self.overlay.end_change(name)
            return up

    def note_write(self, upper_file: str, offset: int, length: int) -> None:
        """A write through an open upper file is about to change these bytes; the
        caller calls `change_done` once it has."""
        name = os.path.basename(upper_file)
        self.overlay.begin_change(name)
        self.overlay.note_write(name, offset, length)

    def note_truncate(self, upper_file: str) -> None:
        """An open upper file is about to be truncated; `change_done` follows."""
        name = os.path.basename(upper_file)
        self.overlay.begin_change(name)
        self.overlay.untrack(name)

    def change_done(self, upper_file: str) -> None:
        self.overlay.end_change(os.path.basename(upper_file))

    def settled(self, upper_file: str) -> None:
        """The last writer of this upper file closed it."""
        self.overlay.settled(os.path.basename(upper_file))


RESERVE = 8 << 20         # bytes kept aside on the overlay's disk for its journal: more than its
                          # WAL grows to (1000 pages, then checkpoints reuse it)


def _fill_reserve(path: Path) -> bool:
    """Keep RESERVE bytes on the overlay's disk (allocated, not sparse); False if there
    is no room for them now."""
    try:
        if path.stat().st_size == RESERVE:
            return True
    except FileNotFoundError:
        pass
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _with(row: Row, **changes) -> Row:
    d = asdict(row)
    d.update(changes)
    return Row(**d)
