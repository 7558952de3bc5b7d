"""Linear classifiers on cached CNN codes: normalisers, splits, the C sweep, metrics, run folders.

This module never imports torch (nor anything that does): training and comparing
classifiers on a cache needs no forward pass and stays fast to start.

The pipeline of one model is ``Pipeline([("norm", <normaliser>), ("clf", <classifier>)])``:

* normalisers (:func:`make_normaliser`): ``"l2"`` (default, as in Razavian et al. 2014),
  ``"standard"`` (zero mean, unit variance), ``"sqrt"`` (signed square root, then L2),
  ``"none"``;
* classifiers (:func:`make_classifier`): ``"svm"`` — :class:`~sklearn.svm.LinearSVC`
  (one-vs-rest, squared hinge; the dual solver for C <= 1, the primal above), ``"softmax"`` — multinomial
  :class:`~sklearn.linear_model.LogisticRegression` with lbfgs.

Training a run (:func:`train_run`)
----------------------------------
1. Rows whose image failed to decode (``status != "ok"``) are left out and counted.
   NaN/inf codes among the other rows, a single class, or an empty split raise
   :class:`~cnncodes.errors.TrainingDataError`.
2. Split (:func:`make_split`): the split recorded per row when the cache has one
   (``train``/``val``/``test``; with ``train``/``val`` only, the recorded val is the test split
   and a val split is drawn from train), else a stratified split with a recorded seed that gives
   every class with >= 3 images an image in each part (2 images: train and test). A class with
   no image in a part is a warning (logged, in the summary, in ``metrics.json``).
   All layers and the row table are read through one open handle on the cache
   (:func:`cnncodes.store.open_cache`): one version of the file even if it is replaced meanwhile.
3. C is chosen by a search that starts from a log grid (default ``np.logspace(-4, 4, 9)``),
   extends past its edge while the best C lies there and refines around the best (half
   decades; :mod:`cnncodes.search`), on the val split (a ``PredefinedSplit``), or by
   stratified k-fold CV on the train split when there is no val split
   (fewer folds, with a note, when a class has fewer images than folds). The codes are
   normalised once, in float32; SVM fits run in parallel with joblib (X memory-mapped
   once; liblinear itself copies X to float64 for each fit, as sklearn's LinearSVC
   always does); the softmax sweep is warm-started along the grid (lbfgs keeps float32).
   C values are evaluated in ascending order and the sweep stops early once the score has
   fallen below its best for ``early_stop`` (default 2) consecutive larger C values: the
   largest C values are the slowest fits. The curve records which C were evaluated.
4. The model is refit on train+val with the best C and evaluated once on the test split.
5. A ``ConvergenceWarning`` raises ``max_iter`` (x4, up to a cap) and refits; if the
   fit still does not converge, the metrics say so (``converged: false``).

Run folder
----------
``artifacts/runs/<name>/`` (written in a temporary folder next to it, renamed at the end,
so a failed run never leaves half a folder nor overwrites a previous run; see
:mod:`cnncodes.runfolder` for names, the writer's lock and what may be replaced)::

    .cnncodes-run.json             the marker that makes it a run folder (only such a folder is
                                   ever replaced, with overwrite=True): format, created, cache,
                                   settings and their hash
    metrics.json                   see below
    model.skops, model.json        the best model by val accuracy and its sidecar (a copy of
                                   one models/ file, same bytes and sha256; the sidecar's
                                   ``copy_of`` names it); what scripts/predict.py RUN_DIR uses
    models/<layers>__<clf>.skops   the fitted pipeline, skops format (no pickle; loaded only
                                   with the types cnncodes writes, see cnncodes.modelfile)
    models/<layers>__<clf>.json    its sidecar: sha256 of the .skops (integrity, not
                                   security), cache path, extraction fingerprint, layer
                                   records, spec, class names, normaliser, C, versions
    predictions/<layers>__<clf>.csv  path, split, true, pred, score of every used row
    confusion_matrix.png, c_curve.png, layer_comparison.png (several layer sets)

``<layers>`` is the layer key (``fc7``, ``conv5@max``) or, with ``concat=True``,
the keys joined by ``+`` (``fc6+fc7``).

``metrics.json``::

    {
      "schema": "cnncodes.metrics/2",
      "created": "...", "versions": {...},
      "cache": {"path", "fingerprint", "spec", "records", "manifest_hash", "dataset_root", "rows_sha256"},
      "split": {"source": "recorded"|"stratified", "seed", "val_fraction", "test_fraction",
                "counts": {"train", "val", "test"}, "n_rows", "n_failed", "failed_examples", "notes",
                "warnings", "roles": {"train", "val", "test"} (where each part comes from)},
      "settings": {"norm", "grid", "cv", "n_jobs", "concat", "max_iter", "max_iter_cap", "early_stop",
                   "widen", "refine"},
      "results": {
        "<layers>": {
          "<clf>": {
            "C": best C, "c_at_edge": bool, "c_index": int,
            "c_curve": [{"C", "score", "score_std", "converged", "evaluated"}, ...],
                        (the initial grid and every C tried, ascending; score null where not evaluated)
            "selection": {"method": "val"|"cv", "n_folds", "notes", "early_stop", "stopped_at",
                          "tried": [{"C", "phase", "score"}, ...] (in the order tried; phase grid,
                          widen, refine1...), "stop_reason"},
            "train": METRICS, "val": METRICS, "test": METRICS,
            "converged": bool, "convergence_message": str, "max_iter": int,
            "sweep_seconds", "fit_seconds", "n_features", "norm",
            "model": "models/<layers>__<clf>.skops"
          }
        }
      },
      "best": {"layers", "clf", "val_accuracy", "test_accuracy", "model", "file": "model.skops"},
      "pairwise": [{"layers", "clf", "vs_layers", "vs_clf", "b", "c", "n", "method", "statistic", "p_value"}, ...],
                  (McNemar of every other result against the best on the same test rows,
                   cnncodes.stats.mcnemar; b = rows the best gets right and this one wrong)
      "notes": [...],
      "warnings": [...]   (e.g. "class rose (2 usable images) has no image in the val split: ...")
    }

where ``METRICS`` (:func:`compute_metrics`) is ``{"n", "accuracy", "balanced_accuracy"
(mean per-class accuracy), "per_class": {name: {"precision", "recall", "f1",
"support"}}, "confusion_matrix": [[...]], "labels": [names]}``. ``val`` holds the
predictions of the sweep at the best C (on the val split, or out-of-fold predictions
of the CV), ``train`` and ``test`` those of the final model (refit on train+val).
So ``metrics["results"][layers][clf]["test"]["accuracy"]`` is the test accuracy.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils._param_validation import StrOptions

from . import runfolder as _runfolder
from .errors import CacheError, CacheMismatchError, TrainingDataError, UsageError
from .fileio import atomic_path, atomic_write_text
from .modelfile import BEST_MODEL, MODEL_SCHEMA, MODEL_SUFFIX, find_model, load_model, save_model, sidecar_path
from .modelfile import copy_model as _copy_model
from .stats import format_p, pairwise_vs_best

__all__ = [
    "NORMALISERS",
    "CLASSIFIERS",
    "DEFAULT_GRID",
    "signed_sqrt",
    "make_normaliser",
    "CodesLinearSVC",
    "make_classifier",
    "make_pipeline",
    "Split",
    "make_split",
    "check_codes",
    "SweepResult",
    "sweep_C",
    "refit",
    "compute_metrics",
    "top_scores",
    "fit_with_retries",
    "save_model",
    "load_model",
    "find_model",
    "Difference",
    "diff_extraction",
    "check_compatible",
    "RunResult",
    "train_run",
    "format_summary",
]

log = logging.getLogger(__name__)

NORMALISERS = ("l2", "standard", "sqrt", "none")
CLASSIFIERS = ("svm", "softmax")
DEFAULT_GRID = np.logspace(-4, 4, 9)
SPLITS = ("train", "val", "test")
METRICS_SCHEMA = "cnncodes.metrics/2"  # /2: c_curve holds every C tried (widened, refined); selection.tried
MIN_GRID_DECADES = 8.0
# every C value is a fit (and a refit candidate): a grid of 10**8 values sweeps for days
MAX_GRID_SIZE = 1000


# --------------------------------------------------------------------------- estimators


def signed_sqrt(X):
    """Signed square root ``sign(x) * sqrt(|x|)``, element-wise (keeps the dtype)."""
    X = np.asarray(X)
    return np.sign(X) * np.sqrt(np.abs(X))


def make_normaliser(norm: str = "l2"):
    """The sklearn transformer of a code normalisation.

    Parameters
    ----------
    norm : {"l2", "standard", "sqrt", "none"}
        ``"sqrt"`` is the signed square root followed by L2.

    Returns
    -------
    transformer
        An unfitted sklearn transformer (or pipeline of transformers).

    Raises
    ------
    UsageError
        For an unknown name.
    """
    if norm == "l2":
        return Normalizer(norm="l2")
    if norm == "standard":
        return StandardScaler()
    if norm == "sqrt":
        return Pipeline([
            ("ssqrt", FunctionTransformer(signed_sqrt, feature_names_out="one-to-one")),
            ("l2", Normalizer(norm="l2")),
        ])
    if norm == "none":
        return FunctionTransformer(feature_names_out="one-to-one")
    raise UsageError(f"The normaliser must be one of {', '.join(NORMALISERS)}. Got {norm!r} instead.")


_SOFTMAX_TOL = 1e-6


class CodesLinearSVC(LinearSVC):
    """:class:`~sklearn.svm.LinearSVC` whose default ``dual="by_C"`` picks the solver from C at fit time.

    ``dual="by_C"``: the dual (coordinate descent) for ``C <= 1``, the primal (trust-region
    Newton) above. Both solve the same problem (squared hinge, L2, regularised intercept);
    only the time differs (measured: ``benchmarks/bench_search.py --solvers``; the dual is
    faster at small C in every shape tried, and crawls or fails to converge at large C).
    Deciding at fit time keeps the rule after ``set_params(C=...)`` or in a search over C,
    where a ``dual`` fixed at construction would silently keep the solver of another C.
    ``dual=True/False/"auto"`` behave as in LinearSVC. After fit, ``dual_`` is the solver used.
    """

    _parameter_constraints: dict = {**LinearSVC._parameter_constraints,
                                    "dual": ["boolean", StrOptions({"auto", "by_C"})]}

    def __init__(self, penalty="l2", loss="squared_hinge", *, dual="by_C", tol=1e-4, C=1.0, multi_class="ovr",
                 fit_intercept=True, intercept_scaling=1, class_weight=None, verbose=0, random_state=None,
                 max_iter=1000):
        super().__init__(penalty=penalty, loss=loss, dual=dual, tol=tol, C=C, multi_class=multi_class,
                         fit_intercept=fit_intercept, intercept_scaling=intercept_scaling,
                         class_weight=class_weight, verbose=verbose, random_state=random_state, max_iter=max_iter)

    def fit(self, X, y, sample_weight=None):
        """Fit with the solver ``dual`` names; ``"by_C"`` is resolved from ``self.C`` now."""
        if self.dual != "by_C":
            super().fit(X, y, sample_weight=sample_weight)
            self.dual_ = self.dual
            return self
        self.dual = bool(self.C <= 1.0)  # LinearSVC.fit reads self.dual; restored below
        try:
            super().fit(X, y, sample_weight=sample_weight)
            self.dual_ = self.dual
        finally:
            self.dual = "by_C"
        return self


def make_classifier(
    clf: str,
    C: float = 1.0,
    *,
    n_samples: int | None = None,
    n_features: int | None = None,
    max_iter: int = 1000,
    seed: int = 0,
    warm_start: bool = False,
):
    """An unfitted linear classifier.

    Parameters
    ----------
    clf : {"svm", "softmax"}
        ``"svm"``: :class:`CodesLinearSVC` (LinearSVC choosing the dual solver for C <= 1 and
        the primal above, at fit time); ``"softmax"``: multinomial LogisticRegression (lbfgs).
    C : float
        Inverse regularisation strength.
    n_samples, n_features : int, optional
        Unused (kept for callers).
    max_iter : int
    seed : int
        ``random_state`` of LinearSVC's coordinate descent.
    warm_start : bool
        For softmax: start from the previous solution (used along the C grid).

    Raises
    ------
    UsageError
        For an unknown classifier name or a non-positive C.
    """
    if not (isinstance(C, (int, float, np.floating)) and np.isfinite(C) and C > 0):
        raise UsageError(f"The 'C' parameter must be a float > 0. Got {C!r} instead.")
    if clf == "svm":
        return CodesLinearSVC(C=float(C), max_iter=int(max_iter), random_state=seed)
    if clf == "softmax":
        # tol 1e-6, not sklearn's 1e-4: at 1e-4 lbfgs stops where the loss is still falling, and that
        # stopping point, not the data, decided test predictions (flowers5 Lite0 pool, C=10: float16 vs
        # float32 codes gave 3 different test predictions at 1e-4, none at 1e-6; 1.5x the iterations)
        return LogisticRegression(C=float(C), solver="lbfgs", tol=_SOFTMAX_TOL, max_iter=int(max_iter),
                                  warm_start=warm_start)
    raise UsageError(f"The classifier must be one of {', '.join(CLASSIFIERS)}. Got {clf!r} instead.")


def make_pipeline(norm: str, clf: str, C: float = 1.0, **kwargs) -> Pipeline:
    """``Pipeline([("norm", make_normaliser(norm)), ("clf", make_classifier(clf, C, **kwargs))])``."""
    return Pipeline([("norm", make_normaliser(norm)), ("clf", make_classifier(clf, C, **kwargs))])


_SMALL_PROBLEM = 4_000_000  # entries of X below which BLAS/OpenMP threads cost more than they give


def _threads_for(X):
    """One BLAS/OpenMP thread for small problems: on a busy machine, two spinning threads made a
    1,800 x 64 lbfgs fit 27x slower (1.46 s vs 0.054 s)."""
    if np.asarray(X).size >= _SMALL_PROBLEM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def fit_with_retries(est, X, y, *, max_iter_cap: int = 16000, param: str = "max_iter") -> dict:
    """Fit ``est``; on a ``ConvergenceWarning`` multiply ``max_iter`` by 4 (up to a cap) and refit.

    Works for a classifier and for a :class:`~sklearn.pipeline.Pipeline` whose last step
    is named ``clf``. Other warnings are re-emitted.

    Returns
    -------
    dict
        ``{"converged": bool, "max_iter": int, "message": str}``; the message says
        what happened when more iterations were needed or the fit did not converge.
    """
    name = f"clf__{param}" if isinstance(est, Pipeline) else param
    it = int(est.get_params()[name])
    first = it
    while True:
        with warnings.catch_warnings(record=True) as caught, _threads_for(X):
            warnings.simplefilter("always")
            est.fit(X, y)
        conv_msgs = [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not conv_msgs:
            msg = "" if it == first else f"converged after raising max_iter from {first} to {it}"
            return {"converged": True, "max_iter": it, "message": msg}
        if it >= max_iter_cap:
            return {
                "converged": False, "max_iter": it,
                "message": f"did not converge with max_iter={it} (the cap): {conv_msgs[-1].splitlines()[0]}",
            }
        it = min(it * 4, max_iter_cap)
        est.set_params(**{name: it})


def top_scores(est, X) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class indices and the score of the predicted class.

    The score is the top ``predict_proba`` value when the estimator has one
    (softmax), else the top ``decision_function`` value (for a binary SVM: ``|d|``).
    """
    if hasattr(est, "predict_proba") and _final(est).__class__ is LogisticRegression:
        P = est.predict_proba(X)
        idx = np.argmax(P, axis=1)
        return est.classes_[idx], P[np.arange(len(idx)), idx]
    D = est.decision_function(X)
    if D.ndim == 1:
        pred = est.classes_[(D > 0).astype(int)]
        return pred, np.abs(D)
    idx = np.argmax(D, axis=1)
    return est.classes_[idx], D[np.arange(len(idx)), idx]


