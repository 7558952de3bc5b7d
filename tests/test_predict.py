"""Tests of cnncodes.predict and scripts/predict.py.

Most tests replace the extractor (which imports torch) by a stand-in that returns the
cached codes of the named images, so they check the prediction side alone; the last
test runs the real extractor end to end with the tiny test backbone.
"""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from cnncodes import cli_predict as predict_script  # what scripts/predict.py runs
from cnncodes import predict as P
from cnncodes.classify import load_model, train_run
from cnncodes.errors import CacheMismatchError, ModelFileError, UsageError
from cnncodes.store import load_codes

from conftest import FLOWERS, digits_cache, link_subset

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with fc6/fc7 x svm/softmax on digits codes, and an image folder standing for the test rows."""
    root = tmp_path_factory.mktemp("pred")
    cache = digits_cache(root / "digits.h5", n=600)
    run = train_run(cache, ["fc6", "fc7"], classifiers=["svm", "softmax"], out=root / "run", n_jobs=1, plots=False,
                    grid=np.logspace(-3, 5, 9)).run_dir
    codes = load_codes(cache, ["fc6", "fc7"])
    images = root / "images"
    for p in codes.paths[:60]:
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        (images / p).write_bytes(b"not really a png")
    return {"cache": cache, "run": run, "codes": codes, "images": images}


def _fake_extract(monkeypatch, codes, images: Path, *, swap_layers: bool = False, calls: list | None = None):
    """Put a stand-in for cnncodes.extraction in sys.modules: codes looked up by the image's relative path."""
    index = {p: i for i, p in enumerate(codes.paths)}

    def extract_images(paths, *, spec, layer_keys, device="auto", batch_size=64, max_pixels=None):
        if calls is not None:
            calls.append({"paths": list(paths), "layer_keys": list(layer_keys), "spec": spec,
                          "max_pixels": max_pixels})
        n = len(paths)
        status = np.array(["ok"] * n, dtype=object)
        messages = np.array([""] * n, dtype=object)
        rows = []
        for j, p in enumerate(paths):
            rel = Path(p).relative_to(images).as_posix()
            if rel not in index:
                status[j], messages[j] = "error", f"{p}: not an image (Pillow cannot identify the format)"
                rows.append(-1)
            else:
                rows.append(index[rel])
        out, recs = {}, {}
        for k in layer_keys:
            src = {"fc6": "fc7", "fc7": "fc6"}[k] if swap_layers else k
            X = load_codes(codes.path, [src]).X
            out[k] = np.stack([X[i] if i >= 0 else np.full(X.shape[1], np.nan, np.float32) for i in rows])
            recs[k] = codes.records[src]
        return {"codes": out, "status": status.astype(str), "messages": messages.astype(str), "records": recs,
                "spec": spec, "fingerprint": codes.fingerprint}

    fake = types.ModuleType("cnncodes.extraction")
    fake.extract_images = extract_images
    fake.keep_big_blocks_in_heap = lambda: False  # the CLI's process setting, called before predict
    monkeypatch.setitem(sys.modules, "cnncodes.extraction", fake)


# --------------------------------------------------------------------------- helpers


