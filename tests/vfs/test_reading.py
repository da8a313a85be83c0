"""Reading through the filesystem core: exact bytes, one fetch per unit, readahead,
verification, eviction and bounded failure, counted at the storage boundary."""

import hashlib
import os
import random
import threading
import time

import pytest

from strata.catalog import Dataset, layout
from strata.storage import cache as cache_mod
from strata.storage.errors import Corrupt, Unreachable
from strata.storage.retry import RetryingStorage
from strata.vfs.errors import IsADirectory, NoEntry, ReadOnly
from tests.catalog.conftest import write
from tests.storage.faults import FaultyStorage
from tests.vfs.conftest import CHUNK


def make(repo_url, tmp_path, files, parents=()):
    src = tmp_path / f"src{len(os.listdir(tmp_path))}"
    for rel, data in files.items():
        write(src, rel, data)
    ds = Dataset.create("n", "p", parent_datasets=list(parents), repo=repo_url)
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    return ds


def wait_until(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (got := predicate()) and time.monotonic() < deadline:
        time.sleep(0.01)   # waiting on an observable condition, bounded
    assert got, what
    return got


def open_big(repo_url, tmp_path, mounted):
    """An 8-chunk file "big" opened through a fresh mount, storage counters at zero:
    (its bytes, the mount, the handle)."""
    data = os.urandom(CHUNK * 8)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    fh = m.fs.open("big", os.O_RDONLY)
    m.counting.reset()
    return data, m, fh


def test_getattr_and_readdir_fetch_no_data(repo_url, tmp_path, mounted):
    ds = make(repo_url, tmp_path, {"d/x": os.urandom(1000), "big": os.urandom(CHUNK * 3)})
    m = mounted(repo_url, ds.id)
    m.counting.reset()
    assert [n for n, _ in m.fs.readdir("")] == ["big", "d"]
    assert m.fs.getattr("big").size == CHUNK * 3
    assert m.fs.getattr("d/x").mode & 0o222 == 0          # read-only mount
    assert not any(k.startswith("blobs/") for k in m.counting.keys_read)


def test_random_reads_from_16_threads_match_and_fetch_each_chunk_once(repo_url, tmp_path,
                                                                        mounted):
    data = os.urandom(CHUNK * 10 + 123)
    ds = make(repo_url, tmp_path, {"big": data, "small": b"s" * 5000})
    m = mounted(repo_url, ds.id)
    m.counting.reset()
    errors = []

    def reader(seed):
        rnd = random.Random(seed)
        fh = m.fs.open("big", os.O_RDONLY)
        try:
            for _ in range(50):
                off = rnd.randrange(len(data))
                size = rnd.randrange(1, 200_000)
                if m.fs.read(fh, off, size) != data[off:off + size]:
                    errors.append((off, size))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))
        finally:
            m.fs.release(fh)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    chunk_reads = [k for k in m.counting.keys_read if k.startswith("blobs/")]
    assert len(chunk_reads) == len(set(chunk_reads)) == 11  # each chunk fetched once


def test_a_file_shared_by_versions_is_cached_once(repo_url, tmp_path, mounted):
    shared = os.urandom(3000)
    a = make(repo_url, tmp_path, {"same": shared, "x": b"1"})
    b = make(repo_url, tmp_path, {"renamed": shared}, parents=[a.id])
    ma = mounted(repo_url, a.id)
    assert ma.fs.read_path("same") == shared
    ma.cache.flush()                       # the unit is on disk for other processes now
    mb = mounted(repo_url, b.id)
    assert mb.fs.read_path("renamed") == shared
    assert mb.fs.read_path("same") == shared
    assert not any(k.startswith("blobs/") for k in mb.counting.keys_read)
    assert mb.fs.getxattr("renamed", "user.strata.version") == b.id.encode()
    assert mb.fs.getxattr("same", "user.strata.version") == a.id.encode()


def test_small_file_read_is_one_exact_range(repo_url, tmp_path, mounted):
    files = {f"f{i:02}": os.urandom(1000 + i) for i in range(20)}
    ds = make(repo_url, tmp_path, files)
    m = mounted(repo_url, ds.id)
    m.fs.getattr("f07")                          # fetches the manifest
    m.counting.reset()
    assert m.fs.read_path("f07") == files["f07"]
    assert m.counting.calls["read_range"] == 1 and m.counting.calls["read"] == 0
    assert m.counting.bytes_read == len(files["f07"])


def small_files(repo_url, tmp_path, mounted, count=120):
    """`count` small files of 1-3 KiB (several packs of 256 KiB), through a fresh mount
    whose manifest is fetched, storage counters at zero: (files, mount, packs)."""
    rnd = random.Random(5)
    files = {f"d/f{i:03}": rnd.randbytes(rnd.randrange(1000, 3000)) for i in range(count)}
    ds = make(repo_url, tmp_path, files)
    m = mounted(repo_url, ds.id)
    packs = {m.view.lookup(p).entry.pack for p in files}
    m.counting.reset()
    return files, m, packs


