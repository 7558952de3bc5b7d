"""Figures of FC-as-convolution and multi-view codes (issue: "FC layers as convolutions ... views").

Three parts, each printed as a table and written to ``artifacts/bench/views.json``:

1. ``fcconv-time``: one forward pass of AlexNet with its FC layers as convolutions at 448 px against
   the ordinary network at 224 px (batch ``--batch``, random weights, model only): time ratio and how
   many fc7 codes each pass gives (Caffe's reference: 64x the outputs for about 3x the time).
2. ``fcconv-acc``: test accuracy of AlexNet ``fc7`` (plain, 224 px) against avg- and max-pooled fc7
   maps at 384 and 448 px, on a flowers5 subset. Without real AlexNet weights (none can be had
   offline) pass ``--alexnet-weights PATH``; with random weights the figure only shows the pipeline.
3. ``views``: test accuracy of EfficientNet-Lite0 ``pool`` and ``block5.linear`` codes with
   ``--views center``, ``flip`` and ``10crop`` (mean), on subsets of flowers5 and
   sign_language_digits, and the extraction cost per image of each: the whole call (model loading,
   decoding workers' start and the HDF5 write included) and the streaming part alone
   (``ExtractResult.stream_seconds``, what a larger dataset pays per image), with their ratios to
   the centre crop.
4. ``keep-views``: ``10crop`` with ``keep_views=True``, trained on the combined codes and on every view
   (``train_views="all"``), same split; and the cost per image of keeping the views.

Accuracy: ``train_run`` defaults (linear SVM and softmax, C chosen on a stratified val split, the
same seed for every variant, so every variant is tested on the same images).

Usage::

    python benchmarks/bench_views.py --per-class 200            # all four parts
    python benchmarks/bench_views.py --parts views --per-class 100
    python benchmarks/bench_views.py --parts keep-views --per-class 60 --datasets flowers5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _data import SHARED as DATA  # noqa: E402
from _data import link_subset  # noqa: E402
from _machine import cpu_model  # noqa: E402



def fcconv_time(batch: int, repeats: int) -> dict:
    import torch

    from cnncodes.backbones import ResolvedWeights, build_model, get_backbone
    from cnncodes.fc_conv import with_fc_as_conv

    spec, none = get_backbone("alexnet"), ResolvedWeights("none", "none")
    dense, conv = build_model(spec, none), build_model(with_fc_as_conv(spec), none)

    def best(model, size):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            model(x)  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                out = model(x)
                times.append(time.perf_counter() - t)
        return min(times), out

    t224, _ = best(dense, 224)
    t448, out = best(conv, 448)
    grid = out.shape[-1] * out.shape[-2]
    return {"batch": batch, "t224_s": t224, "t448_fcconv_s": t448, "time_ratio": t448 / t224,
            "codes_per_image_448": grid, "outputs_ratio": grid}


def accuracy(cache: Path, keys: list[str], runs: Path, train_views: str = "combined") -> dict:
    from cnncodes.classify import train_run

    res = train_run(cache, keys, out=runs / f"{cache.stem}-{'-'.join(k.replace('@', '_') for k in keys)}-{train_views}",
                    overwrite=True, plots=False, train_views=train_views)
    m = res.metrics
    out = {}
    for key in keys:
        r = m["results"][key]
        out[key] = {clf: r[clf]["test"]["accuracy"] for clf in r}
    return out


def fcconv_acc(per_class: int, weights: str | None, tmp: Path) -> dict:
    from cnncodes.extraction import extract

    data = link_subset(DATA / "flowers5", tmp / "flowers5", per_class)
    w = weights or str(_random_alexnet(tmp))
    kw = dict(weights=w, out=tmp / "codes", device="cpu", dtype="float32")
    rows = {}
    res = extract(data, "alexnet", ["fc7"], **kw)
    rows["fc7 224"] = {"acc": accuracy(res.path, ["fc7"], tmp / "runs")["fc7"], "s_per_img": res.seconds / res.n_computed}
    for size in (384, 448):
        for pool in ("avg", "max"):
            res = extract(data, "alexnet", ["fc7"], fc_as_conv=True, input_size=size, pool=pool, **kw)
            key = res.keys[0]
            rows[f"fc7 map {size} {pool}"] = {"acc": accuracy(res.path, [key], tmp / "runs")[key],
                                               "s_per_img": res.seconds / max(1, res.n_computed)}
    return {"weights": "given" if weights else "random (pipeline only)", "per_class": per_class, "rows": rows}


def _random_alexnet(tmp: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def views_acc(per_class: int, tmp: Path, datasets: list[str]) -> dict:
    from cnncodes.extraction import extract

    out = {}
    for ds in datasets:
        data = link_subset(DATA / ds, tmp / ds, per_class)
        rows = {}
        for views in ("center", "flip", "10crop"):
            res = extract(data, "efficientnet_lite0", ["pool", "block5.linear"], views=views, device="cpu",
                          out=tmp / "codes", dtype="float32")
            rows[views] = {"acc": accuracy(res.path, ["pool", "block5.linear"], tmp / "runs"), **_cost(res)}
        for row in rows.values():
            row["cost_ratio"] = row["s_per_img"] / rows["center"]["s_per_img"]
            row["stream_cost_ratio"] = row["stream_s_per_img"] / rows["center"]["stream_s_per_img"]
        out[ds] = rows
    return out


def _cost(res) -> dict:
    return {"s_per_img": res.seconds / max(1, res.n_computed),
            "stream_s_per_img": res.stream_seconds / max(1, res.n_computed)}


def keep_views_acc(per_class: int, tmp: Path, datasets: list[str]) -> dict:
    from cnncodes.extraction import extract

    out = {}
    keys = ["pool", "block5.linear"]
    for ds in datasets:
        data = link_subset(DATA / ds, tmp / ds, per_class)
        kw = dict(views="10crop", device="cpu", dtype="float32")
        plain = extract(data, "efficientnet_lite0", keys, out=tmp / "codes-plain", **kw)
        kept = extract(data, "efficientnet_lite0", keys, keep_views=True, out=tmp / "codes-kept", **kw)
        out[ds] = {"combined": accuracy(kept.path, keys, tmp / "runs"),
                   "all views": accuracy(kept.path, keys, tmp / "runs", train_views="all"),
                   "cost_10crop": _cost(plain), "cost_10crop_keep": _cost(kept)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["fcconv-time", "fcconv-acc", "views", "keep-views"])
    ap.add_argument("--per-class", type=int, default=200, help="images per class of each subset")
    ap.add_argument("--datasets", nargs="+", default=["flowers5", "sign_language_digits"])
    ap.add_argument("--alexnet-weights", default=None, help="a real AlexNet state dict, if you have one")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "views.json"))
    args = ap.parse_args(argv)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores")
    result = {}
    with tempfile.TemporaryDirectory(prefix="cnncodes-views-") as tmp:
        tmp = Path(tmp)
        if "fcconv-time" in args.parts:
            r = result["fcconv_time"] = fcconv_time(args.batch, args.repeats)
            print(f"AlexNet, batch {r['batch']}: 224 px dense {r['t224_s']:.3f} s, 448 px FC-as-conv "
                  f"{r['t448_fcconv_s']:.3f} s: {r['time_ratio']:.2f}x the time for {r['outputs_ratio']}x the fc7 codes")
        if "fcconv-acc" in args.parts:
            r = result["fcconv_acc"] = fcconv_acc(args.per_class, args.alexnet_weights, tmp)
            print(f"\nflowers5 ({r['per_class']}/class), AlexNet weights: {r['weights']}")
            print(f"{'codes':<20} {'svm':>7} {'softmax':>8} {'s/img':>7}")
            for name, row in r["rows"].items():
                print(f"{name:<20} {row['acc']['svm']:7.3f} {row['acc']['softmax']:8.3f} {row['s_per_img']:7.3f}")
        if "views" in args.parts:
            r = result["views"] = views_acc(args.per_class, tmp, args.datasets)
            for ds, rows in r.items():
                print(f"\n{ds} ({args.per_class}/class), EfficientNet-Lite0")
                print(f"{'views':<8} {'pool svm':>9} {'pool smax':>10} {'b5 svm':>7} {'b5 smax':>8} {'s/img':>7} "
                      f"{'ratio':>6} {'stream s/img':>12} {'ratio':>6}")
                for views, row in rows.items():
                    a = row["acc"]
                    print(f"{views:<8} {a['pool']['svm']:9.3f} {a['pool']['softmax']:10.3f} "
                          f"{a['block5.linear']['svm']:7.3f} {a['block5.linear']['softmax']:8.3f} {row['s_per_img']:7.3f} "
                          f"{row['cost_ratio']:6.2f} {row['stream_s_per_img']:12.3f} {row['stream_cost_ratio']:6.2f}")
        if "keep-views" in args.parts:
            r = result["keep_views"] = keep_views_acc(args.per_class, tmp, args.datasets)
            for ds, row in r.items():
                print(f"\n{ds} ({args.per_class}/class), EfficientNet-Lite0 10crop, kept views")
                print(f"{'trained on':<10} {'pool svm':>9} {'pool smax':>10} {'b5 svm':>7} {'b5 smax':>8}")
                for what in ("combined", "all views"):
                    a = row[what]
                    print(f"{what:<10} {a['pool']['svm']:9.3f} {a['pool']['softmax']:10.3f} "
                          f"{a['block5.linear']['svm']:7.3f} {a['block5.linear']['softmax']:8.3f}")
                print(f"cost per image: 10crop {row['cost_10crop']['s_per_img']:.3f} s "
                      f"(stream {row['cost_10crop']['stream_s_per_img']:.3f}), with kept views "
                      f"{row['cost_10crop_keep']['s_per_img']:.3f} s (stream {row['cost_10crop_keep']['stream_s_per_img']:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
