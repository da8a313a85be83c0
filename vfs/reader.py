"""Reading file bytes for the mount: (offset, size) -> units in the cache, plus readahead.

A small file is one unit: its own bytes, fetched with one ranged read of exactly its
(pack, offset, size) and verified by its sha256. A large file is a run of chunk units,
each a whole blob verified by its id. External links are read by range from their URL.

Readahead: each open file handle keeps a `Stream` (where the last read ended and a
window). A read that starts near where the previous one ended grows the window (1, 2,
4, ... up to `max_window` chunks) and schedules the chunks ahead on a bounded thread
pool: chunks not cached are fetched, chunks already cached are handed to the kernel's
readahead (`UnitCache.ensure`), so a warm sequential reader finds them in memory. A
random read resets it, so random readers fetch only what they touch. A sequential
reader a quarter into chunk i reports chunk i-1 as passed (`UnitCache.passed`): the
kernel keeps the pages it read, so the cache lets that chunk leave memory before the
ones fetched ahead (a cold 1 GiB read peaked at 570 MB of RSS without it, 270 with);
so does a read that gets to the end of a file (`_ended`).
The stream also keeps the descriptors of the units it is reading open (`UnitFiles`),
closed by `close` when the handle is released.

Readahead across small files (`PackWindows`): small files are stored in path order in
packs, so a reader going through a folder (`cp -r`, `tar`, a data loader over a sorted
list) reads pack ranges one after the other. A small file whose range starts at most
`SLACK` after the furthest point read from its pack (files skipped, or taken by other
workers of a loader that reads every n-th file) is fetched together with the bytes
after it: a window of the pack that doubles while the reads stay in a row
(`WINDOW_MIN` to `WINDOW_MAX`), kept in memory (`WINDOWS_BYTES` in all, least recently
used dropped) for the files in it; half way through the furthest window the next one is
fetched in the background. Each file taken from a window is still verified against its
own sha256 by the cache before it is used or stored; one that fails is fetched again by
itself. A file behind the furthest point and in no window, or further ahead than
`SLACK`, is fetched exactly: a random reader fetches only what it touches.

Concurrency: the pool has `workers` threads; `_scheduled` (guarded by `_lock`) keeps one
pending prefetch per chunk, and the cache's singleflight makes a reader that needs a
chunk being prefetched wait for that download instead of starting another.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from strata.catalog.external import check_external_size, read_external_range
from strata.catalog.manifest import Entry
from strata.storage.cache import (WHOLE, UnitCache, UnitFiles, WholeFile, on_file,
                                  copy_range, whole_key)

import logging

log = logging.getLogger("strata.vfs")


@dataclass
class Stream:
    """Per-handle read state for readahead."""
    next_offset: int = 0
    window: int = 0
    ahead_until: int = 0     # chunk index up to which prefetches were scheduled
    passed: int = 0          # chunks before this index were reported passed to the cache
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: UnitFiles = field(default_factory=UnitFiles)
    looked: bool = False              # whether the cache was asked for a whole file
    whole: str | None = None          # the cached whole file this stream reads
    builder: WholeFile | None = None  # the whole file this stream helps build

    def close(self) -> None:
        self.files.close()
        if self.builder is not None:
            self.builder.release()
            self.builder = None


COPY_BLOCK = 8 << 20

WINDOW_MIN = 512 << 10      # the first window after two small files in a row
WINDOW_MAX = 8 << 20        # windows double up to this
WINDOWS_BYTES = 64 << 20    # memory for all windows of a mount
SLACK = 1 << 20             # how far past the furthest point read a file is still in a row
MAX_PACKS = 4096            # packs whose last read is remembered
WINDOWS_PER_PACK = 8        # readers lagging behind still find theirs (3: 2-4x the reads)


@dataclass
class _Pack:
    """What `PackWindows` knows of one pack."""
    end: int = -1           # how far readers in a row have read it (-1: no reader yet)
    grow: int = 0           # the size of its latest window (0: no reader in a row)
    windows: list = field(default_factory=list)   # [(start, bytes)], oldest first
    pending: list = field(default_factory=list)   # [(start, size, Future)] being fetched
    ended: bool = False     # a window came back short: the pack ends there

    def reach(self) -> int:
        """Where the windows and fetches of this pack end."""
        return max([s + len(d) for s, d in self.windows] +
                   [s + n for s, n, _ in self.pending], default=-1)


class PackWindows:
    """Ranges of packs fetched ahead for readers of consecutive small files (the module's
    docstring). `fetch(pack, offset, size)` returns the bytes of one small file, from a
    window or from storage through `read(pack, offset, size)`.

    Several readers of one pack (a data loader's workers, each taking every n-th file)
    reach it slightly out of order: a file inside a window, or inside a range being
    fetched, is taken from there (its reader waits for the fetch), and a file behind how
    far the readers got is fetched by itself without breaking their run. With `submit`
    (a thread pool's), once a reader is half way through the furthest window the next
    one is fetched in the background, so readers in a row seldom wait for storage."""

    def __init__(self, read, submit=None, limit: int = WINDOWS_BYTES):
        self._read = read
        self._submit = submit
        self._limit = limit
        self._lock = threading.Lock()
        self._packs: OrderedDict[str, _Pack] = OrderedDict()   # least recently read first
        self._bytes = 0

    def fetch(self, pack: str, offset: int, size: int) -> bytes:
        end = offset + size
        with self._lock:
            p = self._packs.pop(pack, None) or _Pack()
            self._packs[pack] = p
            while len(self._packs) > MAX_PACKS:
                self._drop(self._packs.popitem(last=False)[1])
            hit = self._hit(pack, p, offset, end)
            if hit is not None:
                return hit
            at = self._covered(p, offset, end)[1]   # the rest may be on its way
            coming = next((f for s, n, f in p.pending if s <= at and end <= s + n), None)
            want = 0
            if coming is None:
                if p.end >= 0 and offset < p.end:
                    pass                              # behind the run: this file alone
                elif p.end >= 0 and offset - p.end <= SLACK:
                    p.grow = want = min(max(p.grow * 2, WINDOW_MIN), WINDOW_MAX)
                    want = max(want, size)
                    coming = Future()
                    p.pending.append((offset, want, coming))
                    p.end = end
                else:
                    p.end, p.grow = end, 0            # a jump: no run (yet)
        if not want and coming is not None:
            try:
                coming.result()   # the bytes are on their way: wait for them
            except Exception:  # noqa: BLE001 - that fetch failed: this file by itself
                pass
            with self._lock:
                hit = self._hit(pack, p, offset, end)
            return hit if hit is not None else self._read(pack, offset, size)
        if not want:
            return self._read(pack, offset, size)    # not in a run: exactly this file
        try:
            data = self._read(pack, offset, want)
        except BaseException as e:
            with self._lock:
                p.pending = [x for x in p.pending if x[2] is not coming]
            coming.set_exception(e)
            raise
        with self._lock:
            p.pending = [x for x in p.pending if x[2] is not coming]
            self._keep(p, offset, data, want)
            self._fetch_ahead(pack, p, end)
        coming.set_result(None)
        return data[:size]

    def forget(self, pack: str) -> None:
        """Drop what is known of `pack` (bytes of a window failed their check)."""
        with self._lock:
            p = self._packs.pop(pack, None)
            if p is not None:
                self._drop(p)

    # -- under the lock
    def _hit(self, pack: str, p: _Pack, offset: int, end: int) -> bytes | None:
        """The bytes from the windows (a file may span two adjacent ones), or None."""
        got, at = self._covered(p, offset, end)
        if at < end:
            return None
        p.end = max(p.end, end)
        self._fetch_ahead(pack, p, end)
        return got[0] if len(got) == 1 else b"".join(got)

    @staticmethod
    def _covered(p: _Pack, offset: int, end: int) -> tuple[list[bytes], int]:
        """The pieces of [offset, end) that the windows hold from `offset` on, and where
        they stop."""
        got, at = [], offset
        for start, data in sorted(p.windows, key=lambda w: w[0]):
            if start <= at < start + len(data):
                stop = min(end, start + len(data))
                got.append(data[at - start:stop - start])
                at = stop
        return got, at

    def _keep(self, p: _Pack, start: int, data: bytes, asked: int) -> None:
        p.windows.append((start, data))
        self._bytes += len(data)
        if len(data) < asked:
            p.ended = True
        if len(p.windows) > WINDOWS_PER_PACK:
            self._bytes -= len(p.windows.pop(0)[1])
        if self._bytes <= self._limit:
            return
        for q in list(self._packs.values()):   # least recently read first
            while self._bytes > self._limit and q.windows and (q is not p or len(q.windows) > 1):
                self._bytes -= len(q.windows.pop(0)[1])

    def _drop(self, p: _Pack) -> None:
        self._bytes -= sum(len(data) for _, data in p.windows)
        p.windows.clear()

    def _fetch_ahead(self, pack: str, p: _Pack, end: int) -> None:
        if self._submit is None or p.ended or not p.windows:
            return
        start = p.reach()
        if any(s + n == start for s, n, _ in p.pending):
            return   # the furthest range is still being fetched
        last_start, last = max(p.windows, key=lambda w: w[0])
        if last_start + len(last) != start or end < last_start + len(last) // 2:
            return   # not half way through the furthest window yet
        size = min(max(p.grow * 2, WINDOW_MIN), WINDOW_MAX)

        def job() -> None:
            try:
                data = self._read(pack, start, size)
            except Exception as e:  # noqa: BLE001 - a reader that needs it fetches it
                log.debug("window ahead of pack %s failed: %s", pack, e)
                data = None
            with self._lock:
                p.pending = [x for x in p.pending if x[0] != start]
                if data is not None and self._packs.get(pack) is p:
                    p.grow = size
                    self._keep(p, start, data, size)
        try:
            # the job waits for the lock held here, so it cannot end before it is listed
            p.pending.append((start, size, self._submit(job)))
        except RuntimeError:   # the pool is shut down: the mount is closing
            pass


def copy_by_reads(read, size: int, fd: int) -> None:
    """Copy `size` bytes into descriptor `fd` through `read(offset, n)`, block by block."""
    off = 0
    while off < size:
        data = read(off, min(COPY_BLOCK, size - off))
        if not data:
            break
        os.pwrite(fd, data, off)
        off += len(data)


class Reader:
    # 12 downloads in flight (96 MiB ahead with 8 MiB chunks): a cold 1 GiB read from a
    # local s3rver went from about 435 to 470 MB/s against 8 (docs/performance.md)
    def __init__(self, repo, cache: UnitCache, *, workers: int = 12, max_window: int = 12):
        self.repo = repo
        self.cache = cache
        self.chunk_size = repo.chunk_size
        self.max_window = max_window
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="strata-readahead")
        self._lock = threading.Lock()
        self._scheduled: set[str] = set()
        self._links_checked: set[tuple[str, int]] = set()   # external links of the right size
        self._max_pending = workers * 2
        self.windows = PackWindows(repo.read_blob, self._pool.submit)

    def read(self, entry: Entry, offset: int, size: int, stream: Stream | None = None) -> bytes:
        data = self._read(entry, offset, size, stream)
        self._ended(entry, offset + len(data), stream)
        return data

    def read_view(self, entry: Entry, offset: int, buf: memoryview,
                  stream: Stream | None = None) -> memoryview:
        """`read` of up to len(buf) bytes, for a reply: a view of `buf` filled, or of the
        memory that already holds the bytes (a chunk just fetched: no copy)."""
        got = self._read_view(entry, offset, buf, stream)
        self._ended(entry, offset + len(got), stream)
        return got

    def _ended(self, entry: Entry, end: int, s: Stream | None) -> None:
        """A reader (a handle's stream) whose read ended at the end of the file: the unit
        holding that end (a small file's, a one-chunk file's chunk, the last chunk) need
        not stay in memory, as the chunks a reader went past (`_pass`): `tar` of 400 MB
        of small files left the mount at 430 MB of RSS, their units held in memory up
        to its limit."""
        if s is not None and entry.kind != "x" and end >= entry.size > 0:
            self.cache.passed(entry.sha256 if entry.pack else entry.chunks[-32:].hex())

    def _read(self, entry: Entry, offset: int, size: int, stream: Stream | None) -> bytes:
        if offset >= entry.size or size <= 0:
            return b""
        size = min(size, entry.size - offset)
        if entry.kind == "x":
            self._check_external(entry)
            return read_external_range(entry, offset, size)
        if entry.pack:
            return self.cache.read(entry.sha256, offset, size, *self._small_file(entry))
        if stream is not None and len(entry.chunks) > 32:
            return bytes(self._read_view(entry, offset, memoryview(bytearray(size)), stream))
        if stream is not None:
            self._readahead(entry, offset, size, stream)
        parts = []
        end = offset + size
        chunks = entry.chunks
        while offset < end:
            idx, within = divmod(offset, self.chunk_size)
            n = min(end - offset, self.chunk_size - within)
            cid = chunks[idx * 32:idx * 32 + 32].hex()
            parts.append(self.cache.read(cid, within, n, self._fetcher(cid),
                                         f"chunk {cid} of {entry.path}",
                                         None if stream is None else stream.files))
            offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_view(self, entry: Entry, offset: int, buf: memoryview,
                   stream: Stream | None) -> memoryview:
        size = min(len(buf), entry.size - offset)
        if size <= 0:
            return buf[:0]
        if entry.kind == "x":
            return memoryview(self._read(entry, offset, size, stream))
        if entry.pack:
            return self.cache.read_view(entry.sha256, offset, buf[:size],
                                        *self._small_file(entry))
        if stream is not None:
            if len(entry.chunks) > 32:
                n = self._read_whole(entry, offset, buf[:size], stream)
                if n is not None:
                    return buf[:n]
            self._readahead(entry, offset, size, stream)
            self._pass(entry, offset, stream)
        files = None if stream is None else stream.files
        done = 0
        chunks = entry.chunks
        while done < size:
            idx, within = divmod(offset + done, self.chunk_size)
            n = min(size - done, self.chunk_size - within)
            cid = chunks[idx * 32:idx * 32 + 32].hex()
            got = self.cache.read_view(cid, within, buf[done:done + n], self._fetcher(cid),
                                       f"chunk {cid} of {entry.path}", files)
            if not done and (len(got) < n or n == size):
                return got   # all of the reply is in this one chunk (or it ends there)
            if got.obj is not buf.obj:
                buf[done:done + len(got)] = got   # a reply across chunks: put together
            done += len(got)
            if len(got) < n:
                break   # a short unit: as `read`, the reply ends there
        return buf[:done]

    def _read_whole(self, entry: Entry, offset: int, buf: memoryview,
                    s: Stream) -> int | None:
        """Read a multi-chunk file from its whole copy in the cache, if it has one (asked
        once per stream); None if it has not. A stream that starts at the beginning of a
        file without a whole copy helps build one (`UnitCache.assemble`)."""
        if not s.looked:
            with s.lock:
                if not s.looked:
                    key = whole_key(entry.chunks)
                    s.whole = self.cache.local_file(WHOLE + key, entry.size)
                    if s.whole is None and offset == 0:
                        s.builder = self.cache.assemble(key, entry.size, entry.chunk_ids,
                                                        self.chunk_size)
                    s.looked = True
        if s.whole is None and s.builder is not None:
            s.whole = s.builder.path   # completed while this stream reads: go on there
        if s.whole is None:
            return None
        n = s.files.use(s.whole, s.whole, lambda fd: os.preadv(fd, [buf], offset))
        if n is None:   # evicted before this stream opened it: back to the chunks
            s.whole = None
        return n

    def local_file(self, entry: Entry) -> str | None:
        """A file in the cache holding exactly this entry's bytes (a small file's unit, a
        one-chunk file's chunk, or a whole copy), which the kernel may read itself."""
        if entry.kind == "x" or entry.size == 0:
            return None
        if entry.pack:
            return self.cache.local_file(entry.sha256, entry.size)
        if len(entry.chunks) == 32:
            return self.cache.local_file(entry.chunks.hex(), entry.size)
        return self.cache.local_file(WHOLE + whole_key(entry.chunks), entry.size)

    def copy_to(self, entry: Entry, fd: int) -> None:
        """Write the whole file into descriptor `fd` (a copy-up). The chunks go in parallel
        on the readahead pool, each straight from its cached unit file, or fetched and
        verified without being stored in the cache (`UnitCache.copy_into`). Small files
        and external links are one read."""
        if entry.kind == "x" or entry.pack or not entry.chunks:
            copy_by_reads(lambda off, n: self.read(entry, off, n), entry.size, fd)
            return
        whole = self.local_file(entry) if len(entry.chunks) > 32 else None
        if whole is not None and on_file(
                whole, lambda src: copy_range(src, fd, entry.size, 0)) == entry.size:
            return
        cs = self.chunk_size
        jobs = []
        for idx in range(len(entry.chunks) // 32):
            cid = entry.chunks[idx * 32:idx * 32 + 32].hex()
            off = idx * cs
            jobs.append(self._pool.submit(
                self.cache.copy_into, cid, min(cs, entry.size - off), fd, off,
                self._fetcher(cid), f"chunk {cid} of {entry.path}"))
        try:
            for job in jobs:
                job.result()
        finally:
            for job in jobs:   # after a failure: do not copy the rest for nothing
                job.cancel()
            for job in jobs:   # and never leave a write into `fd` running after we return
                if not job.cancelled():
                    job.exception()

    def _check_external(self, entry: Entry) -> None:
        """A link's object is checked for its recorded size once per mount (a HEAD):
        one that changed since it was added fails its reads (EIO, logged)."""
        key = (entry.target, entry.size)
        if key in self._links_checked:
            return
        check_external_size(entry)
        with self._lock:
            self._links_checked.add(key)

    def _fetcher(self, cid: str):
        return lambda: self.repo.read_blob(cid)

    def _small_file(self, entry: Entry):
        """(fetch, what) of a small file's unit: its range of its pack, from a window of
        the pack if a sequential reader brought one (`PackWindows`); fetched by itself
        when asked again (the cache asks again only when the bytes failed their check)."""
        asked = []

        def fetch() -> bytes:
            if asked:
                self.windows.forget(entry.pack)
                return self.repo.read_blob(entry.pack, entry.offset, entry.size, exact=True)
            asked.append(True)
            return self.windows.fetch(entry.pack, entry.offset, entry.size)
        return fetch, f"{entry.path} (pack {entry.pack})"

    def _readahead(self, entry: Entry, offset: int, size: int, s: Stream) -> None:
        with s.lock:
            # the kernel's readahead issues requests a few at a time and they can arrive
            # slightly out of order: anything near where the stream is counts as sequential
            near = abs(offset - s.next_offset) <= self.chunk_size
            if not s.next_offset:
                # a first read proves no stream yet: fetch only what it needs (a
                # prefetch beside it would share the disk and the CPU with it)
                s.next_offset = offset + size
                return
            if near:
                s.window = min(max(1, s.window * 2), self.max_window)
            else:
                s.window = 0
                s.ahead_until = 0
                s.passed = 0   # a new pass over chunks reported before reports them again
            s.next_offset = max(s.next_offset, offset + size) if near else offset + size
            if not s.window:
                return
            count = len(entry.chunks) // 32
            current = (offset + size - 1) // self.chunk_size
            first = max(current + 1, s.ahead_until)
            last = min(current + s.window, count - 1)
            if first > last:
                return
            s.ahead_until = last + 1
        for idx in range(first, last + 1):
            cid = entry.chunks[idx * 32:idx * 32 + 32].hex()
            with self._lock:
                if cid in self._scheduled or len(self._scheduled) >= self._max_pending:
                    continue
                self._scheduled.add(cid)
            self._pool.submit(self._prefetch, cid, entry.path)

    def _pass(self, entry: Entry, offset: int, s: Stream) -> None:
        """A sequential reader a quarter into chunk i is past chunk i-1 (requests of the
        kernel's readahead arrive slightly out of order, never that far): the cache may
        drop that chunk from memory (`UnitCache.passed`)."""
        idx, within = divmod(offset, self.chunk_size)
        if not s.window or idx <= s.passed or within < self.chunk_size // 4:
            return
        s.passed = idx
        self.cache.passed(entry.chunks[idx * 32 - 32:idx * 32].hex())

    def _prefetch(self, cid: str, path: str) -> None:
        try:
            self.cache.ensure(cid, self._fetcher(cid), f"chunk {cid} of {path}")
        except Exception as e:  # a reader that needs it will fetch and report it
            log.warning("readahead of a chunk of %s failed: %s", path, e)
        finally:
            with self._lock:
                self._scheduled.discard(cid)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
