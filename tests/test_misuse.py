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
