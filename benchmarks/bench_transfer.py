"""Linear probe vs fine-tuning vs training from scratch, per dataset: test accuracy and wall time.

For each dataset (a subset of ``--per-class`` images per class, linked from ``../shared/datasets``;
the split is drawn by train_svm's ``make_split``: 65 % train, 15 % val, 20 % test, seed 0, the same
for every case) and EfficientNet-Lite0 (its packaged ImageNet weights, 224 px input as its spec says):

- ``linear probe``: ``extract`` of block3.linear, block4.linear, block5.linear (average pooled) and
  pool, then ``train_run`` (softmax and linear SVM, C by val); the best (layer, classifier) by val
  accuracy is reported; time = extraction + training;
- ``fine-tune top (frozen to block4, cached)``: ``finetune(freeze_to="block4", augment="none")``;
  block4's unpooled output is extracted once into the cache, blocks 5-6 + head + new classifier train
  on it; time includes that extraction;
- ``... + head from the probe (LP-FT)``: the same with ``init_head_from`` = the probe run's pool softmax
  (refit on train+val by train_svm, so this run's val accuracy is not held out: it is left out of the
  "best fine-tune by val" pick);
- ``... head from a train-only probe (LP-FT)``: the same with the head from a pool softmax fitted on the
  fine-tuning's train rows only (:func:`train_only_probe`): a held-out val;
- ``fine-tune top, pretrained blocks at lr xM`` (``--top-mults M``): the frozen-top case at another
  learning rate for blocks 5-6;
- ``fine-tune all``: every layer, pretrained layers at lr x 0.1, train-time augmentation (random
  resized crop + flip);
- ``from scratch``: ``weights="none"``, same recipe (lr x 1 everywhere, BatchNorm in train mode).

The per-epoch speed-up of the cache is the median epoch time (train + val) of the frozen-top run
without the cache (``prefix_cache=False``: blocks 0-4 run every epoch; ``--nocache-epochs`` epochs)
divided by the cached run's.

Usage::

    python benchmarks/bench_transfer.py                            # both datasets, defaults below
    python benchmarks/bench_transfer.py --datasets flowers5 --per-class 100 --epochs-all 6
    # one arm per process (each under the shared lock); the rows combine in --out
    python benchmarks/bench_transfer.py --datasets flowers5 --per-class 150 --arms probe top
    python benchmarks/bench_transfer.py --datasets flowers5 --per-class 150 --arms all

Writes ``artifacts/bench/transfer.json`` after every case (``--out``), prints one table per dataset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import link_subset  # noqa: E402
from _machine import cpu_model  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
LP_LAYERS = ["block3.linear", "block4.linear", "block5.linear", "pool"]
MODEL = "efficientnet_lite0"


def subset(name: str, per_class: int, root: Path) -> Path:
    """``per_class`` images of each class of a shared dataset, as symbolic links (sorted, first ones)."""
    return link_subset(SHARED / name, root / f"{name}_{per_class}pc", per_class)


def linear_probe(data: Path, work: Path, layers=LP_LAYERS) -> dict:
    from cnncodes.classify import train_run
    from cnncodes.extraction import extract

    t0 = time.perf_counter()
    res = extract(data, MODEL, layers, out=work / "codes", device="cpu")
    t1 = time.perf_counter()
    run = train_run(res.path, layers, classifiers=["softmax", "svm"], out=work / "runs" / f"{data.name}__lp",
                    overwrite=True, plots=False)
    b = run.metrics["best"]
    table = {f"{k}/{c}": r["test"]["accuracy"] for k, d in run.metrics["results"].items() for c, r in d.items()}
    return {"case": "linear probe", "test_accuracy": b["test_accuracy"], "val_accuracy": b["val_accuracy"],
            "detail": f"best by val: {b['layers']} / {b['clf']}", "seconds": time.perf_counter() - t0,
            "extract_seconds": t1 - t0, "all_layers": table, "run_dir": str(run.run_dir),
            "split": run.metrics["split"]["counts"]}


def train_only_probe(data: Path, work: Path) -> Path:
    """A pool softmax fitted on the fine-tuning's train rows only, for a clean LP-FT.

    train_svm refits its model on train+val, so a head taken from the reported probe has seen the
    fine-tuning's val rows, which then pick the epoch. Here the fine-tuning's train rows are the
    probe's ``train/`` folder and its val rows the probe's ``test/`` folder (no ``val/``: C is chosen
    by cross-validation on train), so the head never sees val.
    """
    from cnncodes.classify import train_run
    from cnncodes.extraction import extract
    from cnncodes.finetune.data import list_rows

    dst = work / "data" / f"{data.name}__train_only"
    if not dst.is_dir():
        rows = list_rows(data)  # finetune's split: same seed and fractions as the fine-tuning arms
        tmp = dst.with_name(dst.name + ".tmp")
        for part, idx in (("train", rows.split.train), ("test", rows.split.val)):
            for i in idx:
                src = Path(rows.paths[i])
                (tmp / part / rows.class_names[rows.labels[i]]).mkdir(parents=True, exist_ok=True)
                os.symlink(src, tmp / part / rows.class_names[rows.labels[i]] / src.name)
        tmp.rename(dst)
    res = extract(dst, MODEL, ["pool"], out=work / "codes", device="cpu")
    run = train_run(res.path, ["pool"], classifiers=["softmax"], out=work / "runs" / f"{data.name}__lp_train_only",
                    overwrite=True, plots=False)
    return run.run_dir


def fine_tune(data: Path, work: Path, case: str, **kw) -> dict:
    from cnncodes.finetune.orchestrate import finetune

    t0 = time.perf_counter()
    # the settings are in the name: two benchmark processes with other settings never share (and discard)
    # each other's interrupted work; the same settings resume it
    tag = hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:8]
    res = finetune(data, MODEL, device="cpu", out=work / "runs" / f"{data.name}__{case.replace(' ', '_')}__{tag}",
                   overwrite=True, cache_dir=work / "codes", plots=False, **kw)
    m = res.metrics
    r = m["results"]["finetune"]["softmax"]
    return {"case": case, "test_accuracy": r["test"]["accuracy"], "val_accuracy": r["val"]["accuracy"],
            "detail": f"best epoch {m['best_epoch']} of {r['epochs_run']}; {m['settings']['mode']}",
            "seconds": time.perf_counter() - t0, "epoch_seconds": m["timing"]["epoch_seconds"],
            "cache_seconds": m["timing"].get("cache_seconds"), "run_dir": str(res.run_dir),
            "split": m["split"]["counts"], "settings": {k: kw[k] for k in sorted(kw)}}


def table(name: str, rows: list[dict]) -> str:
    out = [f"{name}", "| case | test acc | val acc | wall s | images train/val/test | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        n = "/".join(str(r["split"].get(k, "?")) for k in ("train", "val", "test")) if isinstance(r.get("split"), dict) else "?"
        val = f"{r['val_accuracy']:.4f}" + (" (head saw val)" if r["case"] == ARMS["lpft"] else "")
        out.append(f"| {r['case']} | {r['test_accuracy']:.4f} | {val} | {r['seconds']:.0f} | {n} | {r['detail']} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> list[str]:
    """The cache's per-epoch speed-up and the best fine-tune (by val) against the probe, on one subset."""
    lines = []
    lp = next((r for r in rows if r["case"] == ARMS["probe"]), None)
    same = [r for r in rows if lp is None or r.get("config", {}).get("per_class") == lp.get("config", {}).get("per_class")]
    cached = next((r for r in same if r["case"] == ARMS["top"]), None)
    plain = next((r for r in same if r["case"] == ARMS["nocache"]), None)
    if cached and plain:
        a, b = statistics.median(cached["epoch_seconds"]), statistics.median(plain["epoch_seconds"])
        lines.append(f"per-epoch time, frozen to block4: {b:.1f} s without the cache, {a:.1f} s with it: {b / a:.1f}x")
    # LP-FT is left out of the pick: its initial head is train_svm's model, refit on train+val, so its val
    # accuracy is not a held-out score (1.0 at epoch 1 on flowers5) and would always win
    best = max((r for r in same if r["case"].startswith("fine-tune") and r["case"] not in (ARMS["nocache"], ARMS["lpft"])),
               key=lambda r: r["val_accuracy"], default=None)
    if lp and best:
        lines.append(f"best fine-tune by val ({best['case']}): "
                     f"{100 * (best['test_accuracy'] - lp['test_accuracy']):+.1f} pp test vs the linear probe")
    return lines