def _final(est):
    return est[-1] if isinstance(est, Pipeline) else est


# --------------------------------------------------------------------------- data checks and splits


@dataclass
class Split:
    """Row indices (into the cache's rows) of each split, and how they were made.

    Attributes
    ----------
    train, val, test : ndarray of int
        Only rows with ``status == "ok"``; ``val`` may be empty (then C is chosen by CV).
    source : {"recorded", "stratified"}
    seed : int or None
        Seed of the stratified split (None for a recorded split).
    n_failed : int
        Rows left out because their image failed to decode.
    failed_examples : list of str
        ``"path: message"`` of the first failed rows.
    notes : list of str
    warnings : list of str
        What makes the evaluation less than it seems: a class with no image in a split
        (see :func:`make_split`). Logged, listed in the summary and in ``metrics.json``.
    roles : dict
        Where each part comes from (``{"train": ..., "val": ..., "test": ...}``), e.g. the
        recorded val split used as the test split of a train/val layout.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str
    seed: int | None
    n_rows: int
    n_failed: int
    failed_examples: list[str] = field(default_factory=list)
    val_fraction: float | None = None
    test_fraction: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_dict(self) -> dict:
        return {
            "source": self.source, "seed": self.seed, "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction, "counts": self.counts(), "n_rows": self.n_rows,
            "n_failed": self.n_failed, "failed_examples": list(self.failed_examples), "notes": list(self.notes),
            "warnings": list(self.warnings), "roles": dict(self.roles),
        }


def _class_list(labels: np.ndarray, class_names: Sequence[str]) -> str:
    vals, counts = np.unique(labels, return_counts=True)
    return ", ".join(f"{_name(class_names, v)} ({c})" for v, c in zip(vals, counts))


def _name(class_names: Sequence[str], i) -> str:
    i = int(i)
    return str(class_names[i]) if 0 <= i < len(class_names) else str(i)


def make_split(
    labels: np.ndarray,
    splits: np.ndarray,
    status: np.ndarray,
    *,
    class_names: Sequence[str] = (),
    paths: np.ndarray | None = None,
    messages: np.ndarray | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Split the usable rows of a cache into train / val / test.

    The split recorded per row is used when every usable row has one; otherwise a
    stratified split (seeded, recorded) is drawn. Rows with ``status != "ok"`` are
    left out and counted.

    A drawn split follows one rule, so that every class is trained on and, where it can
    be, tested: a class with >= 3 usable images has at least one in each of train, val
    and test (val only when ``val_fraction > 0``); a class with 2 images has one in
    train and one in test; a class with 1 image is in train only. Where the proportional
    split leaves a class out of a part, one image is moved there from the part holding
    most of that class (a note says so).

    A recorded layout with ``train`` and ``val`` but no ``test`` rows (e.g. a dataset
    shipped with ``train/`` and ``val/`` folders) is used as follows: the recorded val
    rows become the test split, used once; C is chosen on a stratified val split drawn
    from the recorded train rows (``val_fraction`` of them, ``seed``), or by
    cross-validation on train when ``val_fraction == 0``. ``Split.roles`` and a note
    record this.

    Every class that ends up with no image in train, in a non-empty val split or in the
    test split gets a warning in ``Split.warnings``.

    Parameters
    ----------
    labels, splits, status : ndarray of length N
    class_names : sequence of str
        For messages.
    paths, messages : ndarray of str, optional
        For the list of failed rows.
    val_fraction, test_fraction : float
        Fractions of the usable rows for a drawn split; ``val_fraction=0`` means no
        val split (C is then chosen by cross-validation on train).
    seed : int

    Returns
    -------
    Split

    Raises
    ------
    TrainingDataError
        No usable row, a single class, an empty train or test split, an unknown or
        partly missing recorded split, or a stratified split sklearn cannot draw.
    UsageError
        Fractions outside [0, 1) or summing to 1 or more.
    """
    labels = np.asarray(labels)
    splits = np.asarray(splits).astype(str)
    status = np.asarray(status).astype(str)
    n = len(labels)
    ok = status == "ok"
    idx_ok = np.flatnonzero(ok)
    failed = np.flatnonzero(~ok)
    examples = []
    for i in failed[:10]:
        p = str(paths[i]) if paths is not None else f"row {i}"
        m = str(messages[i]) if messages is not None else ""
        examples.append(f"{p}: {m}" if m else p)
    if failed.size:
        log.info("Leaving out %d of %d rows whose image failed to decode", failed.size, n)
    if idx_ok.size == 0:
        raise TrainingDataError(f"No usable row: all {n} images failed to decode (or the cache is empty).")
    n_classes = np.unique(labels[idx_ok]).size
    if n_classes < 2:
        raise TrainingDataError(
            f"The usable rows hold a single class ({_class_list(labels[idx_ok], class_names)}): a classifier needs "
            f"at least two. Check the dataset's class folders."
        )
    common = dict(n_rows=n, n_failed=int(failed.size), failed_examples=examples)
    sp = splits[idx_ok]
    has = sp != ""
    if has.any():
        split = _recorded_split(labels, idx_ok, sp, has, class_names, val_fraction, seed, common)
    else:
        _check_fractions(val_fraction, test_fraction)
        train, val, test, notes = _draw_stratified(idx_ok, labels, val_fraction, test_fraction, seed, class_names)
        split = Split(train, val, test, "stratified", int(seed), val_fraction=float(val_fraction),
                      test_fraction=float(test_fraction), notes=notes, roles=dict.fromkeys(SPLITS, "drawn"), **common)
    split.warnings = _absent_class_warnings(labels, idx_ok, split, class_names)
    return split


