"""The repository format and the Dataset API (DESIGN.md "catalog/").

    from strata.catalog import Dataset

The names below are imported on first use (PEP 562): importing a light module of the
package, such as strata.catalog.config, must not pull in the whole Dataset API.
"""

from __future__ import annotations

from strata import lazy_exports

_LAZY = {
    "Dataset": "strata.catalog.dataset",
    "CatalogError": "strata.catalog.errors",
    "Progress": "strata.catalog.progress",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
