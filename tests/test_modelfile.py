"""Tests of cnncodes.modelfile: model files that never execute code when loaded.

The attacks are real: each crafted file runs its payload (creates a marker file) when
loaded the naive way, which each test shows first; cnncodes then refuses the same file
and the marker never appears.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from cnncodes import classify as C
from cnncodes import modelfile as M
from cnncodes.errors import ModelFileError, UsageError
from cnncodes.fileio import sha256_bytes, sha256_of_file

from conftest import REPO
META = {"classifier": "svm", "layers": ["fc7"], "class_names": [str(i) for i in range(10)]}


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears only if the pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Planted:
    """Building this from a skops file (``__setstate__``) writes the marker file it names."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).write_text("executed")


def plant(model_path: Path, data: bytes) -> None:
    """Put ``data`` at ``model_path`` with a sidecar whose sha256 matches, as whoever replaces both would."""
    side = M.sidecar_path(model_path)
    meta = json.loads(side.read_text()) if side.is_file() else dict(META)
    meta.update(model_file=model_path.name, sha256=sha256_bytes(data))
    model_path.write_bytes(data)
    side.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@pytest.fixture
def saved(tmp_path, digits):
    pipe = C.make_pipeline("sqrt", "svm", 1.0).fit(*digits)
    path = tmp_path / "models" / "fc7__svm.skops"
    M.save_model(pipe, path, META)
    return pipe, path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("norm", C.NORMALISERS)
@pytest.mark.parametrize("clf", C.CLASSIFIERS)
def test_every_pipeline_cnncodes_writes_round_trips(tmp_path, digits, norm, clf):
    X, y = digits[0][:300], digits[1][:300]
    with threadpool_limits(1):  # unnormalised softmax at tol 1e-6 took minutes with 2 threads on 2 busy cores
        pipe = C.make_pipeline(norm, clf, 0.5, max_iter=200).fit(X, y)
    path = tmp_path / "m.skops"
    side = M.save_model(pipe, path, META)
    model, meta = M.load_model(path)
    np.testing.assert_array_equal(model.predict(X), pipe.predict(X))
    np.testing.assert_array_equal(model.decision_function(X), pipe.decision_function(X))  # bitwise
    assert meta == side and meta["sha256"] == sha256_of_file(path) and meta["format"] == "skops"
    assert meta["schema"] == M.MODEL_SCHEMA and meta["versions"]["skops"] and meta["layers"] == ["fc7"]
    assert zipfile.is_zipfile(path) and M.untrusted_types(path) == []


def test_save_model_refuses_a_model_it_would_not_load(tmp_path, digits):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    pipe = Pipeline([("norm", C.make_normaliser("l2")), ("clf", KNeighborsClassifier(3))]).fit(*digits)
    with pytest.raises(ModelFileError, match=r"sklearn\.neighbors\._classification\.KNeighborsClassifier"):
        M.save_model(pipe, tmp_path / "knn.skops", META)
    with pytest.raises(UsageError, match=r"must end in \.skops"):
        M.save_model(C.make_pipeline("l2", "svm").fit(*digits), tmp_path / "m.joblib", META)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- crafted skops files


def test_skops_file_with_a_planted_class_is_refused_unexecuted(saved, tmp_path):
    skio = pytest.importorskip("skops.io")
    pipe, path = saved
    marker = tmp_path / "EXECUTED"
    pipe.steps[0] = ("norm", Planted(str(marker)))
    evil = skio.dumps(pipe)
    # the naive way (trust whatever get_untrusted_types lists) builds the class: the payload is live
    # (skops' own list lacks cnncodes' CodesLinearSVC too; cnncodes' allow-list has it)
    assert set(skio.get_untrusted_types(data=evil)) - {"cnncodes.classify.CodesLinearSVC"} == {"test_modelfile.Planted"}
    skio.loads(evil, trusted=skio.get_untrusted_types(data=evil))
    assert marker.read_text() == "executed"
    marker.unlink()
    plant(path, evil)
    with pytest.raises(ModelFileError, match=r"never writes: test_modelfile\.Planted\. It is not loaded"):
        M.load_model(path)
    assert not marker.exists()


