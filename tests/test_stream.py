"""Classifiers on codes larger than memory (``train_svm.py --stream``, :mod:`cnncodes.stream`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from cnncodes import classify as C
from cnncodes.cli_train import main as train_main
from cnncodes.errors import UsageError
from cnncodes.store import LayerRecord, fingerprint_of, load_codes, write_cache
from conftest import SPEC, digits_cache

REPO = Path(__file__).resolve().parents[1]


def test_streamed_run_equals_the_in_memory_run(tmp_path):
    """The streamed fit minimises the in-memory objectives: same C search, same val/test predictions, and the
    saved model's coefficients equal to LinearSVC / LogisticRegression refit on train+val by scikit-learn."""
    cache = digits_cache(tmp_path / "digits.h5")
    kw = dict(classifiers=["svm", "softmax"], plots=False, n_jobs=1)
    mem = C.train_run(cache, ["fc7"], out=tmp_path / "memory", stream=False, **kw)
    st = C.train_run(cache, ["fc7"], out=tmp_path / "stream", stream=True, stream_options={"chunk_rows": 300, "tol": 1e-8},
                     **kw)

    codes = load_codes(cache, "fc7")
    X, y = normalize(codes.X).astype(np.float64), codes.labels
    sp = C.make_split(y, codes.splits, codes.status, class_names=codes.class_names, paths=codes.paths,
                      messages=codes.messages, val_fraction=0.15, test_fraction=0.2, seed=0)
    trval = np.sort(np.concatenate([sp.train, sp.val]))
    for clf in ("svm", "softmax"):
        m, s = mem.metrics["results"]["fc7"][clf], st.metrics["results"]["fc7"][clf]
        assert s["C"] == m["C"] and s["val"]["accuracy"] == m["val"]["accuracy"]
        assert s["test"]["accuracy"] == m["test"]["accuracy"]
        assert s["converged"] and s["selection"]["method"] == "val"
        ref = (LinearSVC(C=s["C"], dual=False, tol=1e-8, max_iter=100_000) if clf == "svm"
               else LogisticRegression(C=s["C"], tol=1e-10, max_iter=100_000)).fit(X[trval], y[trval])
        pipe, meta = C.load_model(st.run_dir / s["model"])
        est = pipe[-1]
        scale = np.abs(ref.coef_).max()
        assert np.abs(est.coef_ - ref.coef_).max() <= 1e-3 * scale
        assert np.abs(est.intercept_ - ref.intercept_).max() <= 1e-3 * scale
        assert np.array_equal(pipe.predict(codes.X), ref.predict(X))
        assert meta["stream"] is True and meta["C"] == s["C"]


def test_stream_options_are_checked_before_any_work(tmp_path, capsys):
    cache = digits_cache(tmp_path / "digits.h5")
    for bad, match in (([("chunk_rows", 8)], "must be a mapping such as"),
                       ({"epochs": 3}, "'stream_options' parameter of train_run may hold chunk_rows, tol; got 'epochs'"),
                       ({"tol": 0}, "'tol' parameter of train_run must be a float > 0"),
                       ({"chunk_rows": 1}, "'chunk_rows' parameter of train_run must be an int >= 2")):
        with pytest.raises(UsageError, match=match):
            C.train_run(cache, ["fc7"], out=tmp_path / "bad", stream=False, stream_options=bad, plots=False)
    assert not (tmp_path / "bad").exists()
    assert train_main([str(cache), "--layers", "fc7", "--out", str(tmp_path / "r"), "--stream", "--epochs", "3"]) == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


def test_streamed_models_predict_from_raw_codes_like_their_run(tmp_path):
    cache = digits_cache(tmp_path / "digits.h5")
    res = C.train_run(cache, ["fc6", "fc7"], classifiers=["svm", "softmax"], grid=[1.0, 100.0], out=tmp_path / "run",
                      plots=False, stream=True, stream_options={"chunk_rows": 512})
    codes = load_codes(cache, ["fc6"])
    for clf in ("svm", "softmax"):
        pipe, meta = C.load_model(res.run_dir / "models" / f"fc6__{clf}{C.MODEL_SUFFIX}")
        with open(res.run_dir / "predictions" / f"fc6__{clf}.csv") as f:
            rows = list(csv.DictReader(f))
        idx = {p: i for i, p in enumerate(codes.paths)}
        X = codes.X[[idx[r["path"]] for r in rows]]
        assert [codes.class_names[p] for p in pipe.predict(X)] == [r["pred"] for r in rows]
    best, _ = C.load_model(res.run_dir / C.BEST_MODEL)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    b = m["best"]
    best_codes = load_codes(cache, b["layers"].split("+"))
    assert set(best.predict(best_codes.X)) <= set(range(10))
    assert m["settings"]["stream"] is True and "streamed" in m["notes"][-1]


