"""What every artefact records of where it comes from: library versions, a UTC time stamp, JSON-safe values."""

from __future__ import annotations

import datetime as _dt
import platform
from pathlib import Path

import numpy as np


def _versions() -> dict:
    import sklearn

    from . import __version__

    import joblib

    return {"cnncodes": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "joblib": joblib.__version__, "python": platform.python_version()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return _jsonable(o.to_dict())
    return o
