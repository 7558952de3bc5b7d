"""Peak memory of extracting extreme-aspect-ratio images, with and without the resize bound.

Each measurement is one fresh process that extracts, with AlexNet (random weights; 256 px
resize, 224 px crop) on the CPU in the main process (``workers=0``), either five photo-sized
PNGs (the baseline) or four of them and one very thin PNG (3 x LONG pixels, random content),
and reports its peak RSS. ``--unbounded`` lifts the bound (``MAX_RESIZED_ASPECT``) to show what an
unbounded resize costs.

    python benchmarks/bench_bounds.py                 # 3 x 40,000, both decoders, bounded and not
    python benchmarks/bench_bounds.py --long 200000   # bounded only is wise: unbounded asks ~13 GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import cnncodes.extract as E
folder, out, decoder, unbounded = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if unbounded:
    E.MAX_RESIZED_ASPECT = 10**12
t = time.perf_counter()
res = E.extract(folder, "alexnet", ["fc7"], out=out, weights="none", device="cpu", workers=0, decoder=decoder)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t, "failed": res.n_failed}))
"""


def _peak(tmp: str, sub: str, decoder: str, unbounded: bool) -> dict | str:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = f"{tmp}/codes-{sub}-{decoder}-{int(unbounded)}"
    proc = subprocess.run([sys.executable, "-c", _CHILD, f"{tmp}/{sub}", out, decoder, "1" if unbounded else "0"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _make_data(folder: Path, long: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("normal", "with_strip"):
        (folder / sub / "photos").mkdir(parents=True)
        for i in range(4 if sub == "with_strip" else 5):
            Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / sub / "photos" / f"{i}.png")
    (folder / "with_strip" / "strips").mkdir()
    Image.fromarray(rng.integers(0, 256, (long, 3, 3), dtype=np.uint8)).save(folder / "with_strip" / "strips" / "s.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", type=int, default=40_000, help="long side of the 3-pixel-wide strip")
    ap.add_argument("--bounded-only", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        _make_data(Path(tmp), args.long)
        print(f"strip 3 x {args.long}; peak RSS of one process extracting 5 photos, or 4 photos + the strip")
        print(f"{'decoder':<12} {'resize':<10} {'5 photos MB':>12} {'4 + strip MB':>13} {'rise MB':>9} {'s':>6}")
        for decoder in ("torchvision", "pil"):
            base = _peak(tmp, "normal", decoder, False)
            for unbounded in ([False] if args.bounded_only else [False, True]):
                r = _peak(tmp, "with_strip", decoder, unbounded)
                kind = "unbounded" if unbounded else "bounded"
                if isinstance(r, str) or isinstance(base, str):
                    print(f"{decoder:<12} {kind:<10} {r if isinstance(r, str) else base}")
                    continue
                print(f"{decoder:<12} {kind:<10} {base['peak_mb']:>12.0f} {r['peak_mb']:>13.0f} "
                      f"{r['peak_mb'] - base['peak_mb']:>9.0f} {r['seconds']:>6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
