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


class BrokenHistory(CatalogError):
    """A version's parents lead back to it: records altered by hand or damaged. Nothing
    strata writes can form a loop (a new version's parents exist before it does)."""

    def __init__(self, version_id: str, again: str):
        super().__init__(f"the history of version {version_id} is a loop: version {again} "
                         f"is among its own ancestors (its records were altered or damaged)")


class DamagedRecord(CatalogError):
    """A version record that cannot be read as one. Reading that version fails with it;
    listings of many versions leave it out with a warning (catalog.ops.records)."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        what = f"version record {where}" if where else "a version record"
        super().__init__(f"{what} is damaged: {reason}")


class DamagedDraft(CatalogError):
    """A draft's local database cannot be read (cut short, overwritten)."""

    def __init__(self, version_id: str, path, reason: str):
        super().__init__(f"the local database of draft {version_id} ({path}) is damaged "
                         f"({reason}); remove it with 'strata delete --id {version_id}'")


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
