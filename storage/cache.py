"""The local unit cache: verified, content-addressed units (a chunk, or a small file's
bytes) shared by every mount and command of a user (DESIGN.md, "The mount").

    units/<aa>/<sha256>     one file per unit, named by the sha256 of its bytes
    files/<aa>/<key>        whole files: a multi-chunk file read from start to end, its
                            chunks assembled in place (key: the sha256 of its chunk list)
    index.db                SQLite (WAL): unit -> size, last access; chunk -> the whole
                            file holding it and where (`parts`); shared by processes

A whole file is what lets the mount hand a cached file to the kernel (FUSE passthrough:
later reads never reach the mount process). It is built beside the chunk units while a
reader goes through the file (`WholeFile`: every chunk verified, written at its offset
into a temp file, renamed in once complete); the file's chunk units are then dropped,
since the whole file serves their bytes: to any reader of those chunks, in any file or
version that shares them (`parts` says where each chunk is; a chunk written into a whole
copy still being built is read from its temp file). Its index row is `file-<key>`;
eviction treats it as one unit, and drops its `parts` rows with it.

A unit is fetched through a caller-supplied function (the cache knows nothing of
backends), checked against its name, refetched once on a mismatch, and only then handed
out and written (temp file + rename). Bad bytes are never stored or returned.

Concurrency model: `read` may be called from many threads. One fetch per unit at a time
(singleflight): the first caller downloads, the others wait on its future, which carries
the verified bytes; the disk write happens afterwards on a small writer pool, and until
it lands the unit is served from a bounded in-memory map (`_hot`; units a sequential
reader went past leave it first, `passed`). Units being
fetched are pinned (a per-unit counter) and never evicted by this process. Readers read
unit files through descriptors (kept open per stream by `UnitFiles`); an eviction, here
or in another process, may unlink a unit someone holds open, which Linux allows without
disturbing the descriptor or its (verified, immutable) bytes.
Lock order: `_lock` (in-memory state) is never held while fetching, doing file I/O or
touching SQLite; SQLite has its own connection per thread.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from strata.storage import directio
from strata.storage.errors import Corrupt, Unreachable

log = logging.getLogger("strata.cache")

WHOLE = "file-"             # index id prefix of whole files
TOUCH_INTERVAL = 30.0      # seconds between access-time updates of one unit in the index
PASSED_KEEP = 32 << 20     # bytes of units a sequential reader went past kept in memory
WRITE_BACKLOG = 64 << 20   # bytes fetched and not yet on disk beyond which readahead waits
# seconds a unit whose fetch found the store unreachable fails again at once: the kernel
# sends a failed read again straight away (its readahead, then the read itself), and each
# would wait out the whole retry budget against a stalled store
FAILURE_MEMORY = 1.0
EVICT_BATCH = 256
T = TypeVar("T")


def on_file(path: str, op: Callable[[int], T]) -> T | None:
    """`op(fd)` on the file at `path` opened for reading, or None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return op(fd)
    finally:
        os.close(fd)


def read_verified(path: str, unit: str, size: int, offset: int = 0) -> bytes | None:
    """The `size` bytes at `offset` of the file at `path` if their sha256 is `unit`; None
    if the file is missing or they are not the unit's bytes."""
    data = on_file(path, lambda fd: os.pread(fd, size, offset))
    return data if data is not None and hashlib.sha256(data).hexdigest() == unit else None


def whole_key(chunks: bytes) -> str:
    """The name of a multi-chunk file's whole copy: the sha256 of its chunk list (the
    chunk ids' 32-byte digests one after the other), so equal files share one copy."""
    return hashlib.sha256(chunks).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    fetches: int = 0
    corrupt: int = 0
    evicted: int = 0
    throttled: int = 0   # times readahead waited for the disk writes (`write_backlog`)


def copy_range(src: int, dst: int, size: int, dst_offset: int, src_offset: int = 0) -> int:
    """Copy `size` bytes of descriptor `src` from `src_offset` into `dst` at `dst_offset`,
    inside the kernel (copy_file_range) or through memory where it cannot (EXDEV,
    ENOSYS...). Returns the bytes copied: fewer only if `src` is shorter."""
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(src, dst, size - done, src_offset + done,
                                   dst_offset + done)
        except OSError:
            n = 0
        if n == 0:
            data = os.pread(src, min(size - done, 8 << 20), src_offset + done)
            if not data:
                break
            n = os.pwrite(dst, data, dst_offset + done)
        done += n
    return done


class _Pin:
    __slots__ = ("cache", "unit")

    def __init__(self, cache: UnitCache, unit: str):
        self.cache, self.unit = cache, unit

    def __enter__(self) -> None:
        self.cache._pin(self.unit)

    def __exit__(self, *exc) -> None:
        self.cache._unpin(self.unit)


class _Slot:
    __slots__ = ("fd", "users")

    def __init__(self, fd: int):
        self.fd, self.users = fd, 1