def _check_fractions(val_fraction, test_fraction) -> None:
    for what, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise UsageError(f"The '{what}' parameter must be a float in [0, 1). Got {v!r} instead.")
    if test_fraction <= 0:
        raise UsageError("The 'test_fraction' parameter must be > 0 when the cache records no split.")
    if val_fraction + test_fraction >= 1:
        raise UsageError(f"val_fraction + test_fraction must be < 1. Got {val_fraction} + {test_fraction}.")


def _recorded_split(labels, idx_ok, sp, has, class_names, val_fraction, seed, common) -> Split:
    unknown = sorted(set(sp[has]) - set(SPLITS))
    if unknown:
        raise TrainingDataError(
            f"Unknown recorded split name(s) {', '.join(map(repr, unknown))}: expected train, val or test."
        )
    if not has.all():
        raise TrainingDataError(
            f"{int((~has).sum())} of {idx_ok.size} usable rows have no recorded split while the others have one: "
            f"put every image in a train/val/test folder, or none."
        )
    parts = {s: idx_ok[sp == s] for s in SPLITS}
    if parts["test"].size == 0 and parts["val"].size and parts["train"].size:
        return _train_val_layout(labels, parts, class_names, val_fraction, seed, common)
    for s in ("train", "test"):
        if parts[s].size == 0:
            raise TrainingDataError(
                f"The recorded {s} split is empty (counts: train {parts['train'].size}, val {parts['val'].size}, "
                f"test {parts['test'].size}). Add a {s}/ folder, or extract without split folders for a drawn split."
            )
    if np.unique(labels[parts["train"]]).size < 2:
        raise TrainingDataError(
            f"The recorded train split holds a single class ({_class_list(labels[parts['train']], class_names)})."
        )
    return Split(parts["train"], parts["val"], parts["test"], "recorded", None,
                 roles={s: f"recorded {s}" for s in SPLITS}, **common)


