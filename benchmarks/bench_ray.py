"""Overhead of ``--engine ray`` against the local engine on one machine, and the node-kill outcome.

Runs itself inside a private network namespace (``unshare -n``, loopback only, as root), starts a
two-node Ray cluster on 127.0.0.1 (head + second node, ``--num-cpus`` each), and times
``scripts/extract.py`` on the same images with ``--engine local`` and ``--engine ray`` at two
batch sizes (start-up = the fixed part, per batch = the slope), then SIGKILLs the second node's
raylet mid-run and checks the file against the local one. Every process started in the namespace
is SIGKILLed by pid at the end.

    python benchmarks/bench_ray.py --images 128 --model tiny   # best of 2 runs per figure
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"
HEAD, WORKER_PORT = "127.0.0.1:6391", 47011
REPEATS = 2


def _in_netns() -> bool:
    return [ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]] == ["lo"]


def _netns_pids() -> list[int]:
    mine = os.readlink("/proc/self/ns/net")
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if os.readlink(d / "ns" / "net") == mine:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _raylet(port: int) -> int:
    for pid in _netns_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[0].endswith(b"raylet") and f"--node_manager_port={port}".encode() in cmd:
            return pid
    raise RuntimeError("worker raylet not found")


def _data(root: Path, n: int) -> Path:
    classes = sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())
    per = -(-n // len(classes))
    k = 0
    for c in classes:
        (root / c).mkdir(parents=True)
        for f in sorted((FLOWERS / c).iterdir())[:per]:
            if k < n:
                os.symlink(f, root / c / f.name)
                k += 1
    return root


def _extract(data, out, model, batch, engine, env, popen=False):
    args = [sys.executable, "scripts/extract.py", str(data), "--model", model, "--weights", "none" if model == "tiny"
            else "default", "--layers", *(["fc1"] if model == "tiny" else ["pool"]), "--out", str(out),
            "--batch-size", str(batch), "--device", "cpu", "--no-progress", "--engine", engine,
            *(["--ray-address", HEAD] if engine == "ray" else [])]
    if popen:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    best = None
    for rep in range(REPEATS):  # the best of REPEATS fresh runs (a new --out each time: no cache hit)
        run_args = [a if a != str(out) else f"{out}-{rep}" for a in args]
        t0 = time.perf_counter()
        r = subprocess.run(run_args, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        t = time.perf_counter() - t0
        best = t if best is None else min(best, t)
    return best, Path(r.stdout.strip().splitlines()[-1])


def _same(a: Path, b: Path) -> bool:
    import h5py

    with h5py.File(a) as f, h5py.File(b) as g:
        return (f.attrs["rows_sha256"] == g.attrs["rows_sha256"]
                and all(f[f"codes/{k}"][:].tobytes() == g[f"codes/{k}"][:].tobytes() for k in f["codes"]))


def main_in_netns(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "4"}
    ray = str(Path(sys.executable).with_name("ray"))
    res: dict = {"images": args.images, "model": args.model, "cpus_per_node": args.cpus}
    try:
        data = _data(tmp / "data", args.images)
        for b in args.batches:  # local first: the same machine with no cluster running
            t, ref = _extract(data, tmp / f"local{b}", args.model, b, "local", env)
            res[f"local_b{b}_s"] = round(t, 2)
        t0 = time.perf_counter()
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", HEAD.split(":")[1],
                        "--num-cpus", str(args.cpus), "--include-dashboard", "false", "--temp-dir", str(tmp / "r"),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True)
        res["ray_start_head_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        subprocess.run([ray, "start", "--address", HEAD, "--node-ip-address", "127.0.0.1", "--num-cpus",
                        str(args.cpus), "--node-manager-port", str(WORKER_PORT)], env=env, check=True,
                       capture_output=True)
        res["ray_start_worker_s"] = round(time.perf_counter() - t0, 2)
        for b in args.batches:
            t, path = _extract(data, tmp / f"ray{b}", args.model, b, "ray", env)
            res[f"ray_b{b}_s"] = round(t, 2)
            res[f"ray_b{b}_equal_to_local"] = _same(path, tmp / f"local{b}-0" / path.name)
        lo, hi = min(args.batches), max(args.batches)
        nb = {b: -(-args.images // b) for b in args.batches}
        for eng in ("local", "ray"):
            slope = (res[f"{eng}_b{lo}_s"] - res[f"{eng}_b{hi}_s"]) / (nb[lo] - nb[hi])
            res[f"{eng}_per_batch_s"] = round(slope, 3)
            res[f"{eng}_fixed_s"] = round(res[f"{eng}_b{hi}_s"] - slope * nb[hi], 2)
        # the kill: the second node's raylet SIGKILLed once a quarter of the batches are done
        b = lo
        p = _extract(data, tmp / "kill", args.model, b, "ray", env, popen=True)
        t0 = time.perf_counter()
        while len(list((tmp / "kill").glob("*.partial/claim-?_??????"))) < nb[b] // 4 and p.poll() is None:
            time.sleep(0.02)
        res["kill_after_batches"] = len(list((tmp / "kill").glob("*.partial/claim-?_??????")))
        os.kill(_raylet(WORKER_PORT), signal.SIGKILL)
        out, err = p.communicate()
        res["kill_run_s"] = round(time.perf_counter() - t0, 2)
        res["kill_exit"] = p.returncode
        if p.returncode == 0:
            path = Path(out.strip().splitlines()[-1])
            res["kill_equal_to_local"] = _same(path, tmp / f"local{b}-0" / path.name)
        else:
            res["kill_stderr"] = err[-2000:]
    finally:
        for pid in _netns_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--model", default="tiny", choices=["tiny", "efficientnet_lite0"])
    ap.add_argument("--batches", type=int, nargs=2, default=[2, 32], help="two batch sizes (per-batch slope)")
    ap.add_argument("--cpus", type=int, default=1, help="--num-cpus of each Ray node")
    args = ap.parse_args()
    if not _in_netns():
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
        return subprocess.run(cmd).returncode
    print(json.dumps(main_in_netns(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
