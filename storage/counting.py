"""Counting storage calls, so tests and benchmarks can assert what reached a backend.

`CountingStorage` wraps any backend and counts calls per method and the bytes read and
written. A cache test asserts its hits by the calls that did *not* happen (STYLE.md #6).
A call is counted when it is made, whether or not it succeeds; bytes read count on success.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterator

from strata.storage.base import ObjectInfo, Storage


class CountingStorage:
    """A Storage that forwards every call and counts it. Thread-safe."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.url = inner.url
        self.calls: Counter[str] = Counter()
        self.bytes_read = 0
        self.bytes_written = 0
        self.keys_read: list[str] = []   # every key read or range-read, in order
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CountingStorage({self.inner!r}, calls={dict(self.calls)})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.keys_read.clear()
            self.bytes_read = self.bytes_written = 0

    def url_for(self, key: str) -> str:
        return self.inner.url_for(key)

    def read(self, key: str) -> bytes:
        self._count("read", key=key)
        data = self.inner.read(key)
        self._count(None, read=len(data))
        return data

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        self._count("read_range", key=key)
        data = self.inner.read_range(key, offset, length)
        self._count(None, read=len(data))
        return data

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        self._count("write", written=len(data))
        return self.inner.write(key, data, if_absent=if_absent, if_match=if_match)

    def stat(self, key: str) -> ObjectInfo:
        self._count("stat")
        return self.inner.stat(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._count("delete")
        self.inner.delete(key)

    def _count(self, method: str | None, *, read: int = 0, written: int = 0,
               key: str | None = None) -> None:
        with self._lock:
            if method:
                self.calls[method] += 1
            if key is not None:
                self.keys_read.append(key)
            self.bytes_read += read
            self.bytes_written += written
