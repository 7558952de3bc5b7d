"""Linear classifiers on codes larger than memory (``train_run(stream=True)``, ``train_svm.py --stream``).

Codes are read chunk by chunk through one snapshot of the cache (:func:`cnncodes.store.open_cache`)
and never all at once; each chunk is normalised row by row as the in-memory path does (``l2``,
``sqrt``, ``none``; ``standard`` first learns its mean and variance in a streamed pass). The
classifiers are scikit-learn's ``SGDClassifier`` (averaged SGD, ``partial_fit``): ``hinge`` for
``svm`` (a linear SVM, one-vs-rest as LinearSVC) and ``log_loss`` for ``softmax`` (logistic
regression, but one-vs-rest: SGD has no multinomial loss). C maps to ``alpha = 1 / (C n)``.

Every C of the grid is trained in the same pass over the chunks; each epoch visits the training
chunks in a random order, the rows of each chunk shuffled (:func:`chunk_order`), and scores every
model on the val split; a model stops after ``patience`` epochs without a better val accuracy and
keeps its best epoch. The chosen C is refit on train+val for its best number of epochs. Memory
holds one chunk, the models and O(N) row indices: it does not grow with the codes' size.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline

from .errors import CacheCorruptError, InvalidParameterError, TrainingDataError, UsageError

log = logging.getLogger(__name__)

LOSSES = {"svm": "hinge", "softmax": "log_loss"}
DEFAULT_CHUNK_ROWS = 2048
DEFAULT_EPOCHS = 20
# 5, not 3: val accuracy of averaged SGD still moves a few points between epochs; at 3 the sweep stopped
# on a poor epoch (flowers5 softmax chose C=1e4, -2.7 pp; with 5: C=100, equal to the in-memory fit)
DEFAULT_PATIENCE = 5
_GAP = 64  # rows between two reads of a chunk below which one read spans both


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, looked up on first use, not at import: ``find_library`` runs
    ``ldconfig -p`` in a subprocess, which every importer of this module would pay."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed by the last chunk back to the OS (glibc's ``malloc_trim``).

    A chunk's arrays (a few MB each: the read block, its float32 copy, the normalised rows,
    sklearn's copies) are freed and allocated again for every chunk. glibc serves them from
    the heap once one of that size has been freed (its mmap threshold rises to it), and the
    heap's holes grew the process by ~20 MB over a run of 100,000 rows (1024-D) more than over
    10,000; trimming once a chunk keeps the peak at what one chunk needs. A no-op elsewhere.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def chunk_order(n: int, chunk_rows: int, seed: int, epoch: int, block_rows: int | None = None) -> list[np.ndarray]:
    """Positions (into a sorted row list of length ``n``) fed in one epoch, chunk by chunk.

    Rows are sorted by path, hence by class, so consecutive rows would make one-class chunks.
    The list is cut into blocks of ``block_rows`` consecutive rows (default ``chunk_rows // 128``, 16
    rows: a block is one contiguous read; with 128-row blocks a 2,048-row chunk held only 16 runs of
    one class each, and val accuracy jumped 3-5 pp between epochs on Fashion-MNIST), the blocks are
    put in a random order, cut into chunks of ``chunk_rows``, and the rows of each chunk are shuffled. Everything comes from
    ``np.random.default_rng([seed, epoch])``: first the block permutation, then one row
    permutation per chunk in the order fed.
    """
    block_rows = max(1, chunk_rows // 128) if block_rows is None else block_rows
    rng = np.random.default_rng([seed, epoch])
    starts = np.arange(0, n, block_rows)
    pos = np.concatenate([np.arange(s, min(n, s + block_rows)) for s in starts[rng.permutation(len(starts))]]
                         or [np.array([], dtype=np.int64)])
    out = []
    for s in range(0, n, chunk_rows):
        part = pos[s:s + chunk_rows]
        out.append(part[rng.permutation(len(part))])
    return out


class ChunkReader:
    """Normalised float32 rows of a layer set, read through one cache snapshot."""

    def __init__(self, snap, keys, norm: str):
        from .classify._estimators import make_normaliser

        self.snap, self.keys, self.norm = snap, list(keys), norm
        self.normaliser = make_normaliser(norm)
        self.fitted = norm != "standard"  # the others are row-wise: nothing to learn

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order) as float32, read in one contiguous block per layer."""
        release_freed_memory()  # the previous chunk's arrays (see there)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        # one read per run of nearby rows (a chunk's blocks lie far apart in the file)
        cuts = np.flatnonzero(np.diff(srt) > _GAP) + 1
        segs = np.split(srt, cuts)
        parts = [np.concatenate([self.snap.read_block(k, int(g[0]), int(g[-1]) + 1)[g - g[0]] for g in segs])
                 for k in self.keys]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        out = np.empty(block.shape, dtype=np.float32)
        out[order] = block
        return out

    def fit(self, rows: np.ndarray, chunk_rows: int) -> None:
        """Learn ``standard``'s mean and variance over ``rows`` in a streamed pass."""
        if not self.fitted:
            for s in range(0, len(rows), chunk_rows):
                self.normaliser.partial_fit(self.raw(rows[s:s + chunk_rows]))
            self.fitted = True

    def take(self, rows: np.ndarray) -> np.ndarray:
        X = self.raw(rows)
        return self.normaliser.transform(X) if self.norm != "none" else X


