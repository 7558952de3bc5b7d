"""The advisor's layer pick: LogME shortlists, one cheap held-out fit per shortlisted layer decides.

LogME alone ranks layers well overall (Kendall tau 0.6-0.8 on this project's sets) but its first place is
not always the best layer: on flowers5 it put ``pool`` far ahead of ``block6.linear`` where the trained
classifiers measured the reverse. A held-out fit sees what LogME's Bayesian linear model misses (e.g. a
linear classifier's margin), but fitting every layer with a C sweep *is* the full sweep. So:

1. **Shortlist**: the ``k`` best layers by LogME (``SHORTLIST``); the rest are not fitted.
2. **Decide**: for each, a closed-form ridge classifier (one-hot targets, intercept) on the L2-normalised
   codes, fitted on the *train* rows and scored on the *val* rows (the rows on which ``train_svm.py``
   chooses C; the test rows are never read). One eigendecomposition of the centred D x D Gram matrix (n x n
   when n < D) gives the fit at every ridge strength of ``RIDGE_GRID`` for the price of a few matrix
   products; a layer's score is its best val accuracy over that grid (as the sweep's C choice on val).
3. **Ties** go to the better LogME, so a shortlist whose fits agree returns LogME's pick.

Cost per shortlisted layer: one Gram matrix and eigendecomposition, like LogME's own; with k = 3 of 7 layers it
adds at most about the LogME time again (README, Advice, has the measured share of the full sweep).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .errors import UsageError

__all__ = ["SHORTLIST", "RIDGE_GRID", "ridge_val_accuracy", "holdout_rows", "validated_pick"]

#: Layers (best LogME first) that get a held-out fit. 3 of the 7 default layers: on every set measured so far
#: the best layer was among LogME's first three; more would cost a fit each for candidates LogME rates low.
SHORTLIST = 3
#: Ridge strengths as multiples of the mean eigenvalue of the centred Gram matrix (trace / D), so the grid
#: means the same on any n and D: 1e-4 (almost least squares) to 1 (strong shrinkage).
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _l2(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def ridge_val_accuracy(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                       grid: Sequence[float] = RIDGE_GRID) -> dict:
    """Val accuracy of a ridge classifier on L2-normalised codes at each strength of ``grid``.

    The model: ``W = argmin ||Xc W - Yc||^2 + lam ||W||^2`` with ``Xc``, ``Yc`` the train codes and one-hot
    labels centred on their train means (an unpenalised intercept), ``lam = g * trace(Xc' Xc) / D``; a val
    row is predicted as the class of its largest score ``(x - mean) W + mean(Y)``.

    Returns ``{"accuracy": best, "strength": g of the best (the smallest on ties), "accuracies": [...]}``.
    """
    classes, yi = np.unique(y_train, return_inverse=True)
    Xt, Xv = _l2(np.asarray(X_train, np.float64)), _l2(np.asarray(X_val, np.float64))
    mu = Xt.mean(axis=0)
    Xc, Xv = Xt - mu, Xv - mu
    Y = np.eye(classes.size)[yi]
    ym = Y.mean(axis=0)
    Yc = Y - ym
    n, D = Xc.shape
    if n < D:  # dual: W = Xc' (Xc Xc' + lam I)^-1 Yc, so val scores = (Xv Xc') U diag(1/(s+lam)) U' Yc
        s, U = np.linalg.eigh(Xc @ Xc.T)
        left, right = (Xv @ Xc.T) @ U, U.T @ Yc
    else:  # primal: W = V diag(1/(s+lam)) V' Xc' Yc
        s, U = np.linalg.eigh(Xc.T @ Xc)
        left, right = Xv @ U, U.T @ (Xc.T @ Yc)
    s = np.clip(s, 0.0, None)
    scale = s.sum() / D
    accs = []
    for g in grid:
        scores = (left / (s + g * scale)) @ right + ym
        accs.append(float(np.mean(classes[scores.argmax(axis=1)] == y_val)))
    best = int(np.argmax(accs))  # first maximum: the smallest strength on ties
    return {"accuracy": accs[best], "strength": float(grid[best]), "accuracies": accs}


def holdout_rows(y: np.ndarray, rows: np.ndarray, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (fit, held-out) split of ``rows`` for when the split has no val rows."""
    from sklearn.model_selection import train_test_split

    fit, held = train_test_split(rows, test_size=fraction, stratify=y[rows], random_state=seed)
    return np.sort(fit), np.sort(held)


def validated_pick(codes: dict, y: np.ndarray, ranking: Sequence, fit_rows: np.ndarray, val_rows: np.ndarray, *,
                   k: int = SHORTLIST, grid: Sequence[float] = RIDGE_GRID) -> dict:
    """The layer with the best held-out ridge accuracy among the ``k`` best by LogME.

    ``ranking``: objects with ``.layer`` and ``.logme``, best LogME first (as :func:`cnncodes.advise.rank_layers`
    returns). Ties on val accuracy go to the earlier (better-LogME) layer. Returns ``{"layer", "logme_layer",
    "k", "candidates": [{"layer", "logme", "val_accuracy", "strength", "seconds"}], "seconds", ...}``.
    """
    from threadpoolctl import threadpool_limits

    if k < 1:
        raise UsageError(f"The shortlist needs at least one layer (got {k}).")
    if len(val_rows) == 0 or len(fit_rows) == 0:
        raise UsageError("The layer check needs both fit rows and held-out rows; draw a split with val rows.")
    t_all = time.perf_counter()
    cands = []
    for s in list(ranking)[:k]:
        t0 = time.perf_counter()
        X = codes[s.layer]
        with threadpool_limits(1):  # as LogME: one BLAS thread is faster on the shared 2-core machines
            r = ridge_val_accuracy(X[fit_rows], y[fit_rows], X[val_rows], y[val_rows], grid)
        cands.append({"layer": s.layer, "logme": float(s.logme), "val_accuracy": r["accuracy"],
                      "strength": r["strength"], "accuracies": r["accuracies"],
                      "seconds": time.perf_counter() - t0})
    best = max(range(len(cands)), key=lambda i: (cands[i]["val_accuracy"], -i))  # ties: better LogME
    return {"layer": cands[best]["layer"], "logme_layer": cands[0]["layer"], "method": "ridge-val", "k": k,
            "grid": list(grid), "fit_rows": int(len(fit_rows)), "val_rows": int(len(val_rows)),
            "candidates": cands, "seconds": time.perf_counter() - t_all}
