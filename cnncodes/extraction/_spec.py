"""What defines a cache: the extraction spec, its fingerprint and the layer plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .. import store
from ..backbones import BackboneSpec, LayerDef, ResolvedWeights
from ..errors import InvalidParameterError, UsageError
from ..images import DEFAULT_MAX_PIXELS
from ..views import ViewSet, is_views_key, views_key
from ._pipeline import _check_decoder


#: Version of what a spec's codes mean (part of the fingerprint). The file layout has its own,
#: ``store.SCHEMA_VERSION``: new row fields do not change any code, so they must not retire caches
#: or trained models.
_SPEC_VERSION = 1


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
    fc_as_conv : bool
        Run fully connected layers as convolutions (AlexNet, VGG16).
    input_size : int or None
        Crop size fed to the network; None keeps the backbone's.
    views : str
        ``center``, ``flip``, ``5crop``, ``10crop`` or ``multiscale[:S1,S2,...]``.
    combine : str
        ``mean`` or ``max`` over the views.
    keep_views : bool
        Also store each view's code (``<key>#views``). Not part of the spec's fingerprint: kept views
        are extra layers of the same cache (see :func:`plan_layers`).
    """

    model: str
    layers: tuple[str, ...]
    weights: str = "default"
    pool: str = "avg"
    dtype: str = "float16"
    precision: str = "auto"
    draft: bool = True
    decoder: str = "torchvision"
    fc_as_conv: bool = False
    input_size: int | None = None
    views: str = "center"
    combine: str = "mean"
    keep_views: bool = False


@dataclass(frozen=True)
class RunOptions:
    """How an extraction runs and where it writes; none of these changes a code (see :func:`extract`)."""

    out: Path
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    compression: str = "gzip"
    error_budget: float = 0.05
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    name: str | None = None
    progress: bool = False
    verify_content: bool = False
    gate: bool = True
    engine: str = "local"
    ray_address: str | None = None


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "torchvision", "timm", "numpy", "h5py", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    from .. import __version__

    out["cnncodes"] = __version__
    return out


def _major(v: str | None) -> str | None:
    if v is None:
        return None
    parts = v.split("+")[0].split(".")
    return parts[0] if parts[0] != "0" else ".".join(parts[:2])


def effective_backbone(spec: BackboneSpec, fc_as_conv: bool = False, input_size: int | None = None) -> BackboneSpec:
    """``spec`` with its fully connected layers as convolutions and/or another input size
    (both recorded in the extraction spec through ``arch_args`` and the preprocessing)."""
    from ..fc_conv import with_fc_as_conv, with_input_size

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
               decoder: str, views: ViewSet = ViewSet("center"), combine: str = "mean", gpu: str | None = None) -> dict:
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
    out = {
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
    if gpu:  # GPU kernels (and so codes) differ between GPU models; CPU specs stay as they were
        out["gpu"] = gpu
    return out


def layer_fingerprint(base_fp: str, ld: LayerDef, pool: str, kept_views: bool = False) -> str:
    """A layer's fingerprint; that of its kept per-view codes differs (they are another array)."""
    what = {"base": base_fp, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": pool}
    if kept_views:  # absent otherwise, so that every layer fingerprint written before stays valid
        what["views"] = "kept"
    return store.fingerprint_of(what)


def plan_layers(spec: BackboneSpec, aliases: Sequence[str], pool: str, base_fp: str,
                keep_views: bool = False) -> list[tuple[LayerDef, str, str, str]]:
    """Resolve aliases into (LayerDef, pooling, key, layer fingerprint), checked up front; with
    ``keep_views``, each layer's kept per-view codes (key ``<key>#views``) follow the layers.

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
        out.append((ld, p, key, layer_fingerprint(base_fp, ld, p)))
    if not out:
        raise UsageError(f"Name at least one layer. Known for {spec.name}: {', '.join(spec.layers)}")
    if keep_views:
        out += [(ld, p, views_key(key), layer_fingerprint(base_fp, ld, p, kept_views=True)) for ld, p, key, _ in out]
    return out


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
    fp = layer_fingerprint(base_fp, ld, rec.pool, kept_views=is_views_key(rec.key))
    if fp != rec.fingerprint:
        return None
    return (ld, rec.pool, rec.key, fp)