def _edit_schema(data: bytes, edit) -> bytes:
    """The skops file ``data`` with ``edit(schema)`` applied to its schema.json, other members unchanged."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in src.namelist():
            body = src.read(name)
            if name == "schema.json":
                schema = json.loads(body)
                edit(schema)
                body = json.dumps(schema).encode()
            z.writestr(name, body)
    return out.getvalue()


def test_skops_file_naming_builtins_eval_is_refused(saved):
    skio = pytest.importorskip("skops.io")
    _, path = saved

    def eval_for_sqrt(node):  # the FunctionTransformer's func: cnncodes.classify.signed_sqrt -> builtins.eval
        if isinstance(node, dict):
            if node.get("__loader__") == "FunctionNode":
                node.update(__module__="builtins", __class__="eval")
            for v in node.values():
                eval_for_sqrt(v)
        elif isinstance(node, list):
            for v in node:
                eval_for_sqrt(v)

    evil = _edit_schema(path.read_bytes(), eval_for_sqrt)
    naive = skio.loads(evil, trusted=skio.get_untrusted_types(data=evil))
    assert naive.steps[0][1].steps[0][1].func is eval  # what the file would have put into the pipeline
    plant(path, evil)
    with pytest.raises(ModelFileError, match=r"never writes: builtins\.eval\. It is not loaded"):
        M.load_model(path)


def test_a_type_that_skops_trusts_by_default_is_still_refused(tmp_path, digits):
    """skops trusts every sklearn estimator by default; cnncodes trusts the six it writes."""
    skio = pytest.importorskip("skops.io")
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline

    data = skio.dumps(Pipeline([("norm", C.make_normaliser("l2")), ("clf", KNeighborsClassifier(3))]).fit(*digits))
    assert skio.get_untrusted_types(data=data) == []  # skops.io.load would build it without being asked
    path = tmp_path / "knn.skops"
    plant(path, data)
    with pytest.raises(ModelFileError, match=r"KNeighborsClassifier"):
        M.load_model(path)


def test_an_allowed_type_in_another_role_is_refused(saved):
    _, path = saved

    def pipeline_as_function(node):
        if isinstance(node, dict):
            if node.get("__loader__") == "FunctionNode":
                node.update(__module__="sklearn.pipeline", __class__="Pipeline")
            for v in node.values():
                pipeline_as_function(v)
        elif isinstance(node, list):
            for v in node:
                pipeline_as_function(v)

    plant(path, _edit_schema(path.read_bytes(), pipeline_as_function))
    with pytest.raises(ModelFileError, match=r"sklearn\.pipeline\.Pipeline \(as FunctionNode\)"):
        M.load_model(path)


# --------------------------------------------------------------------------- pickles of older runs


def test_pickle_model_is_refused_unless_trusted(saved, tmp_path, digits):
    import joblib

    pipe, _ = saved
    old = tmp_path / "old" / "fc7__svm.joblib"
    old.parent.mkdir()
    joblib.dump(pipe, old)
    plant(old, old.read_bytes())
    with pytest.raises(ModelFileError, match=r"is a pickle.*train_svm.*pass trust_pickle=True"):
        M.load_model(old)
    model, meta = M.load_model(old, trust_pickle=True)
    np.testing.assert_array_equal(model.decision_function(digits[0]), pipe.decision_function(digits[0]))
    # trusted or not, the sha256 is still checked
    old.write_bytes(old.read_bytes()[:-8])
    with pytest.raises(ModelFileError, match="does not match its sidecar"):
        M.load_model(old, trust_pickle=True)


def test_planted_pickle_with_a_matching_sidecar_does_not_run(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "EXECUTED"
    evil = pickle.dumps(Payload(str(marker)))
    old = path.with_suffix(".joblib")
    plant(old, evil)  # sidecar rewritten to the evil file's sha256: integrity says nothing about intent
    with pytest.raises(ModelFileError, match="is a pickle"):
        M.load_model(old)
    plant(path, evil)  # the same pickle under the skops name
    with pytest.raises(ModelFileError, match="not a skops model file"):
        M.load_model(path)
    assert not marker.exists()
    plant(old, evil)  # (x.joblib and x.skops share the sidecar x.json)
    with pytest.raises(ModelFileError, match="not a fitted model"):
        M.load_model(old, trust_pickle=True)  # what trusting a stranger's pickle does
    assert marker.exists()


def test_find_model_in_runs_old_and_new(saved, tmp_path):
    _, path = saved
    run = path.parent.parent
    assert M.find_model(run) == path and M.find_model(run, "fc7__svm.skops") == path
    (run / "models" / "fc6__svm.joblib").write_bytes(b"x")
    (run / "models" / "fc7__svm.joblib").write_bytes(b"x")  # a skops file wins over a pickle of its name
    assert M.find_model(run, "fc7__svm") == path
    assert M.find_model(run, "fc6__svm") == run / "models" / "fc6__svm.joblib"
    with pytest.raises(UsageError, match="It has: fc6__svm, fc7__svm"):
        M.find_model(run, "fc8__svm")
    (run / "metrics.json").write_text(json.dumps({"best": {"model": "../elsewhere/fc7__svm.skops"}}))
    with pytest.raises(UsageError, match="not one of its models"):
        M.find_model(run)
    (run / "metrics.json").write_text(json.dumps({"best": {"model": "models/fc6__svm.joblib"}}))
    assert M.find_model(run) == run / "models" / "fc6__svm.joblib"
    (run / "model.joblib").write_bytes(b"x")
    assert M.find_model(run) == run / "model.joblib"


def _call_args(text: str, start: int) -> str:
    """The argument text of a call whose ``(`` ends just before ``start`` (up to its matching ``)``)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_no_other_unpickling_in_cnncodes():
    """The one place that unpickles is modelfile._unpickle (trust_pickle); weights use weights_only=True,
    arrays allow_pickle=False."""
    found = []
    for f in sorted((REPO / "cnncodes").glob("*.py")):
        text = f.read_text()
        for m in re.finditer(r"(joblib\.load|pickle\.loads?|np\.load|numpy\.load|torch\.load|skops\.io\.load)\(",
                             text):
            call, args = m.group(1), _call_args(text, m.end())
            safe = (call == "torch.load" and "weights_only=True" in args) or (
                call in ("np.load", "numpy.load") and "allow_pickle=False" in args)
            if not safe:
                found.append(f"{f.name}: {call}({args})")
    assert found == ["modelfile.py: joblib.load(path)"], found


