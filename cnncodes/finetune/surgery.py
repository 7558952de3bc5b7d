"""Model surgery for fine-tuning: new head, frozen prefix, BatchNorm policy, parameter groups.

* **New head.** The backbone's ImageNet classifier (``backbones.classifier_node``) is replaced by a
  :class:`Head` — a code normaliser followed by a ``Linear`` for the dataset's classes. It is
  randomly initialised (normaliser ``none``, seeded), or copied from a softmax trained by
  ``train_svm.py`` on the codes the head reads (:func:`head_from_run`). train_svm normalises codes
  before its classifier; the head reproduces that mapping exactly: ``l2`` and ``sqrt`` (signed
  square root, then L2) as the same operations in torch, ``standard`` folded into the linear layer
  (``W / scale``, ``b - W @ (mean / scale)``), ``none`` as the identity.
* **Frozen prefix.** ``freeze_to=L``: every stage of the backbone's chain up to the one whose output
  is layer L gets ``requires_grad=False`` and stays in eval mode (its BatchNorm statistics never move).
* **BatchNorm policy** (``bn``): ``frozen`` keeps every BatchNorm in eval mode — running statistics
  are ImageNet's and never updated, the affine weights of trainable stages still learn (the Keras
  rule; on a CPU batches are 16-32 images, whose batch statistics are noisy and would overwrite
  ImageNet's); ``train`` lets the trainable stages' BatchNorms use batch statistics and update
  their running ones (fastai/timm). ``auto`` (default) is ``frozen`` with pretrained weights and
  ``train`` from scratch (random running statistics mean nothing).
* **Parameter groups**, all in the optimizer from the start (skorch style: no group is added later,
  so a scheduler built once sees them all): the head at ``lr``; the pretrained trainable stages at
  ``lr * backbone_lr_mult`` or, with ``layer_decay=D``, at ``lr * D**k`` for the k-th stage with
  parameters below the head; no weight decay on 1-D parameters (norm weights, biases), as timm's
  default. Every group records ``name`` and ``lr_scale``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..backbones import (
    BackboneSpec,
    ResolvedWeights,
    Stage,
    backbone_chain,
    build_model,
    classifier_node,
)
from ..errors import CacheMismatchError, InvalidParameterError, UsageError

__all__ = ["Head", "Normalise", "build_finetune_model", "head_from_run", "head_input_alias", "freeze_prefix",
           "set_modes", "param_groups", "resolve_bn", "BN_POLICIES"]

log = logging.getLogger(__name__)

BN_POLICIES = ("auto", "frozen", "train")


class Normalise(nn.Module):
    """train_svm's code normalisers in torch: ``none``, ``l2``, ``sqrt`` (signed square root, then L2)."""

    def __init__(self, kind: str = "none"):
        super().__init__()
        if kind not in ("none", "l2", "sqrt"):
            raise UsageError(f"internal: no torch normaliser {kind!r}")
        self.kind = kind

    def forward(self, x):
        if self.kind == "none":
            return x
        if self.kind == "sqrt":
            x = torch.sign(x) * torch.sqrt(torch.abs(x))
        # sklearn's normalize: rows of norm 0 are left as they are
        n = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / torch.where(n == 0, torch.ones_like(n), n)

    def extra_repr(self) -> str:
        return self.kind


class Head(nn.Module):
    """The new classifier: a code normaliser, then a linear layer."""

    def __init__(self, in_features: int, n_classes: int, norm: str = "none"):
        super().__init__()
        self.norm = Normalise(norm)
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.linear(self.norm(torch.flatten(x, 1)))


def _set_module(model, node: str, new) -> None:
    parent, _, leaf = node.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, new)


