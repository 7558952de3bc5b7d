"""Run an extraction's batches as Ray tasks (``extract(..., engine="ray")``, ``--engine ray``).

Ray places the work, retries tasks lost with a node and handles nodes joining or leaving;
it owns no state of cnncodes'. The driver (:func:`cnncodes.extraction.extract`) plans, locks,
resumes from the shards already written and consolidates, as with the local engine. Each
task decodes one fixed batch (the images of the plan's batch, each with its views) with
cnncodes' own dataset, runs the model (kept loaded per Ray worker process between tasks),
combines the views as the local engine does and writes the batch's shard into ``<cache>.partial/`` with
the same protocol as the local engine (temporary file, fsync, rename, checksum in the name,
first complete attempt claims the batch); it returns the shard's name and the batch's
failures, never the codes. The ``.partial`` folder must therefore be reachable at the same
path from every node (a shared file system), and so must the images and a weights file.

Ray is an optional dependency (``pip install 'cnncodes[ray]'``); nothing else imports this
module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import (ClusterUnreachableError, CnnCodesError, ErrorBudgetExceeded, ExtractionWriteError,
                     InvalidParameterError, UsageError)

log = logging.getLogger(__name__)

#: Seconds the driver waits for a cluster's address to answer before it gives up.
CONNECT_TIMEOUT_S = 10.0
#: Attempts of one batch when Ray loses its task with a node (or a worker process).
MAX_RETRIES = 5

_ADDRESS_RE = re.compile(r"^(?:ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")


def check_address(address: str | None, caller: str = "extract") -> str:
    """``None``/``auto`` (the cluster this machine belongs to) or ``host:port``; else :class:`InvalidParameterError`."""
    if address in (None, "auto"):
        return "auto"
    m = _ADDRESS_RE.match(address)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise InvalidParameterError("ray_address", caller,
                                    f"must be HOST:PORT of the cluster's head (e.g. '10.0.0.5:6379', as `ray start "
                                    f"--head` prints it) or 'auto'. Got {address!r}, which is not an address, instead.")
    return address


def require_ray():
    try:
        import ray
    except ImportError as e:
        raise UsageError("engine='ray' needs Ray: pip install 'cnncodes[ray]' (or 'ray>=2.9')") from e
    return ray


def check_engine(engine: str, ray_address: str | None) -> str | None:
    """The cluster address to use (None for the local engine), checked before any work or file.

    Raises
    ------
    UsageError
        ``ray_address`` without ``engine='ray'``, a malformed address, or Ray not installed.
    ClusterUnreachableError
        Nothing answers at ``ray_address``.
    """
    if engine != "ray":
        if ray_address is not None:
            raise UsageError(f"ray_address={ray_address!r} goes with engine='ray'; leave it out for the local engine")
        return None
    address = check_address(ray_address)
    require_ray()
    probe(address)  # an unreachable cluster fails here, before any work or file
    return address


def probe(address: str) -> None:
    """Fail fast, naming the address, when nothing answers at ``host:port``."""
    if address == "auto":
        return
    m = _ADDRESS_RE.match(address)
    host, port = m.group(1).strip("[]"), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterUnreachableError(
            f"No Ray cluster answers at {address} ({e}). Start one (`ray start --head --port {port}` on the head "
            f"node), check the address and the network, or use engine='local'.") from e


def connect(address: str):
    """Join the cluster at ``address`` (bounded wait); return the ``ray`` module."""
    ray = require_ray()
    probe(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a user's run
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, TimeoutError) as e:
        where = "on this machine (no `ray start` running?)" if address == "auto" else f"at {address}"
        raise ClusterUnreachableError(f"Cannot join a Ray cluster {where}: {e}. Start one with `ray start --head`, "
                                      f"pass ray_address='HOST:PORT', or use engine='local'.") from e
    return ray


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class TaskSpec:
    """What every task needs to rebuild the driver's model and pipeline and write its shards (sent once).

    The backbone is rebuilt on the worker from its name and the architecture options
    (:func:`cnncodes.extraction.effective_backbone`), so its preprocessing is the driver's.
    """

    model: str
    fc_as_conv: bool
    input_size: int | None
    weights: object  # backbones.ResolvedWeights
    layers: list  # the plan's (LayerDef, pool, key, fingerprint) of every layer of the file
    device: str
    precision: str
    dtype: str
    draft: bool
    decoder: str
    views: object  # views.ViewSet, resolved by the driver
    combine: str
    max_pixels: int | None
    pdir: str
    gpu: str | None = None  # the GPU model the spec records (codes differ between models)
    token: str = field(default="")

    def backbone(self):
        from .backbones import get_backbone
        from .extraction import effective_backbone

        return effective_backbone(get_backbone(self.model), self.fc_as_conv, self.input_size)


@dataclass
class BatchResult:
    shard: str
    job: int
    batch: int
    n: int
    failures: list = field(default_factory=list)  # (path, message) of the rows that failed
    map_shapes: dict = field(default_factory=dict)
    node: str = ""


_RUNNERS: dict[str, object] = {}  # per Ray worker process: the model, built once for all its tasks


def _runner_for(ts: TaskSpec):
    r = _RUNNERS.get(ts.token)
    if r is None:
        from .extraction._features import _Runner
        from .extraction._runtime import gpu_model
        from .fileio import sha256_of_file

        w = ts.weights
        if w.kind == "file" and sha256_of_file(w.path) != w.sha256:
            # another node's copy of the weights would give other codes under the same fingerprint
            raise UsageError(f"{w.path} on node {socket.gethostname()} is not the weights file the driver hashed "
                             f"(sha256 {str(w.sha256)[:12]}); every node must see the same file")
        if ts.device == "cuda" and gpu_model() != ts.gpu:
            raise UsageError(f"Node {socket.gethostname()} has a {gpu_model()}, the codes' spec a {ts.gpu}: GPU models "
                             f"give different codes. Run on one GPU model (a Ray custom resource per model) or "
                             f"use device='cpu'")
        _RUNNERS.clear()
        r = _RUNNERS[ts.token] = _Runner(ts.backbone(), w, ts.layers, ts.device, ts.precision)
    return r


def run_batch(ts: TaskSpec, job: int, batch: int, rows: np.ndarray, paths: Sequence[str],
              keys: Sequence[str]) -> BatchResult:
    """Extract one planned batch and publish its shard (the body of a Ray task; callable directly).

    The same steps as the local engine's ``extraction._jobs._Job``: decode each image's views,
    one forward pass for the batch, views combined, NaN codes for failed images, stored dtype.
    """
    from .extraction._pipeline import _collate, _ImageDataset
    from .views import codes_of_keys
    from .workdir import _write_shard

    views = ts.views
    ds = _ImageDataset(list(paths), ts.backbone().preprocessing, ts.draft, ts.decoder, max_pixels=ts.max_pixels,
                       views=views)
    idx, x, status, notes = _collate([ds[i] for i in range(len(ds))])
    runner = _runner_for(ts)
    runner.activate(keys)
    out = runner(x)
    codes = codes_of_keys(out, keys, views.count(), ts.combine)
    bad = [i for i, s in enumerate(status) if s != "ok"]
    for k in codes:
        codes[k][bad] = np.nan
    dt = np.float16 if ts.dtype == "float16" else np.float32
    shard = _write_shard(Path(ts.pdir), job, batch, np.asarray(rows), status, notes,
                         {k: v.astype(dt) for k, v in codes.items()})
    return BatchResult(shard.name, job, batch, len(idx), [(paths[i], notes[i]) for i in bad],
                       dict(runner.map_shapes), socket.gethostname())


def task_token(ts: TaskSpec) -> str:
    """Identifies a model setup, so that a worker process reuses its model only for the same one."""
    return hashlib.sha256(repr((ts.model, ts.fc_as_conv, ts.input_size, ts.weights, [x[2:] for x in ts.layers],
                                ts.device, ts.precision)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the driver side


@dataclass
class RayRun:
    n_computed: int = 0
    map_shapes: dict = field(default_factory=dict)
    seconds: float = 0.0


def run(address: str, ts: TaskSpec, work: list[tuple[int, int, np.ndarray, list[str], list[str]]],
        on_batch: Callable[[BatchResult], None]) -> RayRun:
    """Run ``work`` — (job, batch, rows, paths, keys) per batch — on the cluster; call ``on_batch`` per shard.

    ``on_batch`` may raise (an exceeded error budget): the tasks not yet finished are then cancelled
    and the exception propagates; the shards already written stay for a resume.
    """
    ray = connect(address)
    try:
        res = RayRun()
        if not work:
            return res
        opts = {"num_gpus": 1} if ts.device == "cuda" else {"num_cpus": 1}
        task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD",
                          **opts)(run_batch)
        ts_ref = ray.put(ts)
        t0 = time.perf_counter()
        pending = [task.remote(ts_ref, j, b, rows, paths, keys) for j, b, rows, paths, keys in work]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                br = _get(ray, ready[0], ts.pdir)
                res.n_computed += br.n
                res.map_shapes.update(br.map_shapes)
                on_batch(br)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        res.seconds = time.perf_counter() - t0
        return res
    finally:
        ray.shutdown()


def _get(ray, ref, pdir: str) -> BatchResult:
    """A task's result; its failure as cnncodes' own error, saying that finished shards are kept."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, CnnCodesError):
            raise cause from None
        if isinstance(cause, OSError):
            raise ExtractionWriteError(f"Writing codes failed on the cluster ({cause}). Finished batches are kept in "
                                       f"{pdir}; fix the folder and run the same command again to resume.") from None
        raise CnnCodesError(f"A batch failed on the cluster: {cause!r}. Finished batches are kept in {pdir}; "
                            f"run the same command again to resume.") from None
    except ray.exceptions.RayError as e:  # lost more often than MAX_RETRIES, the cluster went away...
        raise CnnCodesError(f"The Ray cluster lost a batch ({type(e).__name__}: {e}). Finished batches are kept "
                            f"in {pdir}; run the same command again to resume.") from None