def verify_and_check(snap, keys, used: np.ndarray, chunk_rows: int) -> None:
    """One sequential pass: each layer's sha256 (as :func:`load_codes` checks it) and finite codes on ``used``."""
    from .splits import check_codes

    n = snap.info.n_rows
    for k in keys:
        h = hashlib.sha256()
        for s in range(0, n, chunk_rows):
            release_freed_memory()
            block = snap.read_block(k, s, min(n, s + chunk_rows))
            h.update(np.ascontiguousarray(block).tobytes())
            sel = used[(used >= s) & (used < s + len(block))]
            if len(sel):
                check_codes(block.astype(np.float32), sel - s, what=f"layer {k}")
        if h.hexdigest() != snap.layer_sha256(k):
            raise CacheCorruptError(f"The codes of layer {k!r} in {snap.path} changed after they were written "
                                    f"(sha256 mismatch). Do not use them; delete the file and extract again.")


def make_sgd(clf: str, C: float, n: int, seed: int) -> SGDClassifier:
    if clf not in LOSSES:
        raise UsageError(f"The classifier must be one of {', '.join(LOSSES)}. Got {clf!r} instead.")
    return SGDClassifier(loss=LOSSES[clf], alpha=1.0 / (C * n), average=True, random_state=seed, tol=None)


def _partial_fit(model, X, y, classes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.partial_fit(X, y, classes=classes)


def predict_rows(model, reader: ChunkReader, rows: np.ndarray, chunk_rows: int):
    """Predicted classes and top decision values of ``rows``, chunk by chunk (in ``rows``' order)."""
    from .classify._estimators import top_scores

    preds, scores = [], []
    for s in range(0, len(rows), chunk_rows):
        p, sc = top_scores(model, reader.take(rows[s:s + chunk_rows]))
        preds.append(p)
        scores.append(sc)
    if not preds:
        return np.array([], dtype=np.int64), np.array([])
    return np.concatenate(preds), np.concatenate(scores)


@dataclass
class StreamSweep:
    """What :func:`sweep_stream` found, shaped like :class:`cnncodes.classify.SweepResult` for the run folder."""

    grid: np.ndarray
    scores: np.ndarray
    best_epochs: list[int]
    models: list  # each C's model at its best epoch
    epochs_run: list[int]
    seconds: float
    method: str = "val"
    n_folds: int = 0
    notes: list = field(default_factory=list)
    stopped_at: int | None = None

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.scores))  # the first (smallest C) of equals

    @property
    def best_C(self) -> float:
        return float(self.grid[self.best_index])

    @property
    def at_edge(self) -> bool:
        return self.best_index in (0, len(self.grid) - 1)

    @property
    def scores_std(self) -> np.ndarray:
        return np.zeros_like(self.scores)

    def curve(self) -> list[dict]:
        return [{"C": float(c), "score": float(s), "best_epoch": e, "epochs_run": r}
                for c, s, e, r in zip(self.grid, self.scores, self.best_epochs, self.epochs_run)]


