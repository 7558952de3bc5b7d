"""What the advisor does with its findings: runs the recommendation (``--run``), checks the ranking against a
full ``train_svm`` sweep (``--sweep``), and writes the advice folder (advice.json, report.md, two PNGs).

Plots use matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never pyplot, as classify does.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .fileio import atomic_write_text
from .stats import format_p
from .classify._plots import _figure, _save

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def _jsonable(o):
    from .classify import _jsonable as j

    return j(o)


def _default_out(advice: dict) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("artifacts/advice") / f"{Path(advice['data']).name}-{advice['model']}-{stamp}"


def _per_layer_accuracy(metrics: dict) -> dict:
    """Each layer's test accuracy with the classifier that the val split prefers (as train_svm's best)."""
    out = {}
    for layer, d in metrics["results"].items():
        clf, r = max(d.items(), key=lambda t: t[1]["val"]["accuracy"])
        out[layer] = {"clf": clf, "val_accuracy": r["val"]["accuracy"], "test_accuracy": r["test"]["accuracy"],
                      "best_test_any_clf": max(v["test"]["accuracy"] for v in d.values())}
    return out


def _test_correct(run: Path, layer: str, clf: str) -> dict:
    """{path: right?} of one model's test rows, from the run folder's predictions CSV."""
    import csv

    with open(run / "predictions" / f"{layer}__{clf}.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r["true"] == r["pred"] for r in csv.DictReader(f) if r["split"] == "test"}


def run_sweep(advice: dict, folder: Path, **train_kw) -> dict:
    """Every ranked layer through ``train_run`` (SVM and softmax): the measured ranking next to LogME."""
    from scipy.stats import kendalltau

    from .classify import train_run
    from .stats import mcnemar

    layers = [r["layer"] for r in advice["ranking"]]
    res = train_run(advice["cache"], layers, classifiers=["svm", "softmax"], out=folder, **train_kw)
    acc = _per_layer_accuracy(res.metrics)
    logme = [r["score"] for r in advice["ranking"]]
    measured = [acc[k]["test_accuracy"] for k in layers]
    oracle = max(layers, key=lambda k: acc[k]["test_accuracy"])
    pick = advice["layer"]
    tau = kendalltau(logme, measured)
    a = _test_correct(folder, pick, acc[pick]["clf"])
    b = _test_correct(folder, oracle, acc[oracle]["clf"])
    rows = sorted(a)
    pick_vs_oracle = mcnemar(np.array([b[r] for r in rows]), np.array([a[r] for r in rows])).to_dict()
    return {
        "folder": str(folder), "per_layer": acc, "oracle_layer": oracle,
        "oracle_test_accuracy": acc[oracle]["test_accuracy"], "pick_test_accuracy": acc[pick]["test_accuracy"],
        "pick_minus_oracle_pp": 100 * (acc[pick]["test_accuracy"] - acc[oracle]["test_accuracy"]),
        # the same with each layer's better classifier on test (an upper bound that peeks at test rows)
        "pick_minus_oracle_any_clf_pp": 100 * (acc[pick]["best_test_any_clf"]
                                               - max(v["best_test_any_clf"] for v in acc.values())),
        "kendall_tau": float(tau.statistic), "kendall_p": float(tau.pvalue),
        "pick_vs_oracle": pick_vs_oracle,  # McNemar, b = test rows the oracle gets right and the pick wrong
        # LogME's own first place, for comparison with the validated pick
        "logme_layer": layers[0], "logme_test_accuracy": acc[layers[0]]["test_accuracy"],
        "logme_minus_oracle_pp": 100 * (acc[layers[0]]["test_accuracy"] - acc[oracle]["test_accuracy"]),
        "seconds": float(res.metrics.get("seconds", 0.0)),
        "cost_ratio_logme_vs_sweep": advice["seconds"]["logme"] / max(res.metrics.get("seconds", 0.0), 1e-9),
        # what the pick costs: LogME of every layer plus the shortlist's held-out fits
        "cost_ratio_pick_vs_sweep": (advice["seconds"]["logme"] + advice["seconds"].get("pick", 0.0))
        / max(res.metrics.get("seconds", 0.0), 1e-9),
        "summary": res.summary,
    }


def run_recommendation(advice: dict, folder: Path, **train_kw) -> dict:
    """Train what the advice says: the linear classifier(s) through ``train_run``; fine-tuning through
    ``scripts/finetune.py`` when ``cnncodes.finetune`` exists (the linear probe runs as its baseline)."""
    from .classify import train_run

    rec = advice["recommendation"]
    res = train_run(advice["cache"], rec["linear_layers"], classifiers=["svm", "softmax"], out=folder / "linear",
                    **train_kw)
    done = {"linear": {"folder": str(folder / "linear"), "best": res.metrics["best"],
                       "pairwise": res.metrics.get("pairwise", []), "summary": res.summary}}
    if "freeze_to" not in rec:
        return done
    if importlib.util.find_spec("cnncodes.finetune") is None:
        done["finetune"] = {"available": False,
                            "message": "fine-tuning is not available in this installation (no cnncodes.finetune); "
                                       f"run it later with: {rec['command']}"}
        return done
    argv = shlex.split(rec["command"])
    argv[0:2] = [sys.executable, str(REPO / "scripts" / "finetune.py")]
    proc = subprocess.run(argv, cwd=REPO)
    done["finetune"] = {"available": True, "argv": argv, "returncode": proc.returncode}
    return done


def finish(advice: dict, out: Path | None, *, run: bool, sweep: bool, seed: int, val_fraction: float,
           test_fraction: float, overwrite: bool, plots: bool, t_start: float):
    """Run / sweep when asked, then write advice.json, report.md and the figures into ``out``."""
    from .advise import Advice

    out = Path(out) if out is not None else _default_out(advice)
    out.mkdir(parents=True, exist_ok=True)
    train_kw = dict(seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite)
    if sweep:
        advice["sweep"] = run_sweep(advice, out / "sweep", **train_kw)
    summary = None
    if run:
        advice["run"] = run_recommendation(advice, out / "train", **train_kw)
        summary = advice["run"]["linear"]["summary"]
    advice["seconds"]["total"] = time.perf_counter() - t_start
    if plots:
        plot_learning_curve(out / "learning_curve.png", advice)
        plot_ranking(out / "layer_ranking.png", advice)
    report = format_report(advice, plots)
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "advice.json", json.dumps(_jsonable(advice), indent=2) + "\n")
    return Advice(out, advice, report, summary)


# --------------------------------------------------------------------------- figures (Agg, no pyplot: classify's helpers)


def plot_learning_curve(path: Path, advice: dict) -> None:
    lc = advice["learning_curve"]
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for layer, pts in lc["layers"].items():
        x = [p["per_class"] for p in pts]
        line, = ax.plot(x, [p["accuracy"] for p in pts], marker="o", ms=4, label=layer)
        ax.fill_between(x, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], alpha=0.2,
                        color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel(f"test accuracy ({lc['test_rows']} rows)")
    ax.set_title(f"learning curve: {lc['classifier']}, C={lc['C']:g}, 95% bootstrap CI", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_ranking(path: Path, advice: dict) -> None:
    rows = sorted(advice["ranking"], key=lambda r: r["depth"])
    names = [r["layer"] for r in rows]
    fig = _figure(max(5.5, 0.9 * len(names)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    colors = ["tab:orange" if n == advice["layer"] else "tab:blue" for n in names]
    ax.bar(x, [r["score"] for r in rows], 0.6, color=colors)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("LogME (per sample; higher is better)")
    ax.axhline(0, color="k", lw=0.5)
    title = f"layer ranking ({advice['case']}; pick {advice['layer']} in orange)"
    if "sweep" in advice:
        acc = advice["sweep"]["per_layer"]
        ax2 = ax.twinx()
        ax2.plot(x, [acc[n]["test_accuracy"] for n in names], "ko-", ms=4, label="test accuracy (sweep)")
        ax2.set_ylabel("measured test accuracy")
        ax2.legend(fontsize=7, loc="lower right")
        title += f"; Kendall tau {advice['sweep']['kendall_tau']:.2f}"
    ax.set_title(title, fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------- report


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def format_report(advice: dict, plots: bool) -> str:
    """The one-page Markdown report."""
    rec, size, sim = advice["recommendation"], advice["size"], advice["similarity"]
    L = [f"# Transfer-learning advice: {Path(advice['data']).name}, {advice['model']}", "",
         f"**Case: {advice['case']}** — {rec['strategy']}.", "", rec["why"] + ".", "",
         "```bash", rec["command"], "```"]
    if "freeze_to" in rec:
        L += ["", "Linear baseline (cheap, from the cache):", "", "```bash", rec["linear_command"], "```"]
    L += ["", "## Size", "",
          f"{size['train_images']} train+val images in {size['classes']} classes; per class: median "
          f"{size['median_per_class']:.0f}, smallest {size['min_per_class']}. Large means a median of at least "
          f"{size['threshold_per_class']} per class: **{size['regime']}**.", "", "## Similarity to ImageNet", ""]
    sig_rows = [["top layer LogME minus best earlier layer's",
                 f"{-sim.get('earlier_minus_top', float('nan')):.4f} ({sim.get('best_earlier_layer', '-')})",
                 "different if < 0"]]
    if "mean_top1_prob" in sim:
        sig_rows += [["ImageNet head: mean top-1 probability", f"{sim['mean_top1_prob']:.3f}",
                      f"different if < {sim['thresholds']['mean_top1_prob']}"],
                     ["label entropy explained by ImageNet top-1 (NCE / H(Y))", f"{sim['nce_normalised']:.3f}",
                      f"different if < {sim['thresholds']['nce_normalised']}"],
                     ["LEEP (chance level log 1/K)", f"{sim['leep']:.3f} ({sim['leep_chance']:.3f})", "(shown)"],
                     ["ImageNet head: mean normalised entropy", f"{sim['mean_entropy_norm']:.3f}", "(shown)"]]
    L += _table(["signal", "value", "rule"], sig_rows)
    L += ["", f"Verdict: **{sim['verdict']}** — " + "; ".join(sim["reasons"]) + ".", "", "## Layer ranking", ""]
    sw = advice.get("sweep")
    with_h = any(r["hscore"] is not None for r in advice["ranking"])
    head = ["rank", "layer", "dim", "LogME"] + (["H-score"] if with_h else []) + (["test acc (sweep)"] if sw else [])
    rows = []
    for i, r in enumerate(advice["ranking"], 1):
        row = [str(i), r["layer"] + (" (ImageNet logits)" if r["kind"] == "logits" else ""), str(r["dim"]),
               f"{r['score']:.4f}"] + ([f"{r['hscore']:.2f}"] if with_h else [])
        if sw:
            a = sw["per_layer"][r["layer"]]
            row.append(f"{a['test_accuracy']:.4f} ({a['clf']})")
        rows.append(row)
    L += _table(head, rows)
    secs = advice["seconds"]
    L += ["", f"LogME of all {len(rows)} layers: {secs['logme']:.2f} s (codes loaded in {secs['load']:.2f} s)."]
    L += _pick_section(advice)
    if sw:
        L += [f"Full sweep (train_svm, SVM + softmax, every layer): {sw['seconds']:.1f} s; LogME + the shortlist's "
              f"fits cost {100 * sw['cost_ratio_pick_vs_sweep']:.1f} % of it. Kendall tau (LogME vs measured) "
              f"{sw['kendall_tau']:.2f}; pick {advice['layer']} {sw['pick_test_accuracy']:.4f} vs best "
              f"{sw['oracle_layer']} {sw['oracle_test_accuracy']:.4f} ({sw['pick_minus_oracle_pp']:+.2f} pp; McNemar "
              f"p = {format_p(sw['pick_vs_oracle']['p_value'])})."]
    L += _curve_section(advice, plots)
    L += _run_section(advice)
    return "\n".join(L) + "\n"


def _pick_section(advice: dict) -> list[str]:
    pk = advice.get("pick")
    if not pk:
        return []
    rows = [[c["layer"], f"{c['logme']:.4f}", f"{c['loo_accuracy']:.4f}", f"{c['strength']:g}",
             format_p(c["p_vs_first"]), f"{c['seconds']:.2f}"] for c in pk["candidates"]]
    return ["", f"Pick: LogME's first {pk['k']} layers, each scored by a ridge classifier's leave-one-out accuracy "
            f"on the L2-normalised codes of the {pk['rows']} train+val rows (test rows unread; ridge strength chosen "
            f"on the same score). Another layer replaces LogME's first only when more accurate with McNemar p < "
            f"{pk['alpha']:g} against it; ties go to the better LogME. **{pk['layer']}** "
            + ("(LogME's first)." if pk["layer"] == pk["logme_layer"] else f"(LogME's first: {pk['logme_layer']})."),
            "", *_table(["layer", "LogME", "leave-one-out acc (ridge)", "strength", "p vs LogME's first", "seconds"],
                        rows), ""]


def _curve_section(advice: dict, plots: bool) -> list[str]:
    lc = advice["learning_curve"]
    L = ["", "## Learning curve", "",
         f"{lc['classifier']} at C={lc['C']:g} on L2-normalised codes, trained on nested class-balanced subsets "
         f"(seed {lc['seed']}) of the train+val rows, tested on the {lc['test_rows']} test rows; 95 % bootstrap "
         f"intervals ({lc['n_boot']} resamples of the test rows).", ""]
    layers = list(lc["layers"])
    sizes = [p["per_class"] for p in lc["layers"][layers[0]]]
    rows = [[str(k)] + [f"{lc['layers'][l][i]['accuracy']:.3f} [{lc['layers'][l][i]['ci_low']:.3f}, "
                        f"{lc['layers'][l][i]['ci_high']:.3f}]" for l in layers] for i, k in enumerate(sizes)]
    L += _table(["per class"] + layers, rows)
    if plots:
        L += ["", "![learning curve](learning_curve.png)", "", "![layer ranking](layer_ranking.png)"]
    return L


def _run_section(advice: dict) -> list[str]:
    run = advice.get("run")
    if not run:
        return []
    L = ["", "## Run", "", f"Linear classifiers in `{run['linear']['folder']}` (p vs best: McNemar on the same "
                          f"test rows):", "", "```", run["linear"]["summary"], "```"]
    ft = run.get("finetune")
    if ft:
        L += ["", ft.get("message") or f"Fine-tuning ran: exit status {ft['returncode']}."]
    return L
