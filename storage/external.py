"""Opening external links: any file a version refers to without owning its bytes.

`add_external_files` records links such as `s3://bucket/key`, `file:///path` or
`https://host/file`; `open_external` turns one into a backend and the key inside it, so a
caller can stat and read_range the link like any repository object.
"""

from __future__ import annotations

import os
from dataclasses import replace

from strata.storage.base import Storage
from strata.storage.errors import InvalidURL
from strata.storage.retry import RetryingStorage
from strata.storage.url import StorageURL, open_storage, parse_link


def open_external(link: str, *, retry: bool = True) -> tuple[Storage, str]:
    """The backend holding `link` and the key of the linked object inside it.

    Each call makes a new backend (for S3, a new client); a caller resolving many links
    in one bucket should keep the backend and vary the key.
    """
    parsed = parse_link(link)
    if parsed.scheme in ("http", "https"):
        # imported here: http.client, ssl and email cost ~40 ms, and only links need them
        from strata.storage import http
        folder, _, name = parsed.prefix.rpartition("/")
        if not name:
            raise InvalidURL(f"external link names no file: {link}")
        storage: Storage = http.from_url(replace(parsed, prefix=folder, query=""))
        key = f"{name}?{parsed.query}" if parsed.query else name
        return (RetryingStorage(storage) if retry else storage), key
    if parsed.scheme == "file":
        folder, name = os.path.split(parsed.path)
        if not name:
            raise InvalidURL(f"external link names a folder, not a file: {link}")
        return open_storage(StorageURL("file", path=folder), retry=retry), name
    if not parsed.prefix:
        raise InvalidURL(f"external link names a bucket, not an object: {link}")
    return open_storage(replace(parsed, prefix=""), retry=retry), parsed.prefix
