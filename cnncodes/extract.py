"""Extract CNN codes into a crash-safe, incremental HDF5 cache.

The flow of :func:`extract`:

1. **Plan.** List the images (folder or CSV), resolve the backbone, weights and layers,
   and compute the extraction fingerprint. The cache file is named after the dataset and
   the fingerprint, so the same command finds the same file.
2. **Hit, append or extend.** If the file exists, rows whose image is unchanged (same
   path, size, mtime, label, split) keep their codes; new or changed images, and layers
   the file does not hold yet, are the only work. No work is a *cache hit*: no forward
   pass, no torch import.
3. **Run.** The work is cut into batches with fixed boundaries. Each finished batch is
   written as a shard file ``<cache>.partial/shard-...npz`` (temporary name, fsync,
   rename; its sha256 is in its name). A killed run leaves finished shards behind; the
   same command resumes from them and recomputes only the missing batches, so the
   result equals a clean run (bitwise on CPU with the same batch size).
4. **Consolidate.** Old codes and shards are streamed, in the manifest's order, into a
   new HDF5 file written under a temporary name and renamed over the old one. Only then
   is the ``.partial`` folder removed.

Bad images are recorded (status ``error``, a message, NaN codes), never replaced by a
neighbour; above ``error_budget`` the run stops, keeping its shards.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import functools
import glob
import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from numbers import Integral, Real
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from . import store
from .backbones import (
    BackboneSpec,
    LayerDef,
    ResolvedWeights,
    get_backbone,
    resolve_weights,
)
from .errors import (
    CacheCorruptError,
    CacheLockedError,
    CacheMismatchError,
    CnnCodesError,
    DatasetError,
    ErrorBudgetExceeded,
    ExtractionWriteError,
    InvalidParameterError,
    UsageError,
)
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir
from ._validation import Interval, NonEmptyStr, PathLike, SequenceOf, StrOptions, validate_params
from .images import (
    DEFAULT_MAX_PIXELS,
    Manifest,
    is_plain_jpeg,
    load_image,
    pixels_over_limit,
    read_csv_list,
    scan_folder,
)
from .views import ViewSet, check_combine, combine_codes, pil_views, tensor_views
from .views import resolve as resolve_views

__all__ = ["DEFAULT_OUT", "ExtractConfig", "ExtractResult", "extract", "extract_images", "plan_layers"]

log = logging.getLogger(__name__)

DEFAULT_OUT = "artifacts/codes"
#: Version of what a spec's codes mean (part of the fingerprint). The file layout has its own,
#: ``store.SCHEMA_VERSION``: new row fields do not change any code, so they must not retire caches
#: or trained models.
_SPEC_VERSION = 1
_SHARD_RE = re.compile(r"^shard-(\d+)_(\d+)-(\d+)-([0-9a-f]{16})\.npz$")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that defines a cache: two equal configs give the same codes.

    Parameters
    ----------
    model : str
        Registered backbone name (``alexnet``, ``efficientnet_lite0``...).
    layers : tuple of str
        Layer aliases (``fc7``, ``conv5``...).
    weights : str
        ``"default"`` (ImageNet), ``"none"`` (random init, seed 0) or a state-dict path.
    pool : str
        Pooling of conv-map layers: ``avg``, ``max``, ``none`` or a grid (``avg2x2``).
    dtype : str
        Storage type of codes: ``float16`` or ``float32``.
    precision : str
        ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
    draft : bool
        Allow JPEG downscale-on-decode for big photos.
    decoder : str
        ``torchvision`` (JPEG decoding and uint8 resizing in torch, as torchvision's tensor
        transforms) or ``pil`` (Pillow, as torchvision's transforms on PIL images).
    """

    model: str
    layers: tuple[str, ...]
    weights: str = "default"
    pool: str = "avg"
    dtype: str = "float16"
    precision: str = "auto"
    draft: bool = True
    decoder: str = "torchvision"


@dataclass
class ExtractResult:
    """What :func:`extract` did.

    Attributes
    ----------
    path : Path
        The cache file.
    info : store.CacheInfo
    keys : list of str
        The dataset names under ``/codes`` of the requested layers (pass them to ``load_codes``).
    hit : bool
        True when nothing had to be computed.
    n_computed : int
        Images run through the network in this call.
    n_reused : int
        Rows whose codes came from the existing cache.
    resumed_from : int
        Images already done by an interrupted run that this call resumed.
    n_failed : int
    seconds : float
        Wall time of the whole call.
    stream_seconds : float
        Of those, the time from the first decoded batch reaching the network to the last
        batch's codes: the steady-state pipeline, without model loading, the wait for the
        first batch and the final HDF5 write. ``n_computed / stream_seconds`` is the
        pipeline's streaming rate.
    """

    path: Path
    info: store.CacheInfo
    keys: list[str]
    hit: bool
    n_computed: int = 0
    n_reused: int = 0
    resumed_from: int = 0
    n_failed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stream_seconds: float = 0.0

    def summary(self) -> str:
        if self.hit:
            return f"cache hit: {self.info.n_rows} images, layers {', '.join(self.keys)} in {self.path} ({self.seconds:.2f} s)"
        rate = self.n_computed / self.seconds if self.seconds > 0 else float("nan")
        parts = [f"{self.n_computed} images in {self.seconds:.1f} s ({rate:.1f} img/s)"]
        if self.n_reused:
            parts.append(f"{self.n_reused} reused")
        if self.resumed_from:
            parts.append(f"resumed after {self.resumed_from}")
        if self.n_failed:
            parts.append(f"{self.n_failed} failed")
        return f"extracted {', '.join(parts)}; codes in {self.path}"


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "torchvision", "timm", "numpy", "h5py", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    from . import __version__

    out["cnncodes"] = __version__
    return out