@pytest.mark.slow  # a fresh interpreter importing sklearn and skops: ~6 s here
def test_saving_and_loading_a_model_does_not_import_torch(tmp_path):
    """skops imports torch through sklearn's all_estimators() walk unless modelfile hides it."""
    code = (
        "import sys, numpy as np\n"
        "from cnncodes import classify as C\n"
        "X = np.abs(np.random.default_rng(0).normal(size=(40, 6))).astype(np.float32); y = np.arange(40) % 2\n"
        f"C.save_model(C.make_pipeline('sqrt', 'softmax').fit(X, y), {str(tmp_path / 'm.skops')!r}, {{}})\n"
        f"m, _ = C.load_model({str(tmp_path / 'm.skops')!r})\n"
        "assert (m.predict(X) == y).mean() > 0.5\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- torch weights


def _bits(t):
    return t.contiguous().view(-1).view(__import__("torch").uint8)


def test_torch_state_round_trip_is_bitwise(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    w[0, 0] = float("nan")
    sd = {
        "fc.weight": w,
        "head.weight": w,  # tied: the same tensor under two names
        "fc.weight_t": w.t(),  # not contiguous, and shares w's memory
        "fc.bias": torch.randn(5, generator=g).half(),
        "emb": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
        "mask": torch.tensor([True, False, True]),
    }
    meta = {"spec": {"backbone": "tiny", "layers": ["fc1"]}, "classes": ["a", "b"], "lr": 1e-3}
    info = M.save_torch_state(tmp_path / "w.safetensors", sd, meta)
    got, got_meta = M.load_torch_state(tmp_path / "w.safetensors")
    assert list(got) == list(sd) and got_meta == meta and info["n_tensors"] == len(sd)
    assert info["sha256"] == sha256_of_file(tmp_path / "w.safetensors")
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(_bits(got[k]), _bits(v)), k
    raw = (tmp_path / "w.safetensors").read_bytes()  # safetensors: u64 header length, JSON header, raw bytes
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"]["cnncodes"])["meta"] == meta and set(header) == {"__metadata__", *sd}


def test_torch_state_refuses_bad_input(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(UsageError, match="'step' maps to a int"):
        M.save_torch_state(tmp_path / "w.safetensors", {"w": torch.zeros(2), "step": 3})
    assert not (tmp_path / "w.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        M.load_torch_state(tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="No weights file"):
        M.load_torch_state(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")  # from elsewhere: no cnncodes header
    sd, meta = M.load_torch_state(tmp_path / "plain.safetensors")
    assert meta == {} and torch.equal(sd["w"], torch.ones(2))
