"""Tests of cnncodes.classify: values (sweep, metrics, splits, model files, compatibility), not existence.

Codes are real data with real class structure: scikit-learn's handwritten digits
(1,797 images of 8x8 pixels, 10 classes) stand in for CNN codes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support)
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline as sk_make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_limits

from cnncodes import classify as C
from cnncodes.errors import CacheError, CacheMismatchError, ModelFileError, TrainingDataError, UsageError
from cnncodes.store import Codes, LayerRecord, fingerprint_of, load_codes, write_cache

REPO = Path(__file__).resolve().parents[1]

SPEC = {
    "backbone": "alexnet",
    "weights": {"kind": "default", "identity": "AlexNet_Weights.IMAGENET1K_V1:alexnet-owt-7be5be79.pth",
                "sha256": "7be5be79" + "0" * 56},
    "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bilinear", "draft": True},
    "dtype": "float16",
    "layers": [],
    "weights_path": "/somewhere/alexnet-owt-7be5be79.pth",
}


def _record(key: str, node: str, dim: int, spec: dict = SPEC) -> LayerRecord:
    return LayerRecord(key, key, node, "relu", "avg", dim, (), fingerprint_of({"spec": spec, "key": key, "node": node}))


def digits_cache(path, *, splits=None, status=None, n=None, nan_rows=(), labels=None, spec=SPEC) -> Path:
    """A cache of real codes: fc6 = the digit pixels, fc7 = their square root (both 64-D)."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    if n is not None:
        X, y = X[:n], y[:n]
    if labels is not None:
        y = np.asarray(labels)
    n = len(y)
    X7 = np.sqrt(X)
    for i in nan_rows:
        X[i] = np.nan
    status = np.array(status if status is not None else ["ok"] * n)
    X[status != "ok"] = np.nan
    X7[status != "ok"] = np.nan
    rows = {
        "paths": np.array([f"d{y[i]}/img{i:04d}.png" for i in range(n)]),
        "labels": y,
        "split": np.array(splits if splits is not None else [""] * n),
        "status": status,
        "message": np.array(["decode failed" if s != "ok" else "" for s in status]),
        "file_size": np.zeros(n, np.int64),
        "file_mtime_ns": np.zeros(n, np.int64),
    }
    layers = {"fc6": (_record("fc6", "classifier.2", 64, spec), [X]), "fc7": (_record("fc7", "classifier.5", 64, spec), [X7])}
    write_cache(path, spec=spec, fingerprint=fingerprint_of(spec), manifest_hash="m" * 64, dataset_root="/data/digits",
                class_names=[f"digit{k}" for k in range(10)], rows=rows, layers=layers)
    return Path(path)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """sklearn fits in the tests on one BLAS/OpenMP thread: on a busy 2-core machine, spinning
    threads make small fits 10-30x slower (the library does the same for small problems)."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def digits_split(digits):
    X, y = digits
    sp = C.make_split(y, np.array([""] * len(y)), np.array(["ok"] * len(y)), val_fraction=0.2, test_fraction=0.2,
                      seed=3)
    return X, y, sp


# --------------------------------------------------------------------------- torch-free


def test_training_side_does_not_import_torch():
    code = ("import sys, cnncodes.classify, cnncodes.predict, cnncodes.store; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- normalisers


def test_normalisers_values_and_dtype(digits):
    X = digits[0][:50] - 4.0  # negative values too
    l2 = C.make_normaliser("l2").fit_transform(X)
    assert l2.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-5)
    sq = C.make_normaliser("sqrt").fit_transform(X)
    ref = np.sign(X) * np.sqrt(np.abs(X))
    np.testing.assert_allclose(sq, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5)
    st = C.make_normaliser("standard").fit_transform(X)
    np.testing.assert_allclose(st.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_array_equal(C.make_normaliser("none").fit_transform(X), X)
    with pytest.raises(UsageError, match="one of l2, standard, sqrt, none"):
        C.make_normaliser("l1")


def test_svm_dual_chosen_by_C_at_fit_time(digits):
    """The dual for C <= 1, the primal above, decided when fitting: set_params(C=...) re-decides it."""
    X, y = digits[0][:300], digits[1][:300]
    svm = C.make_classifier("svm", C=1.0)
    assert svm.fit(X, y).dual_ is True and svm.dual == "by_C"  # the parameter is left as given
    svm.set_params(C=100.0)
    assert svm.fit(X, y).dual_ is False and svm.dual == "by_C"
    ref = LinearSVC(C=100.0, dual=False, random_state=0).fit(X, y)
    np.testing.assert_array_equal(svm.coef_, ref.coef_)  # exactly the primal solver's solution
    svm.set_params(C=1e-3)
    assert svm.fit(X, y).dual_ is True
    np.testing.assert_array_equal(svm.coef_, LinearSVC(C=1e-3, dual=True, random_state=0).fit(X, y).coef_)
    # inside a pipeline, as a search sets it
    pipe = C.make_pipeline("l2", "svm", 1e-2).set_params(clf__C=1e3)
    assert pipe.fit(X, y)[-1].dual_ is False
    assert C.make_classifier("svm").set_params(dual=True).fit(X, y).dual_ is True  # an explicit choice is kept
    with pytest.raises(UsageError, match="'C' parameter"):
        C.make_classifier("svm", C=-1)
    with pytest.raises(UsageError, match="svm, softmax"):
        C.make_classifier("knn")


# the checks scikit-learn itself expects LinearSVC to fail (sklearn/utils/_test_common/instance_generator.py)
LINEAR_SVC_XFAIL = {
    "check_sample_weight_equivalence_on_dense_data": "as LinearSVC: sample_weight is not equivalent to "
                                                     "removing/repeating samples (liblinear's tolerance)",
    "check_sample_weight_equivalence_on_sparse_data": "as LinearSVC",
}


@parametrize_with_checks([C.CodesLinearSVC(max_iter=5000), C.CodesLinearSVC(C=100.0, max_iter=5000)],
                         expected_failed_checks=lambda est: LINEAR_SVC_XFAIL)
def test_codes_linear_svc_passes_sklearn_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------- the C sweep


def _direct_val_scores(X, y, sp, grid, seed=0):
    """What a user computes by hand: one sklearn pipeline per C (the dual for C <= 1, as the library
    chooses: both solve the same problem, and the test compares exact accuracies), scored on val."""
    direct = []
    for c in grid:
        m = sk_make_pipeline(Normalizer(), LinearSVC(C=c, dual=bool(c <= 1), random_state=seed, max_iter=1000))
        m.fit(X[sp.train], y[sp.train])
        direct.append(accuracy_score(y[sp.val], m.predict(X[sp.val])))
    return np.asarray(direct)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_svm_sweep_on_val_equals_direct_grid_evaluation(digits_split, n_jobs):
    X, y, sp = digits_split
    grid = np.logspace(-4, 4, 9)
    direct = _direct_val_scores(X, y, sp, grid)
    res = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="svm", norm="l2", grid=grid,
                    n_jobs=n_jobs, early_stop=0, refine=0)
    np.testing.assert_allclose(res.scores, direct)
    assert res.best_index == int(np.argmax(direct)) and res.best_C == grid[np.argmax(direct)]
    assert res.method == "val" and res.converged.all() and res.evaluated.all() and res.stopped_at is None
    assert np.log10(res.grid[-1] / res.grid[0]) >= 8
    # the stored predictions are the val predictions at each C
    assert accuracy_score(y[sp.val], res.predictions[res.best_index]) == res.scores[res.best_index]
    # with the default early stop: the same scores on the C values it fitted, the same best C
    es = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="svm", norm="l2", grid=grid, n_jobs=n_jobs,
                   refine=0)
    k = int(es.evaluated.sum())
    assert es.evaluated[:k].all() and k >= int(np.argmax(direct)) + 1
    np.testing.assert_allclose(es.scores[:k], direct[:k])
    assert es.best_C == grid[np.argmax(direct)]


def test_peaked_needs_consecutive_strict_drops():
    assert not C._peaked([0.5, 0.9, 0.8], 2)
    assert C._peaked([0.5, 0.9, 0.8, 0.85], 2)
    assert not C._peaked([0.5, 0.9, 0.9, 0.8], 2)  # a tie is no drop
    assert not C._peaked([0.5, 0.9, 0.8, 0.95], 2)  # rose again to a new best
    assert C._peaked([0.5, 0.9, 0.8, 0.7, 0.6], 3) and not C._peaked([0.5, 0.9, 0.8, 0.7], 3)
    assert not C._peaked([0.9, 0.8, 0.7], 0) and not C._peaked([0.9, 0.8, 0.7], None)


def test_early_stop_fits_no_C_beyond_the_stop(digits_split, monkeypatch):
    """The sweep stops after `patience` drops; the larger C values are never fitted, and the record says so."""
    X, y, sp = digits_split
    grid = np.logspace(-4, 4, 9)
    direct = _direct_val_scores(X, y, sp, grid)
    fitted = []
    real = C._fit_predict_one

    def spy(norm, clf, c, *a, **k):
        fitted.append(float(c))
        return real(norm, clf, c, *a, **k)

    monkeypatch.setattr(C, "_fit_predict_one", spy)
    res = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="svm", grid=grid, n_jobs=1, early_stop=1,
                    refine=0)
    # where a direct evaluation first drops below its running best, the sweep stops
    best_so_far = np.maximum.accumulate(direct)
    stop = int(np.flatnonzero(direct[1:] < best_so_far[:-1])[0]) + 1
    assert fitted == list(grid[: stop + 1]) and res.stopped_at == grid[stop]
    assert res.evaluated.tolist() == [i <= stop for i in range(9)]
    assert np.isnan(res.scores[stop + 1:]).all() and res.best_index == int(np.argmax(direct[: stop + 1]))
    curve = res.curve()
    assert [p["evaluated"] for p in curve] == res.evaluated.tolist()
    assert all(p["score"] is None for p in curve[stop + 1:]) and curve[stop]["score"] == direct[stop]
    assert any("stopped early" in n and f"{grid[-1]:g}" in n for n in res.notes)
    with pytest.raises(UsageError, match="'early_stop' parameter"):
        C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], grid=grid, n_jobs=1, early_stop=-1)


def test_softmax_sweep_is_warm_started_and_matches_cold_fits(digits_split):
    X, y, sp = digits_split
    grid = np.logspace(-4, 4, 9)
    res = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="softmax", norm="l2", grid=grid, n_jobs=1,
                    early_stop=0, refine=0)
    nrm = Normalizer().fit(X[sp.train])
    cold = []
    with threadpool_limits(1):
        for c in grid:
            m = LogisticRegression(C=c, max_iter=4000).fit(nrm.transform(X[sp.train]), y[sp.train])
            cold.append(accuracy_score(y[sp.val], m.predict(nrm.transform(X[sp.val]))))
    cold = np.asarray(cold)
    # warm and cold starts agree up to the solver's tolerance (near-ties at tiny C may flip 1-2 images);
    # at large C (nearly separable codes, weights growing without bound) a few val images may differ
    assert np.max(np.abs(res.scores[grid <= 100] - cold[grid <= 100])) <= 2.5 / len(sp.val)
    assert np.max(np.abs(res.scores - cold)) <= 0.02
    assert cold[res.best_index] >= cold.max() - 0.01
    assert res.converged.all()


def test_cv_sweep_equals_direct_stratified_kfold(digits):
    X, y = digits
    X, y = X[::3], y[::3]
    grid = np.logspace(-4, 4, 9)
    res = C.sweep_C(X, y, clf="svm", norm="l2", grid=grid, cv=4, seed=7, n_jobs=2, early_stop=0, refine=0)
    folds = list(StratifiedKFold(4, shuffle=True, random_state=7).split(X, y))
    direct = []
    for c in grid:
        accs = []
        for tr, te in folds:
            m = sk_make_pipeline(Normalizer(), LinearSVC(C=c, dual=bool(c <= 1), random_state=7)).fit(X[tr], y[tr])
            accs.append(accuracy_score(y[te], m.predict(X[te])))
        direct.append(np.mean(accs))
    np.testing.assert_allclose(res.scores, direct)
    assert res.method == "cv" and res.n_folds == 4 and res.best_index == int(np.argmax(direct))
    assert res.predictions.shape == (9, len(y))  # out-of-fold predictions of every train row
    # early stop: the same mean fold scores on the C values fitted, the same best C
    es = C.sweep_C(X, y, clf="svm", norm="l2", grid=grid, cv=4, seed=7, n_jobs=2, early_stop=1, refine=0)
    k = int(es.evaluated.sum())
    assert k < 9 and es.evaluated[:k].all() and es.stopped_at == grid[k - 1]
    np.testing.assert_allclose(es.scores[:k], direct[:k])
    assert es.best_index == int(np.argmax(direct))


def test_cv_falls_back_to_fewer_folds_for_a_tiny_class(digits):
    X, y = digits
    keep = np.concatenate([np.flatnonzero(y == 0)[:30], np.flatnonzero(y == 1)[:30], np.flatnonzero(y == 2)[:3]])
    res = C.sweep_C(X[keep], y[keep], clf="svm", grid=np.logspace(-4, 4, 9), cv=5, n_jobs=1,
                    class_names=["zero", "one", "two"])
    assert res.n_folds == 3
    assert any("two (3)" in n and "3-fold" in n for n in res.notes)


def test_best_C_at_grid_edge_is_flagged_when_widening_is_off(digits_split):
    X, y, sp = digits_split
    grid = [1e-3, 1e-2, 1e-1]  # digits want C >= 1: the score rises to the upper edge
    res = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="svm", grid=grid, n_jobs=1, widen=False,
                    refine=0)
    assert res.at_edge and res.best_C == 1e-1 and any("upper end" in n for n in res.notes)
    wide = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf="svm", grid=grid, n_jobs=1, refine=0)
    assert wide.best_C > 1e-1 and not wide.at_edge and "widened up" in wide.stop_reason


def test_bad_grid_is_a_usage_error(digits_split):
    X, y, sp = digits_split
    with pytest.raises(UsageError, match="C grid"):
        C.sweep_C(X[sp.train], y[sp.train], grid=[1.0], n_jobs=1)
    with pytest.raises(UsageError, match="C grid"):
        C.sweep_C(X[sp.train], y[sp.train], grid=[-1.0, 1.0], n_jobs=1)


# --------------------------------------------------------------------------- convergence


def test_convergence_retries_then_records_failure(digits):
    X, y = digits
    est = C.make_classifier("softmax", 100.0, max_iter=2)
    info = C.fit_with_retries(est, X, y, max_iter_cap=2)
    assert info == {"converged": False, "max_iter": 2, "message": info["message"]}
    assert "did not converge with max_iter=2" in info["message"]
    info = C.fit_with_retries(C.make_pipeline("l2", "softmax", 1.0, max_iter=2), X, y, max_iter_cap=10000)
    assert info["converged"] and info["max_iter"] > 2 and "raising max_iter from 2" in info["message"]


# --------------------------------------------------------------------------- metrics


def test_metrics_equal_sklearn_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    names = ["a", "b", "c", "d", "e"]  # "e" never occurs
    m = C.compute_metrics(y, p, names)
    assert m["accuracy"] == accuracy_score(y, p)
    assert m["balanced_accuracy"] == balanced_accuracy_score(y, p)
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=range(5), zero_division=0)
    for i, n in enumerate(names):
        assert m["per_class"][n] == {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]}
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=range(5)).tolist()
    assert m["n"] == 200 and C.compute_metrics([], [], names) == {"n": 0}


def test_top_scores_are_the_top_decision_or_probability(digits):
    X, y = digits
    svm = C.make_pipeline("l2", "svm", 1.0, n_samples=len(y), n_features=64).fit(X, y)
    pred, score = C.top_scores(svm, X[:20])
    np.testing.assert_array_equal(pred, svm.predict(X[:20]))
    np.testing.assert_allclose(score, svm.decision_function(X[:20]).max(axis=1))
    lr = C.make_pipeline("l2", "softmax", 10.0).fit(X, y)
    pred, score = C.top_scores(lr, X[:20])
    np.testing.assert_allclose(score, lr.predict_proba(X[:20]).max(axis=1))
    b = y < 2
    svm2 = C.make_pipeline("l2", "svm", 1.0).fit(X[b], y[b])
    pred, score = C.top_scores(svm2, X[b][:20])
    np.testing.assert_array_equal(pred, svm2.predict(X[b][:20]))
    np.testing.assert_allclose(score, np.abs(svm2.decision_function(X[b][:20])))


# --------------------------------------------------------------------------- splits and bad input


def test_recorded_split_is_used_and_failed_rows_are_counted():
    y = np.repeat([0, 1, 2], 6)
    splits = np.array(["train", "train", "train", "val", "test", "test"] * 3)
    status = np.array(["ok"] * 18)
    status[[0, 5]] = "error"
    sp = C.make_split(y, splits, status, paths=np.array([f"p{i}" for i in range(18)]),
                      messages=np.array(["bad jpeg"] * 18))
    assert sp.source == "recorded" and sp.n_failed == 2 and sp.failed_examples == ["p0: bad jpeg", "p5: bad jpeg"]
    assert set(sp.train) == {1, 2, 6, 7, 8, 12, 13, 14} and set(sp.val) == {3, 9, 15}
    assert set(sp.test) == {4, 10, 11, 16, 17}
    assert not set(sp.train) & {0, 5}


def test_drawn_split_is_stratified_and_reproducible(digits):
    y = digits[1]
    none = np.array([""] * len(y))
    ok = np.array(["ok"] * len(y))
    a = C.make_split(y, none, ok, val_fraction=0.15, test_fraction=0.2, seed=5)
    b = C.make_split(y, none, ok, val_fraction=0.15, test_fraction=0.2, seed=5)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert a.source == "stratified" and a.seed == 5
    assert len(set(a.train) | set(a.val) | set(a.test)) == len(y)
    assert not (set(a.train) & set(a.test)) and not (set(a.val) & set(a.test))
    frac = np.bincount(y[a.test], minlength=10) / np.bincount(y, minlength=10)
    assert np.all(np.abs(frac - 0.2) < 0.03)


def test_one_class_is_refused():
    y = np.zeros(10, int)
    with pytest.raises(TrainingDataError, match="single class"):
        C.make_split(y, np.array([""] * 10), np.array(["ok"] * 10), class_names=["cat"])


def test_one_usable_class_after_failed_rows_is_refused():
    y = np.array([0] * 5 + [1] * 5)
    status = np.array(["ok"] * 5 + ["error"] * 5)
    with pytest.raises(TrainingDataError, match="single class"):
        C.make_split(y, np.array([""] * 10), status)


@pytest.mark.parametrize("splits,needle", [
    (["train"] * 12, "recorded test split is empty"),
    (["val"] * 6 + ["test"] * 6, "recorded train split is empty"),
    (["train"] * 6 + [""] * 6, "have no recorded split"),
    (["train"] * 6 + ["holdout"] * 6, "Unknown recorded split"),
])
def test_bad_recorded_splits_are_refused(splits, needle):
    y = np.array([0, 1] * 6)
    with pytest.raises(TrainingDataError, match=needle):
        C.make_split(y, np.array(splits), np.array(["ok"] * 12))


def _per_part(sp, y, c):
    return [int(np.sum(y[getattr(sp, part)] == c)) for part in ("train", "val", "test")]


def test_imbalanced_drawn_split_tests_the_minority_and_warns():
    """200:2 used to give val and test without a single minority image (sklearn's proportional split
    rounds 0.4 images to 0), and a test accuracy of 1.0 with nothing said."""
    y = np.array([0] * 200 + [1] * 2)
    none, ok = np.array([""] * 202), np.array(["ok"] * 202)
    sp = C.make_split(y, none, ok, class_names=["common", "rare"], val_fraction=0.15, test_fraction=0.2, seed=0)
    assert _per_part(sp, y, 1) == [1, 0, 1]  # 2 images: one to train on, one to test
    assert sorted(np.concatenate([sp.train, sp.val, sp.test]).tolist()) == list(range(202))
    assert sp.warnings == ["class rare (2 usable images) has no image in the val split: C is chosen without it"]
    assert any("rare (2 images): 1 image moved from train to test" in n for n in sp.notes)
    y3 = np.array([0] * 200 + [1] * 3)
    sp3 = C.make_split(y3, np.array([""] * 203), np.array(["ok"] * 203), class_names=["common", "rare"])
    assert _per_part(sp3, y3, 1) == [1, 1, 1] and sp3.warnings == []
    # one image: trained on, never tested, said twice (val and test)
    y1 = np.array([0] * 20 + [1])
    sp1 = C.make_split(y1, np.array([""] * 21), np.array(["ok"] * 21), class_names=["a", "b"])
    assert _per_part(sp1, y1, 1) == [1, 0, 0]
    assert [w.split(" has no image in the ")[1].split(" ")[0] for w in sp1.warnings] == ["val", "test"]


def test_split_rule_leaves_ordinary_splits_as_sklearn_draws_them(digits):
    """Every class large enough: exactly sklearn's stratified split of the same seed, as before the rule."""
    from sklearn.model_selection import train_test_split

    y = digits[1]
    idx = np.arange(len(y))
    sp = C.make_split(y, np.array([""] * len(y)), np.array(["ok"] * len(y)), val_fraction=0.15, test_fraction=0.2,
                      seed=7)
    rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=7)
    train, val = train_test_split(rest, test_size=0.15 / 0.8, stratify=y[rest], random_state=7)
    for part, want in (("train", train), ("val", val), ("test", test)):
        np.testing.assert_array_equal(getattr(sp, part), np.sort(want))
    assert sp.notes == [] and sp.warnings == []


