"""Command line of ``scripts/extract.py``: argument parsing and reporting around :func:`cnncodes.extraction.extract`.

Heavy imports (torch) happen only when a forward pass is needed, so ``--help``,
``--list``, ``--list-layers`` and a cache hit stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from numbers import Integral

from ._cli import Parser, run_cli
from ._validation import Interval, validate_params
from .errors import UsageError
from .images import DEFAULT_MAX_PIXELS

DESCRIPTION = """Extract CNN codes (activations of chosen layers of a pretrained CNN) for a labelled
image folder or CSV list into an HDF5 cache. Re-running the same command is a cache hit;
new images and new layers are added without recomputing the rest; an interrupted run resumes."""

EPILOG = """examples:
  python scripts/extract.py ../shared/datasets/flowers5 --model alexnet --layers fc6 fc7
  python scripts/extract.py DATA --model efficientnet_lite0 --layers block4.linear head pool
  python scripts/extract.py --model alexnet --list-layers
  python scripts/extract.py --list
  python scripts/extract.py DATA --model alexnet --layers fc7 --engine ray --ray-address 10.0.0.5:6379

exit status: 0 ok, 1 run error, 2 usage error. The cache path is the last line of stdout."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="extract.py", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", help="image folder (DATA/<class>/<image>, optional train/val/test) or CSV path,label[,split]")
    p.add_argument("--model", "-m", help="backbone name (see --list-models)")
    p.add_argument("--layers", "-l", nargs="+", default=None, help="layer aliases (see --list-layers)")
    p.add_argument("--weights", default="default", help="default (ImageNet), none (random init), or a state-dict file")
    p.add_argument("--pool", default="avg", help="pooling of conv-map layers: avg, max, none")
    p.add_argument("--grid", type=int, default=1, help="spatial grid of the pooling, e.g. 2 for 2x2 (default 1)")
    p.add_argument("--out", "-o", default=None, help="cache folder (default artifacts/codes)")
    p.add_argument("--name", default=None, help="dataset name in the file name (default: the folder's name)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", "-b", type=int, default=64)
    p.add_argument("--workers", "-j", type=int, default=None, help="image decoding processes (default: by device)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage type of codes")
    p.add_argument("--compression", default="gzip", choices=["gzip", "sparse", "lzf", "zstd", "none"],
                   help="gzip (default): one (N, D) dataset per layer, readable by any HDF5 tool; sparse: zeros "
                        "as bits + byte-shuffled values, about 20 %% smaller for post-ReLU codes, read by cnncodes")
    p.add_argument("--no-draft", action="store_true", help="decode big JPEGs at full size (no DCT downscale)")
    p.add_argument("--decoder", default="torchvision", choices=["torchvision", "pil"],
                   help="torchvision (default): JPEG decoding and resizing in torch, as torchvision's tensor "
                        "transforms, less CPU per image; pil: Pillow, bit-exact with transforms on PIL images")
    p.add_argument("--fc-as-conv", action="store_true",
                   help="alexnet/vgg16: run fc6/fc7/fc8 as convolutions, so larger inputs give maps of fc codes "
                        "(pooled by --pool/--grid like any map)")
    p.add_argument("--input-size", type=int, default=None,
                   help="crop size fed to the network (shorter side resized to it x the backbone's resize/crop "
                        "ratio, e.g. 448 -> 512 for AlexNet), default: the backbone's")
    p.add_argument("--views", default="center",
                   help="center (default), flip, 5crop, 10crop or multiscale[:S1,S2,...]: views of each image whose "
                        "codes are combined into one row")
    p.add_argument("--combine", default="mean", choices=["mean", "max"], help="how view codes are combined")
    p.add_argument("--keep-views", action="store_true",
                   help="also store each view's code (<key>#views), for train_svm.py --train-views all")
    p.add_argument("--error-budget", type=float, default=0.05, help="fraction of images allowed to fail (default 0.05)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, a decompression-bomb guard (default {DEFAULT_MAX_PIXELS}, "
                        "Pillow's); raising it redoes the images an earlier run refused for their size")
    p.add_argument("--overwrite", action="store_true", help="discard an unfinished extraction with another spec")
    p.add_argument("--verify-content", action="store_true",
                   help="reuse a cached row only if its image's bytes hash to those it was extracted from (reads "
                        "every image; default: trust size, mtime, inode and ctime, hash only files whose inode or "
                        "ctime changed)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default): this machine; ray: the batches run as tasks on a Ray cluster (pip install "
                        "'cnncodes[ray]'; --out, the images and a weights file on storage every node reaches)")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: HOST:PORT of the cluster's head, or auto (default: the cluster this "
                        "machine belongs to)")
    p.add_argument("--list", action="store_true", help="list the caches in --out and exit")
    p.add_argument("--list-layers", action="store_true", help="list the layers of --model and exit")
    p.add_argument("--list-models", action="store_true", help="list the backbones and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="only errors on stderr")
    return p


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_caches(folder: str) -> None:
    from .store import list_caches

    rows = list_caches(folder)
    if not rows:
        print(f"no caches in {folder}")
        return
    print(f"{'status':<10} {'dataset':<22} {'backbone':<18} {'rows':>6} {'size':>9} {'updated':<20} layers / path")
    for r in rows:
        ds = r["dataset"].rstrip("/").split("/")[-1] if r["dataset"] else "?"
        st = r["status"] if r["status"] != "partial" else f"partial {r['progress']}"
        print(f"{st:<10} {ds:<22} {r['backbone']:<18} {r['rows']:>6} {_fmt_size(r['size_bytes']):>9} "
              f"{r['updated'][:19]:<20} {' '.join(r['layers'])}\n{'':<10} {r['path']}")


def _print_layers(model: str) -> None:
    from .backbones import get_backbone

    spec = get_backbone(model)
    pre = spec.preprocessing
    print(f"{spec.name}: {spec.description}")
    print(f"input: resize {pre.resize}, centre crop {pre.crop}, {pre.interpolation}, mean {pre.mean}, std {pre.std}")
    print(f"{'layer':<16} {'module':<16} {'stage':<8} {'kind':<7} description")
    for ld in spec.layers.values():
        kind = ld.kind if not ld.fixed_pool else f"{ld.fixed_pool}-pool"
        print(f"{ld.alias:<16} {ld.node:<16} {ld.stage:<8} {kind:<7} {ld.description}")


def _run(args: argparse.Namespace) -> int:
    from .extraction import DEFAULT_OUT

    # "--out ''" (an unset variable) is an error, not the default folder
    out = DEFAULT_OUT if args.out is None else args.out
    if args.list_models:
        from .backbones import get_backbone, list_backbones

        for name in list_backbones():
            print(f"{name:<20} {get_backbone(name).description}")
        return 0
    if args.list:
        _print_caches(out)
        return 0
    if args.list_layers:
        if not args.model:
            raise UsageError("--list-layers needs --model NAME")
        _print_layers(args.model)
        return 0
    missing = [n for n, v in (("DATA", args.data), ("--model", args.model), ("--layers", args.layers)) if not v]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}. Usage: extract.py DATA --model NAME --layers L1 [L2 ...]")
    validate_params({"grid": args.grid}, {"grid": [Interval(Integral, 1, None, closed="left")]}, "extract")
    pool = args.pool if args.grid == 1 or args.pool == "none" else f"{args.pool}{args.grid}x{args.grid}"
    from .extraction import extract, keep_big_blocks_in_heap

    if args.device != "cuda":
        keep_big_blocks_in_heap()  # this process's setting: a CPU forward pass stops page-faulting its blocks
    res = extract(
        args.data, args.model, args.layers, weights=args.weights, pool=pool, out=out, device=args.device,
        batch_size=args.batch_size, workers=args.workers, dtype=args.dtype, precision=args.precision,
        draft=not args.no_draft, decoder=args.decoder, compression=args.compression, error_budget=args.error_budget,
        max_pixels=args.max_pixels, overwrite=args.overwrite, name=args.name,
        progress=not (args.no_progress or args.quiet), verify_content=args.verify_content,
        fc_as_conv=args.fc_as_conv, input_size=args.input_size, views=args.views, combine=args.combine,
        keep_views=args.keep_views, engine=args.engine, ray_address=args.ray_address,
    )
    if res.skipped:
        print(f"{len(res.skipped)} image(s) skipped (status 'error', NaN codes):", file=sys.stderr)
        for _p, m in res.skipped[:10]:
            print(f"  {m}", file=sys.stderr)
    print(f"layers: {' '.join(res.keys + res.view_keys)}  rows: {res.info.n_rows}", file=sys.stderr)
    print(res.path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/extract.py``: exit 0 ok, 1 run error, 2 usage error."""
    return run_cli("extract.py", build_parser(), _run, argv,
                   interrupted="interrupted; run the same command again to resume")
