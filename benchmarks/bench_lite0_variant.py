#!/usr/bin/env python
"""EfficientNet-Lite0 with its packaged TF weights: the TF-padding network against the symmetric one.

For each variant (``efficientnet_lite0_symmetric``, the network cnncodes built before, and
``efficientnet_lite0``, timm's ``tf_efficientnet_lite0``):

- ImageNet top-1 and mean p(true class) of the ``logits`` codes on every hymenoptera photo
  (ant = ImageNet class 310, bee = 309);
- transfer: ``scripts/train_svm.py`` with its default settings (linear SVM + softmax, L2 norm, C chosen
  on a drawn val split, 20 % test) on ``pool`` and earlier layers of flowers5 and sign_language_digits.

Codes are extracted through ``scripts/extract.py``'s ``main`` into ``--out`` (cache hits on a rerun).

Usage::

    python benchmarks/bench_lite0_variant.py                          # both variants, all datasets
    python benchmarks/bench_lite0_variant.py --variants efficientnet_lite0 --datasets sign_language_digits
    python benchmarks/bench_lite0_variant.py --tf-normalisation-only   # mean/std 0.5 against TF's (x - 127) / 128
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_model  # noqa: E402

from cnncodes import load_codes  # noqa: E402
from cnncodes.cli_extract import main as extract_main  # noqa: E402
from cnncodes.cli_train import main as train_main  # noqa: E402

DATA = REPO.parent / "shared" / "datasets"
VARIANTS = ["efficientnet_lite0_symmetric", "efficientnet_lite0"]
ANT, BEE = 310, 309


def _extract(data: Path, model: str, layers: list[str], out: Path, dtype: str) -> tuple[str, float]:
    """Run the extraction CLI; return the cache path (its last line on stdout) and the seconds it took."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = extract_main([str(data), "--model", model, "--layers", *layers, "--dtype", dtype, "--device", "cpu",
                           "--out", str(out), "--no-progress", "--quiet"])
    if rc != 0:
        raise SystemExit(f"extraction of {data} with {model} failed (exit {rc})")
    return buf.getvalue().strip().splitlines()[-1], time.perf_counter() - t0


def imagenet_scores(model: str, out: Path) -> dict:
    """Top-1 and mean p(true) of the 1000 class scores on every hymenoptera photo."""
    path, secs = _extract(DATA / "hymenoptera", model, ["logits"], out, "float32")
    c = load_codes(path, "logits")
    ok = c.status == "ok"
    target = np.where(np.asarray(c.class_names)[c.labels] == "ants", ANT, BEE)[ok]
    logits = c.X[ok].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return {"n": int(ok.sum()), "top1": float((logits.argmax(1) == target).mean()),
            "p_true": float(p[np.arange(len(target)), target].mean()), "extract_s": secs}


def transfer(model: str, dataset: str, layers: list[str], out: Path, runs: Path) -> dict:
    """Test accuracy of train_svm.py's default SVM and softmax on each layer."""
    path, secs = _extract(DATA / dataset, model, layers, out, "float16")
    run = runs / f"{dataset}-{model}"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train_main([path, "--layers", *layers, "--out", str(run), "--overwrite", "--no-plots", "--quiet"])
    if rc != 0:
        raise SystemExit(f"train_svm.py on {path} failed (exit {rc})")
    res = json.loads((run / "metrics.json").read_text())["results"]
    acc = {layer: {clf: res[layer][clf]["test"]["accuracy"] for clf in ("svm", "softmax")} for layer in layers}
    return {"cache": path, "extract_s": secs, "test_accuracy": acc}


def tf_normalisation(out: Path) -> dict:
    """Hymenoptera scores of the default Lite0 with TensorFlow's own input scaling, (x - 127) / 128,
    instead of timm's mean = std = 0.5 (a backbone registered in this process only)."""
    import dataclasses

    from cnncodes import backbones as B

    spec = B.get_backbone("efficientnet_lite0")
    pre = dataclasses.replace(spec.preprocessing, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    B.register_backbone(dataclasses.replace(spec, name="efficientnet_lite0_tfnorm", preprocessing=pre))
    return imagenet_scores("efficientnet_lite0_tfnorm", out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--datasets", nargs="*", default=["flowers5", "sign_language_digits"])
    ap.add_argument("--layers", nargs="+", default=["block4.linear", "block5.linear", "pool"])
    ap.add_argument("--out", default=str(REPO / "artifacts" / "codes"), help="cache folder")
    ap.add_argument("--runs", default=str(REPO / "artifacts" / "runs" / "bench_lite0_variant"), help="run folders")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--tf-normalisation-only", action="store_true",
                    help="only compare the default Lite0's mean/std 0.5 with TensorFlow's (x - 127) / 128 on hymenoptera")
    args = ap.parse_args(argv)
    out, runs = Path(args.out), Path(args.runs)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs; layers {' '.join(args.layers)}", flush=True)
    if args.tf_normalisation_only:
        for name, h in [("mean = std = 0.5", imagenet_scores("efficientnet_lite0", out)),
                        ("(x - 127) / 128", tf_normalisation(out))]:
            print(f"efficientnet_lite0, {name}: hymenoptera top-1 {h['top1']:.3f}, mean p(true) {h['p_true']:.4f}")
        return 0
    figures: dict = {}
    for model in args.variants:
        figures[model] = {"hymenoptera": imagenet_scores(model, out)}
        h = figures[model]["hymenoptera"]
        print(f"{model}: hymenoptera ImageNet top-1 {h['top1']:.3f}, mean p(true) {h['p_true']:.3f} "
              f"({h['n']} photos, {h['extract_s']:.0f} s)", flush=True)
        for ds in args.datasets:
            figures[model][ds] = r = transfer(model, ds, args.layers, out, runs)
            cells = ", ".join(f"{layer} {a['svm']:.3f} / {a['softmax']:.3f}" for layer, a in r["test_accuracy"].items())
            print(f"{model}: {ds} test accuracy svm / softmax: {cells} (extraction {r['extract_s']:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
