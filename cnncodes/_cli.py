"""What the command-line wrappers share: one-line usage errors and one exit-code policy.

Exit status: 0 ok, 1 run error (``CnnCodesError``, ``OSError``), 2 usage error
(``UsageError`` or bad arguments), 130 interrupted. No traceback for any of them; any other
exception is a bug and goes through with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Callable, Sequence

from .errors import CnnCodesError, InvalidParameterError, UsageError


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (exit 2 through :func:`run_cli`)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


#: A parameter setting in a library message: ``overwrite=True``, ``decoder='pil'``, ``device='cpu'``.
_SETTING = re.compile(r"\b([a-z][a-z0-9_]*)=(True|'[^']*'|[-\w.]+)")


#: A parameter named in a library message: ``The 'batch_size' parameter of extract``, ``the 'out' parameter``.
_PARAM = re.compile(r"\b[Tt]he '([a-z][a-z0-9_]*)' parameter(?: of [a-z_]+)?")


def _flag(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action
    return None


def _long(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def usage_message(parser: argparse.ArgumentParser, error: Exception) -> str:
    """``error``'s message in the command line's words.

    The library names parameters, never flags: ``The 'batch_size' parameter of extract must be ...``,
    ``pass overwrite=True``, ``use decoder='pil'``. A command-line user typed ``--batch-size/-b``,
    ``--overwrite``, ``--decoder pil``; ``The 'freeze_to' parameter`` becomes ``--freeze-to`` and
    ``plots=False`` becomes ``--no-plots``. This is the one place where parameter names become flag names;
    settings of parameters this command has no flag for stay as they are.
    """
    def to_flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        action = _flag(parser, name)
        negated = _flag(parser, f"no_{name}")  # "plots=False" is --no-plots
        if value == "False" and negated is not None and negated.nargs == 0:
            return _long(negated)
        if action is None:
            return m.group(0)
        if action.nargs == 0:  # store_true: "overwrite=True" is the bare flag
            return _long(action)
        return f"{_long(action)} {value.strip(chr(39))}"

    def to_name(m: re.Match) -> str:
        action = _flag(parser, m.group(1)) or _flag(parser, f"no_{m.group(1)}")
        return m.group(0) if action is None else _long(action)

    def in_flags(text: str) -> str:
        return _PARAM.sub(to_name, _SETTING.sub(to_flag, text))

    if isinstance(error, InvalidParameterError):
        for action in parser._actions:
            if action.dest == error.param:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                # a requirement may name other parameters' settings ("with views='center'")
                return f"argument {name}: {in_flags(error.requirement)}"
        return str(error)
    return in_flags(str(error))


def run_cli(prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
            argv: Sequence[str] | None, *, interrupted: str = "interrupted") -> int:
    """Parse ``argv``, set up logging (``--quiet``), run ``body(args)`` and map errors to exit codes."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return body(args)
    except UsageError as e:
        print(f"{prog}: error: {usage_message(parser, e)}", file=sys.stderr)
        return 2
    except (CnnCodesError, OSError) as e:
        print(f"{prog}: error: {usage_message(parser, e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        if not _is_out_of_memory(e):
            raise  # a genuine internal bug: its traceback is wanted
        print(f"{prog}: error: out of memory ({_first_line(e)}); lower --batch-size (or --input-size)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def _is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, or torch's (a RuntimeError on CPU)."""
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]