def test_stream_switches_on_above_the_memory_budget(tmp_path, monkeypatch, caplog):
    cache = digits_cache(tmp_path / "digits.h5")
    monkeypatch.setenv("CNNCODES_MEMORY_BUDGET", "1e5")  # 1797 x 64 x 4 x 3 bytes = 1.4e6 > 1e5
    with caplog.at_level("WARNING"):
        res = C.train_run(cache, ["fc7"], classifiers=["svm"], grid=[1.0, 10.0], out=tmp_path / "run", plots=False,
                          stream=None, max_iter=50)
    assert res.metrics["settings"].get("stream") is True
    assert any("training streamed" in r.getMessage() for r in caplog.records)


def test_memory_budget_parameter_overrides_the_environment(tmp_path, monkeypatch):
    cache = digits_cache(tmp_path / "digits.h5")
    monkeypatch.setenv("CNNCODES_MEMORY_BUDGET", "1e5")
    kw = dict(classifiers=["svm"], grid=[1.0, 10.0], plots=False, stream=None, max_iter=50)
    res = C.train_run(cache, ["fc7"], out=tmp_path / "big", memory_budget=1e12, **kw)  # 1.4e6 bytes fit
    assert res.metrics["settings"].get("stream") is None
    monkeypatch.delenv("CNNCODES_MEMORY_BUDGET")
    res = C.train_run(cache, ["fc7"], out=tmp_path / "small", memory_budget=1e5, **kw)
    assert res.metrics["settings"].get("stream") is True
    with pytest.raises(UsageError, match="'memory_budget' parameter of train_run must be a number of bytes > 0"):
        C.train_run(cache, ["fc7"], out=tmp_path / "bad", memory_budget=0, **kw)
    with pytest.raises(UsageError, match="'memory_budget' parameter"):  # also where the run would not stream
        C.train_run(cache, ["fc7"], out=tmp_path / "bad", memory_budget=-1, **dict(kw, stream=False))
    assert not (tmp_path / "bad").exists()


def test_memory_budget_flag_is_named_on_the_command_line(tmp_path, capsys):
    cache = digits_cache(tmp_path / "digits.h5")
    assert train_main([str(cache), "--layers", "fc7", "--out", str(tmp_path / "r"), "--memory-budget", "-1"]) == 2
    assert "argument --memory-budget: must be a number of bytes > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- memory does not grow with N

_CHILD = """
import sys
from cnncodes.classify import train_run
train_run(sys.argv[1], ["fc7"], classifiers=["svm"], grid=[1.0, 10.0], out=sys.argv[2], plots=False,
          stream=sys.argv[3] == "1", stream_options={"chunk_rows": 1024} if sys.argv[3] == "1" else None, max_iter=5,
          n_jobs=1)
"""


def _synthetic(path: Path, n: int, dim: int = 1024, k: int = 10) -> Path:
    rng = np.random.default_rng(0)
    y = np.sort(rng.integers(0, k, n))
    centres = rng.random((k, dim)).astype(np.float32)

    def blocks():
        for s in range(0, n, 4096):
            yy = y[s:s + 4096]
            yield np.maximum(centres[yy] + rng.normal(0, 0.5, (len(yy), dim)).astype(np.float32), 0)

    rows = {"paths": np.array([f"c{y[i]}/{i:07d}.png" for i in range(n)]), "labels": y,
            "split": np.array([""] * n), "status": np.array(["ok"] * n), "message": np.array([""] * n),
            "file_size": np.zeros(n, np.int64), "file_mtime_ns": np.zeros(n, np.int64)}
    rec = LayerRecord("fc7", "fc7", "classifier.5", "relu", "avg", dim, (), fingerprint_of({"k": "fc7"}))
    write_cache(path, spec=SPEC, fingerprint=fingerprint_of(SPEC), manifest_hash="m" * 64, dataset_root="/s",
                class_names=[f"c{i}" for i in range(k)], rows=rows, layers={"fc7": (rec, blocks())})
    return path


