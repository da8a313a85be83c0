"""The repository format and the Dataset API (DESIGN.md "catalog/").

    from strata.catalog import Dataset

The names below are imported on first use (PEP 562): importing a light module of the
package, such as strata.catalog.config, must not pull in the whole Dataset API.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Dataset": "strata.catalog.dataset",
    "CatalogError": "strata.catalog.errors",
    "Progress": "strata.catalog.progress",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
