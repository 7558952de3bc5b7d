"""Streamed classifier training (``train_svm.py --stream``) against the in-memory path.

1. Peak memory as the rows grow: synthetic post-ReLU caches of N and 10 N rows, each trained in a
   fresh subprocess, peak RSS from ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (goal: 10x the
   rows for <= 1.2x the memory when streamed).
2. Accuracy on real codes: test accuracy of the streamed SVM / softmax against the in-memory
   LinearSVC / multinomial LogisticRegression, same cache, same split, same C search (goal: within 1 pp;
   the streamed fit solves the same objectives, so the C values tried and their val scores are printed
   for both);
   each run in a fresh process (``n_jobs=1``) with its wall seconds and peak RSS. ``--fashion N``
   adds the Fashion-MNIST codes of ``bench_memory.py`` (its first N images, extracted once into
   artifacts/bench/stream-codes-N/).

    python benchmarks/bench_stream.py --caches CACHE:LAYER [CACHE:LAYER ...] --rows 10000 --dim 1024
    python benchmarks/bench_stream.py --no-memory --fashion 7000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

_CHILD = """
import sys
from cnncodes.classify import train_run
s = sys.argv[3] == "1"
train_run(sys.argv[1], ["fc7"], classifiers=["svm"], grid=[1.0, 10.0], out=sys.argv[2], plots=False, n_jobs=1,
          stream=s, max_iter=20)  # memory, not convergence, is measured here
"""


def synthetic(path: Path, n: int, dim: int, k: int = 10) -> Path:
    from cnncodes.store import LayerRecord, fingerprint_of, write_cache

    rng = np.random.default_rng(0)
    y = np.sort(rng.integers(0, k, n))
    centres = rng.random((k, dim)).astype(np.float32)

    def blocks():
        for s in range(0, n, 4096):
            yy = y[s:s + 4096]
            yield np.maximum(centres[yy] + rng.normal(0, 0.5, (len(yy), dim)).astype(np.float32), 0)

    spec = {"backbone": "synthetic", "dtype": "float16", "layers": []}
    rows = {"paths": np.array([f"c{y[i]}/{i:08d}.png" for i in range(n)]), "labels": y,
            "split": np.array([""] * n), "status": np.array(["ok"] * n), "message": np.array([""] * n),
            "file_size": np.zeros(n, np.int64), "file_mtime_ns": np.zeros(n, np.int64)}
    rec = LayerRecord("fc7", "fc7", "fc7", "relu", "avg", dim, (), fingerprint_of({"k": "fc7"}))
    write_cache(path, spec=spec, fingerprint=fingerprint_of(spec), manifest_hash="m" * 64, dataset_root="/s",
                class_names=[f"c{i}" for i in range(k)], rows=rows, layers={"fc7": (rec, blocks())})
    return path


def measured(child: str, *args: str) -> tuple[str, float, float]:
    """Run ``python -c child *args`` in a fresh process (under a middle process, so that
    ``RUSAGE_CHILDREN`` holds only it): its last stdout line, peak RSS (MB) and wall seconds."""
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            f"r = subprocess.run([sys.executable, '-c', {child!r}, *{list(args)!r}], capture_output=True, text=True)\n"
            "assert r.returncode == 0, r.stderr[-3000:]\n"
            "print(json.dumps([r.stdout.strip().splitlines()[-1] if r.stdout.strip() else '',\n"
            "                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,\n"
            "                  time.perf_counter() - t]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    last, mb, s = json.loads(r.stdout.strip().splitlines()[-1])
    return last, round(mb, 1), round(s, 1)


def peak_mb(cache: Path, out: Path, stream: bool) -> tuple[float, float]:
    _, mb, s = measured(_CHILD, str(cache), str(out), "1" if stream else "0")
    return mb, s


_TRAIN_CHILD = """
import json, sys
from cnncodes.classify import train_run
cache, layer, clf, out, stream = sys.argv[1:6]
res = train_run(cache, [layer], classifiers=[clf], out=out, plots=False, stream=stream == "1", n_jobs=1)
r = res.metrics["results"][layer][clf]
print(json.dumps({"test": r["test"]["accuracy"], "val": r["val"]["accuracy"], "C": r["C"],
                  "tried": {f"{e['C']:g}": round(e["score"], 4) for e in r["selection"]["tried"]},
                  "converged": r["converged"], "iterations": r.get("stream", {}).get("sweep_iterations"),
                  "refit_iterations": r.get("stream", {}).get("iterations"),
                  "split": res.metrics["split"]["counts"]}))
