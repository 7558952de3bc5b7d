"""Command line of ``scripts/advise.py``: which of the four transfer-learning cases, which layer, what to run.

A thin layer over :func:`cnncodes.advise.advise`.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from ._cli import Parser, run_cli

PROG = "advise.py"

EPILOG = """examples:
  python scripts/advise.py ../shared/datasets/flowers5 --model efficientnet_lite0 --out artifacts/advice/flowers5
  python scripts/advise.py DATA --model efficientnet_lite0 --run          # also train what it recommends
  python scripts/advise.py artifacts/codes/flowers5-efficientnet_lite0-XXXX.h5 --sweep   # check the ranking

Extracts the layers once (or reads DATA when it is a cache), measures the data's size (images per class)
and similarity to ImageNet (ImageNet head confidence, NCE/LEEP, LogME of earlier vs later layers), ranks
every layer by LogME without training, and names one of the four cases: small-similar, small-different,
large-similar, large-different. Writes OUT/advice.json ({"case", "layer", "ranking": [{"layer", "score"}...],
...}), OUT/report.md, OUT/learning_curve.png and OUT/layer_ranking.png; the folder is the last line of stdout.

exit status: 0 ok, 1 run error, 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Recommend a transfer-learning strategy and layer from one extraction.",
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder, CSV list, or an HDF5 cache written by scripts/extract.py")
    p.add_argument("--model", "-m", default=None, help="backbone (required unless DATA is a cache)")
    p.add_argument("--layers", "-l", nargs="+", default=None,
                   help="layers to rank (default: a set spanning the network, e.g. block2.linear ... pool logits)")
    p.add_argument("--pool", default="avg", help="pooling of conv-map layers (default avg)")
    p.add_argument("--out", "-o", default=None, help="advice folder (default artifacts/advice/<data>-<model>-<time>)")
    p.add_argument("--cache-dir", default="artifacts/codes", help="where the extraction's cache goes")
    p.add_argument("--run", action="store_true", help="train the recommendation (train_svm's library calls)")
    p.add_argument("--sweep", action="store_true",
                   help="also train SVM + softmax on every ranked layer and compare with the LogME ranking")
    p.add_argument("--seed", type=int, default=0, help="seed of a drawn split (as train_svm.py) and of the curve")
    p.add_argument("--val-fraction", type=float, default=0.15, help="as train_svm.py (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="as train_svm.py (default 0.2)")
    p.add_argument("--curve-C", type=float, default=10.0, help="C of the learning curve's softmax (default 10)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per curve point (default 1000)")
    p.add_argument("--shortlist", type=int, default=3,
                   help="how many of LogME's best layers get a leave-one-out ridge score on the train+val rows "
                        "that decides the pick (default 3; 1: LogME's first)")
    p.add_argument("--hscore", action="store_true", help="also compute H-score per layer (twice the ranking time)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace earlier advice in --out")
    p.add_argument("--no-plots", action="store_true", help="no PNG figures")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    return p


def _advise(args: argparse.Namespace) -> int:
    from .advise import advise
    from .errors import UsageError

    if args.bootstrap < 100:
        raise UsageError(f"--bootstrap must be at least 100, got {args.bootstrap}")
    if args.shortlist < 1:
        raise UsageError(f"--shortlist must be at least 1, got {args.shortlist}")
    if not args.curve_C > 0:
        raise UsageError(f"--curve-C must be > 0, got {args.curve_C}")
    res = advise(args.data, args.model, args.layers, pool=args.pool, out=args.out, cache_dir=args.cache_dir,
                 run=args.run, sweep=args.sweep, seed=args.seed, val_fraction=args.val_fraction,
                 test_fraction=args.test_fraction, curve_C=args.curve_C, n_boot=args.bootstrap,
                 overwrite=args.overwrite, device=args.device, progress=not args.quiet, plots=not args.no_plots,
                 with_hscore=args.hscore, shortlist=args.shortlist)
    a = res.advice
    rec = a["recommendation"]
    print(f"case: {a['case']}  layer: {a['layer']}")
    print(f"  {rec['strategy']}")
    print(f"  why: {rec['why']}")
    print(f"  run: {rec['command']}")
    print("ranking (LogME):", json.dumps([(r["layer"], round(r["score"], 4)) for r in a["ranking"]]))
    if res.train_summary:
        print(res.train_summary)
    ft = a.get("run", {}).get("finetune")
    if ft and not ft.get("available", True):
        print(ft["message"])
    print(res.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/advise.py``: exit 0 ok, 1 run error, 2 usage error."""
    return run_cli(PROG, build_parser(), _advise, argv)
