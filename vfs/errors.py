"""Errors of the filesystem core. The FUSE adapter maps these (and storage errors) to
errno values in one table; the core itself knows nothing of errno."""

from __future__ import annotations

from strata.storage.errors import StrataError


class VfsError(StrataError):
    pass


class NoEntry(VfsError):
    pass


class NotADirectory(VfsError):
    pass


class IsADirectory(VfsError):
    pass


class ReadOnly(VfsError):
    pass


class Exists(VfsError):
    pass


class NotEmpty(VfsError):
    pass


class NotPermitted(VfsError):
    """An operation strata does not support (hard links, chown to another user, ...)."""


class BadHandle(VfsError):
    pass


class NoAttribute(VfsError):
    pass


class MountError(VfsError):
    """Mounting or unmounting failed (busy mountpoint, missing FUSE, ...)."""


class InvalidArgument(VfsError):
    pass