def _train_val_layout(labels, parts, class_names, val_fraction, seed, common) -> Split:
    """train/ and val/ recorded, no test/: the recorded val is the test split; val is drawn from train."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise UsageError(f"The 'val_fraction' parameter must be a float in [0, 1). Got {val_fraction!r} instead.")
    rec_train, rec_val = parts["train"], parts["val"]
    if np.unique(labels[rec_train]).size < 2:
        raise TrainingDataError(
            f"The recorded train split holds a single class ({_class_list(labels[rec_train], class_names)})."
        )
    how = "by cross-validation on train"
    if val_fraction > 0:
        train, _, val, notes = _draw_stratified(rec_train, labels, 0.0, val_fraction, seed, class_names,
                                                shown={"test": "val"})
        how = f"on a stratified val split drawn from the recorded train split ({val_fraction:g} of it, seed {seed})"
    else:
        train, val, notes = rec_train, np.array([], dtype=np.int64), []
    notes = [f"the cache records train and val splits but no test split: the recorded val split ({rec_val.size} "
             f"images) is used as the test split, once; C is chosen {how}"] + notes
    roles = {"train": "recorded train" + (" less the drawn val" if val_fraction > 0 else ""),
             "val": "drawn from recorded train" if val_fraction > 0 else "none (C by cross-validation)",
             "test": "recorded val"}
    return Split(train, val, np.sort(rec_val), "recorded", int(seed), val_fraction=float(val_fraction), notes=notes,
                 roles=roles, **common)


def _draw_stratified(rows, labels, val_fraction, test_fraction, seed, class_names, shown: Mapping | None = None):
    """Stratified train/val/test of ``rows`` by the rule of :func:`make_split`.

    Classes large enough to get at least one image of each part in proportion go through
    sklearn's ``train_test_split`` (as they always did: the same seed gives the same split);
    the others start in train and :func:`_give_every_class` places them.
    """
    from sklearn.model_selection import train_test_split

    y = labels[rows]
    classes, counts = np.unique(y, return_counts=True)
    smallest = min(test_fraction, val_fraction) if val_fraction > 0 else test_fraction
    small = np.isin(y, classes[counts * smallest < 1])
    big = rows[~small]
    try:
        if big.size:
            rest, test = train_test_split(big, test_size=test_fraction, stratify=labels[big], random_state=seed)
        else:
            rest, test = big, big
        if val_fraction > 0 and rest.size:
            train, val = train_test_split(
                rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
            )
        else:
            train, val = rest, np.array([], dtype=np.int64)
    except ValueError as e:
        raise TrainingDataError(
            f"Cannot draw a stratified split of {rows.size} images ({_class_list(y, class_names)}) with "
            f"test_fraction={test_fraction}, val_fraction={val_fraction}: {e}. Add images to the small classes, "
            f"or use --val-fraction 0 (C chosen by cross-validation) or other fractions."
        ) from e
    parts = {"train": np.concatenate([train, rows[small]]), "val": np.asarray(val), "test": np.asarray(test)}
    notes = _give_every_class(labels, parts, need_val=val_fraction > 0, seed=seed, class_names=class_names,
                              shown=shown)
    return (np.sort(parts["train"]).astype(np.int64), np.sort(parts["val"]).astype(np.int64),
            np.sort(parts["test"]).astype(np.int64), notes)


def _give_every_class(labels, parts: dict, *, need_val: bool, seed: int, class_names,
                      shown: Mapping | None = None) -> list[str]:
    """Move single images between parts (in place) until every class has what the rule asks:
    test when it has >= 2 images, val too when it has >= 3 (and a val split is drawn).
    ``shown`` renames parts in the notes (a drawn val is the "test" part of its draw)."""
    shown = shown or {}
    rng = np.random.default_rng(seed)
    notes = []
    for c in np.unique(labels[np.concatenate(list(parts.values())).astype(np.int64)]):
        in_part = {s: parts[s][labels[parts[s]] == c] for s in parts}
        n_c = sum(v.size for v in in_part.values())
        wanted = (["test"] if n_c >= 2 else []) + (["val"] if need_val and n_c >= 3 else [])
        for s in wanted:
            donors = [d for d in parts if d != s and in_part[d].size > 1]
            if in_part[s].size or not donors:
                continue
            donor = max(donors, key=lambda d: in_part[d].size)
            row = rng.choice(np.sort(in_part[donor]))
            parts[donor] = parts[donor][parts[donor] != row]
            parts[s] = np.append(parts[s], row)
            in_part[donor] = in_part[donor][in_part[donor] != row]
            in_part[s] = np.array([row])
            notes.append(f"class {_name(class_names, c)} ({n_c} images): 1 image moved from {shown.get(donor, donor)} "
                         f"to {shown.get(s, s)} so that every part has one")
    return notes


_ABSENT_CONSEQUENCE = {
    "train": "the model can never predict it",
    "val": "C is chosen without it",
    "test": "it is not tested (the test accuracy and balanced accuracy leave it out)",
}


def _absent_class_warnings(labels, idx_ok, split: Split, class_names) -> list[str]:
    classes, counts = np.unique(labels[idx_ok], return_counts=True)
    out = []
    for part in SPLITS:
        rows = getattr(split, part)
        if part == "val" and rows.size == 0:
            continue  # C by cross-validation on train: no val split to miss a class
        absent = np.setdiff1d(classes, labels[rows])
        for c in absent:
            n_c = int(counts[np.searchsorted(classes, c)])
            out.append(f"class {_name(class_names, c)} ({n_c} usable image{'s' if n_c != 1 else ''}) has no image "
                       f"in the {part} split: {_ABSENT_CONSEQUENCE[part]}")
    return out


def check_codes(X: np.ndarray, rows: np.ndarray, paths: np.ndarray | None = None, what: str = "codes") -> None:
    """Raise if codes of the given (usable) rows hold NaN or inf.

    Raises
    ------
    TrainingDataError
        Naming the number of bad rows and the first few paths.
    """
    bad = rows[~np.isfinite(X[rows]).all(axis=1)]
    if bad.size:
        ex = ", ".join(str(paths[i]) if paths is not None else f"row {i}" for i in bad[:5])
        raise TrainingDataError(
            f"{bad.size} usable row(s) of {what} hold NaN or inf values (e.g. {ex}). The cache is damaged or the "
            f"backbone overflowed (try float32 codes); delete it and extract again."
        )


# --------------------------------------------------------------------------- the C sweep


@dataclass
class SweepResult:
    """What the C sweep found.

    Attributes
    ----------
    grid : ndarray
        The C values, ascending: the initial grid and every C the schedule added (wider,
        finer; see :mod:`cnncodes.search`).
    scores, scores_std : ndarray
        Accuracy at each C (val split), or mean and std over CV folds; NaN where the
        C was not evaluated (see ``evaluated``).
    converged : ndarray of bool
        Whether every fit at that C converged (True where not evaluated).
    best_index : int
        Index of the best score over the evaluated C values (the smallest C among ties).
    predictions : ndarray of shape (len(grid), n_eval)
        Predicted labels of the evaluation rows at each C (val rows, or out-of-fold);
        rows of C values that were not evaluated repeat the best C's predictions.
    eval_rows : ndarray of int
        The rows (positions in the arrays given to :func:`sweep_C`) those predictions are for.
    method : {"val", "cv"}
    n_folds : int
        The CV folds (0 for a val split, a 1-fold ``PredefinedSplit``).
    seconds : float
    notes : list of str
    evaluated : ndarray of bool
        Which C values were fitted.
    stopped_at : float or None
        The last initial-grid C evaluated when the grid phase stopped early, else None.
    tried : list of dict
        ``{"C", "phase", "score"}`` of every C evaluated, in order (phases ``grid``,
        ``widen``, ``refine1``...).
    stop_reason : str
        Why the search ended.
    """

    grid: np.ndarray
    scores: np.ndarray
    scores_std: np.ndarray
    converged: np.ndarray
    best_index: int
    predictions: np.ndarray
    eval_rows: np.ndarray
    method: str
    n_folds: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    evaluated: np.ndarray | None = None
    stopped_at: float | None = None
    tried: list[dict] = field(default_factory=list)
    stop_reason: str = ""

    def __post_init__(self):
        if self.evaluated is None:
            self.evaluated = np.ones(len(self.grid), dtype=bool)

    @property
    def best_C(self) -> float:
        return float(self.grid[self.best_index])

    @property
    def at_edge(self) -> bool:
        """The best C is the smallest or largest evaluated and strictly better than every other:
        the optimum may lie beyond what was tried (widening off, or stopped at its limit)."""
        ev = np.flatnonzero(self.evaluated)
        if self.best_index not in (ev[0], ev[-1]) or ev.size < 2:
            return False
        others = self.scores[ev[ev != self.best_index]]
        return bool(self.scores[self.best_index] > others.max())

    def curve(self) -> list[dict]:
        return [
            {"C": float(c), "score": float(s) if e else None, "score_std": float(sd) if e else None,
             "converged": bool(cv), "evaluated": bool(e)}
            for c, s, sd, cv, e in zip(self.grid, self.scores, self.scores_std, self.converged, self.evaluated)
        ]


def _check_grid(grid) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64).ravel()
    if not 2 <= g.size <= MAX_GRID_SIZE or not np.all(np.isfinite(g)) or np.any(g <= 0):
        shown = ", ".join(f"{c:g}" for c in g[:12]) + (", ..." if g.size > 12 else "")
        raise UsageError(f"The C grid must hold 2 to {MAX_GRID_SIZE} finite values > 0. "
                         f"Got {g.size} value(s) [{shown}] instead.")
    g = np.unique(g)
    decades = np.log10(g[-1] / g[0])
    if decades < MIN_GRID_DECADES - 1e-9:
        log.warning("The C grid spans %.1f decades (%g..%g); at least %d are advised", decades, g[0], g[-1],
                    MIN_GRID_DECADES)
    return g


def _peaked(scores: Sequence[float], patience: int | None) -> bool:
    """True when the last ``patience`` scores (C values in ascending order) all fall strictly
    below the best score so far: the curve has peaked and dropped ``patience`` times in a row."""
    if not patience or len(scores) <= patience:
        return False
    s = np.asarray(scores, dtype=float)
    return bool(np.all(s[-patience:] < s.max()))


def _check_patience(early_stop) -> int:
    if early_stop is None or early_stop is False:
        return 0
    if not isinstance(early_stop, (int, np.integer)) or isinstance(early_stop, bool) or early_stop < 0:
        raise UsageError(f"The 'early_stop' parameter must be an int >= 0 (0: off). Got {early_stop!r} instead.")
    return int(early_stop)


def _fit_predict_one(norm, clf, C, X, y, tr, ev, *, max_iter, max_iter_cap, seed):
    """Fit one model at C on rows ``tr`` of (X, y), predict rows ``ev``. Runs in a joblib worker.

    The whole matrix and index arrays are passed (not slices), so that joblib memory-maps
    a large X once instead of pickling a copy per task. ``norm=None``: X is already
    normalised (the classifier alone is fitted).
    """
    Xtr, ytr, Xev = X[tr], y[tr], X[ev]
    kw = dict(max_iter=max_iter, seed=seed)
    est = make_classifier(clf, C, **kw) if norm is None else make_pipeline(norm, clf, C, **kw)
    info = fit_with_retries(est, Xtr, ytr, max_iter_cap=max_iter_cap)
    with _threads_for(Xev):
        return est.predict(Xev), info["converged"]


def _softmax_path(norm, Cs, X, y, tr, ev, *, max_iter, max_iter_cap, seed, warm=None):
    """Softmax fits at the ascending ``Cs`` on rows ``tr``, each warm-started from the previous one
    (the first from ``warm``, the ``(coef, intercept)`` of the nearest C already fitted, if any);
    predictions of rows ``ev`` at each C. ``norm=None``: X is already normalised.

    Returns
    -------
    preds : ndarray (len(Cs), len(ev)); conv : ndarray of bool; coefs : list of (coef, intercept)
    """
    Xtr, ytr, Xev = X[tr], y[tr], X[ev]
    if norm is None:
        Ztr, Zev = np.asarray(Xtr, dtype=np.float32), np.asarray(Xev, dtype=np.float32)
    else:
        normaliser = make_normaliser(norm).fit(Xtr)
        Ztr = np.asarray(normaliser.transform(Xtr), dtype=np.float32)
        Zev = np.asarray(normaliser.transform(Xev), dtype=np.float32)
    lr = make_classifier("softmax", Cs[0], max_iter=max_iter, seed=seed, warm_start=True)
    if warm is not None:
        lr.coef_, lr.intercept_ = warm[0].copy(), warm[1].copy()
    preds, conv, coefs = [], [], []
    for C in Cs:
        lr.set_params(C=float(C), max_iter=max_iter)
        info = fit_with_retries(lr, Ztr, ytr, max_iter_cap=max_iter_cap)
        with _threads_for(Zev):
            preds.append(lr.predict(Zev))
        conv.append(info["converged"])
        coefs.append((lr.coef_.copy(), lr.intercept_.copy()))
    return np.stack(preds), np.asarray(conv), coefs


def _n_folds(y: np.ndarray, cv: int, class_names: Sequence[str]) -> tuple[int, list[str]]:
    vals, counts = np.unique(y, return_counts=True)
    m = int(counts.min())
    if m >= cv:
        return cv, []
    k = max(2, m)
    small = ", ".join(f"{_name(class_names, v)} ({c})" for v, c in zip(vals, counts) if c < cv)
    note = (f"class(es) {small} have fewer training images than the {cv} CV folds asked for: "
            f"C chosen with {k}-fold CV instead")
    if m < 2:
        note += "; a class with a single image is missing from the training part of one fold"
    return k, [note]


def _prenormalise(norm: str, X: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Normalised float32 codes of every row of X, the normaliser fitted on ``fit_rows``.

    Equal to what each pipeline of the sweep computes for itself (``l2``, ``sqrt`` and
    ``none`` are row-wise and stateless; ``standard`` is fitted on the training rows
    only), done once instead of once per C.
    """
    nrm = make_normaliser(norm).fit(X[fit_rows])
    return np.ascontiguousarray(nrm.transform(X), dtype=np.float32)


