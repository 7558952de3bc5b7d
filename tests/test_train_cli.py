"""Tests of scripts/train_svm.py: main([...]) on synthetic caches of real codes (sklearn's digits)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from cnncodes import cli_train as train  # what scripts/train_svm.py runs
from cnncodes.classify import load_model
from cnncodes.store import load_codes

from test_classify import digits_cache

REPO = Path(__file__).resolve().parents[1]

FAST = ["--n-jobs", "1", "--c-min", "1e-3", "--c-max", "1e5", "--c-num", "9", "--no-plots", "-q"]


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return digits_cache(tmp_path_factory.mktemp("codes") / "digits__alexnet.h5")


def test_compare_layers_and_classifiers(cache, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main([str(cache), "--layers", "fc6", "fc7", "--clf", "svm", "softmax", "--out", str(out),
                     "--n-jobs", "2", "-q"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for layer in ("fc6", "fc7"):
        for clf in ("svm", "softmax"):
            r = m["results"][layer][clf]
            acc = r["test"]["accuracy"]
            assert isinstance(acc, float) and 0.0 <= acc <= 1.0
            assert acc > 0.85  # chance is 0.1
            cs = [p["C"] for p in r["c_curve"]]  # the initial grid and every C tried (wider, finer), ascending
            assert cs == sorted(cs) and {10.0 ** e for e in range(-4, 5)} <= set(cs)
            tried = r["selection"]["tried"]
            assert {t["C"] for t in tried} == {p["C"] for p in r["c_curve"] if p["evaluated"]}
            assert r["C"] == max(tried, key=lambda t: (t["score"], -t["C"]))["C"] and r["selection"]["stop_reason"]
            assert r["selection"]["method"] == "val" and r["converged"] is True
            assert (out / r["model"]).is_file() and (out / r["model"]).with_suffix(".json").is_file()
    # the best model by val accuracy, at the top of the run folder
    assert (out / "model.joblib").read_bytes() == (out / m["best"]["model"]).read_bytes()
    assert load_model(out / "model.joblib")[1]["copy_of"] == m["best"]["model"]
    for png in ("confusion_matrix.png", "c_curve.png", "layer_comparison.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the terminal table: one row per (layer, classifier), then the run folder as the last line
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(out)
    rows = [ln.split() for ln in lines if ln.startswith(("fc6 ", "fc7 "))]
    assert sorted((r[0], r[1]) for r in rows) == [("fc6", "softmax"), ("fc6", "svm"), ("fc7", "softmax"),
                                                  ("fc7", "svm")]
    for r in rows:
        assert float(r[3]) == pytest.approx(m["results"][r[0]][r[1]]["test"]["accuracy"], abs=5e-5)
        assert float(r[4]) == pytest.approx(m["results"][r[0]][r[1]]["C"], rel=1e-5)  # printed with 6 digits


def test_saved_predictions_match_the_model_and_metrics(cache, tmp_path):
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc7", "--clf", "svm", "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    r = m["results"]["fc7"]["svm"]
    model, meta = load_model(out / r["model"])
    codes = load_codes(cache, ["fc7"])
    index = {p: i for i, p in enumerate(codes.paths)}
    with open(out / "predictions" / "fc7__svm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test = [row for row in rows if row["split"] == "test"]
    idx = np.array([index[row["path"]] for row in test])
    pred = model.predict(codes.X[idx])
    assert [meta["class_names"][p] for p in pred] == [row["pred"] for row in test]
    acc = np.mean([row["pred"] == row["true"] for row in test])
    assert acc == pytest.approx(r["test"]["accuracy"])
    assert len(test) == m["split"]["counts"]["test"] == r["test"]["n"]


def test_second_run_into_the_same_folder_keeps_the_first(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(out), *FAST]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    rc = train.main([str(cache), "--layers", "fc7", "--clf", "svm", "--out", str(out), *FAST])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    # with --overwrite the new run replaces the old one, as a whole
    assert train.main([str(cache), "--layers", "fc7", "--clf", "svm", "--out", str(out), "--overwrite", *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["results"]) == ["fc7"] and not (out / "models" / "fc6__svm.joblib").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or old folder left


def test_failed_run_with_overwrite_keeps_the_previous_run(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(out), *FAST]) == 0
    before = (out / "metrics.json").read_bytes()
    bad = digits_cache(tmp_path / "nan.h5", n=400, nan_rows=[3])
    rc = train.main([str(bad), "--layers", "fc6", "--clf", "svm", "--out", str(out), "--overwrite", *FAST])
    assert rc == 1
    assert "NaN or inf" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.h5", "run"]


def test_missing_layer_is_a_usage_error(cache, tmp_path, capsys):
    rc = train.main([str(cache), "--layers", "fc8", "--out", str(tmp_path / "run"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds no layer 'fc8'" in err and "fc6, fc7" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--layers", "fc6", "--clf", "knn"], "invalid choice: 'knn'"),
    (["--layers", "fc6", "--norm", "l1"], "invalid choice: 'l1'"),
    (["--layers", "fc6", "--c-min", "10", "--c-max", "1"], "--c-min < --c-max"),
    (["--layers", "fc6", "--val-fraction", "0.6", "--test-fraction", "0.5"], "must be < 1"),
    (["--layers", "fc6", "--cv", "1", "--val-fraction", "0"], "'cv' parameter"),
    (["--layers", "fc6", "--early-stop", "-1"], "'early_stop' parameter"),
    ([], "--layers"),
])
def test_usage_errors_exit_2_with_one_line(cache, tmp_path, capsys, argv, needle):
    rc = train.main([str(cache), *argv, "--out", str(tmp_path / "run"), "--n-jobs", "1", "-q", "--no-plots"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_early_stop_option(cache, tmp_path):
    """--early-stop 0 fits the whole grid; --early-stop 1 stops after the first drop, records where, and
    picks the same C as the whole grid whenever the curve has a single peak (digits' curves have one)."""
    full, short = tmp_path / "full", tmp_path / "short"
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(full), *FAST,
                       "--early-stop", "0"]) == 0
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(short), *FAST,
                       "--early-stop", "1"]) == 0
    f = json.loads((full / "metrics.json").read_text())["results"]["fc6"]["svm"]
    s = json.loads((short / "metrics.json").read_text())["results"]["fc6"]["svm"]
    fg = [t for t in f["selection"]["tried"] if t["phase"] == "grid"]
    sg = [t for t in s["selection"]["tried"] if t["phase"] == "grid"]
    assert len(fg) == 9 and f["selection"]["stopped_at"] is None
    assert len(sg) < 9 and s["selection"]["stopped_at"] == sg[-1]["C"] and sg == fg[:len(sg)]
    assert s["C"] == f["C"] and s["test"]["accuracy"] == f["test"]["accuracy"]
    assert any("stopped early" in n for n in s["selection"]["notes"])


