"""Run an extraction's jobs: decode in workers, forward, combine views, write each batch as a shard."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CnnCodesError, ErrorBudgetExceeded, ExtractionWriteError
from ..views import codes_of_keys
from ..workdir import _ShardWriter
from ._features import _Runner
from ._pipeline import _default_workers, _loader
from ._plan import ExtractionPlan
from ._spec import ExtractConfig, RunOptions

#: Failures quoted in an error-budget message.
_FAILURES_SHOWN = 10


@dataclass
class JobStats:
    """Counters of the batches run in this call (shards of an interrupted run included in ``n_failed``)."""

    n_todo: int
    budget: int
    resumed_from: int = 0
    n_computed: int = 0
    n_failed: int = 0
    first_failures: list[tuple[str, str]] = field(default_factory=list)
    stream_seconds: float = 0.0
    map_shapes: dict = field(default_factory=dict)


def run_jobs(plan: ExtractionPlan, config: ExtractConfig, run: RunOptions, pdir: Path, batch_size: int,
             batches: dict, done: dict, stats: JobStats) -> JobStats:
    """Compute every batch of ``plan.jobs`` not in ``done`` into a shard of ``pdir``.

    The model is built once, after the first job's decoding workers have started (the first batches
    decode while it loads), and captures only each job's layers.
    """
    runner = None
    for ji, (rows, keys) in enumerate(plan.jobs):
        todo = [b for b in range(len(batches[ji])) if (ji, b) not in done]
        if not todo:
            continue
        paths = [plan.manifest.abspath(plan.manifest.rows[i]) for i in rows]
        local = [list(range(b * batch_size, b * batch_size + len(batches[ji][b]))) for b in todo]
        nw = _default_workers(plan.device) if run.workers is None else int(run.workers)
        loader, gate = _loader(paths, plan.spec.preprocessing, config.draft, config.decoder, local, nw, plan.device,
                               gated=(plan.device == "cpu" and run.gate), max_pixels=run.max_pixels, views=plan.views)
        batches_in = iter(loader)  # start the decoding workers first
        if runner is None:
            runner = _Runner(plan.spec, plan.weights, plan.final, plan.device, plan.precision)
        runner.activate(keys)
        job = _Job(ji, rows, keys, paths, runner, gate, plan.views.count(), config, run, pdir, stats)
        job.run(zip(todo, batches_in), sum(len(x) for x in local), plan.path.name)
    if runner is not None:
        stats.map_shapes = runner.map_shapes
    return stats


def failure_budget(error_budget: float, n_todo: int) -> int:
    """Images allowed to fail among ``n_todo``."""
    return int(math.floor(error_budget * max(1, n_todo)))


@dataclass
class _Job:
    """One job's batches through the runner into shards, on a background writer."""

    index: int
    rows: np.ndarray
    keys: list[str]
    paths: list[str]
    runner: _Runner
    gate: object
    n_views: int
    config: ExtractConfig
    run_options: RunOptions
    pdir: Path
    stats: JobStats

    def run(self, batches, total: int, desc: str) -> None:
        writer = _ShardWriter(self.pdir)
        bar = _progress(self.run_options.progress, total, desc)
        t_stream = None
        try:
            for b, (idx, x, status, notes) in batches:
                if t_stream is None:
                    t_stream = time.perf_counter()
                codes = self._codes(x)
                self._record_failures(codes, idx, status, notes)
                dt = np.float16 if self.config.dtype == "float16" else np.float32
                writer.put((self.index, b, self.rows[np.asarray(idx)], status, notes,
                            {k: v.astype(dt) for k, v in codes.items()}))
                self.stats.n_computed += len(idx)
                if bar is not None:
                    bar.update(len(idx))
            if t_stream is not None:
                self.stats.stream_seconds += time.perf_counter() - t_stream
            writer.close()
        except BaseException as e:
            with contextlib.suppress(BaseException):
                writer.close()
            if isinstance(e, OSError) and not isinstance(e, CnnCodesError):
                raise ExtractionWriteError(
                    f"Writing codes failed ({e}). The {self.stats.resumed_from + self.stats.n_computed} images "
                    f"finished so far are kept in {self.pdir}; free space or fix the folder and run the same "
                    f"command again to resume."
                ) from e
            raise
        finally:
            if bar is not None:
                bar.close()
        if writer.error is not None:
            raise writer.error

    def _codes(self, x) -> dict[str, np.ndarray]:
        """The batch's codes, its views combined (and kept, for kept-views keys); decoding workers wait while
        the network runs (the gate)."""
        if self.gate is not None:
            self.gate.clear()
        try:
            codes = self.runner(x)
        finally:
            if self.gate is not None:
                self.gate.set()
        return codes_of_keys(codes, self.keys, self.n_views, self.config.combine)

    def _record_failures(self, codes: dict, idx, status, notes) -> None:
        """NaN codes for images that failed to decode; stop once more failed than the error budget allows."""
        stats = self.stats
        bad = [i for i, s in enumerate(status) if s != "ok"]
        for i in bad:
            for k in codes:
                codes[k][i] = np.nan
            if len(stats.first_failures) < _FAILURES_SHOWN:
                stats.first_failures.append((self.paths[idx[i]], notes[i]))
        stats.n_failed += len(bad)
        if stats.n_failed > stats.budget:
            raise ErrorBudgetExceeded(
                f"{stats.n_failed} of {stats.n_todo} images failed to decode, more than the error budget "
                f"({self.run_options.error_budget:.1%} = {stats.budget}). First failures:\n"
                + "\n".join(f"  {m}" for _p, m in stats.first_failures)
                + f"\nFix or remove these files (or raise error_budget) and run again; "
                  f"finished batches are kept in {self.pdir}."
            )


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.1)