@pytest.mark.parametrize("seed", range(20))
def test_split_rule_holds_for_small_classes(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, size=6)
    y = np.repeat(np.arange(6), counts)
    sp = C.make_split(y, np.array([""] * len(y)), np.array(["ok"] * len(y)), seed=seed)
    assert sorted(np.concatenate([sp.train, sp.val, sp.test]).tolist()) == list(range(len(y)))
    for c, n_c in enumerate(counts):
        tr, va, te = _per_part(sp, y, c)
        assert tr >= 1 and (te >= 1 if n_c >= 2 else te == 0) and (va >= 1 if n_c >= 3 else va == 0)
    n_warn = sum(int(n_c < 3) + int(n_c < 2) for n_c in counts)
    assert len(sp.warnings) == n_warn


def test_recorded_split_missing_a_class_in_test_warns():
    y = np.array([0] * 6 + [1] * 6)
    splits = np.array(["train"] * 4 + ["test"] * 2 + ["train"] * 6)
    sp = C.make_split(y, splits, np.array(["ok"] * 12), class_names=["daisy", "rose"])
    assert sp.source == "recorded" and sp.counts() == {"train": 10, "val": 0, "test": 2}
    assert sp.warnings == ["class rose (6 usable images) has no image in the test split: it is not tested "
                           "(the test accuracy and balanced accuracy leave it out)"]


