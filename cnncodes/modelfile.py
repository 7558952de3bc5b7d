"""Model files that never execute code when loaded: scikit-learn pipelines in skops, torch weights in safetensors.

A run folder is something people send each other. A pickle (``joblib``) model in it runs
any code its author chose as soon as it is loaded, and a sha256 sidecar next to it does
not help: whoever can replace one file can replace both. So cnncodes writes

* fitted pipelines with :func:`skops.io.dumps` (a zip of JSON and ``.npy`` arrays), and
  loads them only after checking *every* type named in the file against the few that
  cnncodes itself writes (:func:`trusted_types`): the Pipeline, the normalisers (with
  :func:`cnncodes.classify.signed_sqrt`), LinearSVC (and cnncodes' CodesLinearSVC) /
  LogisticRegression, builtin containers and numpy arrays and scalars. Not skops' own default list (every sklearn
  estimator) and never "whatever :func:`skops.io.get_untrusted_types` returns";
* network weights with safetensors (:func:`save_torch_state` / :func:`load_torch_state`):
  tensors and a JSON header, nothing to execute.

The JSON sidecar next to a model (``models/x.skops -> models/x.json``) carries the
provenance (the extraction spec of the codes the model was trained on, cache,
classifier, C...) and the sha256 of the model file. That sha256 is an *integrity* check
(a truncated copy, a flipped bit), not a security one: the type check above is.

Old runs hold ``.joblib`` pickles. They are refused with the command that retrains them,
unless the caller says the file is their own (``trust_pickle=True``,
``scripts/predict.py --trust-pickle``).

This module imports neither torch nor skops at import time (``classify`` imports it and
must stay torch-free): skops and safetensors are imported inside the functions.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import os
import platform
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .errors import ModelFileError, UsageError
from .fileio import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_of_file
from ._provenance import _jsonable

__all__ = [
    "MODEL_SUFFIX",
    "PICKLE_SUFFIXES",
    "BEST_MODEL",
    "MODEL_SCHEMA",
    "TORCH_STATE_SCHEMA",
    "sidecar_path",
    "trusted_types",
    "untrusted_types",
    "save_model",
    "load_model",
    "find_model",
    "copy_model",
    "save_torch_state",
    "load_torch_state",
]

MODEL_SUFFIX = ".skops"
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")  # formats of older runs: loaded only when trusted
BEST_MODEL = "model" + MODEL_SUFFIX  # the best model of a run (by val accuracy), at the top of the run folder
MODEL_SCHEMA = "cnncodes.model/2"  # /1: joblib pickles; /2: skops
TORCH_STATE_SCHEMA = "cnncodes.torch_state/1"
_TORCH_META_KEY = "cnncodes"
RETRAIN = "train_svm (train_run) on the run's cache and layers, into a new run folder"


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``models/x.skops -> models/x.json``."""
    return Path(model_path).with_suffix(".json")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    import sklearn
    import skops

    from . import __version__

    return {"cnncodes": __version__, "sklearn": sklearn.__version__, "skops": skops.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _dump_json(obj: Mapping) -> str:
    return json.dumps(_jsonable(dict(obj)), indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------- the allow-list


def _type_name(t) -> str:
    return f"{t.__module__}.{t.__qualname__}"


@functools.lru_cache(maxsize=1)
def trusted_types() -> dict[str, frozenset[str]]:
    """The types a cnncodes model file may name, by skops loader: what cnncodes writes, nothing else.

    Class names come from the installed classes (``sklearn.svm._classes.LinearSVC``), so a
    file written where scikit-learn kept a class elsewhere is refused, naming the type.
    ``JsonNode`` values are parsed with :func:`json.loads` whatever type they claim.
    """
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
    from sklearn.svm import LinearSVC

    estimators = frozenset(_type_name(t) for t in (Pipeline, Normalizer, StandardScaler, FunctionTransformer,
                                                   LinearSVC, LogisticRegression,
                                                   SGDClassifier))  # earlier streamed runs (see LossNode)
    # what make_classifier("svm") returns (LinearSVC, dual decided at fit), by the name cnncodes.classify pins
    # for it, as for signed_sqrt below: named, not imported, so that model files need not import classify
    estimators |= {"cnncodes.classify.CodesLinearSVC"}
    numbers = frozenset(_type_name(np.dtype(c).type) for c in "?bBhHiIlLqQefd")
    builtins = frozenset(f"builtins.{n}" for n in ("str", "int", "float", "bool", "NoneType"))
    containers = frozenset(f"builtins.{n}" for n in ("dict", "list", "tuple"))
    return {
        "ObjectNode": estimators,
        "FunctionNode": frozenset({"cnncodes.classify.signed_sqrt"}),
        # the loss objects of SGDClassifier, which streamed runs wrote before they fitted LinearSVC /
        # LogisticRegression exactly (hinge for svm, log_loss for softmax): their model files still load
        "LossNode": frozenset(_type_name(SGDClassifier.loss_functions[loss][0]) for loss in ("hinge", "log_loss")),
        "DictNode": frozenset({"builtins.dict"}),
        "ListNode": frozenset({"builtins.list"}),
        "TupleNode": frozenset({"builtins.tuple"}),
        "JsonNode": builtins,
        "TypeNode": builtins - {"builtins.NoneType"},  # the key types of a dict
        "NdArrayNode": frozenset({"numpy.ndarray"}) | numbers,
        # a second reference to an object already loaded: any type allowed elsewhere
        "CachedNode": estimators | builtins | containers | numbers | {"numpy.ndarray"},
    }


def _named_types(schema: Any) -> Iterator[tuple[str, str]]:
    """Every ``(loader, module.class)`` that a skops ``schema.json`` names, at any depth.

    Every dict with a ``__class__`` or ``__loader__`` key counts, also where skops would
    not look: stricter than needed, never looser.
    """
    stack = [schema]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if "__class__" in o or "__loader__" in o:
                yield str(o.get("__loader__")), f"{o.get('__module__')}.{o.get('__class__')}"
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)


def _read_schema(source: str | os.PathLike | bytes) -> dict:
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as z:
            schema = json.loads(z.read("schema.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ModelFileError(f"not a skops model file ({type(e).__name__}: {e})") from e
    if not isinstance(schema, dict):
        raise ModelFileError("not a skops model file (schema.json is not a JSON object)")
    return schema


def untrusted_types(source: str | os.PathLike | bytes) -> list[str]:
    """The types named in a skops file (path or bytes) that cnncodes does not write, sorted.

    Each is ``"module.Class"``, with `` (as <loader>)`` when the type is allowed but
    not in that role (a Pipeline given as a function, say). Nothing is imported or built.

    Raises
    ------
    ModelFileError
        Not a skops file (no zip, no ``schema.json``, not JSON).
    """
    allowed = trusted_types()
    bad = set()
    for loader, name in _named_types(_read_schema(source)):
        if name not in allowed.get(loader, ()):
            known = any(name in v for v in allowed.values())
            bad.add(f"{name} (as {loader})" if known else name)
    return sorted(bad)


@functools.lru_cache(maxsize=1)
def _skops_io():
    """``skops.io``, imported without torch.

    skops builds its default list of trusted types with sklearn's ``all_estimators()``,
    which walks every sklearn package with :func:`pkgutil.walk_packages` and so imports
    ``sklearn.externals.array_api_compat.torch``, i.e. torch: 5.3 s instead of 1.3 s here
    (benchmarks/bench_model_files.py, best of 3), and training would import torch. cnncodes
    does not use that list, so torch is hidden from this thread while skops loads
    (walk_packages skips packages that fail with ImportError); nothing else changes.
    """
    if "torch" in sys.modules:
        import skops.io

        return skops.io
    me = threading.get_ident()

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if threading.get_ident() == me and (name == "torch" or name.startswith("torch.")):
                raise ModuleNotFoundError(f"cnncodes hides torch while skops.io loads ({name})", name=name)
            return None

    finder = _NoTorch()
    sys.meta_path.insert(0, finder)
    try:
        import skops.io
    finally:
        sys.meta_path.remove(finder)
    return skops.io


# --------------------------------------------------------------------------- sklearn models


def save_model(pipe, path: str | os.PathLike, meta: Mapping[str, Any]) -> dict:
    """Write a fitted pipeline atomically in skops format, then its JSON sidecar.

    The bytes are checked against :func:`trusted_types` before they are written, so
    cnncodes never writes a model it would refuse to load.

    Parameters
    ----------
    pipe : estimator
        A pipeline of :func:`cnncodes.classify.make_pipeline`, fitted.
    path : path-like
        The ``.skops`` file; the sidecar is the same name with ``.json``.
    meta : mapping
        Provenance to store in the sidecar (cache, fingerprint, records, spec,
        class_names, norm, C, classifier...).

    Returns
    -------
    dict
        The sidecar's content (with ``sha256``, ``model_file``, ``format``, ``size_bytes``, ``versions``).

    Raises
    ------
    UsageError
        A path that does not end in ``.skops``.
    ModelFileError
        A model holding a type cnncodes does not write (it would not load).
    """
    path = Path(path)
    if path.suffix != MODEL_SUFFIX:
        raise UsageError(f"A model file must end in {MODEL_SUFFIX}. Got {path.name!r} instead.")
    data = _skops_io().dumps(pipe)
    bad = untrusted_types(data)
    if bad:
        raise ModelFileError(
            f"The model holds types that cnncodes does not load ({', '.join(bad)}); it is not written. "
            f"cnncodes saves only pipelines of cnncodes.classify.make_pipeline."
        )
    atomic_write_bytes(path, data)
    side = {"schema": MODEL_SCHEMA, **dict(meta), "model_file": path.name, "format": "skops",
            "sha256": sha256_bytes(data), "size_bytes": len(data), "versions": _versions(), "created": _now()}
    atomic_write_text(sidecar_path(path), _dump_json(side))
    return side


def load_model(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[Any, dict]:
    """Load a model written by :func:`save_model`; nothing in the file is executed.

    The sidecar must exist, be valid JSON, name this file and hold the sha256 of its
    bytes (integrity); every type the file names must be one cnncodes writes
    (:func:`trusted_types`; security). A pickle of an older run (``.joblib``) is
    refused unless ``trust_pickle``.

    Parameters
    ----------
    path : path-like
        The ``.skops`` file (or ``.joblib`` with ``trust_pickle``).
    trust_pickle : bool
        Unpickle a ``.joblib`` model of an older cnncodes. Unpickling runs any code the
        file holds: only for files you wrote yourself.

    Returns
    -------
    model : estimator
    meta : dict
        The sidecar.

    Raises
    ------
    ModelFileError
        Missing model or sidecar, unreadable sidecar, a sidecar of another model, a
        sha256 mismatch (changed or truncated file), a type cnncodes does not write
        (named), a pickle without ``trust_pickle``, or a file that does not load.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"No model file at {path}.")
    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    if pickled and not trust_pickle:
        raise ModelFileError(
            f"{path} is a pickle (a run of an older cnncodes): loading it would run any code it holds, and "
            f"cnncodes does not unpickle files from elsewhere. Retrain the run on its cache (cache path in "
            f"{sidecar_path(path).name}) with {RETRAIN}. If you wrote this file yourself, pass trust_pickle=True."
        )
    meta = _checked_sidecar(path)
    model = _unpickle(path) if pickled else _load_skops(path)
    if not hasattr(model, "predict"):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not a fitted model.")
    return model, meta


def _checked_sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        raise ModelFileError(
            f"The model {path} has no sidecar {side.name}: its origin and integrity cannot be checked, so it "
            f"is not loaded. Retrain it with scripts/train_svm.py."
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelFileError(f"The sidecar {side} of {path} is unreadable ({e}); the model is not loaded.") from e
    if meta.get("model_file") != path.name:
        raise ModelFileError(
            f"The sidecar {side} describes the model file {meta.get('model_file')!r}, not {path.name!r}: "
            f"it belongs to another model. The model is not loaded."
        )
    digest = sha256_of_file(path)
    if digest != meta.get("sha256"):
        raise ModelFileError(
            f"The model file {path} does not match its sidecar (sha256 {digest[:12]}… expected "
            f"{str(meta.get('sha256'))[:12]}…): it was changed or truncated after it was written. It is not "
            f"loaded; retrain it."
        )
    return meta


def _load_skops(path: Path):
    try:
        bad = untrusted_types(path)
    except ModelFileError as e:
        raise ModelFileError(f"The model file {path} cannot be loaded: {e}.") from e
    if bad:
        raise ModelFileError(
            f"The model file {path} names types that cnncodes never writes: {', '.join(bad)}. It is not loaded "
            f"(building them could run code). If you did not put them there, someone changed the file: "
            f"retrain the run with {RETRAIN}."
        )
    trusted = sorted(set().union(*trusted_types().values()))
    try:
        return _skops_io().load(path, trusted=trusted)
    except Exception as e:  # noqa: BLE001 - a malformed file fails in many ways inside skops
        raise ModelFileError(f"The model file {path} cannot be loaded ({type(e).__name__}: {e}).") from e


def _unpickle(path: Path):
    import joblib

    try:
        return joblib.load(path)  # the caller vouched for this file (trust_pickle)
    except Exception as e:  # noqa: BLE001 - anything from unpickling is a bad file
        raise ModelFileError(f"The model file {path} cannot be loaded ({type(e).__name__}: {e}).") from e


def _model_files(mdir: Path) -> dict[str, Path]:
    """``{stem: path}`` of the models in ``models/``: skops files, else an older run's pickles."""
    found: dict[str, Path] = {}
    if mdir.is_dir():
        for suffix in (*PICKLE_SUFFIXES, MODEL_SUFFIX):  # a skops file wins over a pickle of the same name
            found.update({q.stem: q for q in mdir.glob(f"*{suffix}")})
    return dict(sorted(found.items()))


def find_model(run_dir_or_model: str | os.PathLike, model: str | None = None) -> Path:
    """The model file of a run folder: the one named ``model``, or the best by val accuracy.

    Without ``model``: the run's ``model.skops`` (the best model by val accuracy, copied
    there by :func:`cnncodes.classify.train_run`); for an older run, its ``model.joblib``
    (which :func:`load_model` refuses unless trusted), the one model of ``models/``, or
    the best named by ``metrics.json``.

    Parameters
    ----------
    run_dir_or_model : path-like
        A run folder, or a model file (returned as is).
    model : str, optional
        ``"<layers>__<clf>"`` (e.g. ``"fc7__svm"``), with or without its suffix.

    Raises
    ------
    UsageError
        A missing path, an unknown model name (the known ones are listed), a folder with
        no model, or a ``metrics.json`` naming a model outside the run's ``models/``.
    """
    p = Path(run_dir_or_model)
    if p.is_file():
        return p
    if not p.is_dir():
        raise UsageError(f"{p} is neither a run folder nor a model file.")
    if not model:
        for name in (BEST_MODEL, *(f"model{s}" for s in PICKLE_SUFFIXES)):
            if (p / name).is_file():
                return p / name
    mdir = p / "models"
    known = _model_files(mdir)
    if not known:
        raise UsageError(f"The run folder {p} holds no model (no models/*{MODEL_SUFFIX}).")
    if model:
        name = next((model[: -len(s)] for s in (MODEL_SUFFIX, *PICKLE_SUFFIXES) if model.endswith(s)), model)
        if name not in known:
            raise UsageError(f"The run {p} has no model {model!r}. It has: {', '.join(known)}.")
        return known[name]
    if len(known) == 1:
        return next(iter(known.values()))
    return _best_of_metrics(p, known)


def _best_of_metrics(run: Path, known: dict[str, Path]) -> Path:
    try:
        best = Path(json.loads((run / "metrics.json").read_text())["best"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"The run {run} has several models ({', '.join(known)}) and no readable metrics.json to pick the "
            f"best: choose one with model='NAME'."
        ) from e
    if best.stem not in known or best.parent != Path("models"):  # metrics.json may not point outside the run
        raise UsageError(f"The metrics.json of {run} names {str(best)!r}, not one of its models "
                         f"({', '.join(known)}): choose one with model='NAME'.")
    return known[best.stem]


def copy_model(src: Path, dst: Path) -> None:
    """Copy a saved model and its sidecar atomically (same bytes, same sha256); the sidecar
    names the new file and the model it copies (``copy_of``)."""
    meta = json.loads(sidecar_path(src).read_text(encoding="utf-8"))
    data = src.read_bytes()
    if sha256_bytes(data) != meta.get("sha256"):
        raise ModelFileError(f"The model file {src} changed while the run was writing it; not copied.")
    atomic_write_bytes(dst, data)
    side = dict(meta, model_file=dst.name, copy_of=str(src.relative_to(dst.parent)) if src.is_relative_to(dst.parent)
                else str(src))
    atomic_write_text(sidecar_path(dst), _dump_json(side))


# --------------------------------------------------------------------------- torch weights


def save_torch_state(path: str | os.PathLike, state_dict: Mapping[str, Any], meta: Mapping[str, Any] | None = None
                     ) -> dict:
    """Write a torch state dict atomically as safetensors, with ``meta`` as JSON in its header.

    Tensors are copied to the CPU; one that shares memory with an earlier one (tied
    weights) is stored as a copy of its own, so every key loads back.

    Parameters
    ----------
    path : path-like
        Conventionally ``*.safetensors``.
    state_dict : mapping of str to torch.Tensor
    meta : mapping, optional
        JSON-serialisable provenance (spec, classes, training settings...).

    Returns
    -------
    dict
        ``{"schema", "sha256", "size_bytes", "n_tensors"}`` of the written file.

    Raises
    ------
    UsageError
        A value that is not a tensor, or a key that is not a string.
    """
    import torch
    from safetensors.torch import save

    tensors, seen = {}, set()
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise UsageError(f"A state dict maps names to tensors; {k!r} maps to a {type(v).__name__}.")
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        t = t.clone(memory_format=torch.contiguous_format) if ptr in seen else t.contiguous()
        if ptr is not None:
            seen.add(ptr)
        tensors[k] = t
    doc = {"schema": TORCH_STATE_SCHEMA, "keys": list(tensors), "meta": dict(meta or {})}  # safetensors sorts keys
    header = {_TORCH_META_KEY: json.dumps(doc, sort_keys=True)}
    data = save(tensors, metadata=header)
    atomic_write_bytes(path, data)
    return {"schema": TORCH_STATE_SCHEMA, "sha256": sha256_bytes(data), "size_bytes": len(data),
            "n_tensors": len(tensors)}


def load_torch_state(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict]:
    """Read a file of :func:`save_torch_state` (or any safetensors file): tensors, no code.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
        In the order of the file's keys.
    meta : dict
        The ``meta`` given to :func:`save_torch_state` (``{}`` for another safetensors file).

    Raises
    ------
    ModelFileError
        A missing file, one that is not safetensors, or a cnncodes header that is not JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"No weights file at {path}.")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types and OSError
        raise ModelFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}).") from e
    if _TORCH_META_KEY not in header:
        return state, {}
    try:
        doc = json.loads(header[_TORCH_META_KEY])
        order = [k for k in doc.get("keys", []) if k in state]
        return {k: state[k] for k in [*order, *(k for k in state if k not in set(order))]}, dict(doc["meta"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"The cnncodes header of {path} is unreadable ({e}).") from e
