"""The C search: the schedule widens past an edge and refines; CodesSearchCV and sweep_C equal brute-force fits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_classification
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from cnncodes import classify as C
from cnncodes.errors import UsageError
from cnncodes.search import CodesSearchCV, CSchedule


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


def _direct(X, y, tr, va, Cs):
    """Val accuracy of a plain LinearSVC per C (the solver the library picks: both solve the same problem; the
    sweep retries a fit that did not converge once with 4x max_iter, which is a fit with max_iter=4000)."""
    return np.array([accuracy_score(y[va], LinearSVC(C=c, dual=bool(c <= 1), random_state=0, max_iter=4000)
                                    .fit(X[tr], y[tr]).predict(X[va])) for c in Cs])


@pytest.mark.parametrize("scale, side", [(10 ** -4.5, "up"), (10 ** 1.5, "down")])
def test_widening_reaches_an_optimum_far_outside_the_initial_grid(scale, side):
    """Codes scaled by s move the best C by about 1/s^2: here to ~1e6 (s=10^-4.5) or ~1e-6 (s=10^1.5)."""
    X, y = make_classification(n_samples=600, n_features=40, n_informative=8, flip_y=0.15, class_sep=0.8,
                               random_state=0)
    X = (X * scale).astype(np.float32)
    tr, va = np.arange(300), np.arange(300, 600)
    res = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="none", n_jobs=1)
    assert (res.best_C > 1e4) if side == "up" else (res.best_C < 1e-4)
    assert f"widened {side}" in res.stop_reason and any(t["phase"] == "widen" for t in res.tried)
    tried = np.array([t["C"] for t in res.tried])
    np.testing.assert_allclose([t["score"] for t in res.tried], _direct(X, y, tr, va, tried))  # values
    wide = np.logspace(-9, 9, 37)  # brute force over 18 decades, half a decade apart
    assert res.scores[res.best_index] == _direct(X, y, tr, va, wide).max()
    assert not res.at_edge
    # without widening the best stays inside the initial grid and is flagged at its edge
    narrow = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="none", n_jobs=1, widen=False, refine=0)
    assert narrow.best_C == (1e4 if side == "up" else 1e-4) and narrow.at_edge
    assert narrow.scores[narrow.best_index] < res.scores[res.best_index]


def test_refinement_tries_half_decades_around_the_best(digits_split=None):
    X, y = load_digits(return_X_y=True)
    X = Normalizer().fit_transform(X).astype(np.float32)
    tr, va = np.arange(0, 1200), np.arange(1200, len(y))
    res = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="none", n_jobs=1, refine=2)
    coarse = [t for t in res.tried if t["phase"] in ("grid", "widen")]
    best_coarse = max(coarse, key=lambda t: (t["score"], -t["C"]))["C"]
    r1 = sorted(t["C"] for t in res.tried if t["phase"] == "refine1")
    np.testing.assert_allclose(r1, [best_coarse / 10 ** 0.5, best_coarse * 10 ** 0.5])
    r2 = [t["C"] for t in res.tried if t["phase"] == "refine2"]
    assert len(r2) == 2 and np.allclose(np.log10(r2[1] / r2[0]), 0.5)  # quarter decades either side
    tried = np.array([t["C"] for t in res.tried])
    direct = _direct(X, y, tr, va, tried)
    np.testing.assert_allclose([t["score"] for t in res.tried], direct)
    assert res.scores[res.best_index] == direct.max()
    assert res.best_C == tried[direct == direct.max()].min()  # ties: the smallest C
    # the curve holds every C tried plus the untried initial grid values, ascending
    assert np.all(np.diff(res.grid) > 0) and set(np.round(np.log10(tried), 9)) <= set(np.round(np.log10(res.grid), 9))


def _digits_val():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    rng = np.random.default_rng(0)
    test_fold = np.where(rng.random(len(y)) < 0.25, 0, -1)  # one val split: 25 % of the rows
    return X, y, test_fold


def test_codes_search_cv_equals_grid_search_and_sweep_on_the_same_split():
    X, y, test_fold = _digits_val()
    pipe = Pipeline([("norm", Normalizer()), ("clf", C.CodesLinearSVC(random_state=0))])
    cv = PredefinedSplit(test_fold)
    search = CodesSearchCV(pipe, cv=cv, batch=1).fit(X, y)
    tried = [e["C"] for e in search.search_log_]
    assert list(search.cv_results_["param_clf__C"]) == tried and len(tried) >= 7
    # GridSearchCV at equal protocol (the same split, the same C values): the same scores, the same best
    grid = GridSearchCV(pipe, {"clf__C": tried}, cv=cv).fit(X, y)
    np.testing.assert_array_equal(search.cv_results_["mean_test_score"], grid.cv_results_["mean_test_score"])
    best = max(range(len(tried)), key=lambda i: (grid.cv_results_["mean_test_score"][i], -tried[i]))
    assert search.best_params_ == {"clf__C": tried[best]}
    # refit: the pipeline at the best C on every row (train + val)
    ref = Pipeline([("norm", Normalizer()), ("clf", C.CodesLinearSVC(C=tried[best], random_state=0))]).fit(X, y)
    np.testing.assert_array_equal(search.best_estimator_[-1].coef_, ref[-1].coef_)
    # sweep_C on the same train/val rows runs the same schedule: the same C values, scores and choice
    tr, va = test_fold == -1, test_fold == 0
    sw = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="l2", n_jobs=1)
    assert [t["C"] for t in sw.tried] == tried and sw.best_C == tried[best]
    np.testing.assert_allclose([t["score"] for t in sw.tried], search.cv_results_["mean_test_score"])
    assert search.stop_reason_ == sw.stop_reason


def test_schedule_early_stop_and_bad_arguments():
    s = CSchedule(patience=2, widen=False, refine=0)
    curve = {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7, 1e-1: 0.65, 1.0: 0.66, 10.0: 0.9}  # 10 is never reached
    seen = []
    while batch := s.next_batch():
        seen += batch
        s.record({c: curve[c] for c in batch})
    assert seen == [1e-4, 1e-3, 1e-2, 1e-1, 1.0] and s.best_C == 1e-2 and "2 consecutive" in s.stop_reason
    # drops before the curve has risen above its first value (noise near chance) do not stop it
    s = CSchedule(patience=1, widen=False, refine=0)
    curve = {1e-4: 0.19, 1e-3: 0.18, 1e-2: 0.17, 1e-1: 0.5, 1.0: 0.9, 10.0: 0.8, 100.0: 0.95}
    seen = []
    while batch := s.next_batch():
        seen += batch
        s.record({c: curve[c] for c in batch})
    assert seen == [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0] and s.best_C == 1.0
    with pytest.raises(UsageError, match="C grid"):
        CSchedule(start=(1.0,))
    with pytest.raises(UsageError, match="'refine' parameter"):
        CSchedule(refine=-1)


def test_plots_draw_the_values_and_leave_no_pyplot_figure(monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    X, y, test_fold = _digits_val()
    tr, va = test_fold == -1, test_fold == 0
    sw = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", n_jobs=1)
    names = [f"d{k}" for k in range(10)]
    m = C.compute_metrics(y[va], sw.predictions[sw.best_index], names)
    figs = []
    monkeypatch.setattr(C, "_save", lambda fig, path: figs.append(fig))
    n_before = len(plt.get_fignums())
    C._plot_curves(tmp_path / "c.png", [("fc6", "svm", sw)])
    C._plot_confusions(tmp_path / "cm.png", [("fc6", "svm", m)])
    assert len(plt.get_fignums()) == n_before  # drawn on our own Agg figures only
    line = figs[0].axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), sw.grid[sw.evaluated])
    np.testing.assert_allclose(line.get_ydata(), sw.scores[sw.evaluated])
    assert line.get_label() == "fc6 / svm"
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    img = figs[1].axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(img, cm / cm.sum(axis=1, keepdims=True))
    assert figs[1].axes[0].texts[0].get_text() == f"{cm[0, 0] / cm[0].sum():.2f}"


def test_parallel_sweep_on_memory_mapped_codes_equals_the_serial_one():
    """Codes above 1 MB go to the workers as one memory map: the same scores as fitting in-process."""
    X, y = make_classification(n_samples=1500, n_features=300, n_informative=20, n_classes=3, random_state=1)
    X = X.astype(np.float32)  # 1.8 MB
    tr, va = np.arange(1000), np.arange(1000, 1500)
    kw = dict(clf="svm", grid=[1e-2, 1e-1, 1.0], widen=False, refine=0, early_stop=0)
    par = C.sweep_C(X[tr], y[tr], X[va], y[va], n_jobs=2, **kw)
    ser = C.sweep_C(X[tr], y[tr], X[va], y[va], n_jobs=1, **kw)
    np.testing.assert_array_equal(par.scores, ser.scores)
    np.testing.assert_array_equal(par.predictions, ser.predictions)