def fit_epochs(reader: ChunkReader, y: np.ndarray, rows: np.ndarray, models: list, classes, *, epochs: int,
               chunk_rows: int, seed: int, on_epoch=None) -> None:
    """``partial_fit`` every model of ``models`` on the chunks of ``rows`` for ``epochs`` epochs.

    ``on_epoch(epoch)`` after each epoch may return the indices of models to stop (or True: all).
    """
    active = set(range(len(models)))
    for epoch in range(epochs):
        for pos in chunk_order(len(rows), chunk_rows, seed, epoch):
            r = rows[pos]
            X, yy = reader.take(r), y[r]
            for i in active:
                _partial_fit(models[i], X, yy, classes)
        if on_epoch is not None:
            stop = on_epoch(epoch)
            active -= set(range(len(models))) if stop is True else set(stop or ())
        if not active:
            return


def sweep_stream(reader: ChunkReader, y: np.ndarray, train: np.ndarray, val: np.ndarray, *, clf: str, grid,
                 classes, seed: int, chunk_rows: int, epochs: int, patience: int) -> StreamSweep:
    """Train one SGD model per C in one streamed pass per epoch; keep each at its best val epoch."""
    if len(val) == 0:
        raise TrainingDataError("The streamed training (stream=True) chooses C on a val split, and this split has "
                                "none; give the cache a val split or draw one (e.g. val_fraction=0.15)")
    t0 = time.perf_counter()
    grid = np.asarray(grid, dtype=float)
    models = [make_sgd(clf, C, len(train), seed) for C in grid]
    best = [(-1.0, 0, None)] * len(grid)
    ran = [0] * len(grid)
    stopped: set[int] = set()

    def on_epoch(epoch: int):
        for i, m in enumerate(models):
            if i in stopped:
                continue
            ran[i] = epoch + 1
            pred, _ = predict_rows(m, reader, val, chunk_rows)
            acc = float(np.mean(pred == y[val]))
            if acc > best[i][0]:
                best[i] = (acc, epoch + 1, copy.deepcopy(m))
            elif epoch + 1 - best[i][1] >= patience:
                stopped.add(i)
        return stopped

    fit_epochs(reader, y, train, models, classes, epochs=epochs, chunk_rows=chunk_rows, seed=seed,
               on_epoch=on_epoch)
    return StreamSweep(grid, np.array([b[0] for b in best]), [b[1] for b in best], [b[2] for b in best], ran,
                       time.perf_counter() - t0)


def refit_stream(reader: ChunkReader, y: np.ndarray, rows: np.ndarray, *, clf: str, C: float, epochs: int, classes,
                 seed: int, chunk_rows: int) -> Pipeline:
    """The final model on ``rows`` (train+val) for ``epochs`` epochs, as a pipeline that predicts from raw codes."""
    model = make_sgd(clf, C, len(rows), seed)
    fit_epochs(reader, y, rows, [model], classes, epochs=epochs, chunk_rows=chunk_rows, seed=seed)
    return Pipeline([("norm", reader.normaliser), ("clf", model)])


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


def train_run_stream(cache, sets, *, classifiers, norm, grid, seed, val_fraction, test_fraction, out, target,
                     overwrite, marker, plots, chunk_rows: int = DEFAULT_CHUNK_ROWS, epochs: int = DEFAULT_EPOCHS,
                     patience: int = DEFAULT_PATIENCE):
    """:func:`cnncodes.classify.train_run` with every layer set trained by :func:`sweep_stream`."""
    from . import runfolder
    from ._provenance import _jsonable, _now, _versions
    from .classify._metrics import format_summary
    from .classify._plots import _plot_confusions, _plot_curves, _plot_layers
    from .classify._run import METRICS_SCHEMA, RunResult, _check_int
    from .fileio import atomic_write_text
    from .modelfile import BEST_MODEL, copy_model
    from .store import open_cache
    from .stream_rows import make_compact_split, read_compact_rows

    for name, v, low in (("chunk_rows", chunk_rows, 2), ("epochs", epochs, 1), ("patience", patience, 1)):
        _check_int(name, v, low)
    marker = dict(marker, settings=dict(marker["settings"], stream={"chunk_rows": chunk_rows, "epochs": epochs,
                                                                     "patience": patience}))
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
        trval = np.sort(np.concatenate([split.train, split.val]))
        train, val, test = np.sort(split.train), np.sort(split.val), np.sort(split.test)
        classes = np.unique(y[trval])
        for lset in sets:
            name = "+".join(lset)
            verify_and_check(snap, lset, np.sort(np.concatenate([trval, test])), chunk_rows)
            results[name] = {}
            for clf in classifiers:
                r, sw = _one(snap, lset, name, clf, norm, grid, y, train, val, test, trval, classes, seed, chunk_rows,
                             epochs, patience, info, class_names, tmp, cache)
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
                         "layer_sets": ["+".join(s) for s in sets], "stream": True, "chunk_rows": chunk_rows,
                         "epochs": epochs, "patience": patience},
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