def test_train_and_val_folders_without_test_use_val_as_test():
    """hymenoptera's layout: the recorded val is the test split; val is drawn from train (stratified)."""
    y = np.array([0] * 30 + [1] * 20 + [0] * 10 + [1] * 6)
    splits = np.array(["train"] * 50 + ["val"] * 16)
    sp = C.make_split(y, splits, np.array(["ok"] * 66), class_names=["ants", "bees"], val_fraction=0.2, seed=4)
    np.testing.assert_array_equal(sp.test, np.arange(50, 66))
    assert set(sp.train) | set(sp.val) == set(range(50)) and not set(sp.train) & set(sp.val)
    assert _per_part(sp, y[:66], 0)[1] == 6 and _per_part(sp, y, 1)[1] == 4  # 20 % of each class of train
    assert sp.roles == {"train": "recorded train less the drawn val", "val": "drawn from recorded train",
                        "test": "recorded val"}
    assert "is used as the test split" in sp.notes[0] and sp.warnings == []
    again = C.make_split(y, splits, np.array(["ok"] * 66), val_fraction=0.2, seed=4)
    np.testing.assert_array_equal(again.val, sp.val)
    cv = C.make_split(y, splits, np.array(["ok"] * 66), val_fraction=0, seed=4)
    assert cv.counts() == {"train": 50, "val": 0, "test": 16} and "cross-validation" in cv.notes[0]


