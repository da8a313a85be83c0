"""A repository: one storage URL holding blobs, manifests, version records and labels.

This module owns the repository-level operations that the rest of the catalog builds on:
the format marker, records with compare-and-swap updates, label claims, and fetching
manifests into the local cache (verified against the hash the record gives).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

from strata.catalog import config as config_mod
from strata.catalog import layout
from strata.catalog.errors import BadArgument, NotARepository, UnknownVersion
from strata.catalog.manifest import Manifest
from strata.catalog.records import VersionRecord
from strata.storage import open_storage
from strata.storage.base import Storage
from strata.storage.errors import Corrupt, NotFound, PreconditionFailed

DEFAULT_CHUNK_SIZE = 8 << 20
DEFAULT_PACK_SIZE = 64 << 20
# Chunks and packs are built in memory, several at a time, so they must stay far below
# memory; tiny ones make millions of objects (a 1-byte chunk size never finished adding).
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 1 << 30
FORMAT_VERSION = 1
CAS_ATTEMPTS = 50


class Repository:
    def __init__(self, storage: Storage, *, cache_dir: Path, chunk_size: int,
                 pack_size: int):
        self.storage = storage
        self.url = storage.url
        self.cache_dir = Path(cache_dir)
        self.chunk_size = chunk_size
        self.pack_size = pack_size
        self._manifests: dict[str, Manifest] = {}
        self._records: dict[str, VersionRecord] = {}
        self._lock = threading.Lock()

    # ---- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, url: str | None = None, *, create: bool = False,
             cache_dir: Path | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
             pack_size: int = DEFAULT_PACK_SIZE) -> "Repository":
        """Open the repository at `url` (default from config). With `create`, an empty
        location is initialised; a location holding other things is never taken over."""
        cfg = config_mod.load(url)
        storage = open_storage(cfg.repo)
        cache_dir = Path(cache_dir) if cache_dir else cfg.cache_dir
        try:
            marker = json.loads(storage.read(layout.MARKER_KEY))
        except NotFound:
            if not (create or cfg.repo == config_mod.embedded_repo_url()):
                raise NotARepository(
                    f"{storage.url} is not a strata repository (no {layout.MARKER_KEY}); "
                    f"check the URL, or make an empty location one with "
                    f"'strata repo init {storage.url}'") from None
            problem = size_problem(chunk_size, pack_size)
            if problem:
                raise BadArgument(problem)
            marker = cls._initialise(storage, chunk_size, pack_size)
        except ValueError:
            raise NotARepository(f"{storage.url}/{layout.MARKER_KEY} is not valid JSON") from None
        if not isinstance(marker, dict):
            raise NotARepository(f"{storage.url}/{layout.MARKER_KEY} is not a JSON object")
        if marker.get("format") != FORMAT_VERSION:
            raise NotARepository(f"{storage.url} has repository format "
                                 f"{marker.get('format')!r}; this strata reads {FORMAT_VERSION}")
        chunk_size = marker.get("chunk_size")
        pack_size = marker.get("pack_size", DEFAULT_PACK_SIZE)
        problem = size_problem(chunk_size, pack_size)
        if problem:
            raise NotARepository(f"{storage.url}/{layout.MARKER_KEY} is damaged: {problem}")
        return cls(storage, cache_dir=cache_dir, chunk_size=chunk_size, pack_size=pack_size)

    @staticmethod
    def _initialise(storage: Storage, chunk_size: int, pack_size: int) -> dict:
        existing = next(iter(storage.list("")), None)
        if existing is not None:
            raise NotARepository(
                f"{storage.url} is not empty and holds no {layout.MARKER_KEY}; "
                "refusing to turn it into a strata repository")
        marker = {"format": FORMAT_VERSION, "chunk_size": chunk_size, "pack_size": pack_size,
                  "hash": "sha256"}
        try:
            storage.write(layout.MARKER_KEY, json.dumps(marker, indent=1).encode(),
                          if_absent=True)
        except PreconditionFailed:  # someone initialised it at the same time: use theirs
            return json.loads(storage.read(layout.MARKER_KEY))
        return marker

    # ---- version records -----------------------------------------------------------
    def record(self, version_id: str) -> VersionRecord:
        if not layout.is_version_id(version_id):
            raise UnknownVersion(f"{version_id!r} is not a version id (32 hex digits)")
        try:
            key = layout.record_key(version_id)
            return VersionRecord.from_json(self.storage.read(key), self.storage.url_for(key))
        except NotFound:
            raise UnknownVersion(f"no version {version_id} in {self.url}") from None

    def record_with_etag(self, version_id: str) -> tuple[VersionRecord, str]:
        if not layout.is_version_id(version_id):
            raise UnknownVersion(f"{version_id!r} is not a version id (32 hex digits)")
        key = layout.record_key(version_id)
        # stat before read: if the record changes in between, the etag is stale and a
        # compare-and-swap built on it fails and retries, so no update is ever lost
        try:
            etag = self.storage.stat(key).etag
            data = self.storage.read(key)
        except NotFound:
            raise UnknownVersion(f"no version {version_id} in {self.url}") from None
        return VersionRecord.from_json(data, self.storage.url_for(key)), etag

    def try_record(self, version_id: str) -> VersionRecord | None:
        try:
            return self.record(version_id)
        except UnknownVersion:
            return None

    def create_record(self, record: VersionRecord) -> None:
        self.storage.write(layout.record_key(record.id), record.to_json(), if_absent=True)

    def update_record(self, version_id: str,
                      change: Callable[[VersionRecord], VersionRecord]) -> VersionRecord:
        """Apply `change` by compare-and-swap on the record's etag, retrying on conflict,
        so concurrent writers lose no update."""
        for _ in range(CAS_ATTEMPTS):
            rec, etag = self.record_with_etag(version_id)
            new = change(rec)
            if new == rec:
                return rec
            try:
                self.storage.write(layout.record_key(version_id), new.to_json(), if_match=etag)
                return new
            except PreconditionFailed:
                continue
        raise PreconditionFailed(self.storage.url_for(layout.record_key(version_id)),
                                 f"record kept changing; gave up after {CAS_ATTEMPTS} tries")

    def delete_record(self, version_id: str) -> None:
        self.storage.delete(layout.record_key(version_id))

    def all_version_ids(self) -> list[str]:
        out = []
        for info in self.storage.list("versions/"):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and layout.is_version_id(name[:-5]):
                out.append(name[:-5])
        return sorted(out)

    # ---- labels --------------------------------------------------------------------
    def labels(self, project: str, name: str) -> dict[str, str]:
        """label -> version id for one dataset."""
        out = {}
        for info in self.storage.list(layout.names_prefix(project, name)):
            parsed = layout.parse_name_key(info.key)
            if parsed and parsed[:2] == (project, name):
                try:
                    out[parsed[2]] = self.storage.read(info.key).decode().strip()
                except NotFound:
                    continue
        return out

    def datasets(self) -> Iterator[tuple[str, str, str]]:
        """(project, name, label) for every claimed label."""
        for info in self.storage.list("names/"):
            parsed = layout.parse_name_key(info.key)
            if parsed:
                yield parsed

    def claim_label(self, project: str, name: str, label: str, version_id: str) -> bool:
        """Claim `label` for `version_id` only if absent. True if it is ours now."""
        key = layout.name_key(project, name, label)
        try:
            self.storage.write(key, version_id.encode(), if_absent=True)
            return True
        except PreconditionFailed:
            try:
                return self.storage.read(key).decode().strip() == version_id
            except NotFound:
                return self.claim_label(project, name, label, version_id)

    def release_label(self, project: str, name: str, label: str) -> None:
        self.storage.delete(layout.name_key(project, name, label))

    # ---- manifests -----------------------------------------------------------------
    def manifest(self, version_id: str, expected_sha256: str | None = None) -> Manifest:
        """The manifest of a final version, fetched once into the local cache."""
        with self._lock:
            m = self._manifests.get(version_id)
        if m is not None:
            return m
        if expected_sha256 is None:
            expected_sha256 = self.record(version_id).manifest_sha256
        folder = self.cache_dir / "manifests"
        # named by the hash it was verified against when it was written here, so a cached
        # manifest is trusted without hashing it again (1.3M files: ~400 MB)
        path = folder / f"{version_id}-{expected_sha256}.db"
        if not path.exists():
            key = layout.manifest_key(version_id)
            try:
                data = self.storage.read(key)
            except NotFound:
                raise UnknownVersion(f"manifest of version {version_id} is missing from "
                                     f"{self.url}") from None
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise Corrupt(self.storage.url_for(key), "manifest does not match its record")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{version_id}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        m = Manifest(str(path), version_id)
        with self._lock:
            self._manifests.setdefault(version_id, m)
            return self._manifests[version_id]

    def put_manifest(self, version_id: str, local_path: str) -> str:
        data = Path(local_path).read_bytes()
        self.storage.write(layout.manifest_key(version_id), data)
        return hashlib.sha256(data).hexdigest()

    def delete_manifest(self, version_id: str) -> None:
        self.storage.delete(layout.manifest_key(version_id))
        with self._lock:
            m = self._manifests.pop(version_id, None)
        if m:
            m.close()

    # ---- blobs ---------------------------------------------------------------------
    def put_blob(self, blob_id: str, data, *, size: int | None = None,
                 durable: bool = True) -> bool:
        """Store a blob unless present. True if bytes were written.

        `data` is the bytes, or a callable that returns them (then `size` gives their
        length): it is called only when the blob must be written, so the source of a
        stored blob is never read. A stored blob of the wrong size is a torn write (a
        crash before it was durable): its name fixes its bytes, so it is replaced. With
        durable=False the write may skip its own flush (the local folder) until
        `make_durable()`."""
        stored = self.blob_size(blob_id)
        if stored is not None and stored == (len(data) if size is None else size):
            return False
        if callable(data):
            data = data()
        with self._deferred() if not durable else contextlib.nullcontext():
            try:
                self.storage.write(layout.blob_key(blob_id), data, if_absent=stored is None)
                return True
            except PreconditionFailed:
                return False

    def blob_size(self, blob_id: str) -> int | None:
        """The stored size of a blob, or None if it is not stored."""
        try:
            return self.storage.stat(layout.blob_key(blob_id)).size
        except NotFound:
            return None

    @property
    def stores_on_add(self) -> bool:
        """Whether adding files stores their bytes at once, in the read that hashes them:
        where writes are cheap and can be flushed in batches (a folder), instead of
        reading every file twice. Upload then only checks the sources are unchanged."""
        return hasattr(self.storage, "deferred_durability")

    def _deferred(self):
        defer = getattr(self.storage, "deferred_durability", None)
        return defer() if defer is not None else contextlib.nullcontext()

    def make_durable(self) -> None:
        """Flush blobs written with durable=False (a no-op where writes are durable)."""
        flush = getattr(self.storage, "make_durable", None)
        if flush is not None:
            flush()

    def read_blob(self, blob_id: str, offset: int = 0, length: int | None = None, *,
                  exact: bool = False) -> bytes:
        """A blob, or `length` bytes of it from `offset` (fewer where it ends first). With
        `exact`, a blob that ends before `offset + length` (cut short in storage) raises
        `Corrupt` saying so, instead of returning bytes that fail their hash."""
        key = layout.blob_key(blob_id)
        if length is None:
            return self.storage.read(key)
        data = self.storage.read_range(key, offset, length)
        if exact and len(data) < length:
            raise Corrupt(self.storage.url_for(key),
                          f"blob is cut short: it ends at byte {offset + len(data)}, "
                          f"bytes {offset}-{offset + length - 1} were expected")
        return data

    def blob_ids(self) -> Iterator[tuple[str, int, float | None]]:
        for info in self.storage.list("blobs/"):
            name = info.key.rsplit("/", 1)[-1]
            if layout.is_blob_id(name):
                yield name, info.size, info.mtime

    def delete_blob(self, blob_id: str) -> None:
        self.storage.delete(layout.blob_key(blob_id))


def size_problem(chunk_size, pack_size) -> str | None:
    """What is wrong with a chunk and pack size, or None when both are usable."""
    for what, value in (("chunk size", chunk_size), ("pack size", pack_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{what} {value!r} is not a number of bytes"
        if not MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE:
            return (f"{what} of {value} bytes is out of range "
                    f"({MIN_BLOCK_SIZE >> 10}K to {MAX_BLOCK_SIZE >> 30}G)")
    return None


# One Repository per (URL, cache folder) for the process. Here rather than with Dataset so
# that a mount server, which needs only this, does not import the write path (the mount
# server's imports: 144-147 -> 125-129 ms, process start included).
_repos: dict[str, Repository] = {}


def open_repo(repo: str | Repository | None = None, *, create: bool = False) -> Repository:
    if isinstance(repo, Repository):
        return repo
    cfg = config_mod.load(repo)
    key = f"{cfg.repo}|{cfg.cache_dir}"
    if key not in _repos:
        _repos[key] = Repository.open(cfg.repo, create=create)
    return _repos[key]
