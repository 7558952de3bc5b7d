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

from cnncodes import classify as C
from cnncodes.errors import UsageError
from cnncodes.search import CodesSearchCV, CSchedule


pytestmark = pytest.mark.usefixtures("one_blas_thread")


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
    # a decade grid, 2 rounds: half decades, then quarter decades
    res = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="none", n_jobs=1, grid=np.logspace(-4, 4, 9),
                    refine=2)
    coarse = [t for t in res.tried if t["phase"] in ("grid", "widen")]
    best_coarse = max(coarse, key=lambda t: (t["score"], -t["C"]))["C"]
    r1 = [t for t in res.tried if t["phase"] == "refine1"]
    assert 1 <= len(r1) <= 2  # the side of the better neighbour, both on a tie
    np.testing.assert_allclose(np.abs(np.log10([t["C"] / best_coarse for t in r1])), 0.5)
    best_r1 = max(coarse + r1, key=lambda t: (t["score"], -t["C"]))["C"]
    r2 = [t["C"] for t in res.tried if t["phase"] == "refine2"]
    assert 1 <= len(r2) <= 2  # quarter decades beside the best so far
    np.testing.assert_allclose(np.abs(np.log10(np.array(r2) / best_r1)), 0.25)
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
    assert list(search.cv_results_["param_clf__C"]) == tried and len(tried) >= 5
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


def test_default_search_lands_on_half_decades_with_at_most_the_old_sweeps_fits():
    """Default schedule (1e-4..1e4 two decades apart, refined twice) on real codes: every C tried is on the
    half-decade lattice, the refinement brackets the best at half a decade, at most 9 fits."""
    X, y = load_digits(return_X_y=True)
    X = Normalizer().fit_transform(X).astype(np.float32)
    tr, va = np.arange(0, 1200), np.arange(1200, len(y))
    res = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="svm", norm="none", n_jobs=1)
    tried = np.array([t["C"] for t in res.tried])
    assert len(tried) <= 9 and {t["phase"] for t in res.tried} >= {"grid", "refine1", "refine2"}
    np.testing.assert_allclose(2 * np.log10(tried), np.round(2 * np.log10(tried)), atol=1e-9)
    lo, hi = tried[tried < res.best_C].max(), tried[tried > res.best_C].min()  # bracketed on both sides
    assert np.isclose(min(np.log10(res.best_C / lo), np.log10(hi / res.best_C)), 0.5)  # half a decade on one
    direct = _direct(X, y, tr, va, tried)
    np.testing.assert_allclose([t["score"] for t in res.tried], direct)
    assert res.best_C == tried[direct == direct.max()].min()


def _run_on(schedule, curve):
    while batch := schedule.next_batch():
        schedule.record({c: curve(c) for c in batch})
    return [e["C"] for e in schedule.log]


@pytest.mark.parametrize("tilt", [0.0, 0.01, -0.01])
@pytest.mark.parametrize("peak", np.arange(-3.5, 3.51, 0.25))
def test_default_schedule_finds_a_peak_anywhere_to_half_a_decade_in_at_most_9_fits(peak, tilt):
    """A single-peaked curve in log C (tilted: no exact ties), peak anywhere in 10^-3.5..10^3.5."""
    s = CSchedule()
    tried = _run_on(s, lambda c: -abs(np.log10(c) - peak) + tilt * np.log10(c))
    assert len(tried) <= 9
    assert abs(np.log10(s.best_C) - peak) <= 0.25 + 1e-9


