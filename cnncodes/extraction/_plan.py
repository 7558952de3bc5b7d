"""Which cache file a dataset maps to, and which of its rows can be reused."""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import store
from ..backbones import BackboneSpec, ResolvedWeights, get_backbone, resolve_weights
from ..errors import CacheMismatchError, DatasetError, InvalidParameterError
from ..images import Manifest, pixels_over_limit, read_csv_list, scan_folder
from ..views import ViewSet, check_combine, is_views_key
from ..views import resolve as resolve_views
from ._runtime import _probe_device, gpu_model, resolve_precision
from ._spec import (ExtractConfig, RunOptions, _base_spec, _fp_of, _plan_from_record, effective_backbone,
                    plan_layers)

log = logging.getLogger("cnncodes.extraction")


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
            f"{show(manifest.root, manifest.list_path)}. Give another out folder, or pass overwrite=True to replace it."
        )


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


@dataclass
class ExtractionPlan:
    """What an extraction will do: resolved before any forward pass, and without importing torch.

    ``layers`` are the requested layers as (LayerDef, pool, key, fingerprint); ``final`` those of the
    file to write (the requested ones plus the still valid old ones); ``reuse_idx`` the old row each
    image reuses (-1: none); ``jobs`` the (rows, keys) to compute: new rows with every layer, reused
    rows with the layers the file lacks.
    """

    spec: BackboneSpec
    weights: ResolvedWeights
    views: ViewSet
    device: str
    precision: str
    base: dict
    base_fp: str
    layers: list
    final: list
    manifest: Manifest
    path: Path
    old_info: store.CacheInfo | None
    old_rows: dict | None
    reuse_idx: np.ndarray
    content: np.ndarray
    jobs: list[tuple[np.ndarray, list[str]]]

    @property
    def keys(self) -> list[str]:
        """The requested layers' keys (their combined codes)."""
        return [key for _ld, _p, key, _fp in self.layers if not is_views_key(key)]

    @property
    def view_keys(self) -> list[str]:
        """The keys of the requested kept per-view codes (``keep_views``)."""
        return [key for _ld, _p, key, _fp in self.layers if is_views_key(key)]

    @property
    def fresh(self) -> np.ndarray:
        return np.flatnonzero(self.reuse_idx < 0)

    @property
    def reused(self) -> np.ndarray:
        return np.flatnonzero(self.reuse_idx >= 0)

    def is_hit(self) -> bool:
        """True when the file already holds everything, row table and file identities included."""
        old, n = self.old_info, len(self.manifest.rows)
        dropped = 0 if self.old_rows is None else len(self.old_rows["paths"]) - len(self.reused)
        return (not self.jobs and old is not None and dropped == 0 and n == old.n_rows
                and _same_rows(self.old_rows, old.class_names, self.manifest)
                and _same_identity(self.old_rows, self.manifest, self.content))

    def hash_fresh_rows(self) -> None:
        """Hash the files of the rows computed now: a row records the bytes it was made of."""
        unhashed = [j for j in self.fresh if not self.content[j]]
        self.content[unhashed] = _hash_files([self.manifest.abspath(self.manifest.rows[j]) for j in unhashed])

    def work_plan(self, batch_size: int, max_pixels: int | None) -> dict:
        """The ``plan.json`` of the work folder: what its shards are part of (see :mod:`cnncodes.workdir`)."""
        m, old = self.manifest, self.old_info
        return {
            "spec": self.base,
            "fingerprint": self.base_fp,
            "layers": [{"key": k, "alias": ld.alias, "node": ld.node, "stage": ld.stage, "pool": p, "fingerprint": fp}
                       for ld, p, k, fp in self.final],
            "manifest_hash": m.digest(),
            "manifest_state": store.fingerprint_of([(r.relpath, r.size, r.mtime_ns, r.ctime_ns, r.inode)
                                                    for r in m.rows]),
            "dataset_root": m.root,
            "dataset_list": m.list_path,
            "n_rows": len(m.rows),
            "n_todo": int(sum(len(r) for r, _ in self.jobs)),
            "jobs": [{"rows": len(r), "keys": ks} for r, ks in self.jobs],
            "batch_size": int(batch_size),
            "max_pixels": max_pixels,
            "old_file": None if old is None else {"updated": old.updated, "rows_sha256": old.rows_sha256},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "weights_path": self.weights.path,
            "fresh_job": 0 if len(self.fresh) else None,
            "n_views": self.views.count(),
        }


