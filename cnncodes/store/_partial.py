"""The names of an unfinished extraction's work folder and shards, and its progress (see :mod:`cnncodes.workdir`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path


def partial_dir(path: str | os.PathLike) -> Path:
    """The work folder of an unfinished extraction into ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


_SHARD_RE = re.compile(r"^shard-(\d+)_(\d+)-(\d+)-([0-9a-f]{16})\.npz$")


@dataclass(frozen=True)
class ShardName:
    """What a shard's file name says: its job, its batch, its number of rows and the start of its sha256."""

    job: int
    batch: int
    n_rows: int
    digest16: str

    @classmethod
    def parse(cls, name: str) -> "ShardName | None":
        """The fields of a shard file name, or None for any other file."""
        m = _SHARD_RE.match(name)
        return None if m is None else cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4))

    def __str__(self) -> str:
        return f"shard-{self.job}_{self.batch:06d}-{self.n_rows}-{self.digest16}.npz"


_CLAIM_RE = re.compile(r"^claim-(\d+)_(\d+)$")


def claim_name(job: int, batch: int) -> str:
    """The file whose creation claims batch ``batch`` of job ``job`` for one attempt (see ``workdir._publish_shard``)."""
    return f"claim-{job}_{batch:06d}"


def parse_claim(name: str) -> tuple[int, int] | None:
    """(job, batch) of a claim file's name, or None for any other file."""
    m = _CLAIM_RE.match(name)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def partial_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(images done, images planned) of an unfinished extraction, or None if there is none."""
    pdir = partial_dir(path)
    try:
        plan = json.loads((pdir / "plan.json").read_text())
    except (OSError, ValueError):
        return (0, 0) if pdir.is_dir() else None
    names = (ShardName.parse(p.name) for p in pdir.glob("shard-*.npz"))
    return sum(s.n_rows for s in names if s is not None), int(plan.get("n_todo", 0))
