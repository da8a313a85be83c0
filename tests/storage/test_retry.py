"""The retry wrapper: bounded retries of transient failures only, and call counting."""

from __future__ import annotations

import time

import pytest

from strata.storage import (
    CountingStorage,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RetryingStorage,
    StrataError,
    Transient,
    Unreachable,
)
from strata.storage.local import LocalStorage
from tests.storage.contract import StorageContract
from tests.storage.faults import FailingIterator, FaultyStorage, http_503


@pytest.fixture
def local(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "repo")


def fast(inner, **kwargs) -> RetryingStorage:
    return RetryingStorage(inner, **{"attempts": 5, "base_delay": 0.001, "max_delay": 0.01,
                                     **kwargs})


class TestRetryingCountingLocal(StorageContract):
    """The wrappers forward the whole protocol unchanged."""

    MANY_KEYS = 50  # local listing has no pages; the S3 suite covers pagination

    @pytest.fixture
    def storage(self, local) -> RetryingStorage:
        return RetryingStorage(CountingStorage(local))


@pytest.mark.parametrize("error", [None, http_503], ids=["reset", "503"])
def test_recovers_when_faults_stop(local, error) -> None:
    local.write("k", b"data")
    faulty = FaultyStorage(local, failures=3, **({"error": error} if error else {}))
    assert fast(faulty).read("k") == b"data"
    assert faulty.calls["read"] == 4


def test_unreachable_after_the_attempt_bound(local) -> None:
    faulty = FaultyStorage(local, failures=1000)
    with pytest.raises(Unreachable) as info:
        fast(faulty, attempts=4).stat("some/key")
    assert faulty.calls["stat"] == 4
    message = str(info.value)
    assert local.url_for("some/key") in message
    assert "4 attempts" in message and "connection reset (injected)" in message
    assert isinstance(info.value.__cause__, Transient)


def test_a_stalled_store_is_bounded_in_wall_clock_time(local) -> None:
    faulty = FaultyStorage(local, failures=1000, stall=0.1)
    started = time.monotonic()
    with pytest.raises(Unreachable):
        fast(faulty, attempts=1000, total_seconds=0.35).read("k")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.0
    assert faulty.calls["read"] < 10


def test_a_store_restarting_for_four_seconds_is_waited_out(local) -> None:
    # A store refusing connections while it restarts (4 s here): the default policy waits
    # for it; a store still down after that is reported unreachable before the 30 s bound.
    local.write("k", b"data")
    now = [0.0]

    class Restarting(FaultyStorage):
        back_at = 4.0

        def _call(self, method, key, forward):
            if now[0] >= self.back_at:
                self.failures = 0
            return super()._call(method, key, forward)

    faulty = Restarting(local, failures=1000)
    storage = RetryingStorage(faulty, sleep=lambda s: now.__setitem__(0, now[0] + s),
                              clock=lambda: now[0])
    assert storage.read("k") == b"data"
    assert 4.0 <= now[0] < 9.2

    now[0], faulty.failures, faulty.back_at = 0.0, 1000, float("inf")
    with pytest.raises(Unreachable, match="10 attempts"):
        storage.read("k")
    assert 4.6 <= now[0] <= 9.2


def test_wall_clock_bound_comes_from_the_environment(local, monkeypatch) -> None:
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "0.25")
    assert RetryingStorage(local).total_seconds == 0.25
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "soon")
    with pytest.raises(StrataError, match="STRATA_RETRY_SECONDS"):
        RetryingStorage(local)
    monkeypatch.delenv("STRATA_RETRY_SECONDS")
    assert RetryingStorage(local).total_seconds == 30.0


def test_backoff_grows_with_jitter_up_to_the_cap(local) -> None:
    delays: list[float] = []
    storage = RetryingStorage(FaultyStorage(local, failures=1000), attempts=7,
                              base_delay=0.1, max_delay=0.5, sleep=delays.append)
    with pytest.raises(Unreachable):
        storage.read("k")
    caps = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert len(delays) == len(caps)
    for delay, cap in zip(delays, caps, strict=True):
        assert cap / 2 <= delay <= cap


@pytest.mark.parametrize("error", [
    lambda url: NotFound(url), lambda url: PermissionDenied(url),
    lambda url: PreconditionFailed(url),
], ids=["not_found", "permission_denied", "precondition_failed"])
def test_definite_answers_are_not_retried(local, error) -> None:
    faulty = FaultyStorage(local, failures=1000, error=error)
    with pytest.raises((NotFound, PermissionDenied, PreconditionFailed)):
        fast(faulty).write("k", b"v")
    assert faulty.calls["write"] == 1


def test_missing_key_is_not_retried(local) -> None:
    faulty = FaultyStorage(local)
    with pytest.raises(NotFound):
        fast(faulty).read("missing")
    assert faulty.calls["read"] == 1


def test_a_listing_broken_midway_is_retried_whole(local) -> None:
    for i in range(10):
        local.write(f"p/{i}", b"")
    broken = FailingIterator(local, good=4)
    listed = sorted(info.key for info in fast(broken).list("p/"))
    assert listed == [f"p/{i}" for i in range(10)]
    assert broken.lists == 2


def test_a_lost_reply_to_a_conditional_write_is_not_a_conflict(local) -> None:
    # The first attempt lands, its reply is lost; the retry must not report a conflict.
    faulty = FaultyStorage(local, failures=1, after=True, methods=("write",))
    etag = fast(faulty).write("label", b"version-id", if_absent=True)
    assert etag == local.stat("label").etag

    current = local.stat("label").etag
    faulty.failures = 1
    etag = fast(faulty).write("label", b"version-2", if_match=current)
    assert local.read("label") == b"version-2" and etag == local.stat("label").etag


def test_a_real_conflict_after_a_retry_is_still_a_conflict(local) -> None:
    local.write("label", b"someone else")
    faulty = FaultyStorage(local, failures=1, methods=("write",))
    with pytest.raises(PreconditionFailed):
        fast(faulty).write("label", b"mine", if_absent=True)
    assert local.read("label") == b"someone else"


def test_counting_storage_counts_calls_and_bytes(local) -> None:
    counting = CountingStorage(local)
    counting.write("a", b"12345")
    counting.read("a")
    counting.read_range("a", 1, 2)
    counting.stat("a")
    list(counting.list(""))
    counting.delete("a")
    with pytest.raises(NotFound):
        counting.read("a")
    assert dict(counting.calls) == {"write": 1, "read": 2, "read_range": 1, "stat": 1,
                                    "list": 1, "delete": 1}
    assert (counting.bytes_read, counting.bytes_written) == (7, 5)
    counting.reset()
    assert not counting.calls and counting.bytes_read == 0
