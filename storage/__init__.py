"""strata.storage: object storage behind one small protocol (DESIGN.md, "Storage protocol").

Open a repository with `open_storage(url)`; it parses the URL (`parse_url`), imports the
backend for its scheme and wraps it in `RetryingStorage`. Everything a caller catches is in
`strata.storage.errors`, re-exported here.
"""

from strata.storage.base import ObjectInfo, Storage
from strata.storage.counting import CountingStorage
from strata.storage.errors import (
    Corrupt,
    InvalidKey,
    InvalidURL,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    StrataError,
    Transient,
    Unreachable,
)
from strata.storage.external import open_external
from strata.storage.retry import RetryingStorage
from strata.storage.url import StorageURL, check_key, check_prefix, open_storage, parse_url

__all__ = [
    "ObjectInfo", "Storage", "StorageURL", "open_storage", "parse_url", "open_external",
    "check_key", "check_prefix", "RetryingStorage", "CountingStorage",
    "StrataError", "StorageError", "NotFound", "PreconditionFailed", "PermissionDenied",
    "Transient", "Unreachable", "Corrupt", "InvalidURL", "InvalidKey", "MissingDependency",
]