def test_expand_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.JPG", "a/b/y.png", "a/notes.txt", "a/.hidden.png", "z.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    got = P.expand_paths([tmp_path / "a", tmp_path / "z.jpeg", tmp_path / "a" / "x.JPG"])
    assert got == [str(tmp_path / "a" / "b" / "y.png"), str(tmp_path / "a" / "x.JPG"), str(tmp_path / "z.jpeg")]
    with pytest.raises(UsageError, match="No such image file or folder"):
        P.expand_paths([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no image file"):
        P.expand_paths([tmp_path / "empty"])
    with pytest.raises(UsageError):
        P.expand_paths([])


def test_write_predictions_csv_and_json(tmp_path):
    rows = [{"path": "a.jpg", "label": "rose", "score": 0.75, "status": "ok", "message": ""},
            {"path": "b,c.jpg", "label": "", "score": None, "status": "error", "message": "truncated"}]
    P.write_predictions(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [list(r.values()) for r in got] == [["a.jpg", "rose", "0.75", "ok", ""],
                                              ["b,c.jpg", "", "", "error", "truncated"]]
    assert list(got[0]) == ["path", "label", "score", "status", "message"]
    P.write_predictions(rows, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text()) == rows
    with pytest.raises(UsageError):
        P.write_predictions(rows, tmp_path)


# --------------------------------------------------------------------------- predict with a stand-in extractor


def test_predict_reproduces_training_time_predictions(trained, monkeypatch):
    calls = []
    _fake_extract(monkeypatch, trained["codes"], trained["images"], calls=calls)
    for name in ("fc7__svm", "fc6__softmax"):
        rows = P.predict(trained["run"], [trained["images"]], model=name, device="cpu")
        model, meta = load_model(trained["run"] / "models" / f"{name}.skops")
        assert calls[-1]["spec"] == meta["spec"] and calls[-1]["layer_keys"] == meta["layers"]
        with open(trained["run"] / "predictions" / f"{name}.csv", newline="") as f:
            at_training = {r["path"]: r for r in csv.DictReader(f)}
        assert len(rows) == 60
        for r in rows:
            rel = Path(r["path"]).relative_to(trained["images"]).as_posix()
            assert r["status"] == "ok" and r["label"] == at_training[rel]["pred"]
            assert r["score"] == pytest.approx(float(at_training[rel]["score"]), rel=1e-5)


def test_default_model_is_the_best_by_val_accuracy(trained, monkeypatch):
    calls = []
    _fake_extract(monkeypatch, trained["codes"], trained["images"], calls=calls)
    m = json.loads((trained["run"] / "metrics.json").read_text())
    best = max(((k, c) for k, d in m["results"].items() for c in d),
               key=lambda kc: m["results"][kc[0]][kc[1]]["val"]["accuracy"])
    P.predict(trained["run"], [trained["images"]])
    assert calls[-1]["layer_keys"] == [m["best"]["layers"]]
    assert m["results"][best[0]][best[1]]["val"]["accuracy"] == m["best"]["val_accuracy"]


def test_failed_images_get_an_empty_label_and_a_message(trained, monkeypatch):
    _fake_extract(monkeypatch, trained["codes"], trained["images"])
    broken = trained["images"] / "broken.png"
    broken.write_bytes(b"")
    try:
        rows = P.predict(trained["run"], [broken, trained["images"] / trained["codes"].paths[0]], model="fc7__svm")
    finally:
        broken.unlink()
    assert rows[0]["status"] == "error" and rows[0]["label"] == "" and rows[0]["score"] is None
    assert "not an image" in rows[0]["message"]
    assert rows[1]["status"] == "ok" and rows[1]["label"].startswith("digit")


def test_codes_of_another_layer_are_refused(trained, monkeypatch):
    _fake_extract(monkeypatch, trained["codes"], trained["images"], swap_layers=True)
    with pytest.raises(CacheMismatchError, match=r"layer\[fc7\]\.alias.*'fc7' \(model\) vs 'fc6' \(codes\)"):
        P.predict(trained["run"], [trained["images"]], model="fc7__svm")


def test_tampered_model_is_refused_before_extraction(trained, monkeypatch, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    calls = []
    _fake_extract(monkeypatch, trained["codes"], trained["images"], calls=calls)
    f = run / "models" / "fc7__svm.skops"
    data = bytearray(f.read_bytes())
    data[-20] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="does not match its sidecar"):
        P.predict(run, [trained["images"]], model="fc7__svm")
    assert calls == []


def _as_old_run(run: Path) -> None:
    """Turn a run folder into one of an older cnncodes: joblib pickles, sidecars naming them."""
    import joblib

    from cnncodes.fileio import sha256_of_file

    for f in sorted(run.glob("models/*.skops")) + [run / "model.skops"]:
        model, meta = load_model(f)
        old = f.with_suffix(".joblib")
        joblib.dump(model, old)
        meta.update(model_file=old.name, sha256=sha256_of_file(old), schema="cnncodes.model/1")
        if "copy_of" in meta:
            meta["copy_of"] = meta["copy_of"].replace(".skops", ".joblib")
        f.with_suffix(".json").write_text(json.dumps(meta))
        f.unlink()
    m = json.loads((run / "metrics.json").read_text())
    m["best"]["model"] = m["best"]["model"].replace(".skops", ".joblib")
    (run / "metrics.json").write_text(json.dumps(m))


def test_planted_pickle_in_a_run_folder_does_not_run(trained, monkeypatch, tmp_path, capsys):
    """Someone sends a run folder whose model.joblib runs code when unpickled, its sidecar rewritten to the
    matching sha256: predict refuses it before any extraction, the code never runs, the CLI exits 1."""
    import shutil

    from test_modelfile import Payload, plant

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    _as_old_run(run)
    marker = tmp_path / "EXECUTED"
    plant(run / "model.joblib", __import__("pickle").dumps(Payload(str(marker))))
    calls = []
    _fake_extract(monkeypatch, trained["codes"], trained["images"], calls=calls)
    with pytest.raises(ModelFileError, match=r"is a pickle.*train_svm.*pass trust_pickle=True"):
        P.predict(run, [trained["images"]])
    assert predict_script.main([str(run), str(trained["images"]), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err
    assert "is a pickle" in err and "Traceback" not in err and not (tmp_path / "p.csv").exists()
    assert "pass --trust-pickle" in err and "trust_pickle" not in err  # the flag, not the parameter
    assert not marker.exists() and calls == []
    # the payload is live: trusting the stranger's pickle runs it
    assert predict_script.main([str(run), str(trained["images"]), "--trust-pickle"]) == 1
    assert marker.exists() and "not a fitted model" in capsys.readouterr().err


def test_trust_pickle_predicts_with_an_old_run(trained, monkeypatch, tmp_path):
    """An older run (joblib pickles) predicts as the skops run did, with --trust-pickle and only with it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    _as_old_run(run)
    _fake_extract(monkeypatch, trained["codes"], trained["images"])
    want = P.predict(trained["run"], [trained["images"]])
    assert predict_script.main([str(run), str(trained["images"]), "--out", str(tmp_path / "p.json")]) == 1
    assert predict_script.main([str(run), str(trained["images"]), "--out", str(tmp_path / "p.json"),
                                "--trust-pickle"]) == 0
    assert json.loads((tmp_path / "p.json").read_text()) == want
    assert P.predict(run, [trained["images"]], model="fc6__svm", trust_pickle=True) == P.predict(
        trained["run"], [trained["images"]], model="fc6__svm")


def test_unknown_model_name_lists_the_known_ones(trained):
    with pytest.raises(UsageError, match="fc6__softmax, fc6__svm, fc7__softmax, fc7__svm"):
        P.predict(trained["run"], [trained["images"]], model="fc8__svm")


# --------------------------------------------------------------------------- the script


def test_script_writes_path_label_score_rows(trained, monkeypatch, tmp_path, capsys):
    _fake_extract(monkeypatch, trained["codes"], trained["images"])
    out = tmp_path / "pred.csv"
    rc = predict_script.main([str(trained["run"]), str(trained["images"]), "--out", str(out), "--model", "fc6__svm"])
    assert rc == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 60 and list(rows[0])[:3] == ["path", "label", "score"]
    truth = {p: trained["codes"].class_names[y] for p, y in zip(trained["codes"].paths, trained["codes"].labels)}
    acc = np.mean([r["label"] == truth[Path(r["path"]).relative_to(trained["images"]).as_posix()] for r in rows])
    assert acc > 0.9  # these are mostly training images of a good model
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)


@pytest.mark.parametrize("extra,code,needle", [
    (["--model", "nope"], 2, "has no model 'nope'"),
    (["--batch-size", "x"], 2, "invalid int value"),
])
def test_script_usage_errors(trained, capsys, extra, code, needle):
    assert predict_script.main([str(trained["run"]), str(trained["images"]), *extra]) == code
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_script_missing_image_and_missing_sidecar(trained, tmp_path, capsys):
    assert predict_script.main([str(trained["run"]), str(tmp_path / "nope.jpg")]) == 2
    assert "No such image" in capsys.readouterr().err
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "models" / "fc7__svm.json").unlink()
    assert predict_script.main([str(run), str(trained["images"]), "--model", "fc7__svm"]) == 1
    err = capsys.readouterr().err
    assert "no sidecar" in err and "Traceback" not in err


# --------------------------------------------------------------------------- end to end, real extractor


def test_end_to_end_with_the_real_extractor(tmp_path):
    """Extract real photos with the tiny backbone, train, predict the same photos: same labels as at training."""
    import cnncodes.extraction as extract_mod  # an import error fails this test, never skips it

    data = link_subset(FLOWERS, tmp_path / "flowers", 8, ["daisy", "rose", "tulip"])
    entry = extract_mod.extract(data, "tiny", ["fc1"], weights="none", out=tmp_path / "codes", device="cpu",
                                workers=0, batch_size=8)
    run = train_run(entry.path, ["fc1"], classifiers=["softmax"], out=tmp_path / "run", n_jobs=1, plots=False,
                    val_fraction=0, test_fraction=0.25, cv=3).run_dir
    rows = P.predict(run, [data], device="cpu", batch_size=5)
    with open(run / "predictions" / "fc1__softmax.csv", newline="") as f:
        at_training = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        rel = Path(r["path"]).relative_to(data).as_posix()
        assert r["label"] == at_training[rel]["pred"]
        assert r["score"] == pytest.approx(float(at_training[rel]["score"]), rel=1e-4, abs=1e-6)
