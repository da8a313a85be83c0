"""Turning a version into plain files: `get --copy` (a mutable folder) and `get_local_copy`
(a read-only merged folder in the cache whose files are hard links to verified objects
stored once per content, so two versions sharing a file share its bytes on disk).

Small files are fetched by coalescing neighbours in a pack into one ranged read; each file
is verified by its sha256, each chunk by its blob id, before it is written anywhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from strata.catalog import paths
from strata.catalog.blobs import iter_entry_bytes, verified
from strata.catalog.errors import BadArgument, InvalidPath, TargetNotEmpty
from strata.catalog.manifest import Entry
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.storage import directio

SPAN_GAP = 1 << 20       # read through gaps up to this size rather than issue two reads
SPAN_MAX = 64 << 20
SPAN_FILES = 256         # files per span: many small files spread over the workers
FETCH_WORKERS = 8


def select_part(entries: list[Entry], part: int | None, num_parts: int | None) -> list[Entry]:
    """A deterministic 1/N share: files in path order, cut into N contiguous runs of about
    equal bytes (contiguous so each node reads its packs sequentially)."""
    if part is None and num_parts is None:
        return entries
    if part is None or num_parts is None or num_parts < 1 or not 0 <= part < num_parts:
        raise BadArgument("--part K needs --num-parts N with 0 <= K < N")
    entries = sorted(entries, key=lambda e: e.path)
    total = sum(max(e.size, 1) for e in entries)
    out, acc = [], 0
    for e in entries:
        w = max(e.size, 1)
        # a file belongs to the part in which its midpoint falls
        if int((acc + w / 2) * num_parts // total) == part:
            out.append(e)
        acc += w
    return out


@dataclass
class _Span:
    pack: str
    start: int
    end: int
    members: list[Entry]


def _spans(small: Iterable[Entry]) -> list[_Span]:
    by_pack: dict[str, list[Entry]] = {}
    for e in small:
        by_pack.setdefault(e.pack, []).append(e)
    spans = []
    for pack, members in by_pack.items():
        members.sort(key=lambda e: e.offset)
        cur = None
        for e in members:
            if (cur and e.offset - cur.end <= SPAN_GAP and len(cur.members) < SPAN_FILES
                    and e.offset + e.size - cur.start <= SPAN_MAX):
                cur.end = max(cur.end, e.offset + e.size)
                cur.members.append(e)
            else:
                cur = _Span(pack, e.offset, e.offset + e.size, [e])
                spans.append(cur)
    return spans


def fetch(repo, entries: list[Entry], sink: Callable[[Entry, list[bytes]], None],
          progress: Progress = NO_PROGRESS) -> None:
    """Fetch the bytes of file entries (verified) and hand each file to `sink`, from a
    bounded pool of threads."""
    small = [e for e in entries if e.kind == "f" and e.pack]
    other = [e for e in entries if e.kind in ("f", "x") and not e.pack]

    def do_span(span: _Span) -> None:
        data = repo.read_blob(span.pack, span.start, span.end - span.start, exact=True)
        for e in span.members:
            lo = e.offset - span.start
            piece = data[lo:lo + e.size]
            if hashlib.sha256(piece).hexdigest() != e.sha256:
                piece = verified(repo, e.pack, lambda e=e: repo.read_blob(
                                     e.pack, e.offset, e.size, exact=True),
                                 e.sha256, e.path)
            sink(e, [piece])
            progress.advance(e.size)

    def do_file(e: Entry) -> None:
        parts = []
        for piece in iter_entry_bytes(repo, e):
            if stop.is_set():
                return
            parts.append(piece)
            progress.advance(len(piece))
        sink(e, parts)

    # a failure or Ctrl-C stops the fetch: queued files are dropped, and a large file
    # being fetched stops at its next chunk (a pool's exit would wait for them all)
    stop = threading.Event()
    pool = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="strata-fetch")
    try:
        futures = [pool.submit(do_span, s) for s in _spans(small)]
        futures += [pool.submit(do_file, e) for e in other]
        for f in futures:
            f.result()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


class _SafeTree:
    """Creates folders under `root`, refusing any path that would leave it (a symlink
    planted in the way, or a hostile manifest path)."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def path(self, rel: str) -> str:
        if not paths.is_safe(rel):
            raise InvalidPath(f"refusing unsafe dataset path {rel!r}")
        return os.path.join(self.root, *rel.split("/"))

    def parent_ready(self, rel: str) -> str:
        full = self.path(rel)
        folder = os.path.dirname(full)
        with self._lock:
            if folder not in self._made:
                os.makedirs(folder, exist_ok=True)
                real = os.path.realpath(folder)
                if real != self.root and not real.startswith(self.root + os.sep):
                    raise InvalidPath(f"{rel!r} would be written outside {self.root}")
                self._made.add(folder)
        return full


