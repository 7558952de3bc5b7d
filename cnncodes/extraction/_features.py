"""The model runner: a backbone with forward hooks that pool the requested layers."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from .. import store
from ..backbones import BackboneSpec, ResolvedWeights

class _Runner:
    """A model with forward hooks that pool the requested layers, on one device."""

    def __init__(self, spec: BackboneSpec, weights: ResolvedWeights, layers, device: str, precision: str):
        import torch

        from ..backbones import build_model

        self.torch = torch
        self.device = device
        self.precision = precision
        self.model = build_model(spec, weights).to(device)
        # channels_last on every device: faster on GPUs, and on this project's CPUs 1.3-1.7x for
        # EfficientNet-Lite0 (neutral for AlexNet), measured forward-only at batch 64
        self.model = self.model.to(memory_format=torch.channels_last)
        pre = spec.preprocessing
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.crop = pre.crop
        modules = dict(self.model.named_modules())
        self.layers = layers
        self.outputs: dict[str, object] = {}
        self.map_shapes: dict[str, tuple[int, ...]] = {}
        self._handles = []
        by_node: dict[str, list] = {}
        for ld, pool, key, _fp in layers:
            if ld.node not in modules:
                raise AssertionError(f"backbone {spec.name} has no module {ld.node!r} for layer {ld.alias!r}")
            by_node.setdefault(ld.node, []).append((key, pool, ld))
        self._by_node = by_node
        for node, items in by_node.items():
            self._handles.append(modules[node].register_forward_hook(self._make_hook(items)))
        self.activate([key for _ld, _p, key, _fp in layers])

    def activate(self, keys: Sequence[str]) -> None:
        """Capture only ``keys``; the forward pass stops once they are all captured."""
        self.active = set(keys)
        self._needed = sum(1 for items in self._by_node.values() if any(k in self.active for k, _p, _l in items))

    class _Stop(Exception):
        pass

    def _make_hook(self, items):
        torch = self.torch
        F = torch.nn.functional

        def hook(_module, _inp, out):
            items_on = [it for it in items if it[0] in self.active]
            if not items_on:
                return
            for key, pool, _ld in items_on:
                t = out
                if t.dim() == 4:
                    self.map_shapes[key] = tuple(t.shape[1:])
                    mode, grid = store.parse_pool(pool)
                    if mode == "none":
                        t = t.flatten(1)
                    elif grid == 1:
                        t = t.float().mean((2, 3)) if mode == "avg" else t.amax((2, 3))
                    else:
                        fn = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
                        t = fn(t.float(), grid).flatten(1)
                else:
                    t = t.flatten(1)
                # a copy, so that no later in-place op can touch it
                self.outputs[key] = t.float().clone()
            self._fired += 1
            if self._fired == self._needed:
                raise _Runner._Stop  # the rest of the network is not needed

        return hook

    def __call__(self, batch_u8) -> dict[str, np.ndarray]:
        """Run a uint8 (B, 3, H, W) batch; return {key: float32 (B, dim)}."""
        torch = self.torch
        x = batch_u8.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        x = x.float().div_(255.0).sub_(self.mean).div_(self.std)  # in place: the same arithmetic, no temporaries
        self.outputs = {}
        self._fired = 0
        ctx = contextlib.nullcontext()
        if self.precision in ("bf16", "fp16"):
            dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
            ctx = torch.autocast(device_type=self.device, dtype=dt)
        with torch.inference_mode(), ctx:
            try:
                self.model(x)
            except _Runner._Stop:
                pass
        missing = [key for key in self.active if key not in self.outputs]
        if missing:
            raise AssertionError(f"no output captured for {missing}")
        return {k: v.cpu().numpy() for k, v in self.outputs.items()}
