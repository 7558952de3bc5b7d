"""Command line of ``scripts/predict.py``: classify new images with a trained run.

A thin layer over :func:`cnncodes.predict.predict`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._cli import Parser, run_cli
from .images import DEFAULT_MAX_PIXELS

PROG = "predict.py"

EPILOG = """examples:
  python scripts/predict.py artifacts/runs/RUN photo.jpg more_photos/ --out predictions.csv
  python scripts/predict.py artifacts/runs/RUN photos/ --model fc7__svm --out predictions.json

The backbone is rebuilt with exactly the spec the model's codes were extracted with (weights
sha256 included); codes of another layer or spec are refused, naming the differing fields.
Output: one row per image: path,label,score,status,message (label empty for an image that
failed to decode). Without --out the CSV goes to stdout.

Models are skops files loaded with the types cnncodes writes and nothing else; a pickle
(model.joblib) of an older run is refused: retrain the run with scripts/train_svm.py, or,
for a file you wrote yourself, pass --trust-pickle.

exit status: 0 ok, 1 run error, 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Predict the class of images with a trained run.", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder of scripts/train_svm.py, or a models/*.skops file")
    p.add_argument("paths", nargs="+", help="image files and folders")
    p.add_argument("--out", "-o", default=None, help="output .csv or .json (default: CSV on stdout)")
    p.add_argument("--model", "-m", default=None,
                   help="model of the run, e.g. fc7__svm (default: the best by val accuracy)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a pickle model (.joblib) of an older run; unpickling runs any code the file holds, "
                        "so only for files you wrote yourself (else retrain the run with train_svm.py)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS}, "
                        "Pillow's)")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    return p


def _predict(args: argparse.Namespace) -> int:
    from .predict import check_output_path, predict, write_predictions

    if args.out is not None:
        check_output_path(args.out, "predict", run=args.run)  # before the work, not after it
    if args.device != "cuda":
        from .extraction import keep_big_blocks_in_heap

        keep_big_blocks_in_heap()  # this process's setting: a CPU forward pass stops page-faulting its blocks
    rows = predict(args.run, args.paths, model=args.model, device=args.device, batch_size=args.batch_size,
                   max_pixels=args.max_pixels, trust_pickle=args.trust_pickle)
    if args.out is not None:
        write_predictions(rows, args.out)
    else:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "score", "status", "message"])
        for r in rows:
            w.writerow([r["path"], r["label"], "" if r["score"] is None else f"{r['score']:.6g}", r["status"],
                        r["message"]])
    n_bad = sum(r["status"] != "ok" for r in rows)
    if n_bad:
        print(f"{PROG}: {n_bad} of {len(rows)} images could not be read (status error, empty label)", file=sys.stderr)
    if args.out is not None:
        print(args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/predict.py``: exit 0 ok, 1 run error, 2 usage error."""
    return run_cli(PROG, build_parser(), _predict, argv)
