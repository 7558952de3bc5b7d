"""A training run: every (layer set, classifier) on one cache snapshot, into a run folder."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import runfolder as _runfolder
from ..errors import CacheError, InvalidParameterError, UsageError
from ..fileio import atomic_write_text
from ..modelfile import BEST_MODEL, MODEL_SUFFIX, save_model
from ..modelfile import copy_model as _copy_model
from .._provenance import _jsonable, _now, _versions
from ..splits import SPLITS, Split, check_codes, make_split
from ..stats import pairwise_vs_best
from ._estimators import CLASSIFIERS, make_classifier, make_normaliser, top_scores
from ._metrics import compute_metrics, format_summary
from ._plots import _plot_confusions, _plot_curves, _plot_layers
from ._sweep import _check_grid, _check_patience, refit, sweep_C
from ._views import ViewRows, check_cache, check_layers, check_train_views, load_view_rows, need_val

log = logging.getLogger("cnncodes.classify")


METRICS_SCHEMA = "cnncodes.metrics/2"  # /2: c_curve holds every C tried (widened, refined); selection.tried


@dataclass
class RunResult:
    """What :func:`train_run` produced."""

    run_dir: Path
    metrics: dict
    summary: str


def _layer_sets(layers: Sequence[str], concat: bool) -> list[list[str]]:
    if not layers:
        raise UsageError("Name at least one layer (e.g. layers='fc7').")
    uniq = list(dict.fromkeys(layers))
    return [uniq] if concat else [[k] for k in uniq]


def default_run_name(cache: str | os.PathLike, layers: Sequence[str], concat: bool = False,
                     settings: Mapping | None = None) -> str:
    """``<cache stem>__<layers>__<UTC time, ms>__<settings hash>``; :func:`train_run` creates it
    exclusively (``-2``, ``-3`` ... when taken), so two runs never share a folder."""
    return _runfolder.default_run_name(cache, layers, concat, settings)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidParameterError(name, "train_run", f"must be an int >= {low}. Got {value!r} instead.")
    return int(value)


def _check_train_options(*, max_iter, max_iter_cap, n_jobs, seed, cv) -> None:
    """The options a fit would only trip over later (or never: max_iter=0 retried forever)."""
    _check_int("max_iter", max_iter, 1)
    _check_int("max_iter_cap", max_iter_cap, int(max_iter))
    _check_int("cv", cv, 2)
    if n_jobs is not None and (isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs == 0):
        raise InvalidParameterError("n_jobs", "train_run", f"must be None or an int other than 0 (-1: all cores). "
                                    f"Got {n_jobs!r} instead.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InvalidParameterError("seed", "train_run", f"must be an int in the range [0, 2**32 - 1]. "
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
    refine: int | None = None,
    out: str | os.PathLike | None = None,
    runs_root: str | os.PathLike = "artifacts/runs",
    overwrite: bool = False,
    plots: bool = True,
    stream: bool | None = False,
    stream_options: Mapping | None = None,
    memory_budget: float | None = None,
    train_views: str = "combined",
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
        See :func:`fit_with_retries`. A streamed run stops each C at ``max_iter`` L-BFGS iterations
        (passes over the training rows) and marks it unconverged there.
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
    stream : bool or None
        True: train from chunks of the cache without loading all codes (:mod:`cnncodes.stream`:
        the same LinearSVC / LogisticRegression objectives minimised exactly by L-BFGS, one pass over
        the chunks per step, at most ``max_iter`` steps; the same C search, on the val split); None:
        only when the codes would not fit the memory budget (:func:`cnncodes.stream.needs_streaming`);
        False (default): in memory.
    stream_options : mapping, optional
        ``chunk_rows`` (rows per read, default 2048) and ``tol`` (stop at ``max |gradient| <= tol``
        of the objective scaled as scikit-learn's, default 1e-6) of the streamed training.
    memory_budget : float, optional
        Bytes the in-memory path may use before ``stream=None`` streams; default
        ``CNNCODES_MEMORY_BUDGET`` or else the memory available (:func:`cnncodes.stream.memory_budget`).
    train_views : {"combined", "all"}
        ``combined`` (default): one training row per image, its stored code. ``all``: every kept
        view of a training image is a training row with its label (a cache extracted with
        ``keep_views=True`` and ``combine="mean"``); val and test images are predicted on their
        stored (mean) code, C chosen on the val split (see :mod:`cnncodes.classify._views`).
        In memory only.

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
    layers, classifiers, g, patience = _checked_arguments(layers, classifiers, norm, grid, cv=cv, seed=seed,
                                                          n_jobs=n_jobs, max_iter=max_iter, max_iter_cap=max_iter_cap,
                                                          early_stop=early_stop)
    check_train_views(train_views, stream)
    if memory_budget is not None:  # a bad budget is a mistake even in a run that would not stream
        from ..stream import memory_budget as _memory_budget

        _memory_budget(memory_budget)
    if stream_options is not None:  # likewise a bad option
        from ..stream import check_stream_options

        check_stream_options(stream_options)
    sets = _layer_sets(layers, concat)
    check_layers(sets)
    all_keys = [k for s in sets for k in s]
    run_settings = {"layer_sets": ["+".join(s) for s in sets], "classifiers": classifiers, "norm": norm,
                    "grid": [float(c) for c in g], "cv": cv, "seed": seed, "val_fraction": val_fraction,
                    "test_fraction": test_fraction, "max_iter": max_iter, "early_stop": patience,
                    # absent for the default: the settings hash (and default run name) of earlier runs stays the same
                    **({"train_views": train_views} if train_views != "combined" else {})}
    target, marker = _run_target(cache, out, runs_root, overwrite, all_keys, concat, run_settings)
    fit = _FitSettings(norm, g, cv, seed, n_jobs, max_iter, max_iter_cap, patience, widen, refine, train_views)
    if stream is not False and train_views == "combined":
        from .. import stream as _stream

        if stream or _stream.needs_streaming(cache, sets, memory_budget):
            return _stream.train_run_stream(cache, sets, classifiers=classifiers, norm=norm, grid=g, seed=seed,
                                            val_fraction=val_fraction, test_fraction=test_fraction, out=out,
                                            target=target, overwrite=overwrite, marker=marker, plots=plots,
                                            early_stop=patience, widen=widen, refine=refine, max_iter=max_iter,
                                            stream_options=stream_options)
    return _train_in_memory(cache, sets, classifiers, fit, val_fraction=val_fraction, test_fraction=test_fraction,
                            concat=concat, target=target, reserve=out is None, overwrite=overwrite, marker=marker,
                            plots=plots)


def _checked_arguments(layers, classifiers, norm, grid, **options):
    """Every argument a fit would only trip over later, checked before any work: ``(layers, classifiers,
    grid, patience)`` with one layer or classifier given as a string made a list."""
    from ..search import DEFAULT_START

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
    early_stop = options.pop("early_stop")
    _check_train_options(**options)
    patience = _check_patience(early_stop)
    return layers, classifiers, _check_grid(DEFAULT_START if grid is None else grid), patience


@dataclass
class _Fitted:
    """What the fits of a run produced, in the order asked for."""

    results: dict = field(default_factory=dict)  # layer set -> classifier -> results
    curves: list = field(default_factory=list)  # (layer set, classifier, sweep) for the C-curve plot
    cms: list = field(default_factory=list)  # (layer set, classifier, test metrics) for the confusion plot
    test_correct: dict = field(default_factory=dict)  # (layer set, classifier) -> right on test (for McNemar)
    first: object = None  # the first layer set's codes: the run's rows and spec
    split: Split | None = None


def _train_in_memory(cache, sets, classifiers, fit: _FitSettings, *, val_fraction, test_fraction, concat, target,
                     reserve: bool, overwrite: bool, marker: dict, plots: bool) -> RunResult:
    """Fit every (layer set, classifier) on one snapshot of the cache and write the run folder."""
    from ..store import open_cache

    # one open handle for the whole run: every layer and the row table come from one version of the file,
    # even if an extraction replaces the cache meanwhile (it does so by rename, never in place)
    snap = open_cache(cache)
    info = snap.info
    all_keys = [k for s in sets for k in s]
    missing = [k for k in all_keys if k not in info.layers]
    t_run = time.perf_counter()
    with snap, _runfolder.staged_run(target, overwrite=overwrite, cache=cache, reserve=reserve,
                                     marker=marker) as (tmp, target):
        if missing:
            snap.load(missing)  # raises UsageError naming what the cache holds
        done = _fit_all(tmp, cache, snap, sets, classifiers, fit, val_fraction, test_fraction)
        best = max(
            ((n, c, r) for n, d in done.results.items() for c, r in d.items()),
            key=lambda t: t[2]["val"]["accuracy"],  # the first of equals, in the order asked for
        )
        _copy_model(tmp / best[2]["model"], tmp / BEST_MODEL)
        metrics = _metrics(cache, info, done.first, done.split, fit, all_keys, sets, classifiers, concat,
                           done.results, best, done.test_correct, time.perf_counter() - t_run)
        atomic_write_text(tmp / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
        if plots:
            _write_plots(tmp, done, n_sets=len(sets))
    summary = format_summary(metrics)
    log.info("Run written to %s; best: %s / %s (val %.4f, test %.4f)", target, best[0], best[1],
             best[2]["val"]["accuracy"], best[2]["test"]["accuracy"])
    return RunResult(target, metrics, summary)


def _fit_all(tmp: Path, cache, snap, sets, classifiers, fit: _FitSettings, val_fraction: float,
             test_fraction: float) -> _Fitted:
    """Load each layer set from the snapshot (the split made from the first) and fit every classifier on it."""
    done = _Fitted()
    n_views = check_cache(snap.info, sets, cache) if fit.train_views == "all" else 0
    for lset in sets:
        codes = snap.load(lset)
        name = "+".join(lset)
        if done.split is None:
            done.first, done.split = codes, _split_of(codes, val_fraction, test_fraction, fit.seed)
        split = done.split
        _check_same_snapshot(done.first, codes, cache)
        check_codes(codes.X, np.concatenate([split.train, split.val, split.test]), codes.paths,
                    what=f"layer(s) {name}")
        X = np.ascontiguousarray(codes.X, dtype=np.float32)
        views = None
        if n_views:
            need_val(split)
            views = load_view_rows(snap, lset, n_views, np.concatenate([split.train, split.val]), codes.paths, name)
        done.results[name] = {}
        for clf in classifiers:
            r, sw, done.test_correct[(name, clf)] = _fit_one(tmp, cache, codes, lset, X, split, clf, fit, views)
            done.results[name][clf] = r
            done.curves.append((name, clf, sw))
            done.cms.append((name, clf, r["test"]))
    return done


def _write_plots(tmp: Path, done: _Fitted, n_sets: int) -> None:
    _plot_confusions(tmp / "confusion_matrix.png", done.cms)
    _plot_curves(tmp / "c_curve.png", done.curves)
    if n_sets > 1:
        _plot_layers(tmp / "layer_comparison.png", done.results)


def _run_target(cache, out, runs_root, overwrite: bool, all_keys, concat: bool, run_settings: dict):
    """The run folder to write (``out``, checked, or a name under ``runs_root``) and its marker."""
    if out is not None:
        target = Path(out)
        _runfolder.check_target(target, cache, overwrite)
    else:
        target = Path(runs_root) / default_run_name(cache, all_keys, concat, run_settings)
    marker = {"created": _now(), "cache": str(Path(cache).resolve()), "settings": run_settings,
              "settings_hash": _runfolder.settings_hash(run_settings)}
    return target, marker


@dataclass(frozen=True)
class _FitSettings:
    """What every (layer set, classifier) of a run is fitted with."""

    norm: str
    grid: np.ndarray
    cv: int
    seed: int
    n_jobs: int | None
    max_iter: int
    max_iter_cap: int
    patience: int
    widen: bool
    refine: int | None
    train_views: str = "combined"


def _split_of(codes, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """The run's split, made once from the first layer set's rows (every layer shares them)."""
    split = make_split(
        codes.labels, codes.splits, codes.status, class_names=codes.class_names, paths=codes.paths,
        messages=codes.messages, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
    )
    log.info("Split (%s): %d train, %d val, %d test; %d failed rows left out", split.source,
             len(split.train), len(split.val), len(split.test), split.n_failed)
    for w in split.warnings:
        log.warning("Warning: %s", w)
    return split


def _training_rows(X: np.ndarray, y: np.ndarray, images: np.ndarray, views: ViewRows | None):
    """The rows a model is fitted on: the images' codes, or each of their kept views."""
    return (X[images], y[images]) if views is None else views.rows(images, y)


