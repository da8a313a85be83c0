"""The exceptions every layer raises: one base class, and the storage failures.

`StrataError` is the root of every domain error; the CLI catches it once and prints its
message. Storage errors always name the URL they concern, so a message read alone says
what failed and where.
"""

from __future__ import annotations


class StrataError(Exception):
    """A failure the user can act on; its message is one complete line."""


class StorageError(StrataError):
    """A storage operation failed. `url` names the object or repository concerned."""

    def __init__(self, url: str, message: str):
        self.url = url
        self.detail = message
        super().__init__(f"{message}: {url}")


class NotFound(StorageError):
    def __init__(self, url: str, message: str = "no such object"):
        super().__init__(url, message)


class MissingBucket(StorageError):
    """The bucket or container of a repository URL does not exist. Not a `NotFound`: the
    whole location is missing, not one object, and code that reads an absent key as "not
    there yet" (no repository, no such version) must not say that about a missing bucket."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (only-if-absent) or changed (only-if-etag)."""

    def __init__(self, url: str, message: str = "object exists or changed since it was read"):
        super().__init__(url, message)


class PermissionDenied(StorageError):
    def __init__(self, url: str, message: str = "permission denied (check credentials)"):
        super().__init__(url, message)


class Transient(StorageError):
    """A failure that may go away on retry: timeouts, throttling, 5xx, dropped connections."""

    def __init__(self, url: str, message: str = "storage temporarily unavailable"):
        super().__init__(url, message)


class Unreachable(StorageError):
    """Transient failures persisted past the retry bound."""

    def __init__(self, url: str, message: str = "storage unreachable after retries"):
        super().__init__(url, message)


class Corrupt(StorageError):
    """Bytes read back do not match the hash that names them."""

    def __init__(self, url: str, message: str = "corrupt data (hash mismatch)"):
        super().__init__(url, message)


class InvalidURL(StrataError):
    """A repository URL that cannot be parsed or has an unknown scheme."""


class MissingDependency(StrataError):
    """A backend's SDK is not installed."""


class InvalidKey(StorageError):
    """An object key or prefix that could escape the repository or alias another key."""

    def __init__(self, url: str, message: str = "invalid object key"):
        super().__init__(url, message)


SQLITE_FULL = 13   # sqlite3.Error.sqlite_errorcode of 'database or disk is full'


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's 'database or disk is full' (a local database of strata's:
    the cache index, a draft, an overlay's journal): ENOSPC in other words."""
    return getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL
