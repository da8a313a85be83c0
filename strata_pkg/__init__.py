"""strata: versioned datasets that mount as plain folders.

The code lives in four layers, imported as strata.cli -> strata.vfs -> strata.catalog ->
strata.storage; imports point down only.
"""

__version__ = "0.1.0"


def lazy_exports(module_name: str, names: dict[str, str]):
    """A module `__getattr__` (PEP 562) that imports each of `names` (name -> module) on
    first use and keeps it in the module, so later lookups cost nothing."""
    import importlib
    import sys

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[module_name], name, value)
        return value
    return __getattr__
