"""The package's public names: ``cnncodes.extract`` stays the function however often it is used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
    named = CacheMismatchError("The 'max_pixels' parameter of extract is too low; the 'colour' parameter is "
                               "unknown; draft=False decodes at full size")
    assert usage_message(build_parser(), named) == (
        "--max-pixels is too low; the 'colour' parameter is unknown; --no-draft decodes at full size")


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


def _message_texts(tree):
    """``(line, text)`` of every string in a ``raise X(...)`` or a ``log.*``/``warnings.warn`` call."""
    import ast

    def strings(node):
        inner = set()
        for n in ast.walk(node):
            if isinstance(n, ast.JoinedStr):  # an f-string as one text, its fields as {}
                inner.update(id(v) for v in n.values)
                yield n.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in inner:
                yield n.lineno, n.value

    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            yield from strings(node.exc)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical", "warn")):
            yield from strings(node)


def test_library_messages_name_no_command_line_flags():
    """Errors, warnings and log lines of the library name parameters (``overwrite=True``); only the command
    lines (``cli_*.py``, ``_cli.py``, the demo) speak in flags. Shell commands of other tools in backticks
    (`ray start --head`) are not cnncodes flags."""
    import ast
    import re

    import cnncodes

    flag = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    root = Path(cnncodes.__file__).parent
    found, n_texts = [], 0
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("cli_") or path.name in ("_cli.py", "demo.py"):
            continue
        for line, text in _message_texts(ast.parse(path.read_text(), str(path))):
            n_texts += 1
            for m in flag.finditer(re.sub(r"`[^`]*`", "", text)):
                found.append(f"{path.relative_to(root)}:{line}: {m.group(0)} in {text!r}")
    assert n_texts > 300  # the walk does see the library's messages
    assert found == []
