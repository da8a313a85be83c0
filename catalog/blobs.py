"""Blobs: hashing local files, turning them into chunk and pack blobs, reading them back.

A file of at least `chunk_size` bytes becomes fixed-size chunks, each a blob named by its
sha256 (identical chunks anywhere are stored once). Smaller files are concatenated in path
order into packs of about `pack_size`; the manifest keeps (pack, offset, size). Bytes read
back are verified against the hash that names them before anyone sees them.

Concurrency: `upload` reads and hashes in worker threads (hashlib and file reads release
the GIL, so two cores hash in parallel) and writes blobs on the same bounded pool; the
caller's thread alone touches the draft database, applying results as they complete.

Hashing once. A file hashed at add time carries a stamp (inode and ctime) when its ctime
was already older than SETTLE_NS at the moment it was opened: any later change or
replacement then gives it a newer ctime (the "racy git" rule). At upload, a source whose
stamp and size still match is trusted and not hashed again; any other source is rehashed
and refused if its bytes changed. A chunk whose blob already exists is not even read: the
version records the bytes that were hashed, and those are stored.

Storing at add. Where writes are cheap (a folder repository), `hash_and_store` writes the
blobs in the read that hashes the files, so every byte is read once; upload then only
checks, with `check_stored`, that the sources are unchanged and the blobs still there.

Durability. On backends that support it (the local folder), blobs are written without one
fsync each and made durable in batches of DURABLE_EVERY bytes; a placement reaches the
draft only after its batch is durable, so a resumed upload never trusts a blob that a
power cut may have truncated (and `Repository.put_blob` checks sizes of existing blobs).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from strata.catalog.errors import SourceChanged, WrongState
from strata.catalog.manifest import Entry, chunk_ids
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.storage.errors import Corrupt

READ_BLOCK = 1 << 20
UPLOAD_WORKERS = max(4, (os.cpu_count() or 2) * 2)
PACK_MAX_FILES = 4096   # also cap packs by count, so many tiny files build in parallel
SETTLE_NS = 2_000_000_000   # a source unchanged for this long before hashing gets a stamp
DURABLE_EVERY = 512 << 20   # bytes written between durability barriers


@dataclass(frozen=True, slots=True)
class FileHash:
    size: int
    sha256: str
    chunks: bytes | None  # concatenated chunk digests, for files >= chunk_size
    stamp: str | None = None  # see the module docstring: set when the hash can be trusted


def stamp_of(st: os.stat_result) -> str:
    return f"{st.st_ino:x}:{st.st_ctime_ns:x}:{st.st_size:x}"


class HashStopped(Exception):
    """hash_file gave up because its `stop` said so."""


def hash_file(path: str, chunk_size: int, *, frozen: bool = False,
              known: dict[int, bytes] | None = None,
              stop: Callable[[], bool] | None = None) -> FileHash:
    """sha256 of the whole file and, for large files, of each chunk, in one read pass.
    `frozen`: the caller guarantees nothing writes the file any more (a frozen overlay
    generation), so it gets a stamp however fresh it is. `known`: digests of whole chunks
    the caller knows (chunk index -> digest; a copied-up file's untouched chunks): used
    instead of hashing those chunks, which are stored already. `stop`: asked before each
    chunk; True raises HashStopped (a background hash whose file changed or went away)."""
    return _hash(path, chunk_size, frozen=frozen, known=known, stop=stop)[0]


def _hash(path: str, chunk_size: int, on_chunk: Callable[[bytes, bytes], None] | None = None,
          *, frozen: bool = False, known: dict[int, bytes] | None = None,
          stop: Callable[[], bool] | None = None) -> tuple[FileHash, bytes | None]:
    """hash_file, also returning a small file's bytes; `on_chunk(digest, bytes)` sees each
    chunk of a large file as it is hashed."""
    whole = hashlib.sha256()
    opened_ns = time.time_ns()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        settled = frozen or st.st_ctime_ns < opened_ns - SETTLE_NS
        stamp = stamp_of(st) if settled else None
        if st.st_size < chunk_size:
            data = _read_to_end(fd, st.st_size, chunk_size)
            if len(data) < chunk_size:
                whole.update(data)
                return FileHash(len(data), whole.hexdigest(), None,
                                stamp if len(data) == st.st_size else None), data
            # grew to a chunk's size since fstat: hash it as the large file it now is
        digests = bytearray()
        total = 0
        while True:
            if stop is not None and stop():
                raise HashStopped(path)
            chunk = _pread_exact(fd, total, chunk_size)
            if not chunk:
                break
            whole.update(chunk)
            digest = known.get(total // chunk_size) if known and len(chunk) == chunk_size \
                else None
            if digest is None:
                digest = hashlib.sha256(chunk).digest()
                if on_chunk is not None:
                    on_chunk(digest, chunk)
            digests += digest
            total += len(chunk)
    finally:
        os.close(fd)
    return FileHash(total, whole.hexdigest(), bytes(digests),
                    stamp if total == st.st_size else None), None


@dataclass(frozen=True, slots=True)
class Staged:
    """A local file staged in a draft, waiting to become blobs."""
    path: str           # dataset path
    source: str         # local file it was added from
    size: int
    sha256: str
    chunks: bytes | None
    stamp: str | None = None   # hash_file's stamp: unchanged since hashed if it still matches


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
    return SourceChanged(f"{s.source} {why} since it was added as {s.path!r}; add it "
                         f"again, or take it out with 'strata remove --files {s.path}', "
                         f"then close")


def _open_source(s: Staged) -> tuple[int, bool]:
    """A descriptor of the staged file, and whether its staged hash can be trusted.
    (Plain descriptors: a Python file object per small file costs more than its bytes.)"""
    try:
        fd = os.open(s.source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _changed(s, "vanished") from None
    try:
        return fd, _unchanged(s, os.fstat(fd))
    except SourceChanged:
        os.close(fd)
        raise


def _unchanged(s: Staged, st: os.stat_result) -> bool:
    """Refuses a staged file whose size changed; True if its stamp shows it unchanged
    since it was hashed (else only hashing it again can tell)."""
    if st.st_size != s.size:
        raise _changed(s, "changed size")
    return s.stamp is not None and stamp_of(st) == s.stamp


def _read_small(s: Staged) -> bytes:
    fd, trusted = _open_source(s)
    try:
        data = _read_to_end(fd, s.size, s.size + 1)
    finally:
        os.close(fd)
    if len(data) != s.size or (not trusted and hashlib.sha256(data).hexdigest() != s.sha256):
        raise _changed(s, "changed")
    return data


def _read_to_end(fd: int, size: int, limit: int) -> bytes:
    """A small file's bytes, expected to be `size`, reading at most `limit` (one more
    than `size` shows that it grew). A regular file returns fewer bytes than asked only at
    its end, so when the first read gives exactly `size` no second read is needed to see
    the end (for 100k tiny files that is 100k syscalls fewer)."""
    want = min(size + 1, limit)
    data = os.pread(fd, want, 0)
    if len(data) == size or len(data) == want or not data:
        return data
    return data + _pread_exact(fd, len(data), want - len(data))


def _pread_exact(fd: int, offset: int, length: int) -> bytes:
    """Up to `length` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Stored:
    """Where `hash_and_store` put a file's bytes: a pack and offset for a small file (pack
    None for an empty one), or the chunks named by its FileHash for a large file."""
    pack: str | None
    offset: int