@pytest.mark.parametrize("tilt", [0.01, -0.01])
@pytest.mark.parametrize("peak", np.arange(-1.0, 3.01, 0.25))
def test_default_schedule_fits_no_more_and_no_larger_C_than_the_old_sweep(peak, tilt):
    """Where L2-normalised codes' optimum lies (C = 1..1000 in every benchmark row), the default search fits no
    more C values than the old decade sweep 1e-4..1e4 with its early stop; at C = 0.1..0.3 one more (the first
    refinement tries both sides of the best; none of those fits above C=100, they are the fast ones). No C more than a decade larger than the
    old sweep's largest (large C: slow fits; the 2-decade grid's next value can lie a decade past its stop)."""
    def curve(c):
        return -abs(np.log10(c) - peak) + tilt * np.log10(c)

    new = _run_on(CSchedule(), curve)
    old = _run_on(CSchedule(start=tuple(np.logspace(-4, 4, 9)), widen=False, refine=0), curve)
    assert len(new) <= (len(old) if peak >= 0 else len(old) + 1) <= 9
    assert max(new) <= 10 * max(old) * (1 + 1e-9)


@pytest.mark.parametrize("tilt", [0.002, -0.002])
@pytest.mark.parametrize("bump, top", [(0.75, 2.0), (1.0, 2.0), (1.0, 0.0), (1.25, 0.0)])
def test_a_narrow_peak_between_two_grid_values_on_the_side_of_the_worse_neighbour_is_found(bump, top, tilt):
    """A broad curve with its top at C=100 (or 1) and, a decade or so away, a narrower, higher peak that no
    value of the 2-decade grid sees; the grid's neighbours of the best point the other way (the curve is
    lopsided). The first refinement tries both sides of the best, so it lands on the narrow peak's slope; the
    one-sided bracketing of the better neighbour refined away from it (flowers5 Lite0 block4.linear, softmax:
    the grid's best 100, its better neighbour 1e4, the val optimum at 10: C=316 chosen, -0.99 pp test)."""
    side = 1.0 if bump > top else -1.0

    def curve(c):
        x = np.log10(c)
        broad = -0.01 * (x - top) ** 2 + 0.004 * side * -(x - top) + tilt * x  # lopsided: falls slower away from the bump
        narrow = 0.03 * max(0.0, 1 - abs(x - bump) / 0.75)  # zero at the grid values around it
        return 0.85 + broad + narrow

    s = CSchedule()
    tried = _run_on(s, curve)
    assert len(tried) <= 9
    lattice = np.arange(-4, 6.01, 0.5)
    assert abs(np.log10(s.best_C) - bump) <= 0.25 + 1e-9
    assert curve(s.best_C) >= max(curve(10 ** x) for x in lattice) - 1e-12  # the half-decade lattice's best
    coarse = [c for c in tried[:5] if c in (1e-4, 1e-2, 1.0, 1e2, 1e4)]
    assert max(coarse, key=curve) == 10 ** top  # the grid alone points at the broad top


def test_softmax_refinement_warm_starts_each_C_from_the_nearest_fitted_C(monkeypatch):
    """Each softmax fit starts from the coefficients of the nearest C fitted before it (3162 from 1000, not
    from 316 fitted just before it in the same refinement batch); between two as near, the larger C."""
    X, y = load_digits(return_X_y=True)
    X = Normalizer().fit_transform(X).astype(np.float32)
    tr, va = np.arange(0, 1000), np.arange(1000, 1400)
    from cnncodes.classify import _sweep

    calls, real = [], _sweep._softmax_path

    def spy(norm, Cs, *a, warm=None, **kw):
        out = real(norm, Cs, *a, warm=warm, **kw)
        calls.append((list(Cs), warm, out[2]))
        return out

    monkeypatch.setattr(_sweep, "_softmax_path", spy)
    res = C.sweep_C(X[tr], y[tr], X[va], y[va], clf="softmax", norm="none", n_jobs=1, max_iter=200)
    assert any(t["phase"] == "refine2" for t in res.tried)
    fitted, ties = {}, 0
    for Cs, warm, coefs in calls:
        assert len(Cs) == 1
        if fitted:
            dist = {d: abs(np.log10(d / Cs[0])) for d in fitted}
            nearest = max(d for d in fitted if np.isclose(dist[d], min(dist.values())))  # a tie: the larger C
            np.testing.assert_array_equal(warm[0], fitted[nearest][0])
            ties += sum(np.isclose(v, min(dist.values())) for v in dist.values()) > 1
        else:
            assert warm is None
        fitted[Cs[0]] = coefs[0]
    assert ties  # the first refinement (both sides of a grid value) is a decade from two fitted C values


