""":func:`finetune`: fine-tune a backbone (or train it from scratch) on a labelled image collection.

The flow:

1. **Check** every option before any work (bad ones raise :class:`~cnncodes.errors.UsageError`).
2. **Rows and split**: extract.py's listing, train_svm's split (same seed and fractions).
3. **Cached prefix**: with a frozen prefix and no augmentation, the prefix's output is the same in
   every epoch: it is computed once by :func:`cnncodes.extract` (layer ``freeze_to``,
   pooling ``none``) into the HDF5 cache — same file, fingerprint, crash safety and reuse as any
   codes — and only the stages after it run during training (:func:`cnncodes.backbones.run_stages`).
4. **Model**: new head (random, or from a train_svm softmax), frozen prefix, parameter groups,
   AdamW, warm-up + cosine schedule (:mod:`.surgery`, :mod:`.loop`).
5. **Train** with a checkpoint per epoch in ``<RUN_DIR>.partial/``; the same command (or
   ``resume=True``) continues an interrupted run; the best epoch on val is kept (early stop).
6. **Run folder**: written under a temporary name and renamed, so a failed run never replaces an
   earlier one; the work folder is removed only then.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheMismatchError, InvalidParameterError, UsageError

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "default_run_dir"]

log = logging.getLogger(__name__)

AUGMENTS = ("default", "none")
METRICS_SCHEMA = "cnncodes.metrics/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides a fine-tuned model (the device, output and workers do not)."""

    model: str
    weights: str = "default"
    freeze_to: str | None = None
    epochs: int = 10
    lr: float = 1e-3
    backbone_lr_mult: float | None = None  # None: 0.1 with pretrained weights, 1.0 from scratch
    layer_decay: float | None = None
    batch_size: int = 32
    augment: str = "default"
    init_head_from: str | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1
    patience: int = 5
    bn: str = "auto"
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    cache_dtype: str = "float16"
    decoder: str = "torchvision"
    draft: bool = True
    prefix_cache: bool = True  # False: run the frozen prefix every epoch (to measure what the cache saves)

    def check(self) -> None:
        """Raise :class:`~cnncodes.errors.InvalidParameterError` (a UsageError) for a bad value, naming it."""
        def bad(what, v, want):
            raise InvalidParameterError(what, "finetune", f"must be {want}. Got {v!r} instead.")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            bad("epochs", self.epochs, "an integer >= 1")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            bad("batch_size", self.batch_size, "an integer >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", self.lr, "a number > 0")
        if self.backbone_lr_mult is not None and self.layer_decay is not None:
            raise UsageError("The 'backbone_lr_mult' and 'layer_decay' parameters are two ways to set the pretrained "
                             "layers' learning rate: give one of them")
        if self.backbone_lr_mult is not None and not (0 < self.backbone_lr_mult <= 10):
            bad("backbone_lr_mult", self.backbone_lr_mult, "in (0, 10]")
        if self.layer_decay is not None and not (0 < self.layer_decay <= 1):
            bad("layer_decay", self.layer_decay, "in (0, 1]")
        if self.augment not in AUGMENTS:
            bad("augment", self.augment, "default or none")
        if not (0 <= self.warmup < 1):
            bad("warmup", self.warmup, "a fraction of the steps in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, ">= 0")
        if self.patience < 0:
            bad("patience", self.patience, ">= 0 (0: no early stop)")
        if self.cache_dtype not in ("float16", "float32"):
            bad("cache_dtype", self.cache_dtype, "float16 or float32")
        from .surgery import BN_POLICIES

        if self.bn not in BN_POLICIES:
            bad("bn", self.bn, " or ".join(BN_POLICIES))

    def digest(self, manifest_digest: str) -> str:
        from ..store import fingerprint_of

        return fingerprint_of({"config": asdict(self), "manifest": manifest_digest})


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced."""

    run_dir: Path
    metrics: dict
    summary: str
    resumed_from: int = 0


def default_run_dir(data, cfg: FinetuneConfig, digest: str, runs_root="artifacts/runs") -> Path:
    """``<runs_root>/<dataset>__<model>__<ft-LAYER|ft-all|scratch>__<config digest>``: deterministic, so
    that the same command finds its interrupted run."""
    what = "scratch" if cfg.weights == "none" else f"ft-{cfg.freeze_to or 'all'}"
    return Path(runs_root) / f"{Path(data).resolve().name}__{cfg.model}__{what}__{digest[:10]}"


def finetune(data: str | os.PathLike, model: str, *, weights: str = "default", freeze_to: str | None = None,
             epochs: int = 10, lr: float = 1e-3, backbone_lr_mult: float | None = None,
             layer_decay: float | None = None, batch_size: int = 32, augment: str = "default",
             init_head_from: str | None = None, device: str = "auto", out: str | os.PathLike | None = None,
             resume: bool = False, overwrite: bool = False, workers: int | None = None,
             cache_dir: str | os.PathLike = "artifacts/codes", runs_root: str | os.PathLike = "artifacts/runs",
             plots: bool = True, **settings: Any) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` (see the module docstring) and write a run folder.

    Parameters are those of ``scripts/finetune.py`` (``settings``: the other fields of
    :class:`FinetuneConfig`: weight_decay, warmup, patience, bn, seed, val_fraction,
    test_fraction, cache_dtype, decoder, draft).

    Raises
    ------
    UsageError
        A bad option, an existing run folder (without ``overwrite``), ``resume`` with nothing to resume,
        an unfinished run with other settings.
    TrainingDataError, DatasetError, WeightsError, CacheError
        From the data, the weights or the cache.
    """
    from ..extraction import resolve_device
    from ..runfolder import check_target

    freeze_to = None if freeze_to in (None, "none", "") else freeze_to
    cfg = FinetuneConfig(model=model, weights=str(weights), freeze_to=freeze_to, epochs=epochs, lr=lr,
                         backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay, batch_size=batch_size,
                         augment=augment, init_head_from=None if init_head_from is None else str(
                             Path(init_head_from).resolve()), **settings)
    cfg.check()
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"Unknown device {device!r}: use auto, cpu or cuda")
    job = _Job(cfg, data, cache_dir, workers)
    job.prepare_model()  # every option that needs the backbone is checked here, before any data work
    digest = cfg.digest(job.manifest.digest())
    target = Path(out) if out is not None else default_run_dir(data, cfg, digest, runs_root)
    check_target(target, None, overwrite)  # train_svm's rules: only a marked run folder is ever replaced
    work = target.with_name(target.name + ".partial")
    job.device = resolve_device(device)
    blob = _claim_work(work, digest, cfg, resume, overwrite)
    job.prepare_data()
    return job.run(target, work, digest, blob, overwrite, plots)