def _fit_one(tmp: Path, cache, codes, lset, X: np.ndarray, split: Split, clf: str, fit: _FitSettings,
             views: ViewRows | None = None):
    """Sweep C on train (val or CV), refit on train+val, save the model and its predictions; its results, the
    sweep, and which test rows it gets right. With ``views`` the fits are on every view of the training
    images; val and test images are always predicted on their codes ``X``."""
    name = "+".join(lset)
    y = codes.labels
    trval = np.concatenate([split.train, split.val])
    log.info("Sweeping C for %s on %s (%d features)", clf, name, X.shape[1])
    X_fit, y_fit = _training_rows(X, y, split.train, views)
    sw = sweep_C(
        X_fit, y_fit,
        X[split.val] if len(split.val) else None, y[split.val] if len(split.val) else None,
        clf=clf, norm=fit.norm, grid=fit.grid, cv=fit.cv, seed=fit.seed, n_jobs=fit.n_jobs, max_iter=fit.max_iter,
        max_iter_cap=fit.max_iter_cap, early_stop=fit.patience, widen=fit.widen, refine=fit.refine,
        class_names=codes.class_names,
    )
    for nt in sw.notes:
        log.warning("%s / %s: %s", name, clf, nt)
    val_rows = split.val if sw.method == "val" else split.train
    val_metrics = compute_metrics(y[val_rows], sw.predictions[sw.best_index], codes.class_names)
    val_metrics["method"] = sw.method
    t0 = time.perf_counter()
    X_fit, y_fit = _training_rows(X, y, trval, views)
    pipe, fitted = refit(X_fit, y_fit, clf=clf, norm=fit.norm, C=sw.best_C, max_iter=fit.max_iter,
                         max_iter_cap=fit.max_iter_cap, seed=fit.seed)
    fit_s = time.perf_counter() - t0
    if not fitted["converged"]:
        log.warning("%s / %s: %s", name, clf, fitted["message"])
    pred_all = {s: top_scores(pipe, X[rows]) if len(rows) else (np.array([], int), np.array([]))
                for s, rows in (("train", trval), ("test", split.test))}
    stem = f"{name}__{clf}"
    rel_model = f"models/{stem}{MODEL_SUFFIX}"
    save_model(pipe, tmp / rel_model, {
        "classifier": clf, "norm": fit.norm, "C": sw.best_C, "layers": list(lset),
        "records": {k: codes.records[k].to_dict() for k in lset}, "spec": codes.spec,
        "fingerprint": codes.fingerprint, "cache": str(Path(cache).resolve()),
        "class_names": list(codes.class_names), "n_features": int(X.shape[1]),
        "max_iter": fitted["max_iter"], "converged": fitted["converged"], "seed": fit.seed,
        "train_views": fit.train_views,
    })
    _write_predictions(tmp / "predictions" / f"{stem}.csv", codes, trval, split, pred_all)
    r = {
        "C": sw.best_C, "c_index": sw.best_index, "c_at_edge": sw.at_edge, "c_curve": sw.curve(),
        "selection": {"method": sw.method, "n_folds": sw.n_folds, "notes": sw.notes,
                      "early_stop": fit.patience, "stopped_at": sw.stopped_at, "tried": sw.tried,
                      "stop_reason": sw.stop_reason},
        "train": compute_metrics(y[trval], pred_all["train"][0], codes.class_names),
        "val": val_metrics,
        "test": compute_metrics(y[split.test], pred_all["test"][0], codes.class_names),
        "converged": fitted["converged"], "convergence_message": fitted["message"], "max_iter": fitted["max_iter"],
        "sweep_seconds": sw.seconds, "fit_seconds": fit_s, "n_features": int(X.shape[1]),
        "norm": fit.norm, "model": rel_model, "n_fit_rows": int(len(y_fit)),
    }
    r["train"]["rows"] = "train+val"
    log.info("%s / %s: C=%g, val %.4f, test %.4f (sweep %.1fs, fit %.1fs)", name, clf, sw.best_C,
             val_metrics["accuracy"], r["test"]["accuracy"], sw.seconds, fit_s)
    return r, sw, pred_all["test"][0] == y[split.test]


