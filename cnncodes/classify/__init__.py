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
                   "widen", "refine", "train_views" ("combined", or "all": every kept view a training row)},
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
            "sweep_seconds", "fit_seconds", "n_features", "norm", "n_fit_rows" (rows of the final fit),
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

Where each part lives: ``_estimators`` (normalisers, classifiers, fitting with retries),
``_sweep`` (the C sweep and the refit; the schedule is :mod:`cnncodes.search`), ``_metrics``,
``_run`` (:func:`train_run`), ``_plots``; the splits are :mod:`cnncodes.splits`, the provenance
checks :mod:`cnncodes.compat`, model files :mod:`cnncodes.modelfile`.
"""

from __future__ import annotations

from .._provenance import _jsonable, _now, _versions
from ..compat import Difference, check_compatible, diff_extraction
from ..modelfile import BEST_MODEL, MODEL_SCHEMA, MODEL_SUFFIX, find_model, load_model, save_model, sidecar_path
from ..splits import SPLITS, Split, check_codes, make_split
from ._estimators import (CLASSIFIERS, NORMALISERS, CodesLinearSVC, fit_with_retries, make_classifier, make_normaliser,
                          make_pipeline, signed_sqrt, top_scores)
from ._metrics import compute_metrics, format_summary
from ._plots import _plot_confusions, _plot_curves, _plot_layers, _save
from ._run import (METRICS_SCHEMA, RunResult, _check_same_snapshot, _layer_sets, default_run_name, train_run)
from ._sweep import (DEFAULT_GRID, MAX_GRID_SIZE, MIN_GRID_DECADES, SweepResult, _check_grid, _check_patience,
                     _fit_predict_one, _peaked,
                     refit, sweep_C)

# Saved models name these by where they are public (skops and pickle record ``__module__``; the model
# files' allow-list, cnncodes.modelfile.trusted_types, holds "cnncodes.classify.signed_sqrt"): keep it.
signed_sqrt.__module__ = CodesLinearSVC.__module__ = __name__

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