def _sweep_folds(X_train, y_train, X_val, y_val, cv, seed, class_names):
    """The rows and folds of the sweep: a val split is a 1-fold ``PredefinedSplit`` over train+val,
    no val split a stratified k-fold on train. Returns ``(X, y, folds, method, notes)``."""
    from sklearn.model_selection import PredefinedSplit, StratifiedKFold

    if X_val is not None and len(X_val):
        X = np.concatenate([X_train, np.asarray(X_val, dtype=np.float32)])
        y = np.concatenate([y_train, np.asarray(y_val)])
        test_fold = np.r_[np.full(len(y_train), -1), np.zeros(len(y_val), dtype=int)]
        return X, y, list(PredefinedSplit(test_fold).split()), "val", []
    if not isinstance(cv, (int, np.integer)) or isinstance(cv, bool) or cv < 2:
        raise UsageError(f"The 'cv' parameter must be an int >= 2. Got {cv!r} instead.")
    k, notes = _n_folds(y_train, int(cv), class_names)
    try:
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X_train, y_train))
    except ValueError as e:
        raise TrainingDataError(f"Cannot make {k} CV folds of {len(y_train)} training images: {e}") from e
    for tr, _ in folds:
        if np.unique(y_train[tr]).size < 2:
            raise TrainingDataError("A CV fold's training part holds a single class: add images")
    return X_train, y_train, folds, "cv", notes


@contextlib.contextmanager
def _shared(Z: np.ndarray, n_jobs):
    """Z as a memory map on disk when workers are used: joblib then passes it by reference to every
    batch of fits (instead of hashing and dumping it again for each batch)."""
    import tempfile

    from joblib import effective_n_jobs

    if effective_n_jobs(n_jobs) == 1 or Z.nbytes < (1 << 20):
        yield Z
        return
    with tempfile.TemporaryDirectory(prefix="cnncodes-sweep-") as d:
        path = os.path.join(d, "Z.npy")
        np.save(path, Z)
        yield np.load(path, mmap_mode="r", allow_pickle=False)


class _Evaluator:
    """Fits one batch of C values on every fold: ``__call__(Cs) -> {C: (fold_scores, oof_preds, converged)}``.

    SVM fits run in parallel over (C, fold); softmax runs one warm-started path per fold (in
    parallel over folds), starting from the nearest C already fitted on that fold.
    """

    def __init__(self, clf, norm, Z, y, folds, n_eval, parallel, kw):
        self.clf, self.norm, self.Z, self.y, self.folds, self.n_eval = clf, norm, Z, y, folds, n_eval
        self.parallel, self.kw = parallel, kw
        self.coefs: list[dict] = [{} for _ in folds]  # softmax: per fold, C -> (coef, intercept)

    def _oof(self, per_fold):
        """Out-of-fold predictions over the evaluation rows from each fold's predictions."""
        out = np.empty(self.n_eval, dtype=self.y.dtype)
        base = self.folds[0][1].min() if len(self.folds) == 1 else 0
        for (_, te), p in zip(self.folds, per_fold):
            out[te - base] = p
        return out

    def __call__(self, Cs):
        from joblib import delayed

        Cs = sorted(Cs)
        if self.clf == "softmax":
            warm = [self._nearest(j, Cs[0]) for j in range(len(self.folds))]
            out = self.parallel(delayed(_softmax_path)(self.norm, Cs, self.Z, self.y, tr, te, warm=w, **self.kw)
                                for (tr, te), w in zip(self.folds, warm))
            for j, (_, _, coefs) in enumerate(out):
                self.coefs[j].update(zip(Cs, coefs))
            fits = {(i, j): (o[0][i], o[1][i]) for j, o in enumerate(out) for i in range(len(Cs))}
        else:
            jobs = [(i, j) for i in range(len(Cs)) for j in range(len(self.folds))]
            out = self.parallel(delayed(_fit_predict_one)(self.norm, self.clf, Cs[i], self.Z, self.y,
                                                          *self.folds[j], **self.kw) for i, j in jobs)
            fits = dict(zip(jobs, out))
        res = {}
        for i, c in enumerate(Cs):
            per = [fits[i, j] for j in range(len(self.folds))]
            scores = np.array([np.mean(p == self.y[te]) for (p, _), (_, te) in zip(per, self.folds)])
            res[c] = (scores, self._oof([p for p, _ in per]), bool(all(cv for _, cv in per)))
        return res

    def _nearest(self, j, c):
        done = self.coefs[j]
        if not done:
            return None
        return done[min(done, key=lambda d: abs(np.log(d / c)))]