STREAM_NOTE = ("streamed: averaged SGD (partial_fit) over chunks of the cache; svm = hinge loss, softmax = "
               "one-vs-rest logistic loss; C chosen on val with early stopping, refit on train+val")


def _one(snap, lset, name, clf, norm, grid, y, train, val, test, trval, classes, seed, chunk_rows, epochs, patience,
         info, class_names, tmp, cache):
    """Sweep, refit and evaluate one (layer set, classifier); save its model; return its results entry."""
    from .classify._metrics import compute_metrics
    from .modelfile import MODEL_SUFFIX, save_model
    from .stream_rows import write_predictions

    reader = ChunkReader(snap, lset, norm)
    reader.fit(train, chunk_rows)
    log.info("Streaming %s on %s: %d C values, up to %d epochs over chunks of %d rows", clf, name, len(grid),
             epochs, chunk_rows)
    sw = sweep_stream(reader, y, train, val, clf=clf, grid=grid, classes=classes, seed=seed, chunk_rows=chunk_rows,
                      epochs=epochs, patience=patience)
    val_pred, _ = predict_rows(sw.models[sw.best_index], reader, val, chunk_rows)
    val_metrics = compute_metrics(y[val], val_pred, class_names)
    val_metrics["method"] = "val"
    n_ep = sw.best_epochs[sw.best_index]
    t0 = time.perf_counter()
    refit_reader = ChunkReader(snap, lset, norm)
    refit_reader.fit(trval, chunk_rows)
    pipe = refit_stream(refit_reader, y, trval, clf=clf, C=sw.best_C, epochs=n_ep, classes=classes, seed=seed,
                        chunk_rows=chunk_rows)
    fit_s = time.perf_counter() - t0
    pred_all = {s: predict_rows(pipe[-1], refit_reader, r, chunk_rows) for s, r in (("train", trval), ("test", test))}
    stem = f"{name}__{clf}"
    rel_model = f"models/{stem}{MODEL_SUFFIX}"
    dim = sum(info.layers[k].dim for k in lset)
    save_model(pipe, tmp / rel_model, {
        "classifier": clf, "norm": norm, "C": sw.best_C, "layers": list(lset),
        "records": {k: info.layers[k].to_dict() for k in lset}, "spec": info.spec, "fingerprint": info.fingerprint,
        "cache": str(Path(cache).resolve()), "class_names": list(class_names), "n_features": int(dim),
        "max_iter": n_ep, "converged": True, "seed": seed, "stream": True,
    })
    is_val = lambda r: np.isin(r, val)  # noqa: E731  (val is sorted, as trval and test)
    write_predictions(tmp / "predictions" / f"{stem}.csv", snap, y, class_names, [
        (trval, lambda r: np.where(is_val(r), "val", "train"), *pred_all["train"]),
        (test, lambda r: np.full(len(r), "test"), *pred_all["test"])])
    r = {
        "C": sw.best_C, "c_index": sw.best_index, "c_at_edge": sw.at_edge, "c_curve": sw.curve(),
        "selection": {"method": "val", "n_folds": 0, "notes": [], "stream": True, "epochs": n_ep},
        "train": compute_metrics(y[trval], pred_all["train"][0], class_names), "val": val_metrics,
        "test": compute_metrics(y[test], pred_all["test"][0], class_names),
        "converged": True, "convergence_message": "", "max_iter": n_ep,
        "sweep_seconds": sw.seconds, "fit_seconds": fit_s, "n_features": int(dim), "norm": norm, "model": rel_model,
        "stream": {"epochs": n_ep, "chunk_rows": chunk_rows, "loss": LOSSES[clf]},
    }
    r["train"]["rows"] = "train+val"
    log.info("%s / %s (streamed): C=%g, %d epochs, val %.4f, test %.4f (sweep %.1fs, fit %.1fs)", name, clf,
             sw.best_C, n_ep, val_metrics["accuracy"], r["test"]["accuracy"], sw.seconds, fit_s)
    return r, sw
