"""Local sources: what `add_files` / `sync_folder` find in a local file or folder.

One `os.scandir` walk, one lstat per entry (scandir caches it). A symlink is kept as a
symlink when its target is relative and stays inside the folder being added (rsync's
notion of a safe link); other symlinks are followed, and dangling ones are skipped.
Sockets, fifos and devices are skipped. Empty folders are reported so they survive.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass

from strata.catalog import paths
from strata.catalog.errors import BadArgument, SourceMissing


@dataclass(frozen=True, slots=True)
class Candidate:
    """A local file system object about to be staged at dataset path `path`."""
    path: str
    source: str
    kind: str          # 'f' file, 'l' symlink, 'd' empty directory
    size: int
    mode: int
    mtime_ns: int
    target: str | None = None
    known: dict[int, bytes] | None = None   # chunk index -> digest known unchanged
    # (size, sha256, chunk digests) known for the whole file as it is now (a frozen
    # overlay file hashed after its last writer closed it): used instead of hashing it
    hashed: tuple[int, str, bytes | None] | None = None


def patterns_of(wildcard) -> list[str]:
    if not wildcard:
        return []
    if isinstance(wildcard, str):
        return [wildcard]
    if not isinstance(wildcard, (list, tuple)) or not all(isinstance(w, str) for w in wildcard):
        raise BadArgument(f"wildcard must be a pattern or a list of them, got {wildcard!r}")
    return list(wildcard)


def collect(source: str, prefix: str, *, recursive: bool, wildcard,
            as_folder: bool = False) -> list[Candidate]:
    src = os.path.abspath(source)
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise SourceMissing(f"{source} does not exist") from None
    except PermissionError:
        raise SourceMissing(f"{source} cannot be read (permission denied)") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        if as_folder:
            raise SourceMissing(f"{source} is not a folder")
        if not stat_mod.S_ISREG(st.st_mode):   # opening a fifo would wait for a writer
            raise BadArgument(f"{source} is not a regular file or a folder (a fifo, "
                              f"socket or device): there are no bytes to store")
        rel = paths.clean(os.path.basename(src), what="file name")
        return [_file(paths.join(prefix, rel), src, st)]
    out: list[Candidate] = []
    _walk(src, "", os.path.realpath(src) + os.sep, prefix, patterns_of(wildcard),
          recursive, out)
    return out


def _walk(folder: str, rel_dir: str, real_root: str, prefix: str, patterns: list[str],
          recursive: bool, out: list[Candidate]) -> None:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise SourceMissing(f"{folder} cannot be read (permission denied)") from None
    if not entries and rel_dir and not patterns:
        st = os.lstat(folder)
        out.append(Candidate(paths.join(prefix, rel_dir), folder, "d", 0,
                             stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns))
        return
    subdirs = []
    for e in entries:
        rel = paths.join(rel_dir, e.name)
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat_mod.S_ISDIR(st.st_mode):
            subdirs.append((e.path, rel))
            continue
        if patterns and not any(paths.matches(rel, p, recursive=recursive) for p in patterns):
            continue
        dest = paths.join(prefix, paths.clean(rel, what="file name"))
        if stat_mod.S_ISREG(st.st_mode):
            out.append(_file(dest, e.path, st))
        elif stat_mod.S_ISLNK(st.st_mode):
            c = _link(dest, e.path, st, real_root)
            if c is not None:
                out.append(c)
    if recursive:
        for path, rel in subdirs:
            _walk(path, rel, real_root, prefix, patterns, recursive, out)


def _link(dest: str, full: str, lst: os.stat_result, real_root: str) -> Candidate | None:
    target = os.readlink(full)
    if not os.path.isabs(target) and os.path.realpath(full).startswith(real_root):
        return Candidate(dest, full, "l", 0, 0o777, lst.st_mtime_ns, target)
    try:
        st = os.stat(full)
    except (FileNotFoundError, NotADirectoryError):
        return None   # dangling link pointing outside: nothing to store
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return _file(dest, full, st)


def _file(dest: str, src: str, st: os.stat_result) -> Candidate:
    return Candidate(dest, src, "f", st.st_size, stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns)