def _write_atomic(full: str, parts: list[bytes], mode: int, mtime_ns: int) -> None:
    # beside the file, under a short name: a name of NAME_MAX bytes leaves no room for a
    # suffix; pid and thread tell two gets (and two threads) at once apart
    tmp = os.path.join(os.path.dirname(full),
                       f".strata-{os.getpid()}-{threading.get_ident()}.tmp")
    # large files go past the page cache (storage.directio): a copy of a dataset is
    # written once and read later, and this VM pays most for the page-cache copy
    try:
        fd = directio.create(tmp, parts, exclusive=False)
        try:
            os.fchmod(fd, mode & 0o7777 or 0o644)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        os.replace(tmp, full)
    except OSError as e:
        # a full disk must not keep the partial copy, and the one line names the file
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OSError(e.errno, e.strerror or str(e), full) from None


def check_destination(repo, target: str, *, link: bool = False) -> None:
    """Refuse a destination that is, holds or lies in the repository's folder, the cache
    or the workspace: replacing it (--overwrite, --link) would delete what strata keeps,
    and writing into it would mix a copy with strata's own files. `link`: the target is
    a symlink to be made or replaced, itself (not what it points at)."""
    from strata.catalog import config
    kept = [("the strata cache", repo.cache_dir), ("strata's workspace", config.workspace_dir())]
    if repo.storage.url.startswith("file://"):
        kept.append(("the repository", repo.storage.url[len("file://"):]))
    if link:
        folder, name = os.path.split(os.path.abspath(target))
        dest = os.path.join(os.path.realpath(folder), name)
    else:
        dest = os.path.realpath(target)
    for what, folder in kept:
        folder = os.path.realpath(folder)
        if dest == folder or (dest + os.sep).startswith(folder + os.sep) \
                or folder.startswith(dest + os.sep):
            raise BadArgument(f"{target} overlaps {what} ({folder}); choose a folder "
                              f"outside it")


def _check_target(target: str, overwrite: bool) -> None:
    if os.path.exists(target) and not os.path.isdir(target):
        raise TargetNotEmpty(f"{target} exists and is not a folder")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise TargetNotEmpty(f"{target} is not empty; use --overwrite to replace its contents")


def mutable_copy(ds, target: str, *, overwrite: bool = False, part: int | None = None,
                 num_parts: int | None = None, progress: Progress = NO_PROGRESS) -> str:
    check_destination(ds.repo, target)
    _check_target(target, overwrite)
    view = ds.view()
    entries = select_part(list(view.files.values()), part, num_parts)
    existed = os.path.isdir(target)
    if overwrite and existed:
        _empty(target)
    os.makedirs(target, exist_ok=True)
    try:
        _fill(ds, view, entries, target, part, progress)
    except BaseException:   # a failure or Ctrl-C: the folder is left empty (or not there),
        if existed:         # so that the same command can be run again
            _empty(target)
        else:
            _rmtree_rw(target)
        raise
    return target


def _empty(folder: str) -> None:
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if os.path.isdir(full) and not os.path.islink(full):
            _rmtree_rw(full)
        else:
            os.unlink(full)


def _fill(ds, view, entries: list[Entry], target: str, part: int | None,
          progress: Progress) -> None:
    tree = _SafeTree(target)
    progress.start("get", sum(e.size for e in entries if e.kind != "l"))
    try:
        def sink(e: Entry, parts: list[bytes]) -> None:
            _write_atomic(tree.parent_ready(e.path), parts, e.mode, e.mtime_ns)

        fetch(ds.repo, entries, sink, progress)
        if part is None:
            for d in view.dirs.values():
                full = tree.path(d.path)
                tree.parent_ready(d.path)
                os.makedirs(full, exist_ok=True)
        for e in entries:
            if e.kind == "l":
                full = tree.parent_ready(e.path)
                os.symlink(e.target, full)
        if part is None:  # folder modes last, deepest first: 0o500 must not block writes
            for d in sorted(view.dirs.values(), key=lambda d: d.path.count("/"), reverse=True):
                if d.mode & 0o7777:
                    os.chmod(tree.path(d.path), d.mode & 0o7777)
    finally:
        progress.done()