def hash_and_store(repo, sources: list[tuple[str, dict[int, bytes] | None]],
                   dedup: dict[str, tuple[str, int]], claimed: set[str],
                   lock: threading.Lock, *, frozen: bool = False
                   ) -> tuple[list[tuple[FileHash, Stored | None]], int]:
    """Hash files and store their bytes in the same read, for a repository whose writes
    are cheap (a folder): a large file's chunks are written as they are hashed, and the
    batch's small files whose bytes are not stored yet become one pack. `dedup` (sha256
    to pack and offset) and `claimed` (sha256 of small files some batch is packing) are
    shared by the batches running at once, under `lock`. Returns, per source, its hash
    and where its bytes are (None when another batch is packing the same bytes: upload
    places it), and the bytes written. Writes skip their flush: the caller makes them
    durable before it records them. Each source comes with its known chunk digests, and
    `frozen` applies, as for hash_file."""
    written = 0
    out: list[tuple[FileHash, Stored | None]] = []
    pack = bytearray()
    in_pack: dict[str, int] = {}   # sha256 -> offset in this batch's pack
    waiting: list[int] = []         # indexes in `out` placed once the pack is stored

    def store_chunk(digest: bytes, chunk: bytes) -> None:
        nonlocal written
        if repo.put_blob(digest.hex(), chunk, durable=False):
            written += len(chunk)

    for source, known in sources:
        h, data = _hash(source, repo.chunk_size, store_chunk, frozen=frozen, known=known)
        if h.chunks is not None or h.size == 0:
            out.append((h, Stored(None, 0)))
            continue
        if h.sha256 in in_pack:
            waiting.append(len(out))
            out.append((h, None))
            continue
        with lock:
            where = dedup.get(h.sha256)
            mine = where is None and h.sha256 not in claimed
            if mine:
                claimed.add(h.sha256)
        if where is not None:
            out.append((h, Stored(*where)))
        elif mine:
            in_pack[h.sha256] = len(pack)
            pack += data
            waiting.append(len(out))
            out.append((h, None))
        else:
            out.append((h, None))
    if pack:
        blob = hashlib.sha256(pack).hexdigest()
        if repo.put_blob(blob, pack, durable=False):
            written += len(pack)
        with lock:
            for sha, offset in in_pack.items():
                dedup.setdefault(sha, (blob, offset))
        for i in waiting:
            h = out[i][0]
            out[i] = (h, Stored(blob, in_pack[h.sha256]))
    return out, written


