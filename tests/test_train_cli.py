"""Tests of scripts/train_svm.py: main([...]) on synthetic caches of real codes (sklearn's digits)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnncodes import cli_train as train  # what scripts/train_svm.py runs
from cnncodes.classify import load_model
from cnncodes.store import load_codes

from conftest import REPO, digits_cache

FAST = ["--n-jobs", "1", "--c-min", "1e-3", "--c-max", "1e5", "--c-num", "9", "--no-plots", "-q"]


pytestmark = pytest.mark.usefixtures("one_blas_thread")


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
            assert cs == sorted(cs) and {10.0 ** e for e in range(-4, 5, 2)} <= set(cs)  # the default initial grid
            tried = r["selection"]["tried"]
            assert {t["C"] for t in tried} == {p["C"] for p in r["c_curve"] if p["evaluated"]}
            assert r["C"] == max(tried, key=lambda t: (t["score"], -t["C"]))["C"] and r["selection"]["stop_reason"]
            assert r["selection"]["method"] == "val" and r["converged"] is True
            assert (out / r["model"]).is_file() and (out / r["model"]).with_suffix(".json").is_file()
    # the best model by val accuracy, at the top of the run folder
    assert (out / "model.skops").read_bytes() == (out / m["best"]["model"]).read_bytes()
    assert load_model(out / "model.skops")[1]["copy_of"] == m["best"]["model"]
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
    assert list(m["results"]) == ["fc7"] and not (out / "models" / "fc6__svm.skops").exists()
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
    (["--layers", "fc6", "--cv", "1", "--val-fraction", "0"], "argument --cv: must be an int >= 2"),
    (["--layers", "fc6", "--early-stop", "-1"], "error: --early-stop must be an int >= 0"),
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


def test_widen_and_refine_options(cache, tmp_path):
    """--refine 2 adds half and quarter decades around the best; --no-widen --refine 0 keeps to the grid
    (here 1e-3..1e-1, below the digits' best C: the best is then flagged at the grid's upper end)."""
    fine, narrow = tmp_path / "fine", tmp_path / "narrow"
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(fine), *FAST, "--refine", "2"]) == 0
    r = json.loads((fine / "metrics.json").read_text())["results"]["fc6"]["svm"]
    phases = [t["phase"] for t in r["selection"]["tried"]]
    assert phases.count("refine1") == 2 and phases.count("refine2") == 2
    small = [*FAST[:2], "--c-min", "1e-3", "--c-max", "1e-1", "--c-num", "3", *FAST[8:]]
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(narrow), *small,
                       "--no-widen", "--refine", "0"]) == 0
    m = json.loads((narrow / "metrics.json").read_text())
    r = m["results"]["fc6"]["svm"]
    assert [t["C"] for t in r["selection"]["tried"]] == [1e-3, 1e-2, 1e-1] and r["C"] == 1e-1 and r["c_at_edge"]
    assert m["settings"]["widen"] is False and m["settings"]["refine"] == 0


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


# --------------------------------------------------------------------------- run folders: who owns them


def _tree(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_overwrite_never_deletes_a_folder_cnncodes_did_not_write(cache, tmp_path, capsys):
    """--out ~/thesis --overwrite used to replace the user's folder with the run."""
    thesis = tmp_path / "thesis"
    (thesis / "chapter1").mkdir(parents=True)
    (thesis / "chapter1" / "draft.tex").write_text("months of work")
    (thesis / "metrics.json").write_text("{}")  # looks like a run, is not one: no marker
    before = _tree(thesis)
    rc = train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(thesis), "--overwrite", *FAST])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "not a cnncodes run folder" in err and ".cnncodes-run.json" in err and len(err.splitlines()) == 1
    assert _tree(thesis) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no lock, no staging left beside it