class UnitFiles:
    """Descriptors of cached unit files that one reader (a file handle's stream) keeps
    open across its reads: a sequential reader opens each unit once, and the kernel's
    readahead state on the descriptor carries over from one request to the next.

    Several FUSE threads may read through one handle at once, so a descriptor is closed
    only when no pread uses it (`users`): a number closed under a running pread could be
    reused by another open and read another file's bytes. The `keep` most recently used
    idle descriptors stay open. A unit evicted (unlinked) while open still reads its
    verified bytes through the descriptor."""

    def __init__(self, keep: int = 2):
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._keep = keep
        self._closed = False

    def use(self, unit: str, path: str, op: Callable[[int], T]) -> T | None:
        """`op(fd)` on the unit file's descriptor, or None if the file is not on disk."""
        slot = self._acquire(unit, path)
        if slot is None:
            return None
        try:
            return op(slot.fd)
        finally:
            self._release(slot)

    def _acquire(self, unit: str, path: str) -> _Slot | None:
        with self._lock:
            slot = self._slots.get(unit)
            if slot is not None:
                slot.users += 1
                self._slots.move_to_end(unit)
                return slot
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with self._lock:
            slot = self._slots.get(unit)
            if slot is None and not self._closed:
                slot = self._slots[unit] = _Slot(fd)
                fd = -1
            elif slot is not None:
                slot.users += 1
        if fd != -1:   # another thread opened it first, or we are closed: use ours once
            if slot is None:
                slot = _Slot(fd)
                slot.users = -1   # marks a private slot, closed on release
            else:
                os.close(fd)
        return slot

    def _release(self, slot: _Slot) -> None:
        if slot.users == -1:
            os.close(slot.fd)
            return
        with self._lock:
            slot.users -= 1
            idle = [u for u, s in self._slots.items() if not s.users]
            extra = len(self._slots) - (0 if self._closed else self._keep)
            victims = [self._slots.pop(u).fd for u in idle[:max(0, extra)]]
        for fd in victims:
            os.close(fd)

    def close(self) -> None:
        """Close every descriptor no read is using; busy ones close when their read ends."""
        with self._lock:
            self._closed = True
            victims = [self._slots.pop(u).fd for u, s in list(self._slots.items())
                       if not s.users]
        for fd in victims:
            os.close(fd)


