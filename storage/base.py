"""The storage protocol every backend implements (DESIGN.md, "Storage protocol").

Keys are '/'-separated relative paths inside the repository. Every method is idempotent:
`delete` of a missing key succeeds, a write with `if_absent=True` that finds the key raises
`PreconditionFailed`. Backends translate their SDK's errors into `strata.storage.errors`
in one table each; retrying transient failures is the job of `strata.storage.retry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: float | None = None


@runtime_checkable
class Storage(Protocol):
    url: str  # the repository URL this backend was opened with, no trailing '/'

    def read(self, key: str) -> bytes:
        """The whole object. NotFound if absent."""

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer only at the end of the object)."""

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        """Store `data` at `key` and return its new etag.

        if_absent: fail with PreconditionFailed if the key exists.
        if_match: fail with PreconditionFailed unless the current etag equals it.
        """

    def stat(self, key: str) -> ObjectInfo:
        """Size and etag. NotFound if absent."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in no particular order."""

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    def url_for(self, key: str) -> str:
        """The full URL of `key`, for messages."""


def check_write_args(if_absent: bool, if_match: str | None) -> None:
    """The argument rule every backend's `write` shares."""
    if if_absent and if_match is not None:
        raise ValueError("write: if_absent and if_match exclude each other")


def check_range_args(offset: int, length: int) -> None:
    """The argument rule every backend's `read_range` shares."""
    if offset < 0 or length < 0:
        raise ValueError(f"read_range: negative offset or length ({offset}, {length})")