def test_run_folder_carries_its_marker_and_only_it_is_replaced(cache, tmp_path):
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc6", "--clf", "svm", "--out", str(out), *FAST]) == 0
    marker = json.loads((out / ".cnncodes-run.json").read_text())
    assert marker["format"] == "cnncodes.run/1" and marker["cache"] == str(cache.resolve())
    assert marker["settings"]["layer_sets"] == ["fc6"] and marker["settings"]["classifiers"] == ["svm"]
    (out / ".cnncodes-run.json").unlink()  # no longer provably ours: refused
    assert train.main([str(cache), "--layers", "fc7", "--clf", "svm", "--out", str(out), "--overwrite", *FAST]) == 2
    assert list(json.loads((out / "metrics.json").read_text())["results"]) == ["fc6"]


@pytest.mark.parametrize("where,needle", [
    ("cwd", "is the current folder"), ("empty_cwd", "is the current folder"),
    ("parent_of_cwd", "is the current folder or a folder above it"), ("root", "is the root of the file system"),
    ("home", "is your home folder"), ("file", "is a file, not a folder"),
    ("cache_folder", "is the folder of the cache"), ("marked_cache_folder", "is the folder of the cache"),
    ("cache_parent", "is the folder of the cache or a folder above it"), ("cache_file", "is the cache file itself"),
])
def test_protected_out_paths_are_refused_without_traceback(cache, tmp_path, capsys, monkeypatch, where, needle):
    """Never deleted, even with --overwrite and even when empty or holding a run marker."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "keep.txt").write_text("keep")
    (work / "empty").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work / ("empty" if where == "empty_cwd" else "sub"))
    codes_dir = tmp_path / "codes" / "deep"
    codes_dir.mkdir(parents=True)
    local = codes_dir / "c.h5"
    local.write_bytes(cache.read_bytes())
    (codes_dir.parent / "keep.txt").write_text("keep")
    if where == "marked_cache_folder":
        (codes_dir / ".cnncodes-run.json").write_text('{"format": "cnncodes.run/1"}')
    out = {"cwd": ".", "empty_cwd": ".", "parent_of_cwd": "..", "root": "/", "home": str(home),
           "file": str(work / "sub" / "keep.txt"), "cache_folder": str(codes_dir),
           "marked_cache_folder": str(codes_dir), "cache_parent": str(codes_dir.parent),
           "cache_file": str(local)}[where]
    before = _tree(tmp_path)
    rc = train.main([str(local), "--layers", "fc6", "--clf", "svm", "--out", out, "--overwrite", *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err
    assert _tree(tmp_path) == before and (work / "empty").is_dir()


def _run_script(cache: Path, argv: list[str], patch: str, cwd: Path) -> subprocess.Popen:
    code = (
        "import sys\n"
        "import cnncodes.classify as C, cnncodes.runfolder as R\n"
        f"{patch}\n"
        "from cnncodes import cli_train\n"
        "sys.exit(cli_train.main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, str(cache), *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# make_split waits until every file in WAIT exists (after touching its own START): both processes
# then hold their run folders at the same time
_BARRIER = """
import pathlib, time
_orig = C._run.make_split  # where train_run looks it up
def _held(*a, **k):
    pathlib.Path({start!r}).touch()
    t = time.time()
    while not all(pathlib.Path(w).exists() for w in {wait!r}) and time.time() - t < 120:
        time.sleep(0.05)
    return _orig(*a, **k)
