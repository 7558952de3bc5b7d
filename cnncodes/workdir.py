"""The work folder of an unfinished extraction, ``<cache>.partial/``: shards, the plan, consolidation.

Each finished batch is a shard file (temporary name, fsync, rename; its sha256 is in its name,
:class:`cnncodes.store.ShardName`). ``plan.json`` records what the shards are part of, so that the
same command resumes from them; a plan that differs is refused. :func:`_consolidate` streams old
codes and shards, in the manifest's order, into the new cache file. Folders are removed by renaming
them out of the way first, so that a kill leaves all of a work folder or none of it.

This module never imports torch.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from . import store
from .errors import CacheCorruptError, CacheMismatchError, ExtractionWriteError
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir
from .store._partial import claim_name, parse_claim

log = logging.getLogger("cnncodes.extraction")


def _write_shard(pdir: Path, job: int, batch: int, rows: np.ndarray, status, messages, codes: dict) -> Path:
    """Write one batch's shard; return the shard that holds the batch (this one, or an earlier attempt's)."""
    buf = io.BytesIO()
    arrays = {"rows": np.asarray(rows, dtype=np.int64), "status": np.asarray(status, dtype=str),
              "message": np.asarray(messages, dtype=str)}
    for k, v in codes.items():
        arrays[f"codes/{k}"] = v
    np.savez(buf, **arrays)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = pdir / str(store.ShardName(job, batch, len(rows), digest[:16]))
    return _publish_shard(pdir, job, batch, path, data)


def _publish_shard(pdir: Path, job: int, batch: int, path: Path, data: bytes) -> Path:
    """Publish a shard so that, of several attempts at one batch, exactly one ever counts.

    An engine may run a batch twice (a retried Ray task, a node that comes back, a killed driver's
    task still running), and on a GPU two attempts can give different bytes, hence two names.
    Each attempt writes its shard under a temporary name (fsync'ed), then claims the batch:
    a file holding the shard's name is hard-linked to ``claim-<job>_<batch>``, which fails if
    that name exists, so the first complete attempt wins and later ones drop their temporary
    files. Only then is the winner renamed to its checksummed name. :func:`_scan_shards` accepts,
    for a claimed batch, only the shard the claim names (a name, not an inode: copies of the
    folder keep it).
    """
    suffix = f".tmp.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
    tmp = path.with_name(path.name + suffix)
    claim = pdir / claim_name(job, batch)
    claim_tmp = claim.with_name(claim.name + suffix)
    atomic_write_bytes(tmp, data)
    atomic_write_text(claim_tmp, path.name)
    try:
        os.link(claim_tmp, claim)
    except FileExistsError:
        _unlink(tmp)  # our own temporary files; nobody else's is ever touched here
        log.info("Batch %d/%d was already written by another attempt; keeping that one", job, batch)
        return pdir / _claimed_name(claim)
    finally:
        _unlink(claim_tmp)
    os.replace(tmp, path)
    fsync_dir(pdir)
    return path


def _claimed_name(claim: Path) -> str:
    try:
        return claim.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _shard_bytes(path: Path) -> bytes | None:
    """A shard file's bytes, or None when they no longer match the sha256 in its name."""
    name = store.ShardName.parse(path.name)
    data = path.read_bytes()
    return data if name is not None and hashlib.sha256(data).hexdigest()[:16] == name.digest16 else None


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    data = _shard_bytes(path)
    if data is None:
        raise CacheCorruptError(f"shard {path} changed after it was written (sha256 mismatch)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _scan_shards(pdir: Path, *, verify: bool = True) -> dict[tuple[int, int], Path]:
    """Finished shards by (job, batch): for a claimed batch the claim's shard, else the first name.

    With ``verify`` (only while no task can be writing: the caller holds the lock and no engine
    runs), shards whose bytes changed are deleted with their claim (and so recomputed), and so are
    claims never published (a writer killed between claim and rename), other attempts' shards and
    orphaned temporary files. Without it the names are only listed, for a caller that reads every
    shard through :func:`_read_shard`, which verifies it.
    """
    cands: dict[tuple[int, int], list[Path]] = {}
    for p in sorted(pdir.glob("shard-*.npz")):
        name = store.ShardName.parse(p.name)
        if name is not None:
            cands.setdefault((name.job, name.batch), []).append(p)
    claims = {key: p for p in pdir.glob("claim-*") if (key := parse_claim(p.name)) is not None}
    found = {}
    for key in sorted(set(cands) | set(claims)):
        claim, paths, won = claims.get(key), cands.get(key, []), []
        if claim is not None:
            name = _claimed_name(claim)
            won = [p for p in paths if p.name == name]
            paths = won + [p for p in paths if p not in won]
        if verify:
            if claim is not None and not won:
                log.info("Batch %d/%d was claimed but never published; it will be recomputed", *key)
                _unlink(claim, *paths)
                continue
            for p in paths[1:]:
                log.info("Removing %s: another attempt at the same batch was published first", p.name)
                _unlink(p)
            if paths and _shard_bytes(paths[0]) is None:
                log.warning("Shard %s is corrupt (sha256 mismatch); it will be recomputed", paths[0].name)
                _unlink(paths[0], *([claim] if claim is not None else []))
                continue
        if paths and (claim is None or won):
            found[key] = paths[0]
    if verify:
        _unlink(*pdir.glob("shard-*.npz.tmp.*"), *pdir.glob("claim-*.tmp.*"))  # attempts killed before their claim
    return found


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class _ShardWriter:
    """Writes shards on a background thread so that the forward pass never waits for the disk."""

    def __init__(self, pdir: Path):
        self.pdir = pdir
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
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
                self.write(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def write(self, item) -> None:
        """Write one shard (on the writer thread)."""
        _write_shard(self.pdir, *item)
        self.written += 1

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


def _plan_diff(old: dict, new: dict) -> list[str]:
    diff = []
    o, n = old.get("spec", {}), new["spec"]
    for field_ in ("backbone", "weights", "preprocessing", "dtype", "precision", "arch_args", "library_majors", "gpu"):
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


def _consolidate(path, pdir, manifest, jobs, batches, final, old_info, reuse_idx, content, base, base_fp, dtype,
                 compression, map_shapes, plan, versions) -> store.CacheInfo:
    """Stream old codes and shards, in manifest order, into a new cache file (atomic)."""
    shards = _scan_shards(pdir, verify=False)  # each one is verified when it is read below
    for ji in range(len(jobs)):
        for b in range(len(batches[ji])):
            if (ji, b) not in shards:
                raise CacheCorruptError(f"shard {ji}/{b} of {pdir} is missing; run the same command again")
    rows = _row_table(path, manifest, old_info, reuse_idx, content, shards, batches, plan["fresh_job"])
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
        rec = store.LayerRecord(key, ld.alias, ld.node, ld.stage, pool, int(dim), tuple(shape), fp,
                                views=_kept_views(key, old_info, plan))
        records.append(rec)
        layers[key] = (rec, _layer_blocks(key, path, len(manifest.rows), jobs, batches, shards, old_info, reuse_idx))
    spec = dict(base, layers=[r.to_dict() for r in records], weights_path=plan.get("weights_path"))
    return store.write_cache(
        path, spec=spec, fingerprint=base_fp, manifest_hash=manifest.digest(), dataset_root=manifest.root,
        dataset_list=manifest.list_path,
        class_names=list(manifest.class_names), rows=rows, layers=layers, dtype=dtype, compression=compression,
        created=None if old_info is None else old_info.created, versions=versions,
    )


def _kept_views(key: str, old_info, plan: dict) -> int:
    """V for a layer of kept per-view codes (from the old file, or the plan of the shards), else 0."""
    from .views import is_views_key

    if not is_views_key(key):
        return 0
    if old_info is not None and key in old_info.layers:
        return old_info.layers[key].views
    return int(plan["n_views"])


def _row_table(path, manifest, old_info, reuse_idx, content, shards, batches, full_job) -> dict[str, np.ndarray]:
    """The new file's row table: computed rows take their status from the job with every layer, reused rows
    theirs from the old file."""
    n = len(manifest.rows)
    status = np.array(["ok"] * n, dtype=object)
    message = np.array([""] * n, dtype=object)
    if old_info is not None:
        old_rows = store.read_rows(path)
        has = reuse_idx >= 0
        status[has] = old_rows["status"][reuse_idx[has]]
        message[has] = old_rows["message"][reuse_idx[has]]
    if full_job is not None:
        for b in range(len(batches[full_job])):
            sh = _read_shard(shards[(full_job, b)])
            status[sh["rows"]] = sh["status"]
            message[sh["rows"]] = sh["message"]
    return {
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


#: Rows per block streamed into the new cache file.
_BLOCK_ROWS = 4096


def _layer_blocks(key, path, n, jobs, batches, shards, old_info, reuse_idx) -> Iterator[np.ndarray]:
    """The codes of layer ``key`` for all ``n`` rows in manifest order, in blocks, from old file and shards."""
    # which job computed this layer for each row, in manifest order
    src_job = np.full(n, -1, dtype=np.int64)
    for ji, (jrows, ks) in enumerate(jobs):
        if key in ks:
            src_job[jrows] = ji
    from_old = src_job < 0
    if np.any(from_old & (reuse_idx < 0)):
        raise AssertionError(f"rows without a source for layer {key}")
    old_block_iter = None
    if old_info is not None and np.any(from_old):
        old_block_iter = _RowStream(store.iter_layer_blocks(path, key, reuse_idx[from_old]))
    shard_iters = {ji: _RowStream(_read_shard(shards[(ji, b)])[f"codes/{key}"] for b in range(len(batches[ji])))
                   for ji, (_r, ks) in enumerate(jobs) if key in ks}
    for s in range(0, n, _BLOCK_ROWS):
        sj = src_job[s:s + _BLOCK_ROWS]
        out = None
        for ji in np.unique(sj):
            sel = np.flatnonzero(sj == ji)
            part = old_block_iter.take(len(sel)) if ji < 0 else shard_iters[int(ji)].take(len(sel))
            if out is None:
                out = np.empty((len(sj), part.shape[1]), dtype=part.dtype)
            out[sel] = part
        yield out


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


def open_workdir(path: Path, old_info, plan: dict, overwrite: bool) -> int:
    """Make ``<path>.partial`` the work folder of ``plan`` (the caller holds the lock); the batch size to use.

    Leftovers of killed runs are removed, a work folder whose work is already in the file is dropped,
    and an unfinished one is adopted when its plan is this one (with its batch size, so that its
    shards stay valid), discarded with ``overwrite``, refused otherwise.

    Raises
    ------
    CacheMismatchError
        An unfinished extraction with another plan, without ``overwrite``.
    ExtractionWriteError
        The folder cannot be written.
    """
    pdir = store.partial_dir(path)
    _remove_leftovers(path)
    _drop_stale_partial(path, pdir, old_info)
    if pdir.exists():
        _adopt_or_discard(path, pdir, plan, overwrite)
    try:
        pdir.mkdir(parents=True, exist_ok=True)
        if not (pdir / "plan.json").exists():
            atomic_write_text(pdir / "plan.json", json.dumps(plan, indent=1))
    except OSError as e:
        raise ExtractionWriteError(f"Cannot write to {pdir}: {e}. Free space or fix permissions and run again.") from e
    return int(plan["batch_size"])


def _adopt_or_discard(path: Path, pdir: Path, plan: dict, overwrite: bool) -> None:
    """Keep an existing work folder whose plan is ``plan`` (taking its batch size into ``plan``), else remove it."""
    try:
        old_plan = json.loads((pdir / "plan.json").read_text())
    except (OSError, ValueError):
        old_plan = None
    if old_plan is None:
        if any(pdir.glob("shard-*.npz")):
            # shards without their plan cannot be matched to images: never adopt them
            log.warning("%s holds shards but no plan.json; they are discarded", pdir)
            _remove_partial(pdir)
        return
    diff = _plan_diff(old_plan, plan)
    if diff and not overwrite:
        raise CacheMismatchError(
            f"An unfinished extraction into {path} was started with a different "
            f"{', '.join(diff)}. Re-run it with the same arguments to resume it, or pass "
            f"overwrite=True to discard its work and start this one."
        )
    if diff:
        log.warning("overwrite: discarding an unfinished extraction (different %s)", ", ".join(diff))
        _remove_partial(pdir)
    elif old_plan["batch_size"] != plan["batch_size"]:
        log.info("Resuming with the batch size of the interrupted run (%d)", old_plan["batch_size"])
        plan["batch_size"] = int(old_plan["batch_size"])


def finished_shards(pdir: Path, jobs, batches: dict) -> tuple[dict[tuple[int, int], Path], int]:
    """The shards that hold this run's batches, by (job, batch), and their failed images.

    A shard whose rows or layers are not those of its batch is deleted (it will be recomputed).
    """
    done = _scan_shards(pdir)
    n_failed = 0
    for (j, b), p in list(done.items()):
        sh = _read_shard(p)
        if (j not in batches or b >= len(batches[j]) or not np.array_equal(sh["rows"], batches[j][b])
                or any(f"codes/{k}" not in sh for k in jobs[j][1])):
            log.warning("Shard %s does not hold this run's batch %d/%d; it will be recomputed", p.name, j, b)
            _unlink(p, pdir / claim_name(j, b))
            del done[(j, b)]
            continue
        n_failed += int(np.sum(sh["status"] != "ok"))
    return done, n_failed
