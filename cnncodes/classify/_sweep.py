"""The C sweep: folds (a val split or CV), the evaluators of C values, the schedule's result; the refit."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from sklearn.pipeline import Pipeline

from ..errors import TrainingDataError, UsageError
from ..splits import _name
from ._estimators import _threads_for, fit_with_retries, make_classifier, make_normaliser, make_pipeline

log = logging.getLogger("cnncodes.classify")


DEFAULT_GRID = np.logspace(-4, 4, 9)


MIN_GRID_DECADES = 8.0
# every C value is a fit (and a refit candidate): a grid of 10**8 values sweeps for days
MAX_GRID_SIZE = 1000


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

    SVM fits run in parallel over (C, fold); softmax fits one C at a time per fold (in parallel over
    CV folds, in this process for a val split), each warm-started from the nearest C already fitted on
    that fold.
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
            fits = {}
            # one C at a time, each warm-started from the nearest C fitted so far on its fold: a batch of
            # refinement values either side of the best (e.g. 316 and 3162 around 1000) would otherwise
            # start 3162 from 316, a decade away, instead of from 1000 (large-C fits are the slow ones)
            for i, c in enumerate(Cs):
                warm = [self._nearest(j, c) for j in range(len(self.folds))]
                if len(self.folds) == 1:  # a val split: nothing to run in parallel, no round trip to a worker
                    (tr, te), = self.folds
                    out = [_softmax_path(self.norm, [c], self.Z, self.y, tr, te, warm=warm[0], **self.kw)]
                else:
                    out = self.parallel(delayed(_softmax_path)(self.norm, [c], self.Z, self.y, tr, te, warm=w,
                                                               **self.kw) for (tr, te), w in zip(self.folds, warm))
                for j, (preds, conv, coefs) in enumerate(out):
                    self.coefs[j][c] = coefs[0]
                    fits[i, j] = (preds[0], conv[0])
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
        """The (coef, intercept) of the C fitted on fold ``j`` nearest to ``c`` on a log scale; between two
        as near, the larger: lbfgs reaches a C from the weaker-regularised side in fewer iterations
        (flowers5 Lite0 block4.linear, C=1000: 255 from 1e4, 367 from 100)."""
        done = self.coefs[j]
        if not done:
            return None
        return done[min(done, key=lambda d: (round(abs(np.log(d / c)), 9), -d))]


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
    refine: int | None = None,
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
    refine : int or None
        Rounds of refinement around the best, each halving the log step (default None: down to
        half decades, i.e. 2 rounds for the default 2-decade grid, 1 for a decade grid).

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

    from ..search import DEFAULT_START, CSchedule

    g = _check_grid(DEFAULT_START if grid is None else grid)
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
    from ..search import _key

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
        notes.append(f"sweep stopped early: the score fell below its best for {schedule.patience_values} consecutive larger "
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
