"""What the row identity checks cost: listing, hashing, and a cache hit with and without --verify-content.

On a real image folder (default: flowers5, links to its files in a temporary folder so that nothing in
the shared data is touched), with the ``tiny`` backbone and random weights (its forward pass is
negligible: this measures the bookkeeping, not a network):

- ``list``: ``scan_folder`` (one stat per image: size, mtime, ctime, inode);
- ``hash``: sha256 of every image's bytes (what a first extraction adds to record them, and what
  ``--verify-content`` adds to every run), page cache warm;
- ``hit``: the same ``extract`` call again, default checks (stat only) and with ``verify_content``;
- ``copied``: a hit after the whole dataset was replaced by a copy (new inodes and ctimes, mtimes kept):
  every row is re-hashed instead of re-extracted.

Each figure is the best of ``--repeats`` runs in this process.

Usage::

    python benchmarks/bench_identity.py [--data ../shared/datasets/flowers5] [--limit 4064] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _copy_subset(src: Path, dst: Path, limit: int) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "flowers5"))
    ap.add_argument("--limit", type=int, default=4064)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from cnncodes.extract import _hash_files, extract
    from cnncodes.images import scan_folder

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        n = _copy_subset(Path(args.data), data, args.limit)  # real files: the copy step below needs them
        kw = dict(weights="none", out=Path(tmp) / "codes", device="cpu", workers=0, batch_size=256)
        t = time.perf_counter()
        first = extract(data, "tiny", ["fc1"], **kw)
        t_first = time.perf_counter() - t
        m = scan_folder(data)
        paths = [m.abspath(r) for r in m.rows]
        res = {
            "images": n, "bytes": sum(r.size for r in m.rows),
            "first_extraction_tiny_s": t_first,
            "list_s": _best(lambda: scan_folder(data), args.repeats),
            "hash_s": _best(lambda: _hash_files(paths), args.repeats),
            "hit_default_s": _best(lambda: extract(data, "tiny", ["fc1"], **kw), args.repeats),
            "hit_verify_content_s": _best(lambda: extract(data, "tiny", ["fc1"], verify_content=True, **kw),
                                          args.repeats),
        }
        copy = shutil.copytree(data, Path(tmp) / "copy", copy_function=shutil.copy2)
        shutil.rmtree(data)
        os.replace(copy, data)
        t = time.perf_counter()
        again = extract(data, "tiny", ["fc1"], **kw)
        res["after_copy_s"] = time.perf_counter() - t
        res["after_copy_computed"] = again.n_computed
        assert again.path == first.path and again.n_reused == n
    res["hash_ms_per_image"] = 1000 * res["hash_s"] / n
    res["hash_MB_per_s"] = res["bytes"] / res["hash_s"] / 1e6
    print(json.dumps(res, indent=1))
    out = REPO / "artifacts" / "bench" / "identity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