def sweep_C(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    *,
    clf: str = "svm",
    norm: str = "l2",
    grid: Sequence[float] | None = None,
    cv: int = 5,
    seed: int = 0,
    n_jobs: int | None = -1,
    max_iter: int = 1000,
    max_iter_cap: int = 16000,
    early_stop: int | None = 2,
    widen: bool = True,
    refine: int = 1,
    class_names: Sequence[str] = (),
) -> SweepResult:
    """Choose C by accuracy on a val split, or by stratified k-fold CV on train.

    The C values come from :class:`cnncodes.search.CSchedule`: the initial grid in ascending
    order with an early stop, then wider (past an edge, while the score still rises) and finer
    (half decades around the best with ``refine=1``). The codes are normalised once (float32;
    the normaliser fitted on the training rows, as each pipeline would); SVM fits run in
    parallel over C and folds with joblib, X memory-mapped once; softmax runs warm-started
    from the nearest C already fitted, in parallel over folds.

    Parameters
    ----------
    X_train, y_train : arrays
        Training codes (float32 is kept) and labels.
    X_val, y_val : arrays, optional
        The val split (a ``PredefinedSplit``); when None or empty, ``cv``-fold stratified CV
        on train is used.
    clf, norm : str
        See :func:`make_classifier` and :func:`make_normaliser`.
    grid : sequence of float, optional
        The initial C grid; default ``np.logspace(-4, 4, 9)``.
    cv : int
        Folds when there is no val split; fewer (noted) when a class is smaller.
    seed : int
        Seed of the folds and of LinearSVC.
    n_jobs : int
        joblib workers (-1: all cores).
    max_iter, max_iter_cap : int
        Starting iteration limit and the cap of :func:`fit_with_retries`. Along the
        sweep the cap is at most ``4 * max_iter`` (one retry): fits at extreme C that
        still do not converge are marked in the curve (``converged``) rather than
        paid for with 16x the iterations; the final refit uses the full cap.
    early_stop : int or None
        Patience of the grid phase: stop once the score has fallen strictly below its best
        for this many consecutive larger C values (default 2; 0 or None: the whole grid).
        A curve that would rise again to a higher peak beyond such a drop would be missed.
    widen : bool
        Extend past the grid's edge while the best C lies there (default True).
    refine : int
        Rounds of refinement around the best, each halving the log step (default 1: half decades).

    Returns
    -------
    SweepResult

    Raises
    ------
    UsageError
        For a bad grid, classifier, normaliser, ``early_stop``, ``refine`` or ``cv < 2``.
    TrainingDataError
        When the folds cannot be made.
    """
    from joblib import Parallel, effective_n_jobs

    from .search import CSchedule

    g = _check_grid(DEFAULT_GRID if grid is None else grid)
    make_normaliser(norm)
    make_classifier(clf)
    patience = _check_patience(early_stop)
    X_train = np.asarray(X_train, dtype=np.float32)
    y_train = np.asarray(y_train)
    t0 = time.perf_counter()
    X, y, folds, method, notes = _sweep_folds(X_train, y_train, X_val, y_val, cv, seed, class_names)
    # the normaliser is fitted once on the training rows: exact for a val split, and for the row-wise
    # normalisers under CV; a stateful one (standard) under CV is fitted inside each fold
    pre = method == "val" or norm != "standard"
    Z = _prenormalise(norm, X, folds[0][0] if method == "val" else np.arange(len(y))) if pre else X
    del X
    n_eval = len(folds[0][1]) if method == "val" else len(y)
    kw = dict(max_iter=max_iter, max_iter_cap=min(max_iter_cap, 4 * max_iter), seed=seed)
    # C values evaluated at once: enough (C, fold) fits to keep the workers busy; softmax goes one C at a time
    batch = 1 if clf == "softmax" else max(1, effective_n_jobs(n_jobs) // len(folds))
    schedule = CSchedule(tuple(g), patience, bool(widen), refine, batch)
    points: dict[float, tuple] = {}
    with warnings.catch_warnings(), _shared(Z, n_jobs) as Zs, Parallel(n_jobs=n_jobs) as parallel:
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        evaluate = _Evaluator(clf, None if pre else norm, Zs, y, folds, n_eval, parallel, kw)
        while batch_cs := schedule.next_batch():
            points.update(evaluate(batch_cs))
            schedule.record({c: points[c][0].mean() for c in batch_cs})
    return _sweep_result(g, points, schedule, method, len(folds), n_eval, time.perf_counter() - t0, notes)


def _sweep_result(g, points, schedule, method, k, n_eval, seconds, notes) -> SweepResult:
    """The SweepResult of a finished schedule: every C of the initial grid or tried, ascending."""
    from .search import _key

    cs = np.array(sorted(set(_key(c) for c in g) | set(points)))
    evaluated = np.array([c in points for c in cs])
    scores = np.array([points[c][0].mean() if c in points else np.nan for c in cs])
    std = np.array([points[c][0].std() if c in points and k > 1 else 0.0 for c in cs])
    conv = np.array([points[c][2] if c in points else True for c in cs])
    best = int(np.flatnonzero(cs == schedule.best_C)[0])
    preds = np.stack([points[c][1] if c in points else points[schedule.best_C][1] for c in cs])
    grid_tried = [e["C"] for e in schedule.log if e["phase"] == "grid"]
    stopped_at = grid_tried[-1] if len(grid_tried) < len(g) else None
    notes = list(notes)
    if stopped_at is not None:
        skipped = [c for c in g if _key(c) not in points]
        notes.append(f"sweep stopped early: the score fell below its best for {schedule.patience} consecutive larger "
                     f"C values; C = {', '.join(f'{c:g}' for c in skipped)} of the grid not evaluated")
    res = SweepResult(cs, scores, std, conv, best, preds, np.arange(n_eval), method, 0 if method == "val" else k,
                      seconds, notes, evaluated, stopped_at,
                      [dict(e, score=float(schedule.scores[e["C"]])) for e in schedule.log], schedule.stop_reason)
    if res.at_edge:
        side = "lower" if best == np.flatnonzero(evaluated)[0] else "upper"
        res.notes.append(f"best C={res.best_C:g} is at the {side} end of the C values tried "
                         f"({cs[evaluated][0]:g}..{cs[evaluated][-1]:g}) and strictly better than the others: "
                         f"the optimum may lie further out")
    if not conv.all():
        res.notes.append(f"fits did not converge at C = {', '.join(f'{c:g}' for c in cs[~conv])}")
    return res


def refit(
    X: np.ndarray, y: np.ndarray, *, clf: str, norm: str, C: float, max_iter: int = 1000,
    max_iter_cap: int = 16000, seed: int = 0,
) -> tuple[Pipeline, dict]:
    """The final model: ``make_pipeline(norm, clf, C)`` fitted on (X, y) (train+val) with retries.

    Returns
    -------
    pipe : Pipeline
    info : dict
        From :func:`fit_with_retries`.
    """
    pipe = make_pipeline(norm, clf, C, n_samples=len(y), n_features=X.shape[1], max_iter=max_iter, seed=seed)
    return pipe, fit_with_retries(pipe, X, y, max_iter_cap=max_iter_cap)


# --------------------------------------------------------------------------- metrics


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Classification metrics of one split: ``classification_report``, ``balanced_accuracy_score``,
    ``confusion_matrix``.

    Parameters
    ----------
    y_true, y_pred : array of int
        Class indices into ``class_names``.
    class_names : sequence of str

    Returns
    -------
    dict
        ``n``, ``accuracy`` (top-1), ``balanced_accuracy`` (mean per-class recall over
        the classes present in ``y_true``), ``per_class`` (precision, recall, f1, support
        per class name), ``confusion_matrix`` (rows: true, columns: predicted, in the
        order of ``labels``), ``labels``. Empty splits give ``{"n": 0}``.
    """
    from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.size == 0:
        return {"n": 0}
    labels = np.arange(len(class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from y_true or y_pred: 0 by zero_division, on purpose
        report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
        bal = balanced_accuracy_score(y_true, y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": int(y_true.size),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(bal),
        "per_class": {
            str(name): {"precision": float(report[str(i)]["precision"]), "recall": float(report[str(i)]["recall"]),
                        "f1": float(report[str(i)]["f1-score"]), "support": int(report[str(i)]["support"])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "labels": [str(c) for c in class_names],
    }


# --------------------------------------------------------------------------- model files


def _versions() -> dict:
    import sklearn

    from . import __version__

    import joblib

    return {"cnncodes": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "joblib": joblib.__version__, "python": platform.python_version()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- compatibility


@dataclass(frozen=True)
class Difference:
    """One field where a model's training codes and other codes differ."""

    field: str
    model: Any
    codes: Any

    def __str__(self) -> str:
        return f"{self.field}: {_short(self.model)} (model) vs {_short(self.codes)} (codes)"


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# spec fields that do not change a code (where a file lies, how fast it was computed)
_SPEC_IGNORED = frozenset({"path", "weights_path", "device", "batch_size", "num_workers", "workers", "created", "layers"})
_RECORD_FIELDS = ("alias", "node", "stage", "pool", "dim", "map_shape")


def _diff_dicts(a: Any, b: Any, prefix: str, out: list[Difference]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if k in _SPEC_IGNORED:
                continue
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(Difference(name, None, b[k]))
            elif k not in b:
                out.append(Difference(name, a[k], None))
            else:
                _diff_dicts(a[k], b[k], name, out)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_dicts(x, y, f"{prefix}[{i}]", out)
        return
    if a != b:
        out.append(Difference(prefix, a, b))


def _as_record_dict(r) -> dict:
    if hasattr(r, "to_dict"):
        return r.to_dict()
    return dict(r)


def diff_extraction(sidecar_meta: Mapping, codes_records: Mapping[str, Any], codes_spec: Mapping) -> list[Difference]:
    """Every field where the codes a model was trained on differ from other codes.

    Parameters
    ----------
    sidecar_meta : mapping
        A model's sidecar (:func:`load_model`): ``layers``, ``records``, ``spec``.
    codes_records : mapping
        ``key -> LayerRecord`` (or its dict) of the codes to predict on. Compared by key
        when every model layer is there, else in order (so ``fc6`` codes offered as
        the model's ``fc7`` are named as such).
    codes_spec : mapping
        The extraction spec of those codes.

    Returns
    -------
    list of Difference
        Empty when compatible. Layer fields: ``layer[<key>].alias`` / ``node`` / ``stage`` /
        ``pool`` / ``dim`` / ``map_shape`` (then ``fingerprint`` when nothing else explains
        a difference); spec fields by dotted path (``weights.sha256``,
        ``preprocessing.crop``, ``dtype``...). Where a file lies and run settings
        (``path``, ``device``, ``batch_size``) are not compared.
    """
    out: list[Difference] = []
    model_layers = list(sidecar_meta.get("layers") or list((sidecar_meta.get("records") or {}).keys()))
    mrec = {k: _as_record_dict(v) for k, v in (sidecar_meta.get("records") or {}).items()}
    crec = {k: _as_record_dict(v) for k, v in codes_records.items()}
    if all(k in crec for k in model_layers):
        pairs = [(k, mrec.get(k, {}), crec[k]) for k in model_layers]
    elif len(crec) == len(model_layers):
        pairs = [(k, mrec.get(k, {}), c) for k, c in zip(model_layers, crec.values())]
        for (k, _, c), ck in zip(pairs, crec):
            if ck != k:
                out.append(Difference(f"layer[{k}].key", k, ck))
    else:
        missing = [k for k in model_layers if k not in crec]
        out.append(Difference("layers", model_layers, list(crec)))
        pairs = [(k, mrec.get(k, {}), crec[k]) for k in model_layers if k not in missing]
    for k, m, c in pairs:
        for f in _RECORD_FIELDS:
            mv, cv = m.get(f), c.get(f)
            if f == "map_shape":
                mv, cv = list(mv or []), list(cv or [])
            if mv != cv:
                out.append(Difference(f"layer[{k}].{f}", mv, cv))
    _diff_dicts(dict(sidecar_meta.get("spec") or {}), dict(codes_spec or {}), "", out)
    if not out:
        for k, m, c in pairs:
            if m.get("fingerprint") and c.get("fingerprint") and m["fingerprint"] != c["fingerprint"]:
                out.append(Difference(f"layer[{k}].fingerprint", m["fingerprint"], c["fingerprint"]))
    return out


def check_compatible(sidecar_meta: Mapping, codes_records: Mapping[str, Any], codes_spec: Mapping) -> None:
    """Refuse codes that were not extracted like the model's training codes.

    Widths are not enough: AlexNet's fc6 and fc7 are both 4096-D.

    Raises
    ------
    CacheMismatchError
        Listing every differing field (see :func:`diff_extraction`); the list is
        also in the exception's ``differences`` attribute.
    """
    diffs = diff_extraction(sidecar_meta, codes_records, codes_spec)
    if diffs:
        name = sidecar_meta.get("model_file", "the model")
        err = CacheMismatchError(
            f"The codes do not match those {name} was trained on ({len(diffs)} field(s) differ): "
            + "; ".join(str(d) for d in diffs)
            + ". Extract the codes with the model's spec, or train a model on these codes."
        )
        err.differences = diffs
        raise err


# --------------------------------------------------------------------------- a run


@dataclass
class RunResult:
    """What :func:`train_run` produced."""

    run_dir: Path
    metrics: dict
    summary: str


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


def _layer_sets(layers: Sequence[str], concat: bool) -> list[list[str]]:
    if not layers:
        raise UsageError("Name at least one layer (--layers fc7 ...).")
    uniq = list(dict.fromkeys(layers))
    return [uniq] if concat else [[k] for k in uniq]


def default_run_name(cache: str | os.PathLike, layers: Sequence[str], concat: bool = False,
                     settings: Mapping | None = None) -> str:
    """``<cache stem>__<layers>__<UTC time, ms>__<settings hash>``; :func:`train_run` creates it
    exclusively (``-2``, ``-3`` ... when taken), so two runs never share a folder."""
    return _runfolder.default_run_name(cache, layers, concat, settings)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"The '{name}' parameter of train_run must be an int >= {low}. Got {value!r} instead.")
    return int(value)


def _check_train_options(*, max_iter, max_iter_cap, n_jobs, seed, cv) -> None:
    """The options a fit would only trip over later (or never: max_iter=0 retried forever)."""
    _check_int("max_iter", max_iter, 1)
    _check_int("max_iter_cap", max_iter_cap, int(max_iter))
    _check_int("cv", cv, 2)
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
        raise UsageError(f"The 'n_jobs' parameter of train_run must be None or an int other than 0 (-1: all cores). "
                         f"Got {n_jobs!r} instead.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise UsageError(f"The 'seed' parameter of train_run must be an int in the range [0, 2**32 - 1]. "
                         f"Got {seed!r} instead.")


def _check_same_snapshot(first, codes, cache) -> None:
    """Every layer set must come with the row table and spec of the first (one open file guarantees
    it; this says so loudly if that ever breaks)."""
    if codes.rows_sha256 != first.rows_sha256 or codes.fingerprint != first.fingerprint:
        raise CacheError(
            f"The cache {cache} changed while the run read it (the rows or spec of layer(s) {', '.join(codes.layers)} "
            f"differ from those of {', '.join(first.layers)}). Run again once the extraction has finished."
        )


def train_run(
    cache: str | os.PathLike,
    layers: Sequence[str],
    *,
    classifiers: Sequence[str] = CLASSIFIERS,
    concat: bool = False,
    norm: str = "l2",
    grid: Sequence[float] | None = None,
    cv: int = 5,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    n_jobs: int | None = -1,
    max_iter: int = 1000,
    max_iter_cap: int = 16000,
    early_stop: int | None = 2,
    widen: bool = True,
    refine: int = 1,
    out: str | os.PathLike | None = None,
    runs_root: str | os.PathLike = "artifacts/runs",
    overwrite: bool = False,
    plots: bool = True,
) -> RunResult:
    """Train every (layer set, classifier) pair on a cache and write a run folder.

    Parameters
    ----------
    cache : path-like
        A cache written by the extractor.
    layers : sequence of str
        Layer keys; one model per layer, or one on their concatenation with ``concat``.
    classifiers : sequence of {"svm", "softmax"}
    norm : {"l2", "standard", "sqrt", "none"}
    grid : sequence of float, optional
        C grid (default ``np.logspace(-4, 4, 9)``).
    cv : int
        Folds of the C selection when there is no val split.
    seed : int
        Seed of a drawn split, of the folds and of LinearSVC.
    val_fraction, test_fraction : float
        For a drawn split (ignored when the cache records one).
    n_jobs : int
        joblib workers for the sweep.
    max_iter, max_iter_cap : int
        See :func:`fit_with_retries`.
    early_stop : int or None
        Patience of the C sweep (see :func:`sweep_C`; 0 or None: the whole grid).
    widen, refine
        Extend the C search past the grid's edge; rounds of refinement (see :func:`sweep_C`).
    out : path-like, optional
        The run folder; default ``runs_root / default_run_name(...)``.
    overwrite : bool
        Replace an existing non-empty run folder (only once the new run has succeeded).
    plots : bool
        Write the PNG figures.

    Returns
    -------
    RunResult

    Raises
    ------
    UsageError
        Bad arguments, a layer the cache does not hold, an existing run folder.
    TrainingDataError
        One class, NaN/inf codes, an empty split, folds that cannot be made.
    CacheError
        A missing, incomplete or corrupt cache.
    """
    from .store import open_cache

    if isinstance(layers, str):  # as extract and load_codes take it; it was read as the layers "f", "c", "7"
        layers = [layers]
    if isinstance(classifiers, str):
        classifiers = [classifiers]
    classifiers = list(dict.fromkeys(classifiers))
    if not classifiers:
        raise UsageError("Name at least one classifier (svm, softmax).")
    for c in classifiers:
        make_classifier(c)
    make_normaliser(norm)
    _check_train_options(max_iter=max_iter, max_iter_cap=max_iter_cap, n_jobs=n_jobs, seed=seed, cv=cv)
    patience = _check_patience(early_stop)
    g = _check_grid(DEFAULT_GRID if grid is None else grid)
    sets = _layer_sets(layers, concat)
    all_keys = [k for s in sets for k in s]
    run_settings = {"layer_sets": ["+".join(s) for s in sets], "classifiers": classifiers, "norm": norm,
                    "grid": [float(c) for c in g], "cv": cv, "seed": seed, "val_fraction": val_fraction,
                    "test_fraction": test_fraction, "max_iter": max_iter, "early_stop": patience}
    if out is not None:
        target = Path(out)
        _runfolder.check_target(target, cache, overwrite)
    else:
        target = Path(runs_root) / default_run_name(cache, all_keys, concat, run_settings)
    marker = {"created": _now(), "cache": str(Path(cache).resolve()), "settings": run_settings,
              "settings_hash": _runfolder.settings_hash(run_settings)}

    # one open handle for the whole run: every layer and the row table come from one version of the file,
    # even if an extraction replaces the cache meanwhile (it does so by rename, never in place)
    snap = open_cache(cache)
    info = snap.info
    missing = [k for k in all_keys if k not in info.layers]
    t_run = time.perf_counter()
    results: dict[str, dict] = {}
    curves_for_plot, cms_for_plot = [], []
    first = None
    split: Split | None = None
    notes: list[str] = []
    test_correct: dict[tuple[str, str], np.ndarray] = {}  # for McNemar against the best (same test rows)
    with snap, _runfolder.staged_run(target, overwrite=overwrite, cache=cache, reserve=out is None,
                                     marker=marker) as (tmp, target):
        if missing:
            snap.load(missing)  # raises UsageError naming what the cache holds
        for lset in sets:
            codes = snap.load(lset)
            name = "+".join(lset)
            if split is None:
                first = codes
                split = make_split(
                    codes.labels, codes.splits, codes.status, class_names=codes.class_names, paths=codes.paths,
                    messages=codes.messages, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                )
                notes.extend(split.notes)
                log.info("Split (%s): %d train, %d val, %d test; %d failed rows left out", split.source,
                         len(split.train), len(split.val), len(split.test), split.n_failed)
                for w in split.warnings:
                    log.warning("Warning: %s", w)
            _check_same_snapshot(first, codes, cache)
            used = np.concatenate([split.train, split.val, split.test])
            check_codes(codes.X, used, codes.paths, what=f"layer(s) {name}")
            X = np.ascontiguousarray(codes.X, dtype=np.float32)
            y = codes.labels
            trval = np.concatenate([split.train, split.val])
            results[name] = {}
            for clf in classifiers:
                log.info("Sweeping C for %s on %s (%d features)", clf, name, X.shape[1])
                sw = sweep_C(
                    X[split.train], y[split.train],
                    X[split.val] if len(split.val) else None, y[split.val] if len(split.val) else None,
                    clf=clf, norm=norm, grid=g, cv=cv, seed=seed, n_jobs=n_jobs, max_iter=max_iter,
                    max_iter_cap=max_iter_cap, early_stop=patience, widen=widen, refine=refine,
                    class_names=codes.class_names,
                )
                for nt in sw.notes:
                    log.warning("%s / %s: %s", name, clf, nt)
                val_rows = split.val if sw.method == "val" else split.train
                val_metrics = compute_metrics(y[val_rows], sw.predictions[sw.best_index], codes.class_names)
                val_metrics["method"] = sw.method
                t0 = time.perf_counter()
                pipe, fit = refit(X[trval], y[trval], clf=clf, norm=norm, C=sw.best_C, max_iter=max_iter,
                                  max_iter_cap=max_iter_cap, seed=seed)
                fit_s = time.perf_counter() - t0
                if not fit["converged"]:
                    log.warning("%s / %s: %s", name, clf, fit["message"])
                pred_all = {s: top_scores(pipe, X[rows]) if len(rows) else (np.array([], int), np.array([]))
                            for s, rows in (("train", trval), ("test", split.test))}
                stem = f"{name}__{clf}"
                rel_model = f"models/{stem}{MODEL_SUFFIX}"
                save_model(pipe, tmp / rel_model, {
                    "classifier": clf, "norm": norm, "C": sw.best_C, "layers": list(lset),
                    "records": {k: codes.records[k].to_dict() for k in lset}, "spec": codes.spec,
                    "fingerprint": codes.fingerprint, "cache": str(Path(cache).resolve()),
                    "class_names": list(codes.class_names), "n_features": int(X.shape[1]),
                    "max_iter": fit["max_iter"], "converged": fit["converged"], "seed": seed,
                })
                _write_predictions(tmp / "predictions" / f"{stem}.csv", codes, trval, split, pred_all)
                r = {
                    "C": sw.best_C, "c_index": sw.best_index, "c_at_edge": sw.at_edge, "c_curve": sw.curve(),
                    "selection": {"method": sw.method, "n_folds": sw.n_folds, "notes": sw.notes,
                                  "early_stop": patience, "stopped_at": sw.stopped_at, "tried": sw.tried,
                                  "stop_reason": sw.stop_reason},
                    "train": compute_metrics(y[trval], pred_all["train"][0], codes.class_names),
                    "val": val_metrics,
                    "test": compute_metrics(y[split.test], pred_all["test"][0], codes.class_names),
                    "converged": fit["converged"], "convergence_message": fit["message"], "max_iter": fit["max_iter"],
                    "sweep_seconds": sw.seconds, "fit_seconds": fit_s, "n_features": int(X.shape[1]),
                    "norm": norm, "model": rel_model,
                }
                r["train"]["rows"] = "train+val"
                results[name][clf] = r
                test_correct[(name, clf)] = pred_all["test"][0] == y[split.test]
                curves_for_plot.append((name, clf, sw))
                cms_for_plot.append((name, clf, r["test"]))
                log.info("%s / %s: C=%g, val %.4f, test %.4f (sweep %.1fs, fit %.1fs)", name, clf, sw.best_C,
                         val_metrics["accuracy"], r["test"]["accuracy"], sw.seconds, fit_s)
        best = max(
            ((n, c, r) for n, d in results.items() for c, r in d.items()),
            key=lambda t: t[2]["val"]["accuracy"],  # the first of equals, in the order asked for
        )
        _copy_model(tmp / best[2]["model"], tmp / BEST_MODEL)
        metrics = {
            "schema": METRICS_SCHEMA,
            "created": _now(),
            "versions": _versions(),
            "cache": {
                "path": str(Path(cache).resolve()), "fingerprint": info.fingerprint, "spec": info.spec,
                "records": {k: info.layers[k].to_dict() for k in all_keys}, "manifest_hash": info.manifest_hash,
                "dataset_root": info.dataset_root, "rows_sha256": info.rows_sha256, "class_names": first.class_names,
            },
            "split": split.to_dict(),
            "settings": {"norm": norm, "grid": g, "cv": cv, "n_jobs": n_jobs, "concat": concat, "seed": seed,
                         "classifiers": classifiers, "layer_sets": ["+".join(s) for s in sets],
                         "max_iter": max_iter, "max_iter_cap": max_iter_cap, "early_stop": patience,
                         "widen": bool(widen), "refine": refine},
            "results": results,
            "best": {"layers": best[0], "clf": best[1], "val_accuracy": best[2]["val"]["accuracy"],
                     "test_accuracy": best[2]["test"]["accuracy"], "model": best[2]["model"],
                     "file": BEST_MODEL},
            "pairwise": pairwise_vs_best(test_correct, (best[0], best[1])),
            "notes": notes,
            "warnings": list(split.warnings),
            "seconds": time.perf_counter() - t_run,
        }
        atomic_write_text(tmp / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
        if plots:
            _plot_confusions(tmp / "confusion_matrix.png", cms_for_plot)
            _plot_curves(tmp / "c_curve.png", curves_for_plot)
            if len(sets) > 1:
                _plot_layers(tmp / "layer_comparison.png", results)
    summary = format_summary(metrics)
    log.info("Run written to %s; best: %s / %s (val %.4f, test %.4f)", target, best[0], best[1],
             best[2]["val"]["accuracy"], best[2]["test"]["accuracy"])
    return RunResult(target, metrics, summary)


def _write_predictions(path: Path, codes, trval: np.ndarray, split: Split, pred_all: dict) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "split", "true", "pred", "score"])
    names = codes.class_names
    part_of = np.full(len(codes.labels), "", dtype=object)
    for part in SPLITS:
        part_of[getattr(split, part)] = part
    for part, rows in (("train", trval), ("test", split.test)):
        pred, score = pred_all[part]
        for i, p, s in zip(rows, pred, score):
            w.writerow([codes.paths[i], part_of[i], names[codes.labels[i]], names[int(p)], f"{float(s):.6g}"])
    atomic_write_text(path, buf.getvalue())


