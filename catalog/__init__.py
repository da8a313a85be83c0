"""The repository format and the Dataset API (DESIGN.md "catalog/").

    from strata.catalog import Dataset
"""

from strata.catalog.dataset import Dataset
from strata.catalog.errors import CatalogError
from strata.catalog.progress import Progress

__all__ = ["Dataset", "CatalogError", "Progress"]