def check_stored(repo, stored: list[tuple[Staged, str | None, int]],
                 progress: Progress = NO_PROGRESS) -> list[Staged]:
    """Files whose bytes add already stored (`hash_and_store`), with their pack and
    offset: checks that each source is unchanged since add (same stamp, or else the same
    sha256: a source too fresh at add to carry a stamp is read again) and returns those
    with a blob missing (removed by gc since), to be uploaded again. A changed or
    vanished source is refused, as upload refuses it."""
    fresh = []
    for s, _, _ in stored:
        try:
            st = os.stat(s.source)
        except FileNotFoundError:
            raise _changed(s, "vanished") from None
        if not _unchanged(s, st):
            fresh.append(s)
    if fresh:
        progress.start("checking", sum(s.size for s in fresh))
        for s in fresh:
            if hash_file(s.source, repo.chunk_size).sha256 != s.sha256:
                raise _changed(s, "changed")
            progress.advance(s.size)
        progress.done()
    present: dict[str, bool] = {}

    def have(blob: str) -> bool:
        if blob not in present:
            present[blob] = repo.blob_size(blob) is not None
        return present[blob]

    missing = []
    for s, pack, _ in stored:
        blobs_of = ([pack] if pack else []) if s.chunks is None else chunk_ids(s.chunks)
        if not all(have(b) for b in blobs_of):
            missing.append(s)
    return missing


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
    not_durable: list[Placed] = []   # placed, but their blobs may not be durable yet
    since_barrier = 0

    def barrier() -> None:
        nonlocal since_barrier
        repo.make_durable()
        if not_durable:
            on_placed(not_durable[:])
            not_durable.clear()
        since_barrier = 0

    with ThreadPoolExecutor(UPLOAD_WORKERS, thread_name_prefix="strata-upload") as pool:
        pending: set[Future] = set()

        def drain(limit: int) -> None:
            nonlocal written, since_barrier
            while len(pending) > limit:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    placed = fut.result()
                    new = sum(p.new_bytes for p in placed)
                    written += new
                    since_barrier += new
                    for p in placed:
                        if p.pack:
                            dedup.setdefault(p.sha256, (p.pack, p.offset))
                    not_durable.extend(placed)
                if since_barrier >= DURABLE_EVERY:
                    barrier()

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
        try:
            drain(0)
        finally:
            barrier()   # what did finish is recorded, also when a source changed
    for s in twins:
        blob, offset = dedup[s.sha256]
        on_placed([Placed(s.path, s.sha256, blob, offset, None, 0)])
        progress.advance(s.size)
    return written


def _upload_chunked(repo, s: Staged, progress: Progress) -> list[Placed]:
    fd, trusted = _open_source(s)
    new = 0
    try:
        for i in range(len(s.chunks) // 32):
            offset = i * repo.chunk_size
            length = min(repo.chunk_size, s.size - offset)
            digest = s.chunks[i * 32:(i + 1) * 32]

            def chunk(offset=offset, length=length, digest=digest) -> bytes:
                data = _pread_exact(fd, offset, length)
                if len(data) != length or (not trusted
                                           and hashlib.sha256(data).digest() != digest):
                    raise _changed(s, "changed")
                return data
            # a chunk already stored is not read: the version records the staged bytes
            if repo.put_blob(digest.hex(), chunk, size=length, durable=False):
                new += length
            progress.advance(length)
    finally:
        os.close(fd)
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
    new = len(buf) if repo.put_blob(blob, buf, durable=False) else 0
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
                       lambda: repo.read_blob(entry.pack, entry.offset, entry.size,
                                              exact=True),
                       entry.sha256, entry.path)
        return
    for cid in entry.chunk_ids:
        yield verified(repo, cid, lambda cid=cid: repo.read_blob(cid), cid,
                       f"a chunk of {entry.path}")


