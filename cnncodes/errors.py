"""Exception hierarchy of cnncodes.

Every error the library raises on purpose derives from :class:`CnnCodesError`
*and* from the built-in exception a caller would naturally catch, so
``except KeyError`` still works for an unknown backbone name and
``except ValueError`` for a cache that does not match.
"""

from __future__ import annotations

__all__ = [
    "CnnCodesError",
    "ClusterUnreachableError",
    "UsageError",
    "InvalidParameterError",
    "UnknownBackboneError",
    "UnknownLayerError",
    "WeightsError",
    "WeightsUnavailableError",
    "DatasetError",
    "ImageDecodeError",
    "ErrorBudgetExceeded",
    "CacheError",
    "CacheMismatchError",
    "CacheIncompleteError",
    "CacheCorruptError",
    "CacheLockedError",
    "ExtractionWriteError",
    "ModelFileError",
    "ScratchSpaceError",
    "TrainingDataError",
    "RunFolderLockedError",
]


class CnnCodesError(Exception):
    """Base class of every error raised on purpose by cnncodes."""


class UsageError(CnnCodesError, ValueError):
    """Bad arguments: the command-line wrappers exit with status 2 on it."""


class InvalidParameterError(UsageError):
    """An argument outside what its parameter accepts (see ``cnncodes._validation``).

    ``param`` is the parameter's name and ``requirement`` what it must be ("must be an int in
    the range [1, inf). Got 0 instead."), so that a command line can name its flag instead.
    """

    def __init__(self, param: str, caller: str, requirement: str):
        super().__init__(f"The {param!r} parameter of {caller} {requirement}")
        self.param, self.caller, self.requirement = param, caller, requirement

    def __reduce__(self):  # raised in a worker process, it must survive pickling
        return type(self), (self.param, self.caller, self.requirement)


class UnknownBackboneError(UsageError, KeyError):
    """A backbone name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownLayerError(UsageError, KeyError):
    """A layer alias that the backbone does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WeightsError(CnnCodesError, ValueError):
    """A weight file that cannot be used (wrong keys, shapes, unsafe pickle...)."""


class WeightsUnavailableError(WeightsError, FileNotFoundError):
    """Default weights are neither on disk nor downloadable."""


class DatasetError(UsageError):
    """Missing, empty or malformed image folder or CSV list."""


class ImageDecodeError(CnnCodesError, OSError):
    """One image could not be turned into an RGB picture."""


class ErrorBudgetExceeded(CnnCodesError, RuntimeError):
    """Too many images failed to decode; the run stopped."""


class CacheError(CnnCodesError, OSError):
    """Base class of problems with an HDF5 cache of codes."""


class CacheMismatchError(CacheError, ValueError):
    """A cache, or a model, belongs to another extraction spec."""


class CacheIncompleteError(CacheError):
    """An extraction has not finished: resume it before reading."""


class CacheCorruptError(CacheError):
    """Bytes of a finished cache or shard changed after they were written."""


class CacheLockedError(CacheError):
    """Another process is writing this cache."""


class ExtractionWriteError(CacheError):
    """Writing codes failed (disk full, permissions); finished work is kept."""


class ModelFileError(CnnCodesError, OSError):
    """A trained-model file is missing, corrupt, does not match its sidecar, or names a type cnncodes does not write."""


class ScratchSpaceError(CnnCodesError, OSError):
    """The streamed training could not write its scratch copy of the codes (disk full, permissions)."""


class TrainingDataError(CnnCodesError, ValueError):
    """Codes cannot be used for training (one class, NaN, empty split...)."""


class RunFolderLockedError(CnnCodesError, OSError):
    """Another process is writing this run folder."""


class ClusterUnreachableError(CnnCodesError, ConnectionError):
    """The compute cluster named for an engine (``ray_address``) does not answer."""