def _metrics(cache, info, first, split: Split, fit: _FitSettings, all_keys, sets, classifiers, concat: bool,
             results: dict, best, test_correct: dict, seconds: float) -> dict:
    """The run's ``metrics.json``."""
    return {
        "schema": METRICS_SCHEMA,
        "created": _now(),
        "versions": _versions(),
        "cache": {
            "path": str(Path(cache).resolve()), "fingerprint": info.fingerprint, "spec": info.spec,
            "records": {k: info.layers[k].to_dict() for k in all_keys}, "manifest_hash": info.manifest_hash,
            "dataset_root": info.dataset_root, "rows_sha256": info.rows_sha256, "class_names": first.class_names,
        },
        "split": split.to_dict(),
        "settings": {"norm": fit.norm, "grid": fit.grid, "cv": fit.cv, "n_jobs": fit.n_jobs, "concat": concat,
                     "seed": fit.seed, "classifiers": classifiers, "layer_sets": ["+".join(s) for s in sets],
                     "max_iter": fit.max_iter, "max_iter_cap": fit.max_iter_cap, "early_stop": fit.patience,
                     "widen": bool(fit.widen), "refine": fit.refine, "train_views": fit.train_views},
        "results": results,
        "best": {"layers": best[0], "clf": best[1], "val_accuracy": best[2]["val"]["accuracy"],
                 "test_accuracy": best[2]["test"]["accuracy"], "model": best[2]["model"],
                 "file": BEST_MODEL},
        "pairwise": pairwise_vs_best(test_correct, (best[0], best[1])),
        "notes": list(split.notes),
        "warnings": list(split.warnings),
        "seconds": seconds,
    }


def _write_predictions(path: Path, codes, trval: np.ndarray, split: Split, pred_all: dict) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_runfolder.PREDICTIONS_HEADER)
    names = codes.class_names
    part_of = np.full(len(codes.labels), "", dtype=object)
    for part in SPLITS:
        part_of[getattr(split, part)] = part
    for part, rows in (("train", trval), ("test", split.test)):
        pred, score = pred_all[part]
        for i, p, s in zip(rows, pred, score):
            w.writerow([codes.paths[i], part_of[i], names[codes.labels[i]], names[int(p)], f"{float(s):.6g}"])
    atomic_write_text(path, buf.getvalue())
