"""Misuse found by benchmarks/misuse_cases.py, each provoked for real (see that script for the whole list)."""

from __future__ import annotations

import subprocess
import sys

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
