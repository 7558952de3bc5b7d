"""Model files: what skops (no pickle) costs against joblib, and what hiding torch from skops saves.

1. ``import skops.io`` in a fresh process after sklearn, as cnncodes does it
   (``modelfile._skops_io``: torch hidden from sklearn's ``all_estimators`` walk) and plainly
   (that walk imports torch). Each variant ``--repeats`` times, alternating, best and median kept.
2. Write + read of one fitted cnncodes pipeline (L2 + LinearSVC, ``--classes`` x ``--features``
   codes) with ``save_model``/``load_model`` (skops, allow-list audit, sha256) and with
   plain ``joblib.dump``/``joblib.load``; file sizes. skops already imported (step 1 is its
   one-off cost).

Usage::

    python benchmarks/bench_model_files.py --repeats 3 --features 4096 --classes 10

Writes ``artifacts/bench/model_files.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from _machine import cpu_model  # noqa: E402

IMPORT = """
import sys, time
import sklearn.svm, sklearn.linear_model, sklearn.pipeline, sklearn.preprocessing
t = time.perf_counter()
if {hidden}:
    from cnncodes.modelfile import _skops_io
    _skops_io()
else:
    import skops.io
print(time.perf_counter() - t, 'torch' in sys.modules)
"""


def time_imports(repeats: int) -> dict:
    out = {"hidden": [], "plain": []}
    for _ in range(repeats):
        for name in out:
            code = IMPORT.format(hidden=name == "hidden")
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                                 env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            secs, torch = res.stdout.split()
            out[name].append({"seconds": float(secs), "torch_imported": torch == "True"})
    return {k: {"best_s": min(r["seconds"] for r in v), "median_s": float(np.median([r["seconds"] for r in v])),
                "torch_imported": sorted({r["torch_imported"] for r in v})} for k, v in out.items()}


def time_files(features: int, classes: int, repeats: int) -> dict:
    import joblib

    from cnncodes import classify as C
    from cnncodes import modelfile as M

    rng = np.random.default_rng(0)
    n = 20 * classes
    X = np.maximum(rng.standard_normal((n, features)), 0).astype(np.float32)
    y = np.arange(n) % classes
    pipe = C.make_pipeline("l2", "svm", 1.0, max_iter=50).fit(X, y)
    M._skops_io()
    res = {"skops": {"write": [], "read": []}, "joblib": {"write": [], "read": []}}
    with tempfile.TemporaryDirectory() as d:
        sk, jb = Path(d) / "m.skops", Path(d) / "m.joblib"
        for _ in range(repeats):
            t = time.perf_counter(); M.save_model(pipe, sk, {}); res["skops"]["write"].append(time.perf_counter() - t)
            t = time.perf_counter(); m, _ = M.load_model(sk); res["skops"]["read"].append(time.perf_counter() - t)
            assert np.array_equal(m.decision_function(X), pipe.decision_function(X))
            t = time.perf_counter(); joblib.dump(pipe, jb); res["joblib"]["write"].append(time.perf_counter() - t)
            t = time.perf_counter(); joblib.load(jb); res["joblib"]["read"].append(time.perf_counter() - t)
        sizes = {"skops": sk.stat().st_size, "joblib": jb.stat().st_size}
    return {k: {"write_best_s": min(v["write"]), "read_best_s": min(v["read"]), "bytes": sizes[k]}
            for k, v in res.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args(argv)
    report = {"cpu": cpu_model(), "imports": time_imports(args.repeats),
              "files": time_files(args.features, args.classes, args.repeats),
              "features": args.features, "classes": args.classes, "repeats": args.repeats}
    imp = report["imports"]
    print(f"import skops.io: torch hidden {imp['hidden']['best_s']:.2f} s (median {imp['hidden']['median_s']:.2f}, "
          f"torch imported {imp['hidden']['torch_imported']}), plain {imp['plain']['best_s']:.2f} s (median "
          f"{imp['plain']['median_s']:.2f}, torch imported {imp['plain']['torch_imported']})")
    for k, v in report["files"].items():
        print(f"{k}: write {v['write_best_s'] * 1e3:.1f} ms, read {v['read_best_s'] * 1e3:.1f} ms, "
              f"{v['bytes']:,} bytes")
    out = REPO / "artifacts" / "bench" / "model_files.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