def _claim_work(work: Path, digest: str, cfg: FinetuneConfig, resume: bool, overwrite: bool):
    """The checkpoint of an interrupted run of the same settings in ``work``, or None; refuses another's."""
    from .loop import Checkpointer

    cfg_file = work / "config.json"
    if work.exists():
        try:
            old = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("digest") != digest:
            if not overwrite:
                diff = [k for k, v in asdict(cfg).items() if old.get("config", {}).get(k) != v]
                raise UsageError(
                    f"{work} holds an unfinished run with other settings ({', '.join(diff) or 'the image list'}). "
                    f"Run its own command again to resume it, or pass overwrite=True to discard it.")
            log.warning("overwrite=True: discarding the unfinished run in %s", work)
            shutil.rmtree(work)
    blob = Checkpointer(work, digest).load() if work.exists() else None
    if blob is not None and blob.get("config_hash") != digest:
        raise CacheMismatchError(f"The checkpoint in {work} belongs to other settings; pass overwrite=True to discard it.")
    if resume and blob is None:
        raise UsageError(f"resume=True: there is no interrupted run to resume in {work}.")
    work.mkdir(parents=True, exist_ok=True)
    if not cfg_file.exists():
        from ..fileio import atomic_write_text

        atomic_write_text(cfg_file, json.dumps({"digest": digest, "config": asdict(cfg)}, indent=1))
    return blob


