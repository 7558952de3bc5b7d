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
3. C is chosen by a sweep over a log grid (default ``np.logspace(-4, 4, 9)``), on the
   val split, or by stratified k-fold CV on the train split when there is no val split
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
      "schema": "cnncodes.metrics/1",
      "created": "...", "versions": {...},
      "cache": {"path", "fingerprint", "spec", "records", "manifest_hash", "dataset_root", "rows_sha256"},
      "split": {"source": "recorded"|"stratified", "seed", "val_fraction", "test_fraction",
                "counts": {"train", "val", "test"}, "n_rows", "n_failed", "failed_examples", "notes",
                "warnings", "roles": {"train", "val", "test"} (where each part comes from)},
      "settings": {"norm", "grid", "cv", "n_jobs", "concat", "max_iter", "max_iter_cap", "early_stop"},
      "results": {
        "<layers>": {
          "<clf>": {
            "C": best C, "c_at_edge": bool, "c_index": int,
            "c_curve": [{"C", "score", "score_std", "converged", "evaluated"}, ...],
                        (score null where the sweep stopped before that C)
            "selection": {"method": "val"|"cv", "n_folds", "notes", "early_stop", "stopped_at"},
            "train": METRICS, "val": METRICS, "test": METRICS,
            "converged": bool, "convergence_message": str, "max_iter": int,
            "sweep_seconds", "fit_seconds", "n_features", "norm",
            "model": "models/<layers>__<clf>.skops"
          }
        }
      },
      "best": {"layers", "clf", "val_accuracy", "test_accuracy", "model", "file": "model.skops"},
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

from . import runfolder as _runfolder
from .errors import CacheError, CacheMismatchError, TrainingDataError, UsageError
from .fileio import atomic_path, atomic_write_text
from .modelfile import BEST_MODEL, MODEL_SCHEMA, MODEL_SUFFIX, find_model, load_model, save_model, sidecar_path
from .modelfile import copy_model as _copy_model

