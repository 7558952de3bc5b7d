"""The package's public names: ``cnncodes.extract`` stays the function however often it is used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import pytest

from conftest import REPO


@pytest.mark.slow
def test_cnncodes_extract_stays_callable_after_every_submodule_import(tmp_path):
    """Call ``cnncodes.extract`` twice in a fresh process, importing every cnncodes module in between: the
    second call is a cache hit of the first (no submodule may shadow the function with a module)."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import numpy as np
        from PIL import Image
        import cnncodes

        data = sys.argv[1] + "/data"
        import os
        for cls in ("a", "b"):
            os.makedirs(f"{data}/{cls}")
            for i in range(2):
                Image.fromarray(np.full((40, 48, 3), 60 * i + (cls == "b") * 100, np.uint8)).save(f"{data}/{cls}/{i}.png")
        kw = dict(weights="none", out=sys.argv[1] + "/codes", device="cpu", workers=0)
        first = cnncodes.extract(data, "tiny", ["fc1"], **kw)
        for m in pkgutil.walk_packages(cnncodes.__path__, "cnncodes."):
            importlib.import_module(m.name)
        second = cnncodes.extract(data, "tiny", ["fc1"], **kw)
        assert callable(cnncodes.extract) and cnncodes.extract is cnncodes.extraction.extract
        print(first.hit, second.hit, second.path == first.path)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_library_messages_name_parameters_and_the_cli_names_flags():
    """The library says ``overwrite=True``; the command line that has a flag for it says ``--overwrite``."""
    from cnncodes._cli import usage_message
    from cnncodes.cli_extract import build_parser
    from cnncodes.errors import CacheMismatchError, InvalidParameterError

    err = CacheMismatchError("pass overwrite=True to replace it, use decoder='pil' or device='cpu'; "
                             "error_budget=0.1 is too low; colour=2 is not a parameter here")
    assert usage_message(build_parser(), err) == (
        "pass --overwrite to replace it, use --decoder pil or --device cpu; "
        "--error-budget 0.1 is too low; colour=2 is not a parameter here")
    bad = InvalidParameterError("batch_size", "extract", "must be >= 1. Got 0 instead.")
    assert usage_message(build_parser(), bad) == "argument --batch-size/-b: must be >= 1. Got 0 instead."


def test_a_bug_is_not_a_user_error_and_keeps_its_traceback(capsys):
    """An internal error is no CnnCodesError: run_cli lets it through (with its traceback), exit 1 is for
    the user's mistakes and the environment's failures."""
    import argparse

    from cnncodes._cli import run_cli
    from cnncodes.errors import CacheMismatchError

    def bug(_args):
        raise AssertionError("no output captured for ['fc1']")

    with pytest.raises(AssertionError, match="no output captured"):
        run_cli("x.py", argparse.ArgumentParser(), bug, [])

    def mistake(_args):
        raise CacheMismatchError("holds another spec; pass overwrite=True")

    assert run_cli("x.py", argparse.ArgumentParser(), mistake, []) == 1
    assert capsys.readouterr().err == "x.py: error: holds another spec; pass overwrite=True\n"
