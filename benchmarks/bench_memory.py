"""Peak memory of an extraction as the dataset grows: 7,000 vs 70,000 images (issue goal: within 1.5x).

Data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``; IDX files under /usr/share/datasets/fashion-mnist/),
written once as PNG image folders under ``artifacts/bench/fashion-<N>/<class>/``.

Each size is extracted by ``scripts/extract.py`` in a fresh subprocess with the ``tiny`` backbone's
``conv2`` map unpooled (``--pool none``: 16x16x16 = 4,096-D codes, as wide as AlexNet's fc7), so the
codes are as big as real ones while the forward pass stays fast on a CPU. The peak resident memory of
the whole process tree (main process + decoding workers) is sampled every 50 ms from /proc.

Usage::

    python benchmarks/bench_memory.py               # 7000 and 70000
    python benchmarks/bench_memory.py --sizes 1000 10000

Writes ``artifacts/bench/memory.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IDX = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_folder(n: int, root: Path) -> Path:
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    if not IDX.exists():
        sys.exit(f"{IDX} is missing: apt-get install dataset-fashion-mnist")
    x = np.concatenate([read_idx(IDX / "train-images-idx3-ubyte.gz"), read_idx(IDX / "t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([read_idx(IDX / "train-labels-idx1-ubyte.gz"), read_idx(IDX / "t10k-labels-idx1-ubyte.gz")])
    if n > len(x):
        sys.exit(f"Fashion-MNIST has {len(x)} images, asked for {n}")
    shutil.rmtree(root, ignore_errors=True)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(x[i], mode="L").save(root / CLASSES[y[i]] / f"{i:05d}.png", compress_level=1)
    done.touch()
    return root


def tree_rss_kb(pid: int) -> int:
    """Resident memory (kB) of ``pid`` and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def run(n: int, data: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "scripts" / "extract.py"), str(data), "--model", "tiny", "--weights", "none",
           "--layers", "conv2", "--pool", "none", "--out", str(out), "--device", "cpu", "--batch-size", "256",
           "--workers", str(workers), "-q"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_tree = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, tree_rss_kb(proc.pid))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"extraction of {n} failed:\n{stderr.decode()}")
    secs = time.perf_counter() - t
    cache = Path(stdout.decode().strip().splitlines()[-1])
    return {"images": n, "seconds": round(secs, 1), "img_s": round(n / secs, 1),
            "peak_tree_rss_mb": round(peak_tree / 1024, 1), "cache_mb": round(cache.stat().st_size / 2**20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[7000, 70000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the image folders and caches")
    args = ap.parse_args(argv)
    base = REPO / "artifacts" / "bench"
    rows = []
    for n in args.sizes:
        data = write_folder(n, base / f"fashion-{n}")
        rows.append(run(n, data, base / f"memory-codes-{n}", args.workers))
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(base / f"memory-codes-{n}", ignore_errors=True)
    ratio = rows[-1]["peak_tree_rss_mb"] / rows[0]["peak_tree_rss_mb"]
    print(f"\npeak RSS {rows[-1]['images']} vs {rows[0]['images']} images: {rows[-1]['peak_tree_rss_mb']} MB vs "
          f"{rows[0]['peak_tree_rss_mb']} MB = {ratio:.2f}x (goal <= 1.5x)")
    (base / "memory.json").write_text(json.dumps({"rows": rows, "ratio": round(ratio, 3)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
