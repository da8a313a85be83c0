"""Blobs: hashing local files, turning them into chunk and pack blobs, reading them back.

A file of at least `chunk_size` bytes becomes fixed-size chunks, each a blob named by its
sha256 (identical chunks anywhere are stored once). Smaller files are concatenated in path
order into packs of about `pack_size`; the manifest keeps (pack, offset, size). Bytes read
back are verified against the hash that names them before anyone sees them.

Concurrency: `upload` reads and hashes in worker threads (hashlib and file reads release
the GIL, so two cores hash in parallel) and writes blobs on the same bounded pool; the
caller's thread alone touches the draft database, applying results as they complete.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from strata.catalog.errors import SourceChanged, WrongState
from strata.catalog.manifest import Entry
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.storage.errors import Corrupt

READ_BLOCK = 1 << 20
UPLOAD_WORKERS = max(4, (os.cpu_count() or 2) * 2)
PACK_MAX_FILES = 4096   # also cap packs by count, so many tiny files build in parallel


@dataclass(frozen=True, slots=True)
class FileHash:
    size: int
    sha256: str
    chunks: bytes | None  # concatenated chunk digests, for files >= chunk_size


def hash_file(path: str, chunk_size: int) -> FileHash:
    """sha256 of the whole file and, for large files, of each chunk, in one read pass."""
    whole = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < chunk_size:
            data = f.read()
            whole.update(data)
            return FileHash(len(data), whole.hexdigest(), None)
        digests = bytearray()
        total = 0
        while True:
            chunk = _read_exact(f, chunk_size)
            if not chunk:
                break
            whole.update(chunk)
            digests += hashlib.sha256(chunk).digest()
            total += len(chunk)
    return FileHash(total, whole.hexdigest(), bytes(digests))


def _read_exact(f, n: int) -> bytes:
    buf = f.read(n)
    if buf is None or len(buf) == n or not buf:
        return buf or b""
    parts = [buf]
    got = len(buf)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Staged:
    """A local file staged in a draft, waiting to become blobs."""
    path: str           # dataset path
    source: str         # local file it was added from
    size: int
    sha256: str
    chunks: bytes | None


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a staged file's bytes now live in the repository."""
    path: str
    sha256: str
    pack: str | None
    offset: int
    chunks: bytes | None
    new_bytes: int  # bytes actually written (0 when every blob already existed)


def _changed(s: Staged, why: str) -> SourceChanged:
    return SourceChanged(f"{s.source} {why} since it was added as {s.path!r}; "
                         "add it again, then upload")


def _read_small(s: Staged) -> bytes:
    try:
        with open(s.source, "rb") as f:
            data = f.read(s.size + 1)
    except FileNotFoundError:
        raise _changed(s, "vanished") from None
    if len(data) != s.size or hashlib.sha256(data).hexdigest() != s.sha256:
        raise _changed(s, "changed")
    return data


def upload(repo, staged: Iterable[Staged], *, dedup: dict[str, tuple[str, int]],
           on_placed: Callable[[list[Placed]], None], progress: Progress = NO_PROGRESS) -> int:
    """Store the bytes of `staged` files as blobs; report placements through `on_placed`
    (called on the caller's thread, once per finished pack or large file) so the draft can
    record progress and a rerun skips what is done. `dedup` maps the sha256 of small files
    already stored (by parents or earlier in this draft) to their (pack, offset).
    Returns the number of new bytes written."""
    staged = sorted(staged, key=lambda s: s.path)
    written = 0
    max_pending = UPLOAD_WORKERS + 2
    with ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="strata-upload") as pool:
        pending: set[Future] = set()

        def drain(limit: int) -> None:
            nonlocal written
            while len(pending) > limit:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    placed = fut.result()
                    written += sum(p.new_bytes for p in placed)
                    for p in placed:
                        if p.pack:
                            dedup.setdefault(p.sha256, (p.pack, p.offset))
                    on_placed(placed)

        pack: list[Staged] = []
        pack_bytes = 0
        in_flight: set[str] = set()   # sha256 of small files in packs not yet stored
        twins: list[Staged] = []      # copies of those, placed once their pack is stored
        for s in staged:
            if s.chunks is not None:
                pending.add(pool.submit(_upload_chunked, repo, s, progress))
            elif s.sha256 in dedup:
                blob, offset = dedup[s.sha256]
                on_placed([Placed(s.path, s.sha256, blob, offset, None, 0)])
                progress.advance(s.size)
                continue
            elif s.size == 0:
                on_placed([Placed(s.path, s.sha256, None, 0, None, 0)])
                continue
            elif s.sha256 in in_flight:
                twins.append(s)
                continue
            else:
                pack.append(s)
                pack_bytes += s.size
                in_flight.add(s.sha256)
                if pack_bytes >= repo.pack_size or len(pack) >= PACK_MAX_FILES:
                    pending.add(pool.submit(_upload_pack, repo, pack, progress))
                    pack, pack_bytes = [], 0
            drain(max_pending)
        if pack:
            pending.add(pool.submit(_upload_pack, repo, pack, progress))
        drain(0)
    for s in twins:
        blob, offset = dedup[s.sha256]
        on_placed([Placed(s.path, s.sha256, blob, offset, None, 0)])
        progress.advance(s.size)
    return written