"""


def train_child(cache: str, layer: str, clf: str, out: Path, stream: bool) -> dict:
    """One ``train_run`` in a fresh process: its results, wall seconds and peak RSS (MB)."""
    last, mb, s = measured(_TRAIN_CHILD, cache, layer, clf, str(out), "1" if stream else "0")
    return dict(json.loads(last), seconds=s, peak_rss_mb=mb)


def accuracy(cache: str, layer: str, tmp: Path) -> dict:
    """In-memory vs streamed, svm and softmax, each in its own process (same cache, split and grid)."""
    out: dict = {}
    for clf in ("svm", "softmax"):
        for stream in (False, True):
            d = train_child(cache, layer, clf, tmp / f"{layer}-{clf}-{stream}", stream)
            out.setdefault(clf, {})["stream" if stream else "memory"] = d
            print(json.dumps({clf: out[clf]}), flush=True)
        out[clf]["diff_pp"] = round(100 * (out[clf]["stream"]["test"] - out[clf]["memory"]["test"]), 2)
    return out


def fashion_cache(n: int) -> str:
    """Fashion-MNIST codes as ``bench_memory.py`` extracts them (tiny, random weights, conv2 unpooled,
    4,096-D), of its first ``n`` images; the folder and cache are kept under artifacts/bench/."""
    from bench_memory import write_folder

    base = REPO / "artifacts" / "bench"
    data = write_folder(n, base / f"fashion-{n}")
    cmd = [sys.executable, str(REPO / "scripts" / "extract.py"), str(data), "--model", "tiny", "--weights", "none",
           "--layers", "conv2", "--pool", "none", "--out", str(base / f"stream-codes-{n}"), "--device", "cpu",
           "--batch-size", "256", "--workers", "2", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True)  # a cache hit when it exists
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout.strip().splitlines()[-1] + ":conv2@none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000, help="N of the memory test (it also runs 10 N)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--caches", nargs="*", default=[], metavar="CACHE:LAYER")
    ap.add_argument("--fashion", type=int, default=0, metavar="N",
                    help="also compare on the Fashion-MNIST codes of bench_memory.py, its first N images")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--skip-memory-10n", action="store_true",
                    help="skip the in-memory run on 10 N rows (LinearSVC on it takes long on a busy machine)")
    args = ap.parse_args()
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as d:
        tmp = Path(d)
        if not args.no_memory:
            small = synthetic(tmp / "small.h5", args.rows, args.dim)
            big = synthetic(tmp / "big.h5", 10 * args.rows, args.dim)
            mem = res["memory_MB_seconds"] = {"rows": [args.rows, 10 * args.rows], "dim": args.dim}
            for tag, size, cache in (("stream", "N", small), ("stream", "10N", big), ("memory", "N", small),
                                     ("memory", "10N", big)):
                if tag == "memory" and size == "10N" and args.skip_memory_10n:
                    continue
                mem[f"{tag}_{size}"] = peak_mb(cache, tmp / f"r-{tag}-{size}", tag == "stream")
                print(json.dumps(mem), flush=True)
            mem["stream_ratio"] = round(mem["stream_10N"][0] / mem["stream_N"][0], 3)
        for spec in args.caches + ([fashion_cache(args.fashion)] if args.fashion else []):
            cache, layer = spec.rsplit(":", 1)
            res[f"{Path(cache).name}:{layer}"] = accuracy(cache, layer, tmp)
            print(json.dumps(res, indent=1), flush=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
