"""Soak test of crash-safe extraction: SIGKILL ``scripts/extract.py`` at random moments, resume, compare.

A clean reference extraction is run once (a subprocess, timed: ``T`` seconds). Then, in a
separate out folder, the same command is started again and again and killed with SIGKILL
(its whole process group: DataLoader workers included) after a delay drawn uniformly in
``[0, T]``, until a run completes on its own. The completed cache is compared with the
reference, the out folder is emptied, and a new cycle starts, until ``--kills`` kills were
survived. Nothing but the command line is shared between runs: each resume starts cold.

For each kill the phase it hit is recorded: ``startup`` (no new shard yet: imports, planning,
model build), ``extracting`` (shards were being written), ``consolidating`` (the temporary
HDF5 file existed), ``cleanup`` (the cache file was in place and the ``.partial`` folder not
yet removed). Each completed cache is checked, against the reference, by path:

- rows lost (reference paths missing), rows duplicated (a path twice), rows misaligned
  (a position whose path or label differs from the reference's), rows whose codes are not
  bitwise equal (any layer, stored dtype, NaN compared as bytes);
- leftovers in the out folder after completion (``.partial``, lock, temporary files);
- every completing run must exit 0 and print the cache path as its last stdout line; any
  other exit of an unkilled run is an error.

Usage::

    python benchmarks/soak.py --kills 50                                # tiny, 300 flowers5 images
    python benchmarks/soak.py --kills 50 --model efficientnet_lite0 --weights default --layers pool --per-class 40

Writes ``artifacts/bench/soak.json`` (``--json``) and prints a summary table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"

from cnncodes import store

DEFAULT_LAYERS = {"tiny": ["conv2", "fc1"], "alexnet": ["fc7"], "efficientnet_lite0": ["pool"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50, help="SIGKILLs to survive (default 50)")
    p.add_argument("--data", default=None, help="image folder (default: --per-class links per flowers5 class)")
    p.add_argument("--per-class", type=int, default=60, help="images per flowers5 class when --data is not given")
    p.add_argument("--model", default="tiny")
    p.add_argument("--weights", default="none")
    p.add_argument("--layers", nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-runs", type=int, default=1000, help="safety stop")
    p.add_argument("--json", default=str(REPO / "artifacts" / "bench" / "soak.json"))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return p.parse_args(argv)


def link_flowers(dst: Path, per_class: int) -> Path:
    if not FLOWERS.is_dir():
        sys.exit(f"soak.py: {FLOWERS} is not here; pass --data DIR")
    for cls in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir()):
        (dst / cls).mkdir(parents=True, exist_ok=True)
        files = sorted(f for f in os.listdir(FLOWERS / cls) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        for f in files[:per_class]:
            os.symlink(FLOWERS / cls / f, dst / cls / f)
    return dst


def code_digest() -> str:
    """sha256 of the package's modules: someone editing them mid-soak would mix code versions. (All of them,
    not a list of the extractor's files: such a list went stale when modules became packages.)"""
    import hashlib

    h = hashlib.sha256()
    root = REPO / "cnncodes"
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def git_head() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def command(args, data: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "extract.py"), str(data), "--model", args.model,
            "--weights", args.weights, "--layers", *args.layers, "--out", str(out), "--batch-size",
            str(args.batch_size), "--workers", str(args.workers), "--device", args.device, "--no-progress"]


def snapshot(out: Path) -> dict:
    """What lies in ``out``: shard names, temporary files, cache files, partial folders."""
    return {
        "shards": {p.name for p in out.glob("*.h5.partial/shard-*.npz")},
        "tmp": [p.name for p in out.glob(".*.h5.*.tmp")],
        "h5": [p.name for p in out.glob("*.h5")],
        "partial": [p.name for p in out.glob("*.h5.partial")],
        "trash": [p.name for p in out.glob("*.h5.partial.trash-*")],
    }


