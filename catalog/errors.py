"""Catalog errors: each is a user mistake or a repository state the user can act on.

All derive from `StrataError`, so the CLI reports them as one line and exits non-zero.
"""

from __future__ import annotations

from strata.storage.errors import StrataError


class CatalogError(StrataError):
    pass


class NotARepository(CatalogError):
    pass


class UnknownVersion(CatalogError):
    pass


class WrongState(CatalogError):
    """The version is in a state that does not allow the operation (e.g. adding to a final one)."""


class InvalidPath(CatalogError):
    """A dataset path that is absolute, contains '..', or is otherwise unsafe."""


class SourceMissing(CatalogError):
    pass


class SourceChanged(CatalogError):
    """A staged local file changed or vanished between add and upload."""


class HasChildren(CatalogError):
    pass


class LabelTaken(CatalogError):
    pass


class TargetNotEmpty(CatalogError):
    pass


class NothingMatched(CatalogError):
    pass


class BadArgument(CatalogError):
    pass
