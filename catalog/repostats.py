"""The repository as a whole: creating one (`strata repo init`) and what it holds
(`strata repo info`).

Both look at the location before `Repository.open` does, so that each outcome has its own
clear line: an existing repository is reported, not re-created; a location that holds other
things is refused, naming it; a location with no repository says how to make one. Counting
only lists keys (versions/, manifests/, blobs/, names/) and never reads a record or a
manifest, so it costs one listing per prefix on any backend, and the listings are folded
as they stream (not held in memory), so a repository with millions of blobs is fine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, TypeVar

from strata.catalog import config, layout
from strata.catalog.errors import BadArgument, NotARepository
from strata.catalog.repo import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, Repository
from strata.storage import open_storage
from strata.storage.base import ObjectInfo, Storage
from strata.storage.errors import NotFound
from strata.storage.retry import RetryingStorage

T = TypeVar("T")


@dataclass(frozen=True)
class RepoStats:
    url: str
    format: int
    hash: str
    chunk_size: int
    pack_size: int
    datasets: int          # distinct (project, name) with at least one labelled version
    versions: int          # version records (final, published or archived)
    labels: int            # claimed version labels
    blobs: int
    blob_bytes: int
    manifests: int
    manifest_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def init_repository(url: str | None = None, *, chunk_size: int | None = None,
                    pack_size: int | None = None) -> tuple[Repository, bool]:
    """Create an empty repository at `url` (default: the configured one). Returns it and
    whether it was created (False: a repository was there already, and is left as is).

    Refused, changing nothing: a location that holds anything but a repository, and an
    existing repository whose chunk size differs from an explicit `chunk_size` (the chunk
    size of a repository is fixed)."""
    target = config.load(url).repo
    storage = open_storage(target)
    marker = _marker(storage)
    if marker is not None:
        repo = Repository.open(target)  # checks the format
        if chunk_size is not None and chunk_size != repo.chunk_size:
            raise BadArgument(
                f"{repo.url} is already a strata repository with chunk size "
                f"{repo.chunk_size}; a repository's chunk size is fixed, so init a new "
                f"location for chunk size {chunk_size}")
        return repo, False
    first = first_key(storage)
    if first is not None:
        raise NotARepository(
            f"{storage.url} is not empty (it holds {first!r}) and is not a strata "
            "repository; init an empty location instead (a new folder or prefix)")
    repo = Repository.open(target, create=True,
                           chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                           pack_size=DEFAULT_PACK_SIZE if pack_size is None else pack_size)
    return repo, True


def repository_stats(url: str | None = None) -> RepoStats:
    """Format, chunk and pack size, and counts of what the repository at `url` holds."""
    target = config.load(url).repo
    storage = open_storage(target)
    marker = _marker(storage)
    if marker is None:
        raise not_a_repository(storage)
    repo = Repository.open(target)  # checks the format
    versions = _fold(storage, "versions/", lambda infos: sum(
        1 for i in infos if _name_of(i).endswith(".json")
        and layout.is_version_id(_name_of(i)[:-5])))
    manifests, manifest_bytes = _fold(storage, "manifests/", lambda infos: _count_bytes(
        i for i in infos if _name_of(i).endswith(".db")
        and layout.is_version_id(_name_of(i)[:-3])))
    blobs, blob_bytes = _fold(storage, "blobs/", lambda infos: _count_bytes(
        i for i in infos if layout.is_blob_id(_name_of(i))))

    def names(infos: Iterable[ObjectInfo]) -> tuple[int, int]:
        datasets, labels = set(), 0
        for info in infos:
            parsed = layout.parse_name_key(info.key)
            if parsed:
                datasets.add(parsed[:2])
                labels += 1
        return len(datasets), labels

    datasets, labels = _fold(storage, "names/", names)
    return RepoStats(url=repo.url, format=int(marker.get("format", 0)),
                     hash=str(marker.get("hash", "sha256")), chunk_size=repo.chunk_size,
                     pack_size=repo.pack_size, datasets=datasets, versions=versions,
                     labels=labels, blobs=blobs, blob_bytes=blob_bytes, manifests=manifests,
                     manifest_bytes=manifest_bytes)


def not_a_repository(storage: Storage) -> NotARepository:
    """The error for a location with no strata.json, saying what to do about it."""
    first = first_key(storage)
    if first is None:
        return NotARepository(
            f"{storage.url} is not a strata repository (nothing is there); create one with "
            f"'strata repo init {storage.url}'")
    return NotARepository(
        f"{storage.url} is not a strata repository (it holds {first!r} but no "
        f"{layout.MARKER_KEY}); give the URL of the folder or prefix that holds "
        f"{layout.MARKER_KEY}, or 'strata repo init' an empty location")


def first_key(storage: Storage) -> str | None:
    """One key at the location, or None if it is empty (stops after the first key)."""
    return _fold(storage, "", lambda infos: next((i.key for i in infos), None))


def _marker(storage: Storage) -> dict | None:
    try:
        data = storage.read(layout.MARKER_KEY)
    except NotFound:
        return None
    try:
        marker = json.loads(data)
    except ValueError:
        marker = None
    if not isinstance(marker, dict):
        raise NotARepository(f"{storage.url_for(layout.MARKER_KEY)} is not a strata format "
                             "marker (not a JSON object); is this really a repository?")
    return marker


def _fold(storage: Storage, prefix: str, fn: Callable[[Iterable[ObjectInfo]], T]) -> T:
    """`fn` over the listing of `prefix` as it streams; retried as a whole on a transient
    failure when the storage retries."""
    if isinstance(storage, RetryingStorage):
        return storage.call(lambda inner: fn(inner.list(prefix)))
    return fn(storage.list(prefix))


def _name_of(info: ObjectInfo) -> str:
    return info.key.rsplit("/", 1)[-1]


def _count_bytes(infos: Iterable[ObjectInfo]) -> tuple[int, int]:
    n = total = 0
    for info in infos:
        n += 1
        total += info.size
    return n, total
