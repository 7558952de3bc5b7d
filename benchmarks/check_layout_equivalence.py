"""Codes of this checkout against those of another commit, compared bitwise.

    git worktree add /tmp/old <commit>
    python benchmarks/check_layout_equivalence.py --old /tmp/old

Each checkout extracts the same few images (links to ``../shared/datasets/flowers5``) in a fresh
process, with only that checkout on ``PYTHONPATH``: the ``tiny`` backbone (random weights, seed 0;
conv maps pooled avg, max 2x2 and none, both decoders, 5-crop views) and ``efficientnet_lite0`` (its
packaged ImageNet weights), plus :func:`extract_images` as prediction uses it. Every code array
must be bitwise equal; the script exits 1 at the first difference. CPU, batch size 4, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"

# run in the child: the public names that both layouts share (first access of cnncodes.extract)
_CHILD = r"""
import json, sys
import numpy as np
import torch
torch.set_num_threads(1)
import cnncodes
from cnncodes import store
data, out, dest = sys.argv[1:4]
runs = [
    ("tiny_pil", dict(model="tiny", layers=["conv1", "conv2", "fc1"], weights="none", decoder="pil")),
    ("tiny_tv_max", dict(model="tiny", layers=["conv2", "fc2"], weights="none", pool="max2x2")),
    ("tiny_none_5crop", dict(model="tiny", layers=["conv1"], weights="none", pool="none", views="5crop")),
    ("lite0", dict(model="efficientnet_lite0", layers=LITE0_LAYERS)),
]
arrays, extract = {}, cnncodes.extract
for tag, kw in runs:
    res = extract(data, out=out, device="cpu", batch_size=4, workers=0, dtype="float32", **kw)
    for k in res.keys:
        arrays[f"{tag}/{k}"] = store.load_codes(res.path, k).X
    info = store.read_info(res.path)
    if tag == "lite0":
        import importlib
        mod = importlib.import_module(EXTRACT_IMAGES_MODULE)
        paths = [str(p) for p in sorted(__import__("pathlib").Path(data).rglob("*.jpg"))]
        got = mod.extract_images(paths, spec=info.spec, layer_keys=res.keys, device="cpu", batch_size=4, workers=0)
        for k, v in got["codes"].items():
            arrays[f"images/{k}"] = v
np.savez(dest, **arrays)
"""


def _link_subset(dst: Path, per_class: int = 2) -> Path:
    for cls in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())[:3]:
        (dst / cls).mkdir(parents=True)
        for f in sorted(os.listdir(FLOWERS / cls))[:per_class]:
            os.symlink(FLOWERS / cls / f, dst / cls / f)
    return dst


def _extraction_module(root: Path) -> str:
    return "cnncodes.extract" if (root / "cnncodes" / "extract.py").exists() else "cnncodes.extraction"


def run_checkout(root: Path, data: Path, work: Path, layers: list[str]) -> dict[str, np.ndarray]:
    dest = work / f"{root.name}-codes.npz"
    code = _CHILD.replace("LITE0_LAYERS", json.dumps(layers)).replace(
        "EXTRACT_IMAGES_MODULE", repr(_extraction_module(root)))
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1",
               CNNCODES_CACHE_DIR=str(work / f"{root.name}-memo"))
    subprocess.run([sys.executable, "-c", code, str(data), str(work / f"{root.name}-out"), str(dest)],
                   check=True, env=env, cwd=work)
    with np.load(dest) as z:
        return {k: z[k] for k in z.files}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="checkout of the reference commit")
    ap.add_argument("--new", default=REPO, type=Path)
    ap.add_argument("--layers", nargs="+", default=["block3.linear", "head", "pool"], help="efficientnet_lite0 layers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = _link_subset(work / "flowers")
        (work / "old").mkdir()
        (work / "new").mkdir()
        old = run_checkout(args.old.resolve(), data, work / "old", args.layers)
        new = run_checkout(args.new.resolve(), data, work / "new", args.layers)
    if sorted(old) != sorted(new):
        print(f"different arrays: old {sorted(old)}, new {sorted(new)}")
        return 1
    for k in sorted(old):
        same = old[k].shape == new[k].shape and old[k].tobytes() == new[k].tobytes()
        print(f"{'equal' if same else 'DIFFERENT':9s}  {k:28s} {old[k].shape}")
        if not same:
            return 1
    print(f"all {len(old)} code arrays bitwise equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
