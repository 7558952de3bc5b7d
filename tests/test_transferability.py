"""Transferability scores against direct, unvectorised computations of their published formulas."""

from __future__ import annotations

import numpy as np
import pytest

from cnncodes import transferability as tr
from cnncodes.errors import TrainingDataError


def _blobs(n, D, K, seed, scale=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    centres = rng.normal(size=(K, D))
    F = np.maximum(centres[y] + rng.normal(scale=scale, size=(n, D)), 0)  # post-ReLU-like codes
    return F, y


def logme_direct(F, y, max_iter=100, tol=1e-6):
    """LogME as written in You et al. 2021, one class at a time, with A, its inverse and log|A|
    computed explicitly (no eigendecomposition): gamma = D - alpha tr(A^-1)."""
    F = F.astype(np.float64)
    n, D = F.shape
    evidences = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            A = alpha * np.eye(D) + beta * F.T @ F
            A_inv = np.linalg.inv(A)
            m = beta * A_inv @ F.T @ t
            gamma = D - alpha * np.trace(A_inv)
            new_alpha = gamma / (m @ m + 1e-5)
            new_beta = (n - gamma) / (np.sum((F @ m - t) ** 2) + 1e-5)
            old_ratio = alpha / beta
            alpha, beta = new_alpha, new_beta
            if abs(alpha / beta - old_ratio) / old_ratio <= tol:
                break
        A = alpha * np.eye(D) + beta * F.T @ F
        m = beta * np.linalg.solve(A, F.T @ t)
        _, logdet = np.linalg.slogdet(A)
        ev = (n / 2 * np.log(beta) + D / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
              - beta / 2 * np.sum((F @ m - t) ** 2) - alpha / 2 * m @ m - logdet / 2)
        evidences.append(ev / n)
    return float(np.mean(evidences)), np.array(evidences)


@pytest.mark.parametrize("n,D,K,seed", [(200, 12, 3, 0), (150, 40, 5, 1), (30, 60, 4, 2)])
def test_logme_equals_direct_formula(n, D, K, seed):
    # the last case has n < D: the log-determinant must count the zero eigenvalues of F'F
    F, y = _blobs(n, D, K, seed)
    res = tr.logme(F, y)
    score, per_class = logme_direct(F, y)
    np.testing.assert_allclose(res.evidence, per_class, rtol=1e-7, atol=1e-9)
    assert res.score == pytest.approx(score, rel=1e-7)


def test_logme_equals_authors_code_values():
    # thuml/LogME LogME._fit_fixed_point (commit 3a08950), run once on exactly these data; its loop stops at
    # a relative change of 1e-3 or after 11 iterations, so the same settings are passed here
    rng = np.random.default_rng(20210701)
    n, D, K = 300, 20, 4
    y = rng.integers(0, K, n)
    centres = rng.normal(size=(K, D))
    F = np.maximum(centres[y] + rng.normal(scale=1.5, size=(n, D)), 0)
    res = tr.logme(F, y, max_iter=11, tol=1e-3)
    authors_per_class = [-0.28524591749706674, -0.3182550992705566, -0.29380557156475845, -0.1537980285213312]
    np.testing.assert_allclose(res.evidence, authors_per_class, rtol=1e-8)
    assert res.score == pytest.approx(-0.26277615421342826, rel=1e-8)


def test_logme_ranks_informative_features_higher_and_ignores_row_order():
    F_good, y = _blobs(400, 16, 4, 3, scale=0.5)
    rng = np.random.default_rng(9)
    F_noise = np.abs(rng.normal(size=F_good.shape))
    F_mid = np.maximum(F_good + rng.normal(scale=2.0, size=F_good.shape), 0)
    scores = [tr.logme(F, y).score for F in (F_good, F_mid, F_noise)]
    assert scores[0] > scores[1] > scores[2]
    perm = rng.permutation(len(y))
    permuted = [tr.logme(F[perm], y[perm]).score for F in (F_good, F_mid, F_noise)]
    np.testing.assert_allclose(permuted, scores, rtol=1e-9)
    # labels are names, not numbers: relabelling the classes changes nothing
    assert tr.logme(F_good, np.array(["abcd"[v] for v in y])).score == pytest.approx(scores[0], rel=1e-12)


def test_logme_is_invariant_to_feature_scale():
    # the evidence maximised over alpha absorbs a global scale of F (alpha scales by 1/c^2), as long as the
    # authors' 1e-5 guard in alpha = gamma / (m'm + 1e-5) stays small next to m'm
    F, y = _blobs(200, 10, 3, 4)
    base = tr.logme(F, y).score
    for c in (0.01, 10.0):
        assert tr.logme(F * c, y).score == pytest.approx(base, rel=1e-4)


def test_hscore_equals_direct_loop():
    F, y = _blobs(300, 8, 3, 5)
    g = np.zeros_like(F)
    for k in np.unique(y):
        g[y == k] = F[y == k].mean(axis=0)
    direct = np.trace(np.linalg.pinv(np.cov(F, rowvar=False), rcond=1e-15) @ np.cov(g, rowvar=False))
    assert tr.hscore(F, y) == pytest.approx(direct, rel=1e-9)


def test_leep_and_nce_equal_direct_loops():
    rng = np.random.default_rng(6)
    n, Z, K = 500, 7, 3
    y = rng.integers(0, K, n)
    logits = rng.normal(size=(n, Z)) + 2.0 * np.eye(Z)[y * 2]  # source classes 0, 2, 4 line up with the labels
    P = tr.softmax(logits)
    joint = np.zeros((K, Z))
    for i in range(n):
        joint[y[i]] += P[i] / n
    p_y_z = joint / joint.sum(axis=0)
    direct_leep = np.mean([np.log(sum(p_y_z[y[i], z] * P[i, z] for z in range(Z))) for i in range(n)])
    assert tr.leep(P, y) == pytest.approx(direct_leep, rel=1e-10)
    z = P.argmax(axis=1)
    cond = 0.0
    for zz in np.unique(z):
        pz = np.mean(z == zz)
        for k in range(K):
            pyz = np.mean((z == zz) & (y == k))
            if pyz > 0:
                cond -= pyz * np.log(pyz / pz)
    assert tr.nce(z, y) == pytest.approx(-cond, rel=1e-10)
    h = -sum(np.mean(y == k) * np.log(np.mean(y == k)) for k in range(K))
    assert tr.nce_normalised(z, y) == pytest.approx((h - cond) / h, rel=1e-10)
    # a source class that determines the label explains all of its entropy; an unrelated one none of it
    assert tr.nce_normalised(y * 3, y) == pytest.approx(1.0)
    assert tr.nce_normalised(np.zeros(n, int), y) == pytest.approx(0.0, abs=1e-12)


def test_head_confidence_extremes():
    sure = np.full((4, 1000), -50.0)
    sure[np.arange(4), [1, 2, 3, 3]] = 50.0
    c = tr.head_confidence(sure)
    assert c["mean_top1_prob"] == pytest.approx(1.0) and c["mean_entropy_norm"] < 1e-6 and c["distinct_top1"] == 3
    flat = tr.head_confidence(np.zeros((3, 1000)))
    assert flat["mean_top1_prob"] == pytest.approx(1e-3) and flat["mean_entropy_norm"] == pytest.approx(1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(TrainingDataError, match="two classes"):
        tr.logme(np.ones((5, 3)), np.zeros(5))
    with pytest.raises(TrainingDataError, match="NaN"):
        tr.logme(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
