"""Misuse found by benchmarks/misuse_cases.py, each provoked for real (see that script for the whole list)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_extract_stays_callable_after_its_module_is_imported(tmp_path):
    # the first call imported the submodule cnncodes.extract, which replaced the function of that name
    # on the package: the second call raised "'module' object is not callable". The extractor is the
    # package cnncodes.extraction now: no submodule shares a public function's name
    code = f"""
import importlib, cnncodes
from cnncodes.errors import InvalidParameterError
for attempt in range(2):
    try:
        cnncodes.extract({str(tmp_path)!r}, "tiny", ["fc1"], batch_size=0)
    except InvalidParameterError as e:
        assert "batch_size" in str(e)
m = importlib.import_module("cnncodes.extraction")
assert cnncodes.extract is m.extract and m.ExtractConfig is not None
try:
    cnncodes.extract({str(tmp_path)!r}, "tiny", ["fc1"], batch_size=0)
except InvalidParameterError:
    print("ok")
"""
    p = _python(code, tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


@pytest.mark.parametrize("argv", [["--c-max", "inf"], ["--c-num", "100000000"], ["--c-min", "nan"],
                                  ["--grid", *["1"] * 1001]])
def test_train_refuses_unbounded_c_grids_before_any_work(tmp_path, capsys, monkeypatch, argv):
    # --c-max inf made a grid of NaN and inf, --c-num 1e8 swept for hours
    import cnncodes.store as store
    from cnncodes.cli_train import main

    monkeypatch.setattr(store, "open_cache", lambda *a, **k: pytest.fail("the cache was opened"))
    rc = main([str(tmp_path / "c.h5"), "--layers", "fc1", "--out", str(tmp_path / "run"), "--no-plots", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and ("C grid must hold 2 to 1000" in err or "--c-num" in err), err
    assert not (tmp_path / "run").exists()


def test_input_size_beyond_4096_exits_2_before_any_work(tmp_path, capsys, flowers_small):
    # --input-size 1000000 reached the model and died in a torch allocation traceback
    from cnncodes.cli_extract import main

    rc = main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "conv2",
               "--input-size", "1000000", "--out", str(tmp_path / "codes")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("extract.py: error: argument --input-size: must be an int in the range [32, 4096] or None. "
                               "Got 1000000 instead.")
    assert not (tmp_path / "codes").exists()


def test_a_failed_torch_allocation_is_a_one_line_run_error(capsys):
    # torch reports a failed CPU allocation as a RuntimeError: it used to end in a traceback
    import torch

    from cnncodes._cli import Parser, run_cli

    def body(_args):
        torch.empty(10**14, dtype=torch.uint8)  # 100 TB: refused by the allocator

    rc = run_cli("extract.py", Parser(prog="extract.py"), body, [])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("extract.py: error: out of memory (") and err.endswith("lower --batch-size (or --input-size)")


def test_other_runtime_errors_keep_their_traceback():
    from cnncodes._cli import Parser, run_cli

    def body(_args):
        raise RuntimeError("an internal bug")

    with pytest.raises(RuntimeError, match="an internal bug"):
        run_cli("extract.py", Parser(prog="extract.py"), body, [])


@pytest.mark.parametrize("out_name,needle", [
    ("preds.xlsx", "must be a file name ending in .csv or .json. Got"),
    ("run/model.skops", "must be a file name ending in .csv or .json. Got"),
    ("run/metrics.json", "must not be a file of the run folder"),
    ("", "must be a path (a non-empty str or os.PathLike)"),
])
def test_predict_out_never_overwrites_the_run_or_writes_csv_under_another_name(tmp_path, capsys, out_name, needle):
    # "--out RUN/model.skops" replaced the model with CSV text (any suffix but .json meant CSV)
    from cnncodes.cli_predict import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.skops").write_bytes(b"PK model")
    (run / "metrics.json").write_text('{"results": {}}')
    out = str(tmp_path / out_name) if out_name else ""
    rc = main([str(run), str(tmp_path / "img.jpg"), "--out", out])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("predict.py: error: argument --out/-o: ")
    assert needle in err, err
    assert (run / "model.skops").read_bytes() == b"PK model" and (run / "metrics.json").read_text() == '{"results": {}}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("flag", ["--out", "--name"])
def test_extract_empty_out_or_name_is_a_usage_error(tmp_path, capsys, monkeypatch, flag):
    # "--out ''" (an unset shell variable) silently wrote to artifacts/codes of the current folder,
    # and "--name ''" silently fell back to the folder's name
    from cnncodes.cli_extract import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "a").mkdir(parents=True)
    rc = main([str(tmp_path / "data"), "--model", "tiny", "--weights", "none", "--layers", "conv2", flag, ""])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"extract.py: error: argument {flag}") and "Got '' instead." in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("layers", [None, [], [""], [7], ""])
def test_load_codes_refuses_layers_that_are_not_names(tmp_path, layers):
    import cnncodes
    from cnncodes.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="'layers' parameter of load_codes must be a non-empty str or a list"):
        cnncodes.load_codes(tmp_path / "c.h5", layers)


def test_train_run_takes_one_layer_and_one_classifier_as_strings(tmp_path, flowers_small):
    # train_run(cache, "fc1") iterated the string: layers "f", "c", "1"
    import json

    from cnncodes.classify import train_run
    from cnncodes.extraction import extract

    cache = extract(flowers_small, "tiny", ["fc1"], weights="none", out=tmp_path / "codes", progress=False).path
    res = train_run(cache, "fc1", classifiers="softmax", out=tmp_path / "run", plots=False, n_jobs=1)
    results = json.loads((res.run_dir / "metrics.json").read_text())["results"]
    assert list(results) == ["fc1"] and list(results["fc1"]) == ["softmax"]


def test_split_folders_beside_class_folders_are_refused_not_read_as_classes(tmp_path):
    # DATA/train/<class>/..., DATA/test/<class>/... and DATA/tulip/...: every image under train/
    # was labelled "train" (the layout fell back to class folders)
    from conftest import FLOWERS, link_subset

    from cnncodes.errors import DatasetError
    from cnncodes.images import scan_folder

    link_subset(FLOWERS, tmp_path / "train", 2, ["daisy", "rose"])
    link_subset(FLOWERS, tmp_path / "test", 1, ["daisy", "rose"], offset=2)
    link_subset(FLOWERS, tmp_path, 2, ["tulip"])
    with pytest.raises(DatasetError, match=r"mixes split folders \(test, train\) with other folders \(tulip\)"):
        scan_folder(tmp_path)
    (tmp_path / "tulip").rename(tmp_path / "train" / "tulip")  # the layout it meant
    m = scan_folder(tmp_path)
    assert m.class_names == ("daisy", "rose", "tulip")
    assert {(r.relpath.split("/")[0], r.class_name, r.split) for r in m.rows} == {
        ("train", "daisy", "train"), ("train", "rose", "train"), ("train", "tulip", "train"),
        ("test", "daisy", "test"), ("test", "rose", "test")}