def test_nan_codes_among_ok_rows_are_refused():
    X = np.ones((5, 3), np.float32)
    X[2, 1] = np.nan
    X[4] = np.inf
    with pytest.raises(TrainingDataError, match="2 usable row"):
        C.check_codes(X, np.arange(5), np.array([f"im{i}" for i in range(5)]))
    C.check_codes(X, np.array([0, 1, 3]))  # NaN only in rows left out: fine


def test_train_run_refuses_nan_codes_and_writes_nothing(tmp_path):
    cache = digits_cache(tmp_path / "nan.h5", n=300, nan_rows=[7])
    with pytest.raises(TrainingDataError, match="NaN or inf"):
        C.train_run(cache, ["fc6"], out=tmp_path / "run", n_jobs=1, plots=False)
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # no staging folder left


# --------------------------------------------------------------------------- model files


@pytest.fixture
def saved_model(tmp_path, digits):
    X, y = digits
    pipe = C.make_pipeline("l2", "svm", 1.0, n_samples=len(y), n_features=64).fit(X, y)
    path = tmp_path / "models" / "fc7__svm.skops"
    C.save_model(pipe, path, {"classifier": "svm", "layers": ["fc7"], "class_names": [str(i) for i in range(10)],
                              "records": {"fc7": _record("fc7", "classifier.5", 64).to_dict()}, "spec": SPEC})
    return pipe, path