def test_small_files_read_in_order_come_in_windows_of_their_pack(repo_url, tmp_path,
                                                                  mounted):
    files, m, packs = small_files(repo_url, tmp_path, mounted, count=300)
    assert len(packs) >= 2
    for path in sorted(files):
        assert m.fs.read_path(path) == files[path]
    total = sum(len(v) for v in files.values())
    # per pack: the first file by itself, then windows of 512 KiB and more: the pack's rest
    assert m.counting.calls["read_range"] <= 2 * len(packs)
    assert total <= m.counting.bytes_read <= total + len(packs) * 4096
    # and each file is a verified unit of the cache, as if fetched by itself
    m.cache.flush()
    for path, data in files.items():
        assert m.cache.contains(hashlib.sha256(data).hexdigest())


def test_small_files_read_backwards_are_fetched_exactly(repo_url, tmp_path, mounted):
    files, m, _ = small_files(repo_url, tmp_path, mounted)
    for path in sorted(files, reverse=True):
        assert m.fs.read_path(path) == files[path]
    assert m.counting.calls["read_range"] == len(files)
    assert m.counting.bytes_read == sum(len(v) for v in files.values())


def test_a_corrupt_small_file_in_a_window_is_fetched_again_by_itself(repo_url, tmp_path,
                                                                     mounted):
    files, m, _ = small_files(repo_url, tmp_path, mounted)
    order = sorted(files)
    victim = m.view.lookup(order[40]).entry
    path = os.path.join(repo_url, layout.blob_key(victim.pack))
    raw = bytearray(open(path, "rb").read())
    raw[victim.offset + 10] ^= 1
    open(path, "wb").write(bytes(raw))
    for p in order[:40]:
        assert m.fs.read_path(p) == files[p]
    m.counting.reset()
    with pytest.raises(Corrupt, match=order[40]):
        m.fs.read_path(order[40])        # from the window, then by itself: still corrupt
    assert m.counting.calls["read_range"] == 1
    assert m.counting.bytes_read == victim.size
    assert not m.cache.contains(victim.sha256)
    for p in order[41:]:
        assert m.fs.read_path(p) == files[p]


def test_a_pack_cut_short_in_storage_is_named_as_such(repo_url, tmp_path, mounted):
    # A pack blob truncated in storage: its files past the cut fail saying the blob is
    # cut short (not a hash mismatch), on the mount and for `get`; files before it read.
    from strata.catalog import Dataset
    files, m, _ = small_files(repo_url, tmp_path, mounted)
    order = sorted(files)
    victim = m.view.lookup(order[40]).entry
    path = os.path.join(repo_url, layout.blob_key(victim.pack))
    os.truncate(path, victim.offset + 10)
    for p in order[:40]:
        if m.view.lookup(p).entry.pack == victim.pack:
            assert m.fs.read_path(p) == files[p]
    with pytest.raises(Corrupt, match="cut short: it ends at byte") as e:
        m.fs.read_path(order[40])
    assert victim.pack in str(e.value)
    assert not m.cache.contains(victim.sha256)
    with pytest.raises(Corrupt, match="cut short"):
        Dataset.get(dataset_id=m.view.version_id, repo=repo_url).get_mutable_local_copy(
            str(tmp_path / "copy"))


def test_pack_windows_stay_within_their_memory_limit():
    from strata.vfs.reader import WINDOW_MIN, PackWindows
    packs = {f"p{i}": os.urandom(4 * WINDOW_MIN) for i in range(6)}
    reads = []

    def read(pack, offset, size):
        reads.append((pack, offset, size))
        return packs[pack][offset:offset + size]

    windows = PackWindows(read, limit=3 * WINDOW_MIN)
    for pack, data in packs.items():
        for off in range(0, 3 * WINDOW_MIN, 4096):
            assert windows.fetch(pack, off, 4096) == data[off:off + 4096]
            assert windows._bytes <= 3 * WINDOW_MIN + 2 * WINDOW_MIN
    assert len(reads) <= 3 * len(packs)   # by itself, 512 KiB, then 1 MiB
    assert [size for _, _, size in reads[:3]] == [4096, WINDOW_MIN, 2 * WINDOW_MIN]


def test_pack_windows_ahead_come_from_the_background_and_no_byte_twice():
    from concurrent.futures import ThreadPoolExecutor

    from strata.vfs.reader import WINDOW_MIN, PackWindows
    pack = os.urandom(8 << 20)
    reads = []

    def read(name, offset, size):
        reads.append((threading.current_thread().name, offset, size))
        return pack[offset:offset + size]

    with ThreadPoolExecutor(2, thread_name_prefix="ahead") as pool:
        windows = PackWindows(read, pool.submit)
        step = 4096
        for off in range(0, 6 << 20, step):
            assert windows.fetch("p", off, step) == pack[off:off + step]
    mine = [r for r in reads if not r[0].startswith("ahead")]
    assert [size for _, _, size in mine] == [step, WINDOW_MIN]   # then all from the pool
    spans = sorted((off, off + size) for _, off, size in reads)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))    # no byte fetched twice
    assert spans[-1][1] >= 6 << 20


