"""The C sweep of the training code vs ``GridSearchCV(LinearSVC(), {"C": grid}, cv=3)``; fp16 vs fp32 codes.

Both sides get the same codes, the same train/test split and the same C grid
(``cnncodes.classify.DEFAULT_GRID``, 1e-4..1e4, 9 values), and are timed side by side in
one run on one machine (named in the output):

- **ours**: what ``scripts/train_svm.py`` does for one layer and ``--clf svm``:
  :func:`cnncodes.classify.sweep_C` on the drawn split's train part scored on its val part
  (val 15 %, test 20 %, as ``train_run``'s defaults), default settings (``n_jobs=-1``,
  early stop with patience 2), then :func:`cnncodes.classify.refit` on train+val;
- **baseline**: ``GridSearchCV(LinearSVC(), {"C": grid}, cv=3)`` fitted on the same
  train+val rows (sklearn defaults otherwise: ``dual="auto"``, ``tol=1e-4``,
  ``max_iter=1000``, refit on train+val), ``n_jobs=None`` as a user would write it, and
  ``n_jobs=-1`` too unless ``--no-baseline-jobs``. The baseline is given the same
  L2-normalised codes (the normalisation, < 1 s, is counted in its time), so that both
  solve the same problem and the accuracies compare.

Each reports the chosen C, the test accuracy of the refit model and the wall seconds;
the speed-up is baseline seconds / ours, measured at the same n.

Codes (``make_codes``): synthetic post-ReLU codes like AlexNet fc7. With
``rng = np.random.default_rng(seed)``: a random ``rank x d`` mixing matrix
``U ~ N(0, 1/rank)`` (rank 64), ``n_classes`` class centres ``~ N(0, sep^2 I_rank)``
(sep 0.5), labels uniform; each code is ``relu(U^T (centre_y + N(0, I_rank)) + N(0, 1) -
offset)`` in float32, with ``offset`` the 75 % quantile of the pre-activations, so about
75 % of the entries are zero (fc7 of AlexNet on natural images: 70-80 %). Class
structure lives in a low-rank subspace buried in isotropic noise; a linear SVM reaches
about 95 % and its val accuracy peaks at a moderate C and falls off at large C, as on
real codes. U, the centres and the offset depend on the seed only, so ``--baseline-n``
draws codes of the same distribution.

The baseline takes long at 50,000 x 4,096 (27 liblinear fits of 33k rows + a refit:
estimated well over 30 minutes on this machine); ``--baseline-n`` then measures it, and
ours, on fewer rows, and ours also at the full size; the report states the extrapolation.

fp16 vs fp32 (``--fp16``): the svm and softmax of ours trained on the same codes stored
as float16 (cast to float16 and back, exactly what the float16 cache stores) and as
float32; the test accuracy difference in percentage points, each with its own C sweep
(the whole pipeline: a flat val curve may let the two pick different C values), and with
the fp16 model refit at the C chosen on fp32 (the precision effect alone). ``--cache PATH --layers L``
runs it on real codes of a float32 cache (its recorded split, else the drawn one).

Usage::

    python benchmarks/bench_sweep.py                                  # 50,000 x 4,096
    python benchmarks/bench_sweep.py --baseline-n 20000               # baseline at 20k, ours at 20k and 50k
    python benchmarks/bench_sweep.py --quick                          # 10,000 x 1,024
    python benchmarks/bench_sweep.py --fp16-only --cache artifacts/codes/X.h5 --layers pool

Writes ``artifacts/bench/sweep.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from cnncodes import classify as C  # noqa: E402
from cnncodes.fileio import atomic_write_text  # noqa: E402
from _machine import cpu_model  # noqa: E402


def machine() -> dict:
    cpu = cpu_model()
    import sklearn
    from threadpoolctl import threadpool_info

    blas = sorted({f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
                   for i in threadpool_info() if i.get("user_api") == "blas"})
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "sklearn": sklearn.__version__, "blas": blas, "loadavg_at_start": load}


def make_codes(n: int, d: int, *, n_classes: int = 10, rank: int = 64, sep: float = 0.5, zero_frac: float = 0.75,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic post-ReLU codes (see the module docstring). float32 (n, d), int labels (n,)."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((rank, d), dtype=np.float32) / float(np.sqrt(rank))
    centres = rng.standard_normal((n_classes, rank), dtype=np.float32) * float(sep)
    # the offset depends on the seed only (a fixed sample), not on n
    probe = (rng.standard_normal((256, rank), dtype=np.float32) + centres[np.arange(256) % n_classes]) @ U
    probe += rng.standard_normal(probe.shape, dtype=np.float32)
    offset = float(np.quantile(probe, zero_frac))
    rng_rows = np.random.default_rng([seed, 1])
    y = rng_rows.integers(0, n_classes, n)
    X = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 8192):  # in blocks: no float32 temporaries of the full size
        b = min(n, a + 8192)
        Z = centres[y[a:b]] + rng_rows.standard_normal((b - a, rank), dtype=np.float32)
        blk = Z @ U
        blk += rng_rows.standard_normal(blk.shape, dtype=np.float32)
        blk -= offset
        np.maximum(blk, 0, out=blk)
        X[a:b] = blk
    return X, y


def split_of(y: np.ndarray, splits: np.ndarray | None = None, seed: int = 0) -> C.Split:
    n = len(y)
    return C.make_split(y, np.array([""] * n) if splits is None else splits, np.array(["ok"] * n), seed=seed)


def run_ours(X, y, sp: C.Split, *, clf: str = "svm", n_jobs=-1, early_stop=2, seed: int = 0) -> dict:
    """What train_run does for one layer and one classifier: sweep on val, refit on train+val, test once."""
    trval = np.concatenate([sp.train, sp.val])
    t0 = time.perf_counter()
    sw = C.sweep_C(X[sp.train], y[sp.train], X[sp.val], y[sp.val], clf=clf, norm="l2", grid=C.DEFAULT_GRID,
                   n_jobs=n_jobs, early_stop=early_stop, seed=seed)
    t1 = time.perf_counter()
    pipe, fit = C.refit(X[trval], y[trval], clf=clf, norm="l2", C=sw.best_C, seed=seed)
    t2 = time.perf_counter()
    acc = float(np.mean(pipe.predict(X[sp.test]) == y[sp.test]))
    return {"method": f"ours ({clf}, n_jobs={n_jobs})", "n": int(len(y)), "C": sw.best_C, "test_accuracy": acc,
            "val_accuracy": float(sw.scores[sw.best_index]), "seconds": t2 - t0, "sweep_seconds": t1 - t0,
            "refit_seconds": t2 - t1, "c_evaluated": int(sw.evaluated.sum()), "stopped_at": sw.stopped_at,
            "converged": bool(fit["converged"] and sw.converged.all()), "curve": sw.curve(), "notes": sw.notes}


def run_baseline(X, y, sp: C.Split, *, n_jobs=None) -> dict:
    """GridSearchCV(LinearSVC(), {"C": grid}, cv=3) on train+val of the same split, on L2-normalised codes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import normalize
    from sklearn.svm import LinearSVC

    trval = np.concatenate([sp.train, sp.val])
    t0 = time.perf_counter()
    Xn = normalize(X[trval])
    gs = GridSearchCV(LinearSVC(), {"C": list(C.DEFAULT_GRID)}, cv=3, n_jobs=n_jobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        gs.fit(Xn, y[trval])
    secs = time.perf_counter() - t0
    n_conv = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    acc = float(gs.score(normalize(X[sp.test]), y[sp.test]))
    return {"method": f"GridSearchCV(LinearSVC(), cv=3, n_jobs={n_jobs})", "n": int(len(y)),
            "C": float(gs.best_params_["C"]), "test_accuracy": acc, "cv_accuracy": float(gs.best_score_),
            "seconds": secs, "convergence_warnings": n_conv,
            "mean_fit_seconds": [float(s) for s in gs.cv_results_["mean_fit_time"]]}


def fp16_compare(X, y, sp: C.Split, clfs=("svm", "softmax"), seed: int = 0) -> list[dict]:
    """Test accuracy of ours on float32 codes vs the same codes through float16."""
    X16 = X.astype(np.float16).astype(np.float32)
    out = []
    trval = np.concatenate([sp.train, sp.val])
    keys = ("C", "test_accuracy", "val_accuracy", "seconds")
    for clf in clfs:
        a = run_ours(X, y, sp, clf=clf, seed=seed)
        b = run_ours(X16, y, sp, clf=clf, seed=seed)
        n_test = len(sp.test)
        # the precision effect alone: the fp16 codes' model at the C chosen on the fp32 codes
        pipe, _ = C.refit(X16[trval], y[trval], clf=clf, norm="l2", C=a["C"], seed=seed)
        same = float(np.mean(pipe.predict(X16[sp.test]) == y[sp.test]))
        out.append({"clf": clf, "n_test": n_test, "fp32": {k: a[k] for k in keys}, "fp16": {k: b[k] for k in keys},
                    "diff_pp": 100.0 * (b["test_accuracy"] - a["test_accuracy"]),
                    "fp16_at_fp32_C": {"C": a["C"], "test_accuracy": same},
                    "diff_pp_same_C": 100.0 * (same - a["test_accuracy"]),
                    "one_image_pp": 100.0 / n_test,
                    "val_curves": {"fp32": [q["score"] for q in a["curve"]], "fp16": [q["score"] for q in b["curve"]]}})
        print(f"  fp16 vs fp32, {clf}: test acc {a['test_accuracy']:.4f} (C={a['C']:g}) vs {b['test_accuracy']:.4f} "
              f"(C={b['C']:g}): {out[-1]['diff_pp']:+.3f} pp; at the same C={a['C']:g}: {same:.4f}, "
              f"{out[-1]['diff_pp_same_C']:+.3f} pp (one test image = {100.0 / n_test:.3f} pp)", flush=True)
        print(f"    val curves fp32 {_fmt_curve(a['curve'])}\n               fp16 {_fmt_curve(b['curve'])}", flush=True)
    return out


def _fmt_curve(curve) -> str:
    return " ".join("  -   " if q["score"] is None else f"{q['score']:.4f}" for q in curve)


def summarise(rows: list[dict], sizes: list[int]) -> list[str]:
    """The speed-up lines; with two sizes, the baseline's time at the larger one extrapolated (and said so)."""
    base = [r for r in rows if r["method"].startswith("GridSearchCV")]
    summary = []
    for b in base:
        summary.append(f"{b['method']} at n={b['n']}: ours is {b['speedup_ours']:.1f}x faster "
                       + (f"({b['speedup_ours_n_jobs_1']:.1f}x with n_jobs=1) " if "speedup_ours_n_jobs_1" in b
                          else "")
                       + f"(goal >= 5x), test accuracy {b['accuracy_diff_pp']:+.2f} pp (goal within 0.5 pp)")
    if base and len(sizes) == 2:
        small = [r for r in rows if r["method"].startswith("ours") and r["n"] == sizes[0]][0]
        big = [r for r in rows if r["method"].startswith("ours") and r["n"] == sizes[1]][0]
        grow = big["seconds"] / small["seconds"]
        lin = sizes[1] / sizes[0]
        for b in base:
            est = b["seconds"] * lin
            summary.append(
                f"EXTRAPOLATION (not measured): {b['method']} at n={sizes[1]} estimated at ~{est:.0f}s, its "
                f"{sizes[0]}-row time x {lin:.2f}, assuming its time grows linearly with the rows (each liblinear "
                f"pass does; its iteration counts may grow too); ours measured {big['seconds']:.1f}s there "
                f"(x{grow:.2f} its {sizes[0]}-row time): ~{est / big['seconds']:.1f}x")
    return summary


def table(rows: list[dict]) -> str:
    head = ["method", "n", "best C", "test acc", "seconds", "notes"]
    lines = []
    for r in rows:
        note = ""
        if "c_evaluated" in r:
            note = f"sweep {r['sweep_seconds']:.1f}s + refit {r['refit_seconds']:.1f}s, {r['c_evaluated']}/9 C fitted"
        elif "convergence_warnings" in r:
            note = f"{r['convergence_warnings']} ConvergenceWarning(s)"
        lines.append([r["method"], str(r["n"]), f"{r['C']:g}", f"{r['test_accuracy']:.4f}", f"{r['seconds']:.1f}",
                      note])
    w = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(k) for c, k in zip(cells, w)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * k for k in w]), *(fmt(x) for x in lines)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="rows of the synthetic codes (default 50,000)")
    p.add_argument("--d", type=int, default=4096, help="code width (default 4,096)")
    p.add_argument("--quick", action="store_true", help="10,000 x 1,024: a fast check")
    p.add_argument("--baseline-n", type=int, default=None,
                   help="measure the baseline (and ours) on this many rows; ours also at --n")
    p.add_argument("--no-baseline-jobs", action="store_true", help="skip the GridSearchCV n_jobs=-1 run")
    p.add_argument("--no-baseline", action="store_true", help="time ours only")
    p.add_argument("--no-serial", action="store_true", help="skip the run of ours with n_jobs=1")
    p.add_argument("--fp16", action="store_true", help="also compare fp16 vs fp32 codes (svm and softmax)")
    p.add_argument("--fp16-only", action="store_true", help="only the fp16 vs fp32 comparison")
    p.add_argument("--fp16-n", type=int, default=20_000, help="rows for the synthetic fp16 comparison (default 20,000)")
    p.add_argument("--cache", default=None, help="a float32 cache: run the fp16 comparison on its codes")
    p.add_argument("--layers", nargs="+", default=None, help="layer(s) of --cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "sweep.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d = 10_000, 1024
    if args.cache and not args.layers:
        p.error("--cache needs --layers")
    info = machine()
    print(f"machine: {info['host']}: {info['cpu']}, {info['cores']} cores; numpy {info['numpy']}, sklearn "
          f"{info['sklearn']}, BLAS {', '.join(info['blas'])}; load average at start {info['loadavg_at_start']}",
          flush=True)
    report: dict = {"machine": info, "argv": sys.argv[1:] if argv is None else list(argv),
                    "grid": list(C.DEFAULT_GRID), "generator": {"rank": 64, "sep": 0.5, "zero_frac": 0.75,
                                                                 "n_classes": 10, "seed": args.seed}}
    rows: list[dict] = []
    if not args.fp16_only:
        sizes = [args.n] if not args.baseline_n or args.baseline_n >= args.n else [args.baseline_n, args.n]
        for n in sizes:
            t = time.perf_counter()
            X, y = make_codes(n, args.d, seed=args.seed)
            sp = split_of(y, seed=args.seed)
            print(f"\ncodes {n} x {args.d}: {100 * np.mean(X == 0):.1f}% zeros, float32, made in "
                  f"{time.perf_counter() - t:.1f}s; split {sp.counts()}", flush=True)
            ours = run_ours(X, y, sp, seed=args.seed)
            rows.append(ours)
            print(f"  ours: C={ours['C']:g}, test {ours['test_accuracy']:.4f}, {ours['seconds']:.1f}s "
                  f"({ours['c_evaluated']} C fitted)", flush=True)
            o1 = None
            if not args.no_serial:  # the same with one worker: what parallel fits give on this machine now
                o1 = run_ours(X, y, sp, seed=args.seed, n_jobs=1)
                rows.append(o1)
                print(f"  ours, n_jobs=1: C={o1['C']:g}, test {o1['test_accuracy']:.4f}, {o1['seconds']:.1f}s",
                      flush=True)
            if not args.no_baseline and (n == sizes[0]):
                for jobs in ([None] if args.no_baseline_jobs else [None, -1]):
                    b = run_baseline(X, y, sp, n_jobs=jobs)
                    b["speedup_ours"] = b["seconds"] / ours["seconds"]
                    b["accuracy_diff_pp"] = 100.0 * (ours["test_accuracy"] - b["test_accuracy"])
                    if o1 is not None:
                        b["speedup_ours_n_jobs_1"] = b["seconds"] / o1["seconds"]
                    rows.append(b)
                    print(f"  {b['method']}: C={b['C']:g}, test {b['test_accuracy']:.4f}, {b['seconds']:.1f}s "
                          f"-> ours {b['speedup_ours']:.1f}x faster, accuracy {b['accuracy_diff_pp']:+.2f} pp",
                          flush=True)
            del X
        report["rows"] = rows
        print("\n" + table(rows))
        summary = summarise(rows, sizes)
        report["summary"] = summary
        print("\n".join(summary))
    if args.fp16 or args.fp16_only:
        if args.cache:
            from cnncodes.store import load_codes, read_info

            cinfo = read_info(args.cache)
            dtype = cinfo.spec.get("dtype")
            codes = load_codes(args.cache, args.layers)
            ok = codes.status == "ok"
            X, y = codes.X[ok], codes.labels[ok]
            sp = split_of(y, codes.splits[ok], seed=args.seed)
            src = {"cache": str(args.cache), "layers": args.layers, "stored_dtype": dtype, "shape": list(X.shape)}
            if dtype != "float32":
                print(f"warning: {args.cache} stores {dtype} codes: its float32 side is not the original", flush=True)
        else:
            X, y = make_codes(min(args.fp16_n, args.n), args.d, seed=args.seed)
            sp = split_of(y, seed=args.seed)
            src = {"synthetic": True, "shape": list(X.shape)}
        print(f"\nfp16 vs fp32 on {src}: split {sp.counts()}", flush=True)
        report["fp16"] = {"source": src, "results": fp16_compare(X, y, sp, seed=args.seed)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {}
    if args.fp16_only:
        key = "fp16__" + (f"{Path(args.cache).stem}__{'+'.join(args.layers)}" if args.cache else f"synthetic_d{args.d}")
    else:
        key = "quick" if args.quick else f"n{args.n}_d{args.d}" + (f"_baseline{args.baseline_n}" if args.baseline_n else "")
    old[key] = C._jsonable(report)
    atomic_write_text(out, json.dumps(old, indent=2) + "\n")
    print(f"\nwritten {out} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