def _major(v: str | None) -> str | None:
    if v is None:
        return None
    parts = v.split("+")[0].split(".")
    return parts[0] if parts[0] != "0" else ".".join(parts[:2])


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"Unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device != "cuda":
        raise UsageError("--precision fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    return precision


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Raises
    ------
    UsageError
        ``cuda`` asked for on a machine without one.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"Unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    return "cpu"


def effective_backbone(spec: BackboneSpec, fc_as_conv: bool = False, input_size: int | None = None) -> BackboneSpec:
    """``spec`` with its fully connected layers as convolutions and/or another input size
    (both recorded in the extraction spec through ``arch_args`` and the preprocessing)."""
    from .fc_conv import with_fc_as_conv, with_input_size

    if input_size is not None and fc_as_conv and input_size < spec.preprocessing.crop:
        raise InvalidParameterError("input_size", "extract",
                                    f"must be >= {spec.preprocessing.crop} with fc_as_conv (the fully connected layers' "
                                    f"field). Got {input_size} instead.")
    if fc_as_conv:
        spec = with_fc_as_conv(spec)
    if input_size is not None:
        spec = with_input_size(spec, int(input_size))
    return spec


def _base_spec(spec: BackboneSpec, weights: ResolvedWeights, dtype: str, precision: str, draft: bool,
               decoder: str, views: ViewSet = ViewSet("center"), combine: str = "mean") -> dict:
    if dtype not in ("float16", "float32"):
        raise UsageError(f"Unknown dtype {dtype!r}: use float16 or float32")
    _check_decoder(decoder, spec.preprocessing)
    pre = spec.preprocessing.to_dict()
    pre["draft"] = bool(draft)
    if decoder != "pil":  # absent = Pillow, as in caches written before the choice existed
        pre["decoder"] = decoder
    if views.kind != "center":  # absent = the centre crop alone, as before views existed
        pre["views"] = views.name
        pre["combine"] = combine
    v = _versions()
    return {
        "backbone": spec.name,
        # the architecture's identity (timm model name, torchvision builder arguments): a backbone name
        # whose network changes gets another fingerprint, so no cache of the old network is reused
        "arch_args": spec.arch_args,
        "weights": {"kind": weights.kind, "identity": weights.identity, "sha256": weights.sha256},
        "preprocessing": pre,
        "dtype": dtype,
        "precision": precision,
        "library_majors": {k: _major(v[k]) for k in ("torch", "torchvision", "timm")},
        "schema_version": _SPEC_VERSION,
    }


def plan_layers(spec: BackboneSpec, aliases: Sequence[str], pool: str, base_fp: str) -> list[tuple[LayerDef, str, str, str]]:
    """Resolve aliases into (LayerDef, pooling, key, layer fingerprint), checked up front.

    Raises
    ------
    UnknownLayerError
        With a "did you mean" hint.
    UsageError
        For a bad pooling or a duplicate layer.
    """
    store.parse_pool(pool)
    out, seen = [], set()
    for alias in aliases:
        ld = spec.layer(alias)
        p = ld.fixed_pool or ("avg" if ld.kind == "vector" else pool)
        key = store.layer_key(ld.alias, p, "vector" if ld.fixed_pool else ld.kind)
        if key in seen:
            continue
        seen.add(key)
        fp = store.fingerprint_of({"base": base_fp, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": p})
        out.append((ld, p, key, fp))
    if not out:
        raise UsageError(f"Name at least one layer. Known for {spec.name}: {', '.join(spec.layers)}")
    return out


def _load_manifest(data: str | os.PathLike) -> Manifest:
    p = Path(data)
    if p.is_file() and p.suffix.lower() in (".csv", ".txt"):
        return read_csv_list(p)
    if p.is_file():
        raise DatasetError(f"{p} is a file; give an image folder (DATA/<class>/<image>) or a CSV list (path,label[,split])")
    return scan_folder(p)


def _dataset_identity(manifest: Manifest) -> str:
    """What names a dataset: its resolved root, how it was listed, and for a CSV the list itself
    (every list of one folder shares that folder as its root)."""
    ident = f"{manifest.root}|{manifest.source}"  # an image folder's identity, as in caches written before lists had one
    return f"{ident}|{manifest.list_path}" if manifest.list_path else ident


def _cache_path(out: Path, manifest: Manifest, spec_name: str, base_fp: str, name: str | None) -> Path:
    stem = name or Path(manifest.root).name or "data"
    if manifest.list_path and not name:
        stem = f"{stem}_{Path(manifest.list_path).stem}"  # data_train.csv and data_test.csv read apart
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    tag = hashlib.sha256(f"{base_fp}|{_dataset_identity(manifest)}".encode()).hexdigest()[:10]
    return out / f"{stem}-{spec_name}-{tag}.h5"


def _check_same_dataset(info: store.CacheInfo, manifest: Manifest) -> None:
    """Refuse a cache file whose recorded dataset is not this one (a renamed file, a name collision)."""
    if (info.dataset_root, info.dataset_list) != (manifest.root, manifest.list_path):
        def show(root, lst):
            return lst or root

        raise CacheMismatchError(
            f"{info.path} holds the codes of {show(info.dataset_root, info.dataset_list)}, not of "
            f"{show(manifest.root, manifest.list_path)}. Give another --out folder, or pass --overwrite to replace it."
        )


# --------------------------------------------------------------------------- model runner


class _Runner:
    """A model with forward hooks that pool the requested layers, on one device."""

    def __init__(self, spec: BackboneSpec, weights: ResolvedWeights, layers, device: str, precision: str):
        import torch

        from .backbones import build_model

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
                raise CnnCodesError(f"internal: backbone {spec.name} has no module {ld.node!r} for layer {ld.alias!r}")
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
            raise CnnCodesError(f"internal: no output captured for {missing}")
        return {k: v.cpu().numpy() for k, v in self.outputs.items()}


_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _resized_size(w: int, h: int, pre) -> tuple[int, int]:
    """torchvision's ``Resize(pre.resize)`` output size: the shorter side to ``pre.resize``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _crop_box(new_w: int, new_h: int, c: int) -> tuple[int, int]:
    """torchvision's ``CenterCrop(c)`` offsets (top, left)."""
    return int(round((new_h - c) / 2.0)), int(round((new_w - c) / 2.0))


#: Longest resized side, in multiples of ``pre.resize``, that an image is resized to whole. A
#: 3x40,000 strip would otherwise become 256x3,413,333 pixels (2.6 GB, 6 GB at the peak of a
#: tensor resize) for the 224x224 that the centre crop keeps; see :func:`_source_window`.
MAX_RESIZED_ASPECT = 16


def _source_window(w: int, h: int, pre) -> tuple[int, int, int, int] | None:
    """The centred part of a ``w`` x ``h`` image to resize, as (left, top, right, bottom), or None for all of it.

    Images whose resized long side stays within ``MAX_RESIZED_ASPECT * pre.resize`` (aspect
    ratios up to 16:1: every ordinary photo and panorama) are resized whole, exactly as
    torchvision's ``Resize`` + ``CenterCrop``. A longer one is first cut, along its long side, to
    the centred window that resizes to that bound (an even margin on each side, so the window's
    centre is the image's), then resized and cropped the same way: the resize costs no more than
    a 16:1 image's, and the crop still comes from the image's centre at almost the same scale (within
    about one output pixel in position, from the rounding of sizes and offsets).
    """
    bound = MAX_RESIZED_ASPECT * pre.resize
    if max(_resized_size(w, h, pre)) <= bound:
        return None
    short, long = min(w, h), max(w, h)
    keep = MAX_RESIZED_ASPECT * short  # source pixels that resize to `bound`, at the same scale
    keep = min(long, keep + (long - keep) % 2)
    start = (long - keep) // 2
    return (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)


def resize_crop(img, pre) -> np.ndarray:
    """Resize the shorter side to ``pre.resize`` and keep the centre ``pre.crop`` square, as uint8 HWC.

    The same output sizes, rounding and (antialiased) PIL resampling as torchvision's
    ``Resize(pre.resize)`` + ``CenterCrop(pre.crop)`` on a PIL image, without importing torchvision
    in every decoding worker. Images longer than 16:1 are first cut to their centre
    (:func:`_source_window`), so that the resize stays small.
    """
    window = _source_window(*img.size, pre)
    if window is not None:
        img = img.crop(window)
    w, h = img.size
    new_w, new_h = _resized_size(w, h, pre)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_RESAMPLE[pre.interpolation])
    c = pre.crop
    top, left = _crop_box(new_w, new_h, c)
    return np.asarray(img.crop((left, top, left + c, top + c)), dtype=np.uint8)


def resize_crop_tensor(t, pre):
    """:func:`resize_crop` on a uint8 (3, H, W) tensor with torch's antialiased uint8 kernels.

    Equal to ``torchvision.transforms.v2``'s ``Resize(pre.resize)`` + ``CenterCrop(pre.crop)`` on a
    uint8 tensor image (v1 transforms on tensors resample in float and may differ by 1); 2-6x
    faster than Pillow's resampling on this project's CPUs. It differs from the PIL pipeline by at
    most 1 (bilinear) or 2 (bicubic) grey levels in a few pixels (measured on the shared datasets).
    Images longer than 16:1 are first cut to their centre, as in :func:`resize_crop`.
    """
    import torch

    window = _source_window(t.shape[2], t.shape[1], pre)
    if window is not None:
        left, top, right, bottom = window
        t = t[:, top:bottom, left:right]
    _, h, w = t.shape
    new_w, new_h = _resized_size(w, h, pre)
    if (new_w, new_h) != (w, h):
        t = torch.nn.functional.interpolate(t[None], size=(new_h, new_w), mode=pre.interpolation, antialias=True)[0]
    c = pre.crop
    top, left = _crop_box(new_w, new_h, c)
    return t[:, top:top + c, left:left + c].contiguous()


#: Image decoding + resizing back ends (part of the fingerprint: their pixels differ slightly).
#: ``torchvision``: JPEGs through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, the same pixels as
#: Pillow) and torch's uint8 resize, as torchvision's tensor transforms do; other files through Pillow.
#: ``pil``: Pillow decoding and resampling, as torchvision's transforms on PIL images do.
DECODERS = ("torchvision", "pil")


def _check_decoder(decoder: str, pre) -> None:
    if decoder not in DECODERS:
        raise UsageError(f"Unknown decoder {decoder!r}: use {' or '.join(DECODERS)}")
    if decoder == "torchvision" and pre.interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UsageError(f"--decoder torchvision cannot resample with {pre.interpolation!r}; use --decoder pil")


@functools.cache
def _tv_decode():
    """torchvision's JPEG decoder, or None where this torchvision has none (Pillow decodes then:
    the same libjpeg-turbo pixels, only slower)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
    except ImportError:  # pragma: no cover - torchvision without its image extension
        return None
    return ImageReadMode, decode_jpeg, read_file


def decode_uint8(path: str, decoder: str, draft: int | None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """One image file as a uint8 (3, H, W) tensor at its decoded size, and a note.

    ``decoder="torchvision"`` decodes plain JPEGs with ``decode_jpeg`` (the same pixels as Pillow);
    anything else, and every file with ``decoder="pil"``, goes through :func:`cnncodes.images.load_image`
    (which raises :class:`~cnncodes.errors.ImageDecodeError` for a bad file). Shared by extraction and
    fine-tuning's train-time augmentation.
    """
    import torch

    t = None
    tv = _tv_decode() if decoder != "pil" else None
    if tv is not None and is_plain_jpeg(path, draft=draft, max_pixels=max_pixels):
        ImageReadMode, decode_jpeg, read_file = tv
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t, note = decode_jpeg(read_file(path), mode=ImageReadMode.RGB), ""
            # torchvision 0.29 deprecates its image decoders (DeprecationWarning at every call);
            # any other warning ("corrupt JPEG data") leaves the file to Pillow's judgement
            if any(not issubclass(w.category, DeprecationWarning) for w in caught):
                t = None
        except Exception:  # noqa: BLE001 - load_image below says what is wrong with the file
            t = None
    if t is None:
        img, note = load_image(path, draft=draft, max_pixels=max_pixels)
        t = torch.from_numpy(np.array(img).transpose(2, 0, 1))
    return t, note


class _ImageDataset:
    """Decodes and resizes one image to a uint8 CHW tensor; failures become a status, not an exception."""

    def __init__(self, paths: Sequence[str], pre, draft: bool, decoder: str = "pil", gate=None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, views: ViewSet = ViewSet("center")):
        if pre.resize < pre.crop:
            raise UsageError(f"preprocessing resizes to {pre.resize} px, less than its {pre.crop} px crop")
        _check_decoder(decoder, pre)
        self.paths = list(paths)
        self.pre = pre
        self.views = views
        # draft decoding keeps at least the largest size any view is resized to
        self.draft_size = max((pre.resize, *views.scales))
        self.draft = self.draft_size if draft else None
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.gate = gate  # see _loader
        self._parent = os.getpid()
        if decoder == "torchvision":
            _tv_decode()  # imported here, in the parent, not once per forked worker

    def _wait_for_gate(self) -> None:
        while not self.gate.wait(0.5):
            if os.getppid() != self._parent:  # the extraction was killed: do not linger
                os._exit(0)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str):
        import torch

        if self.decoder == "pil":
            img, note = load_image(path, draft=self.draft, max_pixels=self.max_pixels)
            if self.views.kind == "center":
                return torch.from_numpy(resize_crop(img, self.pre).transpose(2, 0, 1).copy())[None], note
            v = pil_views(img, self.pre, self.views, _PIL_RESAMPLE[self.pre.interpolation])
            return torch.from_numpy(v.transpose(0, 3, 1, 2).copy()), note
        t, note = decode_uint8(path, self.decoder, self.draft, self.max_pixels)
        if self.views.kind == "center":
            return resize_crop_tensor(t, self.pre)[None], note
        return tensor_views(t, self.pre, self.views), note

    def __getitem__(self, i: int):
        import torch

        if self.gate is not None and os.getpid() != self._parent:
            self._wait_for_gate()
        pre = self.pre
        try:
            t, note = self._decode(self.paths[i])
            return i, t, "ok", note
        except CnnCodesError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - any decoder/resizer failure is this row's status
            msg = f"{self.paths[i]}: {type(e).__name__}: {e}"
        return i, torch.zeros(self.views.count(), 3, pre.crop, pre.crop, dtype=torch.uint8), "error", msg


def _collate(items):
    import torch

    # each item holds its image's V views; they go through the network side by side
    idx = [it[0] for it in items]
    return idx, torch.cat([it[1] for it in items]), [it[2] for it in items], [it[3] for it in items]


@contextlib.contextmanager
def _heap_for_big_blocks(device: str) -> Iterator[None]:
    """Keep big tensors in the heap during a CPU extraction (glibc only).

    glibc serves every block above its mmap threshold (at most 32 MB) with ``mmap`` and gives
    it back with ``munmap``, so each batch page-faults its activations in again: on this
    project's machines half of a CPU forward pass went to the kernel (EfficientNet-Lite0,
    batch 64: 1.3 M page faults for 64 images; 7.3 -> 14.6 img/s without them). Disable mmap
    for the duration and restore glibc's defaults afterwards. ``CNNCODES_MALLOPT=0`` turns it off.
    """
    libc = None
    if device == "cpu" and os.environ.get("CNNCODES_MALLOPT", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
                libc = None
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-4, 65536)  # M_MMAP_MAX default
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD default
            libc.malloc_trim(0)


def _default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    return min(8, n) if device == "cuda" else max(1, min(4, n))


def _loader(paths, pre, draft, decoder, batches: list[list[int]], workers: int, device: str, gated: bool = False,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, views: ViewSet = ViewSet("center")):
    """A DataLoader of decoded batches, and its gate (None when not ``gated``).

    On a CPU the forward pass keeps every core busy, and a decoding worker that runs alongside
    it does not only take its own time: the model's OpenMP threads wait at their barriers for
    the thread it displaced (whole flowers5, AlexNet: streaming efficiency 0.81 where decoding
    alone would cost 5 %). A gated loader's workers decode only while the gate is open; the
    extraction closes it for each forward pass, so that decoding (on all cores, in the workers)
    and the forward pass (on all cores, in the model) take turns instead of fighting.
    ``CNNCODES_GATE=0`` turns it off. No more workers start than there are batches to decode.
    """
    import multiprocessing

    import torch
    from torch.utils.data import DataLoader

    workers = min(workers, len(batches))
    gate = None
    if gated and workers > 0 and os.environ.get("CNNCODES_GATE", "1") != "0":
        gate = multiprocessing.get_context().Event()
        gate.set()
    ds = _ImageDataset(paths, pre, draft, decoder, gate, max_pixels, views)
    kw = {}
    if workers > 0:
        kw = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=(device == "cuda" and torch.cuda.is_available()), **kw), gate


# --------------------------------------------------------------------------- shards


def _shard_name(job: int, batch: int, n: int, digest: str) -> str:
    return f"shard-{job}_{batch:06d}-{n}-{digest[:16]}.npz"


def _write_shard(pdir: Path, job: int, batch: int, rows: np.ndarray, status, messages, codes: dict) -> Path:
    buf = io.BytesIO()
    arrays = {"rows": np.asarray(rows, dtype=np.int64), "status": np.asarray(status, dtype=str),
              "message": np.asarray(messages, dtype=str)}
    for k, v in codes.items():
        arrays[f"codes/{k}"] = v
    np.savez(buf, **arrays)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = pdir / _shard_name(job, batch, len(rows), digest)
    atomic_write_bytes(path, data)
    return path


def _shard_bytes(path: Path) -> bytes | None:
    """A shard file's bytes, or None when they no longer match the sha256 in its name."""
    m = _SHARD_RE.match(path.name)
    data = path.read_bytes()
    return data if m is not None and hashlib.sha256(data).hexdigest()[:16] == m.group(4) else None


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    data = _shard_bytes(path)
    if data is None:
        raise CacheCorruptError(f"shard {path} changed after it was written (sha256 mismatch)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _scan_shards(pdir: Path, *, verify: bool = True) -> dict[tuple[int, int], Path]:
    """Finished shards by (job, batch).

    With ``verify``, shards whose bytes changed are deleted (and so recomputed); without it the
    names are only listed, for a caller that reads every shard through :func:`_read_shard`, which
    verifies it.
    """
    found = {}
    for p in pdir.glob("shard-*.npz"):
        m = _SHARD_RE.match(p.name)
        if m is None:
            continue
        if verify and _shard_bytes(p) is None:
            log.warning("Shard %s is corrupt (sha256 mismatch); it will be recomputed", p.name)
            p.unlink()
            continue
        found[(int(m.group(1)), int(m.group(2)))] = p
    return found


class _ShardWriter:
    """Writes shards on a background thread so that the forward pass never waits for the disk."""

    def __init__(self, pdir: Path, pause_at: int | None):
        self.pdir = pdir
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.pause_at = pause_at
        self.written = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                _write_shard(self.pdir, *item)
                self.written += 1
                if self.pause_at is not None and self.written == self.pause_at:
                    # test hook: a test kills the process while it waits here
                    print(f"CNNCODES_PAUSED {self.written}", flush=True)
                    time.sleep(3600)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, item) -> None:
        self.check()
        self.q.put(item)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        self.check()


# --------------------------------------------------------------------------- public API

DEVICES = ("auto", "cpu", "cuda")
_COUNT = Interval(Integral, 1, None, closed="left")
#: What :func:`extract_images` (and so prediction) accepts; :func:`extract` adds its own below.
_IMAGES_PARAMS = {
    "paths": [SequenceOf(PathLike())],
    "spec": [dict],
    "layer_keys": [SequenceOf(str, min_len=1)],
    "device": [StrOptions(DEVICES)],
    "batch_size": [_COUNT],
    "workers": [Interval(Integral, 0, None, closed="left"), None],
    "max_pixels": [_COUNT, None],
}
MAX_INPUT_SIZE = 4096
_EXTRACT_PARAMS = {
    **_IMAGES_PARAMS,
    "data": [PathLike()],
    "model": [str],
    "layers": [str, SequenceOf(str, min_len=1)],
    "weights": [PathLike()],
    "pool": [str],
    "out": [PathLike()],
    "dtype": [StrOptions(("float16", "float32"))],
    "precision": [StrOptions(("auto", "fp32", "bf16", "fp16"))],
    "draft": ["boolean"],
    "decoder": [StrOptions(DECODERS)],
    "compression": [StrOptions(("gzip", "sparse", "lzf", "zstd", "none"))],
    "error_budget": [Interval(Real, 0, 1, closed="both")],
    "overwrite": ["boolean"],
    "name": [NonEmptyStr(), None],
    "progress": ["boolean"],
    "verify_content": ["boolean"],
    "fc_as_conv": ["boolean"],
    # 4096 px is 16x the usual crop; 10**6 asked torch for terabytes per batch
    "input_size": [Interval(Integral, 32, MAX_INPUT_SIZE, closed="both"), None],
    "views": [str],
    "combine": [StrOptions(("mean", "max"))],
}


def _check_out_folder(out, caller: str) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise InvalidParameterError("out", caller, f"must be a folder (it is created if missing). Got {str(out)!r}, "
                                                   "a file, instead.")


def extract(
    data: str | os.PathLike,
    model: str,
    layers: Sequence[str] | str,
    *,
    weights: str = "default",
    pool: str = "avg",
    out: str | os.PathLike = DEFAULT_OUT,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    dtype: str = "float16",
    precision: str = "auto",
    draft: bool = True,
    decoder: str = "torchvision",
    compression: str = "gzip",
    error_budget: float = 0.05,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
    name: str | None = None,
    progress: bool = False,
    verify_content: bool = False,
    fc_as_conv: bool = False,
    input_size: int | None = None,
    views: str = "center",
    combine: str = "mean",
) -> ExtractResult:
    """Extract the codes of ``layers`` of ``model`` for every image of ``data`` into an HDF5 cache.

    Parameters
    ----------
    data : path-like
        An image folder (``DATA/<class>/<image>``, optionally under ``train/``, ``val/``,
        ``test/``) or a CSV list with a ``path,label[,split]`` header.
    model : str
        A registered backbone (:func:`cnncodes.list_backbones`).
    layers : str or list of str
        Layer aliases (``fc7``, ``conv5``...); all are computed in one forward pass.
    weights : str
        ``default`` (ImageNet), ``none`` (random init, seed 0) or a state-dict path.
    pool : str
        ``avg`` (default), ``max``, ``none`` or a grid such as ``avg2x2`` for conv maps.
    out : path-like
        Folder of cache files.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    batch_size, workers : int
        Network inputs per forward pass (images x views: with ``views="10crop"`` a batch of
        64 holds 6 images); decoding processes (default: by device and cores).
    dtype : str
        ``float16`` (default) or ``float32`` storage.
    precision : str
        ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
    draft : bool
        Let big JPEGs decode at 1/2, 1/4 or 1/8 scale when still at least ``resize`` pixels.
    decoder : str
        ``torchvision`` (default: JPEGs decoded by ``torchvision.io.decode_jpeg``, the same
        pixels as Pillow, and resized by torch's uint8 kernels, as torchvision's tensor
        transforms do; 1.5-2.5x less decoding work) or ``pil`` (Pillow throughout, bit-exact
        with torchvision's transforms on PIL images). Part of the cache's fingerprint.
    compression : str
        ``gzip`` (default, readable by plain h5py), ``sparse`` (zeros as bits, non-zero values
        byte-shuffled: about 20 % smaller for post-ReLU codes; read through ``load_codes``),
        ``lzf``, ``zstd`` (needs hdf5plugin), ``none``.
    error_budget : float
        Fraction of images allowed to fail before the run stops.
    max_pixels : int or None
        Images with more pixels fail (decompression bomb guard; default Pillow's limit, about
        89.5 million; ``None``: no limit). Rows of an existing cache that failed for their
        size alone are redone when the limit now admits them. Does not change any codes, so
        it is not part of the fingerprint.
    overwrite : bool
        Discard an unfinished extraction whose spec differs, and an existing file.
    progress : bool
        Show a progress bar (tqdm).
    verify_content : bool
        Hash every image's bytes and reuse a row only when they equal those recorded when it
        was extracted. By default a row is reused when the file's size, mtime, inode and ctime
        are those recorded (any rewrite changes the ctime), and only files whose inode or ctime
        changed with size and mtime kept (a copy, a restore) are hashed (see :func:`_match_rows`).
    fc_as_conv : bool
        AlexNet and VGG16 only: run the fully connected layers as convolutions, so that on
        inputs larger than 224 px ``fc6``/``fc7``/``fc8`` are maps, pooled like conv maps.
    input_size : int or None
        Crop size fed to the network (the shorter side is resized to ``input_size`` x the
        backbone's resize/crop ratio first); None keeps the backbone's preprocessing.
    views : str
        ``center`` (default), ``flip``, ``5crop``, ``10crop`` or ``multiscale[:S1,S2,...]``:
        views of each image run in the same batch and combined into one row.
    combine : str
        ``mean`` (default) or ``max`` over the views.

    Returns
    -------
    ExtractResult

    Raises
    ------
    InvalidParameterError, UsageError, DatasetError, UnknownBackboneError, UnknownLayerError
        Bad arguments, checked before any work (nothing is built or written).
    WeightsUnavailableError
        Default weights neither on disk nor downloadable.
    CacheLockedError
        Another process is writing this cache.
    CacheMismatchError
        An unfinished extraction with another spec or image list (use ``overwrite``).
    ErrorBudgetExceeded
        Too many images failed; finished shards are kept.
    ExtractionWriteError
        The disk is full or not writable; finished shards are kept.
    """
    t0 = time.perf_counter()
    validate_params(
        {"data": data, "model": model, "layers": layers, "weights": weights, "pool": pool, "out": out,
         "device": device, "batch_size": batch_size, "workers": workers, "dtype": dtype, "precision": precision,
         "draft": draft, "decoder": decoder, "compression": compression, "error_budget": error_budget,
         "max_pixels": max_pixels, "overwrite": overwrite, "name": name, "progress": progress,
         "verify_content": verify_content, "fc_as_conv": fc_as_conv, "input_size": input_size, "views": views,
         "combine": combine},
        _EXTRACT_PARAMS, "extract")
    _check_out_folder(out, "extract")
    if isinstance(layers, str):
        layers = [layers]
    store._compression_kwargs(compression)  # validate early
    spec = effective_backbone(get_backbone(model), fc_as_conv, input_size)
    view_set = resolve_views(views, spec.preprocessing)
    check_combine(combine)
    # batch_size counts network inputs: with V views per image, a batch holds batch_size // V images,
    # so that 10crop does not ask for 10x the memory of a centre-crop extraction
    images_per_batch = max(1, batch_size // view_set.count())
    # validate layers and pooling before touching the data or the weights
    plan_layers(spec, layers, pool, "")
    manifest = _load_manifest(data)
    wts = resolve_weights(spec, weights)
    # The precision is part of the fingerprint and "auto" depends on the device. A cache hit
    # must not import torch (seconds), so the device is first guessed from /dev; if work is
    # needed, torch decides and the plan is redone if the guess was wrong.
    dev = _probe_device() if device == "auto" else device
    prec = resolve_precision(precision, dev)
    base = _base_spec(spec, wts, dtype, prec, draft, decoder, view_set, combine)
    base_fp = store.fingerprint_of(base)
    lplan = plan_layers(spec, layers, pool, base_fp)
    keys = [key for _ld, _p, key, _fp in lplan]
    out = Path(out)
    path = _cache_path(out, manifest, spec.name, base_fp, name)
    n = len(manifest.rows)

    # ---- what exists already
    old_info = None
    if path.exists() and overwrite:
        log.info("--overwrite: ignoring the existing cache %s", path)
    elif path.exists():
        old_info = store.read_info(path)
        if old_info.fingerprint != base_fp:
            raise CacheMismatchError(f"{path} holds another spec (fingerprint {old_info.fingerprint[:12]}); use --overwrite")
        _check_same_dataset(old_info, manifest)
    old_rows = store.read_rows(path) if old_info is not None else None
    # row in the old file (or -1), and each image's content sha256 where known
    reuse_idx, content = _match_rows(old_rows, manifest, verify_content)
    _retry_rows_refused_for_size(reuse_idx, old_rows, max_pixels)
    old_layers = {} if old_info is None else {k: rec for k, rec in old_info.layers.items()}
    new_keys = [key for key in keys if key not in old_layers or old_layers[key].fingerprint != _fp_of(lplan, key)]
    # layers of the final file: the old ones (still valid) plus the requested ones
    final = list(lplan) + [_plan_from_record(spec, rec, base_fp) for k, rec in old_layers.items() if k not in keys]
    final = [f for f in final if f is not None]
    all_keys = [f[2] for f in final]
    fresh = np.flatnonzero(reuse_idx < 0)
    reused = np.flatnonzero(reuse_idx >= 0)
    jobs: list[tuple[np.ndarray, list[str]]] = []
    if len(fresh):
        jobs.append((fresh, all_keys))
    if new_keys and len(reused):
        jobs.append((reused, new_keys))
    dropped = 0 if old_rows is None else len(old_rows["paths"]) - len(reused)

    if (not jobs and old_info is not None and dropped == 0 and n == old_info.n_rows
            and _same_rows(old_rows, old_info.class_names, manifest) and _same_identity(old_rows, manifest, content)):
        if store.partial_dir(path).is_dir() or _leftovers(path):
            with contextlib.suppress(CacheLockedError), store.CacheLock(path):
                _remove_leftovers(path)
                _drop_stale_partial(path, store.partial_dir(path), old_info)
        res = ExtractResult(path, old_info, keys, hit=True, n_reused=n, n_failed=old_info.n_failed,
                            seconds=time.perf_counter() - t0)
        log.info("%s", res.summary())
        return res
    if device != "cpu":
        real = resolve_device(device)
        if real != dev:
            return extract(data, model, layers, weights=weights, pool=pool, out=out, device=real,
                           batch_size=batch_size, workers=workers, dtype=dtype, precision=precision, draft=draft,
                           decoder=decoder, compression=compression, error_budget=error_budget, overwrite=overwrite, name=name,
                           progress=progress, verify_content=verify_content, max_pixels=max_pixels,
                           fc_as_conv=fc_as_conv, input_size=input_size, views=views, combine=combine)
    if old_info is not None and old_info.schema_version < store.SCHEMA_VERSION:
        log.info("%s was written in cache schema %d: its reused rows were checked by size and mtime, as when they "
                 "were written; it is rewritten in schema %d with each file's inode and ctime",
                 path.name, old_info.schema_version, store.SCHEMA_VERSION)
    unhashed = [j for j in fresh if not content[j]]  # a row computed now records the bytes it was made of
    content[unhashed] = _hash_files([manifest.abspath(manifest.rows[j]) for j in unhashed])

    plan = {
        "spec": base,
        "fingerprint": base_fp,
        "layers": [{"key": k, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": p, "fingerprint": fp}
                   for ld, p, k, fp in final],
        "manifest_hash": manifest.digest(),
        "manifest_state": store.fingerprint_of([(r.relpath, r.size, r.mtime_ns, r.ctime_ns, r.inode)
                                                for r in manifest.rows]),
        "dataset_root": manifest.root,
        "dataset_list": manifest.list_path,
        "n_rows": n,
        "n_todo": int(sum(len(r) for r, _ in jobs)),
        "jobs": [{"rows": len(r), "keys": ks} for r, ks in jobs],
        "batch_size": int(images_per_batch),
        "max_pixels": max_pixels,
        "old_file": None if old_info is None else {"updated": old_info.updated, "rows_sha256": old_info.rows_sha256},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_path": wts.path,
        "fresh_job": 0 if len(fresh) else None,
    }

    with store.CacheLock(path), _heap_for_big_blocks(dev):
        pdir = store.partial_dir(path)
        _remove_leftovers(path)
        resumed_from = 0
        _drop_stale_partial(path, pdir, old_info)
        if pdir.exists():
            try:
                old_plan = json.loads((pdir / "plan.json").read_text())
            except (OSError, ValueError):
                old_plan = None
            if old_plan is None and any(pdir.glob("shard-*.npz")):
                # shards without their plan cannot be matched to images: never adopt them
                log.warning("%s holds shards but no plan.json; they are discarded", pdir)
                _remove_partial(pdir)
            if old_plan is not None:
                diff = _plan_diff(old_plan, plan)
                if diff and not overwrite:
                    raise CacheMismatchError(
                        f"An unfinished extraction into {path} was started with a different "
                        f"{', '.join(diff)}. Re-run it with the same arguments to resume it, or pass "
                        f"--overwrite to discard its work and start this one."
                    )
                if diff:
                    log.warning("--overwrite: discarding an unfinished extraction (different %s)", ", ".join(diff))
                    _remove_partial(pdir)
                elif old_plan["batch_size"] != images_per_batch:
                    log.info("Resuming with the batch size of the interrupted run (%d)", old_plan["batch_size"])
                    images_per_batch = int(old_plan["batch_size"])
                    plan["batch_size"] = images_per_batch
        try:
            pdir.mkdir(parents=True, exist_ok=True)
            if not (pdir / "plan.json").exists():
                atomic_write_text(pdir / "plan.json", json.dumps(plan, indent=1))
        except OSError as e:
            raise ExtractionWriteError(f"Cannot write to {pdir}: {e}. Free space or fix permissions and run again.") from e
        done = _scan_shards(pdir)
        batches = {ji: [rows[s:s + images_per_batch] for s in range(0, len(rows), images_per_batch)]
                   for ji, (rows, _) in enumerate(jobs)}
        n_failed_prev = 0
        for (j, b), p in list(done.items()):
            sh = _read_shard(p)
            if (j not in batches or b >= len(batches[j]) or not np.array_equal(sh["rows"], batches[j][b])
                    or any(f"codes/{k}" not in sh for k in jobs[j][1])):
                log.warning("Shard %s does not hold this run's batch %d/%d; it will be recomputed", p.name, j, b)
                p.unlink()
                del done[(j, b)]
                continue
            n_failed_prev += int(np.sum(sh["status"] != "ok"))
        resumed_from = sum(len(batches[j][b]) for (j, b) in done)
        if resumed_from:
            log.warning("Resuming an interrupted extraction into %s: %d of %d images already done",
                        path, resumed_from, plan["n_todo"])

        runner = None
        n_computed = 0
        n_failed = n_failed_prev
        first_failures: list[tuple[str, str]] = []
        budget = int(math.floor(error_budget * max(1, plan["n_todo"])))
        stream_seconds = 0.0
        for ji, (rows, ks) in enumerate(jobs):
            todo = [b for b in range(len(batches[ji])) if (ji, b) not in done]
            if not todo:
                continue
            paths = [manifest.abspath(manifest.rows[i]) for i in rows]
            local = [[int(i) for i in range(b * images_per_batch, b * images_per_batch + len(batches[ji][b]))]
                     for b in todo]
            nw = _default_workers(dev) if workers is None else int(workers)
            # start the decoding workers first: the first batches decode while the model loads
            loader, gate = _loader(paths, spec.preprocessing, draft, decoder, local, nw, dev, gated=(dev == "cpu"),
                                   max_pixels=max_pixels, views=view_set)
            batches_in = iter(loader)
            if runner is None:
                runner = _Runner(spec, wts, final, dev, prec)
            runner.activate(ks)
            writer = _ShardWriter(pdir, _pause_at())
            bar = _progress(progress, sum(len(x) for x in local), path.name)
            t_stream = None
            try:
                for b, (idx, x, status, notes) in zip(todo, batches_in):
                    if t_stream is None:
                        t_stream = time.perf_counter()
                    if gate is not None:
                        gate.clear()
                    try:
                        codes = runner(x)
                    finally:
                        if gate is not None:
                            gate.set()
                    codes = {k: combine_codes(codes[k], view_set.count(), combine) for k in ks}
                    bad = [i for i, s in enumerate(status) if s != "ok"]
                    for i in bad:
                        for k in codes:
                            codes[k][i] = np.nan
                        if len(first_failures) < 10:
                            first_failures.append((paths[idx[i]], notes[i]))
                    n_failed += len(bad)
                    if n_failed > budget:
                        raise ErrorBudgetExceeded(
                            f"{n_failed} of {plan['n_todo']} images failed to decode, more than the error budget "
                            f"({error_budget:.1%} = {budget}). First failures:\n"
                            + "\n".join(f"  {m}" for _p, m in first_failures)
                            + f"\nFix or remove these files (or raise --error-budget) and run again; "
                              f"finished batches are kept in {pdir}."
                        )
                    dt = np.float16 if dtype == "float16" else np.float32
                    writer.put((ji, b, rows[np.asarray(idx)], status, notes,
                                {k: v.astype(dt) for k, v in codes.items()}))
                    n_computed += len(idx)
                    if bar is not None:
                        bar.update(len(idx))
                if t_stream is not None:
                    stream_seconds += time.perf_counter() - t_stream
                writer.close()
            except BaseException as e:
                with contextlib.suppress(BaseException):
                    writer.close()
                if isinstance(e, OSError) and not isinstance(e, CnnCodesError):
                    raise ExtractionWriteError(
                        f"Writing codes failed ({e}). The {resumed_from + n_computed} images "
                        f"finished so far are kept in {pdir}; free space or fix the folder and run the same "
                        f"command again to resume."
                    ) from e
                raise
            finally:
                if bar is not None:
                    bar.close()
            if writer.error is not None:
                raise writer.error

        map_shapes = runner.map_shapes if runner is not None else {}
        try:
            info = _consolidate(path, pdir, manifest, jobs, batches, final, old_info, reuse_idx, content, base,
                                base_fp, dtype, compression, map_shapes, plan)
        except OSError as e:
            if isinstance(e, CnnCodesError):
                raise
            raise ExtractionWriteError(
                f"Writing {path} failed ({e}). All codes are kept in {pdir}; free space and run the same command "
                f"again to finish."
            ) from e
        _remove_partial(pdir)

    status = store.read_rows(path, verify=False)
    skipped = [(p, m) for p, s, m in zip(status["paths"], status["status"], status["message"]) if s != "ok"]
    res = ExtractResult(path, info, keys, hit=False, n_computed=n_computed, n_reused=len(reused),
                        resumed_from=resumed_from, n_failed=len(skipped), skipped=skipped,
                        seconds=time.perf_counter() - t0, stream_seconds=stream_seconds)
    log.info("%s", res.summary())
    return res


def _retry_rows_refused_for_size(reuse_idx: np.ndarray, old_rows: dict, max_pixels: int | None) -> None:
    """Mark for recomputation (-1 in ``reuse_idx``) the old rows that failed only for their pixel
    count and that ``max_pixels`` now admits: raising the limit, as the error told, must not
    give a cache hit that keeps the error."""
    retried = 0
    for j in np.flatnonzero(reuse_idx >= 0):
        i = reuse_idx[j]
        if old_rows["status"][i] == "ok":
            continue
        pixels = pixels_over_limit(str(old_rows["message"][i]))
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            reuse_idx[j] = -1
            retried += 1
    if retried:
        log.info("Retrying %d image(s) that an earlier, lower pixel limit refused", retried)


def _probe_device() -> str:
    """Guess, without importing torch, whether ``auto`` will find a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"


def _match_rows(old_rows: dict | None, manifest: Manifest, verify_content: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which old row each image reuses (-1: none), and each image's content sha256 where known ("").

    An image may reuse the row of its path when its size and mtime are those recorded, and then:

    - by default, when its inode and ctime are those recorded too: nothing rewrote the file
      (a rewrite sets the ctime even when ``os.utime`` puts the mtime back). When they differ (a
      copied or restored dataset, a chmod, a rewrite), its bytes are hashed and must equal the
      recorded hash; a row without one is redone. Rows of a schema 1 file (no inode or ctime
      recorded) are trusted on size and mtime, as they were when written.
    - with ``verify_content``, only when its bytes hash to the recorded sha256: always read.
    """
    n = len(manifest.rows)
    reuse = np.full(n, -1, dtype=np.int64)
    content = np.full(n, "", dtype=object)
    if old_rows is None:
        return reuse, content
    pos = {p: i for i, p in enumerate(old_rows["paths"])}
    doubt = []  # (image, old row) whose bytes decide
    for j, r in enumerate(manifest.rows):
        i = pos.get(r.relpath)
        if i is None or (old_rows["file_size"][i], old_rows["file_mtime_ns"][i]) != (r.size, r.mtime_ns):
            continue
        known = old_rows["file_inode"][i] != -1
        same_file = (old_rows["file_inode"][i], old_rows["file_ctime_ns"][i]) == (r.inode, r.ctime_ns)
        if verify_content or (known and not same_file):
            if old_rows["content_sha256"][i]:
                doubt.append((j, i))
            continue
        reuse[j] = i
        content[j] = old_rows["content_sha256"][i]
    for (j, i), digest in zip(doubt, _hash_files([manifest.abspath(manifest.rows[j]) for j, _ in doubt])):
        content[j] = digest
        if digest and digest == old_rows["content_sha256"][i]:
            reuse[j] = i
    return reuse, content


def _sha256_of(path: str) -> str:
    """sha256 of a file's bytes, or "" when it cannot be read (its decoding will say why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _hash_files(paths: Sequence[str]) -> list[str]:
    """:func:`_sha256_of` of many files, on threads (hashlib and file reads release the GIL)."""
    if len(paths) < 2:
        return [_sha256_of(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256_of, paths))


def _same_identity(old_rows: dict, manifest: Manifest, content: np.ndarray) -> bool:
    """True when every row's recorded file identity is the current one (else the row table is rewritten,
    so that the next run trusts the files as they are now, e.g. after a copy whose bytes were checked)."""
    rows = manifest.rows
    return (
        old_rows["file_size"].tolist() == [r.size for r in rows]
        and old_rows["file_mtime_ns"].tolist() == [r.mtime_ns for r in rows]
        and old_rows["file_ctime_ns"].tolist() == [r.ctime_ns for r in rows]
        and old_rows["file_inode"].tolist() == [r.inode for r in rows]
        and list(old_rows["content_sha256"]) == list(content)
    )


def _same_rows(old_rows: dict, old_class_names: Sequence[str], manifest: Manifest) -> bool:
    """True when the cache's row table (order, labels, splits, class names) equals the manifest's.

    A renamed class keeps every label index (``rose`` -> ``rosa`` sorts alike) but not its name:
    the class names are compared too. Codes do not depend on labels, so a difference here only
    rewrites the row table (no forward pass).
    """
    return (
        list(old_class_names) == list(manifest.class_names)
        and list(old_rows["paths"]) == [r.relpath for r in manifest.rows]
        and old_rows["labels"].tolist() == [r.label for r in manifest.rows]
        and list(old_rows["split"]) == [r.split for r in manifest.rows]
    )


def _fp_of(lplan, key):
    for _ld, _p, k, fp in lplan:
        if k == key:
            return fp
    return None


def _plan_from_record(spec: BackboneSpec, rec: store.LayerRecord, base_fp: str):
    try:
        ld = spec.layer(rec.alias)
    except KeyError:
        return None
    fp = store.fingerprint_of({"base": base_fp, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": rec.pool})
    if fp != rec.fingerprint:
        return None
    return (ld, rec.pool, rec.key, fp)


def _plan_diff(old: dict, new: dict) -> list[str]:
    diff = []
    o, n = old.get("spec", {}), new["spec"]
    for field_ in ("backbone", "weights", "preprocessing", "dtype", "precision", "arch_args", "library_majors"):
        if o.get(field_) != n.get(field_):
            diff.append(field_)
    if [lr["key"] for lr in old.get("layers", [])] != [lr["key"] for lr in new["layers"]]:
        diff.append("layers")
    if old.get("manifest_hash") != new["manifest_hash"] or old.get("manifest_state") != new["manifest_state"]:
        diff.append("image list")
    if old.get("jobs") != new["jobs"] and "image list" not in diff and "layers" not in diff:
        diff.append("work plan")
    return diff


def _drop_stale_partial(path: Path, pdir: Path, old_info) -> bool:
    """Remove ``pdir`` if the cache file was rewritten after its plan was made (the caller holds the lock).

    A run killed between renaming the new cache file into place and removing its work folder
    leaves a partial whose work is already in the file; its plan would otherwise block the next
    incremental run with a false mismatch. A plan records the file it started from (``old_file``).
    """
    if old_info is None or not pdir.is_dir():
        return False
    try:
        started_from = json.loads((pdir / "plan.json").read_text()).get("old_file")
    except (OSError, ValueError):
        return False
    if started_from == {"updated": old_info.updated, "rows_sha256": old_info.rows_sha256}:
        return False
    log.info("Removing %s: its work is already in %s (an earlier run stopped just after writing it)",
             pdir.name, path.name)
    _remove_partial(pdir)
    return True


def _remove_partial(pdir: Path) -> None:
    """Delete a work folder so that a kill at any moment leaves all of it or none of it.

    It is renamed out of the way first (atomic), then deleted: a kill half-way through a plain
    ``rmtree`` could leave shards without their ``plan.json``, which a later run must never adopt.
    """
    if not pdir.exists():
        return
    trash = pdir.with_name(f"{pdir.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(pdir, trash)
    except OSError:  # the codes are safe in the cache file by now: never fail the run here
        shutil.rmtree(pdir, ignore_errors=True)
        return
    fsync_dir(pdir.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _leftovers(path: Path) -> list[Path]:
    """Temporary cache files and retired work folders of ``path`` left by killed runs."""
    pdir = store.partial_dir(path)
    return (list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
            + list(path.parent.glob(f"{glob.escape(pdir.name)}.trash-*")))


def _remove_leftovers(path: Path) -> None:
    """Remove :func:`_leftovers` (the caller holds the lock: no live run is writing them)."""
    for p in _leftovers(path):
        log.info("Removing %s, left by an interrupted run", p.name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def _pause_at() -> int | None:
    v = os.environ.get("CNNCODES_TEST_PAUSE_AFTER_SHARDS")
    return int(v) if v else None


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)


def _consolidate(path, pdir, manifest, jobs, batches, final, old_info, reuse_idx, content, base, base_fp, dtype,
                 compression, map_shapes, plan) -> store.CacheInfo:
    """Stream old codes and shards, in manifest order, into a new cache file (atomic)."""
    n = len(manifest.rows)
    shards = _scan_shards(pdir, verify=False)  # each one is verified when it is read below
    for ji in range(len(jobs)):
        for b in range(len(batches[ji])):
            if (ji, b) not in shards:
                raise CacheCorruptError(f"shard {ji}/{b} of {pdir} is missing; run the same command again")
    # row table: computed rows take their status from job 0 (all layers); reused rows from the old file
    status = np.array(["ok"] * n, dtype=object)
    message = np.array([""] * n, dtype=object)
    if old_info is not None:
        old_rows = store.read_rows(path)
        has = reuse_idx >= 0
        status[has] = old_rows["status"][reuse_idx[has]]
        message[has] = old_rows["message"][reuse_idx[has]]
    full_job = plan["fresh_job"]
    if full_job is not None:
        for b in range(len(batches[full_job])):
            sh = _read_shard(shards[(full_job, b)])
            status[sh["rows"]] = sh["status"]
            message[sh["rows"]] = sh["message"]
    rows = {
        "paths": np.array([r.relpath for r in manifest.rows], dtype=object),
        "labels": np.array([r.label for r in manifest.rows], dtype=np.int64),
        "split": np.array([r.split for r in manifest.rows], dtype=object),
        "status": status,
        "message": message,
        "file_size": np.array([r.size for r in manifest.rows], dtype=np.int64),
        "file_mtime_ns": np.array([r.mtime_ns for r in manifest.rows], dtype=np.int64),
        "file_ctime_ns": np.array([r.ctime_ns for r in manifest.rows], dtype=np.int64),
        "file_inode": np.array([r.inode for r in manifest.rows], dtype=np.int64),
        "content_sha256": np.asarray(content, dtype=object),
    }

    def blocks_for(key: str) -> Iterator[np.ndarray]:
        # which job computed this layer for each row, in manifest order
        src_job = np.full(n, -1, dtype=np.int64)
        for ji, (jrows, ks) in enumerate(jobs):
            if key in ks:
                src_job[jrows] = ji
        from_old = src_job < 0
        if np.any(from_old & (reuse_idx < 0)):
            raise CacheCorruptError(f"internal: rows without a source for layer {key}")
        old_block_iter = None
        if old_info is not None and np.any(from_old):
            old_block_iter = _RowStream(store.iter_layer_blocks(path, key, reuse_idx[from_old]))
        shard_iters = {ji: _RowStream(_read_shard(shards[(ji, b)])[f"codes/{key}"] for b in range(len(batches[ji])))
                       for ji, (_r, ks) in enumerate(jobs) if key in ks}
        step = 4096
        for s in range(0, n, step):
            sj = src_job[s:s + step]
            out = None
            for ji in np.unique(sj):
                sel = np.flatnonzero(sj == ji)
                part = old_block_iter.take(len(sel)) if ji < 0 else shard_iters[int(ji)].take(len(sel))
                if out is None:
                    out = np.empty((len(sj), part.shape[1]), dtype=part.dtype)
                out[sel] = part
            yield out

    layers = {}
    records = []
    for ld, pool, key, fp in final:
        dim = None
        shape = map_shapes.get(key, ())
        if old_info is not None and key in old_info.layers:
            dim = old_info.layers[key].dim
            shape = shape or old_info.layers[key].map_shape
        if dim is None:
            for (ji, _b), p in shards.items():
                if key in jobs[ji][1]:
                    dim = int(_read_shard(p)[f"codes/{key}"].shape[1])
                    break
        rec = store.LayerRecord(key, ld.alias, ld.node, ld.stage, pool, int(dim), tuple(shape), fp)
        records.append(rec)
        layers[key] = (rec, blocks_for(key))
    spec = dict(base, layers=[r.to_dict() for r in records], weights_path=plan.get("weights_path"))
    return store.write_cache(
        path, spec=spec, fingerprint=base_fp, manifest_hash=manifest.digest(), dataset_root=manifest.root,
        dataset_list=manifest.list_path,
        class_names=list(manifest.class_names), rows=rows, layers=layers, dtype=dtype, compression=compression,
        created=None if old_info is None else old_info.created, versions=_versions(),
    )


class _RowStream:
    """Take rows, in order, from an iterator of 2-D blocks."""

    def __init__(self, blocks: Iterable[np.ndarray]):
        self.it = iter(blocks)
        self.buf: np.ndarray | None = None

    def take(self, k: int) -> np.ndarray:
        parts, need = [], k
        while need > 0:
            if self.buf is None or len(self.buf) == 0:
                self.buf = next(self.it)
            part, self.buf = self.buf[:need], self.buf[need:]
            parts.append(part)
            need -= len(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def extract_images(
    paths: Sequence[str | os.PathLike],
    *,
    spec: dict,
    layer_keys: Sequence[str],
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict:
    """Codes of arbitrary images with exactly a recorded extraction spec (for prediction).

    Parameters
    ----------
    paths : list of path-like
        Image files.
    spec : dict
        The ``spec`` stored in a cache file (or a model's sidecar).
    layer_keys : list of str
        Keys of ``spec["layers"]`` to compute.
    device, batch_size, workers, max_pixels
        As for :func:`extract`.

    Returns
    -------
    dict
        ``codes`` ({key: float32 array (n, dim)}), ``status`` and ``messages`` (str arrays),
        ``records`` ({key: LayerRecord}), ``spec`` and ``fingerprint``.

    Raises
    ------
    CacheMismatchError
        The weights on this machine are not those the spec records (sha256), or the
        rebuilt spec's fingerprint differs (another library major version...).
    InvalidParameterError
        A bad argument, before any work.
    """
    validate_params({"paths": paths, "spec": spec, "layer_keys": layer_keys, "device": device,
                     "batch_size": batch_size, "workers": workers, "max_pixels": max_pixels},
                    _IMAGES_PARAMS, "extract_images")
    pre_rec = spec["preprocessing"]
    bb = effective_backbone(get_backbone(spec["backbone"]), bool(spec.get("arch_args", {}).get("fc_as_conv")),
                            int(pre_rec["crop"]))
    view_set = resolve_views(pre_rec.get("views", "center"), bb.preprocessing)
    combine = pre_rec.get("combine", "mean")
    w = spec["weights"]
    if w["kind"] == "none":
        wts = ResolvedWeights("none", w["identity"])
    elif w["kind"] == "default":
        wts = bb.default_weights()
    else:
        path = spec.get("weights_path")
        if not path:
            raise CacheMismatchError("The spec names a weights file but not its path; pass the cache's spec")
        wts = resolve_weights(bb, path)
    if wts.sha256 != w.get("sha256") or wts.identity != w["identity"]:
        raise CacheMismatchError(
            f"The weights differ from those the codes were extracted with: recorded {w['identity']} "
            f"(sha256 {str(w.get('sha256'))[:12]}), found {wts.identity} (sha256 {str(wts.sha256)[:12]})"
        )
    dev = resolve_device(device)
    prec = spec.get("precision", "fp32")
    if prec == "fp16" and dev != "cuda":
        prec = "fp32"
        log.warning("The codes were computed with fp16 autocast on a GPU; on the CPU fp32 is used")
    base = {k: v for k, v in spec.items() if k not in ("layers", "weights_path")}
    draft = spec["preprocessing"]["draft"]
    decoder = spec["preprocessing"].get("decoder", "pil")  # absent: written before the choice, by Pillow
    rebuilt = _base_spec(bb, wts, spec["dtype"], spec.get("precision", "fp32"), draft, decoder, view_set, combine)
    diff = [k for k in rebuilt if rebuilt[k] != base.get(k)]
    if diff:
        raise CacheMismatchError(f"This installation cannot reproduce the recorded spec: {', '.join(diff)} differ")
    base_fp = store.fingerprint_of(rebuilt)
    recs = {r["key"]: r for r in spec["layers"]}
    missing = [k for k in layer_keys if k not in recs]
    if missing:
        raise UsageError(f"The spec holds no layer {missing}; it holds {list(recs)}")
    plan = []
    for k in layer_keys:
        r = recs[k]
        ld = bb.layer(r["alias"])
        fp = store.fingerprint_of({"base": base_fp, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": r["pool"]})
        plan.append((ld, r["pool"], k, fp))
    runner = _Runner(bb, wts, plan, dev, prec)
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    per_batch = max(1, batch_size // view_set.count())  # batch_size counts network inputs, views included
    batches = [list(range(s, min(n, s + per_batch))) for s in range(0, n, per_batch)]
    nw = _default_workers(dev) if workers is None else int(workers)
    codes = {k: [] for k in layer_keys}
    status = np.array(["ok"] * n, dtype=object)
    messages = np.array([""] * n, dtype=object)
    dt = np.float16 if spec["dtype"] == "float16" else np.float32
    with _heap_for_big_blocks(dev):
        loader, _gate = _loader(paths, _pre_of(spec), draft, decoder, batches, nw, dev, max_pixels=max_pixels,
                                views=view_set)
        for idx, x, st, notes in loader:
            out = {k: combine_codes(v, view_set.count(), combine) for k, v in runner(x).items()}
            for i, (s, m) in enumerate(zip(st, notes)):
                status[idx[i]] = s
                messages[idx[i]] = m
            for k in layer_keys:
                v = out[k].astype(dt).astype(np.float32)  # the same rounding as the stored codes
                v[[i for i, s in enumerate(st) if s != "ok"]] = np.nan
                codes[k].append(v)
    out_codes = {k: (np.concatenate(v) if v else np.zeros((0, recs[k]["dim"]), np.float32)) for k, v in codes.items()}
    records = {k: store.LayerRecord(k, r["alias"], r["node"], r["stage"], r["pool"], int(out_codes[k].shape[1]),
                                    tuple(r.get("map_shape", ())), fp)
               for (ld, p, k, fp), r in zip(plan, [recs[k] for k in layer_keys])}
    return {"codes": out_codes, "status": status.astype(str), "messages": messages.astype(str), "records": records,
            "spec": spec, "fingerprint": base_fp}


def _pre_of(spec: dict):
    from .backbones import Preprocessing

    p = spec["preprocessing"]
    return Preprocessing(int(p["resize"]), int(p["crop"]), p["interpolation"], tuple(p["mean"]), tuple(p["std"]),
                         bool(p["draft"]))