class RecordingStorage:
    """Passes every call on; records (thread name, key, offset, length) of ranged reads."""

    def __init__(self, inner):
        self.inner, self.url, self.ranged = inner, inner.url, []

    def read_range(self, key, offset, length):
        self.ranged.append((threading.current_thread().name, key, offset, length))
        return self.inner.read_range(key, offset, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_pack_read_in_order_is_fetched_ahead_by_the_readahead_pool(tmp_path, mounted):
    from strata.catalog.repo import Repository
    url = str(tmp_path / "bigpacks")
    Repository.open(url, create=True, chunk_size=1 << 20, pack_size=16 << 20)   # ~1 MiB packs
    rnd = random.Random(6)
    files = {f"d/f{i:04}": rnd.randbytes(rnd.randrange(1500, 2500)) for i in range(2000)}
    ds = make(url, tmp_path, files)
    recorded = []
    m = mounted(url, ds.id, wrap=lambda inner: recorded.append(RecordingStorage(inner))
                or recorded[0])
    packs = {m.view.lookup(p).entry.pack for p in files}
    del recorded[0].ranged[:]
    for path in sorted(files):
        assert m.fs.read_path(path) == files[path]
    me = threading.current_thread().name
    for pack in packs:   # of each: the first file and a window, then the pool's windows
        threads = [name for name, key, *_ in recorded[0].ranged if pack in key]
        assert threads[:2] == [me, me] and len(threads) >= 3, threads
        assert all(name.startswith("strata-readahead") for name in threads[2:]), threads
    total = sum(len(v) for v in files.values())
    assert sum(length for *_, length in recorded[0].ranged) < total + len(packs) * (2 << 20)


def test_workers_taking_every_nth_small_file_share_the_windows(tmp_path, mounted):
    # a data loader's workers: each reads every 4th file, at its own pace
    from strata.catalog.repo import Repository
    url = str(tmp_path / "loader")
    Repository.open(url, create=True, chunk_size=1 << 20, pack_size=64 << 20)
    rnd = random.Random(8)
    files = {f"d/f{i:04}": rnd.randbytes(rnd.randrange(20_000, 60_000)) for i in range(1200)}
    ds = make(url, tmp_path, files)
    m = mounted(url, ds.id)
    names = sorted(files)
    m.fs.getattr(names[0])
    m.counting.reset()
    errors = []

    def worker(k: int) -> None:
        try:
            for name in names[k::4]:
                if m.fs.read_path(name) != files[name]:
                    errors.append(name)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    total = sum(len(v) for v in files.values())
    # one GET per file without windows (1200), 577 when only files at most 64 KiB apart
    # counted as in a row; a few per window here (23-28, both cores busy or not)
    assert m.counting.calls["read_range"] <= 100, m.counting.calls["read_range"]
    assert m.counting.bytes_read <= 1.3 * total


def test_sequential_reads_trigger_readahead(repo_url, tmp_path, mounted):
    data, m, fh = open_big(repo_url, tmp_path, mounted)
    step = 16 * 1024
    for off in range(0, CHUNK * 2, step):
        assert m.fs.read(fh, off, step) == data[off:off + step]
    ids = m.view.lookup("big").entry.chunk_ids
    # fetched from storage (kept as units, or in a whole copy)
    wait_until(lambda: all(layout.blob_key(c) in m.counting.keys_read for c in ids[2:5]),
               "chunks ahead were prefetched")
    m.fs.release(fh)


def test_a_sequential_reader_leaves_the_chunks_behind_it_out_of_memory(repo_url, tmp_path,
                                                                      mounted):
    data = os.urandom(CHUNK * 40)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id, passed_keep=2 * CHUNK)
    ids = m.view.lookup("big").entry.chunk_ids
    fh = m.fs.open("big", os.O_RDONLY)
    step = CHUNK // 8
    for off in range(0, len(data), step):
        assert m.fs.read(fh, off, step) == data[off:off + step]
        if off % CHUNK == CHUNK // 2:
            m.cache.flush()
            kept = m.cache.in_memory()
            idx = off // CHUNK
            # behind the reader: at most two chunks, what passed_keep allows (all of
            # them before: memory went to the chunks behind, up to the limit)
            assert len(set(kept) & set(ids[:idx])) <= 2, (idx, kept)
    m.fs.release(fh)
    # the whole copy serves every chunk now: two at most stay in memory
    assert m.reader.local_file(m.view.lookup("big").entry) is not None
    assert len(m.cache.in_memory()) <= 2


