"""Dataset paths: the one place that decides what a path inside a version may look like.

A dataset path is relative, '/'-separated, with no empty, '.' or '..' segments, no NUL and
no backslash. Everything that comes from a user (add, remove, dataset_path) or from a
manifest (read back from storage, so possibly hostile) passes through `clean`.
"""

from __future__ import annotations

import fnmatch
import posixpath

from strata.catalog.errors import InvalidPath


def text(value, what: str) -> str:
    """`value` if it is a string that can be stored (UTF-8: names, paths and fields are
    UTF-8 in manifests, records and object keys). A name read from a file system or a
    command line that is not UTF-8 arrives with its bad bytes as surrogates."""
    if not isinstance(value, str):
        raise InvalidPath(f"{what} must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", "surrogateescape")
            raise InvalidPath(f"{what} {shown!r} is not valid UTF-8, which strata needs for "
                              f"every name and text it stores") from None
    return value


def clean(path: str, *, what: str = "dataset path", allow_root: bool = False) -> str:
    """Normalise `path` (strip leading './' and trailing '/') and reject unsafe forms."""
    text(path, what)
    if "\x00" in path or "\\" in path:
        raise InvalidPath(f"{what} {path!r} contains a NUL or backslash")
    if path.startswith("/"):
        raise InvalidPath(f"{what} {path!r} is absolute; dataset paths are relative")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidPath(f"{what} {path!r} contains '..'")
    out = "/".join(parts)
    if not out and not allow_root:
        raise InvalidPath(f"{what} {path!r} is empty")
    return out


def is_safe(path: str) -> bool:
    """Fast check for manifest paths read back from storage (already normalised on write)."""
    if not path or path[0] == "/" or "\\" in path or "\x00" in path:
        return False
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return False
    return True


def parent_of(path: str) -> str:
    return posixpath.dirname(path)


def name_of(path: str) -> str:
    return posixpath.basename(path)


def ancestors(path: str):
    """Every proper ancestor directory of `path`, nearest first, excluding the root ''."""
    while True:
        path = posixpath.dirname(path)
        if not path:
            return
        yield path


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def is_under(path: str, folder: str) -> bool:
    """True if `path` is `folder` itself or inside it. The root '' contains everything."""
    return not folder or path == folder or path.startswith(folder + "/")


def has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def matches(path: str, pattern: str, *, recursive: bool) -> bool:
    """Wildcard match on the full path; a pattern without '/' also matches base names
    in any folder when `recursive` (so '*.jpg' finds every jpg)."""
    if fnmatch.fnmatchcase(path, pattern):
        return True
    if recursive and "/" not in pattern:
        return fnmatch.fnmatchcase(name_of(path), pattern)
    return False