def test_saved_model_predicts_the_same(saved_model, digits):
    pipe, path = saved_model
    model, meta = C.load_model(path)
    X = digits[0]
    np.testing.assert_array_equal(model.predict(X), pipe.predict(X))
    np.testing.assert_array_equal(model.decision_function(X), pipe.decision_function(X))
    from cnncodes.fileio import sha256_of_file

    assert meta["sha256"] == sha256_of_file(path) and meta["model_file"] == "fc7__svm.skops"
    assert meta["versions"]["sklearn"] and meta["spec"] == SPEC


def test_tampered_model_is_refused_before_loading(saved_model, monkeypatch):
    _, path = saved_model
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    from cnncodes import modelfile

    def boom(*a, **k):
        raise AssertionError("the skops loader was called on a tampered file")

    monkeypatch.setattr(modelfile, "_load_skops", boom)
    with pytest.raises(ModelFileError, match="does not match its sidecar"):
        C.load_model(path)


def test_truncated_model_is_refused(saved_model):
    _, path = saved_model
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="sha256"):
        C.load_model(path)


def test_missing_model_or_sidecar_is_refused(saved_model, tmp_path):
    _, path = saved_model
    with pytest.raises(ModelFileError, match="No model file"):
        C.load_model(tmp_path / "nope.skops")
    C.sidecar_path(path).unlink()
    with pytest.raises(ModelFileError, match="no sidecar"):
        C.load_model(path)


