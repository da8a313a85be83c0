"""strata: versioned datasets that mount as plain folders.

The code lives in four layers, imported as strata.cli -> strata.vfs -> strata.catalog ->
strata.storage; imports point down only.
"""

__version__ = "0.1.0"