__all__ = [
    "NORMALISERS",
    "CLASSIFIERS",
    "DEFAULT_GRID",
    "signed_sqrt",
    "make_normaliser",
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
METRICS_SCHEMA = "cnncodes.metrics/1"
MIN_GRID_DECADES = 8.0


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
    C : float
        Inverse regularisation strength.
    n_samples, n_features : int, optional
        Shape of the training matrix (kept for callers; the choice below depends on C
        alone). LinearSVC solves the dual (``dual=True``, coordinate descent) for
        ``C <= 1`` and the primal (trust-region Newton) above, whatever the shape. Both
        solve the same problem (squared hinge, L2, regularised intercept); only the time
        differs. Measured on L2-normalised codes, one thread: at C <= 1 the dual was 1.3x
        to 3x faster than the primal in every shape tried, also with many more rows than
        features (13,000 x 2,048 sparse post-ReLU codes: C=0.01 5.2 s vs 12.9 s, C=1
        3.5 s vs 12.5 s; 10,000 x 256: C=1 0.58 s vs 0.78 s; sklearn digits 1,437 x 64:
        0.04 s vs 0.05 s); above C=1 the dual needs thousands of passes on some codes
        (1,167 x 1,280 EfficientNet codes, C=100: 3.45 s / 3,492 iterations, not
        converged at C=1e4, where the primal takes 0.4 s; 10,000 x 256, C=100: 6.0 s and
        not converged vs 1.2 s).
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
        dual = bool(C <= 1.0)
        return LinearSVC(C=float(C), dual=dual, max_iter=int(max_iter), random_state=seed)
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
        The C values, ascending.
    scores, scores_std : ndarray
        Accuracy at each C (val split), or mean and std over CV folds; NaN where the
        C was not evaluated (the sweep stopped early, see ``evaluated``).
    converged : ndarray of bool
        Whether every fit at that C converged (True where not evaluated).
    best_index : int
        ``argmax(scores)`` over the evaluated C values (the smallest C among ties).
    predictions : ndarray of shape (len(grid), n_eval)
        Predicted labels of the evaluation rows at each C (val rows, or out-of-fold);
        rows of C values that were not evaluated repeat the best C's predictions.
    eval_rows : ndarray of int
        The rows (positions in the arrays given to :func:`sweep_C`) those predictions are for.
    method : {"val", "cv"}
    n_folds : int
    seconds : float
    notes : list of str
    evaluated : ndarray of bool
        Which C values were fitted: all of them, or those up to an early stop.
    stopped_at : float or None
        The last C evaluated when the sweep stopped early, else None.
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

    def __post_init__(self):
        if self.evaluated is None:
            self.evaluated = np.ones(len(self.grid), dtype=bool)

    @property
    def best_C(self) -> float:
        return float(self.grid[self.best_index])

    @property
    def at_edge(self) -> bool:
        return self.best_index in (0, len(self.grid) - 1)

    def curve(self) -> list[dict]:
        return [
            {"C": float(c), "score": float(s) if e else None, "score_std": float(sd) if e else None,
             "converged": bool(cv), "evaluated": bool(e)}
            for c, s, sd, cv, e in zip(self.grid, self.scores, self.scores_std, self.converged, self.evaluated)
        ]


def _check_grid(grid) -> np.ndarray:
    g = np.asarray(grid, dtype=np.float64).ravel()
    if g.size < 2 or not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise UsageError(f"The C grid must hold at least two finite values > 0. Got {list(g)} instead.")
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
    kw = dict(n_samples=Xtr.shape[0], n_features=Xtr.shape[1], max_iter=max_iter, seed=seed)
    est = make_classifier(clf, C, **kw) if norm is None else make_pipeline(norm, clf, C, **kw)
    info = fit_with_retries(est, Xtr, ytr, max_iter_cap=max_iter_cap)
    with _threads_for(Xev):
        return est.predict(Xev), info["converged"]


def _softmax_path(norm, grid, X, y, tr, ev, *, max_iter, max_iter_cap, seed, patience=0):
    """Warm-started softmax fits along the ascending grid on rows ``tr``; predictions of rows ``ev`` at each C.

    With ``patience``, stop once the accuracy on rows ``ev`` has dropped ``patience`` times
    in a row after its peak (see :func:`_peaked`); the arrays returned then hold the
    evaluated C values only. ``norm=None``: X is already normalised.
    """
    Xtr, ytr, Xev = X[tr], y[tr], X[ev]
    if norm is None:
        Ztr, Zev = np.asarray(Xtr, dtype=np.float32), np.asarray(Xev, dtype=np.float32)
    else:
        normaliser = make_normaliser(norm).fit(Xtr)
        Ztr = np.asarray(normaliser.transform(Xtr), dtype=np.float32)
        Zev = np.asarray(normaliser.transform(Xev), dtype=np.float32)
    lr = make_classifier("softmax", grid[0], max_iter=max_iter, seed=seed, warm_start=True)
    preds, conv, scores = [], [], []
    for C in grid:
        lr.set_params(C=float(C), max_iter=max_iter)
        info = fit_with_retries(lr, Ztr, ytr, max_iter_cap=max_iter_cap)
        with _threads_for(Zev):
            preds.append(lr.predict(Zev))
        conv.append(info["converged"])
        scores.append(float(np.mean(preds[-1] == y[ev])))
        if _peaked(scores, patience):
            break
    return np.stack(preds), np.asarray(conv)


def _close(results) -> None:
    """Stop a joblib result generator: the fits not yet dispatched are never started."""
    close = getattr(results, "close", None)
    if close is not None:
        close()


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
    class_names: Sequence[str] = (),
) -> SweepResult:
    """Choose C by accuracy on a val split, or by stratified k-fold CV on train.

    C values are evaluated in ascending order. The codes are normalised once (float32
    throughout; the normaliser fitted on the training rows, as each pipeline would);
    SVM fits run in parallel over C (and folds) with joblib, X memory-mapped once;
    softmax runs warm-started along the grid, in parallel over folds.

    Parameters
    ----------
    X_train, y_train : arrays
        Training codes (float32 is kept) and labels.
    X_val, y_val : arrays, optional
        The val split; when None or empty, ``cv``-fold stratified CV on train is used.
    clf, norm : str
        See :func:`make_classifier` and :func:`make_normaliser`.
    grid : sequence of float, optional
        C values; default ``np.logspace(-4, 4, 9)``.
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
        Patience: stop the sweep once the score has fallen strictly below its best
        for this many consecutive larger C values (default 2; 0 or None: evaluate the
        whole grid). The larger C values, the slowest to fit, are then not evaluated;
        they are NaN in ``scores``, False in ``evaluated``, and a note says where the
        sweep stopped. A curve that would rise again to a higher peak beyond such a
        drop would be missed. Not applied to the softmax CV sweep (its folds run
        warm-started paths in parallel).

    Returns
    -------
    SweepResult

    Raises
    ------
    UsageError
        For a bad grid, classifier, normaliser, ``early_stop`` or ``cv < 2``.
    TrainingDataError
        When the folds cannot be made.
    """
    from joblib import Parallel, delayed

    g = _check_grid(DEFAULT_GRID if grid is None else grid)
    make_normaliser(norm)
    make_classifier(clf)
    patience = _check_patience(early_stop)
    X_train = np.asarray(X_train, dtype=np.float32)
    y_train = np.asarray(y_train)
    t0 = time.perf_counter()
    kw = dict(max_iter=max_iter, max_iter_cap=min(max_iter_cap, 4 * max_iter), seed=seed)
    notes: list[str] = []
    n_c = len(g)
    evaluated = np.zeros(n_c, dtype=bool)
    conv = np.ones(n_c, dtype=bool)
    scores = np.full(n_c, np.nan)
    std = np.zeros(n_c)
    # generator output: the fits beyond an early stop are never dispatched
    par = dict(n_jobs=n_jobs, return_as="generator", pre_dispatch="n_jobs", batch_size=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        # joblib's note when an early stop cancels fits already dispatched: that is the point
        warnings.filterwarnings("ignore", message=".*tasks which were still being processed.*")
        if X_val is not None and len(X_val):
            y_val = np.asarray(y_val)
            Xa = np.concatenate([X_train, np.asarray(X_val, dtype=np.float32)])
            ya = np.concatenate([y_train, y_val])
            tr, ev = np.arange(len(y_train)), np.arange(len(y_train), len(ya))
            Za = _prenormalise(norm, Xa, tr)
            del Xa
            preds = np.empty((n_c, len(y_val)), dtype=y_train.dtype)
            if clf == "softmax":
                p, c = _softmax_path(None, g, Za, ya, tr, ev, patience=patience, **kw)
                m = len(p)
                preds[:m], conv[:m], evaluated[:m] = p, c, True
                scores[:m] = (p == y_val[None, :]).mean(axis=1)
            else:
                out = Parallel(**par)(delayed(_fit_predict_one)(None, clf, C, Za, ya, tr, ev, **kw) for C in g)
                for i, (p, c) in enumerate(out):
                    preds[i], conv[i], evaluated[i] = p, c, True
                    scores[i] = float(np.mean(p == y_val))
                    if _peaked(scores[: i + 1], patience):
                        _close(out)
                        break
            method, k, eval_rows = "val", 0, np.arange(len(y_val))
        else:
            from sklearn.model_selection import StratifiedKFold

            if not isinstance(cv, (int, np.integer)) or cv < 2:
                raise UsageError(f"The 'cv' parameter must be an int >= 2. Got {cv!r} instead.")
            k, notes = _n_folds(y_train, int(cv), class_names)
            try:
                folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X_train, y_train))
            except ValueError as e:
                raise TrainingDataError(f"Cannot make {k} CV folds of {len(y_train)} training images: {e}") from e
            for tr, _ in folds:
                if np.unique(y_train[tr]).size < 2:
                    raise TrainingDataError("A CV fold's training part holds a single class: add images")
            # a stateful normaliser (standard) is fitted inside each fold; the others are row-wise
            pre = norm != "standard"
            Xs = _prenormalise(norm, X_train, np.arange(len(y_train))) if pre else X_train
            nrm = None if pre else norm
            preds = np.empty((n_c, len(y_train)), dtype=y_train.dtype)
            fold_scores = np.full((k, n_c), np.nan)
            if clf == "softmax":
                out = Parallel(n_jobs=n_jobs)(
                    delayed(_softmax_path)(nrm, g, Xs, y_train, tr, te, **kw) for tr, te in folds
                )
                for j, ((p, c), (_, te)) in enumerate(zip(out, folds)):
                    preds[:, te] = p
                    conv &= c
                    fold_scores[j] = (p == y_train[te][None, :]).mean(axis=1)
                evaluated[:] = True
            else:
                jobs = [(i, j) for i in range(n_c) for j in range(k)]
                out = Parallel(**par)(
                    delayed(_fit_predict_one)(nrm, clf, g[i], Xs, y_train, folds[j][0], folds[j][1], **kw)
                    for i, j in jobs
                )
                for (i, j), (p, c) in zip(jobs, out):
                    te = folds[j][1]
                    preds[i, te] = p
                    conv[i] &= c
                    fold_scores[j, i] = float(np.mean(p == y_train[te]))
                    if j == k - 1:
                        evaluated[i] = True
                        if _peaked(fold_scores[:, : i + 1].mean(axis=0), patience):
                            _close(out)
                            break
            scores[evaluated] = fold_scores[:, evaluated].mean(axis=0)
            std[evaluated] = fold_scores[:, evaluated].std(axis=0)
            method, eval_rows = "cv", np.arange(len(y_train))
    best = int(np.nanargmax(scores))
    preds[~evaluated] = preds[best]
    stopped_at = None
    if not evaluated.all():
        last = int(np.flatnonzero(evaluated)[-1])
        stopped_at = float(g[last])
        notes.append(
            f"sweep stopped early: the score fell below its best (C={g[best]:g}) for {patience} consecutive larger "
            f"C values; C = {', '.join(f'{c:g}' for c in g[~evaluated])} not evaluated"
        )
    res = SweepResult(g, scores, std, conv, best, preds, eval_rows, method, k, time.perf_counter() - t0, notes,
                      evaluated, stopped_at)
    if res.at_edge:
        res.notes.append(
            f"best C={res.best_C:g} is at the {'lower' if best == 0 else 'upper'} edge of the grid "
            f"({g[0]:g}..{g[-1]:g}): widen the grid"
        )
    if not conv.all():
        res.notes.append(f"fits did not converge at C = {', '.join(f'{c:g}' for c in g[~conv])}")
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
    """Classification metrics of one split, with ``sklearn.metrics``.

    Parameters
    ----------
    y_true, y_pred : array of int
        Class indices into ``class_names``.
    class_names : sequence of str

    Returns
    -------
    dict
        ``n``, ``accuracy`` (top-1), ``balanced_accuracy`` (mean per-class accuracy over
        the classes present in ``y_true``), ``per_class`` (precision, recall, f1, support
        per class name), ``confusion_matrix`` (rows: true, columns: predicted, in the
        order of ``labels``), ``labels``. Empty splits give ``{"n": 0}``.
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support)

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.size == 0:
        return {"n": 0}
    labels = np.arange(len(class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = accuracy_score(y_true, y_pred)
        bal = balanced_accuracy_score(y_true, y_pred)
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": int(y_true.size),
        "accuracy": float(acc),
        "balanced_accuracy": float(bal),
        "per_class": {
            str(name): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
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
                    max_iter_cap=max_iter_cap, early_stop=patience, class_names=codes.class_names,
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
                                  "early_stop": patience, "stopped_at": sw.stopped_at},
                    "train": compute_metrics(y[trval], pred_all["train"][0], codes.class_names),
                    "val": val_metrics,
                    "test": compute_metrics(y[split.test], pred_all["test"][0], codes.class_names),
                    "converged": fit["converged"], "convergence_message": fit["message"], "max_iter": fit["max_iter"],
                    "sweep_seconds": sw.seconds, "fit_seconds": fit_s, "n_features": int(X.shape[1]),
                    "norm": norm, "model": rel_model,
                }
                r["train"]["rows"] = "train+val"
                results[name][clf] = r
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
                         "max_iter": max_iter, "max_iter_cap": max_iter_cap, "early_stop": patience},
            "results": results,
            "best": {"layers": best[0], "clf": best[1], "val_accuracy": best[2]["val"]["accuracy"],
                     "test_accuracy": best[2]["test"]["accuracy"], "model": best[2]["model"],
                     "file": BEST_MODEL},
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
    head = ["layers", "clf", "val acc", "test acc", "best C", "sweep s", "fit s", "note"]
    rows = []
    for name, d in metrics["results"].items():
        for clf, r in d.items():
            note = []
            if r.get("c_at_edge"):
                note.append("C at grid edge")
            if not r.get("converged", True):
                note.append("not converged")
            rows.append([name, clf, f"{r['val'].get('accuracy', float('nan')):.4f}", f"{r['test']['accuracy']:.4f}",
                         f"{r['C']:g}", f"{r['sweep_seconds']:.1f}", f"{r['fit_seconds']:.1f}", ", ".join(note)])
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
    n = len(items)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    k = len(items[0][2].get("labels", []))
    side = max(3.5, 0.35 * k + 2)
    fig = _figure(side * cols, side * rows)
    for i, (name, clf, m) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        cm = np.asarray(m.get("confusion_matrix", [[0]]), dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"{name} / {clf}: test acc {m.get('accuracy', float('nan')):.3f}", fontsize=9)
        labels = m.get("labels", [])
        if k <= 30:
            ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(k), labels, fontsize=7)
            if k <= 12:
                for a in range(k):
                    for b in range(k):
                        ax.text(b, a, int(cm[a, b]), ha="center", va="center", fontsize=7,
                                color="white" if norm[a, b] > 0.5 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    _save(fig, path)


def _plot_curves(path: Path, items: list) -> None:
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, clf, sw in items:
        line, = ax.semilogx(sw.grid, sw.scores, marker="o", ms=3, label=f"{name} / {clf}")
        if sw.method == "cv":
            ax.fill_between(sw.grid, sw.scores - sw.scores_std, sw.scores + sw.scores_std, alpha=0.15,
                            color=line.get_color())
        ax.plot([sw.best_C], [sw.scores[sw.best_index]], marker="*", ms=12, color=line.get_color())
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