class UnitCache:
    def __init__(self, root: str | os.PathLike, limit: int, *, passed_keep: int = PASSED_KEEP,
                 write_backlog: int = WRITE_BACKLOG):
        self.root = Path(root)
        self.units = self.root / "units"
        self._units = str(self.units)
        self.units.mkdir(parents=True, exist_ok=True)
        self.files = self.root / "files"
        self._files = str(self.files)
        self.files.mkdir(exist_ok=True)
        self._builders: dict[str, WholeFile] = {}
        self._wanted: dict[str, list[tuple[WholeFile, int]]] = {}   # chunk -> builders
        self._superseded: set[str] = set()   # units to drop once written (whole files)
        self.limit = int(limit)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._failed: dict[str, tuple[float, Unreachable]] = {}   # unit -> (when, error)
        self._pins: dict[str, int] = {}
        self._touched: dict[str, float] = {}
        self._local = threading.local()
        # verified units kept in memory: waiters are released before the disk write, and
        # units not yet on disk stay here until they are (bounded by bytes otherwise)
        self._hot: OrderedDict[str, bytes] = OrderedDict()
        self._hot_bytes = 0
        self._hot_limit = max(16 << 20, min(self.limit // 8, 256 << 20))
        # hot units a sequential reader went past (`passed`), in that order: dropped first
        self._passed: OrderedDict[str, int] = OrderedDict()
        self._passed_bytes = 0
        self._passed_keep = passed_keep
        self._writing: set[str] = set()
        self._backlog = 0   # bytes of the units in `_writing`
        self._backlog_limit = write_backlog
        self._drained = threading.Condition(self._lock)   # the backlog or the jobs went down
        self._closing = False
        self._writer = ThreadPoolExecutor(2, thread_name_prefix="strata-cache-writer")
        self._jobs = 0   # writer jobs submitted and not finished (`flush` waits for none)
        self._since_check = 0
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS units("
                       "id TEXT PRIMARY KEY, size INTEGER NOT NULL, atime REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS units_atime ON units(atime)")
            # chunks whose bytes a whole file holds (its own unit file dropped): where
            db.execute("CREATE TABLE IF NOT EXISTS parts(unit TEXT NOT NULL, "
                       "whole TEXT NOT NULL, offset INTEGER NOT NULL, "
                       "size INTEGER NOT NULL, PRIMARY KEY (unit, whole))")
            db.execute("CREATE INDEX IF NOT EXISTS parts_whole ON parts(whole)")

    # ---- SQLite, one connection per thread -------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.root / "index.db"), timeout=60,
                                 isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def path_of(self, unit: str) -> Path:
        return Path(self._file(unit))

    def _file(self, unit: str) -> str:
        # a string, not a Path: this runs on every read
        if unit.startswith(WHOLE):
            key = unit[len(WHOLE):]
            return f"{self._files}/{key[:2]}/{key}"
        return f"{self._units}/{unit[:2]}/{unit}"

    def local_file(self, unit: str, size: int) -> str | None:
        """The path of the cached file holding exactly the `size` bytes of `unit` (a unit,
        or WHOLE + key for a whole file), or None. Counts as an access."""
        path = self._file(unit)
        try:
            if os.stat(path).st_size != size:
                return None
        except FileNotFoundError:
            return None
        with self._lock:
            self.stats.hits += 1
        self._touch(unit)
        return path

    # ---- the one entry point for readers ----------------------------------------------
    def read(self, unit: str, offset: int, size: int, fetch: Callable[[], bytes],
             what: str = "", files: UnitFiles | None = None) -> bytes:
        """`size` bytes at `offset` of the unit named `unit`, fetching it if absent.
        A reader that passes its `files` keeps the unit's descriptor open for its next
        reads instead of opening the unit file per request."""
        def op(fd: int, base: int, length: int | None) -> bytes:
            n = size if length is None else max(0, min(size, length - offset))
            return os.pread(fd, n, base + offset)
        data, got = self._lookup(unit, files, op, fetch, what)
        return got if data is None else data[offset:offset + size]

    def read_view(self, unit: str, offset: int, buf: memoryview, fetch: Callable[[], bytes],
                  what: str = "", files: UnitFiles | None = None) -> memoryview:
        """Up to len(buf) bytes at `offset` of the unit (fewer only where it ends): read
        from its file into `buf`, or, when the unit is in memory, a view of that memory
        itself (no copy: the FUSE reply is written from it)."""
        def op(fd: int, base: int, length: int | None) -> int:
            part = buf if length is None else buf[:max(0, length - offset)]
            return os.preadv(fd, [part], base + offset)
        data, n = self._lookup(unit, files, op, fetch, what)
        if data is None:
            return buf[:n]
        return memoryview(data)[offset:offset + len(buf)]

    def _lookup(self, unit: str, files: UnitFiles | None,
                op: Callable[[int, int, int | None], T], fetch: Callable[[], bytes],
                what: str) -> tuple[bytes | None, T | None]:
        """The unit's bytes when they are in memory or had to be fetched: (data, None);
        else `op(fd, base, size)` done on the file that holds them: (None, result). A
        unit file holds them from 0 (size None: the file's); a whole file holding the
        unit as one of its chunks (`_part`) from `base`, `size` bytes."""
        data = self._hot_get(unit)
        if data is None:
            def use(key: str, path: str, base: int, size: int | None) -> T | None:
                if files is not None:
                    return files.use(key, path, lambda fd: op(fd, base, size))
                return on_file(path, lambda fd: op(fd, base, size))
            got, touched = use(unit, self._file(unit), 0, None), unit
            if got is None:   # a whole file holding it: one being built (renamed in
                for building in (True, False):   # meanwhile: the index has it), or indexed
                    part = self._part(unit, building)
                    if part is None:
                        break
                    path, base, size, touched = part
                    got = use(path, path, base, size)
                    if got is not None or touched is not None:
                        break
            if got is not None:
                with self._lock:
                    self.stats.hits += 1
                if touched is not None:
                    self._touch(touched)
                return None, got
            with self.pinned(unit):
                data = self._fetch_once(unit, fetch, what)
        else:
            with self._lock:
                self.stats.hits += 1
        return data, None

    def _part(self, unit: str, building: bool = True) -> tuple[str, int, int, str | None] | None:
        """(path, offset, size, index id) of a whole file that holds this chunk's bytes:
        one being built in this process with the chunk written in (`WholeFile`; no index
        id yet), or a complete one (`parts` in the index, written by any process). The
        chunk's own unit file was dropped once the whole file was complete, or never
        written: a chunk taken by a whole copy is written there only."""
        with self._lock:
            builders = list(self._builders.values()) if building else []
        for builder in builders:
            at = builder.written_at(unit)
            if at is not None:
                return builder.tmp, at[0], at[1], None
        row = self._db().execute("SELECT whole, offset, size FROM parts WHERE unit=? "
                                 "LIMIT 1", (unit,)).fetchone()
        return None if row is None else (self._file(row[0]), row[1], row[2], row[0])

    def ensure(self, unit: str, fetch: Callable[[], bytes], what: str = "") -> None:
        """Make sure the unit is cached (used by readahead). A unit already on disk is
        handed to the kernel's readahead instead (POSIX_FADV_WILLNEED), so a reader of
        cached units finds their pages in memory when it gets there."""
        with self._lock:
            if unit in self._hot or unit in self._writing:
                return
        if self._advise(unit):
            return
        self._wait_for_disk()
        with self.pinned(unit):
            self._fetch_once(unit, fetch, what)

    def _wait_for_disk(self) -> None:
        """Hold readahead while more than `write_backlog` bytes of fetched units wait for
        their disk write: each is kept in memory until it is written, so a cache disk
        slower than the network (or a writer short of CPU) would otherwise have the
        mount's memory grow with every chunk fetched ahead (a cold 1 GiB read peaked at
        470-700 MB in runs where the writes fell behind). A reader's own fetches never
        wait: readahead then runs at the disk's pace, not past it."""
        with self._lock:
            if self._backlog <= self._backlog_limit or self._closing:
                return
            self.stats.throttled += 1
            while self._backlog > self._backlog_limit and not self._closing:
                self._drained.wait()

    def _advise(self, unit: str) -> bool:
        def willneed(path: str, base: int, size: int) -> bool:
            return on_file(path, lambda fd: os.posix_fadvise(
                fd, base, size, os.POSIX_FADV_WILLNEED) or True) is not None
        if willneed(self._file(unit), 0, 0):
            return True
        part = self._part(unit)
        return part is not None and willneed(*part[:3])

    def copy_into(self, unit: str, size: int, dst: int, offset: int,
                  fetch: Callable[[], bytes], what: str = "") -> None:
        """Write the unit's `size` bytes into descriptor `dst` at `offset` (a copy-up):
        from memory, from the unit file (copy_file_range: no bytes pass through Python),
        or fetched and verified but not stored here: the destination is the copy, and a
        whole file copied up would otherwise push other units out of the cache."""
        data = self._hot_get(unit)
        if data is None and self._copy_file(unit, size, dst, offset):
            with self._lock:
                self.stats.hits += 1
            return
        if data is None:
            with self._lock:
                fut = self._inflight.get(unit)
            data = fut.result() if fut is not None else self._fetch_verified(unit, fetch, what)
        if len(data) != size:
            raise Corrupt(what or unit, f"unit has {len(data)} bytes, expected {size}")
        view = memoryview(data)
        while view:
            view = view[os.pwrite(dst, view, offset + len(data) - len(view)):]

    def _copy_file(self, unit: str, size: int, dst: int, offset: int) -> bool:
        # a short unit file is not this unit's bytes: the caller fetches them instead
        if on_file(self._file(unit), lambda src: os.fstat(src).st_size == size
                   and copy_range(src, dst, size, offset) == size):
            return True
        part = self._part(unit)
        return part is not None and part[2] == size and on_file(
            part[0], lambda src: copy_range(src, dst, size, offset, part[1]) == size) is True

    def contains(self, unit: str) -> bool:
        with self._lock:
            if unit in self._hot or unit in self._writing:
                return True
        return os.path.exists(self._file(unit)) or self._part(unit) is not None

    def pinned(self, unit: str) -> _Pin:
        """A context in which this process does not evict `unit`."""
        return _Pin(self, unit)

    def _pin(self, unit: str) -> None:
        with self._lock:
            self._pins[unit] = self._pins.get(unit, 0) + 1

    def _unpin(self, unit: str) -> None:
        with self._lock:
            n = self._pins[unit] - 1
            if n:
                self._pins[unit] = n
            else:
                del self._pins[unit]

    # ---- fetching: one download per unit, verified, handed out from memory ------------
    def in_memory(self) -> list[str]:
        """The units whose bytes are in memory, the next to leave first."""
        with self._lock:
            return list(dict.fromkeys([*self._passed, *self._hot]))

    def _hot_get(self, unit: str) -> bytes | None:
        with self._lock:
            data = self._hot.get(unit)
            if data is not None:
                self._hot.move_to_end(unit)
            return data

    def _hot_put(self, unit: str, data: bytes) -> None:
        with self._lock:
            self._hot[unit] = data
            self._hot_bytes += len(data)
            if self._hot_bytes <= self._hot_limit:
                return
            # units readers went past leave first, then the least recently used
            for old in [*self._passed, *self._hot]:
                if old != unit and old not in self._writing:   # (on its way to disk:
                    self._hot_drop(old)                        # kept servable)
                if self._hot_bytes <= self._hot_limit:
                    break

    def passed(self, unit: str) -> None:
        """A sequential reader went past this unit: the kernel keeps the pages it read,
        so its bytes need not stay in memory. The last `passed_keep` bytes of such units
        stay (a second reader just behind the first finds them there); older ones leave
        once they are on disk, and before any other unit when memory is short: a least
        recently used order would drop the units fetched ahead of the reader first."""
        with self._lock:
            data = self._hot.get(unit)
            if data is None or unit in self._passed:
                return
            self._passed[unit] = len(data)
            self._passed_bytes += len(data)
            self._shed_passed()

    def _shed_passed(self) -> None:
        """Under `_lock`: drop passed units beyond `passed_keep` bytes, oldest first."""
        for old in list(self._passed):
            if self._passed_bytes <= self._passed_keep:
                break
            if old not in self._writing:
                self._hot_drop(old)

    def _hot_drop(self, unit: str) -> None:
        """Under `_lock`: forget a unit's bytes in memory."""
        data = self._hot.pop(unit, None)
        if data is not None:
            self._hot_bytes -= len(data)
        size = self._passed.pop(unit, None)
        if size is not None:
            self._passed_bytes -= size

    def _fetch_once(self, unit: str, fetch: Callable[[], bytes], what: str) -> bytes:
        with self._lock:
            fut = self._inflight.get(unit)
            leader = fut is None
            if leader:
                fut = Future()
                self._inflight[unit] = fut
                self.stats.misses += 1
        if not leader:
            return fut.result()
        try:
            data = self._hot_get(unit)
            if data is None:
                try:   # a previous leader may have stored it between our miss and our lead
                    with open(self._file(unit), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    data = self._fetch_verified(unit, fetch, what)
                    with self._lock:
                        self._writing.add(unit)
                        self._backlog += len(data)
                    self._hot_put(unit, data)
                    # readers are served from memory now; the disk copy follows
                    try:
                        self._submit(self._store_pending, unit, data)
                    except RuntimeError:   # the cache is closing: served, not stored
                        self._written(unit, len(data))
            fut.set_result(data)
            return data
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._inflight.pop(unit, None)

    def _fetch_verified(self, unit: str, fetch: Callable[[], bytes], what: str) -> bytes:
        with self._lock:
            failed = self._failed.get(unit)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY:
            raise Unreachable(failed[1].url, failed[1].detail)   # a new one per raise
        try:
            return self._fetch_verified_now(unit, fetch, what)
        except Unreachable as e:   # retries used up: a store down or stalled
            with self._lock:
                if len(self._failed) >= 1024:
                    self._failed.clear()
                self._failed[unit] = (time.monotonic(), e)
            raise

    def _fetch_verified_now(self, unit: str, fetch: Callable[[], bytes], what: str) -> bytes:
        for _ in range(2):
            data = fetch()
            with self._lock:
                self.stats.fetches += 1
                self.stats.bytes_fetched += len(data)
            if hashlib.sha256(data).hexdigest() == unit:
                return data
            with self._lock:
                self.stats.corrupt += 1
        raise Corrupt(what or unit, "corrupt bytes (sha256 mismatch after a refetch); "
                                    "not served, not cached")

    def _store_pending(self, unit: str, data: bytes) -> None:
        try:
            # whole files waiting for this unit take it while it still counts as on its
            # way (`_arriving`: a reader done meanwhile does not abandon them); one that
            # takes it keeps it instead of a unit file (one disk write, not two)
            with self._lock:
                wanted = self._wanted.pop(unit, ())
            taken = [builder.take(idx, data) for builder, idx in wanted]
            if not any(taken):
                self.store(unit, data)
        except Exception as e:  # noqa: BLE001 - a full disk must not break reads
            log.warning("could not cache unit %s: %s", unit, e)
        finally:
            self._written(unit, len(data))

    def _written(self, unit: str, size: int) -> None:
        """A unit's disk write is over (done, failed or given up)."""
        with self._lock:
            self._writing.discard(unit)
            self._backlog -= size
            self._drained.notify_all()
            drop = unit in self._superseded
            self._superseded.discard(unit)
            if unit in self._passed:
                self._shed_passed()
        if drop:
            self.discard({unit})

    def _submit(self, job: Callable[..., None], *args) -> None:
        """Run `job(*args)` on the writer pool (RuntimeError once it is shut down)."""
        def run() -> None:
            try:
                job(*args)
            finally:
                with self._lock:
                    self._jobs -= 1
                    self._drained.notify_all()
        with self._lock:
            self._jobs += 1
        try:
            self._writer.submit(run)
        except BaseException:
            with self._lock:
                self._jobs -= 1
            raise

    def flush(self) -> None:
        """Wait until every fetched unit is on disk and every writer job is over (whole
        copies fed, completed and indexed, or abandoned)."""
        with self._lock:
            while self._writing or self._jobs:
                self._drained.wait()

    def store(self, unit: str, data: bytes) -> None:
        """Write a verified unit (the caller has checked its hash)."""
        def write(path: Path) -> None:
            tmp = path.parent / f".{unit}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                os.close(directio.create(str(tmp), data, exclusive=False))  # past the cache
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self._place(unit, len(data), write)

    def adopt(self, unit: str, path: str, size: int) -> None:
        """Make the file at `path`, whose first `size` bytes are the verified unit, that
        unit's file: cut to `size` and renamed in (same filesystem), not copied."""
        def move(dest: Path) -> None:
            os.truncate(path, size)
            os.replace(path, dest)
        self._place(unit, size, move)

    def _place(self, unit: str, size: int, put: Callable[[Path], None]) -> None:
        path = self.path_of(unit)
        path.parent.mkdir(exist_ok=True)
        # index first: a crash then leaves a row without a file, which eviction tolerates
        self._db().execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?)",
                           (unit, size, time.time()))
        put(path)
        with self._lock:
            self._since_check += size
            check = self._since_check >= max(1, min(self.limit // 16, 64 << 20))
            if check:
                self._since_check = 0
        if check:
            self.evict()

    def _touch(self, unit: str) -> None:
        now = time.time()
        with self._lock:
            if now - self._touched.get(unit, 0.0) < TOUCH_INTERVAL:
                return
            self._touched[unit] = now
            if len(self._touched) > 100_000:
                self._touched.clear()
        self._db().execute("UPDATE units SET atime=? WHERE id=?", (now, unit))

    # ---- whole files ------------------------------------------------------------------
    def assemble(self, key: str, size: int, chunk_ids: list[str],
                 chunk_size: int) -> WholeFile | None:
        """Start (or join) building the whole file `key` from its chunks while a reader
        goes through it, once it found no whole copy (`local_file`); the caller calls
        `release()` on the result when it is done with the file. None for a file larger
        than a quarter of the cache (it would push everything else out)."""
        if size > self.limit // 4:
            return None
        with self._lock:
            builder = self._builders.get(key)
            if builder is not None:
                builder.users += 1
                return builder
        try:
            builder = WholeFile(self, key, size, chunk_ids, chunk_size)
        except OSError as e:
            log.warning("could not start a whole copy of %s in the cache: %s", key, e)
            return None
        with self._lock:
            other = self._builders.get(key)
            if other is None:
                self._builders[key] = builder
                for idx, unit in enumerate(chunk_ids):   # first: no store slips past
                    self._wanted.setdefault(unit, []).append((builder, idx))
            else:
                other.users += 1
        if other is not None:
            builder.abandon()
            return other
        self._submit(self._feed, builder)   # off the reader's first read
        return builder

    def _feed(self, builder: WholeFile) -> None:
        """Give a new whole file the chunks the cache has already, from memory or read
        back from their files; those still on their way to disk come with their store
        (`_wanted`), so that the whole file is not complete before them and they are
        dropped with the rest."""
        for idx, unit in enumerate(builder.ids):   # all queued until here (`WholeFile`)
            with self._lock:
                skip = unit in self._writing or unit in self._inflight
                data = None if skip else self._hot.get(unit)
            if skip:
                builder.unqueue(idx)
            elif data is not None:
                self._submit(builder.put, idx, data)
            elif os.path.exists(self._file(unit)) or self._part(unit) is not None:
                self._submit(builder.copy_unit, idx, unit)
            else:
                builder.unqueue(idx)
        builder.settle()   # its readers may be gone already

    def _arriving(self, units: list[str]) -> bool:
        with self._lock:
            return all(u in self._writing or u in self._inflight for u in units)

    def _forget_builder(self, builder: WholeFile) -> None:
        with self._lock:
            if self._builders.get(builder.key) is builder:
                del self._builders[builder.key]
            for unit in set(builder.ids):
                left = [w for w in self._wanted.get(unit, ()) if w[0] is not builder]
                if left:
                    self._wanted[unit] = left
                else:
                    self._wanted.pop(unit, None)

    def _add_whole(self, builder: WholeFile) -> None:
        """A whole file is complete at `builder.tmp`: rename it in, index it, and drop its
        chunk units (the whole file serves their bytes from now on)."""
        unit = WHOLE + builder.key
        path = self._file(unit)
        db = self._db()
        db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?)",
                   (unit, builder.size, time.time()))
        db.executemany("INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?)",
                       [(chunk, unit, *builder.span(idx))
                        for idx, chunk in enumerate(builder.ids)])
        os.replace(builder.tmp, path)
        builder.installed = True     # its readers go on from the whole file
        self._forget_builder(builder)
        self.discard(set(builder.ids))
        for chunk in builder.ids:    # nor need its chunks stay in memory
            self.passed(chunk)
        with self._lock:
            self._since_check += builder.size
        self.evict()

    def discard(self, units: set[str]) -> None:
        """Remove these units from the cache, except any this process is using (a unit
        still being written is removed once it is on disk)."""
        db = self._db()
        for unit in units:
            with self._lock:
                if unit in self._writing or unit in self._inflight:
                    self._superseded.add(unit)
                    continue
                if unit in self._pins:
                    continue
            # its bytes may stay in memory (`_hot`): a reader between the two copies
            # finds them there instead of fetching them again
            self._unlink(db, unit)

    def _unlink(self, db: sqlite3.Connection, unit: str) -> None:
        """Remove a unit's index row and its file (the row first: a crash leaves a file
        without a row, which `reconcile` indexes again)."""
        db.execute("DELETE FROM units WHERE id=?", (unit,))
        if unit.startswith(WHOLE):
            db.execute("DELETE FROM parts WHERE whole=?", (unit,))
        try:
            os.unlink(self._file(unit))
        except FileNotFoundError:
            pass

    # ---- size limit -------------------------------------------------------------------
    def usage(self) -> tuple[int, int]:
        """(units, bytes) according to the index."""
        n, total = self._db().execute("SELECT count(*), coalesce(sum(size), 0) FROM units") \
            .fetchone()
        return n, total

    def whole_usage(self) -> tuple[int, int]:
        """(whole files, bytes) according to the index: the part of `usage` that the
        kernel can read by itself (docs/semantics.md)."""
        return self._db().execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM units WHERE id >= ? AND id < ?",
            (WHOLE, WHOLE[:-1] + chr(ord(WHOLE[-1]) + 1))).fetchone()

    def evict(self, limit: int | None = None) -> int:
        """Remove least recently used units until the cache fits `limit` (default: its
        limit). Units pinned by this process are kept. Returns bytes freed."""
        limit = self.limit if limit is None else limit
        db = self._db()
        _, total = self.usage()
        freed = 0
        skip: set[str] = set()
        while total - freed > limit:
            rows = db.execute("SELECT id, size FROM units ORDER BY atime LIMIT ?",
                              (EVICT_BATCH + len(skip),)).fetchall()
            rows = [r for r in rows if r[0] not in skip]
            if not rows:
                break
            for unit, size in rows:
                if total - freed <= limit:
                    break
                with self._lock:
                    if unit in self._pins or unit in self._inflight or unit in self._writing:
                        skip.add(unit)
                        continue
                with self._lock:
                    self._hot_drop(unit)
                self._unlink(db, unit)
                freed += size
                with self._lock:
                    self.stats.evicted += 1
        return freed

    def clear(self) -> int:
        return self.evict(0) + self._sweep_temps()

    def verify(self) -> tuple[int, int, list[str], int]:
        """Hash every unit again against its name, and every whole copy chunk by chunk
        (`parts`): bytes verified when stored can rot on disk or be torn by a crash, and
        a cached unit is served without being hashed again (a whole copy is read by the
        kernel itself). Damaged ones are removed: the next read fetches them again.
        Returns (units checked, their bytes, damaged ids, whole copies not checkable:
        made before `parts` was kept)."""
        db = self._db()
        rows = db.execute("SELECT id, size FROM units").fetchall()
        damaged, unchecked = [], 0
        for unit, size in rows:
            path = self._file(unit)
            if unit.startswith(WHOLE):
                parts = db.execute("SELECT unit, offset, size FROM parts WHERE whole=?",
                                   (unit,)).fetchall()
                if not parts:
                    unchecked += 1
                    continue
                intact = on_file(path, lambda fd: os.fstat(fd).st_size) == size and all(
                    read_verified(path, u, n, off) is not None for u, off, n in parts)
            else:
                intact = read_verified(path, unit, size) is not None
            if not intact:
                damaged.append(unit)
                with self._lock:
                    self._hot_drop(unit)
                self._unlink(db, unit)
        return len(rows), sum(size for _, size in rows), damaged, unchecked

    def _sweep_temps(self) -> int:
        """Delete temp files (`.NAME.PID.TID.tmp`) whose process is gone (a crash, kill
        -9), or an hour old; returns their bytes. Those of live processes are being
        written."""
        freed = 0
        for folder in (self.units, self.files):
            for sub in folder.iterdir() if folder.is_dir() else ():
                for f in sub.iterdir() if sub.is_dir() else ():
                    if not (f.name.startswith(".") and f.name.endswith(".tmp")):
                        continue
                    pid = f.name.rsplit(".", 3)[-3]
                    try:
                        st = f.stat()
                        if (not pid.isdigit() or not os.path.exists(f"/proc/{pid}")
                                or time.time() - st.st_mtime > 3600):
                            f.unlink()
                            freed += st.st_size
                    except FileNotFoundError:
                        pass
        return freed

    def reconcile(self) -> tuple[int, int]:
        """Bring the index and the folder back in line after crashes: index files that
        have no row, drop rows whose file is gone. Returns (added, dropped)."""
        db = self._db()
        known = {r[0] for r in db.execute("SELECT id FROM units")}
        self._sweep_temps()   # left by crashes
        present = {}
        for folder, prefix in ((self.units, ""), (self.files, WHOLE)):
            for sub in folder.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if not f.name.startswith("."):
                        present[prefix + f.name] = f.stat()
        added = [(u, st.st_size, st.st_atime) for u, st in present.items() if u not in known]
        dropped = [(u,) for u in known if u not in present]
        db.executemany("INSERT OR REPLACE INTO units VALUES (?, ?, ?)", added)
        db.executemany("DELETE FROM units WHERE id=?", dropped)
        db.execute("DELETE FROM parts WHERE whole NOT IN (SELECT id FROM units)")
        return len(added), len(dropped)

    def close(self) -> None:
        with self._lock:
            self._closing = True          # readahead waiting for the disk goes on
            self._drained.notify_all()
        self._writer.shutdown(wait=True)
        with self._lock:
            builders = list(self._builders.values())
        for builder in builders:   # readers that never released theirs: no temp left
            builder.abandon()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


