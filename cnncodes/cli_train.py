"""Command line of ``scripts/train_svm.py``: train linear SVM and softmax classifiers on cached codes.

A thin layer over :func:`cnncodes.classify.train_run`; no torch import.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

from ._cli import Parser, run_cli
from .errors import UsageError

PROG = "train_svm.py"

EPILOG = """examples:
  python scripts/train_svm.py artifacts/codes/flowers5__alexnet.h5 --layers fc6 fc7
  python scripts/train_svm.py CACHE --layers conv5 fc6 fc7 --clf svm softmax --out artifacts/runs/cmp
  python scripts/train_svm.py CACHE --layers fc6 fc7 --concat --norm sqrt --c-min 1e-5 --c-max 1e5

Writes RUN_DIR/metrics.json (results[<layers>][<clf>]["test"]["accuracy"], ...), one model per
(layers, classifier) under RUN_DIR/models/, the best of them (by val accuracy) as
RUN_DIR/model.skops (what scripts/predict.py RUN_DIR uses), confusion_matrix.png, c_curve.png
and, for several layers, layer_comparison.png, plus the marker .cnncodes-run.json that makes it a run folder.
Prints a summary table (and a WARNING line per class missing from a split); the run folder is the
last line of stdout.

A split recorded in the cache (train/, val/, test/ folders) is used; with train/ and val/ only, the
recorded val is the test split and C is chosen on a val split drawn from train (--val-fraction of it;
0: cross-validation). Otherwise a stratified split is drawn that gives every class with >= 3 images an
image in train, val and test (2 images: train and test).

--overwrite replaces only a folder that holds a cnncodes run (its marker), never another folder, and only
once the new run has succeeded. Two runs never share a default folder; a second run into the same --out
while the first is writing it is refused.

exit status: 0 ok, 1 run error, 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Train linear SVM and softmax classifiers on cached CNN codes.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="HDF5 cache written by scripts/extract.py")
    p.add_argument("--layers", "-l", nargs="+", required=True, help="layer keys (fc7, conv5@max ...)")
    p.add_argument("--clf", nargs="+", default=["svm", "softmax"], choices=["svm", "softmax"],
                   help="classifiers (default: svm softmax)")
    p.add_argument("--concat", action="store_true", help="one model on the concatenated layers, not one per layer")
    p.add_argument("--norm", default="l2", choices=["l2", "standard", "sqrt", "none"],
                   help="code normalisation (default l2; sqrt = signed square root then L2)")
    p.add_argument("--grid", nargs="+", type=float, default=None, metavar="C", help="explicit C values")
    # the default initial grid is coarse (two decades apart): the search widens past its edge and refines
    # around the best to half decades (cnncodes.search)
    p.add_argument("--c-min", type=float, default=1e-4, help="smallest C of the initial log grid (default 1e-4)")
    p.add_argument("--c-max", type=float, default=1e4, help="largest C of the initial log grid (default 1e4)")
    p.add_argument("--c-num", type=int, default=5, help="number of C values of the initial grid (default 5)")
    p.add_argument("--cv", type=int, default=5, help="CV folds to choose C when there is no val split (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of a drawn split, of the folds and of LinearSVC")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="val fraction of a drawn split (0: choose C by CV); with recorded train/val folders only, "
                        "the fraction of train drawn as val; ignored if the cache records train/val/test")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test fraction of a drawn split")
    p.add_argument("--n-jobs", type=int, default=-1, help="parallel fits (default -1: all cores)")
    p.add_argument("--max-iter", type=int, default=1000,
                   help="starting iteration limit (raised x4 if needed); with --stream, the most L-BFGS iterations "
                        "(passes over the training rows) per C")
    p.add_argument("--early-stop", type=int, default=2, metavar="N",
                   help="stop the C sweep once the score has fallen below its best for N consecutive larger C "
                        "(default 2; 0: evaluate the whole grid)")
    p.add_argument("--no-widen", action="store_true",
                   help="do not extend the C search past the grid's edge when the best C lies there")
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="rounds of refinement around the best C, each halving the log step "
                        "(default: down to half decades, 2 rounds for the default 2-decade grid; 0: the grid only)")
    p.add_argument("--stream", action="store_true",
                   help="train from chunks of the cache without loading all codes (the same LinearSVC / softmax "
                        "objectives solved exactly by L-BFGS, one pass over the chunks per iteration, at most "
                        "--max-iter iterations; C chosen on val); without it, done automatically when the codes "
                        "would not fit in memory (--memory-budget)")
    p.add_argument("--no-stream", action="store_true", help="never stream, whatever the codes' size")
    p.add_argument("--train-views", default="combined", choices=["combined", "all"],
                   help="combined (default): one training row per image; all: every view kept by extract.py "
                        "--keep-views is a training row with its image's label, val/test images predicted on their "
                        "(mean) code; in memory")
    p.add_argument("--memory-budget", type=float, default=None, metavar="BYTES",
                   help="bytes the codes may take in memory before training streams (e.g. 8e9; default "
                        "CNNCODES_MEMORY_BUDGET or else the memory available)")
    p.add_argument("--chunk-rows", type=int, default=2048, help="rows per chunk with --stream (default 2048)")
    p.add_argument("--out", "-o", default=None,
                   help="run folder (default artifacts/runs/<cache>__<layers>__<UTC time>__<settings hash>)")
    p.add_argument("--runs-root", default="artifacts/runs", help="parent of the default run folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run folder of cnncodes (after success only; any other folder is refused)")
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG figures")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    return p


def _grid(args) -> list[float]:
    import numpy as np

    from .classify import MAX_GRID_SIZE

    if args.grid is not None:
        return list(args.grid)
    # finite bounds (inf made a grid of NaN and inf) and a bounded count (1e8 values swept for hours)
    if not (0 < args.c_min < args.c_max < math.inf and 2 <= args.c_num <= MAX_GRID_SIZE):
        raise UsageError(f"need 0 < --c-min < --c-max < inf and 2 <= --c-num <= {MAX_GRID_SIZE}; "
                         f"got {args.c_min}, {args.c_max}, {args.c_num}")
    return list(np.logspace(np.log10(args.c_min), np.log10(args.c_max), args.c_num))


def _stream_args(args) -> dict:
    if args.stream and args.no_stream:
        raise UsageError("--stream and --no-stream exclude each other")
    stream = True if args.stream else (False if args.no_stream else None)
    return {"stream": stream, "stream_options": {"chunk_rows": args.chunk_rows},
            "memory_budget": args.memory_budget}


def _train(args: argparse.Namespace) -> int:
    from .classify import train_run

    res = train_run(
        args.cache, args.layers, classifiers=args.clf, concat=args.concat, norm=args.norm, grid=_grid(args),
        cv=args.cv, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        n_jobs=args.n_jobs, max_iter=args.max_iter, early_stop=args.early_stop, widen=not args.no_widen,
        refine=args.refine, out=args.out, train_views=args.train_views,
        runs_root=args.runs_root, overwrite=args.overwrite, plots=not args.no_plots,
        **_stream_args(args),
    )
    print(res.summary)
    print(res.run_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/train_svm.py``: exit 0 ok, 1 run error, 2 usage error."""
    return run_cli(PROG, build_parser(), _train, argv)
