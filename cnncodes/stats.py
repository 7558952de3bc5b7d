"""Small statistics for comparing classifiers on one test set: McNemar's test and bootstrap intervals.

No torch, no statsmodels: scipy.stats for the binomial and chi-square tails.

McNemar's test compares two classifiers evaluated on the *same* test rows. Only the discordant
rows matter: ``b`` = rows the first gets right and the second wrong, ``c`` = the reverse. Under the
null hypothesis (equal error rates) each discordant row is a fair coin, so

* ``b + c < EXACT_BELOW`` (25): the exact two-sided binomial test, ``p = min(1, 2 P[Bin(b+c, 1/2) <= min(b, c)])``;
* otherwise the chi-square statistic with continuity correction (Edwards 1948),
  ``(|b - c| - 1)^2 / (b + c)`` on 1 degree of freedom.

The threshold 25 is the usual one (e.g. Dietterich 1998 recommends the corrected chi-square when
``b + c`` is large; mlxtend and many texts switch at 25).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from .errors import UsageError

__all__ = ["EXACT_BELOW", "McNemar", "mcnemar", "bootstrap_accuracy_ci", "pairwise_vs_best", "format_p"]

EXACT_BELOW = 25


@dataclass(frozen=True)
class McNemar:
    """Result of :func:`mcnemar`: discordant counts, statistic (None for the exact test), p-value."""

    b: int  # first right, second wrong
    c: int  # first wrong, second right
    n: int  # rows compared
    method: str  # "exact" or "chi2-cc"
    statistic: float | None
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test of two classifiers' per-row correctness on the same rows.

    Parameters
    ----------
    correct_a, correct_b : bool arrays (n,)
        Whether each classifier got each test row right (same rows, same order).
    """
    from scipy.stats import binom, chi2

    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1:
        raise UsageError(f"McNemar needs two correctness vectors over the same rows; got shapes {a.shape}, {b_.shape}.")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    d = b + c
    if d == 0:
        return McNemar(b, c, len(a), "exact", None, 1.0)
    if d < EXACT_BELOW:
        p = min(1.0, 2.0 * float(binom.cdf(min(b, c), d, 0.5)))
        return McNemar(b, c, len(a), "exact", None, p)
    stat = (abs(b - c) - 1.0) ** 2 / d
    return McNemar(b, c, len(a), "chi2-cc", float(stat), float(chi2.sf(stat, 1)))


def bootstrap_accuracy_ci(correct: np.ndarray, *, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy: test rows resampled with replacement.

    Returns
    -------
    (low, high) : floats in [0, 1]
    """
    x = np.asarray(correct, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise UsageError("The bootstrap needs a non-empty vector of per-row correctness.")
    if not 0 < level < 1:
        raise UsageError(f"The confidence level must be in (0, 1); got {level}.")
    rng = np.random.default_rng(seed)
    # each replicate's count of correct rows: one multinomial draw per replicate over the n rows
    counts = rng.multinomial(x.size, np.full(x.size, 1.0 / x.size), size=n_boot)
    means = counts @ x / x.size
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def pairwise_vs_best(test_correct: Mapping[tuple[str, str], np.ndarray], best: tuple[str, str]) -> list[dict]:
    """McNemar of every result against the best one, all on the same test rows.

    Parameters
    ----------
    test_correct : {(layers, clf): bool array}
        Per-row correctness on the test split, same rows and order for every entry.
    best : (layers, clf)

    Returns
    -------
    list of dict
        ``{"layers", "clf", "vs_layers", "vs_clf", "b", "c", "n", "method", "statistic", "p_value"}``
        where ``b`` counts rows the best gets right and this one wrong.
    """
    ref = test_correct[best]
    out = []
    for (name, clf), corr in test_correct.items():
        if (name, clf) == best:
            continue
        out.append({"layers": name, "clf": clf, "vs_layers": best[0], "vs_clf": best[1],
                    **mcnemar(ref, corr).to_dict()})
    return out


def format_p(p: float | None) -> str:
    """A p-value for a table: 3 significant digits, ``<1e-4`` below that."""
    if p is None:
        return ""
    return "<1e-4" if p < 1e-4 else f"{p:.3g}"