def local_copy(ds, *, part: int | None = None, num_parts: int | None = None,
               progress: Progress = NO_PROGRESS) -> str:
    """A read-only merged folder in the cache (hard links to objects/<sha256>)."""
    if not ds.is_final():
        raise BadArgument(f"version {ds.id} is a draft; only final versions have local copies")
    cache = ds.repo.cache_dir
    suffix = f".part{part}of{num_parts}" if num_parts else ""
    final = cache / "copies" / f"{ds.id}{suffix}"
    if final.is_dir():
        return str(final)
    objects = cache / "objects"
    view = ds.view()
    entries = select_part(list(view.files.values()), part, num_parts)
    tmp = cache / "copies" / f".{ds.id}{suffix}.{os.getpid()}.tmp"
    for old in (cache / "copies").glob(f".{ds.id}{suffix}.*.tmp"):
        if old == tmp or not _alive(old.name.rsplit(".", 2)[-2]):   # kill -9, power loss
            _rmtree_rw(str(old))
    tmp.mkdir(parents=True)
    tree = _SafeTree(str(tmp))

    objects_dir = str(objects)
    made: set[str] = set()   # object folders known to exist

    def object_path(sha: str) -> str:
        return os.path.join(objects_dir, sha[:2], sha)

    def sink(e: Entry, parts: list[bytes]) -> None:
        dest = tree.parent_ready(e.path)
        if e.kind == "x" or not e.sha256:
            _write_atomic(dest, parts, 0o444, e.mtime_ns)
            return
        obj = object_path(e.sha256)
        folder = os.path.dirname(obj)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        _write_atomic(obj, parts, 0o555 if e.mode & 0o111 else 0o444, e.mtime_ns)
        os.link(obj, dest)

    # fetch each missing object once; every other file with its bytes is a link to it
    need, have, fetching = [], [], set()
    for e in entries:
        if e.kind == "f" and e.sha256 and (e.sha256 in fetching
                                           or os.path.exists(object_path(e.sha256))):
            have.append(e)
            continue
        if e.kind == "f" and e.sha256:
            fetching.add(e.sha256)
        need.append(e)
    progress.start("get", sum(e.size for e in need if e.kind != "l"))
    try:
        fetch(ds.repo, need, sink, progress)
        for e in have:
            os.link(object_path(e.sha256), tree.parent_ready(e.path))
        for e in need:
            if e.kind == "l":
                os.symlink(e.target, tree.parent_ready(e.path))
        if part is None:
            for d in view.dirs.values():
                tree.parent_ready(d.path)
                os.makedirs(tree.path(d.path), exist_ok=True)
    except BaseException:   # a failure or Ctrl-C: no half copy stays in the cache
        _rmtree_rw(str(tmp))
        raise
    finally:
        progress.done()
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same copy first
        _rmtree_rw(str(tmp))
    return str(final)


def copies_usage(cache_dir) -> tuple[int, int]:
    """(versions, bytes) of the read-only copies `get` made in `cache_dir` (their files
    are hard links to one object per content, counted once)."""
    copies = Path(cache_dir) / "copies"
    count = sum(1 for c in copies.iterdir() if not c.name.startswith(".")) \
        if copies.is_dir() else 0
    size = 0
    for folder, _, files in os.walk(Path(cache_dir) / "objects"):
        for name in files:
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return count, size


def clear_copies(cache_dir) -> int:
    """Remove every copy `get` made in `cache_dir` (and the objects they link to);
    returns the bytes freed. A `get` makes its copy again when asked."""
    freed = copies_usage(cache_dir)[1]
    for sub in ("copies", "objects"):
        if (Path(cache_dir) / sub).is_dir():
            _rmtree_rw(str(Path(cache_dir) / sub))
    return freed


def _alive(pid: str) -> bool:
    return pid.isdigit() and os.path.exists(f"/proc/{pid}")


def _rmtree_rw(path: str) -> None:
    def onerror(func, p, exc):
        os.chmod(os.path.dirname(p), 0o755)
        func(p)
    shutil.rmtree(path, onerror=onerror)
