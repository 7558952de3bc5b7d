"""The exact streamed solver (:mod:`cnncodes.stream_solver`) against scikit-learn's own fits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from cnncodes.stream_solver import array_chunks, solve_path, to_estimator


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return normalize(X), y


def _reference(clf, C, X, y):
    """scikit-learn's fit of the same objective, solved far tighter than its defaults."""
    if clf == "svm":
        return LinearSVC(C=C, dual=False, tol=1e-10, max_iter=100_000).fit(X, y)
    return LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(X, y)


@pytest.mark.parametrize("n_classes", [10, 3, 2])
@pytest.mark.parametrize("clf", ["svm", "softmax"])
def test_solutions_equal_scikit_learns_fits(digits, clf, n_classes):
    X, y = digits
    keep = y < n_classes
    X, y = X[keep], y[keep]
    Cs = [0.01, 1.0, 30.0]
    # chunks of 97 rows: the gradient summed over uneven chunks is the full gradient
    sols = solve_path(clf, array_chunks(X, y, 97), n_rows=len(y), n_features=X.shape[1], n_classes=n_classes,
                      Cs=Cs, tol=1e-9, max_iter=5000)
    for sol in sols:
        ref = _reference(clf, sol.C, X, y)
        est = to_estimator(sol, clf, np.arange(n_classes))
        assert sol.converged, sol.message
        assert est.coef_.shape == ref.coef_.shape and est.intercept_.shape == ref.intercept_.shape
        scale = np.abs(ref.coef_).max()
        assert np.abs(est.coef_ - ref.coef_).max() <= 1e-4 * scale, (sol.C, np.abs(est.coef_ - ref.coef_).max())
        assert np.abs(est.intercept_ - ref.intercept_).max() <= 1e-4 * scale
        assert np.array_equal(est.predict(X), ref.predict(X))
        assert np.allclose(est.decision_function(X), ref.decision_function(X), atol=1e-4 * scale)
        if clf == "softmax":
            assert np.allclose(est.predict_proba(X), ref.predict_proba(X), atol=1e-5)


def test_models_solved_together_equal_each_solved_alone(digits):
    X, y = digits
    chunks = array_chunks(X, y, 500)
    kw = dict(n_rows=len(y), n_features=X.shape[1], n_classes=10, max_iter=500)
    together = solve_path("softmax", chunks, Cs=[0.1, 10.0], **kw)
    alone = [solve_path("softmax", chunks, Cs=[c], **kw)[0] for c in (0.1, 10.0)]
    for a, b in zip(together, alone):  # the same minimum (the paths differ by BLAS rounding, amplified by L-BFGS)
        assert a.converged and b.converged and a.objective == pytest.approx(b.objective, rel=1e-7)
        assert np.abs(a.coef - b.coef).max() <= 1e-3 * np.abs(b.coef).max()


def test_a_warm_start_reaches_the_same_minimum_in_fewer_iterations(digits):
    X, y = digits
    kw = dict(n_rows=len(y), n_features=X.shape[1], n_classes=10, max_iter=2000, tol=1e-8)
    cold, near = solve_path("svm", array_chunks(X, y, 400), Cs=[3.0, 1.0], **kw)
    warm, = solve_path("svm", array_chunks(X, y, 400), Cs=[3.0], warm={3.0: near.params()}, **kw)
    assert warm.n_iter < cold.n_iter
    assert np.abs(warm.coef - cold.coef).max() <= 1e-4 * np.abs(cold.coef).max()


def test_an_iteration_limit_is_reported_not_hidden(digits):
    X, y = digits
    sol, = solve_path("svm", array_chunks(X, y, 400), n_rows=len(y), n_features=X.shape[1], n_classes=10,
                      Cs=[100.0], max_iter=3)
    assert not sol.converged and sol.n_iter == 3 and "max_iter=3" in sol.message