def format_summary(metrics: Mapping) -> str:
    """The terminal table: layers x classifier -> val acc, test acc, best C, fit seconds; then the
    best model and one ``WARNING:`` line per warning of the run (e.g. a class with no test image)."""
    head = ["layers", "clf", "val acc", "test acc", "best C", "sweep s", "fit s", "p vs best", "note"]
    # McNemar p-value of each result against the best by val accuracy, on the same test rows
    p_vs_best = {(q["layers"], q["clf"]): format_p(q["p_value"]) for q in metrics.get("pairwise", [])}
    rows = []
    for name, d in metrics["results"].items():
        for clf, r in d.items():
            note = []
            if r.get("c_at_edge"):
                note.append("C at grid edge")
            if not r.get("converged", True):
                note.append("not converged")
            rows.append([name, clf, f"{r['val'].get('accuracy', float('nan')):.4f}", f"{r['test']['accuracy']:.4f}",
                         f"{r['C']:g}", f"{r['sweep_seconds']:.1f}", f"{r['fit_seconds']:.1f}",
                         p_vs_best.get((name, clf), "-"), ", ".join(note)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    b = metrics.get("best")
    if b:
        out.append(f"best by val accuracy: {b['layers']} / {b['clf']} (test {b['test_accuracy']:.4f})")
    out.extend(f"WARNING: {w}" for w in metrics.get("warnings", []))
    return "\n".join(out)


# --------------------------------------------------------------------------- plots


def _figure(*size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_confusions(path: Path, items: list) -> None:
    """Row-normalised test confusion matrices (``ConfusionMatrixDisplay`` on our own Agg figure: with
    ``ax=`` it imports pyplot but registers no figure)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(items)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    k = len(items[0][2].get("labels", []))
    side = max(3.5, 0.35 * k + 2)
    fig = _figure(side * cols, side * rows)
    for i, (name, clf, m) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        cm = np.asarray(m.get("confusion_matrix", [[0]]), dtype=float)
        recall = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        labels = m.get("labels", []) if k <= 30 else None
        disp = ConfusionMatrixDisplay(recall, display_labels=labels)
        disp.plot(ax=ax, cmap="Blues", colorbar=False, include_values=k <= 12, values_format=".2f",
                  xticks_rotation="vertical", im_kw={"vmin": 0, "vmax": 1})
        ax.set_title(f"{name} / {clf}: test acc {m.get('accuracy', float('nan')):.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
        for t in disp.text_.ravel() if disp.text_ is not None else ():
            t.set_fontsize(7)
    _save(fig, path)


def _plot_curves(path: Path, items: list) -> None:
    """Val (or CV) accuracy against C of each model, the C values tried only (``ValidationCurveDisplay``,
    one line per model, the fold spread shaded), the chosen C starred."""
    from sklearn.model_selection import ValidationCurveDisplay

    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, clf, sw in items:
        ev = np.flatnonzero(sw.evaluated)
        # per-fold scores are not kept: mean +- std gives the same line and band as the folds would
        folds = np.stack([sw.scores[ev] - sw.scores_std[ev], sw.scores[ev] + sw.scores_std[ev]], axis=1)
        disp = ValidationCurveDisplay(param_name="C", param_range=sw.grid[ev], train_scores=folds, test_scores=folds,
                                      score_name="val accuracy")
        disp.plot(ax=ax, score_type="test", line_kw={"marker": "o", "ms": 3}, fill_between_kw={"alpha": 0.15})
        line = disp.lines_[0]
        line.set_label(f"{name} / {clf}")
        ax.plot([sw.best_C], [sw.scores[sw.best_index]], marker="*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("C")
    ax.set_ylabel("val accuracy" if all(sw.method == "val" for _, _, sw in items) else "val / CV accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_layers(path: Path, results: Mapping) -> None:
    names = list(results)
    clfs = list(dict.fromkeys(c for d in results.values() for c in d))
    fig = _figure(max(5.0, 1.1 * len(names) * len(clfs)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(clfs)
    x = np.arange(len(names))
    for j, c in enumerate(clfs):
        test = [results[n].get(c, {}).get("test", {}).get("accuracy", np.nan) for n in names]
        val = [results[n].get(c, {}).get("val", {}).get("accuracy", np.nan) for n in names]
        ax.bar(x + j * w - 0.4 + w / 2, test, w, label=f"{c} test")
        ax.plot(x + j * w - 0.4 + w / 2, val, "k_", ms=14, mew=2, label="val" if j == 0 else None)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy by layer")
    ax.legend(fontsize=7)
    _save(fig, path)
