"""The advisor against the full train_svm sweep: layer pick, ranking quality, cost, and the case it names.

For each dataset: ``cnncodes.advise.advise(DATA, "efficientnet_lite0", sweep=True)`` — one extraction of the
default layers (a cache hit when already extracted), LogME of every layer, the case; then the full
``train_run`` sweep (SVM + softmax, C chosen on val, every layer) on the same split. Reported per dataset:

* the case and the numbers behind it (median images per class, ImageNet head mean top-1 probability, share
  of the label entropy explained by ImageNet's top-1 class, LogME of the best earlier layer minus the top's);
* the advisor's pick, its test accuracy, the best layer's (oracle) and the gap in pp (goal: within 1 pp);
* Kendall tau between LogME and the measured test accuracies over the layers;
* the pick: LogME's first ``--shortlist`` (3) layers, decided by a ridge classifier's leave-one-out accuracy
  on the train+val rows (one eigendecomposition each); LogME's own first place beside it;
* cost: LogME time over all layers + the shortlist's fits, over the sweep's time (goal <= 5 %); all from the
  cache, no extraction.

Datasets: ``flowers5`` and ``sign_language_digits`` from ../shared/datasets; ``digits`` (sklearn's
8x8 scans, written as PNGs); ``fashion`` (Fashion-MNIST from the Debian package ``dataset-fashion-mnist``,
``--fashion-classes`` (5) classes x ``--fashion-per-class`` (1,500) images, the first of each class in file order,
written as PNGs as benchmarks/bench_memory.py does).

Usage::

    python benchmarks/bench_advise.py                                   # all four
    python benchmarks/bench_advise.py --datasets flowers5 sign_language_digits
    python benchmarks/bench_advise.py --prepare-only                    # only write the image folders
    python benchmarks/bench_advise.py --datasets flowers5 --cache flowers5=/work/codes/flowers5-....h5

Writes ``artifacts/bench/advise.json`` and one advice folder per dataset under ``artifacts/bench/advise/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
BENCH = REPO / "artifacts" / "bench"


def fashion_folder(classes: int, per_class: int) -> Path:
    from PIL import Image

    from bench_memory import CLASSES, IDX, read_idx

    root = BENCH / f"fashion{classes}x{per_class}"
    if (root / ".complete").exists():
        return root
    if not IDX.exists():
        sys.exit(f"{IDX} is missing: apt-get install -y dataset-fashion-mnist")
    x = np.concatenate([read_idx(IDX / "train-images-idx3-ubyte.gz"), read_idx(IDX / "t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([read_idx(IDX / "train-labels-idx1-ubyte.gz"), read_idx(IDX / "t10k-labels-idx1-ubyte.gz")])
    for c in range(classes):
        (root / CLASSES[c]).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == c)[:per_class]:
            Image.fromarray(x[i], mode="L").save(root / CLASSES[c] / f"{i:05d}.png", compress_level=1)
    (root / ".complete").touch()
    return root


def digits_folder() -> Path:
    from cnncodes.demo import write_digits

    return write_digits(BENCH / "digits")


def data_path(name: str, args) -> Path:
    if name == "fashion":
        return fashion_folder(args.fashion_classes, args.fashion_per_class)
    if name == "digits":
        return digits_folder()
    return SHARED / name


def bench_one(name: str, data: Path, args) -> dict:
    from cnncodes.advise import DEFAULT_LAYERS, advise

    t = time.perf_counter()
    # a given cache may hold more layers (e.g. 'head', whose average pool is 'pool'): rank the default set
    layers = DEFAULT_LAYERS.get(args.model) if data.suffix == ".h5" else None
    res = advise(data, args.model, layers, out=BENCH / "advise" / name, cache_dir=REPO / "artifacts" / "codes",
                 sweep=True, overwrite=True, progress=False, shortlist=args.shortlist)
    a = res.advice
    sim, sw, size = a["similarity"], a["sweep"], a["size"]
    return {
        "dataset": name, "case": a["case"], "median_per_class": size["median_per_class"],
        "train_images": size["train_images"], "mean_top1_prob": sim.get("mean_top1_prob"),
        "nce_normalised": sim.get("nce_normalised"), "leep": sim.get("leep"),
        "earlier_minus_top": sim.get("earlier_minus_top"), "best_earlier_layer": sim.get("best_earlier_layer"),
        "logme_pick": sw["logme_layer"], "logme_pick_test": sw["logme_test_accuracy"],
        "logme_minus_oracle_pp": sw["logme_minus_oracle_pp"],
        "shortlist": [(c["layer"], round(c["loo_accuracy"], 4), round(c["p_vs_first"], 4))
                      for c in a["pick"]["candidates"]],
        "loo_best": a["pick"]["loo_best_layer"],
        "loo_best_test": sw["per_layer"][a["pick"]["loo_best_layer"]]["test_accuracy"],
        "pick_s": a["seconds"]["pick"], "cost_ratio_pick": sw["cost_ratio_pick_vs_sweep"],
        "pick": a["layer"], "pick_test": sw["pick_test_accuracy"], "oracle": sw["oracle_layer"],
        "oracle_test": sw["oracle_test_accuracy"], "pick_minus_oracle_pp": sw["pick_minus_oracle_pp"],
        "pick_minus_oracle_any_clf_pp": sw["pick_minus_oracle_any_clf_pp"],
        "kendall_tau": sw["kendall_tau"], "pick_vs_oracle_p": sw["pick_vs_oracle"]["p_value"],
        "logme_s": a["seconds"]["logme"], "load_s": a["seconds"]["load"],
        "sweep_s": sw["seconds"], "cost_ratio": sw["cost_ratio_logme_vs_sweep"],
        "extract_s": a["seconds"]["extract"], "curve_s": a["seconds"]["learning_curve"],
        "ranking": [(r["layer"], round(r["score"], 4)) for r in a["ranking"]],
        "measured": {k: round(v["test_accuracy"], 4) for k, v in sw["per_layer"].items()},
        "wall_s": time.perf_counter() - t, "cache": a["cache"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["flowers5", "sign_language_digits", "digits", "fashion"])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--fashion-classes", type=int, default=5)
    ap.add_argument("--fashion-per-class", type=int, default=1500,
                    help="images per class (1,500: 1,200 train+val, 'large'; 1,300 is the smallest that is)")
    ap.add_argument("--cache", nargs="+", default=[], metavar="NAME=H5",
                    help="use an existing cache for a dataset (e.g. flowers5=/work/codes/flowers5-....h5)")
    ap.add_argument("--shortlist", type=int, default=3, help="LogME's first K layers get a leave-one-out ridge score")
    ap.add_argument("--out-json", default=str(BENCH / "advise.json"))
    ap.add_argument("--prepare-only", action="store_true", help="write the image folders, print their paths, stop")
    args = ap.parse_args(argv)
    caches = dict(c.split("=", 1) for c in args.cache)
    paths = {n: Path(caches[n]) if n in caches else data_path(n, args) for n in args.datasets}
    if args.prepare_only:
        print("\n".join(str(p) for p in paths.values()))
        return 0
    print(f"cpu: {cpu_model()}", flush=True)
    rows = []
    for name, data in paths.items():
        rows.append(bench_one(name, data, args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'dataset':<22} {'case':<16} {'med/cls':>7} {'top1 p':>6} {'NCE/H':>6} {'early-top':>9} "
          f"{'LogME 1st':<14} {'acc':>6} {'pick':<14} {'acc':>6} {'oracle':<14} {'acc':>6} {'gap pp':>6} "
          f"{'tau':>5} {'LogME s':>7} {'pick s':>6} {'sweep s':>7} {'cost':>6} {'p(pick=oracle)':>14}")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"{r['dataset']:<22} {r['case']:<16} {r['median_per_class']:>7.0f} {f(r['mean_top1_prob'], '6.3f')} "
              f"{f(r['nce_normalised'], '6.3f')} {f(r['earlier_minus_top'], '+9.4f')} {r['logme_pick']:<14} "
              f"{r['logme_pick_test']:>6.4f} {r['pick']:<14} "
              f"{r['pick_test']:>6.4f} {r['oracle']:<14} {r['oracle_test']:>6.4f} {r['pick_minus_oracle_pp']:>+6.2f} "
              f"{r['kendall_tau']:>5.2f} {r['logme_s']:>7.2f} {r['pick_s']:>6.2f} {r['sweep_s']:>7.1f} "
              f"{100 * r['cost_ratio_pick']:>5.1f}% {r['pick_vs_oracle_p']:>14.3g}")
    out = Path(args.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
