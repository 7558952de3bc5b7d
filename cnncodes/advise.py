"""The transfer-learning advisor: which of the four cases, which layer, what to run — from one extraction.

The classic guidance (cs231n) is a 2x2 table: small/large data x similar/different to ImageNet.
:func:`advise` measures both axes on the user's data and ranks the cached layers without training:

1. **Codes.** One extraction of a set of layers (``DEFAULT_LAYERS``; the ImageNet ``logits`` too,
   when the network has them) through :func:`cnncodes.extract` — or an existing cache.
2. **Split.** The same split ``train_svm.py`` makes (recorded, else stratified with its default
   fractions and seed), so the advisor's test rows are the trainer's. Only train+val rows are used
   for the scores; test rows only for the learning curve.
3. **Size.** Train+val images per class; ``large`` when the *median* class has at least
   ``LARGE_PER_CLASS`` (1,000) images. See :data:`LARGE_PER_CLASS` for the reasoning.
4. **Ranking.** LogME (:func:`cnncodes.transferability.logme`) of every layer's L2-normalised
   codes (the classifier's default normalisation), and H-score beside it. The **pick** is LogME's best
   unless a ridge classifier's leave-one-out accuracy (one eigendecomposition per layer) prefers another of
   LogME's top three (:mod:`cnncodes.layer_pick`; train+val rows, test rows unread).
5. **Similarity to ImageNet** (:func:`similarity`): the ImageNet head's mean top-1 probability on
   the data, the share of the label entropy explained by its top-1 class (normalised NCE), LEEP, and
   the layer profile (does an earlier layer out-score the top layer in LogME?).
6. **Case and recommendation** (:func:`recommend`); **evidence**: a learning curve with bootstrap
   intervals (:func:`learning_curve`), the ranking chart, ``report.md`` and ``advice.json``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UsageError

__all__ = ["DEFAULT_LAYERS", "LARGE_PER_CLASS", "CONFIDENT_TOP1", "EXPLAINED_ENTROPY", "LayerScore",
           "rank_layers", "measure_size", "similarity", "recommend", "curve_subsets", "learning_curve",
           "Advice", "advise"]

log = logging.getLogger(__name__)

# One pass of the network gives all of these. Global average pooling of a conv map equals the network's own
# global pool, so 'head' (avg) would duplicate 'pool' and is left out.
DEFAULT_LAYERS = {
    "efficientnet_lite0": ["block2.linear", "block3.linear", "block4.linear", "block5.linear", "block6.linear",
                           "pool", "logits"],
    "mobilenet_v2": ["block4.linear", "block7.linear", "block11.linear", "block14.linear", "block16.linear",
                     "pool", "logits"],
    "alexnet": ["conv3", "conv4", "conv5", "fc6", "fc7", "fc8"],
    "vgg16": ["conv4_3", "conv5_1", "conv5_3", "fc6", "fc7", "fc8"],
    "resnet50": ["layer2", "layer3", "layer4", "pool", "fc"],
    "googlenet": ["inception4a", "inception4c", "inception4e", "inception5b", "pool", "fc"],
    "inception_v3": ["mixed_6a", "mixed_6c", "mixed_6e", "mixed_7c", "pool", "fc"],
    "tiny": ["conv1", "conv2", "fc1", "fc2"],
}

#: Median train images per class from which a set counts as "large". Published linear-probe vs
#: fine-tune results (Kornblith et al. 2019 protocol, SimCLR App. B.8) show fine-tuning gaining
#: little or losing on sets with tens to a few hundred images per class when the images are
#: ImageNet-like (Caltech-101 at 30/class -1.2 pp, Pets ~100/class +0.6, DTD ~80/class -0.3) and
#: gaining a lot on sets with ~750-5,000 per class (Food-101 +16, CIFAR-10 +3.9, CIFAR-100 +8.1).
#: 1,000 per class is where a full fine-tune of a 4-5 M parameter network sees thousands of steps
#: per epoch per class group, and where on a 2-core CPU the cached linear probe stops being the
#: only affordable option worth trying. It is a convention, not a measured boundary.
LARGE_PER_CLASS = 1000

#: Mean top-1 probability of the ImageNet head below which the data count as "different":
#: on photos like ImageNet's the head is confident (in-distribution images get high maximum
#: softmax probability, Hendrycks & Gimpel 2017). Chosen before measuring any set; the README lists
#: what this project's sets measured.
CONFIDENT_TOP1 = 0.30
#: Share of the label entropy explained by ImageNet's top-1 class (normalised NCE) below which the
#: ImageNet classes say little about the user's classes.
EXPLAINED_ENTROPY = 0.35
#: LogME margin (per-sample evidence, nats) by which an earlier layer must beat the top layer to
#: count as a sign of "different" data.
EARLIER_MARGIN = 0.0


@dataclass
class LayerScore:
    """Scores of one cached layer."""

    layer: str
    depth: int  # position in the network (registry order)
    dim: int
    logme: float
    hscore: float | None
    seconds: float  # LogME time
    kind: str = "code"  # "code", or "logits" for the ImageNet class scores

    def to_dict(self) -> dict:
        return {"layer": self.layer, "score": self.logme, "logme": self.logme, "hscore": self.hscore,
                "dim": self.dim, "depth": self.depth, "kind": self.kind, "seconds": self.seconds}


def _l2(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def rank_layers(codes: dict, y: np.ndarray, rows: np.ndarray, depth: dict, logits_key: str | None = None,
                norm: str = "l2", with_hscore: bool = False, eigens: dict | None = None) -> list[LayerScore]:
    """LogME (and optionally H-score) of each layer on ``rows``, best LogME first.

    Parameters
    ----------
    codes : {key: ndarray (N, D)}
    y : labels of all N rows
    rows : rows to score (train+val: never the test rows)
    depth : {key: position in the network}
    logits_key : the ImageNet class-score layer, marked ``kind="logits"`` in the result
    norm : ``"l2"`` (as the classifier's default) or ``"none"``
    with_hscore : also compute H-score (a second D x D decomposition per layer: twice the time)
    eigens : a dict that receives each layer's Gram eigendecomposition (:class:`GramEigen` of the scored codes),
        for the layer pick's leave-one-out fits
    """
    from threadpoolctl import threadpool_limits

    from .transferability import gram_eigen, hscore, logme

    out = []
    for key, X in codes.items():
        F = np.asarray(X[rows], dtype=np.float64)
        F = _l2(F) if norm == "l2" else F
        # one BLAS thread: on this project's shared 2-core machines the 1280 x 1280 eigendecomposition took
        # 6.5 s on one thread and 38-44 s on two that other processes kept preempting
        with threadpool_limits(1):
            t0 = time.perf_counter()
            eig = gram_eigen(F)
            score = logme(F, y[rows], eig=eig).score
            secs = time.perf_counter() - t0
            if eigens is not None:
                eigens[key] = eig
            h = hscore(F, y[rows]) if with_hscore else None
        out.append(LayerScore(key, depth.get(key, 0), F.shape[1], score, h, secs,
                              "logits" if key == logits_key else "code"))
    return sorted(out, key=lambda s: -s.logme)


def measure_size(y_trainval: np.ndarray, class_names: Sequence[str]) -> dict:
    """Images per class available for training, and the small/large verdict."""
    vals, counts = np.unique(y_trainval, return_counts=True)
    median = float(np.median(counts))
    return {
        "per_class": {str(class_names[v]): int(c) for v, c in zip(vals, counts)},
        "train_images": int(counts.sum()), "classes": int(vals.size), "min_per_class": int(counts.min()),
        "median_per_class": median, "threshold_per_class": LARGE_PER_CLASS,
        "regime": "large" if median >= LARGE_PER_CLASS else "small",
    }


def similarity(ranking: list[LayerScore], top_key: str, logits: np.ndarray | None, y: np.ndarray) -> dict:
    """Signals of how ImageNet-like the data are, and the verdict.

    ``different`` when the ImageNet head is unsure (mean top-1 probability < ``CONFIDENT_TOP1``),
    or its top-1 class explains little of the labels (normalised NCE < ``EXPLAINED_ENTROPY``),
    or an earlier layer's LogME beats the top layer's. Any one sign is enough: each says the top
    layer's ImageNet-specific features are not what these labels need.
    """
    from .transferability import head_confidence, leep, nce_normalised, softmax

    codes = [s for s in ranking if s.kind == "code"]
    top = next(s for s in codes if s.layer == top_key)
    earlier = [s for s in codes if s.depth < top.depth]
    best_earlier = max(earlier, key=lambda s: s.logme) if earlier else None
    sig: dict = {"top_layer": top_key, "top_logme": top.logme}
    reasons = []
    if best_earlier is not None:
        gap = best_earlier.logme - top.logme
        sig.update(best_earlier_layer=best_earlier.layer, best_earlier_logme=best_earlier.logme,
                   earlier_minus_top=gap)
        if gap > EARLIER_MARGIN:
            reasons.append(f"an earlier layer ({best_earlier.layer}) out-scores the top layer in LogME by {gap:.4f}")
    if logits is not None:
        P = softmax(logits)
        sig.update(head_confidence(logits))
        sig["nce_normalised"] = nce_normalised(P.argmax(axis=1), y)
        sig["leep"] = leep(P, y)
        sig["leep_chance"] = float(np.log(1.0 / np.unique(y).size))
        if sig["mean_top1_prob"] < CONFIDENT_TOP1:
            reasons.append(f"the ImageNet head is unsure: mean top-1 probability {sig['mean_top1_prob']:.3f} "
                           f"< {CONFIDENT_TOP1}")
        if sig["nce_normalised"] < EXPLAINED_ENTROPY:
            reasons.append(f"ImageNet's top-1 class explains {sig['nce_normalised']:.1%} of the label entropy "
                           f"(< {EXPLAINED_ENTROPY:.0%})")
    sig["thresholds"] = {"mean_top1_prob": CONFIDENT_TOP1, "nce_normalised": EXPLAINED_ENTROPY,
                         "earlier_minus_top": EARLIER_MARGIN}
    sig["verdict"] = "different" if reasons else "similar"
    sig["reasons"] = reasons or ["the ImageNet head is confident, its classes explain the labels, and no earlier "
                                 "layer out-scores the top one"]
    return sig


#: Starting learning rates printed for fine-tuning: head 1e-3 (Adam-style; the Keras guide and fastai
#: use 1e-3 for a new head) and pretrained layers at a fraction of it (the PyTorch tutorial's ratio 10
#: for similar data; dissimilar data want larger updates of the pretrained layers, Li et al. ICLR 2020).
HEAD_LR = 1e-3
BACKBONE_LR_MULT = {"similar": 0.1, "different": 0.3}


def recommend(size: dict, sim: dict, ranking: list[LayerScore], *, top_key: str, first_alias: str,
              shallowest_key: str, data: str, model: str, cache: str, pick: str | None = None) -> dict:
    """The case, the layer (``pick``: the validated pick; default the best LogME) and what to run.

    Small data: a linear classifier on the best-ranked layer's cached codes (``train_svm.py``), with a second
    layer beside it (the top layer, or the best earlier one when the pick is the top layer), so that the run's
    McNemar test says whether the pick really wins.
    Large data: fine-tuning (``scripts/finetune.py``): similar data keep the shallowest ranked layer and
    everything below frozen (generic edges and textures, Yosinski et al. 2014) and train the rest at 0.1x;
    different data freeze only the stem and train the rest at 0.3x.
    """
    case = f"{size['regime']}-{sim['verdict']}"
    pick = pick or ranking[0].layer
    # a second layer beside the pick, so that a run's McNemar test says whether the pick really wins: the top
    # layer, or when the pick is the top layer, the best earlier one (what the classic rule would try)
    alt = top_key if top_key != pick else sim.get("best_earlier_layer")
    layers = [pick] + ([alt] if alt else [])
    linear_cmd = f"python scripts/train_svm.py {cache} --layers {' '.join(layers)} --clf svm softmax"
    rec = {"case": case, "layer": pick, "linear_layers": layers, "linear_command": linear_cmd}
    if size["regime"] == "small":
        where = "top" if sim["verdict"] == "similar" else "earlier-layer"
        agrees = (pick == top_key) == (sim["verdict"] == "similar")
        rec["strategy"] = f"linear classifier (SVM / softmax) on {where} codes: {pick}"
        rec["why"] = (f"{size['median_per_class']:.0f} images per class (median) is below {LARGE_PER_CLASS}; "
                      f"the data look {sim['verdict']} to ImageNet. "
                      + (f"LogME ranks {pick} first" if pick == ranking[0].layer else
                         f"Of LogME's shortlist (first: {ranking[0].layer}), {pick} scores best left-one-out")
                      + ("" if agrees else f" (the classic rule points to {where} codes; the measured ranking "
                                           f"decides, and a run of the advice (run=True) tests the pick against {alt})"))
        rec["command"] = linear_cmd
        return rec
    freeze = shallowest_key if sim["verdict"] == "similar" else first_alias
    mult = BACKBONE_LR_MULT[sim["verdict"]]
    rec.update(freeze_to=freeze, lr=HEAD_LR, backbone_lr_mult=mult,
               strategy=f"fine-tune from {freeze} up (layers up to {freeze} frozen), new head at lr {HEAD_LR:g}, "
                        f"pretrained layers at {mult:g}x",
               why=f"{size['median_per_class']:.0f} images per class (median) reaches {LARGE_PER_CLASS}; the data look "
                   f"{sim['verdict']} to ImageNet. The linear probe on {pick} is the baseline to beat.",
               command=f"python scripts/finetune.py {data} --model {model} --freeze-to {freeze} --lr {HEAD_LR:g} "
                       f"--backbone-lr-mult {mult:g}")
    return rec


CURVE_LADDER = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def curve_sizes(counts: np.ndarray) -> list[int]:
    """Images per class of the learning curve: a 1-2-5 ladder below the median class, then all."""
    top = int(counts.max())
    return [s for s in CURVE_LADDER if s < np.median(counts)] + [top]


def curve_subsets(y: np.ndarray, pool_rows: np.ndarray, sizes: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Nested, class-balanced training subsets: per class (in sorted order) one permutation of its rows drawn
    with ``np.random.default_rng(seed)``; a size k takes the first k of each (all of a smaller class), in cache
    (row) order."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(pool_rows[y[pool_rows] == c]) for c in np.unique(y[pool_rows])]
    return {int(k): np.sort(np.concatenate([o[:k] for o in order])) for k in sizes}


def learning_curve(X: np.ndarray, y: np.ndarray, pool_rows: np.ndarray, test_rows: np.ndarray,
                   sizes: Sequence[int], *, clf: str = "softmax", C: float = 10.0, norm: str = "l2", seed: int = 0,
                   n_boot: int = 1000) -> list[dict]:
    """Test accuracy of ``make_pipeline(norm, clf, C)`` trained on growing subsets of ``pool_rows``.

    C is fixed (no sweep: the curve shows how accuracy grows with data, at the cost of one fit per point);
    each point has a 95 % percentile bootstrap interval over the test rows.
    """
    from .classify import fit_with_retries, make_pipeline
    from .stats import bootstrap_accuracy_ci

    points = []
    for k, rows in curve_subsets(y, pool_rows, sizes, seed).items():
        pipe = make_pipeline(norm, clf, C, max_iter=1000, seed=seed)
        fit = fit_with_retries(pipe, X[rows], y[rows])
        correct = pipe.predict(X[test_rows]) == y[test_rows]
        lo, hi = bootstrap_accuracy_ci(correct, n_boot=n_boot, seed=seed)
        points.append({"per_class": k, "n_train": int(len(rows)), "accuracy": float(correct.mean()),
                       "ci_low": lo, "ci_high": hi, "converged": fit["converged"]})
    return points


@dataclass
class Advice:
    """What :func:`advise` found and wrote (``advice`` is the content of ``advice.json``)."""

    out: Path
    advice: dict
    report: str
    train_summary: str | None = None
    notes: list[str] = field(default_factory=list)


def _resolve_codes(data, model, layers, pool, cache_dir, device, progress) -> tuple[Path, list[str], str, str]:
    """The cache and its layer keys: DATA itself when it is a cache (.h5), else one extraction."""
    p = Path(data)
    if p.suffix in (".h5", ".hdf5") and p.is_file():
        from .store import read_info

        info = read_info(p)
        if model and model != info.backbone:
            raise UsageError(f"{p} holds {info.backbone} codes, not {model}: leave out the 'model' parameter or "
                             f"extract again.")
        from .views import is_views_key

        # a cache's layers, not the per-view codes some of them keep (extract's keep_views)
        keys = list(layers) if layers else [k for k in info.layers if not is_views_key(k)]
        return p, keys, info.backbone, info.dataset_root
    if not p.exists():
        raise UsageError(f"{data} does not exist: pass an image folder (DATA/<class>/<image>), a CSV list, "
                         f"or a cache written by scripts/extract.py.")
    if not model:
        raise UsageError("Name the network (e.g. model='efficientnet_lite0').")
    if not layers:
        if model not in DEFAULT_LAYERS:
            raise UsageError(f"No default layers for {model}: name them with the 'layers' parameter "
                             f"(get_backbone({model!r}).layers lists them).")
        layers = DEFAULT_LAYERS[model]
    from .extraction import extract

    res = extract(str(p), model, list(layers), pool=pool, out=cache_dir, device=device, progress=progress)
    return res.path, list(res.keys), model, str(p)


def _layer_order(model: str, records: dict) -> tuple[dict, str | None, str, str]:
    """Depth of each key (registry order), the logits key, the top code layer and the network's first layer."""
    from .backbones import get_backbone

    aliases = list(get_backbone(model).layers)
    depth = {k: aliases.index(r.alias) if r.alias in aliases else -1 for k, r in records.items()}
    logits = next((k for k, r in records.items() if r.stage == "logits"), None)
    code_keys = [k for k in records if k != logits]
    if not code_keys:
        raise UsageError("Rank at least one layer that is not class scores (e.g. pool, fc7).")
    top = max(code_keys, key=lambda k: depth[k])
    return depth, logits, top, aliases[0]


def _load(cache: Path, keys: list[str]) -> tuple[dict, dict, object]:
    """Each layer's codes (one matrix per key), their records, and the row table (from the first key)."""
    from .store import load_codes

    codes, records, first = {}, {}, None
    for k in dict.fromkeys(keys):
        c = load_codes(cache, [k])
        codes[k], records[k] = c.X, c.records[k]
        first = first or c
    return codes, records, first


def advise(data: str | os.PathLike, model: str | None = None, layers: Sequence[str] | None = None, *,
           pool: str = "avg", out: str | os.PathLike | None = None, cache_dir: str | os.PathLike = "artifacts/codes",
           run: bool = False, sweep: bool = False, seed: int = 0, val_fraction: float = 0.15,
           test_fraction: float = 0.2, curve_clf: str = "softmax", curve_C: float = 10.0, n_boot: int = 1000,
           overwrite: bool = False, device: str = "auto", progress: bool = False, plots: bool = True,
           with_hscore: bool = False, shortlist: int = 3) -> Advice:
    """Measure size and similarity, rank the layers, recommend (and with ``run`` train) a strategy.

    The layer is LogME's best unless a ridge classifier's leave-one-out accuracy on the train+val rows prefers
    another of LogME's first ``shortlist`` layers (:func:`cnncodes.layer_pick.validated_pick`; 1: LogME alone).

    Writes ``out/advice.json``, ``out/report.md``, ``out/learning_curve.png`` and ``out/layer_ranking.png``
    (and ``out/train/``, ``out/sweep/`` run folders of ``train_svm`` with ``run`` / ``sweep``).

    Raises
    ------
    UsageError
        Missing data, unknown model or layer, an ``out`` folder that already holds advice.
    TrainingDataError
        A single class, NaN codes among usable rows, a split that cannot be drawn.
    """
    from .classify import check_codes, make_split
    from .layer_pick import validated_pick

    t_all = time.perf_counter()
    out = Path(out) if out is not None else None
    if out is not None and (out / "advice.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds advice.json: choose another folder for the 'out' parameter or pass overwrite=True.")
    t0 = time.perf_counter()
    cache, keys, model, data_root = _resolve_codes(data, model, layers, pool, cache_dir, device, progress)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes, records, first = _load(cache, keys)
    t_load = time.perf_counter() - t0
    depth, logits_key, top_key, first_alias = _layer_order(model, records)
    y = first.labels
    split = make_split(y, first.splits, first.status, class_names=first.class_names, paths=first.paths,
                       messages=first.messages, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    trval = np.sort(np.concatenate([split.train, split.val]))
    for k, X in codes.items():
        check_codes(X, np.concatenate([trval, split.test]), first.paths, what=f"layer {k}")
    size = measure_size(y[trval], first.class_names)
    t0 = time.perf_counter()
    eigens: dict = {}
    ranking = rank_layers(codes, y, trval, depth, logits_key, with_hscore=with_hscore, eigens=eigens)
    t_rank = time.perf_counter() - t0
    sim = similarity(ranking, top_key, codes[logits_key][trval] if logits_key else None, y[trval])
    pick = validated_pick(codes, y, ranking, trval, k=shortlist, eigens=eigens)
    code_ranked = sorted((s for s in ranking if s.kind == "code"), key=lambda s: s.depth)
    rec = recommend(size, sim, ranking, top_key=top_key, first_alias=first_alias,
                    shallowest_key=code_ranked[0].layer, data=str(data_root), model=model, cache=str(cache),
                    pick=pick["layer"])
    t0 = time.perf_counter()
    curve_layers = [top_key] + ([sim["best_earlier_layer"]] if "best_earlier_layer" in sim else [])
    sizes = curve_sizes(np.array(list(size["per_class"].values())))
    curves = {k: learning_curve(codes[k], y, trval, split.test, sizes, clf=curve_clf, C=curve_C, seed=seed,
                                n_boot=n_boot) for k in curve_layers}
    t_curve = time.perf_counter() - t0
    advice = {
        "schema": "cnncodes.advice/1", "case": rec["case"], "layer": rec["layer"], "pool": records[rec["layer"]].pool,
        "ranking": [dict(s.to_dict(), pool=records[s.layer].pool) for s in ranking],
        "pick": pick, "recommendation": rec, "size": size, "similarity": sim,
        "learning_curve": {"classifier": curve_clf, "C": curve_C, "norm": "l2", "seed": seed, "n_boot": n_boot,
                           "test_rows": int(len(split.test)), "layers": curves},
        "model": model, "cache": str(cache), "data": str(data_root), "split": split.to_dict(),
        "seconds": {"extract": t_extract, "load": t_load, "rank": t_rank,
                    "logme": float(sum(s.seconds for s in ranking)), "pick": pick["seconds"],
                    "learning_curve": t_curve},
    }
    from .advise_report import finish

    return finish(advice, out, run=run, sweep=sweep, seed=seed, val_fraction=val_fraction,
                  test_fraction=test_fraction, overwrite=overwrite, plots=plots, t_start=t_all)
