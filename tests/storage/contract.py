"""The storage contract: one abstract suite every backend must pass (STYLE.md #11).

Subclass `StorageContract` once per backend and override the `storage` fixture to return
a fresh, empty backend (fsspec's tests/abstract pattern). The class name does not start
with `Test`, so pytest collects only the subclasses. A backend that talks HTTP also
overrides `flaky`, so that its injected 503s are real HTTP answers that go through its SDK
and its error table (`tests.storage.emulators.FlakyProxy`); the default injects them above
the backend (`tests.storage.faults.FaultyStorage`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from strata.storage import (
    InvalidKey,
    NotFound,
    PreconditionFailed,
    RetryingStorage,
    Storage,
    Transient,
    Unreachable,
)
from tests.storage.faults import FaultyStorage, http_503

RACERS = 8
INCREMENTS = 10
HOSTILE_KEYS = ["../x", "a/../../x", "..", "/abs", "a\\b", "a\x00b", "", "a//b", "./a", "a/"]


def race(n: int, target) -> list:
    """Run target(i) in n threads released together; return results (or exceptions)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects what each racer got
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


class StorageContract:
    # Keys for the pagination test: above S3's 1000 keys per page.
    MANY_KEYS = 1003
    # Above every backend's single-request size (8 MiB): a multipart upload on S3, staged
    # blocks on Azure, a resumable upload on GCS.
    LARGE = (8 << 20) + 4099

    @pytest.fixture
    def storage(self) -> Storage:
        raise NotImplementedError("a backend's test class overrides the storage fixture")

    @pytest.fixture
    def flaky(self, storage: Storage):
        """(a raw backend on the same location as `storage`, an injector): setting
        `injector.failures = n` makes the next n requests fail with a 503."""
        faulty = FaultyStorage(storage, error=http_503)
        return faulty, faulty

    # -- whole objects -------------------------------------------------------------------------

    def test_round_trip(self, storage: Storage) -> None:
        etag = storage.write("dir/hello.txt", b"hello")
        assert storage.read("dir/hello.txt") == b"hello"
        info = storage.stat("dir/hello.txt")
        assert (info.key, info.size, info.etag) == ("dir/hello.txt", 5, etag)
        assert etag

    def test_empty_object(self, storage: Storage) -> None:
        storage.write("empty", b"")
        assert storage.read("empty") == b""
        assert storage.stat("empty").size == 0
        assert storage.read_range("empty", 0, 10) == b""

    def test_binary_data(self, storage: Storage) -> None:
        data = bytes(range(256)) * 64 + os.urandom(4096) + b"\x00\r\n\x00"
        storage.write("bin", data)
        assert storage.read("bin") == data
        assert storage.stat("bin").size == len(data)

    @pytest.mark.parametrize("kind", [bytearray, memoryview])
    def test_write_takes_any_bytes_like(self, storage: Storage, kind) -> None:
        # the pack builder hands over a bytearray; every SDK must get bytes it accepts
        data = bytes(range(256)) * 8
        storage.write("buf", kind(bytearray(data)))
        storage.write("buf-new", kind(bytearray(data)), if_absent=True)
        assert storage.read("buf") == storage.read("buf-new") == data

    def test_overwrite_changes_bytes_and_etag(self, storage: Storage) -> None:
        first = storage.write("k", b"aaaa")
        second = storage.write("k", b"bbbb")  # same size: the etag must still change
        assert storage.read("k") == b"bbbb"
        assert first != second == storage.stat("k").etag

    def test_large_object_round_trip(self, storage: Storage) -> None:
        data = os.urandom(self.LARGE)
        etag = storage.write("big", data, if_absent=True)
        info = storage.stat("big")
        assert (info.size, info.etag) == (self.LARGE, etag)
        assert storage.read("big") == data
        part = 8 << 20   # where a multipart, block or resumable upload split it
        for offset, length in ((0, 10), (part - 5, 10), (self.LARGE - 5, 100),
                               (self.LARGE, 5)):
            assert storage.read_range("big", offset, length) == data[offset:offset + length]
        # (a stale etag is refused on small objects above; fake-gcs-server does not check
        # preconditions of resumable uploads, so it cannot be asserted here for GCS)
        new = storage.write("big", data[::-1], if_match=etag)
        assert storage.read("big") == data[::-1] and storage.stat("big").etag == new != etag

    # -- ranges ---------------------------------------------------------------------------------

    @pytest.mark.parametrize("offset, length, expected", [
        (0, 10, bytes(range(10))),           # start
        (0, 100, bytes(range(100))),         # exactly everything
        (99, 1, bytes([99])),                # last byte
        (95, 10, bytes(range(95, 100))),     # spans the end: short
        (100, 5, b""),                       # starts at the end
        (150, 5, b""),                       # starts past the end
        (10, 0, b""),                        # zero length
        (0, 10_000, bytes(range(100))),      # far longer than the object
    ])
    def test_read_range(self, storage: Storage, offset: int, length: int,
                        expected: bytes) -> None:
        storage.write("r", bytes(range(100)))
        assert storage.read_range("r", offset, length) == expected

    def test_negative_range_is_a_bug(self, storage: Storage) -> None:
        storage.write("r", b"abc")
        with pytest.raises(ValueError):
            storage.read_range("r", -1, 2)

    # -- missing keys and delete ---------------------------------------------------------------

    @pytest.mark.parametrize("call", [
        lambda s: s.read("missing/key"),
        lambda s: s.read_range("missing/key", 0, 10),
        lambda s: s.read_range("missing/key", 0, 0),
        lambda s: s.stat("missing/key"),
    ], ids=["read", "read_range", "read_range_empty", "stat"])
    def test_missing_key_is_not_found(self, storage: Storage, call) -> None:
        with pytest.raises(NotFound) as info:
            call(storage)
        assert storage.url_for("missing/key") in str(info.value)

    def test_delete_is_idempotent(self, storage: Storage) -> None:
        storage.write("gone/soon", b"x")
        storage.delete("gone/soon")
        storage.delete("gone/soon")
        storage.delete("never/was")
        with pytest.raises(NotFound):
            storage.stat("gone/soon")
        assert list(storage.list("")) == []

    # -- listing --------------------------------------------------------------------------------

    def test_list_prefix(self, storage: Storage) -> None:
        for key in ("a/1", "a/2", "ab/3", "b/4"):
            storage.write(key, key.encode())
        keys = lambda prefix: sorted(info.key for info in storage.list(prefix))  # noqa: E731
        assert keys("a/") == ["a/1", "a/2"]
        assert keys("a") == ["a/1", "a/2", "ab/3"]
        assert keys("") == ["a/1", "a/2", "ab/3", "b/4"]
        assert keys("zzz/") == []
        assert keys("a/1") == ["a/1"]

    def test_list_reports_size_and_etag(self, storage: Storage) -> None:
        etag = storage.write("x/file", b"12345")
        [info] = list(storage.list("x/"))
        assert (info.key, info.size, info.etag) == ("x/file", 5, etag)

    def test_nested_prefixes(self, storage: Storage) -> None:
        for key in ("x/y/z/1", "x/y/2", "x/3", "xy/4"):
            storage.write(key, b"v")
        assert sorted(i.key for i in storage.list("x/y/")) == ["x/y/2", "x/y/z/1"]
        assert sorted(i.key for i in storage.list("x/y/z/")) == ["x/y/z/1"]
        assert sorted(i.key for i in storage.list("x/")) == ["x/3", "x/y/2", "x/y/z/1"]

    def test_list_many_keys(self, storage: Storage) -> None:
        expected = {f"many/{i:05d}" for i in range(self.MANY_KEYS)}
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda key: storage.write(key, b""), sorted(expected)))
        storage.write("other", b"")
        listed = [info.key for info in storage.list("many/")]
        assert len(listed) == len(expected) and set(listed) == expected

    def test_list_shows_only_objects(self, storage: Storage) -> None:
        # Conditional writes may use lock or temp files; none of them is an object.
        storage.write("k1", b"1", if_absent=True)
        etag = storage.write("k2", b"2")
        storage.write("k2", b"3", if_match=etag)
        assert sorted(info.key for info in storage.list("")) == ["k1", "k2"]

    # -- conditional writes ---------------------------------------------------------------------

    def test_if_absent_creates(self, storage: Storage) -> None:
        etag = storage.write("new", b"v", if_absent=True)
        assert storage.stat("new").etag == etag

    def test_if_absent_keeps_existing(self, storage: Storage) -> None:
        storage.write("k", b"first")
        with pytest.raises(PreconditionFailed) as info:
            storage.write("k", b"second", if_absent=True)
        assert storage.url_for("k") in str(info.value)
        assert storage.read("k") == b"first"

    def test_if_absent_race_has_one_winner(self, storage: Storage) -> None:
        results = race(RACERS, lambda i: storage.write("label", f"writer {i}".encode(),
                                                       if_absent=True))
        winners = [i for i, result in enumerate(results) if isinstance(result, str)]
        losers = [r for r in results if isinstance(r, PreconditionFailed)]
        assert len(winners) == 1 and len(losers) == RACERS - 1, results
        assert storage.read("label") == f"writer {winners[0]}".encode()

    def test_if_match_with_stale_etag_fails(self, storage: Storage) -> None:
        first = storage.write("rec", b"v1")
        storage.write("rec", b"v2", if_match=first)
        with pytest.raises(PreconditionFailed) as info:
            storage.write("rec", b"v3", if_match=first)
        assert storage.url_for("rec") in str(info.value)
        assert storage.read("rec") == b"v2"

    def test_if_match_on_missing_key_fails(self, storage: Storage) -> None:
        etag = storage.write("rec", b"v1")
        storage.delete("rec")
        with pytest.raises(PreconditionFailed):
            storage.write("rec", b"v2", if_match=etag)
        with pytest.raises(NotFound):
            storage.stat("rec")

    def test_compare_and_swap_loses_no_update(self, storage: Storage) -> None:
        storage.write("counter", b"0")

        def increment(_: int) -> int:
            conflicts = 0
            for _ in range(INCREMENTS):
                while True:
                    # stat before read: if the value changes in between, the etag is stale
                    # and the swap fails, so a stale value is never written back.
                    etag = storage.stat("counter").etag
                    value = int(storage.read("counter"))
                    try:
                        storage.write("counter", str(value + 1).encode(), if_match=etag)
                        break
                    except PreconditionFailed:
                        conflicts += 1
            return conflicts

        results = race(RACERS, increment)
        assert all(isinstance(r, int) for r in results), results
        assert int(storage.read("counter")) == RACERS * INCREMENTS

    def test_both_conditions_is_a_bug(self, storage: Storage) -> None:
        with pytest.raises(ValueError):
            storage.write("k", b"v", if_absent=True, if_match="x")

    # -- transient failures ---------------------------------------------------------------------

    def test_injected_503s_are_retried(self, flaky) -> None:
        raw, injector = flaky
        injector.failures = 1
        with pytest.raises(Transient) as info:
            raw.write("k", b"data")
        assert "503" in str(info.value) and raw.url_for("k") in str(info.value)

        storage = RetryingStorage(raw, attempts=5, base_delay=0.001, max_delay=0.01)
        for failures, call, expected in [
            (3, lambda: storage.write("k", b"data", if_absent=True), None),
            (2, lambda: storage.read("k"), b"data"),
            (2, lambda: storage.read_range("k", 1, 2), b"at"),
            (2, lambda: storage.stat("k").size, 4),
            (2, lambda: [i.key for i in storage.list("")], ["k"]),
            (4, lambda: storage.write("k", b"new", if_match=storage.stat("k").etag), None),
            (2, lambda: storage.delete("k"), None),
        ]:
            injector.failures = failures
            result = call()
            assert injector.failures == 0   # every injected 503 was met, and retried
            if expected is not None:
                assert result == expected

        injector.failures = 100
        with pytest.raises(Unreachable) as info:
            RetryingStorage(raw, attempts=3, base_delay=0.001).stat("k")
        message = str(info.value)
        assert "3 attempts" in message and "503" in message and raw.url_for("k") in message
        injector.failures = 0
        with pytest.raises(NotFound):
            raw.stat("k")

    # -- naming and safety ----------------------------------------------------------------------

    def test_url_for_names_the_url(self, storage: Storage) -> None:
        assert not storage.url.endswith("/")
        assert storage.url_for("a/b.txt") == storage.url + "/a/b.txt"

    @pytest.mark.parametrize("key", HOSTILE_KEYS)
    def test_hostile_keys_are_refused(self, storage: Storage, key: str) -> None:
        for call in (lambda: storage.read(key), lambda: storage.read_range(key, 0, 1),
                     lambda: storage.stat(key), lambda: storage.write(key, b"x"),
                     lambda: storage.delete(key)):
            with pytest.raises(InvalidKey) as info:
                call()
            assert storage.url in str(info.value)

    @pytest.mark.parametrize("prefix", ["../", "/abs/", "a/../../", "a\\"])
    def test_hostile_prefixes_are_refused(self, storage: Storage, prefix: str) -> None:
        with pytest.raises(InvalidKey):
            list(storage.list(prefix))