def test_missing_cache_is_a_run_error(tmp_path, capsys):
    assert train.main([str(tmp_path / "none.h5"), "--layers", "fc6", *FAST]) == 1
    assert "No cache file" in capsys.readouterr().err


def test_one_class_is_a_clear_run_error(tmp_path, capsys):
    cache = digits_cache(tmp_path / "one.h5", n=50, labels=np.zeros(50, int))
    assert train.main([str(cache), "--layers", "fc6", "--out", str(tmp_path / "run"), *FAST]) == 1
    assert "single class" in capsys.readouterr().err


def test_recorded_split_failed_rows_and_cv_fallback(tmp_path):
    """train/test folders only (no val): C by CV; failed rows left out and counted; a tiny class noted."""
    n = 600
    from sklearn.datasets import load_digits

    y = load_digits().target[:n]
    splits = np.where(np.arange(n) % 4 == 0, "test", "train").astype(object)
    status = np.array(["ok"] * n, dtype=object)
    status[[1, 2, 3]] = "error"
    # digit 9 keeps only 3 train images: fewer than the 5 folds
    nine_train = np.flatnonzero((y == 9) & (splits == "train"))
    splits[nine_train[3:]] = "test"
    cache = digits_cache(tmp_path / "rec.h5", n=n, splits=list(splits), status=list(status))
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc6", "fc7", "--concat", "--clf", "svm", "--out", str(out),
                       "--cv", "5", *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"]["source"] == "recorded" and m["split"]["n_failed"] == 3
    assert m["split"]["failed_examples"][0].endswith("decode failed")
    counts = m["split"]["counts"]
    assert counts["val"] == 0 and counts["train"] + counts["test"] == n - 3
    r = m["results"]["fc6+fc7"]["svm"]
    assert r["selection"]["method"] == "cv" and r["selection"]["n_folds"] == 3
    assert any("digit9 (3)" in note for note in r["selection"]["notes"])
    # most test 9s are missed (3 training images): above chance (0.1) by far, not as high as elsewhere
    assert r["n_features"] == 128 and r["test"]["accuracy"] > 0.6
    assert r["test"]["per_class"]["digit9"]["support"] > 40
    assert r["val"]["n"] == counts["train"]  # out-of-fold predictions of every train image


def test_script_runs_from_a_checkout(cache, tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train_svm.py"), str(cache), "--layers", "fc6",
                        "--clf", "svm", "--out", str(out), *FAST], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == str(out)
    assert 0 <= json.loads((out / "metrics.json").read_text())["results"]["fc6"]["svm"]["test"]["accuracy"] <= 1
