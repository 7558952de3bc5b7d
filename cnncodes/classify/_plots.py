"""The run's figures: test confusion matrices, accuracy against C, layers compared (Agg, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..fileio import atomic_path


def _figure(*size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_confusions(path: Path, items: list) -> None:
    """Row-normalised test confusion matrices (``ConfusionMatrixDisplay`` on our own Agg figure: with
    ``ax=`` it imports pyplot but registers no figure)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(items)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    k = len(items[0][2].get("labels", []))
    side = max(3.5, 0.35 * k + 2)
    fig = _figure(side * cols, side * rows)
    for i, (name, clf, m) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        cm = np.asarray(m.get("confusion_matrix", [[0]]), dtype=float)
        recall = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        labels = m.get("labels", []) if k <= 30 else None
        disp = ConfusionMatrixDisplay(recall, display_labels=labels)
        disp.plot(ax=ax, cmap="Blues", colorbar=False, include_values=k <= 12, values_format=".2f",
                  xticks_rotation="vertical", im_kw={"vmin": 0, "vmax": 1})
        ax.set_title(f"{name} / {clf}: test acc {m.get('accuracy', float('nan')):.3f}", fontsize=9)
        ax.tick_params(labelsize=7)
        for t in disp.text_.ravel() if disp.text_ is not None else ():
            t.set_fontsize(7)
    _save(fig, path)


def _plot_curves(path: Path, items: list) -> None:
    """Val (or CV) accuracy against C of each model, the C values tried only (``ValidationCurveDisplay``,
    one line per model, the fold spread shaded), the chosen C starred."""
    from sklearn.model_selection import ValidationCurveDisplay

    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, clf, sw in items:
        ev = np.flatnonzero(sw.evaluated)
        # per-fold scores are not kept: mean +- std gives the same line and band as the folds would
        folds = np.stack([sw.scores[ev] - sw.scores_std[ev], sw.scores[ev] + sw.scores_std[ev]], axis=1)
        disp = ValidationCurveDisplay(param_name="C", param_range=sw.grid[ev], train_scores=folds, test_scores=folds,
                                      score_name="val accuracy")
        disp.plot(ax=ax, score_type="test", line_kw={"marker": "o", "ms": 3}, fill_between_kw={"alpha": 0.15})
        line = disp.lines_[0]
        line.set_label(f"{name} / {clf}")
        ax.plot([sw.best_C], [sw.scores[sw.best_index]], marker="*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("C")
    ax.set_ylabel("val accuracy" if all(sw.method == "val" for _, _, sw in items) else "val / CV accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_layers(path: Path, results: Mapping) -> None:
    names = list(results)
    clfs = list(dict.fromkeys(c for d in results.values() for c in d))
    fig = _figure(max(5.0, 1.1 * len(names) * len(clfs)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(clfs)
    x = np.arange(len(names))
    for j, c in enumerate(clfs):
        test = [results[n].get(c, {}).get("test", {}).get("accuracy", np.nan) for n in names]
        val = [results[n].get(c, {}).get("val", {}).get("accuracy", np.nan) for n in names]
        ax.bar(x + j * w - 0.4 + w / 2, test, w, label=f"{c} test")
        ax.plot(x + j * w - 0.4 + w / 2, val, "k_", ms=14, mew=2, label="val" if j == 0 else None)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy by layer")
    ax.legend(fontsize=7)
    _save(fig, path)