def test_a_reader_going_back_reports_the_chunks_it_passes_again(repo_url, tmp_path, mounted):
    data = os.urandom(CHUNK * 12)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    ids = m.view.lookup("big").entry.chunk_ids
    reported = []
    real = m.cache.passed
    m.cache.passed = lambda unit: (reported.append(unit), real(unit))
    fh = m.fs.open("big", os.O_RDONLY)

    def sweep(end: int) -> None:
        for off in range(0, end, CHUNK // 4):
            assert m.fs.read(fh, off, CHUNK // 4) == data[off:off + CHUNK // 4]

    sweep(6 * CHUNK)
    assert reported == ids[:5]
    reported.clear()
    sweep(4 * CHUNK)   # a second epoch from the start: its chunks leave memory again
    assert reported == ids[:3]
    m.fs.release(fh)


def test_files_read_to_their_end_leave_memory(repo_url, tmp_path, mounted):
    files = {f"s/{i:03}": os.urandom(3000) for i in range(50)}
    files["one"] = os.urandom(CHUNK - 7)        # a one-chunk file
    ds = make(repo_url, tmp_path, files)
    m = mounted(repo_url, ds.id, passed_keep=2 * 3000)
    for name, data in sorted(files.items()):
        fh = m.fs.open(name, os.O_RDONLY)
        assert m.fs.read(fh, 0, 5000) == data[:5000]
        if len(data) > 5000:
            assert m.fs.read(fh, 5000, len(data)) == data[5000:]
        m.fs.release(fh)
    m.cache.flush()
    # the kernel keeps the pages read: two small files' worth stay (all 51 before)
    assert len(m.cache.in_memory()) <= 2, len(m.cache.in_memory())


def test_units_a_reader_went_past_leave_memory_first(tmp_path):
    from strata.storage.cache import UnitCache
    cache = UnitCache(tmp_path / "c", limit=1 << 30, passed_keep=2 * 1000)
    cache._hot_limit = 4 * 1000
    blobs = [os.urandom(1000) for _ in range(6)]
    units = [hashlib.sha256(b).hexdigest() for b in blobs]
    for unit, blob in zip(units[:4], blobs):
        cache.read(unit, 0, 10, lambda blob=blob: blob)
    cache.flush()
    cache.passed(units[0])
    cache.passed(units[1])
    assert cache.in_memory() == units[:4]         # two passed, within what is kept
    cache.passed(units[2])                        # three: the oldest leaves
    assert cache.in_memory() == units[1:4]
    for unit, blob in zip(units[4:], blobs[4:]):  # memory short: passed ones go first
        cache.read(unit, 0, 10, lambda blob=blob: blob)
    assert cache.in_memory() == units[2:]
    assert cache.read(units[0], 0, 1000, lambda: pytest.fail("fetched again")) == blobs[0]
    cache.close()


def test_readahead_waits_while_disk_writes_fall_behind_and_reads_do_not(tmp_path):
    from strata.storage.cache import UnitCache
    cache = UnitCache(tmp_path / "c", 1 << 30, write_backlog=2 * 1000)
    disk = threading.Event()
    store = cache.store
    cache.store = lambda unit, data: (disk.wait(10), store(unit, data))   # a stuck disk
    blobs = [os.urandom(1000) for _ in range(8)]
    units = [hashlib.sha256(b).hexdigest() for b in blobs]
    fetched = []

    def readahead():
        for unit, blob in zip(units, blobs):
            cache.ensure(unit, lambda blob=blob: fetched.append(blob) or blob)

    ahead = threading.Thread(target=readahead)
    ahead.start()
    try:
        wait_until(lambda: cache.stats.throttled == 1, "readahead held for the disk")
        assert len(fetched) == 3   # 3000 bytes waiting for the disk, more than 2000
        mine = os.urandom(1000)    # a reader's own fetch goes on
        assert cache.read(hashlib.sha256(mine).hexdigest(), 0, 1000, lambda: mine) == mine
        assert len(fetched) == 3
    finally:
        disk.set()
        ahead.join(10)
    assert not ahead.is_alive() and fetched == blobs
    cache.flush()
    assert all(cache.contains(unit) for unit in units)
    cache.close()


def test_a_first_read_fetches_only_its_own_chunk(repo_url, tmp_path, mounted):
    # time to first byte: no prefetch shares the disk with the chunk being waited for
    data, m, fh = open_big(repo_url, tmp_path, mounted)
    assert m.fs.read(fh, 0, 4096) == data[:4096]
    m.reader._pool.shutdown(wait=True)
    assert m.counting.calls["read"] == 1
    m.fs.release(fh)


def test_random_reader_fetches_only_what_it_touches(repo_url, tmp_path, mounted):
    data, m, fh = open_big(repo_url, tmp_path, mounted)
    for off in (CHUNK * 6 + 5, CHUNK * 1 + 7, CHUNK * 4):
        assert m.fs.read(fh, off, 100) == data[off:off + 100]
    m.reader._pool.shutdown(wait=True)
    assert m.counting.calls["read"] == 3


def test_corrupt_blob_is_refetched_once_then_refused_and_never_cached(repo_url, tmp_path,
                                                                      mounted):
    data = os.urandom(CHUNK * 2)
    ds = make(repo_url, tmp_path, {"big": data, "ok": b"fine"})
    m = mounted(repo_url, ds.id)
    victim = m.view.lookup("big").entry.chunk_ids[1]
    path = os.path.join(repo_url, layout.blob_key(victim))
    raw = bytearray(open(path, "rb").read())
    raw[0] ^= 1
    open(path, "wb").write(bytes(raw))
    m.counting.reset()
    with pytest.raises(Corrupt, match=victim):
        m.fs.read_path("big", CHUNK, 10)
    assert m.counting.keys_read.count(layout.blob_key(victim)) == 2   # refetched once
    assert not m.cache.contains(victim)
    assert m.fs.read_path("big", 0, 10) == data[:10]                  # other chunks fine
    assert m.fs.read_path("ok") == b"fine"
    m.cache.flush()                                   # no temp file still being written
    for sub in (m.cache.units).iterdir():
        for unit in sub.iterdir():
            assert hashlib.sha256(unit.read_bytes()).hexdigest() == unit.name


def test_failing_storage_gives_bounded_retries_then_an_error(repo_url, tmp_path, mounted,
                                                              monkeypatch):
    data = os.urandom(CHUNK * 2)
    ds = make(repo_url, tmp_path, {"big": data})
    faulty = {}

    def wrap(inner):
        faulty["f"] = FaultyStorage(inner, failures=0, methods=("read", "read_range"),
                                    stall=0.05)
        return RetryingStorage(faulty["f"], attempts=4, base_delay=0.01, total_seconds=2)

    m = mounted(repo_url, ds.id, wrap=wrap)
    m.fs.getattr("big")                              # record and manifest are local now
    faulty["f"].failures = 10**6                     # then the store starts failing
    faulty["f"].calls.clear()
    start = time.monotonic()
    with pytest.raises(Unreachable):
        m.fs.read_path("big", 0, 10)
    assert time.monotonic() - start < 5
    # 4 attempts for the chunk read, and at most 4 for the one readahead scheduled
    assert faulty["f"].calls["read"] in (4, 8)
    faulty["f"].failures = 0                         # the store heals
    # the kernel asks again at once after a failed read: answered with the same error,
    # not with a second wait of the whole retry budget
    with pytest.raises(Unreachable):
        m.fs.read_path("big", 0, 10)
    assert faulty["f"].calls["read"] in (4, 8)
    monkeypatch.setattr(cache_mod, "FAILURE_MEMORY", 0)   # a moment later: reads work
    assert m.fs.read_path("big", 0, 10) == data[:10]


def test_eviction_keeps_the_cache_near_its_limit(repo_url, tmp_path, mounted):
    data = os.urandom(CHUNK * 40)
    ds = make(repo_url, tmp_path, {"big": data})
    limit = CHUNK * 8
    m = mounted(repo_url, ds.id, limit=limit)
    for off in range(0, len(data), CHUNK):
        assert m.fs.read_path("big", off, CHUNK) == data[off:off + CHUNK]
    m.cache.flush()
    m.cache.evict()
    units, used = m.cache.usage()
    assert used <= limit + CHUNK * 2 and m.cache.stats.evicted >= 30
    assert m.fs.read_path("big", 0, 100) == data[:100]    # evicted units come back


def test_pinned_units_survive_eviction(tmp_path):
    from strata.storage.cache import UnitCache
    cache = UnitCache(tmp_path / "c", limit=10)
    data = b"x" * 100
    unit = hashlib.sha256(data).hexdigest()
    with cache.pinned(unit):
        cache.ensure(unit, lambda: data)
        cache.flush()
        cache.evict()
        assert cache.path_of(unit).exists()
    cache.evict()
    assert not cache.contains(unit)
    cache.close()


def test_posix_errors_of_the_core(repo_url, tmp_path, mounted):
    ds = make(repo_url, tmp_path, {"d/x": b"1"})
    m = mounted(repo_url, ds.id)
    with pytest.raises(NoEntry):
        m.fs.getattr("nope")
    with pytest.raises(IsADirectory):
        m.fs.open("d", os.O_RDONLY)
    with pytest.raises(ReadOnly):
        m.fs.open("d/x", os.O_WRONLY)
    assert m.fs.read_path("d/x", 5, 10) == b""


def test_copy_up_copies_exact_bytes_without_filling_the_cache(repo_url, tmp_path, mounted):
    from strata.vfs.core import Filesystem
    from strata.vfs.overlay import Overlay, OverlayView
    data = os.urandom(CHUNK * 5 + 777)
    ds = make(repo_url, tmp_path, {"big": data, "again": data[::-1]})
    m = mounted(repo_url, ds.id)
    cached = m.view.lookup("again").entry.chunk_ids[:2]
    for c in cached:                                    # two units of "again" in the cache
        m.cache.ensure(c, lambda c=c: m.repo.read_blob(c))
    m.cache.flush()
    rw = Filesystem(OverlayView(m.view, Overlay(tmp_path / "ov")), writable=True)
    for name, want in (("big", data), ("again", data[::-1])):
        m.counting.reset()
        fh = rw.open(name, os.O_RDWR)
        assert rw.read(fh, 0, len(want) + 1) == want
        rw.release(fh)
        ids = m.view.lookup(name).entry.chunk_ids
        fetched = [k for k in m.counting.keys_read if k.startswith("blobs/")]
        # every chunk fetched once, except those copied from the cache's unit files
        assert sorted(fetched) == sorted(layout.blob_key(c) for c in ids if c not in cached)
    m.cache.flush()
    assert not any(m.cache.contains(c) for c in m.view.lookup("big").entry.chunk_ids)


def test_copy_up_refuses_a_corrupt_chunk(repo_url, tmp_path, mounted):
    from strata.vfs.core import Filesystem
    from strata.vfs.overlay import Overlay, OverlayView
    data = os.urandom(CHUNK * 3)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    victim = m.view.lookup("big").entry.chunk_ids[2]
    path = os.path.join(repo_url, layout.blob_key(victim))
    raw = bytearray(open(path, "rb").read())
    raw[5] ^= 1
    open(path, "wb").write(bytes(raw))
    rw = Filesystem(OverlayView(m.view, Overlay(tmp_path / "ov")), writable=True)
    with pytest.raises(Corrupt, match=victim):
        rw.open("big", os.O_RDWR)
    assert rw.view.overlay.get("big") is None            # nothing half-copied is kept
    assert os.listdir(rw.view.overlay.upper_dir) == []
    assert rw.read_path("big", 0, CHUNK) == data[:CHUNK]


def test_a_read_for_a_reply_gives_the_same_bytes_as_read(repo_url, tmp_path, mounted):
    from strata.vfs.core import Filesystem
    from strata.vfs.overlay import Overlay, OverlayView
    data = os.urandom(CHUNK * 4 + 99)
    ds = make(repo_url, tmp_path, {"big": data, "small": b"tiny file"})
    m = mounted(repo_url, ds.id)
    rw = Filesystem(OverlayView(m.view, Overlay(tmp_path / "ov")), writable=True)
    fh = rw.open("big", os.O_RDONLY)
    rnd = random.Random(7)
    from_memory = []    # replies handed out from a fetched chunk's own memory (no copy)
    for i in range(60):
        if i == 30:                       # now from the unit files, not from memory
            m.cache.flush()
            m.cache._hot.clear()
        off, size = rnd.randrange(len(data) + 10), rnd.randrange(1, CHUNK * 2)
        buf = memoryview(bytearray(size))
        got = rw.read_view(fh, off, buf)
        assert bytes(got) == data[off:off + size]
        if got.obj is not buf.obj:
            assert i < 30 and (off + len(got) - 1) // CHUNK == off // CHUNK
            from_memory.append(i)
    assert from_memory
    rw.release(fh)
    buf = memoryview(bytearray(100))
    fh = rw.open("small", os.O_RDONLY)
    assert bytes(rw.read_view(fh, 2, buf)) == b"ny file"
    rw.release(fh)
    fh = rw.open("big", os.O_RDWR)                      # an upper file
    rw.write(fh, 5, b"XYZ")
    assert bytes(rw.read_view(fh, 0, buf)) == data[:5] + b"XYZ" + data[8:100]
    rw.release(fh)


def test_a_file_read_to_its_end_is_kept_whole_and_read_from_there(repo_url, tmp_path,
                                                                 mounted):
    data = os.urandom(CHUNK * 5 + 999)
    part = os.urandom(CHUNK * 4)
    ds = make(repo_url, tmp_path, {"big": data, "part": part, "one": os.urandom(CHUNK),
                                   "small": b"s" * 300})
    m = mounted(repo_url, ds.id)
    entry = m.view.lookup("big").entry
    assert m.reader.local_file(entry) is None
    fh = m.fs.open("big", os.O_RDONLY)
    got = b"".join(m.fs.read(fh, off, 50_000) for off in range(0, len(data), 50_000))
    assert got == data
    m.fs.release(fh)
    path = wait_until(lambda: m.reader.local_file(entry), "a whole copy of big")
    assert open(path, "rb").read() == data
    # its chunk units are gone: the whole copy serves their bytes
    wait_until(lambda: not any(m.cache.path_of(c).exists() for c in entry.chunk_ids),
               "the chunk units of big dropped")
    # a reader of big now reads the whole copy, without storage
    m.counting.reset()
    fh = m.fs.open("big", os.O_RDONLY)
    assert m.fs.read(fh, CHUNK * 2 - 10, CHUNK) == data[CHUNK * 2 - 10:CHUNK * 3 - 10]
    m.fs.release(fh)
    assert m.counting.calls["read"] == 0 and m.counting.calls["read_range"] == 0
    # a file read in part is not kept whole and leaves no temp file
    fh = m.fs.open("part", os.O_RDONLY)
    assert m.fs.read(fh, 0, CHUNK + 1) == part[:CHUNK + 1]
    m.fs.release(fh)
    m.cache.flush()
    wait_until(lambda: not list(m.cache.files.rglob(".*")), "no temp file left")
    part_entry = m.view.lookup("part").entry
    assert m.reader.local_file(part_entry) is None
    # and what it fetched stays cached, as unit files
    wait_until(lambda: all(m.cache.path_of(c).exists() for c in part_entry.chunk_ids[:2]),
               "the chunks read of part kept")
    # one-chunk and small files: their one unit is their local copy
    assert m.fs.read_path("one") and m.fs.read_path("small") == b"s" * 300
    m.cache.flush()
    for name in ("one", "small"):
        local = m.reader.local_file(m.view.lookup(name).entry)
        assert local and open(local, "rb").read() == m.fs.read_path(name)
    # evicted: readers go back to the chunks and the storage
    m.cache.clear()
    assert m.reader.local_file(entry) is None
    assert m.fs.read_path("big") == data


def test_a_file_read_only_at_its_start_keeps_its_first_chunk_without_a_copy(
        repo_url, tmp_path, mounted, monkeypatch):
    # `head`, a header read: the whole copy begun for it becomes the first chunk's unit
    import strata.storage.cache as cache_mod
    data = os.urandom(CHUNK * 4)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    read_back = []
    real = cache_mod.read_verified
    monkeypatch.setattr(cache_mod, "read_verified",
                        lambda path, unit, *a: read_back.append(unit) or real(path, unit, *a))
    fh = m.fs.open("big", os.O_RDONLY)
    assert m.fs.read(fh, 0, 4096) == data[:4096]
    m.cache.flush()      # the chunk is on disk: in the whole copy begun for the reader
    assert not any(m.cache.path_of(c).exists() for c in m.view.lookup("big").entry.chunk_ids)
    m.fs.release(fh)     # which it abandons
    first = m.view.lookup("big").entry.chunk_ids[0]
    wait_until(lambda: m.cache.path_of(first).exists(), "the first chunk kept as a unit")
    m.cache.flush()
    wait_until(lambda: not list(m.cache.files.rglob(".*")), "no temp file left")
    assert m.cache.path_of(first).read_bytes() == data[:CHUNK]
    assert m.cache.contains(first) and first not in read_back   # renamed, not copied
    m.counting.reset()
    fh = m.fs.open("big", os.O_RDONLY)
    assert m.fs.read(fh, 100, 1000) == data[100:1100]
    m.fs.release(fh)
    assert m.counting.calls["read"] == 0


def test_chunks_in_a_whole_copy_serve_every_file_and_mount_that_shares_them(
        repo_url, tmp_path, mounted):
    # a version that appended a chunk to a large file shares its other chunks
    data = os.urandom(CHUNK * 5 + 999)
    grown = data[:CHUNK * 5] + os.urandom(CHUNK + 10)
    ds = make(repo_url, tmp_path, {"big": data})
    child = make(repo_url, tmp_path, {"big": grown}, parents=[ds.id])
    m = mounted(repo_url, ds.id)
    assert m.fs.read_path("big") == data
    entry = m.view.lookup("big").entry
    wait_until(lambda: m.reader.local_file(entry), "a whole copy of big")
    shared = entry.chunk_ids[:5]
    wait_until(lambda: not any(m.cache.path_of(c).exists() for c in shared),
               "the chunk units of big dropped")
    m.reader._pool.shutdown(wait=True)
    # another mount of the same cache, of the child version: only the new chunks are
    # fetched, the shared ones are read from the whole copy of the parent's file
    other = mounted(repo_url, child.id)
    assert all(other.cache.contains(c) for c in shared)
    other.counting.reset()
    fh = other.fs.open("big", os.O_RDONLY)
    got = b"".join(other.fs.read(fh, off, 40_000) for off in range(0, len(grown), 40_000))
    other.fs.release(fh)
    assert got == grown
    fetched = [k for k in other.counting.keys_read if k.startswith("blobs/")]
    assert sorted(fetched) == sorted(layout.blob_key(c) for c in
                                     other.view.lookup("big").entry.chunk_ids[5:]), fetched
    # the whole copies evicted: the chunks they held are gone with them, fetched again
    other.reader._pool.shutdown(wait=True)
    other.cache.flush()
    other.cache.clear()
    assert not any(other.cache.contains(c) for c in shared)
    assert other.fs.read_path("big", CHUNK, 100) == grown[CHUNK:CHUNK + 100]


def test_a_chunk_in_a_whole_copy_being_built_is_read_from_there(repo_url, tmp_path,
                                                               mounted):
    data = os.urandom(CHUNK * 40)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id, passed_keep=0)
    first = m.view.lookup("big").entry.chunk_ids[0]
    building = m.fs.open("big", os.O_RDONLY)   # from offset 0: builds a whole copy
    step = CHUNK // 4
    for off in range(0, CHUNK * 2 + step, step):
        assert m.fs.read(building, off, step) == data[off:off + step]
    m.reader._pool.shutdown(wait=True)          # no more readahead
    m.cache.flush()
    assert m.reader.local_file(m.view.lookup("big").entry) is None   # not complete
    assert first not in m.cache.in_memory() and not m.cache.path_of(first).exists()
    m.counting.reset()
    other = m.fs.open("big", os.O_RDONLY)      # another reader, in the middle of chunk 0
    assert m.fs.read(other, 1000, 5000) == data[1000:6000]
    m.fs.release(other)
    assert m.counting.calls["read"] == 0 and m.counting.calls["read_range"] == 0
    m.fs.release(building)


def test_a_whole_copy_is_verified_chunk_by_chunk(repo_url, tmp_path, mounted):
    # chunks already cached are read back and checked before they join a whole copy
    data = os.urandom(CHUNK * 3)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    entry = m.view.lookup("big").entry
    assert m.fs.read_path("big", CHUNK, 10) == data[CHUNK:CHUNK + 10]
    m.cache.flush()
    unit = m.cache.path_of(entry.chunk_ids[1])
    raw = bytearray(unit.read_bytes())
    raw[7] ^= 1
    unit.write_bytes(bytes(raw))      # damaged on disk after it was verified
    m2 = mounted(repo_url, ds.id)     # another process: nothing of it in memory
    fh = m2.fs.open("big", os.O_RDONLY)
    for off in range(0, len(data), CHUNK):
        m2.fs.read(fh, off, CHUNK)
    m2.fs.release(fh)
    m2.cache.flush()
    wait_until(lambda: not list(m2.cache.files.rglob(".*")), "no temp file left")
    assert m2.reader.local_file(entry) is None   # never made from bad bytes


def test_chunks_cached_as_units_move_into_a_whole_copy(repo_url, tmp_path, mounted):
    # a cache filled before (or by a reader that did not start at the beginning) turns
    # into a whole copy on the next full read, from its own units: no storage read
    data = os.urandom(CHUNK * 6 + 1)
    ds = make(repo_url, tmp_path, {"big": data})
    m = mounted(repo_url, ds.id)
    entry = m.view.lookup("big").entry
    fh = m.fs.open("big", os.O_RDONLY)
    assert m.fs.read(fh, 1, len(data)) == data[1:]    # not from offset 0: no whole copy
    m.fs.release(fh)
    m.cache.flush()
    wait_until(lambda: all(m.cache.path_of(c).exists() for c in entry.chunk_ids),
               "every chunk of big cached as a unit")
    assert m.reader.local_file(entry) is None
    m.counting.reset()
    fh = m.fs.open("big", os.O_RDONLY)
    assert m.fs.read(fh, 0, len(data)) == data
    m.fs.release(fh)                   # at once: the copies from the units are queued
    path = wait_until(lambda: m.reader.local_file(entry), "a whole copy made from units")
    assert open(path, "rb").read() == data
    assert m.counting.calls["read"] == 0 and m.counting.calls["read_range"] == 0
    wait_until(lambda: not any(m.cache.path_of(c).exists() for c in entry.chunk_ids),
               "the units dropped")


def test_clear_and_prune_sweep_temp_files_of_dead_processes_only(tmp_path):
    from strata.storage.cache import UnitCache
    cache = UnitCache(tmp_path / "c", 1 << 30)
    dead_pid = 2 ** 22 + 12345   # above pid_max's default: no such process
    left = []
    for folder in (cache.units, cache.files):   # a crashed whole copy, a crashed unit
        (folder / "ab").mkdir(parents=True, exist_ok=True)
        dead = folder / "ab" / f".ab12.{dead_pid}.77.tmp"
        live = folder / "ab" / f".ab34.{os.getpid()}.77.tmp"   # being written now
        dead.write_bytes(b"x" * 1000)
        live.write_bytes(b"y")
        left.append((dead, live))
    assert cache.clear() == 2000
    assert all(not dead.exists() and live.exists() for dead, live in left)
    left[0][0].write_bytes(b"x")
    cache.reconcile()
    assert not left[0][0].exists() and left[0][1].exists()
    cache.close()