class _Job:
    """The state of one fine-tuning run (model, data, optimizer) between the steps of :func:`finetune`."""

    def __init__(self, cfg: FinetuneConfig, data, cache_dir, workers):
        from ..backbones import get_backbone, resolve_weights
        from ..extraction._plan import _load_manifest

        self.cfg, self.data, self.cache_dir, self.workers = cfg, data, Path(cache_dir), workers
        self.spec = get_backbone(cfg.model)
        self.manifest = _load_manifest(data)
        self.wts = resolve_weights(self.spec, cfg.weights)
        self.device = "cpu"
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------ model
    def prepare_model(self) -> None:
        from ..backbones import resolve_layer_alias, split_index
        from ..extraction._spec import _base_spec
        from .surgery import build_finetune_model, freeze_prefix, resolve_bn, trainable_chain

        cfg, spec = self.cfg, self.spec
        self.model = build_finetune_model(spec, self.wts, len(self.manifest.class_names), seed=cfg.seed)
        self.stages = trainable_chain(spec, self.model)
        if cfg.layer_decay is not None and self.stages is None:
            raise UsageError(f"The 'layer_decay' parameter needs the stage chain of the backbone; {spec.name} has "
                             f"none: set backbone_lr_mult instead")
        self.split = -1
        self.freeze_alias = None
        if cfg.freeze_to is not None:
            if self.stages is None:
                from ..backbones import backbone_chain

                backbone_chain(spec.name, self.model)  # raises the UsageError that says why
            self.split = split_index(spec, self.stages, cfg.freeze_to)
            self.freeze_alias = resolve_layer_alias(spec, cfg.freeze_to).alias
            if self.stages[self.split + 1:] == [] or self.stages[self.split + 1].node == self.head_node:
                log.info("freeze_to=%s leaves only the new head to train (a linear probe with SGD)", cfg.freeze_to)
            if self.wts.kind == "none":
                log.warning("freeze_to with weights='none' freezes random layers")
        self.frozen_nodes = freeze_prefix(self.model, self.stages, self.split) if self.split >= 0 else []
        self.bn = resolve_bn(cfg.bn, self.wts)
        self.cached = self.split >= 0 and cfg.augment == "none" and cfg.prefix_cache
        self.base_spec = _base_spec(spec, self.wts, "float16", "fp32", cfg.draft, cfg.decoder)
        if cfg.init_head_from is not None:
            self._init_head()

    @property
    def head_node(self) -> str:
        from ..backbones import classifier_node

        return classifier_node(self.spec.name)

    def _init_head(self) -> None:
        from .surgery import head_from_run, head_input_alias, load_head

        if self.stages is None:
            raise UsageError(f"The 'init_head_from' parameter: the head input layer of {self.spec.name} is not known")
        alias = head_input_alias(self.spec, self.stages)
        head = self.model.get_submodule(self.head_node)
        norm, W, b, info = head_from_run(self.cfg.init_head_from, spec=self.spec, base_spec=self.base_spec,
                                         class_names=self.manifest.class_names, in_alias=alias,
                                         in_features=head.linear.in_features)
        load_head(self.model, self.spec, norm, W, b)
        self._probe_meta = info.pop("meta")
        self.head_init = dict(info, torch_norm=norm)
        log.info("Head initialised from %s (%s normaliser)", info["model"], info["norm"])

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        from .data import list_rows

        cfg = self.cfg
        status = messages = None
        if self.cached:
            status, messages = self._cache_prefix()
        self.rows = list_rows(self.data, status=status, messages=messages, seed=cfg.seed,
                              val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
        self.y = self.rows.labels
        if getattr(self, "head_init", None) is not None:
            self._check_probe_saw_val()

    def _check_probe_saw_val(self) -> None:
        """Warn (and record) when the initial head was fitted on this run's val or test images."""
        from .surgery import probe_images

        seen = probe_images(self.head_init["model"], self._probe_meta)
        if seen is None:
            self.head_init["images_seen"] = None
            return
        counts = {part: sum(str(Path(self.rows.paths[i]).resolve()) in seen for i in getattr(self.rows.split, part))
                  for part in ("val", "test")}
        self.head_init["images_seen"] = counts
        for part, n in counts.items():
            if n:
                log.warning("The initial head (%s) was fitted on %d of this run's %d %s images (train_svm refits "
                            "on train+val), so the %s accuracy is optimistic%s. For a clean start, train the probe "
                            "on a copy of the data without them.", self.head_init["model"], n,
                            len(getattr(self.rows.split, part)), part, part,
                            " and the best epoch is picked on seen images" if part == "val" else "")

    def _cache_prefix(self):
        from ..extraction import extract
        from ..store import load_codes

        cfg = self.cfg
        t0 = time.perf_counter()
        res = extract(self.data, cfg.model, [self.freeze_alias], weights=cfg.weights, pool="none",
                      out=self.cache_dir, device=self.device, batch_size=64, workers=self.workers,
                      dtype=cfg.cache_dtype, decoder=cfg.decoder, draft=cfg.draft)
        key = res.keys[0]
        codes = load_codes(res.path, key, dtype=np.float16 if cfg.cache_dtype == "float16" else np.float32)
        if codes.paths.tolist() != [r.relpath for r in self.manifest.rows]:
            raise CacheMismatchError(f"The rows of {res.path} are not the dataset's rows; extract it again.")
        rec = codes.records[key]
        self.map_shape = tuple(rec.map_shape) if rec.map_shape else (rec.dim,)
        self.X = codes.X
        self.cache_info = {"path": str(res.path), "key": key, "hit": res.hit, "fingerprint": rec.fingerprint,
                           "map_shape": list(self.map_shape), "dtype": cfg.cache_dtype}
        self.timing["cache_seconds"] = time.perf_counter() - t0
        log.info("Prefix activations %s %s of %d images from %s (%s, %.1f s)", key, self.map_shape, len(self.X),
                 res.path, "cache hit" if res.hit else "extracted", self.timing["cache_seconds"])
        return codes.status, codes.messages

    # ------------------------------------------------------------------ batches
    def forward(self, x):
        import torch

        from ..backbones import run_stages
        from .data import normalise

        if self.cached:
            x = x.to(self.device, non_blocking=True)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return run_stages(self.model, self.stages[self.split + 1:], x)
        return self.model(normalise(x, self.spec.preprocessing, self.device))

    def batches(self, rows: np.ndarray, epoch: int | None):
        """``(idx, x, y, ok)`` over ``rows``: shuffled and augmented for training (epoch given)."""
        import torch

        from ..extraction._pipeline import _default_workers
        from .data import augmented_loader, epoch_batches, eval_loader, iter_cached

        cfg = self.cfg
        order = epoch_batches(rows, cfg.batch_size, cfg.seed, epoch or 0, shuffle=epoch is not None)
        y_all = torch.as_tensor(self.y)
        if self.cached:
            for idx, x in iter_cached(self.X, self.map_shape, order):
                yield idx, x, y_all[idx].to(self.device), np.ones(len(idx), bool)
            return
        nw = _default_workers(self.device) if self.workers is None else int(self.workers)
        pre, paths = self.spec.preprocessing, self.rows.paths
        if epoch is not None and cfg.augment == "default":
            loader = augmented_loader(paths, pre, cfg.draft, cfg.decoder, order, nw, self.device, cfg.seed, epoch)
        else:
            loader = eval_loader(paths, pre, cfg.draft, cfg.decoder, order, nw, self.device)
        for idx, x, status, _notes in loader:
            yield idx, x, y_all[idx].to(self.device), np.asarray(status) == "ok"

    # ------------------------------------------------------------------ training
    def run(self, target: Path, work: Path, digest: str, blob, overwrite: bool, plots: bool) -> FinetuneResult:
        import torch

        from .loop import Checkpointer, TrainState, make_scheduler, restore, train_epochs
        from .surgery import param_groups, set_modes

        cfg, split = self.cfg, self.rows.split
        self.model.to(self.device).to(memory_format=torch.channels_last)
        mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (1.0 if self.wts.kind == "none" else 0.1)
        groups = param_groups(self.model, self.spec, self.stages, lr=cfg.lr,
                              backbone_lr_mult=None if cfg.layer_decay is not None else mult,
                              layer_decay=cfg.layer_decay, weight_decay=cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        steps = math.ceil(len(split.train) / cfg.batch_size)
        total = steps * cfg.epochs
        self.scheduler = make_scheduler(self.optimizer, total, int(round(cfg.warmup * total)))
        ckpt = Checkpointer(work, digest)
        state = TrainState()
        resumed_from = 0
        if blob is not None:
            state = restore(blob, self.model, self.optimizer, self.scheduler)
            resumed_from = state.epoch
            log.warning("Resuming an interrupted run from %s: %d of %d epochs done", work, state.epoch, cfg.epochs)
        t0 = time.perf_counter()
        state = train_epochs(
            model=self.model, forward=self.forward, train_batches=lambda e: self.batches(split.train, e),
            val_batches=(lambda: self.batches(split.val, None)) if len(split.val) else None,
            optimizer=self.optimizer, scheduler=self.scheduler, epochs=cfg.epochs, patience=cfg.patience,
            ckpt=ckpt, state=state, modes=lambda tr: set_modes(self.model, self.frozen_nodes, self.bn, tr),
            device=self.device, seed=cfg.seed)
        self.timing["train_seconds"] = time.perf_counter() - t0
        self.model.load_state_dict(ckpt.load_best())
        return self._finish(target, work, state, groups, resumed_from, overwrite, plots)

    def _finish(self, target, work, state, groups, resumed_from, overwrite, plots) -> FinetuneResult:
        from ..classify import compute_metrics
        from ..runfolder import settings_hash, staged_run
        from .loop import evaluate
        from .runfolder import save_weights, write_run_files
        from .surgery import set_modes

        set_modes(self.model, self.frozen_nodes, self.bn, False)
        split, names = self.rows.split, self.rows.class_names
        t0 = time.perf_counter()
        ev = {s: evaluate(self.forward, self.batches(getattr(split, s), None), self.device)
              for s in ("train", "val", "test") if len(getattr(split, s))}
        self.timing["eval_seconds"] = time.perf_counter() - t0
        res = {s: dict(compute_metrics(e["y"], e["pred"], names), loss=e["loss"]) for s, e in ev.items()}
        metrics = self._metrics(state, groups, res, resumed_from)
        rel = [r.relpath for r in self.manifest.rows]
        test_rows = [[rel[i], "test", names[t], names[p], f"{s:.6g}"]
                     for i, t, p, s in zip(ev["test"]["idx"], ev["test"]["y"], ev["test"]["pred"], ev["test"]["score"])]
        settings = asdict(self.cfg)
        marker = {"created": metrics["created"], "kind": "finetune", "dataset": self.manifest.root,
                  "settings": settings, "settings_hash": settings_hash(settings)}
        cache = getattr(self, "cache_info", {}).get("path")
        with staged_run(target, overwrite=overwrite, cache=cache, reserve=False, marker=marker) as (tmp, target):
            save_weights(self.model.state_dict(), tmp, self._sidecar())
            write_run_files(tmp, metrics, test_rows, plots)
        shutil.rmtree(work, ignore_errors=True)
        t = res["test"]["accuracy"]
        summary = (f"fine-tuned {self.spec.name} ({metrics['settings']['mode']}): best epoch {state.best_epoch} of "
                   f"{state.epoch}, val {res.get('val', {}).get('accuracy', float('nan')):.4f}, test {t:.4f}")
        log.info("%s; run written to %s", summary, target)
        return FinetuneResult(target, metrics, summary, resumed_from)

    def _sidecar(self) -> dict:
        from ..classify import _versions

        head = self.model.get_submodule(self.head_node)
        spec = dict(self.base_spec, weights_path=self.wts.path)
        spec["preprocessing"] = dict(spec["preprocessing"], decoder=self.cfg.decoder)
        return {"spec": spec, "class_names": list(self.rows.class_names), "freeze_to": self.freeze_alias,
                "head": {"node": self.head_node, "norm": head.norm.kind, "in_features": head.linear.in_features,
                         "n_classes": head.linear.out_features}, "config": asdict(self.cfg), "versions": _versions()}

    def _metrics(self, state, groups, res, resumed_from) -> dict:
        from ..classify import _now, _versions

        cfg = self.cfg
        mode = "scratch" if self.wts.kind == "none" else (
            f"frozen prefix to {self.freeze_alias}" + (" (cached)" if self.cached else "") if self.split >= 0
            else "all layers")
        r = dict(res, best_epoch=state.best_epoch, epochs_run=state.epoch, stopped_early=state.stopped_early,
                 model="model.safetensors")
        return {
            "schema": METRICS_SCHEMA, "kind": "finetune", "created": _now(), "versions": _versions(),
            "dataset": {"root": self.manifest.root, "manifest_hash": self.manifest.digest(),
                        "class_names": list(self.rows.class_names)},
            "split": self.rows.split.to_dict(),
            "settings": dict(asdict(cfg), mode=mode, device=self.device, bn_policy=self.bn,
                             groups=[{"name": g["name"], "lr": g["initial_lr"], "lr_scale": g["lr_scale"],
                                      "weight_decay": g["weight_decay"], "n_params": sum(p.numel() for p in g["params"])}
                                     for g in groups],
                             frozen_stages=list(self.frozen_nodes), head_init=getattr(self, "head_init", None)),
            "cache": getattr(self, "cache_info", None),
            "results": {"finetune": {"softmax": r}},
            "best": {"layers": "finetune", "clf": "softmax", "val_accuracy": res.get("val", {}).get("accuracy"),
                     "test_accuracy": res["test"]["accuracy"], "file": "model.safetensors"},
            "best_epoch": state.best_epoch, "history": state.history, "resumed_from_epoch": resumed_from,
            "timing": dict(self.timing, epoch_seconds=[h["epoch_seconds"] for h in state.history]),
        }
