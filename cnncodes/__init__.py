"""cnncodes: transfer learning with CNN codes.

Extract the activations of chosen layers of a pretrained CNN (the *CNN codes*) once,
store them in HDF5, and train scikit-learn classifiers on them as often as you like.

The top-level names are imported lazily so that ``import cnncodes`` does not import
torch: reading codes and training classifiers stay fast.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "extract": ("cnncodes.extract", "extract"),
    "ExtractConfig": ("cnncodes.extract", "ExtractConfig"),
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


class _CallableExtractModule(types.ModuleType):
    """The submodule ``cnncodes.extract``, callable as the function ``cnncodes.extract``."""

    def __call__(self, *args, **kwargs):
        return self.extract(*args, **kwargs)


class _Package(types.ModuleType):
    """The package, whose ``extract`` stays callable once the submodule of that name is imported.

    Importing ``cnncodes.extract`` (any caller does: ``predict`` for one, or a first call of
    ``cnncodes.extract``) makes the import system bind the submodule as the package attribute
    ``extract``, hiding the function of that name, so the next ``cnncodes.extract(...)`` raised
    "'module' object is not callable". The submodule is made callable instead of being replaced,
    so ``import cnncodes.extract as m; m.ExtractConfig`` still finds the module.
    """

    def __setattr__(self, name, value):
        if name == "extract" and type(value) is types.ModuleType:
            value.__class__ = _CallableExtractModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
