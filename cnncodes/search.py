"""The C search: a schedule that widens and refines itself, and a scikit-learn search object on it.

:class:`CSchedule` decides which C values to evaluate next from the scores so far; it knows
nothing about fitting. Two searches run it:

* :func:`cnncodes.classify.sweep_C` (what ``train_svm.py`` uses): its own evaluator on codes
  normalised once, keeping every prediction and warm-starting softmax along the way;
* :class:`CodesSearchCV`, a :class:`~sklearn.model_selection._search.BaseSearchCV` whose
  ``_run_search`` feeds the schedule to sklearn's ``evaluate_candidates`` (so ``cv_results_``,
  ``best_estimator_``, ``refit``, any ``cv`` splitter, e.g. ``PredefinedSplit`` for a val split).

The schedule (C values on a log scale, ``step`` = the initial grid's spacing). The default
initial grid is coarse, ``1e-4, 1e-2, 1, 1e2, 1e4`` (two decades apart over the span of the old
decade sweep, so it sees every edge that sweep saw: a narrower grid such as 1e-2..1e2 sat on a
flat or noisy stretch of badly scaled codes and never widened), and the resolution comes from
refining around the best only: 6-8 fits when the optimum is inside the grid (the old 9-point decade
sweep with its early stop: 5-9; the new search fits no more than it where the optimum lies at
C = 1..1000, one more at C = 0.1-0.3), with half-decade instead of decade resolution near the optimum:

1. **grid**: the initial grid in ascending order, ``batch`` values at a time, until the score
   has fallen strictly below its best over ``patience`` decades of larger C values
   (``patience`` consecutive values of a decade grid, ``ceil(patience / 2)`` of the default
   2-decade grid: two decades past the peak either way; the largest
   C values are the slowest fits), once it has risen above its value at the first C (a best at
   the first C is no peak: the curve is flat or falling there, or noise near chance);
2. **widen**: while the best C is strictly better than every other and lies at the upper
   (lower) end of what was tried, try ``batch`` more values one ``widen step`` further up
   (down), within ``[c_min, c_max]``: the sweep extends past an edge until the score stops
   rising. The widen step is a decade (or the grid's step if finer): the first refinement round
   of a 2-decade grid would try the decade beyond the edge anyway, so a decade costs no extra
   fit there and never jumps two decades past the optimum (large-C fits are the slow ones);
3. **refine**: ``refine`` rounds, each halving the log step around the current best
   (``best * step**(±1/2**r)``). Rounds whose step is a decade or more try both sides of the best
   (two decades either side, a real val curve is too lopsided to tell where its peak lies: a
   narrow peak between two grid values sits on either side); finer rounds try the side of the
   better tried neighbour only (both sides on a tie): a bracketing search, one fit per round on a
   single-peaked curve. Default (None): as many rounds as bring the step to half a decade or finer
   (2 for the default grid: a decade on both sides, then half a decade on one; 1 for a decade
   grid). C values already tried are not fitted again.

Ties go to the smaller C (the stronger regularisation). ``log`` records every C tried with its
phase, and ``stop_reason`` why the search ended.

``_run_search`` and ``_select_best_index`` are underscore API of scikit-learn (1.9 added the
``callback_ctx`` keyword to ``_run_search``, and dispatches on the signature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection._search import BaseSearchCV

from .errors import UsageError

__all__ = ["CSchedule", "CodesSearchCV", "DEFAULT_START"]

DEFAULT_START = (1e-4, 1e-2, 1.0, 1e2, 1e4)  # two decades apart; refined to half decades around the best
HALF_DECADE = math.sqrt(10.0)  # the resolution the default refinement reaches
C_MIN, C_MAX = 1e-8, 1e8


def _key(c: float) -> float:
    return float(f"{float(c):.12g}")  # half decades etc. computed two ways must meet


@dataclass
class CSchedule:
    """Which C values to evaluate next (see the module docstring).

    Use: ``while batch := s.next_batch(): s.record({c: score for c in batch})``.
    """

    start: tuple = DEFAULT_START
    patience: int = 2
    widen: bool = True
    refine: int | None = None
    batch: int = 1
    c_min: float = C_MIN
    c_max: float = C_MAX
    scores: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    stop_reason: str = ""

    def __post_init__(self):
        g = np.unique(np.asarray(self.start, dtype=np.float64).ravel())
        if g.size < 2 or not np.all(np.isfinite(g)) or np.any(g <= 0):
            raise UsageError(f"The C grid must hold at least two finite values > 0. Got {list(g)} instead.")
        for name in ("patience", "refine", "batch"):
            v = getattr(self, name)
            if name == "refine" and v is None:
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (1 if name == "batch" else 0):
                raise UsageError(f"The '{name}' parameter of CSchedule must be an int >= "
                                 f"{1 if name == 'batch' else 0}. Got {v!r} instead.")
        self.grid = [_key(c) for c in g]
        self.step = float(np.exp(np.median(np.diff(np.log(g)))))  # two decades for the default grid
        self.widen_step = min(self.step, 10.0)
        # patience is in decades: the same stopping distance past the peak whatever the grid's step
        decades = max(1.0, math.log10(self.step))
        self.patience_values = max(1, math.ceil(self.patience / decades - 1e-9)) if self.patience else 0
        if self.refine is None:  # halve the log step until it is at most half a decade
            self.refine = max(0, math.ceil(math.log2(math.log(self.step) / math.log(HALF_DECADE)) - 1e-9))
        self._phases = self._plan()
        self._pending: list[float] = []

    # ------------------------------------------------------------------ state

    def record(self, scores: dict) -> None:
        """Scores (higher is better) of the C values of the last batch."""
        for c, s in scores.items():
            self.scores[_key(c)] = float(s)

    @property
    def best_C(self) -> float:
        """The C of the highest score; the smallest C among ties."""
        cs = sorted(self.scores)
        return max(cs, key=lambda c: (self.scores[c], -c))

    def _strict_edge(self, upper: bool) -> bool:
        """The best C is the largest (smallest) tried and strictly better than every other."""
        cs = sorted(self.scores)
        edge = cs[-1] if upper else cs[0]
        others = [self.scores[c] for c in cs if c != edge]
        return bool(others) and self.scores[edge] > max(others)

    def next_batch(self) -> list[float]:
        """The next C values to evaluate (in ascending order within a phase); [] when done."""
        try:
            return next(self._phases)
        except StopIteration:
            return []

    def _emit(self, cs, phase: str):
        cs = [c for c in dict.fromkeys(_key(c) for c in cs) if c not in self.scores]
        self.log.extend({"C": c, "phase": phase} for c in cs)
        return cs

    # ------------------------------------------------------------------ the phases

    def _bracket(self, step: float) -> list[float]:
        """``best / step`` and/or ``best * step``.

        Both sides while ``step`` is a decade or more: across two decades either side of the best
        (the default grid's spacing) the val curves are not symmetric enough to say on which side
        the peak lies (flowers5 Lite0 ``block4.linear``, softmax: 1 and 1e4 below 100, the better
        neighbour 1e4 said "up", the peak was at 10, a decade down; one-sided, the search chose 316
        and lost 0.99 pp of test accuracy). Trying both costs one fit, but leaves the best bracketed
        a decade away on both sides, so the next round (half decades) is one-sided again.

        Below a decade: the side of the best whose nearest tried neighbour scores higher, when both
        neighbours lie at the same distance (on a curve single-peaked and locally symmetric, the peak
        lies between the best and its better neighbour: one fit per round); both sides on a tie
        (between the neighbours, or of a neighbour with the best: a flat top), when a side has no
        neighbour or when they lie at different distances (after widening by a decade).
        """
        best = self.best_C
        below = [c for c in self.scores if c < best]
        above = [c for c in self.scores if c > best]
        both = [best / step, best * step]
        one_sided = step < 10.0 * (1 - 1e-9)
        if one_sided and below and above and math.isclose(best / max(below), min(above) / best, rel_tol=1e-6):
            lo, hi, top = self.scores[max(below)], self.scores[min(above)], self.scores[best]
            if max(lo, hi) < top:  # a neighbour as good as the best: a flat top, no side is favoured
                both = both[:1] if lo > hi else both[1:] if hi > lo else both
        return [c for c in both if self.c_min <= c <= self.c_max]

    def _plan(self):
        stopped, p = None, self.patience_values
        for i in range(0, len(self.grid), self.batch):
            yield self._emit(self.grid[i:i + self.batch], "grid")
            tried = [self.scores[c] for c in sorted(self.scores)]
            # a drop counts only once the curve has risen above its first value: near chance, at the
            # smallest C values, the score wobbles (signs block4, softmax: 0.187 at C=1e-4, less at 1e-3,
            # 0.92 at C=316), and stopping there chose a chance-level C
            risen = int(np.argmax(tried)) > 0
            if p and risen and len(tried) > p and max(tried[-p:]) < max(tried):
                stopped = sorted(self.scores)[-1]
                break
        reason = (f"grid: the score fell below its best for {p} consecutive larger C values "
                  f"(stopped after C={stopped:g})" if stopped is not None else "grid: all values tried")
        if self.widen:
            for upper in (True, False):
                moved = False
                while self._strict_edge(upper):
                    edge = max(self.scores) if upper else min(self.scores)
                    nxt = [edge * self.widen_step ** (k if upper else -k) for k in range(1, self.batch + 1)]
                    nxt = [c for c in nxt if self.c_min * (1 - 1e-9) <= c <= self.c_max * (1 + 1e-9)]
                    if not nxt:
                        reason += f"; widening stopped at the limit C={edge:g}"
                        break
                    moved = True
                    yield self._emit(nxt, "widen")
                if moved:
                    reason += f"; widened {'up' if upper else 'down'} until the score stopped rising"
        step = self.step
        for r in range(self.refine):
            step = math.sqrt(step)
            cs = self._emit(self._bracket(step), f"refine{r + 1}")
            if cs:
                yield cs
        if self.refine:
            reason += f"; refined around the best to a step of {step:.3g}x"
        self.stop_reason = reason


class CodesSearchCV(BaseSearchCV):
    """Search one positive parameter (C) with :class:`CSchedule`: early stop, widening, refinement.

    Like :class:`~sklearn.model_selection.GridSearchCV` over ``{param: grid}``, but only the C
    values the schedule asks for are fitted. A val split is ``cv=PredefinedSplit(test_fold)``.

    Parameters
    ----------
    estimator : estimator
    param : str
        The parameter searched, e.g. ``"clf__C"`` for a pipeline step named ``clf``.
    start : sequence of float
        The initial grid (default 1e-4 ... 1e4, two decades apart, refined to half decades).
    patience, widen, refine, c_min, c_max
        See :class:`CSchedule`.
    batch : int or None
        C values evaluated at once (each over every fold, in parallel); default: enough to
        keep ``n_jobs`` workers busy.
    scoring, n_jobs, refit, cv, verbose, pre_dispatch, error_score, return_train_score
        As in :class:`~sklearn.model_selection.GridSearchCV`.

    Attributes
    ----------
    cv_results_, best_params_, best_score_, best_estimator_, best_index_ ...
        As in GridSearchCV; rows in the order the C values were tried.
    search_log_ : list of dict
        ``{"C", "phase", "score"}`` of every C tried, in order.
    stop_reason_ : str
    """

    _parameter_constraints: dict = {**BaseSearchCV._parameter_constraints}

    def __init__(self, estimator, *, param="clf__C", start=DEFAULT_START, patience=2, widen=True, refine=None,
                 c_min=C_MIN, c_max=C_MAX, batch=None, scoring=None, n_jobs=None, refit=True, cv=None, verbose=0,
                 pre_dispatch="2*n_jobs", error_score=np.nan, return_train_score=False):
        super().__init__(estimator=estimator, scoring=scoring, n_jobs=n_jobs, refit=refit, cv=cv, verbose=verbose,
                         pre_dispatch=pre_dispatch, error_score=error_score, return_train_score=return_train_score)
        self.param = param
        self.start = start
        self.patience = patience
        self.widen = widen
        self.refine = refine
        self.c_min = c_min
        self.c_max = c_max
        self.batch = batch

    def _schedule(self) -> CSchedule:
        from joblib import effective_n_jobs

        batch = self.batch or max(1, effective_n_jobs(self.n_jobs) // max(1, self.n_splits_))
        return CSchedule(tuple(self.start), self.patience, self.widen, self.refine, batch, self.c_min, self.c_max)

    def _run_search(self, evaluate_candidates, *, callback_ctx=None):
        schedule = self._schedule()
        ctx = None
        if callback_ctx is not None:
            ctx = callback_ctx.subcontext(task_name="search", max_subtasks=None).call_on_fit_task_begin(estimator=self)
        metric = self.refit if isinstance(self.refit, str) else "score"
        while batch := schedule.next_batch():
            sub = None
            if ctx is not None:
                sub = ctx.subcontext(task_name="c-batch", max_subtasks=len(batch) * self.n_splits_,
                                     sequential_subtasks=False).call_on_fit_task_begin(estimator=self)
            results = evaluate_candidates([{self.param: c} for c in batch], callback_ctx=sub)
            tried = np.asarray(results[f"param_{self.param}"], dtype=float)
            means = np.asarray(results[f"mean_test_{metric}"], dtype=float)
            schedule.record({c: means[np.flatnonzero(np.isclose(tried, c, rtol=1e-12))[-1]] for c in batch})
            if sub is not None:
                sub.call_on_fit_task_end(estimator=self)
        if ctx is not None:
            ctx.call_on_fit_task_end(estimator=self)
        self.search_log_ = [dict(e, score=schedule.scores[e["C"]]) for e in schedule.log]
        self.stop_reason_ = schedule.stop_reason

    def _select_best_index(self, refit, refit_metric, results):
        """The best mean score; among ties the smallest C (sklearn takes the first one tried)."""
        if callable(refit):
            return BaseSearchCV._select_best_index(refit, refit_metric, results)
        means = np.asarray(results[f"mean_test_{refit_metric}"], dtype=float)
        cs = np.asarray(results[f"param_{self.param}"], dtype=float)
        best = np.flatnonzero(means == np.nanmax(means))
        return int(best[np.argmin(cs[best])])