# arm key -> case name, in the order of the table; --arms picks keys, each arm can run in its own process
ARMS = {
    "probe": "linear probe",
    "top": "fine-tune top (frozen to block4, cached)",
    "lpft": "fine-tune top, head from the probe (LP-FT)",
    "lpftclean": "fine-tune top, head from a train-only probe (LP-FT)",
    "topmult": "fine-tune top, pretrained blocks at lr x{mult}",
    "nocache": "fine-tune top without the cache",
    "all": "fine-tune all",
    "scratch": "from scratch",
}


def arm_plan(name: str, args) -> list[tuple[str, str, object, dict]]:
    """(arm, case, function, settings) of every arm of one dataset; the settings identify a result."""
    common = {"batch_size": args.batch_size, "lr": args.lr, "seed": 0}
    top = dict(common, freeze_to="block4", augment="none", epochs=args.epochs_top)
    plan = [("probe", ARMS["probe"], linear_probe, {"layers": LP_LAYERS}),
            ("top", ARMS["top"], fine_tune, top)]
    if name in args.lpft:
        plan.append(("lpft", ARMS["lpft"], fine_tune, dict(top, init_head_from="probe")))
        plan.append(("lpftclean", ARMS["lpftclean"], fine_tune, dict(top, init_head_from="train-only probe")))
    for m in args.top_mults:
        plan.append(("topmult", ARMS["topmult"].format(mult=m), fine_tune, dict(top, backbone_lr_mult=m)))
    plan += [("nocache", ARMS["nocache"], fine_tune, dict(top, epochs=args.nocache_epochs, prefix_cache=False)),
             ("all", ARMS["all"], fine_tune, dict(common, augment="default", epochs=args.epochs_all)),
             ("scratch", ARMS["scratch"], fine_tune,
              dict(common, weights="none", augment="default", epochs=args.epochs_scratch or args.epochs_all))]
    return plan