def plan_extraction(data: str | os.PathLike, config: ExtractConfig, run: RunOptions) -> ExtractionPlan:
    """Resolve ``config`` for ``data``: backbone, weights, fingerprint, cache file, reused rows and jobs.

    The checks run cheapest first: layers and pooling before the data is listed or the weights read.
    """
    spec = effective_backbone(get_backbone(config.model), config.fc_as_conv, config.input_size)
    view_set = resolve_views(config.views, spec.preprocessing)
    check_combine(config.combine)
    _check_keep_views(config.keep_views, view_set)
    plan_layers(spec, config.layers, config.pool, "")
    manifest = _load_manifest(data)
    wts = resolve_weights(spec, config.weights)
    # The precision is part of the fingerprint and "auto" depends on the device. A cache hit
    # must not import torch (seconds), so the device is first guessed from /dev; if work is
    # needed, torch decides and the plan is redone if the guess was wrong.
    dev = _probe_device() if run.device == "auto" else run.device
    prec = resolve_precision(config.precision, dev)
    base = _base_spec(spec, wts, config.dtype, prec, config.draft, config.decoder, view_set, config.combine,
                      gpu_model() if dev == "cuda" else None)
    base_fp = store.fingerprint_of(base)
    lplan = plan_layers(spec, config.layers, config.pool, base_fp, config.keep_views)
    path = _cache_path(Path(run.out), manifest, spec.name, base_fp, run.name)
    old_info = _existing_cache(path, base_fp, manifest, run.overwrite)
    old_rows = store.read_rows(path) if old_info is not None else None
    # row in the old file (or -1), and each image's content sha256 where known
    reuse_idx, content = _match_rows(old_rows, manifest, run.verify_content)
    _retry_rows_refused_for_size(reuse_idx, old_rows, run.max_pixels)
    final, jobs = _jobs(spec, lplan, old_info, reuse_idx, base_fp)
    return ExtractionPlan(spec, wts, view_set, dev, prec, base, base_fp, lplan, final, manifest, path, old_info,
                          old_rows, reuse_idx, content, jobs)


def _check_keep_views(keep_views: bool, view_set: ViewSet) -> None:
    """Kept views need several views: with one, the stored code is that view's code already."""
    if keep_views and view_set.count() < 2:
        raise InvalidParameterError(
            "keep_views", "extract",
            f"needs several views of each image: with views={view_set.name!r} the stored code is the only view. "
            f"Ask for views='flip', '5crop', '10crop' or 'multiscale' too, or do not keep views.")


def _existing_cache(path: Path, base_fp: str, manifest: Manifest, overwrite: bool) -> store.CacheInfo | None:
    """The info of the cache file already at ``path`` (None: none, or ``overwrite``); refused if it is another's."""
    if not path.exists():
        return None
    if overwrite:
        log.info("overwrite: ignoring the existing cache %s", path)
        return None
    old_info = store.read_info(path)
    if old_info.fingerprint != base_fp:
        raise CacheMismatchError(f"{path} holds another spec (fingerprint {old_info.fingerprint[:12]}); pass overwrite=True to replace it")
    _check_same_dataset(old_info, manifest)
    return old_info


def _jobs(spec: BackboneSpec, lplan: list, old_info, reuse_idx: np.ndarray, base_fp: str):
    """The layers of the final file, and the (rows, keys) to compute."""
    keys = [key for _ld, _p, key, _fp in lplan]
    old_layers = {} if old_info is None else dict(old_info.layers)
    new_keys = [key for key in keys if key not in old_layers or old_layers[key].fingerprint != _fp_of(lplan, key)]
    # layers of the final file: the old ones (still valid) plus the requested ones
    final = list(lplan) + [_plan_from_record(spec, rec, base_fp) for k, rec in old_layers.items() if k not in keys]
    final = [f for f in final if f is not None]
    fresh, reused = np.flatnonzero(reuse_idx < 0), np.flatnonzero(reuse_idx >= 0)
    jobs: list[tuple[np.ndarray, list[str]]] = []
    if len(fresh):
        jobs.append((fresh, [f[2] for f in final]))
    if new_keys and len(reused):
        jobs.append((reused, new_keys))
    return final, jobs