def build_finetune_model(spec: BackboneSpec, weights: ResolvedWeights, n_classes: int, *, seed: int = 0,
                         head_norm: str = "none"):
    """``spec``'s network with ``weights``, its classifier replaced by a seeded random :class:`Head`.

    All parameters are trainable and in-place activations are off (as for extraction).
    """
    model = build_model(spec, weights)
    node = classifier_node(spec.name)
    old = model.get_submodule(node)
    in_features = int(old.in_features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(in_features, n_classes, head_norm)
    _set_module(model, node, head)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def head_input_alias(spec: BackboneSpec, stages: Sequence[Stage]) -> str | None:
    """The layer alias whose code is the head's input (``pool`` for EfficientNet, ``fc7`` for AlexNet)."""
    node = classifier_node(spec.name)
    nodes = [s.node for s in stages]
    prev = nodes[nodes.index(node) - 1]
    for alias, ld in spec.layers.items():
        if ld.node == prev and ld.stage != "pre":
            return alias
    return None


def head_from_run(run: str | Path, *, spec: BackboneSpec, base_spec: dict, class_names: Sequence[str],
                  in_alias: str, in_features: int) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """The head's normaliser, weight and bias taken from a softmax of a ``train_svm.py`` run.

    Returns ``(norm, W (K, D), b (K,), info)`` such that ``softmax(W @ norm(x) + b)`` equals the
    pipeline's ``predict_proba(x)``.

    Raises
    ------
    UsageError
        Not a softmax, other layers, classes or extraction spec than this fine-tuning's.
    """
    from ..classify import find_model, load_model

    path = find_model(run, None if Path(run).is_file() else _softmax_name(run, in_alias))
    est, meta = load_model(path)
    if meta.get("classifier") != "softmax":
        raise UsageError(f"The 'init_head_from' parameter needs a softmax model; {path} is a "
                         f"{meta.get('classifier')!r}. Train a softmax on layer {in_alias} first (train_svm).")
    recs = meta.get("records", {})
    aliases = [recs.get(k, {}).get("alias") for k in meta.get("layers", [])]
    if aliases != [in_alias] or int(meta.get("n_features", -1)) != in_features:
        raise UsageError(f"The 'init_head_from' parameter: the head reads layer {in_alias!r} ({in_features}-D) of {spec.name}; "
                         f"{path} was trained on {meta.get('layers')} ({meta.get('n_features')}-D).")
    diff = _spec_diff(meta.get("spec", {}), base_spec)
    if diff:
        raise CacheMismatchError(f"The 'init_head_from' parameter: {path} was trained on codes of another extraction spec "
                                 f"({'; '.join(diff)}).")
    if list(meta.get("class_names", [])) != list(class_names):
        raise UsageError(f"The 'init_head_from' parameter: {path} knows the classes {meta.get('class_names')}, this dataset has "
                         f"{list(class_names)}.")
    norm = meta["norm"]
    clf = est.named_steps["clf"]
    W = np.asarray(clf.coef_, dtype=np.float64)
    b = np.asarray(clf.intercept_, dtype=np.float64)
    if W.shape[0] == 1 and len(class_names) == 2:  # binary LogisticRegression: p(1) = sigmoid(w.x + b)
        W = np.vstack([np.zeros_like(W), W])
        b = np.array([0.0, b[0]])
    if norm == "standard":  # fold (x - mean) / scale into the linear layer
        sc = est.named_steps["norm"]
        W = W / sc.scale_[None, :]
        b = b - W @ sc.mean_
        norm = "none"
    return norm, W.astype(np.float32), b.astype(np.float32), {"model": str(path), "norm": meta["norm"],
                                                              "C": meta.get("C"), "meta": meta}


def probe_images(model_path: str | Path, meta: dict) -> set[str] | None:
    """The absolute paths of the images a ``train_svm.py`` model was fitted on, or None when its run
    folder or cache no longer says.

    ``train_svm.py`` refits its final model on train+val, so a head taken from it has seen the val images
    of the same split: a fine-tuning that picks its best epoch on those images then reads an optimistic
    score. The run's predictions file lists every row with its split; the cache gives the data root.
    """
    import csv

    from ..store import read_info

    model_path = Path(model_path)
    run = model_path.parent.parent if model_path.parent.name == "models" else model_path.parent
    stem = model_path.name.split(".")[0]
    layers = "+".join(meta.get("layers", []))
    candidates = [run / "predictions" / f"{stem}.csv", run / "predictions" / f"{layers}__softmax.csv"]
    pred = next((c for c in candidates if c.is_file()), None)
    try:
        root = Path(read_info(meta["cache"]).dataset_root) if pred is not None and meta.get("cache") else None
    except Exception:  # the cache was moved or deleted: the check cannot be made, training goes on
        root = None
    if pred is None or root is None:
        return None
    with open(pred, newline="", encoding="utf-8") as f:
        return {str((root / r["path"]).resolve()) for r in csv.DictReader(f) if r["split"] in ("train", "val")}


def _softmax_name(run, in_alias: str) -> str | None:
    from ..modelfile import MODEL_SUFFIX, PICKLE_SUFFIXES

    d = Path(run) / "models"
    names = sorted({p.stem for s in (MODEL_SUFFIX, *PICKLE_SUFFIXES) for p in d.glob(f"*__softmax{s}")}) \
        if d.is_dir() else []
    return names[0] if len(names) == 1 else (f"{in_alias}__softmax" if f"{in_alias}__softmax" in names else None)


def _spec_diff(a: dict, b: dict) -> list[str]:
    out = []
    if a.get("backbone") != b.get("backbone"):
        out.append(f"backbone {a.get('backbone')} vs {b.get('backbone')}")
    wa, wb = a.get("weights", {}), b.get("weights", {})
    if (wa.get("identity"), wa.get("sha256")) != (wb.get("identity"), wb.get("sha256")):
        out.append(f"weights {wa.get('identity')} vs {wb.get('identity')}")
    pa, pb = a.get("preprocessing", {}), b.get("preprocessing", {})
    for k in ("resize", "crop", "interpolation", "mean", "std"):
        if pa.get(k) != pb.get(k):
            out.append(f"preprocessing.{k} {pa.get(k)} vs {pb.get(k)}")
    return out


def load_head(model, spec: BackboneSpec, norm: str, W: np.ndarray, b: np.ndarray) -> None:
    """Put a normaliser and weights into the model's head."""
    head = model.get_submodule(classifier_node(spec.name))
    head.norm.kind = norm
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(W))
        head.linear.bias.copy_(torch.from_numpy(b))


