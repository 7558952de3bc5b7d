"""cnncodes: transfer learning with CNN codes.

Extract the activations of chosen layers of a pretrained CNN (the *CNN codes*) once,
store them in HDF5, and train scikit-learn classifiers on them as often as you like.

The top-level names are imported lazily so that ``import cnncodes`` does not import
torch: reading codes and training classifiers stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract": ("cnncodes.extraction", "extract"),
    "ExtractConfig": ("cnncodes.extraction", "ExtractConfig"),
    "load_codes": ("cnncodes.store", "load_codes"),
    "read_info": ("cnncodes.store", "read_info"),
    "list_caches": ("cnncodes.store", "list_caches"),
    "Codes": ("cnncodes.store", "Codes"),
    "list_backbones": ("cnncodes.backbones", "list_backbones"),
    "get_backbone": ("cnncodes.backbones", "get_backbone"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'cnncodes' has no attribute {name!r}")
