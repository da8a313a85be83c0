"""Retrying transient storage failures: the one place that decides how often and how long.

`RetryingStorage` wraps any backend. Only `Transient` is retried, with exponential backoff
and jitter; `NotFound`, `PreconditionFailed`, `PermissionDenied` and the rest pass through at
once, because asking again cannot change their answer. Each call is bounded twice: by
`attempts`, and by `total_seconds` of wall-clock time (default 30 s, or the
`STRATA_RETRY_SECONDS` environment variable). Past either bound the call raises
`Unreachable`, naming the URL and the last error.

The default of `ATTEMPTS` waits out a store that refuses connections for a few seconds (a
MinIO or proxy restart: its sleeps add up to 4.6-9.2 s), so a mount's readers and a long
upload ride through it; a store that is down for good is reported after that long, not
after the whole 30 s.

The wrapper cannot interrupt an attempt that is stuck inside a backend; each backend bounds
its own attempts with socket timeouts taken from `attempt_timeout`: the backend's default
(10 s to connect, 60 s per socket read) cut down to the retry budget, but never below
`MIN_ATTEMPT_SECONDS`. A stalled store (one that accepts connections and never answers)
therefore fails a call within `total_seconds` plus one such timeout: with
STRATA_RETRY_SECONDS=3, in about 5 s, not minutes.

A conditional write is ambiguous after a transient failure: the lost attempt may have
landed, and then its retry meets `PreconditionFailed` from its own bytes. So after a
transient failure, a `PreconditionFailed` is checked by reading the object back; if it holds
exactly the bytes being written, the write is reported as done. (For a blob, a label claim or
a version record, equal bytes mean the same outcome whoever wrote them.)
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Iterator, TypeVar

from strata.storage.base import ObjectInfo, Storage
from strata.storage.errors import PreconditionFailed, StrataError, Transient, Unreachable

DEFAULT_TOTAL_SECONDS = 30.0
ATTEMPTS = 10   # the first try and nine retries: sleeps of 0.05, 0.1, ... capped at 2 s
RETRY_SECONDS_ENV = "STRATA_RETRY_SECONDS"
MIN_ATTEMPT_SECONDS = 5.0  # no socket timeout below this: a slow but live store must pass

T = TypeVar("T")


def retry_seconds_from_env() -> float:
    """The wall-clock bound per call: $STRATA_RETRY_SECONDS, else 30 s."""
    raw = os.environ.get(RETRY_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_TOTAL_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:  # also rejects NaN
        raise StrataError(f"{RETRY_SECONDS_ENV} must be a positive number of seconds, "
                          f"not {raw!r}")
    return seconds


def attempt_timeout(default: float) -> float:
    """A backend's socket timeout of `default` seconds, bounded by the retry budget:
    min(default, max(MIN_ATTEMPT_SECONDS, $STRATA_RETRY_SECONDS)). One stalled attempt must
    not outlast the budget of the whole call by much."""
    return min(default, max(MIN_ATTEMPT_SECONDS, retry_seconds_from_env()))


class RetryingStorage:
    """A Storage that retries its inner backend's transient failures, within bounds.

    Thread-safe if the inner backend is: it keeps no state between calls.
    """

    def __init__(self, inner: Storage, attempts: int = ATTEMPTS, base_delay: float = 0.05,
                 max_delay: float = 2.0, total_seconds: float | None = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self.url = inner.url
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.total_seconds = retry_seconds_from_env() if total_seconds is None else total_seconds
        self._sleep = sleep
        self._clock = clock

    def __repr__(self) -> str:
        return f"RetryingStorage({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        # Backend-specific attributes (root, bucket, ...) stay reachable through the wrapper.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)

    def read(self, key: str) -> bytes:
        return self._retry(lambda: self.inner.read(key))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return self._retry(lambda: self.inner.read_range(key, offset, length))

    def stat(self, key: str) -> ObjectInfo:
        return self._retry(lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Materialised, so a failure halfway through retries the whole listing rather than
        # handing the caller a partial one.
        return iter(self._retry(lambda: [*self.inner.list(prefix)]))

    def delete(self, key: str) -> None:
        self._retry(lambda: self.inner.delete(key))

    def call(self, fn: Callable[[Storage], T]) -> T:
        """`fn(inner backend)` under this wrapper's retry policy; on a transient failure
        the whole of `fn` runs again. For work that must not materialise a listing, such as
        counting a large prefix or finding its first key."""
        return self._retry(lambda: fn(self.inner))

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        conditional = if_absent or if_match is not None
        failed_before = False

        def attempt() -> str:
            nonlocal failed_before
            try:
                return self.inner.write(key, data, if_absent=if_absent, if_match=if_match)
            except Transient:
                failed_before = True
                raise
            except PreconditionFailed:
                if conditional and failed_before:
                    etag = self._already_written(key, data)
                    if etag is not None:
                        return etag
                raise

        return self._retry(attempt)

    def _already_written(self, key: str, data: bytes) -> str | None:
        """The etag of `key` if it holds exactly `data` (stat first: a later change fails
        the caller's next compare-and-swap instead of passing with stale bytes)."""
        info = self.inner.stat(key)
        return info.etag if self.inner.read(key) == data else None

    def _retry(self, call: Callable[[], T]) -> T:
        start = self._clock()
        deadline = start + self.total_seconds
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except Transient as exc:
                last = exc
            remaining = deadline - self._clock()
            if attempt >= self.attempts or remaining <= 0:
                break
            delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
            # "Equal jitter": never zero, so a retry storm still spreads out.
            self._sleep(min(remaining, delay / 2 + random.uniform(0, delay / 2)))
        elapsed = self._clock() - start
        raise Unreachable(last.url, f"storage unreachable after {attempt} attempt"
                                    f"{'s' if attempt != 1 else ''} in {elapsed:.1f}s "
                                    f"(last error: {last.detail}); check that the store "
                                    f"is reachable from here") from last
