"""Linear classifiers on codes larger than memory (``train_run(stream=True)``, ``train_svm.py --stream``).

Codes are read chunk by chunk through one snapshot of the cache (:func:`cnncodes.store.open_cache`)
and never all at once; each chunk is normalised row by row as the in-memory path does (``l2``,
``sqrt``, ``none``; ``standard`` first learns its mean and variance in a streamed pass).

The classifiers are the in-memory ones, fitted exactly: :mod:`cnncodes.stream_solver` minimises
LinearSVC's objective (``svm``: squared hinge, one-vs-rest) and LogisticRegression's (``softmax``:
multinomial) by L-BFGS, the full gradient summed over one pass of the chunks per step, and hands back
fitted ``LinearSVC`` / ``LogisticRegression`` objects. (Averaged SGD, tried first, stayed 1-2 pp below
the in-memory fits on Fashion-MNIST codes after 20 epochs, whatever the row order.)

C is searched as in memory (:class:`cnncodes.search.CSchedule`: the coarse grid with its early stop,
widened past an edge, refined to half decades), by accuracy on the val split; the C values of one
batch of the schedule are solved together, one pass over the chunks evaluating all of them, each
warm-started from the nearest C solved before. The chosen C is refit on train+val, warm-started
from its train solution. Memory holds one chunk, the models and O(N) row indices: it does not grow
with the codes' size.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidParameterError, UsageError
from .stream_read import ChunkReader, SpilledRows, verify_and_check
from .stream_solver import row_stats

log = logging.getLogger(__name__)

OBJECTIVES = {"svm": "squared hinge, one-vs-rest (LinearSVC)", "softmax": "multinomial log loss (LogisticRegression)"}
DEFAULT_CHUNK_ROWS = 2048
STREAM_OPTIONS = ("chunk_rows", "tol")  # what train_run's stream_options may hold


def predict_rows(model, reader: ChunkReader, rows: np.ndarray, chunk_rows: int):
    """Predicted classes and top decision values of ``rows``, chunk by chunk (in ``rows``' order)."""
    xs = (reader.take(rows[s:s + chunk_rows]) for s in range(0, len(rows), chunk_rows))
    return predict_chunks([model], xs)[0]


def predict_chunks(models: list, xs) -> list:
    """``(predictions, top scores)`` of each model over the normalised chunks ``xs``, in one pass."""
    from .classify._estimators import top_scores

    parts = [([np.array([], dtype=np.int64)], [np.array([])]) for _ in models]
    for X in xs:
        for (preds, scores), m in zip(parts, models):
            p, sc = top_scores(m, X)
            preds.append(p)
            scores.append(sc)
    return [(np.concatenate(p), np.concatenate(sc)) for p, sc in parts]


def _nearest_warm(solved: dict, C: float):
    """The parameters of the solved C nearest to ``C`` on a log scale (None if nothing is solved yet).

    Not the in-memory sweep's ``_Evaluator._nearest``: that one breaks ties towards the larger C (measured
    faster for scikit-learn's lbfgs); with it this solver's digits sweep took 454 instead of 225 iterations
    at C=1000, so the two rules stay apart."""
    if not solved:
        return None
    near = min(solved, key=lambda c: abs(np.log(c) - np.log(C)))
    return solved[near].params()


@dataclass
class StreamedRows:
    """The rows one layer set is trained on, as the solver reads them.

    ``train`` / ``val``: scratch copies (:class:`~cnncodes.stream_read.SpilledRows`) of the training and
    val rows; ``reader`` normalises as fitted on train (the sweep), ``refit_reader`` as fitted on
    train+val (the final model); ``t``: class indices (0..K-1) of every row of the cache.
    """

    reader: ChunkReader
    refit_reader: ChunkReader
    train: SpilledRows
    val: SpilledRows
    t: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.train.dim

    def sweep_chunks(self):
        return self.train.chunks(self.reader.normalise, self.t)

    @functools.cached_property
    def sweep_stats(self):
        """:class:`~cnncodes.stream_solver.RowStats` of the sweep's rows (one pass, once for every classifier)."""
        return row_stats(self.sweep_chunks(), self.n_features, self.n_classes)

    @functools.cached_property
    def refit_stats(self):
        return row_stats(self.refit_chunks(), self.n_features, self.n_classes)

    def val_codes(self):
        return (self.reader.normalise(raw) for _, raw in self.val.blocks())

    def refit_chunks(self):
        a, b = self.train.chunks(self.refit_reader.normalise, self.t), self.val.chunks(self.refit_reader.normalise, self.t)
        return lambda: itertools.chain(a(), b())  # a sum over rows: the order does not matter


def sweep_stream(data: StreamedRows, *, clf: str, grid, early_stop: int, widen: bool, refine, max_iter: int, tol=None):
    """Choose C on the val split with :class:`~cnncodes.search.CSchedule`, each batch of C values solved
    exactly in shared passes (:func:`cnncodes.stream_solver.solve_path`).

    Returns ``(SweepResult, solutions)``: the result as the in-memory sweep shapes it (method
    ``"val"``, predictions as class indices) and every C's :class:`~cnncodes.stream_solver.Solution`.
    """
    from .classify._sweep import _sweep_result
    from .search import CSchedule, _key
    from .stream_solver import solve_path, to_estimator

    val = data.val.rows
    t0 = time.perf_counter()
    g = np.asarray(grid, dtype=float)
    # a batch is one set of passes over the rows: the whole initial grid at once (reading the codes is what
    # a streamed fit pays for; more models cost only their share of the matrix products)
    schedule = CSchedule(tuple(g), early_stop, bool(widen), refine, batch=len(g))
    solved: dict = {}
    points: dict = {}
    while batch := [_key(c) for c in schedule.next_batch()]:
        warm = {c: w for c in batch if (w := _nearest_warm(solved, c)) is not None}
        sols = solve_path(clf, data.sweep_chunks(), n_rows=len(data.train.rows), n_features=data.n_features,
                          n_classes=data.n_classes, Cs=batch, warm=warm, tol=tol, max_iter=max_iter,
                          stats=data.sweep_stats, on_pass=_log_pass)
        ests = [to_estimator(s, clf, np.arange(data.n_classes), max_iter=max_iter, tol=tol) for s in sols]
        for s, (p, _) in zip(sols, predict_chunks(ests, data.val_codes())):
            solved[s.C] = s
            points[s.C] = (np.array([np.mean(p == data.t[val])]), p, s.converged)
            log.info("  C=%g: val %.4f, %d iterations%s", s.C, points[s.C][0][0], s.n_iter,
                     "" if s.converged else f" ({s.message})")
        schedule.record({s.C: points[s.C][0][0] for s in sols})
    return _sweep_result(g, points, schedule, "val", 1, len(val), time.perf_counter() - t0, []), solved


def _log_pass(passes: int, active: int) -> None:
    if passes % 100 == 0:
        log.info("  %d passes over the training rows, %d C value(s) still improving", passes, active)


def refit_stream(data: StreamedRows, *, clf: str, C: float, classes, max_iter: int, tol=None, warm=None):
    """The final model on train+val: a pipeline that predicts from raw codes, and its Solution."""
    from sklearn.pipeline import Pipeline

    from .stream_solver import solve_path, to_estimator

    sol, = solve_path(clf, data.refit_chunks(), n_rows=len(data.train.rows) + len(data.val.rows),
                      n_features=data.n_features, n_classes=data.n_classes, Cs=[C],
                      warm=None if warm is None else {C: warm}, tol=tol, max_iter=max_iter,
                      stats=data.refit_stats, on_pass=_log_pass)
    est = to_estimator(sol, clf, classes, max_iter=max_iter, tol=tol)
    return Pipeline([("norm", data.refit_reader.normaliser), ("clf", est)]), sol


# --------------------------------------------------------------------------- a whole run


def in_memory_bytes(info, sets) -> int:
    """What the in-memory path would hold for its largest layer set: float32 codes, about 3 copies."""
    return max(3 * 4 * info.n_rows * sum(info.layers[k].dim for k in s if k in info.layers) for s in sets)


def available_bytes() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(budget: float | None = None) -> float | None:
    """The memory budget in bytes: ``budget`` if given, else ``CNNCODES_MEMORY_BUDGET`` (bytes, e.g.
    ``8e9``), else the memory available now (None where that is not known)."""
    import os

    if budget is None:
        env = os.environ.get("CNNCODES_MEMORY_BUDGET")
        if not env:
            return available_bytes()
        try:
            budget = float(env)
        except ValueError:
            raise UsageError(f"CNNCODES_MEMORY_BUDGET must be a number of bytes (e.g. 8e9); got {env!r}") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise InvalidParameterError("memory_budget", "train_run", f"must be a number of bytes > 0. Got {budget!r} instead.")
    return float(budget)


def needs_streaming(cache, sets, budget: float | None = None) -> bool:
    """True when the in-memory path would need more than the memory budget (:func:`memory_budget`)."""
    from .store import read_info

    budget = memory_budget(budget)
    need = in_memory_bytes(read_info(cache), sets)
    if budget is not None and need > budget:
        log.warning("The codes need about %.1f GB in memory, more than the budget of %.1f GB: training streamed "
                    "(stream=True) from chunks of the cache", need / 1e9, budget / 1e9)
        return True
    return False


def check_stream_options(options) -> dict:
    """``stream_options`` with their defaults, every key and value checked."""
    from .classify._run import _check_int

    if options is not None and not isinstance(options, Mapping):
        raise InvalidParameterError("stream_options", "train_run", f"must be a mapping such as "
                                    f"{{'chunk_rows': 2048}}. Got {options!r} instead.")
    options = dict(options or {})
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise InvalidParameterError("stream_options", "train_run", f"may hold {', '.join(STREAM_OPTIONS)}; got "
                                    f"{', '.join(map(repr, unknown))}. (The streamed fit is exact: its iterations "
                                    f"are the 'max_iter' parameter, its C search that of the in-memory path.)")
    out = {"chunk_rows": _check_int("chunk_rows", options.get("chunk_rows", DEFAULT_CHUNK_ROWS), 2), "tol": None}
    tol = options.get("tol")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (np.isfinite(tol) and tol > 0):
            raise InvalidParameterError("tol", "train_run", f"must be a float > 0. Got {tol!r} instead.")
        out["tol"] = float(tol)
    return out


def train_run_stream(cache, sets, *, classifiers, norm, grid, seed, val_fraction, test_fraction, out, target,
                     overwrite, marker, plots, early_stop: int = 2, widen: bool = True, refine=None,
                     max_iter: int = 1000, stream_options: Mapping | None = None):
    """:func:`cnncodes.classify.train_run` with every layer set trained from chunks (see the module docstring)."""
    from . import runfolder
    from ._provenance import _jsonable, _now, _versions
    from .classify._metrics import format_summary
    from .classify._plots import _plot_confusions, _plot_curves, _plot_layers
    from .classify._run import METRICS_SCHEMA, RunResult
    from .fileio import atomic_write_text
    from .modelfile import BEST_MODEL, copy_model
    from .store import open_cache
    from .stream_rows import make_compact_split, read_compact_rows

    opts = check_stream_options(stream_options)
    search = {"early_stop": early_stop, "widen": widen, "refine": refine, "max_iter": max_iter}
    marker = dict(marker, settings=dict(marker["settings"], stream=opts))
    t_run = time.perf_counter()
    results, curves, cms = {}, [], []
    with open_cache(cache) as snap, runfolder.staged_run(target, overwrite=overwrite, cache=cache,
                                                          reserve=out is None, marker=marker) as (tmp, target):
        info = snap.info
        missing = [k for s in sets for k in s if k not in info.layers]
        if missing:
            snap.load(missing)  # raises UsageError naming what the cache holds
        # the row table stays compact (no paths or messages as Python strings): see stream_rows
        table = read_compact_rows(snap)
        class_names = info.class_names
        split = make_compact_split(snap, table, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        for w in split.warnings:
            log.warning("Warning: %s", w)
        y = table.labels
        if len(split.val) == 0:  # before any pass over the codes
            raise UsageError("The streamed training (stream=True) chooses C on a val split, and this split has none; "
                             "give the cache a val split or draw one (e.g. val_fraction=0.15)")
        trval = np.sort(np.concatenate([split.train, split.val]))
        rows = {"train": np.sort(split.train), "val": np.sort(split.val), "test": np.sort(split.test), "trval": trval}
        classes = np.unique(y[trval])
        t = np.searchsorted(classes, y)  # class indices of the training rows (test rows may hold other labels)
        for lset in sets:
            name = "+".join(lset)
            verify_and_check(snap, lset, np.sort(np.concatenate([trval, rows["test"]])), opts["chunk_rows"])
            results[name] = {}
            with _streamed_rows(snap, lset, norm, rows, t, len(classes), opts["chunk_rows"], tmp) as data:
                for clf in classifiers:
                    r, sw = _one(data, name, clf, grid, y, rows, classes, opts, search, seed, info, tmp, cache)
                    results[name][clf] = r
                    curves.append((name, clf, sw))
                    cms.append((name, clf, r["test"]))
        best = max(((n, c, r) for n, d in results.items() for c, r in d.items()), key=lambda t: t[2]["val"]["accuracy"])
        copy_model(tmp / best[2]["model"], tmp / BEST_MODEL)
        metrics = {
            "schema": METRICS_SCHEMA, "created": _now(), "versions": _versions(),
            "cache": {"path": str(Path(cache).resolve()), "fingerprint": info.fingerprint, "spec": info.spec,
                      "records": {k: info.layers[k].to_dict() for s in sets for k in s},
                      "manifest_hash": info.manifest_hash, "dataset_root": info.dataset_root,
                      "rows_sha256": info.rows_sha256, "class_names": class_names},
            "split": split.to_dict(),
            "settings": {"norm": norm, "grid": list(grid), "seed": seed, "classifiers": list(classifiers),
                         "layer_sets": ["+".join(s) for s in sets], "stream": True, **opts, **search},
            "results": results,
            "best": {"layers": best[0], "clf": best[1], "val_accuracy": best[2]["val"]["accuracy"],
                     "test_accuracy": best[2]["test"]["accuracy"], "model": best[2]["model"], "file": BEST_MODEL},
            "notes": list(split.notes) + [STREAM_NOTE], "warnings": list(split.warnings),
            "seconds": time.perf_counter() - t_run,
        }
        atomic_write_text(tmp / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
        if plots:
            _plot_confusions(tmp / "confusion_matrix.png", cms)
            _plot_curves(tmp / "c_curve.png", curves)
            if len(sets) > 1:
                _plot_layers(tmp / "layer_comparison.png", results)
    return RunResult(target, metrics, format_summary(metrics))


STREAM_NOTE = ("streamed: LinearSVC's / LogisticRegression's objective minimised exactly by L-BFGS over chunks of "
               "the cache (one pass per step); C chosen on val as in memory, refit on train+val")


@contextlib.contextmanager
def _streamed_rows(snap, lset, norm, rows, t, n_classes, chunk_rows, scratch_dir):
    """The :class:`StreamedRows` of a layer set, its scratch copies deleted on exit."""
    reader = ChunkReader(snap, lset, norm)
    reader.fit(rows["train"], chunk_rows)
    refit_reader = ChunkReader(snap, lset, norm)
    refit_reader.fit(rows["trval"], chunk_rows)
    with SpilledRows(reader, rows["train"], Path(scratch_dir) / ".train-codes.tmp", chunk_rows) as train, \
            SpilledRows(reader, rows["val"], Path(scratch_dir) / ".val-codes.tmp", chunk_rows) as val:
        yield StreamedRows(reader, refit_reader, train, val, t, n_classes)


def _one(data: StreamedRows, name, clf, grid, y, rows, classes, opts, search, seed, info, tmp, cache):
    """Sweep, refit and evaluate one (layer set, classifier); save its model; return its results entry."""
    from .classify._metrics import compute_metrics
    from .modelfile import MODEL_SUFFIX, save_model
    from .stream_rows import write_predictions

    class_names = info.class_names
    lset, norm = data.reader.keys, data.reader.norm
    chunk_rows, tol, max_iter = opts["chunk_rows"], opts["tol"], search["max_iter"]
    val, test, trval = rows["val"], rows["test"], rows["trval"]
    log.info("Streaming %s on %s: exact fits, one pass over %d training rows per iteration", clf, name,
             len(rows["train"]))
    sw, solved = sweep_stream(data, clf=clf, grid=grid, early_stop=search["early_stop"],
                              widen=search["widen"], refine=search["refine"], max_iter=max_iter, tol=tol)
    val_metrics = compute_metrics(y[val], classes[sw.predictions[sw.best_index]], class_names)
    val_metrics["method"] = "val"
    t0 = time.perf_counter()
    pipe, sol = refit_stream(data, clf=clf, C=sw.best_C, classes=classes, max_iter=max_iter, tol=tol,
                             warm=solved[sw.best_C].params())
    fit_s = time.perf_counter() - t0
    if not sol.converged:
        log.warning("%s / %s: %s", name, clf, sol.message)
    pred_all = {s: predict_rows(pipe[-1], data.refit_reader, r, chunk_rows) for s, r in (("train", trval), ("test", test))}
    stem = f"{name}__{clf}"
    rel_model = f"models/{stem}{MODEL_SUFFIX}"
    dim = data.n_features
    save_model(pipe, tmp / rel_model, {
        "classifier": clf, "norm": norm, "C": sw.best_C, "layers": list(lset),
        "records": {k: info.layers[k].to_dict() for k in lset}, "spec": info.spec, "fingerprint": info.fingerprint,
        "cache": str(Path(cache).resolve()), "class_names": list(class_names), "n_features": int(dim),
        "max_iter": max_iter, "converged": sol.converged, "seed": seed, "stream": True,
    })
    is_val = lambda r: np.isin(r, val)  # noqa: E731  (val is sorted, as trval and test)
    write_predictions(tmp / "predictions" / f"{stem}.csv", data.reader.snap, y, class_names, [
        (trval, lambda r: np.where(is_val(r), "val", "train"), *pred_all["train"]),
        (test, lambda r: np.full(len(r), "test"), *pred_all["test"])])
    r = {
        "C": sw.best_C, "c_index": sw.best_index, "c_at_edge": sw.at_edge, "c_curve": sw.curve(),
        "selection": {"method": "val", "n_folds": 0, "notes": sw.notes, "early_stop": search["early_stop"],
                      "stopped_at": sw.stopped_at, "tried": sw.tried, "stop_reason": sw.stop_reason, "stream": True},
        "train": compute_metrics(y[trval], pred_all["train"][0], class_names), "val": val_metrics,
        "test": compute_metrics(y[test], pred_all["test"][0], class_names),
        "converged": sol.converged, "convergence_message": sol.message, "max_iter": max_iter,
        "sweep_seconds": sw.seconds, "fit_seconds": fit_s, "n_features": int(dim), "norm": norm, "model": rel_model,
        "stream": {"chunk_rows": chunk_rows, "objective": OBJECTIVES[clf], "iterations": sol.n_iter,
                   "sweep_iterations": {f"{c:g}": s.n_iter for c, s in sorted(solved.items())}},
    }
    r["train"]["rows"] = "train+val"
    log.info("%s / %s (streamed): C=%g, val %.4f, test %.4f (sweep %.1fs, fit %.1fs, %d iterations)", name, clf,
             sw.best_C, val_metrics["accuracy"], r["test"]["accuracy"], sw.seconds, fit_s, sol.n_iter)
    return r, sw
