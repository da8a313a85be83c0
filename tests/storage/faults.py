"""Fault injection for storage tests: a wrapper that fails, throttles or stalls on purpose.

`FaultyStorage(inner, failures=N)` makes the first N calls (of the chosen methods) raise
instead of reaching `inner`; `stall` makes each failing call hang first, like a request
that ends in a timeout; `after=True` lets the call reach `inner` and then fails it, like a
reply lost on the way back. `calls` counts the attempts that reached the wrapper.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable, Iterator

from strata.storage import ObjectInfo, Storage, StorageError, Transient

METHODS = ("read", "read_range", "write", "stat", "list", "delete")


def transient(url: str) -> StorageError:
    return Transient(url, "connection reset (injected)")


def http_503(url: str) -> StorageError:
    return Transient(url, "S3 server error 503 (SlowDown, injected)")


class FaultyStorage:
    def __init__(self, inner: Storage, failures: int = 0, *,
                 error: Callable[[str], BaseException] = transient,
                 methods: tuple[str, ...] = METHODS, stall: float = 0.0,
                 after: bool = False):
        self.inner = inner
        self.url = inner.url
        self.failures = failures  # how many more calls fail; set to 0 to heal the store
        self.error = error
        self.methods = methods
        self.stall = stall
        self.after = after
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)

    def read(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.inner.read(key))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call("read_range", key, lambda: self.inner.read_range(key, offset, length))

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        return self._call("write", key, lambda: self.inner.write(
            key, data, if_absent=if_absent, if_match=if_match))

    def stat(self, key: str) -> ObjectInfo:
        return self._call("stat", key, lambda: self.inner.stat(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._call("list", prefix, lambda: self.inner.list(prefix))

    def delete(self, key: str) -> None:
        return self._call("delete", key, lambda: self.inner.delete(key))

    def _call(self, method: str, key: str, forward):
        with self._lock:
            self.calls[method] += 1
            fail = method in self.methods and self.failures > 0
            if fail:
                self.failures -= 1
        if not fail:
            return forward()
        if self.stall:
            time.sleep(self.stall)
        if self.after:
            forward()
        raise self.error(self.inner.url_for(key) if key else self.url)


class FailingIterator:
    """A listing that yields `good` items, then breaks the first `times` it is made."""

    def __init__(self, inner: Storage, good: int, times: int = 1):
        self.inner = inner
        self.url = inner.url
        self.good = good
        self.times = times
        self.lists = 0

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.lists += 1
        broken = self.lists <= self.times
        for n, info in enumerate(self.inner.list(prefix)):
            if broken and n == self.good:
                raise Transient(self.url, "listing interrupted (injected)")
            yield info