def task_spec(plan, config, run_options, pdir: Path) -> TaskSpec:
    """The :class:`TaskSpec` of an extraction plan (``extraction._plan.ExtractionPlan``) and its options."""
    ts = TaskSpec(config.model, config.fc_as_conv, config.input_size, plan.weights, list(plan.final), plan.device,
                  plan.precision, config.dtype, config.draft, config.decoder, plan.views, config.combine,
                  run_options.max_pixels, str(pdir), plan.base.get("gpu"))
    return TaskSpec(**{**ts.__dict__, "token": task_token(ts)})


def run_jobs_on_ray(plan, config, run_options, pdir: Path, batches: dict, done: dict, stats):
    """The Ray engine's counterpart of ``extraction._jobs.run_jobs``: every batch not in ``done``, on the cluster.

    The batches are those the driver planned (``batches``: rows by job, the plan's images per
    batch), so the shards, and the codes, are the local engine's. After the tasks end, the driver
    (alone) scans the shards, which removes other attempts' shards and temporary files; a batch
    claimed by an attempt that died before publishing it is run once more.
    """
    from .extraction._jobs import _FAILURES_SHOWN, _progress
    from .workdir import _scan_shards

    ts = task_spec(plan, config, run_options, pdir)
    todo = sum(len(batches[j][b]) for j in batches for b in range(len(batches[j])) if (j, b) not in done)
    bar = _progress(run_options.progress, todo, plan.path.name)

    def on_batch(br: BatchResult) -> None:
        stats.n_computed += br.n
        stats.n_failed += len(br.failures)
        stats.first_failures.extend(br.failures[: max(0, _FAILURES_SHOWN - len(stats.first_failures))])
        if bar is not None:
            bar.update(br.n)
        if stats.n_failed > stats.budget:
            raise ErrorBudgetExceeded(
                f"{stats.n_failed} of {stats.n_todo} images failed to decode, more than the error budget "
                f"({run_options.error_budget:.1%} = {stats.budget}). First failures:\n"
                + "\n".join(f"  {m}" for _p, m in stats.first_failures)
                + f"\nFix or remove these files (or raise error_budget) and run again; "
                  f"finished batches are kept in {pdir}.")

    try:
        for _round in range(2):
            work = [(ji, b, brows, [plan.manifest.abspath(plan.manifest.rows[i]) for i in brows], list(ks))
                    for ji, (_rows, ks) in enumerate(plan.jobs) for b, brows in enumerate(batches[ji])
                    if (ji, b) not in done]
            if not work:
                break
            rr = run(run_options.ray_address, ts, work, on_batch)
            stats.stream_seconds += rr.seconds
            stats.map_shapes.update(rr.map_shapes)
            done = _scan_shards(pdir)
    finally:
        if bar is not None:
            bar.close()
    return stats