def test_sidecar_of_another_model_is_refused(saved_model, digits):
    _, path = saved_model
    X, y = digits
    other = path.with_name("fc6__svm.skops")
    C.save_model(C.make_pipeline("l2", "svm", 10.0).fit(X, y), other, {"layers": ["fc6"]})
    C.sidecar_path(path).write_text(C.sidecar_path(other).read_text())
    with pytest.raises(ModelFileError, match="belongs to another model"):
        C.load_model(path)
    # the same sidecar with the name patched still fails on the sha256
    meta = json.loads(C.sidecar_path(other).read_text())
    meta["model_file"] = path.name
    C.sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="does not match"):
        C.load_model(path)


def test_corrupt_sidecar_is_refused(saved_model):
    _, path = saved_model
    C.sidecar_path(path).write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable"):
        C.load_model(path)


def test_model_write_is_atomic(saved_model, monkeypatch, digits):
    """A write that dies half-way (the disk fills before the data reach it) leaves the previous model and
    sidecar intact and loadable, and no temporary file."""
    import os

    pipe, path = saved_model
    before, side_before = path.read_bytes(), C.sidecar_path(path).read_bytes()

    def dying_fsync(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="No space"):
        C.save_model(C.make_pipeline("l2", "svm", 10.0).fit(*digits), path, {"layers": ["fc7"]})
    assert path.read_bytes() == before and C.sidecar_path(path).read_bytes() == side_before
    monkeypatch.undo()
    C.load_model(path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- compatibility


def _meta(key="fc7", node="classifier.5", spec=SPEC):
    return {"model_file": "fc7__svm.skops", "layers": [key], "records": {key: _record(key, node, 4096, spec).to_dict()},
            "spec": spec}


def test_compatible_codes_pass():
    other_place = dict(SPEC, weights_path="/elsewhere/alexnet.pth")
    C.check_compatible(_meta(), {"fc7": _record("fc7", "classifier.5", 4096)}, other_place)


def test_fc6_codes_refused_for_an_fc7_model_of_equal_width():
    codes = {"fc6": _record("fc6", "classifier.2", 4096)}
    with pytest.raises(CacheMismatchError) as e:
        C.check_compatible(_meta(), codes, SPEC)
    fields = [d.field for d in e.value.differences]
    assert "layer[fc7].alias" in fields and "layer[fc7].node" in fields
    assert "layer[fc7].dim" not in fields  # both 4096-D: the widths are not what differs
    assert "'classifier.5' (model) vs 'classifier.2' (codes)" in str(e.value)
    # the same codes filed under the model's key are refused too
    with pytest.raises(CacheMismatchError, match="alias"):
        C.check_compatible(_meta(), {"fc7": LayerRecord("fc7", "fc6", "classifier.2", "relu", "avg", 4096)}, SPEC)


def test_other_weights_and_preprocessing_are_named():
    spec2 = json.loads(json.dumps(SPEC))
    spec2["weights"]["sha256"] = "f" * 64
    spec2["preprocessing"]["crop"] = 227
    with pytest.raises(CacheMismatchError) as e:
        C.check_compatible(_meta(), {"fc7": _record("fc7", "classifier.5", 4096, spec2)}, spec2)
    fields = [d.field for d in e.value.differences]
    assert fields == ["preprocessing.crop", "weights.sha256"]


def test_pre_relu_stage_and_pooling_are_named():
    rec = LayerRecord("fc7", "fc7", "classifier.5", "linear", "max", 4096)
    with pytest.raises(CacheMismatchError) as e:
        C.check_compatible(_meta(), {"fc7": rec}, SPEC)
    assert {"layer[fc7].stage", "layer[fc7].pool"} <= {d.field for d in e.value.differences}


def test_missing_layer_is_named():
    with pytest.raises(CacheMismatchError, match="layers"):
        C.check_compatible(_meta(), {"conv5": _record("conv5", "features.11", 256), "fc6": _record("fc6", "x", 9)},
                           SPEC)


# --------------------------------------------------------------------------- a run


def test_train_run_values_and_files(tmp_path):
    cache = digits_cache(tmp_path / "digits.h5")
    res = C.train_run(cache, ["fc6"], classifiers=["svm"], out=tmp_path / "run", n_jobs=1, plots=False,
                      grid=np.logspace(-3, 5, 9))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    r = m["results"]["fc6"]["svm"]
    codes = load_codes(cache, ["fc6"])
    model, meta = C.load_model(tmp_path / "run" / r["model"])
    # the test accuracy is that of the saved model on the test rows of the recorded split
    sp = C.make_split(codes.labels, codes.splits, codes.status, test_fraction=0.2, val_fraction=0.15, seed=0)
    assert m["split"]["counts"] == sp.counts()
    pred = model.predict(codes.X[sp.test])
    assert r["test"]["accuracy"] == accuracy_score(codes.labels[sp.test], pred) > 0.9
    # the C is the argmax of the recorded curve (C values past an early stop have no score), and the
    # val metrics are the curve's value there
    curve = [-1.0 if p["score"] is None else p["score"] for p in r["c_curve"]]
    assert r["C"] == r["c_curve"][int(np.argmax(curve))]["C"] and r["val"]["accuracy"] == max(curve)
    assert [p["evaluated"] for p in r["c_curve"]] == [p["score"] is not None for p in r["c_curve"]]
    assert meta["C"] == r["C"] and meta["fingerprint"] == codes.fingerprint
    assert meta["records"]["fc6"] == codes.records["fc6"].to_dict() and meta["norm"] == "l2"
    assert m["best"]["model"] == r["model"] and res.run_dir == tmp_path / "run"
    assert m["settings"]["early_stop"] == 2 and r["selection"]["early_stop"] == 2


def test_best_model_at_the_top_of_the_run_folder(tmp_path):
    """RUN/model.skops is the best model by val accuracy: same bytes and predictions as its models/ copy,
    its own sidecar (sha256 checked on load), and the default of find_model / predict."""
    cache = digits_cache(tmp_path / "digits.h5")
    run = tmp_path / "run"
    C.train_run(cache, ["fc6", "fc7"], classifiers=["svm", "softmax"], out=run, n_jobs=1, plots=False)
    m = json.loads((run / "metrics.json").read_text())
    best = max(((k, c) for k, d in m["results"].items() for c in d),
               key=lambda kc: m["results"][kc[0]][kc[1]]["val"]["accuracy"])
    assert m["best"]["model"] == f"models/{best[0]}__{best[1]}.skops" and m["best"]["file"] == "model.skops"
    top, top_meta = C.load_model(run / "model.skops")
    copy, copy_meta = C.load_model(run / m["best"]["model"])
    assert (run / "model.skops").read_bytes() == (run / m["best"]["model"]).read_bytes()
    assert top_meta["sha256"] == copy_meta["sha256"] and top_meta["model_file"] == "model.skops"
    assert top_meta["copy_of"] == m["best"]["model"] and top_meta["layers"] == [best[0]]
    assert top_meta["classifier"] == best[1] and top_meta["C"] == m["results"][best[0]][best[1]]["C"]
    codes = load_codes(cache, [best[0]])
    np.testing.assert_array_equal(top.predict(codes.X), copy.predict(codes.X))
    assert C.find_model(run) == run / "model.skops"
    assert C.find_model(run, "fc6__svm") == run / "models" / "fc6__svm.skops"
    # tampered: refused before loading, like every model file
    data = bytearray((run / "model.skops").read_bytes())
    data[-20] ^= 0x01
    (run / "model.skops").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="does not match its sidecar"):
        C.load_model(C.find_model(run))
    # a run written before model.skops existed: the best named by metrics.json
    (run / "model.skops").unlink()
    (run / "model.json").unlink()
    assert C.find_model(run) == run / m["best"]["model"]


