"""External links (`add_external_files`): entries that point at an outside object and are
read by range from it later. Their bytes are not in the repository, so they are checked by
size only (the outside object has no sha256 we could trust)."""

from __future__ import annotations

from typing import Iterator

from strata.catalog.manifest import Entry
from strata.storage.errors import Corrupt, NotFound
from strata.storage.external import open_external

READ_UNIT = 8 << 20


def list_external(url: str) -> list[tuple[str, str, int]]:
    """(url, relative name, size) for the object at `url`, or for every object under it
    when `url` names a prefix/folder."""
    storage, key = open_external(url)
    try:
        info = storage.stat(key)
        return [(url, key.rsplit("/", 1)[-1], info.size)]
    except NotFound:
        pass
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    for info in storage.list(prefix):
        rel = info.key[len(prefix):]
        if rel and not rel.endswith("/"):
            out.append((_child_url(url, rel), rel, info.size))
    if not out:
        raise NotFound(url, "no object or folder at this link")
    return sorted(out, key=lambda t: t[1])


def _child_url(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel


def read_external_range(entry: Entry, offset: int, length: int) -> bytes:
    storage, key = open_external(entry.target)
    return storage.read_range(key, offset, length)


def check_external_size(entry: Entry) -> None:
    """Corrupt unless the linked object still has the size recorded: an object that grew
    would otherwise be served cut to its old size, and pass a check of the bytes read."""
    storage, key = open_external(entry.target)
    size = storage.stat(key).size
    if size != entry.size:
        raise Corrupt(entry.target, f"external object is {size} bytes, {entry.size} when "
                                    f"it was added: it changed since")


def iter_external(entry: Entry) -> Iterator[bytes]:
    check_external_size(entry)
    storage, key = open_external(entry.target)
    got = 0
    while got < entry.size:
        data = storage.read_range(key, got, min(READ_UNIT, entry.size - got))
        if not data:
            break
        got += len(data)
        yield data
    if got != entry.size:
        raise Corrupt(entry.target, f"external object is {got} bytes, expected {entry.size}")
