"""Storage of codes: bytes per image and write/read speed for float16/float32 x gzip/sparse/lzf/zstd/none.

Takes the codes of an existing **float32** cache (so float16 is exactly what a float16 extraction
would store: the same float32 codes rounded), rewrites each layer with every (dtype, compression)
through cnncodes' own writer, and reports:

- bytes per image of the layer's dataset, and the ratio to raw float32 (issue goal: <= 1/3.5);
- write throughput in images/s (must keep up with extraction: CPU extraction runs at tens of
  img/s, a GPU at thousands);
- read time of the whole layer through ``load_codes`` (sha256 check included).

Usage::

    python benchmarks/bench_storage.py artifacts/codes/flowers5-efficientnet_lite0-XXXX.h5 --layers pool block5.linear

Writes ``artifacts/bench/storage.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from cnncodes import store  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache", help="a cache extracted with --dtype float32")
    ap.add_argument("--layers", nargs="+", required=True)
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "storage.json"))
    args = ap.parse_args(argv)
    info = store.read_info(args.cache)
    if info.spec.get("dtype") != "float32":
        sys.exit(f"{args.cache} stores {info.spec.get('dtype')}; give a float32 cache (extract with --dtype float32)")
    rows = store.read_rows(args.cache)
    with h5py.File(args.cache, "r") as f:
        class_names = list(f["class_names"].asstr()[:])
    try:
        import hdf5plugin  # noqa: F401

        comps = ["gzip", "sparse", "lzf", "zstd", "none"]
    except ImportError:
        comps = ["gzip", "sparse", "lzf", "none"]
    tmp = Path(tempfile.mkdtemp(prefix="cnncodes-storage-"))
    results = []
    for key in args.layers:
        codes = store.load_codes(args.cache, key)
        X = codes.X
        n, d = X.shape
        print(f"{key}: {n} x {d}, {np.mean(X == 0):.1%} zeros", flush=True)
        for dtype in ("float16", "float32"):
            for comp in comps:
                path = tmp / f"{key}-{dtype}-{comp}.h5"
                rec = codes.records[key]
                t = time.perf_counter()
                store.write_cache(path, spec=info.spec, fingerprint=info.fingerprint, manifest_hash=info.manifest_hash,
                                  dataset_root=info.dataset_root, class_names=class_names, rows=rows,
                                  layers={key: (rec, (X[s:s + 256] for s in range(0, n, 256)))}, dtype=dtype,
                                  compression=comp)
                wsec = time.perf_counter() - t
                with h5py.File(path, "r") as f:
                    nbytes = store.layer_storage_bytes(f["codes"][key])
                t = time.perf_counter()
                back = store.load_codes(path, key).X
                rsec = time.perf_counter() - t
                exact = np.array_equal(back, X.astype(dtype).astype(np.float32), equal_nan=True)
                row = {"layer": key, "dim": d, "zeros": round(float(np.mean(X == 0)), 3), "dtype": dtype,
                       "compression": comp, "bytes_per_image": round(nbytes / n, 1),
                       "ratio_to_raw_float32": round(nbytes / (n * d * 4), 3),
                       "write_img_s": round(n / wsec), "read_s": round(rsec, 3), "lossless": bool(exact)}
                results.append(row)
                print(json.dumps(row), flush=True)
    hdr = list(results[0])
    print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for r in results:
        print("| " + " | ".join(str(r[h]) for h in hdr) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cache": args.cache, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