def test_softmax_predictions_do_not_depend_on_float16_storage():
    """float16 codes must give the predictions of float32 codes: the solver stops late enough that
    the rounding (2**-11 relative), not where lbfgs happened to stop, is all that differs.
    With sklearn's default tol=1e-4 this gave 1 and 3 different predictions at C=10 and 100."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    Z = np.maximum(X @ rng.standard_normal((64, 512)) / 8, 0).astype(np.float32)  # post-ReLU codes
    Z16 = Z.astype(np.float16).astype(np.float32)
    tr, te = np.arange(0, 1200), np.arange(1200, len(y))
    for c in (1.0, 10.0, 100.0):
        p32, _ = C.refit(Z[tr], y[tr], clf="softmax", norm="l2", C=c)
        p16, _ = C.refit(Z16[tr], y[tr], clf="softmax", norm="l2", C=c)
        np.testing.assert_array_equal(p32.predict(Z[te]), p16.predict(Z16[te]))


# --------------------------------------------------------------------------- one snapshot of the cache


def test_cache_rewritten_between_layers_is_read_as_one_snapshot(tmp_path, monkeypatch):
    """A cache replaced (another row set) while a run reads its layers: the run must use only the
    version it opened. Reading each layer anew applied the split drawn on the old rows to the new."""
    import shutil

    cache = digits_cache(tmp_path / "digits.h5")
    twin = tmp_path / "twin.h5"
    shutil.copyfile(cache, twin)  # the old version, for the reference run
    kw = dict(classifiers=["svm"], n_jobs=1, plots=False, grid=np.logspace(-3, 5, 9))
    ref = C.train_run(twin, ["fc6", "fc7"], out=tmp_path / "ref", **kw).metrics

    real_check = C.check_codes
    calls = []

    def rewrite_after_first_layer(*a, **k):
        if not calls:  # between the reads of fc6 and fc7: an extraction replaces the cache (by rename)
            digits_cache(cache, n=900, labels=np.arange(900) % 3)
        calls.append(1)
        return real_check(*a, **k)

    monkeypatch.setattr(C, "check_codes", rewrite_after_first_layer)
    got = C.train_run(cache, ["fc6", "fc7"], out=tmp_path / "run", **kw).metrics
    assert len(calls) == 2 and load_codes(cache, "fc7").X.shape[0] == 900  # the file did change
    assert got["split"] == ref["split"] and got["cache"]["rows_sha256"] == ref["cache"]["rows_sha256"]
    for layer in ("fc6", "fc7"):
        a, b = got["results"][layer]["svm"], ref["results"][layer]["svm"]
        for key in ("C", "c_curve", "train", "val", "test"):
            assert a[key] == b[key], (layer, key)


def test_layers_of_two_cache_versions_are_refused():
    a = Codes
    base = dict(X=np.zeros((1, 1)), labels=np.zeros(1), paths=np.array(["p"]), splits=np.array([""]),
                status=np.array(["ok"]), messages=np.array([""]), class_names=["a"], records={}, spec={},
                fingerprint="f" * 8, path=Path("c.h5"))
    first = a(layers=["fc6"], rows_sha256="1" * 64, **base)
    C._check_same_snapshot(first, a(layers=["fc7"], rows_sha256="1" * 64, **base), "c.h5")
    with pytest.raises(CacheError, match="changed while the run read it"):
        C._check_same_snapshot(first, a(layers=["fc7"], rows_sha256="2" * 64, **base), "c.h5")