def compare(path: Path, ref: Path, layers: list[str]) -> dict:
    """Row-by-row comparison of a cache with the reference (by path and by position)."""
    got_rows, ref_rows = store.read_rows(path), store.read_rows(ref)
    gp, rp = list(got_rows["paths"]), list(ref_rows["paths"])
    res = {
        "rows": len(gp),
        "rows_lost": len(set(rp) - set(gp)),
        "rows_extra": len(set(gp) - set(rp)),
        "rows_duplicated": len(gp) - len(set(gp)),
        "rows_misaligned": 0,
        "rows_codes_differ": 0,
        "verified": True,
    }
    n = min(len(gp), len(rp))
    mis = sum(1 for i in range(n) if gp[i] != rp[i] or got_rows["labels"][i] != ref_rows["labels"][i]
              or got_rows["status"][i] != ref_rows["status"][i])
    res["rows_misaligned"] = mis + abs(len(gp) - len(rp))
    where = {p: i for i, p in enumerate(gp)}
    differ = set()
    for key in layers:
        try:
            got = store.load_codes(path, key, dtype=None)  # verifies the sha256 of rows and codes
        except store.CacheError as e:
            res["verified"] = False
            res["error"] = str(e)
            return res
        exp = store.load_codes(ref, key, dtype=None)
        for j, p in enumerate(rp):
            i = where.get(p)
            if i is None:
                continue
            if got.X[i].dtype != exp.X[j].dtype or got.X[i].tobytes() != exp.X[j].tobytes():
                differ.add(p)
    res["rows_codes_differ"] = len(differ)
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    args.layers = args.layers or DEFAULT_LAYERS.get(args.model)
    if not args.layers:
        sys.exit("soak.py: give --layers for this model")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="cnncodes-soak-"))
    env = dict(os.environ, CNNCODES_CACHE_DIR=str(tmp / "cnncodes-cache"), PYTHONUNBUFFERED="1")
    data = Path(args.data).resolve() if args.data else link_flowers(tmp / "flowers", args.per_class)
    ref_out, out = tmp / "ref", tmp / "out"
    code0, head0 = code_digest(), git_head()
    try:
        # ---- clean reference
        t0 = time.perf_counter()
        r = subprocess.run(command(args, data, ref_out), cwd=REPO, env=env, capture_output=True, text=True, check=False)
        t_clean = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            sys.exit(f"soak.py: the clean reference run failed (exit {r.returncode})")
        ref = Path(r.stdout.strip().splitlines()[-1])
        n_images = store.read_info(ref).n_rows
        print(f"reference: {n_images} images, {args.model} {' '.join(args.layers)}, clean run {t_clean:.1f} s "
              f"(whole process); kills uniform in [0, {t_clean:.1f}] s; seed {seed}", flush=True)

        kills, cycles, runs, errors = [], [], 0, []
        cycle_kills = 0
        while len(kills) < args.kills and runs < args.max_runs:
            before = snapshot(out) if out.exists() else {"shards": set(), "tmp": [], "h5": [], "partial": [], "trash": []}
            delay = rng.uniform(0, t_clean)
            t_start = time.perf_counter()
            p = subprocess.Popen(command(args, data, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
            runs += 1
            try:
                stdout, stderr = p.communicate(timeout=delay)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
            if not finished:
                os.killpg(p.pid, signal.SIGKILL)  # the extraction and its DataLoader workers, all at once
                p.communicate()
                after = snapshot(out) if out.exists() else {"shards": set(), "tmp": [], "h5": [], "partial": [], "trash": []}
                new = len(after["shards"] - before["shards"])
                if set(after["tmp"]) - set(before["tmp"]):
                    phase = "consolidating"
                elif after["h5"] and (after["partial"] or after["trash"]) and not before["h5"]:
                    phase = "cleanup"
                elif new:
                    phase = "extracting"
                else:
                    phase = "startup"
                prog = store.partial_progress(out / after["partial"][0][: -len(".partial")]) if after["partial"] else None
                kills.append({"cycle": len(cycles), "delay_s": round(delay, 3), "phase": phase, "new_shards": new,
                              "progress": list(prog) if prog else None})
                cycle_kills += 1
                continue
            # ---- this run completed on its own
            wall = time.perf_counter() - t_start
            if p.returncode != 0:
                errors.append({"cycle": len(cycles), "exit": p.returncode, "stderr": stderr[-2000:]})
                print(f"run {runs}: exit {p.returncode}\n{stderr[-2000:]}", file=sys.stderr, flush=True)
                if len(errors) > 5:
                    break
                continue
            path = Path(stdout.strip().splitlines()[-1])
            resumed = [ln for ln in stderr.splitlines() if "Resuming" in ln]
            cmp = compare(path, ref, args.layers)
            left = snapshot(out)
            cmp.update({
                "cycle": len(cycles), "kills": cycle_kills, "final_run_s": round(wall, 2),
                "resumed_msg": resumed[0] if resumed else "",
                "leftovers": left["tmp"] + left["partial"] + left["trash"] + [p.name for p in out.glob("*.lock")],
                "hit": "cache hit" in stderr,
            })
            cycles.append(cmp)
            print(f"cycle {len(cycles)}: {cycle_kills} kills survived "
                  f"({', '.join(k['phase'] for k in kills[-cycle_kills:]) if cycle_kills else '-'}); "
                  f"lost {cmp['rows_lost']}, dup {cmp['rows_duplicated']}, misaligned {cmp['rows_misaligned']}, "
                  f"codes differ {cmp['rows_codes_differ']}, leftovers {cmp['leftovers'] or 'none'}", flush=True)
            shutil.rmtree(out)
            cycle_kills = 0

        # a last cycle cut short by --kills: finish it and check it too
        if cycle_kills:
            r = subprocess.run(command(args, data, out), cwd=REPO, env=env, capture_output=True, text=True, check=False)
            runs += 1
            if r.returncode != 0:
                errors.append({"cycle": len(cycles), "exit": r.returncode, "stderr": r.stderr[-2000:]})
            else:
                path = Path(r.stdout.strip().splitlines()[-1])
                cmp = compare(path, ref, args.layers)
                left = snapshot(out)
                cmp.update({"cycle": len(cycles), "kills": cycle_kills, "final_run_s": None,
                            "resumed_msg": next((ln for ln in r.stderr.splitlines() if "Resuming" in ln), ""),
                            "leftovers": left["tmp"] + left["partial"] + left["trash"] + [p.name for p in out.glob("*.lock")],
                            "hit": "cache hit" in r.stderr})
                cycles.append(cmp)
                print(f"cycle {len(cycles)}: {cycle_kills} kills survived; lost {cmp['rows_lost']}, "
                      f"dup {cmp['rows_duplicated']}, misaligned {cmp['rows_misaligned']}, "
                      f"codes differ {cmp['rows_codes_differ']}, leftovers {cmp['leftovers'] or 'none'}", flush=True)

        survived = sum(c["kills"] for c in cycles if c["verified"] and not (
            c["rows_lost"] or c["rows_duplicated"] or c["rows_misaligned"] or c["rows_codes_differ"]))
        phases = {ph: sum(1 for k in kills if k["phase"] == ph)
                  for ph in ("startup", "extracting", "consolidating", "cleanup")}
        summary = {
            "kills": len(kills),
            "kills_survived": survived,
            "cycles": len(cycles),
            "runs": runs,
            "rows_lost": sum(c["rows_lost"] for c in cycles),
            "rows_duplicated": sum(c["rows_duplicated"] for c in cycles),
            "rows_misaligned": sum(c["rows_misaligned"] for c in cycles),
            "rows_codes_differ": sum(c["rows_codes_differ"] for c in cycles),
            "caches_unverified": sum(1 for c in cycles if not c["verified"]),
            "cycles_with_leftovers": sum(1 for c in cycles if c["leftovers"]),
            "run_errors": len(errors),
            "kills_by_phase": phases,
        }
        code1 = code_digest()
        report = {
            "git_head": head0, "code_sha256": code0, "code_changed_during_soak": code1 != code0,
            "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "extract_command": " ".join(command(args, data, Path("OUT"))),
            "seed": seed, "images": n_images, "model": args.model, "layers": args.layers,
            "batch_size": args.batch_size, "workers": args.workers, "clean_run_s": round(t_clean, 2),
            "machine": f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": summary, "cycles": cycles, "kills": kills, "errors": errors,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))

        print()
        print(f"{'soak':<34} {'value':>8}")
        for k in ("kills", "kills_survived", "cycles", "runs", "rows_lost", "rows_duplicated", "rows_misaligned",
                  "rows_codes_differ", "caches_unverified", "cycles_with_leftovers", "run_errors"):
            print(f"{k:<34} {summary[k]:>8}")
        for ph, v in phases.items():
            print(f"{'kills during ' + ph:<34} {v:>8}")
        print(f"\n{n_images} images, {args.model} {' '.join(args.layers)}, batch {args.batch_size}, "
              f"workers {args.workers}, clean run {t_clean:.1f} s, seed {seed}")
        print(f"code: git {head0}, extraction modules sha256 {code0}"
              + ("" if code1 == code0 else f"; CHANGED during the soak (now {code1}): results mix code versions"))
        print(f"written {args.json}")
        ok = (survived == len(kills) and not errors and not summary["cycles_with_leftovers"]
              and not summary["caches_unverified"] and code1 == code0)
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
