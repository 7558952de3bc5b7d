"""The advisor's layer pick: LogME shortlists, one cheap held-out fit per shortlisted layer decides.

LogME alone ranks layers well overall (Kendall tau 0.6-0.8 on this project's sets) but its first place is
not always the best layer: on flowers5 it put ``pool`` far ahead of ``block6.linear`` where the trained
classifiers measured the reverse. A held-out fit sees what LogME's Bayesian linear model misses (e.g. a
linear classifier's margin), but fitting every layer with a C sweep *is* the full sweep. So:

1. **Shortlist**: the ``k`` best layers by LogME (``SHORTLIST``); the rest are not fitted.
2. **Decide**: for each, a ridge classifier (one-hot targets, intercept) on the L2-normalised codes of the
   train+val rows, scored by its exact leave-one-out accuracy (the test rows are never read). One
   eigendecomposition of the centred D x D Gram matrix (n x n when n < D) gives the left-out predictions of
   every row at every ridge strength of ``RIDGE_GRID`` for the price of a few matrix products; a layer's score
   is its best leave-one-out accuracy over that grid (as the sweep chooses C on held-out rows).
   A first version scored a train-rows fit on the 15 % val rows only; on sign_language_digits (310 val rows)
   3 rows of difference made it leave LogME's right pick: leave-one-out scores on all train+val rows.
3. **Ties** go to the better LogME, so a shortlist whose fits agree returns LogME's pick.

Cost per shortlisted layer: one Gram matrix and eigendecomposition, like LogME's own; with k = 3 of 7 layers it
adds at most about the LogME time again (README, Advice, has the measured share of the full sweep).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .errors import UsageError

__all__ = ["SHORTLIST", "RIDGE_GRID", "ridge_loo_accuracy", "validated_pick"]

#: Layers (best LogME first) that get a held-out fit. 3 of the 7 default layers: on every set measured so far
#: the best layer was among LogME's first three; more would cost a fit each for candidates LogME rates low.
SHORTLIST = 3
#: Ridge strengths as multiples of the mean eigenvalue of the centred Gram matrix (trace / D), so the grid
#: means the same on any n and D: 1e-4 (almost least squares) to 1 (strong shrinkage).
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _l2(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _ridge_basis(Xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis ``B`` (n x r) of the span of centred codes ``Xc`` and the Gram eigenvalues ``s`` (r), so
    that ridge's hat matrix at strength lam is ``B diag(s / (s + lam)) B'``: from the D x D Gram when n >= D,
    else from the n x n one."""
    n, D = Xc.shape
    if n >= D:
        s, V = np.linalg.eigh(Xc.T @ Xc)
        keep = s > s.max() * 1e-12
        return (Xc @ V[:, keep]) / np.sqrt(s[keep]), s[keep]
    s, U = np.linalg.eigh(Xc @ Xc.T)
    keep = s > s.max() * 1e-12
    return U[:, keep], s[keep]


def ridge_loo_accuracy(X: np.ndarray, y: np.ndarray, grid: Sequence[float] = RIDGE_GRID) -> dict:
    """Leave-one-out accuracy of a ridge classifier on L2-normalised codes at each strength of ``grid``.

    The model: one-hot labels regressed on the codes with an unpenalised intercept,
    ``lam = g * trace(Xc' Xc) / D`` (``Xc`` the centred codes); a row is predicted as the class of its largest
    score. Leaving row i out needs no refit: with the hat matrix ``H = 11'/n + B diag(s/(s+lam)) B'`` the
    left-out prediction is ``Y_i - e_i / (1 - H_ii)`` (``e`` the in-sample residuals), exact for ridge. So every
    row is a held-out row, at the price of one eigendecomposition: ~6x the rows of a 15 % val split.

    Returns ``{"accuracy": best, "strength": g of the best (the smallest on ties), "accuracies": [...]}``.
    """
    classes, yi = np.unique(y, return_inverse=True)
    F = _l2(np.asarray(X, np.float64))
    Xc = F - F.mean(axis=0)
    Y = np.eye(classes.size)[yi]
    Yc = Y - Y.mean(axis=0)
    n, D = Xc.shape
    B, s = _ridge_basis(Xc)
    BtY, B2 = B.T @ Yc, B ** 2
    scale = s.sum() / D
    accs = []
    for g in grid:
        f = s / (s + g * scale)
        resid = Yc - B @ (f[:, None] * BtY)  # Y - fitted (the intercept fits the mean)
        h = 1.0 / n + B2 @ f
        loo = Y - resid / (1.0 - h)[:, None]
        accs.append(float(np.mean(loo.argmax(axis=1) == yi)))
    best = int(np.argmax(accs))  # first maximum: the smallest strength on ties
    return {"accuracy": accs[best], "strength": float(grid[best]), "accuracies": accs}


def validated_pick(codes: dict, y: np.ndarray, ranking: Sequence, rows: np.ndarray, *, k: int = SHORTLIST,
                   grid: Sequence[float] = RIDGE_GRID) -> dict:
    """The layer with the best leave-one-out ridge accuracy on ``rows`` among the ``k`` best by LogME.

    ``ranking``: objects with ``.layer`` and ``.logme``, best LogME first (as :func:`cnncodes.advise.rank_layers`
    returns); ``rows``: the train+val rows (no test row is read). Ties go to the earlier (better-LogME) layer.
    Returns ``{"layer", "logme_layer", "k", "candidates": [{"layer", "logme", "loo_accuracy", "strength",
    "seconds"}], "seconds", ...}``.
    """
    from threadpoolctl import threadpool_limits

    if k < 1:
        raise UsageError(f"The shortlist needs at least one layer (got {k}).")
    if np.unique(y[rows]).size < 2:
        raise UsageError("The layer check needs rows of at least two classes.")
    t_all = time.perf_counter()
    cands = []
    for sc in list(ranking)[:k]:
        t0 = time.perf_counter()
        with threadpool_limits(1):  # as LogME: one BLAS thread is faster on the shared 2-core machines
            r = ridge_loo_accuracy(codes[sc.layer][rows], y[rows], grid)
        cands.append({"layer": sc.layer, "logme": float(sc.logme), "loo_accuracy": r["accuracy"],
                      "strength": r["strength"], "accuracies": r["accuracies"],
                      "seconds": time.perf_counter() - t0})
    best = max(range(len(cands)), key=lambda i: (cands[i]["loo_accuracy"], -i))  # ties: better LogME
    return {"layer": cands[best]["layer"], "logme_layer": cands[0]["layer"], "method": "ridge-loo", "k": k,
            "grid": list(grid), "rows": int(len(rows)), "candidates": cands, "seconds": time.perf_counter() - t_all}
