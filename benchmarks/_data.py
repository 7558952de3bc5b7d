"""What benchmarks share about the real data beside the repo (../shared/datasets)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def link_subset(src: Path, dst: Path, per_class: int) -> Path:
    """An image folder of symbolic links to the first ``per_class`` images (sorted) of each class of
    ``src``; an existing ``dst`` is reused as it is."""
    if dst.is_dir():
        return dst
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in os.listdir(src / cls) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files[:per_class]:
            os.symlink(src / cls / f, dst / cls / f)
    return dst