def run_dataset(name: str, args, work: Path, report: dict, save) -> None:
    """Run the arms of ``args.arms`` that the report does not hold yet with these settings.

    A row is kept only if it was measured on the same subset with the same settings (``config``); a row
    of the same case with other settings is replaced, so that results of earlier runs combine only
    where they are comparable.
    """
    data = subset(name, args.per_class, work / "data")
    rows = report["datasets"].setdefault(name, [])
    for arm, case, fn, kw in arm_plan(name, args):
        config = {"per_class": args.per_class, **kw}
        if any(r["case"] == case and r.get("config") == config for r in rows) or arm not in args.arms:
            continue
        kw = dict(kw)
        if kw.get("init_head_from") == "probe":
            lp = next((r for r in rows if r["case"] == ARMS["probe"] and r.get("config", {}).get("per_class")
                       == args.per_class), None)
            if lp is None:
                print(f"[{name}] {case}: skipped, no linear probe on this subset yet (run --arms probe)")
                continue
            kw["init_head_from"] = lp["run_dir"]
        t0 = time.perf_counter()
        if kw.get("init_head_from") == "train-only probe":
            kw["init_head_from"] = str(train_only_probe(data, work))
        extra = time.perf_counter() - t0
        print(f"[{name}] {case} ...", flush=True)
        r = fn(data, work, **kw) if arm == "probe" else fn(data, work, case, **kw)
        r["config"], r["arm"] = config, arm
        r["seconds"] += extra  # the train-only probe the head comes from
        r["load_at_start"] = os.getloadavg()
        rows[:] = [x for x in rows if x["case"] != case] + [r]
        rows.sort(key=lambda x: list(ARMS).index(x.get("arm", "top")))
        save()
        print(f"[{name}] {case}: test {r['test_accuracy']:.4f} in {r['seconds']:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["flowers5", "sign_language_digits"])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs-top", type=int, default=10)
    ap.add_argument("--epochs-all", type=int, default=5)
    ap.add_argument("--nocache-epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lpft", nargs="*", default=["flowers5"], help="datasets that also run LP-FT")
    ap.add_argument("--epochs-scratch", type=int, default=None, help="epochs from scratch (default: --epochs-all)")
    ap.add_argument("--top-mults", nargs="*", type=float, default=[],
                    help="extra frozen-top arms with the pretrained blocks at lr x M")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help="run only these arms (results of other arms already in --out are kept)")
    ap.add_argument("--work", default=str(REPO / "artifacts" / "bench" / "transfer"))
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "transfer.json"))
    args = ap.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report.setdefault("datasets", {})
    report["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "load_at_start": os.getloadavg()}
    # each row carries its own settings (config); this only records how the file was put together
    report.setdefault("invocations", []).append({"argv": sys.argv[1:] if argv is None else list(argv),
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                                 "load_at_start": os.getloadavg()})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))

    for name in args.datasets:
        run_dataset(name, args, work, report, save)
    for name, rows in report["datasets"].items():
        print(table(name, rows))
        for line in summary(rows):
            print(line)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