def test_schedule_early_stop_and_bad_arguments():
    s = CSchedule(start=tuple(np.logspace(-4, 4, 9)), patience=2, widen=False, refine=0)
    curve = {1e-4: 0.5, 1e-3: 0.6, 1e-2: 0.7, 1e-1: 0.65, 1.0: 0.66, 10.0: 0.9}  # 10 is never reached
    seen = []
    while batch := s.next_batch():
        seen += batch
        s.record({c: curve[c] for c in batch})
    assert seen == [1e-4, 1e-3, 1e-2, 1e-1, 1.0] and s.best_C == 1e-2 and "2 consecutive" in s.stop_reason
    # drops before the curve has risen above its first value (noise near chance) do not stop it
    s = CSchedule(start=tuple(np.logspace(-4, 4, 9)), patience=1, widen=False, refine=0)
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
    monkeypatch.setattr(C._plots, "_save", lambda fig, path: figs.append(fig))
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


def test_softmax_on_a_val_split_fits_in_this_process_and_equals_the_serial_sweep(monkeypatch):
    """A val split is one fold: the softmax fits run here, one C after another, with no round trip to a joblib
    worker per C (on a loaded machine each round trip waited for a worker to be scheduled); CV folds still go to
    the workers. The results equal those of a sweep with one job."""
    import joblib

    X, y = load_digits(return_X_y=True)
    X = Normalizer().fit_transform(X).astype(np.float32)
    tr, va = np.arange(0, 1000), np.arange(1000, 1400)
    calls, real = [], joblib.Parallel.__call__

    def counting(self, iterable):
        tasks = list(iterable)
        calls.append(len(tasks))
        return real(self, tasks)

    monkeypatch.setattr(joblib.Parallel, "__call__", counting)
    kw = dict(clf="softmax", norm="none", max_iter=200)
    par = C.sweep_C(X[tr], y[tr], X[va], y[va], n_jobs=2, **kw)
    assert calls == []
    ser = C.sweep_C(X[tr], y[tr], X[va], y[va], n_jobs=1, **kw)
    np.testing.assert_array_equal(par.scores, ser.scores)
    np.testing.assert_array_equal(par.predictions, ser.predictions)
    cv = C.sweep_C(X[:600], y[:600], n_jobs=2, cv=3, **kw)
    assert calls and set(calls) == {3} and len(calls) == len(cv.tried)  # each C: the 3 folds in parallel


def test_the_measured_flowers5_block4_softmax_curve_is_searched_to_its_val_optimum():
    """Val accuracies measured on flowers5 Lite0 block4.linear, softmax (610 val images; half decades, from
    benchmarks/bench_search.py and one cold fit per C): a peak at C=10 that the 2-decade grid steps over (1:
    0.8246, 100: 0.8443, 1e4: 0.8410, so the better neighbour of 100 is 1e4). The one-sided refinement went up
    and chose 316; trying both sides first finds 10, the best on the half-decade lattice, in 8 fits."""
    measured = {1e-4: 0.2508, 1e-3: 0.2508, 1e-2: 0.6066, 10 ** -1.5: 0.7279, 0.1: 0.7574, 10 ** -0.5: 0.8033,
                1.0: 0.8246, 10 ** 0.5: 0.8410, 10.0: 0.8508, 10 ** 1.5: 0.8426, 100.0: 0.8443, 10 ** 2.5: 0.8459,
                1e3: 0.8426, 10 ** 3.5: 0.8426, 1e4: 0.8410}
    table = {round(np.log10(c) * 2): v for c, v in measured.items()}
    s = CSchedule()
    tried = _run_on(s, lambda c: table[round(np.log10(c) * 2)])
    assert s.best_C == 10.0 and len(tried) == 8
    assert max(measured.values()) == measured[10.0]
