"""The widening, refining C search on real codes vs the old 9-point sweep, GridSearchCV at equal protocol,
and a tuned 3-fold GridSearchCV; and LinearSVC's dual vs primal solver on those codes.

For each cache and layer, the rows are split as ``train_run`` does by default (the recorded
split, else stratified: val 15 %, test 20 %, seed 0), the codes L2-normalised. Each method
chooses C, refits on train+val and is scored once on test; wall seconds are for the search
plus the refit (old and new also give them apart), all with ``n_jobs`` workers (default 2), in one
process, one after the other:

- **old**: ``sweep_C`` + ``refit`` of ``--old-rev`` (default ``main``), run from a
  ``git archive`` of that revision in a subprocess (its own ``PYTHONPATH``); the 9-value
  decade grid 1e-4..1e4 with early stop (patience 2);
- **new**: ``sweep_C`` + ``refit`` of this checkout (grid with early stop, widening, half
  decades around the best);
- **CodesSearchCV** (SVM): the same schedule through sklearn's ``BaseSearchCV`` machinery
  (``PredefinedSplit``, a ``Normalizer`` + ``CodesLinearSVC`` pipeline cloned and fitted per C);
- **GridSearchCV at equal protocol** with the new search, per classifier:
  ``GridSearchCV(Normalizer + CodesLinearSVC or the softmax, {"C": the C values the new search
  tried}, cv=PredefinedSplit(the same val split))``: the same fits, so the same choice, and the
  time difference is the implementation's; and with the old sweep: the same split, its 9-value grid;
- **GridSearchCV val split, 17 C** (SVM): half decades 1e-4..1e4 on the same val split, what any
  search on that split would pick;
- **GridSearchCV 3-fold, 17 C** (SVM): ``GridSearchCV(..., {"C": half decades 1e-4..1e4}, cv=3)``
  (stratified 3-fold on train+val): the tuned reference; the gap in test accuracy (pp) of
  the new search to it is the figure the goal (<= 0.5 pp) is about.

``--solvers``: one fit per C of ``LinearSVC(dual=True)``, ``dual=False`` and ``dual="auto"``
on the train rows of each layer, seconds and iterations, to check the ``dual="by_C"`` rule.

Usage::

    python benchmarks/bench_search.py artifacts/codes/flowers5-*.h5 artifacts/codes/sign_*.h5 \
        --layers pool block4.linear [--solvers] [--clf svm softmax]

Writes ``artifacts/bench/search.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _machine import cpu_model  # noqa: E402

OLD_RUNNER = r"""
import json, sys, time
import numpy as np
from cnncodes import classify as C
print(json.dumps({"module": C.__file__}))
d = np.load(sys.argv[1])
X, y, tr, va, te = d["X"], d["y"], d["tr"], d["va"], d["te"]
from joblib import Parallel, delayed
def warm(i):  # workers started and their imports done before timing, as in the parent
    import sklearn.linear_model, sklearn.svm, cnncodes.classify  # noqa: F401
    return i
Parallel(n_jobs=int(sys.argv[2]))(delayed(warm)(i) for i in range(4))
out = {}
for clf in sys.argv[3].split(","):
    t0 = time.perf_counter()
    sw = C.sweep_C(X[tr], y[tr], X[va], y[va], clf=clf, norm="none", n_jobs=int(sys.argv[2]))
    t1 = time.perf_counter()
    trva = np.concatenate([tr, va])
    pipe, _ = C.refit(X[trva], y[trva], clf=clf, norm="none", C=sw.best_C)
    t2 = time.perf_counter()
    out[clf] = {"C": sw.best_C, "seconds": t2 - t0, "search_s": t1 - t0, "refit_s": t2 - t1,
                "n_fits": int(sw.evaluated.sum()), "test": float(np.mean(pipe.predict(X[te]) == y[te])),
                "val": float(sw.scores[sw.best_index]),
                "tried": [{"C": float(c), "score": float(v)} for c, v, e in zip(sw.grid, sw.scores, sw.evaluated) if e]}
