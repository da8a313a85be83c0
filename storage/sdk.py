"""What the SDK-backed backends (s3, gcs, azure) share: the bounded cache of SDK clients,
the 416 error, and the rules of a ranged read that every object store needs.

Clients are expensive (credential chains, connection pools) and thread-safe, so each
backend keeps one per distinct environment and shares it between every storage object of
the process; the cache is bounded because only tests switch environments often.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Hashable

from strata.storage.base import check_range_args
from strata.storage.errors import StorageError


class OutOfRange(StorageError):
    """HTTP 416: a range that starts at or past the end; read_range turns it into b''."""


class ClientCache:
    """SDK clients by key, made once under a lock; emptied when it reaches `limit`."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._clients: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:   # some SDK sessions are not thread-safe while they build clients
            client = self._clients.get(key)
            if client is None:
                if len(self._clients) >= self.limit:
                    self._clients.clear()
                client = self._clients[key] = make()
            return client

    def clear(self) -> None:
        with self._lock:
            self._clients.clear()


def environment_key(*prefixes: str) -> tuple[tuple[str, str], ...]:
    """The environment variables that pick credentials and endpoints, as a cache key."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefixes)))


def ranged_read(storage, key: str, offset: int, length: int,
                fetch: Callable[[], bytes]) -> bytes:
    """`length` bytes from `offset` via `fetch`: an empty range still fails on a missing
    key (it has no HTTP form, so `stat` checks), and a range past the end is b''."""
    check_range_args(offset, length)
    if length == 0:
        storage.stat(key)
        return b""
    try:
        return fetch()[:length]
    except OutOfRange:
        return b""
