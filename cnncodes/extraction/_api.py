"""The extractor's entry points: :func:`extract` (a dataset into its cache) and :func:`extract_images`."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np

from .. import store
from .._validation import Interval, PathLike, SequenceOf, StrOptions, validate_params
from ..backbones import ResolvedWeights, get_backbone, resolve_weights
from ..errors import (CacheLockedError, CacheMismatchError, CnnCodesError, ErrorBudgetExceeded, ExtractionWriteError,
                      InvalidParameterError, UsageError)
from ..fileio import atomic_write_text
from ..images import DEFAULT_MAX_PIXELS
from ..views import check_combine, combine_codes
from ..views import resolve as resolve_views
from ..workdir import (_consolidate, _drop_stale_partial, _leftovers, _plan_diff, _read_shard, _remove_leftovers,
                       _remove_partial, _scan_shards, _ShardWriter)
from ._features import _Runner
from ._pipeline import DECODERS, _default_workers, _loader
from ._plan import (_cache_path, _check_same_dataset, _hash_files, _load_manifest, _match_rows,
                    _retry_rows_refused_for_size, _same_identity, _same_rows)
from ._runtime import _heap_for_big_blocks, _probe_device, resolve_device, resolve_precision
from ._spec import _base_spec, _fp_of, _plan_from_record, _versions, effective_backbone, plan_layers

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
    "name": [str, None],
    "progress": ["boolean"],
    "verify_content": ["boolean"],
    "fc_as_conv": ["boolean"],
    "input_size": [Interval(Integral, 32, None, closed="left"), None],
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
        Images per forward pass; decoding processes (default: by device and cores).
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
        "batch_size": int(batch_size),
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
                elif old_plan["batch_size"] != batch_size:
                    log.info("Resuming with the batch size of the interrupted run (%d)", old_plan["batch_size"])
                    batch_size = int(old_plan["batch_size"])
                    plan["batch_size"] = batch_size
        try:
            pdir.mkdir(parents=True, exist_ok=True)
            if not (pdir / "plan.json").exists():
                atomic_write_text(pdir / "plan.json", json.dumps(plan, indent=1))
        except OSError as e:
            raise ExtractionWriteError(f"Cannot write to {pdir}: {e}. Free space or fix permissions and run again.") from e
        done = _scan_shards(pdir)
        batches = {ji: [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)] for ji, (rows, _) in enumerate(jobs)}
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
            local = [[int(i) for i in range(b * batch_size, b * batch_size + len(batches[ji][b]))] for b in todo]
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
                                base_fp, dtype, compression, map_shapes, plan, _versions())
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


def _pause_at() -> int | None:
    v = os.environ.get("CNNCODES_TEST_PAUSE_AFTER_SHARDS")
    return int(v) if v else None


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)


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
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
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
    from ..backbones import Preprocessing

    p = spec["preprocessing"]
    return Preprocessing(int(p["resize"]), int(p["crop"]), p["interpolation"], tuple(p["mean"]), tuple(p["std"]),
                         bool(p["draft"]))