def _upload_chunked(repo, s: Staged, progress: Progress) -> list[Placed]:
    try:
        f = open(s.source, "rb", buffering=0)
    except FileNotFoundError:
        raise _changed(s, "vanished") from None
    new = 0
    with f:
        if os.fstat(f.fileno()).st_size != s.size:
            raise _changed(s, "changed size")
        for i in range(len(s.chunks) // 32):
            chunk = _read_exact(f, repo.chunk_size)
            digest = s.chunks[i * 32:(i + 1) * 32]
            if hashlib.sha256(chunk).digest() != digest:
                raise _changed(s, "changed")
            if repo.put_blob(digest.hex(), chunk):
                new += len(chunk)
            progress.advance(len(chunk))
        if f.read(1):
            raise _changed(s, "grew")
    return [Placed(s.path, s.sha256, None, 0, s.chunks, new)]


def _upload_pack(repo, members: list[Staged], progress: Progress) -> list[Placed]:
    """Concatenate small files into one pack blob. Identical files inside the pack are
    stored once."""
    buf = bytearray()
    where: dict[str, int] = {}
    offsets = []
    for s in members:
        data = _read_small(s)
        if s.sha256 not in where:
            where[s.sha256] = len(buf)
            buf += data
        offsets.append(where[s.sha256])
        progress.advance(s.size)
    blob = hashlib.sha256(buf).hexdigest()
    new = len(buf) if repo.put_blob(blob, buf) else 0
    return [Placed(s.path, s.sha256, blob, off, None, new if i == 0 else 0)
            for i, (s, off) in enumerate(zip(members, offsets))]


# ---- reading back ----------------------------------------------------------------
def verified(repo, blob_id: str, data_for: Callable[[], bytes], expect: str, what: str) -> bytes:
    """Fetch with `data_for`, check the sha256 against `expect`, refetch once on mismatch."""
    for _ in range(2):
        data = data_for()
        if hashlib.sha256(data).hexdigest() == expect:
            return data
    from strata.catalog import layout
    raise Corrupt(repo.storage.url_for(layout.blob_key(blob_id)),
                  f"corrupt bytes for {what} (sha256 mismatch)")


def iter_entry_bytes(repo, entry: Entry) -> Iterator[bytes]:
    """The bytes of a file entry, unit by unit, each verified before it is yielded."""
    if entry.kind == "x":
        from strata.catalog.external import iter_external
        yield from iter_external(entry)
        return
    if entry.size == 0:
        return
    if not entry.pack and not entry.chunks:
        raise WrongState(f"{entry.path} has not been uploaded yet; run upload first")
    if entry.pack:
        yield verified(repo, entry.pack,
                       lambda: repo.read_blob(entry.pack, entry.offset, entry.size),
                       entry.sha256, entry.path)
        return
    for cid in entry.chunk_ids:
        yield verified(repo, cid, lambda cid=cid: repo.read_blob(cid), cid,
                       f"a chunk of {entry.path}")


