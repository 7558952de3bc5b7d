"""A scikit-learn transformer over image paths: ``CNNCodes``.

``CNNCodes(model, layers).transform(paths)`` returns the codes of those images, one row per
path in the order given, through the HDF5 cache: the images a transform has seen are kept in
one cache file per extraction spec (and ``cache_dir``), so the folds of a ``GridSearchCV``, or
the same images transformed again, are cache hits (no forward pass, no torch import).
Modelled on :class:`~sklearn.feature_extraction.text.HashingVectorizer`: stateless,
``fit`` only validates the parameters, the input is a list of file names::

    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer
    from sklearn.svm import LinearSVC
    from cnncodes.sklearn import CNNCodes

    pipe = make_pipeline(CNNCodes("efficientnet_lite0", "pool"), Normalizer(), LinearSVC())
    search = GridSearchCV(pipe, {"cnncodes__layers": ["pool", "block5.linear"],
                                 "linearsvc__C": [0.1, 1, 10]})
    search.fit(paths, labels)

How the cache is fed: the absolute paths of every image transformed so far with a spec are
listed in ``<cache_dir>/lists/<model>-<spec tag>/images.csv``; each transform adds its paths
to that list and calls :func:`cnncodes.extract.extract` on it, which extracts only the images
(and layers) not yet in the cache, then the rows are looked up by path. Images that no
longer exist leave the list. Transforms of one list are serialised with a lock file, so
parallel searches (``n_jobs > 1``) wait for each other instead of failing on the cache lock.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .errors import DatasetError, UsageError

__all__ = ["CNNCodes"]

_ERRORS = ("raise", "nan")
_LIST_LABEL = "image"  # the list is unlabelled: one placeholder class (labels are not used)


class CNNCodes(TransformerMixin, BaseEstimator):
    """CNN codes of images given by their paths, through the HDF5 cache.

    Parameters
    ----------
    model : str
        A registered backbone (:func:`cnncodes.list_backbones`).
    layers : str or sequence of str
        Layer aliases; several are concatenated column-wise, in this order.
    weights : str
        ``"default"`` (ImageNet), ``"none"`` (random init, seed 0) or a state-dict path.
    pool : str
        Pooling of conv maps: ``"avg"``, ``"max"``, ``"none"``, ``"avg2x2"``...
    dtype : {"float16", "float32"}
        Storage type of the cached codes (the transform returns float32).
    precision, decoder, draft
        As in :func:`cnncodes.extract.extract`.
    cache_dir : path-like or None
        Folder of the cache files (default ``artifacts/codes``).
    device : {"auto", "cpu", "cuda"}
    batch_size : int
    workers : int or None
        Decoding processes (None: by device and cores).
    errors : {"raise", "nan"}
        Images that cannot be decoded: ``"raise"`` (default) raises a
        :class:`~cnncodes.errors.DatasetError` naming them; ``"nan"`` returns NaN rows for them
        (for a caller that drops them itself).

    Attributes
    ----------
    feature_dims_ : dict
        ``{layer key: width}``, set by the first transform (read from the cache); what
        :meth:`get_feature_names_out` needs.
    cache_path_ : pathlib.Path
        The cache file of the last transform.
    """

    def __init__(self, model="efficientnet_lite0", layers="pool", *, weights="default", pool="avg",
                 dtype="float16", precision="auto", decoder="torchvision", draft=True, cache_dir=None,
                 device="auto", batch_size=64, workers=None, errors="raise"):
        self.model = model
        self.layers = layers
        self.weights = weights
        self.pool = pool
        self.dtype = dtype
        self.precision = precision
        self.decoder = decoder
        self.draft = draft
        self.cache_dir = cache_dir
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.errors = errors

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.two_d_array = False
        tags.requires_fit = False
        return tags

    # ------------------------------------------------------------------ parameters

    def _layer_list(self) -> list[str]:
        layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        if not layers or not all(isinstance(a, str) for a in layers):
            raise UsageError(f"The 'layers' parameter of CNNCodes must be a layer alias or a list of them. "
                             f"Got {self.layers!r} instead.")
        return layers

    def _check_params(self) -> list[str]:
        """Validate every parameter without touching images or weights; the layer keys."""
        from .backbones import get_backbone
        from .extract import plan_layers

        for name, allowed in (("errors", _ERRORS), ("dtype", ("float16", "float32")),
                              ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise UsageError(f"The '{name}' parameter of CNNCodes must be one of {', '.join(allowed)}. "
                                 f"Got {getattr(self, name)!r} instead.")
        if not isinstance(self.batch_size, (int, np.integer)) or isinstance(self.batch_size, bool) \
                or self.batch_size < 1:
            raise UsageError(f"The 'batch_size' parameter of CNNCodes must be an int >= 1. "
                             f"Got {self.batch_size!r} instead.")
        spec = get_backbone(self.model)  # UnknownBackboneError with the known names
        return [key for _ld, _p, key, _fp in plan_layers(spec, self._layer_list(), self.pool, "")]

    def fit(self, X=None, y=None):
        """Validate the parameters (nothing is learnt: the codes depend on each image alone).

        Returns
        -------
        self
        """
        self._check_params()
        return self

    # ------------------------------------------------------------------ transform

    def transform(self, X):
        """The codes of the images ``X``, row i for path i.

        Parameters
        ----------
        X : sequence of path-like
            Image files (a list, or a 1-D array of str).

        Returns
        -------
        ndarray of shape (len(X), n_features), float32

        Raises
        ------
        UsageError
            ``X`` is not a list of paths (e.g. a numeric matrix), or a bad parameter.
        DatasetError
            A path that is not an image file; with ``errors="raise"``, images that could not
            be decoded (named).
        """
        from .extract import DEFAULT_OUT, extract
        from .store import load_codes

        keys = self._check_params()
        paths = _as_paths(X)
        out = Path(DEFAULT_OUT if self.cache_dir is None else self.cache_dir)
        list_csv = out / "lists" / f"{self.model}-{self._spec_tag()}" / "images.csv"
        with _locked(list_csv.with_suffix(".lock")):
            _add_to_list(list_csv, paths)
            res = extract(list_csv, self.model, self._layer_list(), weights=self.weights, pool=self.pool,
                          out=out, device=self.device, batch_size=int(self.batch_size), workers=self.workers,
                          dtype=self.dtype, precision=self.precision, draft=self.draft, decoder=self.decoder,
                          error_budget=1.0, name=list_csv.parent.name)
            codes = load_codes(res.path, keys)
        rows = _rows_of(codes.paths, paths, list_csv)
        self.feature_dims_ = {k: int(codes.records[k].dim) for k in keys}
        self.cache_path_ = Path(res.path)
        bad = rows[codes.status[rows] != "ok"]
        if bad.size and self.errors == "raise":
            listed = "; ".join(f"{codes.paths[i]}: {codes.messages[i]}" for i in bad[:10])
            raise DatasetError(f"{bad.size} of {len(paths)} images could not be decoded ({listed}). Remove them, "
                               f"or pass errors='nan' to get NaN rows for them.")
        return np.ascontiguousarray(codes.X[rows], dtype=np.float32)

    def get_feature_names_out(self, input_features=None):
        """``<layer key>_<i>`` for each column (``pool_0`` ... ``pool_1279``).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Before the first transform: the layer widths are read from the cache.
        """
        from sklearn.exceptions import NotFittedError

        keys = self._check_params()
        dims = getattr(self, "feature_dims_", None)
        if dims is None or any(k not in dims for k in keys):
            raise NotFittedError("CNNCodes learns the widths of its layers from the codes: call transform (or "
                                 "fit_transform) once before get_feature_names_out.")
        return np.asarray([f"{k}_{i}" for k in keys for i in range(dims[k])], dtype=object)

    def _spec_tag(self) -> str:
        """Hash of the settings that decide the codes of an image other than the layers: one image list
        (and one cache file) per tag, so that layers and pooling added later share it."""
        w = self.weights
        w = os.path.abspath(os.fspath(w)) if str(w).lower() not in ("default", "none") else str(w).lower()
        spec = [self.model, w, self.dtype, self.precision, self.decoder, bool(self.draft)]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]


def _as_paths(X) -> list[str]:
    if isinstance(X, (str, bytes, os.PathLike)):
        raise UsageError("CNNCodes.transform takes a list of image paths; got a single path. Wrap it in a list.")
    arr = np.asarray(X, dtype=object)
    if arr.ndim != 1 or not all(isinstance(p, (str, os.PathLike)) for p in arr):
        shape = getattr(X, "shape", None)
        raise UsageError(f"CNNCodes.transform takes a list of image paths (str or path-like). Got "
                         f"{type(X).__name__}{'' if shape is None else f' of shape {shape}'} instead.")
    if len(arr) == 0:
        raise UsageError("CNNCodes.transform got no image path.")
    return [os.path.normpath(os.path.abspath(os.fspath(p))) for p in arr]


@contextmanager
def _locked(lock_path: Path):
    """An exclusive lock (``flock``) on ``lock_path``: the kernel releases it when the process dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _add_to_list(list_csv: Path, paths: list[str]) -> None:
    """Write the list of every image seen (sorted; still existing ones) plus ``paths``, if it changed."""
    from .fileio import atomic_write_text

    old: list[str] = []
    if list_csv.exists():
        with open(list_csv, newline="", encoding="utf-8") as fh:
            old = [r["path"] for r in csv.DictReader(fh)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(paths)} paths are not files (e.g. {', '.join(missing[:5])}).")
    union = sorted(set(p for p in old if os.path.isfile(p)) | set(paths))
    if union == old:
        return
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    w.writerows([p, _LIST_LABEL] for p in union)
    atomic_write_text(list_csv, buf.getvalue())


def _rows_of(cache_paths: np.ndarray, paths: list[str], list_csv: Path) -> np.ndarray:
    """Row of each requested path in the cache, which names rows as the CSV reader does."""
    from .images import _csv_relpath

    csv_abs = os.path.abspath(list_csv)
    roots = tuple(dict.fromkeys((os.path.realpath(os.path.dirname(csv_abs)), os.path.dirname(csv_abs))))
    pos = {str(p): i for i, p in enumerate(cache_paths)}
    rows = np.fromiter((pos.get(_csv_relpath(p, roots)[0], -1) for p in paths), dtype=np.int64, count=len(paths))
    if (rows < 0).any():  # a bug, not a user error: every path was just put in the list
        raise RuntimeError(f"cnncodes: {int((rows < 0).sum())} paths missing from the cache after extraction")
    return rows