print(json.dumps(out))
"""


def _warm(i):
    import sklearn.linear_model  # noqa: F401
    import sklearn.svm  # noqa: F401

    import cnncodes.classify  # noqa: F401
    return i


def old_sweep(rev: str, X, y, sp, n_jobs: int, clfs) -> dict:
    """The old sweep + refit from a ``git archive`` of ``rev``, in a subprocess with its own PYTHONPATH."""
    with tempfile.TemporaryDirectory() as d:
        arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "cnncodes"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", d], input=arch.stdout, check=True)
        data = os.path.join(d, "data.npz")
        np.savez(data, X=X, y=y, tr=sp.train, va=sp.val, te=sp.test)
        env = dict(os.environ, PYTHONPATH=d)
        # cwd=d: with -c, sys.path[0] is the working directory, which must not be this checkout
        r = subprocess.run([sys.executable, "-c", OLD_RUNNER, data, str(n_jobs), ",".join(clfs)], env=env,
                           capture_output=True, text=True, check=True, cwd=d)
        assert json.loads(r.stdout.strip().splitlines()[-2])["module"].startswith(d), "the old code was not used"
        return json.loads(r.stdout.strip().splitlines()[-1])


def new_sweep(X, y, sp, n_jobs, clf, early_stop) -> dict:
    from cnncodes import classify as C

    t0 = time.perf_counter()
    sw = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf=clf, norm="none", n_jobs=n_jobs,
                   early_stop=early_stop)
    t1 = time.perf_counter()
    trva = np.concatenate([sp.train, sp.val])
    pipe, _ = C.refit(X[trva], y[trva], clf=clf, norm="none", C=sw.best_C)
    t2 = time.perf_counter()
    return {"C": sw.best_C, "seconds": t2 - t0, "search_s": t1 - t0, "refit_s": t2 - t1, "n_fits": len(sw.tried),
            "test": float(np.mean(pipe.predict(X[sp.test]) == y[sp.test])), "val": float(sw.scores[sw.best_index]),
            "tried": sw.tried, "stop_reason": sw.stop_reason}


def _pipe(clf: str):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer

    from cnncodes import classify as C

    est = C.CodesLinearSVC(random_state=0) if clf == "svm" else C.make_classifier("softmax")
    return Pipeline([("norm", Normalizer()), ("clf", est)])


def _timed_search(search, X, y, sp) -> dict:
    trva = np.concatenate([sp.train, sp.val])
    t0 = time.perf_counter()
    search.fit(X[trva], y[trva])  # the search and the refit on train+val
    return {"C": float(search.best_params_["clf__C"]), "seconds": time.perf_counter() - t0,
            "n_fits": len(search.cv_results_["params"]) * search.n_splits_,
            "test": float(search.score(X[sp.test], y[sp.test])), "val": float(search.best_score_)}


def sklearn_searches(X, y, sp, n_jobs, new: dict, clfs) -> dict:
    """GridSearchCV at equal protocol with the new search (the same PredefinedSplit val split, the same C
    values it tried) and with the old sweep (the same split, its 9-value grid); GridSearchCV over 17 half
    decades on the same val split (what any search on that split can pick) and 3-fold (the tuned reference,
    SVM); CodesSearchCV (the new schedule through BaseSearchCV, SVM)."""
    from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

    from cnncodes import classify as C
    from cnncodes.search import CodesSearchCV

    val = PredefinedSplit(np.r_[np.full(len(sp.train), -1), np.zeros(len(sp.val), dtype=int)])
    half = list(np.logspace(-4, 4, 17))
    out = {}
    for clf in clfs:
        pipe = _pipe(clf)
        searches = {
            "GridSearchCV val split, the new search's C": GridSearchCV(
                pipe, {"clf__C": sorted(t["C"] for t in new[clf]["tried"])}, cv=val, n_jobs=n_jobs),
            "GridSearchCV val split, the old 9-point grid": GridSearchCV(
                pipe, {"clf__C": list(C.DEFAULT_GRID)}, cv=val, n_jobs=n_jobs),
        }
        if clf == "svm":
            searches["CodesSearchCV val split"] = CodesSearchCV(pipe, cv=val, n_jobs=n_jobs)
            searches["GridSearchCV val split, 17 C"] = GridSearchCV(pipe, {"clf__C": half}, cv=val, n_jobs=n_jobs)
            searches["GridSearchCV 3-fold, 17 C"] = GridSearchCV(
                pipe, {"clf__C": half}, cv=StratifiedKFold(3, shuffle=True, random_state=0), n_jobs=n_jobs)
        out[clf] = {name: _timed_search(s, X, y, sp) for name, s in searches.items()}
    return out


def solvers(X, y, sp) -> list[dict]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC
    from threadpoolctl import threadpool_limits

    rows = []
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        row = {"C": c}
        for dual in (True, False, "auto"):
            est = LinearSVC(C=c, dual=dual, random_state=0)
            with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
                warnings.simplefilter("always", ConvergenceWarning)
                t0 = time.perf_counter()
                est.fit(X[sp.train], y[sp.train])
                row[f"dual={dual}"] = {"seconds": time.perf_counter() - t0, "n_iter": int(np.max(est.n_iter_)),
                                       "converged": not caught}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("caches", nargs="+")
    ap.add_argument("--layers", nargs="+", default=["pool"])
    ap.add_argument("--clf", nargs="+", default=["svm", "softmax"])
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--old-rev", default="main")
    ap.add_argument("--solvers", action="store_true")
    ap.add_argument("--no-grid-search", action="store_true")
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "search.json"))
    args = ap.parse_args(argv)

    from cnncodes import classify as C
    from cnncodes.store import load_codes

    report = {"machine": cpu_model(), "cores": os.cpu_count(), "n_jobs": args.n_jobs, "old_rev": args.old_rev,
              "old_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", args.old_rev], capture_output=True,
                                           text=True).stdout.strip(), "results": []}
    print(f"machine: {report['machine']}, {report['cores']} cores; old = {args.old_rev} ({report['old_commit'][:7]})")
    from joblib import Parallel, delayed

    # worker start-up and imports are not timed (nor in old): else the first search of the run pays them
    Parallel(n_jobs=args.n_jobs)(delayed(_warm)(i) for i in range(4))
    for cache in args.caches:
        for layer in args.layers:
            codes = load_codes(cache, layer)
            sp = C.make_split(codes.labels, codes.splits, codes.status, seed=0)
            X = C.make_normaliser("l2").fit_transform(np.nan_to_num(codes.X)).astype(np.float32)
            y = codes.labels
            res = {"cache": Path(cache).name, "layer": layer, "n": X.shape, "counts": sp.counts()}
            res["old"] = old_sweep(args.old_rev, X, y, sp, args.n_jobs, args.clf)
            res["new"] = {clf: new_sweep(X, y, sp, args.n_jobs, clf, 2) for clf in args.clf}
            if not args.no_grid_search:
                res["sklearn"] = sklearn_searches(X, y, sp, args.n_jobs, res["new"], args.clf)
            if args.solvers:
                res["solvers"] = solvers(X, y, sp)
            report["results"].append(res)
            _print(res)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"written: {args.out}")
    return 0


def _print(res: dict) -> None:
    print(f"\n{res['cache']} {res['layer']} {res['n']} {res['counts']}")
    print(f"  {'method':50s} {'C':>9s} {'fits':>5s} {'val':>7s} {'test':>7s} {'seconds':>8s}")
    rows = []
    for clf in res["new"]:
        rows += [(f"{clf}: old sweep", res["old"][clf]), (f"{clf}: new search", res["new"][clf])]
    rows += [(f"{clf}: {k}", v) for clf, d in res.get("sklearn", {}).items() for k, v in d.items()]
    for name, r in rows:
        split = f"  (search {r['search_s']:.2f} + refit {r['refit_s']:.2f})" if "refit_s" in r else ""
        print(f"  {name:50s} {r['C']:9.3g} {r['n_fits']:5d} {r['val']:7.4f} {r['test']:7.4f} {r['seconds']:8.2f}{split}")
    for clf, r in res["new"].items():
        print(f"  {clf} new search tried: " + ", ".join(f"{t['C']:.3g} ({t['phase'][0]}) {t['score']:.4f}"
                                                     for t in r["tried"]))
        print(f"  {clf} old sweep tried: " + ", ".join(f"{t['C']:.3g} {t['score']:.4f}"
                                                    for t in res["old"][clf].get("tried", [])))
        print(f"    {r['stop_reason']}")
    for row in res.get("solvers", []):
        print(f"  C={row['C']:g}: " + "; ".join(f"{k} {v['seconds']:.2f}s/{v['n_iter']} it{'' if v['converged'] else ' (not conv.)'}"
                                             for k, v in row.items() if k != "C"))


if __name__ == "__main__":
    sys.exit(main())