def freeze_prefix(model, stages: Sequence[Stage], split: int) -> list[str]:
    """``requires_grad=False`` for the stages ``[0, split]``; return their nodes."""
    nodes = [s.node for s in stages[: split + 1]]
    for node in nodes:
        for p in model.get_submodule(node).parameters():
            p.requires_grad_(False)
    return nodes


def resolve_bn(bn: str, weights: ResolvedWeights) -> str:
    if bn not in BN_POLICIES:
        raise InvalidParameterError("bn", "finetune", f"must be one of {', '.join(BN_POLICIES)}. Got {bn!r} instead.")
    if bn == "auto":
        return "train" if weights.kind == "none" else "frozen"
    return bn


def set_modes(model, frozen_nodes: Sequence[str], bn: str, training: bool) -> None:
    """Train/eval mode: frozen stages always eval; with ``bn="frozen"`` every BatchNorm eval."""
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train(training)
    if not training:
        return
    for node in frozen_nodes:
        model.get_submodule(node).eval()
    if bn == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def param_groups(model, spec: BackboneSpec, stages: Sequence[Stage] | None, *, lr: float,
                 backbone_lr_mult: float | None, layer_decay: float | None, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups (see the module docstring); frozen parameters are left out."""
    head_node = classifier_node(spec.name)
    head_params = {id(p) for p in model.get_submodule(head_node).parameters()}
    if stages is not None:
        owners = [(s.node, list(model.get_submodule(s.node).parameters())) for s in stages if s.node != head_node]
    else:
        owners = [("body", [p for p in model.parameters() if id(p) not in head_params])]
    owners = [(n, [p for p in ps if p.requires_grad]) for n, ps in owners]
    owners = [(n, ps) for n, ps in owners if ps]
    scaled: list[tuple[str, float, list]] = [("head", 1.0, list(model.get_submodule(head_node).parameters()))]
    if layer_decay is not None:
        for k, (n, ps) in enumerate(reversed(owners), start=1):
            scaled.append((n, float(layer_decay) ** k, ps))
    elif owners:
        scaled.append(("backbone", float(backbone_lr_mult), [p for _n, ps in owners for p in ps]))
    groups = []
    for name, scale, ps in scaled:
        decay = [p for p in ps if p.ndim > 1]
        no_decay = [p for p in ps if p.ndim <= 1]
        for tag, plist, wd in (("", decay, weight_decay), (".no_decay", no_decay, 0.0)):
            if plist:
                groups.append({"params": plist, "lr": lr * scale, "initial_lr": lr * scale, "weight_decay": wd,
                               "name": name + tag, "lr_scale": scale})
    return groups


def trainable_chain(spec: BackboneSpec, model) -> list[Stage] | None:
    """The backbone's chain, or None when it has none (it can only be fine-tuned whole)."""
    try:
        return backbone_chain(spec.name, model)
    except UsageError:
        return None