C._run.make_split = _held
"""


@pytest.mark.slow
def test_two_runs_with_the_same_default_name_get_two_folders(cache, tmp_path):
    """Default names used to be per second: two runs started together replaced each other and both
    reported success. Here both get the very same default name (clock frozen) and run at once."""
    runs = tmp_path / "runs"
    freeze = "R.run_stamp = lambda: '20000101-000000-000'\n"
    procs = []
    for me, other in (("a", "b"), ("b", "a")):
        patch = freeze + _BARRIER.format(start=str(tmp_path / me), wait=[str(tmp_path / me), str(tmp_path / other)])
        procs.append(_run_script(cache, ["--layers", "fc6", "--clf", "svm", "--runs-root", str(runs), *FAST],
                                 patch, tmp_path))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    dirs = sorted(Path(o[0].strip().splitlines()[-1]) for o in outs)
    assert dirs[0] != dirs[1] and dirs[1].name == dirs[0].name + "-2"
    assert sorted(p.name for p in runs.iterdir()) == [d.name for d in dirs]  # nothing else left (locks, staging)
    for d in dirs:
        assert json.loads((d / "metrics.json").read_text())["results"]["fc6"]["svm"]["test"]["accuracy"] > 0.85
        assert load_model(d / "model.skops")[1]["layers"] == ["fc6"]


@pytest.mark.slow
def test_second_writer_to_the_same_out_is_refused_at_once(cache, tmp_path, capsys):
    out = tmp_path / "run"
    go = tmp_path / "go"
    first = _run_script(cache, ["--layers", "fc6", "--clf", "svm", "--out", str(out), "--overwrite", *FAST],
                        _BARRIER.format(start=str(tmp_path / "started"), wait=[str(go)]), tmp_path)
    try:
        t0 = time.time()
        while not (tmp_path / "started").exists():
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        t0 = time.time()
        rc = train.main([str(cache), "--layers", "fc7", "--clf", "svm", "--out", str(out), "--overwrite", *FAST])
        assert time.time() - t0 < 5  # refused at once, not after training
        err = capsys.readouterr().err.strip()
        assert rc == 1 and "is being written by pid" in err and str(first.pid) in err
    finally:
        go.touch()
    assert first.wait(timeout=300) == 0, first.communicate()
    assert list(json.loads((out / "metrics.json").read_text())["results"]) == ["fc6"]  # the first run, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "run", "started"]


def test_default_names_are_unique_and_name_the_settings(cache, tmp_path, monkeypatch):
    from cnncodes import runfolder

    monkeypatch.setattr(runfolder, "run_stamp", lambda: "20000101-000000-000")
    runs = tmp_path / "runs"
    dirs = [_train_default(cache, runs, "svm"), _train_default(cache, runs, "svm"),
            _train_default(cache, runs, "softmax")]
    assert dirs[1].name == dirs[0].name + "-2"  # same settings, same instant: never the same folder
    assert dirs[0].name.startswith("digits__alexnet__fc6__20000101-000000-000__")
    assert dirs[2].name.split("__")[-1] != dirs[0].name.split("__")[-1]  # other settings, other hash
    assert sorted(p.name for p in runs.iterdir()) == sorted(d.name for d in dirs)


def _train_default(cache: Path, runs: Path, clf: str) -> Path:
    from cnncodes.classify import train_run

    return train_run(cache, ["fc6"], classifiers=[clf], n_jobs=1, plots=False, runs_root=runs,
                     grid=np.logspace(-3, 5, 9)).run_dir


@pytest.mark.parametrize("argv,needle,api", [
    (["--max-iter", "0"], "argument --max-iter: must be an int >= 1. Got 0 instead.",
     ({"max_iter": 0}, "The 'max_iter' parameter of train_run must be an int >= 1. Got 0 instead.")),
    (["--max-iter", "-5"], "argument --max-iter: must be an int >= 1. Got -5 instead.", None),
    (["--n-jobs", "0"], "argument --n-jobs: must be None or an int other than 0",
     ({"n_jobs": 0}, "The 'n_jobs' parameter of train_run must be None or an int other than 0")),
    (["--seed", "-1"], "argument --seed: must be an int in the range [0, 2**32 - 1]. Got -1",
     ({"seed": -1}, "The 'seed' parameter of train_run must be an int in the range [0, 2**32 - 1]. Got -1")),
    (["--cv", "0"], "argument --cv: must be an int >= 2. Got 0 instead.",
     ({"cv": 0}, "The 'cv' parameter of train_run must be an int >= 2. Got 0 instead.")),
])
def test_bad_training_options_exit_2_before_any_work(cache, tmp_path, capsys, monkeypatch, argv, needle, api):
    """The command line names its flag; the library, for the same mistake, names its parameter."""
    import cnncodes.store as store
    from cnncodes.classify import train_run
    from cnncodes.errors import UsageError

    monkeypatch.setattr(store, "open_cache", lambda *a, **k: pytest.fail("the cache was opened"))
    rc = train.main([str(cache), "--layers", "fc6", "--out", str(tmp_path / "run"), "--no-plots", "-q",
                     "--n-jobs", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    if api is not None:
        kwargs, message = api
        with pytest.raises(UsageError) as e:
            train_run(cache, ["fc6"], out=tmp_path / "run", plots=False, **kwargs)
        assert message in str(e.value) and "--" not in str(e.value)


# --------------------------------------------------------------------------- honest splits on real images


def _extract_tiny(root: Path, out: Path) -> Path:
    from cnncodes.extraction import extract

    return extract(root, "tiny", ["fc1"], weights="none", out=out, device="cpu", workers=0, batch_size=16,
                   dtype="float32").path


@pytest.mark.slow
def test_class_missing_from_the_test_folder_is_said_loudly(tmp_path):
    """Real photos, train/ and test/ folders, no rose in test/: the run still trains, and says so on
    stderr, in the printed summary and in metrics.json."""
    from conftest import FLOWERS, link_subset

    root = tmp_path / "data"
    link_subset(FLOWERS, root / "train", 6, ["daisy", "rose"])
    link_subset(FLOWERS, root / "test", 4, ["daisy"], offset=6)
    cache = _extract_tiny(root, tmp_path / "codes")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train_svm.py"), str(cache), "--layers", "fc1",
                        "--clf", "svm", "--cv", "3", "--out", str(out), *FAST], cwd=tmp_path, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    want = ("class rose (6 usable images) has no image in the test split: it is not tested (the test accuracy and "
            "balanced accuracy leave it out)")
    m = json.loads((out / "metrics.json").read_text())
    assert m["warnings"] == [want] and m["split"]["warnings"] == [want]
    assert want in p.stderr  # with -q too: a warning
    assert f"WARNING: {want}" in p.stdout.splitlines()
    assert m["results"]["fc1"]["svm"]["test"]["per_class"]["rose"]["support"] == 0


@pytest.mark.slow
def test_train_and_val_folders_without_test_train(tmp_path):
    """hymenoptera ships train/ and val/ only: it used to be refused ("recorded test split is empty")."""
    from conftest import HYMENOPTERA, link_subset, need

    root = tmp_path / "hym"
    link_subset(need(HYMENOPTERA) / "train", root / "train", 10)
    link_subset(HYMENOPTERA / "val", root / "val", 6)
    cache = _extract_tiny(root, tmp_path / "codes")
    out = tmp_path / "run"
    assert train.main([str(cache), "--layers", "fc1", "--clf", "svm", "softmax", "--val-fraction", "0.2",
                       "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"]["counts"] == {"train": 16, "val": 4, "test": 12}
    assert m["split"]["roles"]["test"] == "recorded val" and m["split"]["seed"] == 0
    assert "recorded val split (12 images) is used as the test split" in m["notes"][0] and m["warnings"] == []
    codes = load_codes(cache, "fc1")
    recorded_val = sorted(codes.paths[codes.splits == "val"])
    with open(out / "predictions" / "fc1__svm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows if r["split"] == "test") == recorded_val
    for clf in ("svm", "softmax"):
        r = m["results"]["fc1"][clf]
        assert r["selection"]["method"] == "val" and r["val"]["n"] == 4 and r["test"]["n"] == 12
        assert r["val"]["per_class"]["ants"]["support"] == 2 == r["val"]["per_class"]["bees"]["support"]
