"""Predict labels of new images with a trained run: same backbone, weights, preprocessing and layers.

:func:`predict` loads a model and its sidecar (:func:`cnncodes.modelfile.load_model`: skops,
only the types cnncodes writes; sha256 checked; pickles of older runs only when trusted),
extracts the codes of the images with exactly the recorded extraction spec
(:func:`cnncodes.extraction.extract_images`, which refuses other weights), checks that
the new codes match the training codes field by field
(:func:`cnncodes.classify.check_compatible`), and predicts.

This module imports torch only inside :func:`predict` (through the extractor), so
importing it, expanding paths and writing results stay fast.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from numbers import Integral

from ._validation import Interval, PathLike, SequenceOf, StrOptions, validate_params
from .classify import check_compatible, find_model, load_model, top_scores
from .errors import InvalidParameterError, UsageError
from .fileio import atomic_write_text
from .images import DEFAULT_MAX_PIXELS

__all__ = ["check_output_path", "expand_paths", "predict", "predict_codes", "write_predictions", "FIELDS"]

log = logging.getLogger(__name__)

FIELDS = ("path", "label", "score", "status", "message")

_COUNT = Interval(Integral, 1, None, closed="left")
_PREDICT_PARAMS = {
    "run_dir_or_model": [PathLike()],
    "image_paths": [SequenceOf(PathLike())],
    "model": [str, None],
    "device": [StrOptions(("auto", "cpu", "cuda"))],
    "batch_size": [_COUNT],
    "max_pixels": [_COUNT, None],
    "trust_pickle": ["boolean"],
}

from .images import IMAGE_EXTENSIONS as _IMAGE_EXTENSIONS
from .images import list_image_files


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files of ``paths``: files as given, folders expanded recursively (sorted).

    A folder is walked as ``scan_folder`` walks a dataset (:func:`cnncodes.images.list_image_files`):
    hidden entries skipped, file links followed, folder links that loop or lead back into it skipped.

    Raises
    ------
    UsageError
        A path that does not exist, a folder with no image file, or no path at all.
    """
    if not paths:
        raise UsageError("Give at least one image file or folder.")
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = list_image_files(p)
            if not found:
                raise UsageError(
                    f"The folder {p} holds no image file (extensions {', '.join(sorted(_IMAGE_EXTENSIONS))})."
                )
            out.extend(found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise UsageError(f"No such image file or folder: {p}")
    return list(dict.fromkeys(out))


def predict_codes(model, meta: dict, X: np.ndarray, status: np.ndarray | None = None,
                  messages: np.ndarray | None = None) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Labels and scores of codes ``X`` (rows with ``status != "ok"`` get label "" and NaN score).

    Returns
    -------
    labels : list of str
        Class names (``""`` for failed rows).
    scores : ndarray of float
        Top softmax probability, or top SVM decision value.
    status, messages : ndarray of str
    """
    n = len(X)
    status = np.asarray(status if status is not None else ["ok"] * n).astype(str)
    messages = np.asarray(messages if messages is not None else [""] * n).astype(object)
    ok = status == "ok"
    finite = np.isfinite(X).all(axis=1) if n else np.zeros(0, bool)
    bad = ok & ~finite
    for i in np.flatnonzero(bad):
        status[i] = "error"
        messages[i] = "codes hold NaN or inf"
    ok = ok & finite
    labels = [""] * n
    scores = np.full(n, np.nan)
    if ok.any():
        pred, sc = top_scores(model, np.asarray(X[ok], dtype=np.float32))
        names = meta["class_names"]
        for i, p, s in zip(np.flatnonzero(ok), pred, sc):
            labels[i] = str(names[int(p)])
            scores[i] = float(s)
    return labels, scores, status, messages.astype(str)


def predict(
    run_dir_or_model: str | os.PathLike,
    image_paths: Sequence[str | os.PathLike],
    *,
    model: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    trust_pickle: bool = False,
) -> list[dict[str, Any]]:
    """Predict the class of images with a trained model.

    Parameters
    ----------
    run_dir_or_model : path-like
        A run folder (its best model by val accuracy, or ``model``) or a ``.skops`` file.
    image_paths : sequence of path-like
        Image files and folders (expanded to their image files).
    model : str, optional
        ``"<layers>__<clf>"`` within a run folder.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_size : int
    trust_pickle : bool
        Load a pickle (``.joblib``) model of an older run. Unpickling runs any code the
        file holds: only for files you wrote yourself.
    max_pixels : int or None
        Images with more pixels fail (status error); ``None``: no limit. See
        :func:`cnncodes.images.load_image`.

    Returns
    -------
    list of dict
        One per image, in order: ``path``, ``label`` (class name, ``""`` if the image
        failed), ``score`` (top probability for softmax, top decision value for SVM;
        NaN if failed), ``status`` (``"ok"``/``"error"``), ``message``.

    Raises
    ------
    UsageError
        A bad argument (:class:`InvalidParameterError`), missing images or folders, an
        unknown model name: all before any model is loaded.
    ModelFileError
        A missing, tampered or mismatched model file or sidecar, a model file naming a
        type cnncodes does not write, or a pickle without ``trust_pickle``.
    CacheMismatchError
        The weights on this machine, or the new codes' layer or spec, differ from the
        model's training codes (each differing field named).
    """
    validate_params({"run_dir_or_model": run_dir_or_model, "image_paths": image_paths, "model": model,
                     "device": device, "batch_size": batch_size, "max_pixels": max_pixels,
                     "trust_pickle": trust_pickle},
                    _PREDICT_PARAMS, "predict")
    if _is_finetune_run(run_dir_or_model):  # a run of scripts/finetune.py: the whole network predicts
        from .finetune.runfolder import predict_finetuned

        return predict_finetuned(run_dir_or_model, image_paths, device=device, batch_size=batch_size,
                                 max_pixels=max_pixels)
    path = find_model(run_dir_or_model, model)
    files = expand_paths(image_paths)
    est, meta = load_model(path, trust_pickle=trust_pickle)
    from .extraction import extract_images  # imports torch

    res = extract_images(files, spec=meta["spec"], layer_keys=list(meta["layers"]), device=device,
                         batch_size=batch_size, max_pixels=max_pixels)
    check_compatible(meta, res["records"], res["spec"])
    X = np.concatenate([res["codes"][k] for k in meta["layers"]], axis=1) if files else np.zeros((0, 0))
    labels, scores, status, messages = predict_codes(est, meta, X, res["status"], res["messages"])
    n_bad = int((status != "ok").sum())
    log.info("Predicted %d images with %s (%d failed)", len(files), path, n_bad)
    return [
        {"path": f, "label": lab, "score": (float(s) if np.isfinite(s) else None), "status": str(st),
         "message": str(m)}
        for f, lab, s, st, m in zip(files, labels, scores, status, messages)
    ]


def _is_finetune_run(path) -> bool:
    # the same test as cnncodes.finetune.runfolder.is_finetune_run, without importing torch
    p = Path(path)
    return (p.is_dir() and (p / "finetune.json").is_file()) or (p.is_file() and p.name.endswith(".safetensors"))


OUTPUT_SUFFIXES = (".csv", ".json")


def check_output_path(out: str | os.PathLike, caller: str = "write_predictions",
                      run: str | os.PathLike | None = None) -> Path:
    """``out`` as a Path, if a file can be written there: not a folder, no file where a folder must be,
    a ``.csv`` or ``.json`` name, and not a file of the run folder ``run`` (its model, metrics, marker).

    Raises
    ------
    InvalidParameterError
        Otherwise (a command line checks this before predicting, so that no work is lost).
    """
    validate_params({"out": out}, {"out": [PathLike()]}, caller)
    out = Path(out)
    # any other suffix got CSV text: "--out preds.xlsx" wrote a CSV, "--out RUN/model.skops" replaced the model
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InvalidParameterError("out", caller, f"must be a file name ending in .csv or .json. Got {str(out)!r} "
                                                   "instead.")
    if run is not None and out.exists() and _is_inside(out, run):
        raise InvalidParameterError("out", caller, f"must not be a file of the run folder {str(run)!r} (it would be "
                                                   f"overwritten). Got {str(out)!r} instead.")
    if out.is_dir():
        raise InvalidParameterError("out", caller, f"must be a file name ending in .csv or .json. Got {str(out)!r}, "
                                                   "a folder, instead.")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidParameterError("out", caller, f"must be a path in a folder. Got {str(out)!r} instead, "
                                                           f"where {parent} is a file.")
            break
    return out


def _is_inside(path: Path, folder: str | os.PathLike) -> bool:
    folder = Path(folder).resolve()
    root = folder if folder.is_dir() else folder.parent  # a model file: its folder
    return root in Path(path).resolve().parents


def write_predictions(rows: Sequence[dict], out: str | os.PathLike) -> Path:
    """Write prediction rows atomically as CSV (``path,label,score,status,message``) or JSON.

    The format follows the suffix: ``.json`` gives a JSON list of objects, ``.csv`` CSV
    (any other suffix is refused).

    Raises
    ------
    UsageError
        An output path that is an existing folder, or below a file.
    """
    out = check_output_path(out)
    if out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(list(rows), indent=2) + "\n")
        return out
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(FIELDS)
    for r in rows:
        s = r.get("score")
        w.writerow([r["path"], r["label"], "" if s is None else f"{s:.6g}", r.get("status", "ok"),
                    r.get("message", "")])
    atomic_write_text(out, buf.getvalue())
    return out