def _peak_rss_mb(cache: Path, out: Path, stream: bool) -> float:
    code = ("import resource, subprocess, sys\n"
            f"r = subprocess.run([sys.executable, '-c', {_CHILD!r}, {str(cache)!r}, {str(out)!r}, "
            f"{('1' if stream else '0')!r}])\n"
            "assert r.returncode == 0\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_the_rows(tmp_path):
    small = _synthetic(tmp_path / "small.h5", 2000)
    big = _synthetic(tmp_path / "big.h5", 20000)  # 20000 x 1024 float32 = 82 MB per copy in memory
    s_small = _peak_rss_mb(small, tmp_path / "r1", True)
    s_big = _peak_rss_mb(big, tmp_path / "r2", True)
    m_big = _peak_rss_mb(big, tmp_path / "r3", False)
    # The goal: 10x the rows for <= 1.2x the memory. The row table is kept compact and the
    # predictions CSV written by blocks (cnncodes/stream_rows.py), so only a few bytes a row remain:
    assert s_big <= 1.2 * s_small, (s_small, s_big)
    assert m_big > s_big + 100, (s_big, m_big)  # the in-memory path grows by the codes (82 MB per copy)


def test_spilled_rows_read_back_what_the_cache_holds_and_are_deleted(tmp_path):
    from cnncodes.store import open_cache
    from cnncodes.stream_read import ChunkReader, SpilledRows

    cache = digits_cache(tmp_path / "digits.h5")
    rows = np.sort(np.random.default_rng(0).choice(1797, 700, replace=False))
    t = np.arange(1797) % 7
    with open_cache(cache) as snap:
        reader = ChunkReader(snap, ["fc6", "fc7"], "standard")
        reader.fit(rows, 128)
        with SpilledRows(reader, rows, tmp_path / "spill.tmp", 128) as sp:
            got = list(sp.chunks(reader.normalise, t)())
            assert (tmp_path / "spill.tmp").stat().st_size == 700 * sp.dim * sp.dtype.itemsize
            with pytest.raises(FileExistsError):  # never over a file that is not its own
                SpilledRows(reader, rows, tmp_path / "spill.tmp", 128)
        assert not (tmp_path / "spill.tmp").exists()
    codes = load_codes(cache, ["fc6", "fc7"])
    X = codes.X[rows].astype(np.float64)  # fc6 and fc7 side by side, as the reader reads them
    assert X.shape[1] == sp.dim
    mean, std = X.mean(axis=0), X.std(axis=0)
    expect = (X - mean) / np.where(std == 0, 1, std)
    assert [len(x) for x, _ in got] == [128] * 5 + [60]
    assert np.allclose(np.concatenate([x for x, _ in got]), expect, atol=1e-4)
    assert np.array_equal(np.concatenate([tt for _, tt in got]), t[rows])


def test_model_files_of_earlier_sgd_streamed_runs_still_load(tmp_path):
    """Streamed runs wrote SGDClassifier pipelines before they fitted LinearSVC / LogisticRegression exactly."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer

    X, y = load_digits(return_X_y=True)
    for loss in ("hinge", "log_loss"):
        pipe = Pipeline([("norm", Normalizer()), ("clf", SGDClassifier(loss=loss, average=True, random_state=0))])
        pipe.fit(X, y)
        C.save_model(pipe, tmp_path / f"{loss}{C.MODEL_SUFFIX}", {"classifier": loss, "stream": True})
        back, meta = C.load_model(tmp_path / f"{loss}{C.MODEL_SUFFIX}")
        assert np.array_equal(back.predict(X), pipe.predict(X)) and meta["stream"] is True


def test_a_full_disk_while_spilling_is_a_clear_error_and_leaves_no_file(tmp_path, monkeypatch):
    import builtins
    import errno

    from cnncodes.errors import ScratchSpaceError
    from cnncodes.store import open_cache
    from cnncodes.stream_read import ChunkReader, SpilledRows

    cache = digits_cache(tmp_path / "digits.h5")
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k:
                        Full(real_open(p, mode, *a, **k)) if str(p).endswith("spill.tmp") else real_open(p, mode, *a, **k))
    with open_cache(cache) as snap:
        with pytest.raises(ScratchSpaceError, match=r"spill.tmp \(about 0.00 GB\); writing it failed: .*No space left"):
            SpilledRows(ChunkReader(snap, ["fc7"], "l2"), np.arange(100), tmp_path / "spill.tmp", 32)
    assert not (tmp_path / "spill.tmp").exists()


def test_streaming_without_a_val_split_is_refused_before_any_pass(tmp_path, capsys):
    cache = digits_cache(tmp_path / "digits.h5")
    with pytest.raises(UsageError, match="chooses C on a val split, and this split has none"):
        C.train_run(cache, ["fc7"], out=tmp_path / "run", stream=True, val_fraction=0, plots=False)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.*"))
    assert train_main([str(cache), "--layers", "fc7", "--out", str(tmp_path / "run"), "--stream",
                       "--val-fraction", "0"]) == 2
    assert "draw one (e.g. --val-fraction 0.15)" in capsys.readouterr().err
