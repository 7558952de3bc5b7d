"""Metrics of a model's predictions, and the one-screen summary of a run."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from ..stats import format_p


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict:
    """Classification metrics of one split: ``classification_report``, ``balanced_accuracy_score``,
    ``confusion_matrix``.

    Parameters
    ----------
    y_true, y_pred : array of int
        Class indices into ``class_names``.
    class_names : sequence of str

    Returns
    -------
    dict
        ``n``, ``accuracy`` (top-1), ``balanced_accuracy`` (mean per-class recall over
        the classes present in ``y_true``), ``per_class`` (precision, recall, f1, support
        per class name), ``confusion_matrix`` (rows: true, columns: predicted, in the
        order of ``labels``), ``labels``. Empty splits give ``{"n": 0}``.
    """
    from sklearn.metrics import balanced_accuracy_score, classification_report, confusion_matrix

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.size == 0:
        return {"n": 0}
    labels = np.arange(len(class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from y_true or y_pred: 0 by zero_division, on purpose
        report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
        bal = balanced_accuracy_score(y_true, y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    return {
        "n": int(y_true.size),
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(bal),
        "per_class": {
            str(name): {"precision": float(report[str(i)]["precision"]), "recall": float(report[str(i)]["recall"]),
                        "f1": float(report[str(i)]["f1-score"]), "support": int(report[str(i)]["support"])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "labels": [str(c) for c in class_names],
    }


def format_summary(metrics: Mapping) -> str:
    """The terminal table: layers x classifier -> val acc, test acc, best C, fit seconds; then the
    best model and one ``WARNING:`` line per warning of the run (e.g. a class with no test image)."""
    head = ["layers", "clf", "val acc", "test acc", "best C", "sweep s", "fit s", "p vs best", "note"]
    # McNemar p-value of each result against the best by val accuracy, on the same test rows
    p_vs_best = {(q["layers"], q["clf"]): format_p(q["p_value"]) for q in metrics.get("pairwise", [])}
    rows = []
    for name, d in metrics["results"].items():
        for clf, r in d.items():
            note = []
            if r.get("c_at_edge"):
                note.append("C at grid edge")
            if not r.get("converged", True):
                note.append("not converged")
            rows.append([name, clf, f"{r['val'].get('accuracy', float('nan')):.4f}", f"{r['test']['accuracy']:.4f}",
                         f"{r['C']:g}", f"{r['sweep_seconds']:.1f}", f"{r['fit_seconds']:.1f}",
                         p_vs_best.get((name, clf), "-"), ", ".join(note)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    b = metrics.get("best")
    if b:
        out.append(f"best by val accuracy: {b['layers']} / {b['clf']} (test {b['test_accuracy']:.4f})")
    out.extend(f"WARNING: {w}" for w in metrics.get("warnings", []))
    return "\n".join(out)
