"""Command line of ``scripts/finetune.py``: fine-tune a backbone, or train it from scratch.

A thin layer over :func:`cnncodes.finetune.finetune`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from ._cli import Parser, run_cli

PROG = "finetune.py"

EPILOG = """examples:
  python scripts/finetune.py DATA --model efficientnet_lite0 --freeze-to block4 --augment none --epochs 10
  python scripts/finetune.py DATA --model efficientnet_lite0 --layer-decay 0.7 --epochs 15
  python scripts/finetune.py DATA --model efficientnet_lite0 --init-head-from artifacts/runs/LP_RUN
  python scripts/finetune.py DATA --model efficientnet_lite0 --weights none --epochs 30   # from scratch

--freeze-to LAYER freezes every stage up to that layer (aliases of extract.py --list-layers;
block4 = block4.linear). With --augment none the frozen part's output is computed once into the
HDF5 cache (as extract.py --pool none would) and only the rest of the network runs per epoch.
The split is train_svm.py's (same --seed, --val-fraction, --test-fraction); the best epoch on val
is kept. A checkpoint is written after every epoch into RUN_DIR.partial/: run the same command
again (or add --resume) to continue an interrupted run.

Writes RUN_DIR/metrics.json (results.finetune.softmax.test.accuracy, history, ...),
model.safetensors + finetune.json, confusion_matrix.png, curves.png; predict with
python scripts/predict.py RUN_DIR images... The run folder is the last line of stdout.

exit status: 0 ok, 1 run error, 2 usage error."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Fine-tune a pretrained backbone (or train it from scratch) on labelled images.",
               epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder (DATA/<class>/<image>, optionally under train/ val/ test/) or CSV list")
    p.add_argument("--model", "-m", required=True, help="backbone (efficientnet_lite0, resnet50, ..., tiny; layers: extract.py --model M --list-layers)")
    p.add_argument("--weights", default="default", help="default (ImageNet), none (from scratch) or a state-dict file")
    p.add_argument("--freeze-to", default=None, metavar="LAYER|none",
                   help="freeze every layer up to LAYER (default none: train all)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new head (default 1e-3, AdamW)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--backbone-lr-mult", type=float, default=None,
                   help="lr of the pretrained layers = lr x this (default 0.1; 1.0 with --weights none)")
    g.add_argument("--layer-decay", type=float, default=None, metavar="D",
                   help="instead: lr x D**k for the k-th stage below the head")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--augment", default="default", choices=["default", "none"],
                   help="train-time random resized crop + flip (default), or none")
    p.add_argument("--init-head-from", default=None, metavar="RUN_DIR",
                   help="initialise the head from a train_svm.py softmax on the head's input layer (LP-FT)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", "-o", default=None,
                   help="run folder (default artifacts/runs/<data>__<model>__<mode>__<settings hash>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (an error if there is none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (after success only) or discard an unfinished other run")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on norms/biases)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps of linear warm-up (default 0.1)")
    p.add_argument("--patience", type=int, default=5, help="early stop after N epochs without val gain (0: off)")
    p.add_argument("--bn", default="auto", choices=["auto", "frozen", "train"],
                   help="BatchNorm: frozen (eval-mode statistics), train, auto (frozen if pretrained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the head, batches and augmentation")
    p.add_argument("--val-fraction", type=float, default=0.15, help="val fraction of a drawn split")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test fraction of a drawn split")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of cached prefix activations (default float16, as extract.py)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run the frozen prefix in every epoch instead of caching its output (for comparisons)")
    p.add_argument("--cache-dir", default="artifacts/codes", help="folder of the HDF5 caches")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors on stderr")
    return p


def _finetune(args: argparse.Namespace) -> int:
    from .finetune.orchestrate import finetune

    res = finetune(
        args.data, args.model, weights=args.weights, freeze_to=args.freeze_to, epochs=args.epochs, lr=args.lr,
        backbone_lr_mult=args.backbone_lr_mult, layer_decay=args.layer_decay, batch_size=args.batch_size,
        augment=args.augment, init_head_from=args.init_head_from, device=args.device, out=args.out,
        resume=args.resume, overwrite=args.overwrite, workers=args.workers, cache_dir=args.cache_dir,
        plots=not args.no_plots, weight_decay=args.weight_decay, warmup=args.warmup, patience=args.patience,
        bn=args.bn, seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        cache_dtype=args.cache_dtype, prefix_cache=not args.no_prefix_cache,
    )
    print(res.summary)
    print(res.run_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/finetune.py``: exit 0 ok, 1 run error, 2 usage error."""
    return run_cli(PROG, build_parser(), _finetune, argv)