class WholeFile:
    """One multi-chunk file being assembled in the cache (`UnitCache.assemble`): each
    chunk, once verified, is written at its offset of a temp file (past the page cache);
    when the last one is in, the file is renamed into files/ and indexed. Chunks arrive
    from memory as they are fetched (`put`) or are read back from their unit files
    (`copy_unit`, verified again). A builder whose readers are all gone before it is
    complete, with chunks still lacking that nothing brings, is abandoned: the chunks
    only its temp file holds are stored as unit files, and the temp file removed."""

    def __init__(self, cache: UnitCache, key: str, size: int, ids: list[str],
                 chunk_size: int):
        self.cache, self.key, self.size, self.ids = cache, key, size, ids
        self.chunk_size = chunk_size
        self.missing = set(range(len(ids)))
        self.users = 1
        self.writes = 0            # puts in progress
        self.state = "building"    # then "complete", or "dropped" (abandoned or failed)
        self.installed = False     # complete and renamed into files/
        self.taken: set[int] = set()   # chunks this file holds in place of unit files
        # chunks on their way from the cache itself (`UnitCache._feed`, `put`, `copy_unit`)
        self.queued: set[int] = set(range(len(ids)))
        self._places: dict[str, list[int]] = {}   # chunk -> its indexes in the file
        for idx, unit in enumerate(ids):
            self._places.setdefault(unit, []).append(idx)
        self._lock = threading.Lock()
        folder = os.path.join(cache._files, key[:2])
        os.makedirs(folder, exist_ok=True)
        self.tmp = os.path.join(folder, f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)

    def take(self, idx: int, data: bytes) -> bool:
        """`put`, for a chunk the cache does not keep as a unit file if this succeeds:
        should the build be abandoned, it is stored as a unit then (`_remove`)."""
        with self._lock:
            self.taken.add(idx)
        if self.put(idx, data):
            return True
        with self._lock:
            self.taken.discard(idx)
        return False

    def span(self, idx: int) -> tuple[int, int]:
        """(offset, size) of chunk `idx` in the file."""
        offset = idx * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def written_at(self, unit: str) -> tuple[int, int] | None:
        """(offset, size) of chunk `unit` in the temp file, if it is written there."""
        with self._lock:
            if self.state == "dropped" or self.installed:
                return None
            for idx in self._places.get(unit, ()):
                if idx not in self.missing:
                    return self.span(idx)
        return None

    def unqueue(self, idx: int) -> None:
        with self._lock:
            self.queued.discard(idx)

    def put(self, idx: int, data: bytes) -> bool:
        """Write chunk `idx`; whether this call wrote it."""
        with self._lock:
            self.queued.discard(idx)
            if self.state != "building" or idx not in self.missing:
                return False
            self.writes += 1
        ok = False
        try:
            directio.write_at(self.tmp, data, idx * self.chunk_size)
            ok = True
        except OSError as e:
            log.warning("whole copy of %s in the cache abandoned: %s", self.key, e)
        finish = False
        with self._lock:
            self.writes -= 1
            if ok:
                self.missing.discard(idx)
            if self.state == "building":
                if not ok:
                    self.state = "dropped"
                elif not self.missing:
                    self.state = finish = "complete"
            cleanup = self.state == "dropped" and not self.writes
        if finish:
            self._complete()
        elif cleanup:
            self._remove()
        return ok

    def copy_unit(self, idx: int, unit: str) -> None:
        data = read_verified(self.cache._file(unit), unit, self.chunk_size)
        part = None if data is not None else self.cache._part(unit)
        if part is not None:   # another whole file holds it
            data = read_verified(part[0], unit, part[2], part[1])
        if data is not None:
            self.put(idx, data)
        else:   # evicted meanwhile, or damaged: a reader's own fetch may still bring it
            self.unqueue(idx)
            self.settle()

    def _complete(self) -> None:
        try:
            os.truncate(self.tmp, self.size)   # drop the padding of the last block
            self.cache._add_whole(self)
        except Exception as e:  # noqa: BLE001 - a full disk must not break reads
            log.warning("could not add the whole copy of %s to the cache: %s", self.key, e)
            self._remove()

    @property
    def path(self) -> str | None:
        """The whole file's path once it is complete."""
        return self.cache._file(WHOLE + self.key) if self.installed else None

    def release(self) -> None:
        """One reader less. The last one abandons an incomplete build, unless the chunks
        it lacks are all on their way (fetched, being written to the cache, or queued
        from it: a reader is served before the disk write of what it read)."""
        with self._lock:
            self.users -= 1
        self.settle()

    def settle(self) -> None:
        """Abandon the build if no reader has it and a chunk it lacks is not coming."""
        with self._lock:
            if self.users or self.state != "building":
                return
            missing = [self.ids[i] for i in self.missing - self.queued]
        if not self.cache._arriving(missing):
            self.abandon()

    def abandon(self) -> None:
        with self._lock:
            if self.state == "complete":
                return
            self.state = "dropped"
            cleanup = not self.writes   # else the last put still writing cleans up
        self.cache._forget_builder(self)
        if cleanup:   # off the reader's thread: it may store chunks (`_remove`)
            try:
                self.cache._submit(self._remove)
            except RuntimeError:   # the cache is closing
                self._remove()

    def _remove(self) -> None:
        """Drop the temp file, keeping first, as unit files, the chunks only it holds. The
        first chunk (a reader that read a file's start and stopped: a header, `head`)
        becomes its unit by cutting the temp file to it and renaming it, not by reading
        it back and writing it again."""
        self.cache._forget_builder(self)
        with self._lock:
            kept = sorted(self.taken - self.missing)
            self.taken.clear()
        first = kept[:1] == [0]
        try:
            for idx in kept[1:] if first else kept:
                self._keep_unit(idx)
            if first:
                try:
                    self.cache.adopt(self.ids[0], self.tmp, self.span(0)[1])
                    return
                except Exception as e:  # noqa: BLE001 - a full disk: OSError, or SQLite's
                    log.debug("whole copy of %s: first chunk not adopted in place: %s",
                              self.key, e)
                    self._keep_unit(0)
        finally:   # whatever failed above, the temp file goes (adopted, it is gone)
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass

    def _keep_unit(self, idx: int) -> None:
        """Store chunk `idx` as a unit file, read back from the temp file and verified."""
        unit, (offset, size) = self.ids[idx], self.span(idx)
        try:
            data = read_verified(self.tmp, unit, size, offset)
            if data is not None:
                self.cache.store(unit, data)
        except Exception as e:  # noqa: BLE001 - a full disk: OSError, or SQLite's
            log.warning("could not keep chunk %s in the cache: %s", unit, e)
