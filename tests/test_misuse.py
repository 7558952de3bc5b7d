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
    # the first call imports the submodule cnncodes.extract, which used to replace the function
    # of that name on the package: the second call raised "'module' object is not callable"
    code = f"""
import importlib, cnncodes
from cnncodes.errors import InvalidParameterError
for attempt in range(2):
    try:
        cnncodes.extract({str(tmp_path)!r}, "tiny", ["fc1"], batch_size=0)
    except InvalidParameterError as e:
        assert "batch_size" in str(e)
m = importlib.import_module("cnncodes.extract")
assert cnncodes.extract is m and m.ExtractConfig is not None
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
