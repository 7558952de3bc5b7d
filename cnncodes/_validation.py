"""Declarative checks of public arguments, in the style of scikit-learn's ``_parameter_constraints``.

A function lists, for each parameter, the constraints one of which its value must satisfy;
:func:`validate_params` checks them all before any work and raises
:class:`~cnncodes.errors.InvalidParameterError` (a ``UsageError``) with scikit-learn's message::

    The 'batch_size' parameter of extract must be an int in the range [1, inf). Got 0 instead.

The error keeps the parameter's name apart from the requirement, so that a command line can
say the same with its flag name (``cnncodes._cli.run_cli`` does): library messages never name
CLI flags. Modelled on ``sklearn/utils/_param_validation.py`` (Interval, StrOptions, None,
types, "boolean"), without its decorator and array-likes. Unlike scikit-learn, ``bool`` is not
an int here: ``batch_size=True`` is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from numbers import Integral, Real

from .errors import InvalidParameterError

__all__ = ["Interval", "StrOptions", "PathLike", "NonEmptyStr", "SequenceOf", "validate_params"]


class Interval:
    """Numbers of ``type`` (``Integral`` or ``Real``) between ``left`` and ``right`` (None: unbounded).

    ``closed`` is ``"left"``, ``"right"``, ``"both"`` or ``"neither"``. NaN and bools never satisfy it.
    """

    def __init__(self, type, left, right, *, closed: str):
        if type not in (Integral, Real) or closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"bad Interval({type}, closed={closed!r})")
        self.type, self.left, self.right, self.closed = type, left, right, closed

    def is_satisfied_by(self, val) -> bool:
        if isinstance(val, bool) or not isinstance(val, self.type):
            return False
        if math.isnan(val):
            return False
        if self.left is not None and (val < self.left or (val == self.left and self.closed in ("right", "neither"))):
            return False
        return not (self.right is not None
                    and (val > self.right or (val == self.right and self.closed in ("left", "neither"))))

    def __str__(self) -> str:
        kind = "an int" if self.type is Integral else "a float"
        left = "-inf" if self.left is None else (self.left if self.type is Integral else float(self.left))
        right = "inf" if self.right is None else (self.right if self.type is Integral else float(self.right))
        lb = "[" if self.closed in ("left", "both") else "("
        rb = "]" if self.closed in ("right", "both") else ")"
        return f"{kind} in the range {lb}{left}, {right}{rb}"


class StrOptions:
    """One of a fixed set of strings (listed in the given order in messages)."""

    def __init__(self, options):
        self.options = tuple(options)

    def is_satisfied_by(self, val) -> bool:
        return isinstance(val, str) and val in self.options

    def __str__(self) -> str:
        return f"a str among {{{', '.join(repr(o) for o in self.options)}}}"


class PathLike:
    """A non-empty ``str`` or an ``os.PathLike``."""

    def is_satisfied_by(self, val) -> bool:
        return (isinstance(val, str) and val != "") or isinstance(val, os.PathLike)

    def __str__(self) -> str:
        return "a path (a non-empty str or os.PathLike)"


class NonEmptyStr:
    """A ``str`` that is not empty (an unset shell variable passed as ``--name "$X"`` must not vanish)."""

    def is_satisfied_by(self, val) -> bool:
        return isinstance(val, str) and val != ""

    def __str__(self) -> str:
        return "a non-empty str"


class SequenceOf:
    """A list or tuple whose items all satisfy ``item`` (a constraint or a type); ``min_len`` items at least."""

    def __init__(self, item, *, min_len: int = 0):
        self.item, self.min_len = _make(item), min_len

    def is_satisfied_by(self, val) -> bool:
        return (isinstance(val, (list, tuple)) and len(val) >= self.min_len
                and all(self.item.is_satisfied_by(v) for v in val))

    def __str__(self) -> str:
        least = f" of at least {self.min_len}" if self.min_len else ""
        return f"a list{least} of {self.item}"


class _InstancesOf:
    def __init__(self, type_):
        self.type = type_

    def is_satisfied_by(self, val) -> bool:
        return isinstance(val, self.type)

    def __str__(self) -> str:
        return f"an instance of {self.type.__name__!r}"


class _NoneConstraint:
    def is_satisfied_by(self, val) -> bool:
        return val is None

    def __str__(self) -> str:
        return "None"


class _Booleans:
    def is_satisfied_by(self, val) -> bool:
        return isinstance(val, bool)

    def __str__(self) -> str:
        return "an instance of 'bool'"


def _make(constraint):
    if constraint is None:
        return _NoneConstraint()
    if constraint == "boolean":
        return _Booleans()
    if isinstance(constraint, type):
        return _InstancesOf(constraint)
    if hasattr(constraint, "is_satisfied_by"):
        return constraint
    raise ValueError(f"unknown constraint {constraint!r}")


def validate_params(params: Mapping[str, object], constraints: Mapping[str, list], caller: str) -> None:
    """Check every value of ``params`` against its list of ``constraints`` (any one must hold).

    Parameters without constraints are not checked.

    Raises
    ------
    InvalidParameterError
        For the first parameter (in ``params``' order) that satisfies none of its constraints.
    """
    for name, val in params.items():
        if name not in constraints:
            continue
        options = [_make(c) for c in constraints[name]]
        if any(c.is_satisfied_by(val) for c in options):
            continue
        text = str(options[0]) if len(options) == 1 else (
            f"{', '.join(str(c) for c in options[:-1])} or {options[-1]}")
        raise InvalidParameterError(name, caller, f"must be {text}. Got {val!r} instead.")
