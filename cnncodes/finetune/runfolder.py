"""Run folder of a fine-tuned model, and prediction with it.

``RUN_DIR/`` (written in a temporary folder next to it and renamed at the end, as train_svm's)::

    metrics.json             "kind": "finetune"; results["finetune"]["softmax"] -> train/val/test METRICS
                             (the same shape as train_svm's: ...["test"]["accuracy"]), best epoch,
                             history, settings, split, timings; best.test_accuracy
    model.safetensors        the best epoch's state dict (safetensors: no pickle)
    finetune.json            its sidecar: sha256 of model.safetensors, the extraction-style spec
                             (backbone, base weights identity + sha256, preprocessing, decoder),
                             head (node, normaliser, classes), class names, freeze_to, versions
    predictions/test.csv     path, split, true, pred, score of every test row
    confusion_matrix.png, curves.png (loss and accuracy per epoch)

``scripts/predict.py RUN_DIR images...`` finds ``finetune.json`` and calls :func:`predict_finetuned`:
the network is rebuilt from the sidecar (architecture, new head), the weights are read from the
safetensors file after its sha256 is checked, images are decoded exactly as extract.py decodes them,
and the whole network runs in fp32 (bf16 autocast on a GPU).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ModelFileError
from ..fileio import atomic_path, atomic_write_text, sha256_of_file
from ..runfolder import PREDICTIONS_HEADER

__all__ = ["SIDECAR", "WEIGHTS", "is_finetune_run", "save_weights", "write_run_files", "load_finetuned",
           "predict_finetuned"]

log = logging.getLogger(__name__)

SIDECAR = "finetune.json"
WEIGHTS = "model.safetensors"
MODEL_SCHEMA = "cnncodes.finetune.model/1"


def is_finetune_run(path: str | os.PathLike) -> bool:
    """True for a fine-tuned run folder (it holds ``finetune.json``) or its ``model.safetensors``."""
    p = Path(path)
    return (p.is_dir() and (p / SIDECAR).is_file()) or (p.is_file() and p.name.endswith(".safetensors"))


def save_weights(state_dict: dict, folder: Path, meta: dict) -> dict:
    """``model.safetensors`` (atomic) and its sidecar with the sha256."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    path = folder / WEIGHTS
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))
    side = {"schema": MODEL_SCHEMA, "kind": "finetune", **meta, "model_file": WEIGHTS,
            "sha256": sha256_of_file(path), "size_bytes": path.stat().st_size}
    atomic_write_text(folder / SIDECAR, json.dumps(side, indent=2, sort_keys=True) + "\n")
    return side


def write_run_files(folder: Path, metrics: dict, test_rows: list[list], plots: bool = True) -> None:
    """metrics.json, predictions/test.csv and the figures."""
    from ..classify import _jsonable, _plot_confusions

    atomic_write_text(folder / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(PREDICTIONS_HEADER)
    w.writerows(test_rows)
    (folder / "predictions").mkdir(exist_ok=True)
    atomic_write_text(folder / "predictions" / "test.csv", buf.getvalue())
    if plots:
        r = metrics["results"]["finetune"]["softmax"]
        _plot_confusions(folder / "confusion_matrix.png", [("finetune", "softmax", r["test"])])
        _plot_history(folder / "curves.png", metrics["history"], metrics.get("best_epoch"))


def _plot_history(path: Path, history: list[dict], best_epoch: int | None) -> None:
    from ..classify._plots import _figure, _save

    fig = _figure(9, 3.6)
    ep = [h["epoch"] for h in history]
    for j, (what, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.plot(ep, [h[f"train_{what}"] for h in history], marker="o", ms=3, label="train")
        if history and f"val_{what}" in history[0]:
            ax.plot(ep, [h[f"val_{what}"] for h in history], marker="o", ms=3, label="val")
        if best_epoch:
            ax.axvline(best_epoch, color="k", ls=":", lw=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def load_finetuned(run: str | os.PathLike):
    """Rebuild a fine-tuned network from its run folder: ``(model in eval mode, sidecar)``.

    Raises
    ------
    ModelFileError
        A missing or unreadable sidecar, or weights whose sha256 differs from the sidecar's.
    """
    from safetensors.torch import load_file

    from ..backbones import ResolvedWeights, get_backbone
    from .surgery import build_finetune_model

    run = Path(run)
    folder = run if run.is_dir() else run.parent
    side_path = folder / SIDECAR
    try:
        meta = json.loads(side_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"The fine-tuned run {folder} has no readable {SIDECAR} ({e}).") from e
    wpath = folder / meta.get("model_file", WEIGHTS)
    if not wpath.is_file():
        raise ModelFileError(f"No weights file {wpath}.")
    digest = sha256_of_file(wpath)
    if digest != meta.get("sha256"):
        raise ModelFileError(f"The weights {wpath} do not match {SIDECAR} (sha256 {digest[:12]}… expected "
                             f"{str(meta.get('sha256'))[:12]}…): changed or truncated after the run. Not loaded.")
    spec = get_backbone(meta["spec"]["backbone"])
    # the architecture only: every tensor comes from the run's own weights file
    model = build_finetune_model(spec, ResolvedWeights("none", "architecture-only"), len(meta["class_names"]),
                                 head_norm=meta["head"]["norm"])
    try:
        model.load_state_dict(load_file(str(wpath)), strict=True)
    except (RuntimeError, OSError) as e:
        raise ModelFileError(f"The weights {wpath} do not fit {spec.name} with its new head ({e}).") from e
    model.eval()
    return model, meta


def predict_finetuned(run: str | os.PathLike, image_paths: Sequence[str | os.PathLike], *, device: str = "auto",
                      batch_size: int = 64, workers: int | None = None, max_pixels: int | None = None
                      ) -> list[dict[str, Any]]:
    """Rows ``path,label,score,status,message`` for images, as :func:`cnncodes.predict.predict` returns."""
    import torch

    from ..extraction import resolve_device
    from ..extraction._api import _pre_of
    from ..extraction._pipeline import _default_workers
    from ..predict import expand_paths
    from .data import eval_loader, normalise
    from .loop import autocast

    files = expand_paths(image_paths)
    model, meta = load_finetuned(run)
    dev = resolve_device(device)
    model = model.to(dev).to(memory_format=torch.channels_last)
    pre = _pre_of(meta["spec"])
    n = len(files)
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    nw = _default_workers(dev) if workers is None else int(workers)
    names = meta["class_names"]
    out: list[dict] = [{} for _ in files]
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    loader = eval_loader(files, pre, pre.draft, meta["spec"]["preprocessing"].get("decoder", "pil"), batches, nw, dev,
                         **kw)
    with torch.inference_mode(), autocast(dev):
        for idx, x, status, notes in loader:
            p = torch.softmax(model(normalise(x, pre, dev)).float(), 1).cpu().numpy()
            for j, i in enumerate(idx):
                ok = status[j] == "ok"
                out[i] = {"path": files[i], "label": names[int(p[j].argmax())] if ok else "",
                          "score": float(p[j].max()) if ok else None, "status": status[j], "message": notes[j]}
    log.info("Predicted %d images with the fine-tuned run %s", n, run)
    return out
