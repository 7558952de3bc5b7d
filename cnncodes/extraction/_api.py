"""The extractor's entry points: :func:`extract` (a dataset into its cache) and :func:`extract_images`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .. import store
from .._validation import Interval, NonEmptyStr, PathLike, SequenceOf, StrOptions, validate_params
from ..backbones import ResolvedWeights, get_backbone, resolve_weights
from ..errors import (CacheLockedError, CacheMismatchError, CnnCodesError, ExtractionWriteError, InvalidParameterError,
                      UsageError)
from ..images import DEFAULT_MAX_PIXELS
from ..views import codes_of_keys
from ..views import resolve as resolve_views
from ..workdir import (_consolidate, _drop_stale_partial, _leftovers, _remove_leftovers, _remove_partial,
                       finished_shards, open_workdir)
from ._features import _Runner
from ._jobs import JobStats, failure_budget, run_jobs
from ._pipeline import DECODERS, _default_workers, _loader
from ._plan import ExtractionPlan, plan_extraction
from ._runtime import resolve_device
from ._spec import ExtractConfig, RunOptions, _base_spec, _versions, effective_backbone

log = logging.getLogger("cnncodes.extraction")


DEFAULT_OUT = "artifacts/codes"


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
    view_keys : list of str
        With ``keep_views``: those of their kept per-view codes (``<key>#views``), else empty.
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
    view_keys: list[str] = field(default_factory=list)

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
    "keep_views": ["boolean"],
    "gate": ["boolean"],
    "engine": [StrOptions(("local", "ray"))],
    "ray_address": [NonEmptyStr(), None],
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
    keep_views: bool = False,
    gate: bool = True,
    engine: str = "local",
    ray_address: str | None = None,
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
    keep_views : bool
        Also store each view's code, for training on every view (``train_run(train_views="all")``):
        ``/codes/<key>#views``, one row per image holding its V view codes side by side (V x D
        wide; :func:`cnncodes.views.split_views`). Needs ``views`` other than ``center``. Not part
        of the fingerprint: the kept views are extra layers of the same cache file, so a cache
        without them gets them added (one forward pass of its images, its combined codes kept)
        and a call without ``keep_views`` is a hit on a cache that has them.
    gate : bool
        On a CPU, let decoding workers decode only between forward passes, so that the two take
        turns on the cores instead of fighting (see ``_pipeline._loader``); False lets them run
        alongside. Never changes a code.
    engine : str
        ``local`` (default: this process and its decoding workers) or ``ray``: the batches run
        as tasks on a Ray cluster (:mod:`cnncodes.engine_ray`; the cache folder, the images and a
        weights file must be reachable at the same paths from every node). Same batches, same
        shards, same resume, same codes, same file.
    ray_address : str or None
        With ``engine="ray"``: ``HOST:PORT`` of the cluster's head, or ``auto``/None (the
        cluster this machine belongs to).

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
    ClusterUnreachableError
        ``engine="ray"`` and nothing answers at ``ray_address`` (checked before any work).
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
         "combine": combine, "keep_views": keep_views, "gate": gate, "engine": engine, "ray_address": ray_address},
        _EXTRACT_PARAMS, "extract")
    _check_out_folder(out, "extract")
    if engine == "ray" or ray_address is not None:
        from ..engine_ray import check_engine

        ray_address = check_engine(engine, ray_address)
    store._compression_kwargs(compression)  # validate early
    config = ExtractConfig(model, (layers,) if isinstance(layers, str) else tuple(layers), weights, pool, dtype,
                           precision, draft, decoder, fc_as_conv, input_size, views, combine, keep_views)
    run = RunOptions(Path(out), device, batch_size, workers, compression, error_budget, max_pixels, overwrite, name,
                     progress, verify_content, gate, engine, ray_address)
    return _extract(data, config, run, t0)


def _extract(data, config: ExtractConfig, run: RunOptions, t0: float) -> ExtractResult:
    """plan -> cache hit? -> the real device -> work folder -> run the jobs -> consolidate."""
    plan = plan_extraction(data, config, run)
    if plan.is_hit():
        return _cache_hit(plan, t0)
    if run.device != "cpu":
        real = resolve_device(run.device)
        if real != plan.device:  # the guess from /dev was wrong, and with it an "auto" precision
            return _extract(data, config, dataclasses.replace(run, device=real), t0)
    old_info = plan.old_info
    if old_info is not None and old_info.schema_version < store.SCHEMA_VERSION:
        log.info("%s was written in cache schema %d: its reused rows were checked by size and mtime, as when they "
                 "were written; it is rewritten in schema %d with each file's inode and ctime",
                 plan.path.name, old_info.schema_version, store.SCHEMA_VERSION)
    plan.hash_fresh_rows()
    # batch_size counts network inputs: with V views per image, a batch holds batch_size // V images,
    # so that 10crop does not ask for 10x the memory of a centre-crop extraction
    images_per_batch = max(1, run.batch_size // plan.views.count())
    work_plan = plan.work_plan(images_per_batch, run.max_pixels)
    with store.CacheLock(plan.path):
        pdir = store.partial_dir(plan.path)
        batch_size = open_workdir(plan.path, old_info, work_plan, run.overwrite)
        batches = {ji: [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
                   for ji, (rows, _) in enumerate(plan.jobs)}
        done, n_failed_before = finished_shards(pdir, plan.jobs, batches)
        stats = JobStats(work_plan["n_todo"], failure_budget(run.error_budget, work_plan["n_todo"]),
                         resumed_from=sum(len(batches[j][b]) for (j, b) in done), n_failed=n_failed_before)
        if stats.resumed_from:
            log.warning("Resuming an interrupted extraction into %s: %d of %d images already done",
                        plan.path, stats.resumed_from, stats.n_todo)
        if run.engine == "ray":
            from ..engine_ray import run_jobs_on_ray

            run_jobs_on_ray(plan, config, run, pdir, batches, done, stats)
        else:
            run_jobs(plan, config, run, pdir, batch_size, batches, done, stats)
        info = _write_cache(plan, pdir, batches, stats.map_shapes, work_plan, config.dtype, run.compression)
        _remove_partial(pdir)
    return _result(plan, info, stats, t0)


def _cache_hit(plan: ExtractionPlan, t0: float) -> ExtractResult:
    """The result of a call with nothing to compute; leftovers of killed runs are cleaned up if no run is live."""
    path = plan.path
    if store.partial_dir(path).is_dir() or _leftovers(path):
        with contextlib.suppress(CacheLockedError), store.CacheLock(path):
            _remove_leftovers(path)
            _drop_stale_partial(path, store.partial_dir(path), plan.old_info)
    res = ExtractResult(path, plan.old_info, plan.keys, hit=True, n_reused=len(plan.manifest.rows),
                        n_failed=plan.old_info.n_failed, seconds=time.perf_counter() - t0, view_keys=plan.view_keys)
    log.info("%s", res.summary())
    return res


def _write_cache(plan: ExtractionPlan, pdir: Path, batches: dict, map_shapes: dict, work_plan: dict, dtype: str,
                 compression: str) -> store.CacheInfo:
    """Consolidate old codes and shards into the cache file; a disk error keeps every shard."""
    try:
        return _consolidate(plan.path, pdir, plan.manifest, plan.jobs, batches, plan.final, plan.old_info,
                            plan.reuse_idx, plan.content, plan.base, plan.base_fp, dtype, compression, map_shapes,
                            work_plan, _versions())
    except OSError as e:
        if isinstance(e, CnnCodesError):
            raise
        raise ExtractionWriteError(
            f"Writing {plan.path} failed ({e}). All codes are kept in {pdir}; free space and run the same command "
            f"again to finish."
        ) from e


def _result(plan: ExtractionPlan, info: store.CacheInfo, stats: JobStats, t0: float) -> ExtractResult:
    status = store.read_rows(plan.path, verify=False)
    skipped = [(p, m) for p, s, m in zip(status["paths"], status["status"], status["message"]) if s != "ok"]
    res = ExtractResult(plan.path, info, plan.keys, hit=False, n_computed=stats.n_computed,
                        n_reused=len(plan.reused), resumed_from=stats.resumed_from, n_failed=len(skipped),
                        skipped=skipped, seconds=time.perf_counter() - t0, stream_seconds=stats.stream_seconds,
                        view_keys=plan.view_keys)
    log.info("%s", res.summary())
    return res


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
    bb, wts, base_fp = _rebuild_spec(spec)
    pre_rec = spec["preprocessing"]
    view_set = resolve_views(pre_rec.get("views", "center"), bb.preprocessing)
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
    dev = resolve_device(device)
    prec = spec.get("precision", "fp32")
    if prec == "fp16" and dev != "cuda":
        prec = "fp32"
        log.warning("The codes were computed with fp16 autocast on a GPU; on the CPU fp32 is used")
    runner = _Runner(bb, wts, plan, dev, prec)
    paths = [os.fspath(p) for p in paths]
    nw = _default_workers(dev) if workers is None else int(workers)
    loader, _gate = _loader(paths, _pre_of(spec), pre_rec["draft"], pre_rec.get("decoder", "pil"),
                            _image_batches(len(paths), max(1, batch_size // view_set.count())),
                            nw, dev, max_pixels=max_pixels, views=view_set)
    codes, status, messages = _run_images(loader, runner, len(paths), layer_keys, view_set.count(),
                                          pre_rec.get("combine", "mean"), spec["dtype"])
    out_codes = {k: (np.concatenate(v) if v else np.zeros((0, recs[k]["dim"]), np.float32)) for k, v in codes.items()}
    records = {k: store.LayerRecord(k, r["alias"], r["node"], r["stage"], r["pool"], int(out_codes[k].shape[1]),
                                    tuple(r.get("map_shape", ())), fp)
               for (ld, p, k, fp), r in zip(plan, [recs[k] for k in layer_keys])}
    return {"codes": out_codes, "status": status.astype(str), "messages": messages.astype(str), "records": records,
            "spec": spec, "fingerprint": base_fp}


def _image_batches(n: int, per_batch: int) -> list[list[int]]:
    """Consecutive batches of ``n`` images (``batch_size`` counts network inputs, views included)."""
    return [list(range(s, min(n, s + per_batch))) for s in range(0, n, per_batch)]


def _rebuild_spec(spec: dict):
    """The backbone, weights and fingerprint of a recorded spec, refused unless this installation reproduces it."""
    pre_rec = spec["preprocessing"]
    bb = effective_backbone(get_backbone(spec["backbone"]), bool(spec.get("arch_args", {}).get("fc_as_conv")),
                            int(pre_rec["crop"]))
    view_set = resolve_views(pre_rec.get("views", "center"), bb.preprocessing)
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
    base = {k: v for k, v in spec.items() if k not in ("layers", "weights_path")}
    decoder = pre_rec.get("decoder", "pil")  # absent: written before the choice, by Pillow
    # predicting on another device (or GPU model) is allowed (with a warning for fp16), as it always was
    rebuilt = _base_spec(bb, wts, spec["dtype"], spec.get("precision", "fp32"), pre_rec["draft"], decoder, view_set,
                         pre_rec.get("combine", "mean"), spec.get("gpu"))
    diff = [k for k in rebuilt if rebuilt[k] != base.get(k)]
    if diff:
        raise CacheMismatchError(f"This installation cannot reproduce the recorded spec: {', '.join(diff)} differ")
    return bb, wts, store.fingerprint_of(rebuilt)


def _run_images(loader, runner, n: int, layer_keys, n_views: int, combine: str, dtype: str):
    """Codes (lists of blocks, rounded as stored, NaN for failed images), statuses and messages of ``n`` images."""
    codes = {k: [] for k in layer_keys}
    status = np.array(["ok"] * n, dtype=object)
    messages = np.array([""] * n, dtype=object)
    dt = np.float16 if dtype == "float16" else np.float32
    for idx, x, st, notes in loader:
        out = codes_of_keys(runner(x), layer_keys, n_views, combine)
        for i, (s, m) in enumerate(zip(st, notes)):
            status[idx[i]] = s
            messages[idx[i]] = m
        for k in layer_keys:
            v = out[k].astype(dt).astype(np.float32)  # the same rounding as the stored codes
            v[[i for i, s in enumerate(st) if s != "ok"]] = np.nan
            codes[k].append(v)
    return codes, status, messages


def _pre_of(spec: dict):
    from ..backbones import Preprocessing

    p = spec["preprocessing"]
    return Preprocessing(int(p["resize"]), int(p["crop"]), p["interpolation"], tuple(p["mean"]), tuple(p["std"]),
                         bool(p["draft"]))
