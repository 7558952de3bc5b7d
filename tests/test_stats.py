"""McNemar's test and bootstrap intervals against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnncodes.errors import UsageError
from cnncodes.stats import bootstrap_accuracy_ci, format_p, mcnemar, pairwise_vs_best


def _vectors(n11, b, c, n00):
    """Correctness vectors with n11 both right, b only the first right, c only the second, n00 neither."""
    a = np.array([1] * n11 + [1] * b + [0] * c + [0] * n00, dtype=bool)
    z = np.array([1] * n11 + [0] * b + [1] * c + [0] * n00, dtype=bool)
    return a, z


def test_mcnemar_chi_square_with_continuity_correction_by_hand():
    # b=30, c=12: (|30-12| - 1)^2 / 42 = 289/42 = 6.880952...; chi2(1) tail = erfc(sqrt(x/2))
    a, z = _vectors(500, 30, 12, 40)
    r = mcnemar(a, z)
    assert (r.b, r.c, r.n, r.method) == (30, 12, 582, "chi2-cc")
    assert r.statistic == pytest.approx(289 / 42)
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(289 / 42 / 2)), rel=1e-12)
    assert r.p_value == pytest.approx(0.008711, abs=2e-6)


def test_mcnemar_exact_binomial_by_hand():
    # b=9, c=2 (11 discordant < 25): p = 2 * sum_{k<=2} C(11,k) / 2^11 = 2 * 67 / 2048
    a, z = _vectors(100, 9, 2, 5)
    r = mcnemar(a, z)
    assert r.method == "exact" and r.statistic is None
    assert r.p_value == pytest.approx(2 * (1 + 11 + 55) / 2048, rel=1e-12)
    # symmetric in the two classifiers; equal discordant counts give p = 1 (capped)
    assert mcnemar(z, a).p_value == pytest.approx(r.p_value)
    assert mcnemar(*_vectors(10, 3, 3, 0)).p_value == 1.0
    assert mcnemar(*_vectors(10, 0, 0, 2)).p_value == 1.0


def test_mcnemar_refuses_different_rows():
    with pytest.raises(UsageError, match="same rows"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_bootstrap_interval_by_hand():
    correct = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    lo, hi = bootstrap_accuracy_ci(correct, n_boot=2000, seed=3)
    # the same replicates drawn by hand: multinomial counts over the rows, mean of the resampled rows
    rng = np.random.default_rng(3)
    counts = rng.multinomial(10, np.full(10, 0.1), size=2000)
    means = (counts * correct).sum(axis=1) / 10
    assert (lo, hi) == (np.quantile(means, 0.025), np.quantile(means, 0.975))
    assert lo < 0.7 < hi
    # a narrower interval for more rows at the same accuracy
    lo2, hi2 = bootstrap_accuracy_ci(np.tile(correct, 50), seed=3)
    assert hi2 - lo2 < (hi - lo) / 3


def test_pairwise_vs_best_and_format():
    a, z = _vectors(100, 9, 2, 5)
    rows = pairwise_vs_best({("pool", "svm"): a, ("block5.linear", "svm"): z, ("pool", "softmax"): a},
                            ("pool", "svm"))
    assert [(r["layers"], r["clf"]) for r in rows] == [("block5.linear", "svm"), ("pool", "softmax")]
    assert rows[0]["b"] == 9 and rows[0]["c"] == 2 and rows[1]["p_value"] == 1.0
    assert format_p(3e-7) == "<1e-4" and format_p(0.06543) == "0.0654" and format_p(None) == ""


def test_train_run_reports_mcnemar_against_the_best(tmp_path):
    """metrics.json["pairwise"] and the summary's "p vs best" column: McNemar of each saved model's test
    predictions against the best model's, recomputed here from the model files by hand."""
    import json

    from scipy.stats import binomtest, chi2

    from cnncodes import classify as C
    from cnncodes.store import load_codes
    from conftest import digits_cache

    cache = digits_cache(tmp_path / "digits.h5")
    res = C.train_run(cache, ["fc6", "fc7"], classifiers=["svm", "softmax"], out=tmp_path / "run", n_jobs=1,
                      plots=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    codes = load_codes(cache, ["fc6", "fc7"])
    sp = C.make_split(codes.labels, codes.splits, codes.status, test_fraction=0.2, val_fraction=0.15, seed=0)
    y = codes.labels[sp.test]

    def correct(layer, clf):
        model, _ = C.load_model(tmp_path / "run" / "models" / f"{layer}__{clf}{C.MODEL_SUFFIX}")
        return model.predict(load_codes(cache, [layer]).X[sp.test]) == y

    best = (m["best"]["layers"], m["best"]["clf"])
    ref = correct(*best)
    pairs = {(p["layers"], p["clf"]): p for p in m["pairwise"]}
    assert len(pairs) == 3 and best not in pairs
    for (layer, clf), p in pairs.items():
        other = correct(layer, clf)
        b, c = int(np.sum(ref & ~other)), int(np.sum(~ref & other))
        assert (p["b"], p["c"], p["n"]) == (b, c, len(y))
        if b + c < 25:
            expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        else:
            expected = chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1)
        assert p["p_value"] == pytest.approx(expected, rel=1e-9)
        line = next(s for s in res.summary.splitlines() if s.startswith(layer) and f" {clf} " in s)
        assert format_p(expected) in line.split()
    assert "p vs best" in res.summary.splitlines()[0]
