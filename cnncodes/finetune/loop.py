"""The training loop: warm-up + cosine schedule, best epoch on val, early stop, crash-safe checkpoints.

Checkpoints (``checkpoint.pt`` in the run's work folder) are written after every epoch with
:func:`cnncodes.fileio.atomic_path` (temporary file, fsync, rename): model, optimizer and scheduler
state dicts, the torch RNG state, the epoch, the history and the early-stop state. They hold only
tensors, numbers and strings and are read back with ``torch.load(weights_only=True)``: no pickle of
arbitrary objects. The weights of the best epoch so far go to ``best.safetensors`` (written before
the checkpoint that refers to them).

Each epoch reseeds torch's RNG from (seed, epoch) and draws its batch order from the same pair, so
an interrupted run resumed from its last checkpoint ends where an uninterrupted one ends (on the
CPU, equal within float tolerance; in practice bitwise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import CacheCorruptError
from ..fileio import atomic_path
from .data import mix_seed

__all__ = ["TrainState", "Checkpointer", "make_scheduler", "lr_factor", "evaluate", "train_epochs", "autocast"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cnncodes.finetune.checkpoint/1"


@dataclass
class TrainState:
    """What survives between epochs besides the tensors."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_key: list[float] | None = None  # (val accuracy, -val loss): larger is better
    bad_epochs: int = 0
    stopped_early: bool = False


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 1 % to 100 % over ``warmup`` steps, then cosine to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return 0.01 + 0.99 * step / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def make_scheduler(optimizer, total_steps: int, warmup_steps: int):
    """A ``LambdaLR`` with :func:`lr_factor`: every group keeps its ratio to the head's lr at every step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))


def autocast(device: str):
    """bf16 autocast on a GPU, nothing on the CPU."""
    if device == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Checkpointer:
    """The work folder's ``checkpoint.pt`` and ``best.safetensors``."""

    def __init__(self, folder: Path, config_hash: str):
        self.folder = Path(folder)
        self.config_hash = config_hash

    @property
    def path(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.safetensors"

    def save(self, model, optimizer, scheduler, state: TrainState) -> None:
        blob = {"format": CHECKPOINT_FORMAT, "config_hash": self.config_hash, "epoch": state.epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng_torch": torch.get_rng_state(), "state_json": json.dumps(asdict(state))}
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(blob, tmp)

    def load(self) -> dict | None:
        """The last checkpoint, or None. Only tensors and plain values are unpickled."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is reported, not executed
            raise CacheCorruptError(f"The checkpoint {self.path} cannot be read ({type(e).__name__}: {e}). "
                                    f"Delete {self.folder} to start the run again.") from e
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise CacheCorruptError(f"{self.path} is not a cnncodes fine-tuning checkpoint.")
        return blob

    def save_best(self, model, epoch: int) -> None:
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_path(self.best_path) as tmp:
            save_file(sd, str(tmp), metadata={"epoch": str(epoch)})

    def load_best(self) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.best_path))


def restore(blob: dict, model, optimizer, scheduler) -> TrainState:
    """Put a checkpoint back into the model, optimizer and scheduler; return the loop state."""
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng_torch"])
    return TrainState(**json.loads(blob["state_json"]))


def evaluate(forward: Callable, batches: Iterable, device: str) -> dict:
    """Loss, accuracy and per-row predictions over ``batches`` of ``(idx, x, y, ok)``."""
    idx_all, pred_all, prob_all, y_all = [], [], [], []
    loss_sum, n = 0.0, 0
    with torch.inference_mode(), autocast(device):
        for idx, x, y, ok in batches:
            logits = forward(x).float()
            ok_t = torch.as_tensor(ok, device=logits.device)
            if ok_t.any():
                loss_sum += float(torch.nn.functional.cross_entropy(logits[ok_t], y[ok_t], reduction="sum"))
                n += int(ok_t.sum())
            p = torch.softmax(logits, 1).cpu()
            idx_all.append(np.asarray(idx)[np.asarray(ok)])
            pred_all.append(p.argmax(1).numpy()[np.asarray(ok)])
            prob_all.append(p.max(1).values.numpy()[np.asarray(ok)])
            y_all.append(y.cpu().numpy()[np.asarray(ok)])
    cat = (lambda v: np.concatenate(v) if v else np.zeros(0))  # noqa: E731
    pred, y = cat(pred_all).astype(int), cat(y_all).astype(int)
    return {"loss": loss_sum / max(n, 1), "accuracy": float((pred == y).mean()) if n else float("nan"), "n": n,
            "idx": cat(idx_all).astype(int), "pred": pred, "score": cat(prob_all), "y": y}


def train_epochs(*, model, forward: Callable, train_batches: Callable[[int], Iterable],
                 val_batches: Callable[[], Iterable] | None, optimizer, scheduler, epochs: int, patience: int,
                 ckpt: Checkpointer, state: TrainState, modes: Callable[[bool], None], device: str, seed: int,
                 on_epoch: Callable[[dict], None] | None = None) -> TrainState:
    """Run the remaining epochs of ``state``; checkpoint after each; stop early on a val plateau."""
    loss_fn = torch.nn.CrossEntropyLoss()
    while state.epoch < epochs and not state.stopped_early:
        e = state.epoch
        torch.manual_seed(mix_seed(seed, e, 2))  # dropout etc.: a function of the epoch alone
        modes(True)
        t0 = time.perf_counter()
        tot, correct, n_ok, n_bad = 0.0, 0, 0, 0
        for _idx, x, y, ok in train_batches(e):
            ok_t = torch.as_tensor(ok, device=y.device)
            n_bad += int((~ok_t).sum())
            if not ok_t.any():
                continue
            with autocast(device):
                logits = forward(x).float()
            loss = loss_fn(logits[ok_t], y[ok_t])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            k = int(ok_t.sum())
            tot += float(loss.detach()) * k
            correct += int((logits[ok_t].argmax(1) == y[ok_t]).sum())
            n_ok += k
        rec = {"epoch": e + 1, "train_loss": tot / max(n_ok, 1), "train_accuracy": correct / max(n_ok, 1),
               "train_failed": n_bad, "seconds": time.perf_counter() - t0,
               "lr": [g["lr"] for g in optimizer.param_groups][0]}
        modes(False)
        if val_batches is not None:
            v = evaluate(forward, val_batches(), device)
            rec.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
            key = [v["accuracy"], -v["loss"]]
        else:  # no val split: the last epoch is the best
            key = [float(e), 0.0]
        rec["epoch_seconds"] = time.perf_counter() - t0
        state.history.append(rec)
        if state.best_key is None or key > state.best_key:
            state.best_key, state.best_epoch, state.bad_epochs = key, e + 1, 0
            ckpt.save_best(model, e + 1)
        else:
            state.bad_epochs += 1
            if patience > 0 and state.bad_epochs >= patience:
                state.stopped_early = True
        state.epoch = e + 1
        ckpt.save(model, optimizer, scheduler, state)
        log.info("epoch %d/%d: train loss %.4f acc %.4f%s (%.1f s)", e + 1, epochs, rec["train_loss"],
                 rec["train_accuracy"],
                 f", val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.4f}" if "val_loss" in rec else "",
                 rec["epoch_seconds"])
        if on_epoch is not None:
            on_epoch(rec)
    return state
