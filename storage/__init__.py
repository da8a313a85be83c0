"""strata.storage: object storage behind one small protocol (DESIGN.md, "Storage protocol").

Open a repository with `open_storage(url)`; it parses the URL (`parse_url`), imports the
backend for its scheme and wraps it in `RetryingStorage`. Everything a caller catches is in
`strata.storage.errors`, re-exported here.

The errors are imported with the package; every other name on first use (PEP 562), since
importing any module of the package (the CLI imports strata.storage.errors) runs this file.
"""

from __future__ import annotations

from strata import lazy_exports
from strata.storage.errors import (
    Corrupt,
    InvalidKey,
    InvalidURL,
    MissingBucket,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    StrataError,
    Transient,
    Unreachable,
)

_LAZY = {
    "ObjectInfo": "strata.storage.base",
    "Storage": "strata.storage.base",
    "CountingStorage": "strata.storage.counting",
    "open_external": "strata.storage.external",
    "RetryingStorage": "strata.storage.retry",
    "StorageURL": "strata.storage.url",
    "check_key": "strata.storage.url",
    "check_prefix": "strata.storage.url",
    "open_storage": "strata.storage.url",
    "parse_url": "strata.storage.url",
}

__all__ = [
    "ObjectInfo", "Storage", "StorageURL", "open_storage", "parse_url", "open_external",
    "check_key", "check_prefix", "RetryingStorage", "CountingStorage",
    "StrataError", "StorageError", "NotFound", "PreconditionFailed", "PermissionDenied",
    "Transient", "Unreachable", "Corrupt", "InvalidURL", "InvalidKey", "MissingBucket",
    "MissingDependency",
]


__getattr__ = lazy_exports(__name__, _LAZY)
