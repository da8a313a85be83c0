"""Errors the CLI itself raises. They derive from StrataError, so the boundary in
strata.cli.main reports them like any domain error: one line, exit 1."""

from __future__ import annotations

from strata.storage.errors import StrataError


class CliError(StrataError):
    """A problem found by the shell itself (no dataset selected, bad JSON, ...)."""


class CheckFailed(CliError):
    """A check ran and found problems (verify); its details were printed already."""
