"""Extraction on a Ray cluster (issue 14), and the exactly-once shard protocol every engine uses.

The cluster tests start a real two-node Ray cluster (a head and a second node) on 127.0.0.1.
Ray replaces 127.0.0.1 with the machine's routable address unless that address does not
exist, so they run inside a private network namespace where only loopback exists
(``unshare -n`` + ``ip link set lo up``, as root): nothing can reach any other address. The
outer test re-executes this module's ``inner`` tests there, sharing one cluster; every process
started in that namespace is SIGKILLed by pid at the end. They skip when Ray is not installed
or ``unshare`` is not permitted. The cluster runs go through ``tests/ray_extract.py`` (slowed tasks,
a driver that pauses), so production code holds no test hook.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cnncodes import store
from conftest import FLOWERS, link_subset

REPO = Path(__file__).resolve().parents[1]
IN_NETNS = os.environ.get("CNNCODES_RAY_NETNS") == "1"
LAYERS = ["conv2", "fc1"]
HEAD_PORT, WORKER_PORT = 6390, 47001



def inner(test):
    """A test that runs only inside the namespace the outer test makes."""
    for mark in (pytest.mark.ray, pytest.mark.slow,
                 pytest.mark.skipif(not IN_NETNS, reason="runs inside the private network namespace of "
                                                         "test_ray_cluster_in_a_private_network_namespace")):
        test = mark(test)
    return test


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# --------------------------------------------------------------------------- outer runner


@pytest.mark.ray
@pytest.mark.slow
def test_ray_cluster_in_a_private_network_namespace():
    """Runs the ``inner`` tests below in a network namespace of their own (loopback only)."""
    if IN_NETNS:
        pytest.skip("already inside the namespace")
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'cnncodes[ray]')")
    if not _can_unshare():
        pytest.skip("unshare -n is not permitted here (needs root or unprivileged user namespaces)")
    env = {**os.environ, "CNNCODES_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m", "pytest",
           "-q", "-p", "no:cacheprovider", "-k", "inner", str(Path(__file__).resolve())]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert "3 passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-3000:]


# --------------------------------------------------------------------------- cluster helpers


def _netns_pids() -> list[int]:
    """Processes in this network namespace other than this one: those the tests started in it."""
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


def _raylet_pid(node_manager_port: int) -> int:
    for pid in _netns_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"raylet") and f"--node_manager_port={node_manager_port}".encode() in cmd:
            return pid
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


@pytest.fixture(scope="module")
def cluster():
    ifaces = [ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]]
    assert ifaces == ["lo"], f"not in a private network namespace (only lo may exist): {ifaces}"
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
           # a dead node is noticed in seconds, not the default half minute
           "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "4"}
    ray = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(HEAD_PORT),
                        "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", str(tmp),
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{HEAD_PORT}", "--node-ip-address", "127.0.0.1",
                        "--num-cpus", "1", "--node-manager-port", str(WORKER_PORT)],
                       env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{HEAD_PORT}"
    finally:
        for pid in _netns_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _cli(data, out, *extra, pause_after: int | None = None) -> list[str]:
    """scripts/extract.py, or for a Ray run tests/ray_extract.py: tasks slowed by 0.3 s (long enough to kill a
    node under them), the driver paused after ``pause_after`` batches."""
    script = ["scripts/extract.py"]
    if "ray" in extra:
        script = ["tests/ray_extract.py", "0.3", str(pause_after or 0)]
    return [sys.executable, *script, str(data), "--model", "tiny", "--weights", "none",
            "--layers", *LAYERS, "--out", str(out), "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--no-progress", *extra]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """40 real flower photos and their codes from the local engine (a single process)."""
    root = tmp_path_factory.mktemp("ray-data")
    data = link_subset(FLOWERS, root / "flowers", 10, ["daisy", "dandelion", "rose", "tulip"])
    r = subprocess.run(_cli(data, root / "local"), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return data, Path(r.stdout.strip().splitlines()[-1])


def assert_same_file(path: Path, ref: Path) -> None:
    """Same rows in the same order and bitwise equal codes of every layer."""
    with h5py.File(path) as f, h5py.File(ref) as g:
        assert f.attrs["rows_sha256"] == g.attrs["rows_sha256"]
        assert f["paths"].asstr()[:].tolist() == g["paths"].asstr()[:].tolist()
        for key in LAYERS:
            a, b = f[f"codes/{key}"][:], g[f"codes/{key}"][:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key
    assert len(store.load_codes(path, "fc1").paths) == 40


def _claims(out: Path) -> int:
    return sum(1 for p in out.glob("*.h5.partial/claim-*") if ".tmp." not in p.name)


# --------------------------------------------------------------------------- inner tests (in the namespace)


@inner
def test_inner_unreachable_address_is_a_clear_fast_error(tmp_path, reference):
    data, _ref = reference
    t0 = time.monotonic()
    r = subprocess.run(_cli(data, tmp_path / "out", "--engine", "ray", "--ray-address", "127.0.0.1:6399"), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert "127.0.0.1:6399" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert took < 60, took  # a refused connection is immediate; this is Python's start-up on a busy machine
    assert not (tmp_path / "out").exists()  # checked before any work: no cache, no .partial folder


@inner
def test_inner_driver_killed_then_the_same_command_resumes(cluster, reference, tmp_path):
    data, ref = reference
    out = tmp_path / "out"
    p = subprocess.Popen(_cli(data, out, "--engine", "ray", "--ray-address", cluster, pause_after=3), cwd=REPO,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        for line in p.stdout:
            if line.startswith("CNNCODES_PAUSED"):
                break
        assert line.startswith("CNNCODES_PAUSED 3"), line
    finally:
        p.kill()
        p.wait()
    assert _claims(out) >= 3
    args = _cli(data, out, "--engine", "ray", "--ray-address", cluster)
    r = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Resuming" in r.stderr, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert_same_file(path, ref)
    assert not store.partial_dir(path).exists()


@inner
def test_inner_worker_node_killed_mid_run_gives_the_same_file(cluster, reference, tmp_path):
    """SIGKILL the second node's raylet while tasks run there: they rerun on the head, codes unchanged."""
    data, ref = reference
    out = tmp_path / "out"
    raylet = _raylet_pid(WORKER_PORT)
    p = subprocess.Popen(_cli(data, out, "--engine", "ray", "--ray-address", cluster), cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while _claims(out) < 4 and p.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        done_at_kill = _claims(out)
        os.kill(raylet, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    assert 4 <= done_at_kill < 20, done_at_kill  # killed mid-run (20 batches of 2)
    path = Path(stdout.strip().splitlines()[-1])
    assert_same_file(path, ref)
    assert not store.partial_dir(path).exists()


# --------------------------------------------------------------------------- exactly once (no cluster needed)


def _task_spec(pdir: Path, data: Path):
    from cnncodes.engine_ray import task_spec
    from cnncodes.extraction._plan import plan_extraction
    from cnncodes.extraction._spec import ExtractConfig, RunOptions

    config = ExtractConfig("tiny", tuple(LAYERS), "none")
    run = RunOptions(pdir.parent, device="cpu")
    plan = plan_extraction(data, config, run)  # the plan of some folder: its spec is what a task needs
    return task_spec(plan, config, run, pdir)


def test_a_task_run_twice_leaves_exactly_one_shard(flowers_small, tmp_path):
    from cnncodes.engine_ray import run_batch
    from cnncodes.workdir import _read_shard, _scan_shards

    pdir = tmp_path / "x.h5.partial"
    pdir.mkdir()
    paths = sorted(str(p) for p in flowers_small.rglob("*.jpg"))[:3]
    rows = np.array([5, 6, 7])
    first = run_batch(_task_spec(pdir, flowers_small), 0, 2, rows, paths, LAYERS)
    again = run_batch(_task_spec(pdir, flowers_small), 0, 2, rows, paths, LAYERS)  # a retry of the same batch
    assert again.shard == first.shard and first.n == 3
    assert sorted(p.name for p in pdir.iterdir()) == sorted([first.shard, "claim-0_000002"])
    sh = _read_shard(pdir / first.shard)
    assert sh["rows"].tolist() == [5, 6, 7] and sh["codes/fc1"].dtype == np.float16
    assert _scan_shards(pdir) == {(0, 2): pdir / first.shard}


def test_the_first_complete_attempt_wins_when_attempts_differ(tmp_path):
    """Two attempts at one batch with different bytes (a GPU, a retry on another node): one shard counts."""
    from cnncodes.workdir import _read_shard, _scan_shards, _write_shard

    pdir = tmp_path / "x.h5.partial"
    pdir.mkdir()
    rows = np.arange(4)
    codes_a = {"fc1": np.full((4, 3), 1.0, np.float16)}
    codes_b = {"fc1": np.full((4, 3), 1.0009765625, np.float16)}  # one ulp away
    a = _write_shard(pdir, 0, 0, rows, ["ok"] * 4, [""] * 4, codes_a)
    b = _write_shard(pdir, 0, 0, rows, ["ok"] * 4, [""] * 4, codes_b)
    assert b == a
    assert sorted(p.name for p in pdir.glob("shard-*")) == [a.name]
    assert _read_shard(_scan_shards(pdir)[(0, 0)])["codes/fc1"].tobytes() == codes_a["fc1"].tobytes()


def test_scan_drops_an_unpublished_claim_and_other_attempts(tmp_path, caplog):
    """A writer killed between its claim and its rename, and a stray second shard, as the driver finds them."""
    from cnncodes.workdir import _scan_shards, _write_shard

    pdir = tmp_path / "x.h5.partial"
    pdir.mkdir()
    rows = np.arange(2)
    won = _write_shard(pdir, 0, 0, rows, ["ok"] * 2, [""] * 2, {"fc1": np.zeros((2, 3), np.float16)})
    stray = pdir / won.name.replace(won.name.split("-")[-1], "0123456789abcdef.npz")
    shutil.copy(won, stray)  # same batch, not the claimed one (e.g. from a run without claims)
    (pdir / "claim-0_000001").write_text("shard-0_000001-2-fedcba9876543210.npz")  # never renamed
    (pdir / "shard-0_000001-2-fedcba9876543210.npz.tmp.host.1.2").write_bytes(b"half")
    with caplog.at_level("INFO"):
        found = _scan_shards(pdir)
    assert found == {(0, 0): won}
    assert sorted(p.name for p in pdir.iterdir()) == sorted([won.name, "claim-0_000000"])
    again = _write_shard(pdir, 0, 1, rows, ["ok"] * 2, [""] * 2, {"fc1": np.ones((2, 3), np.float16)})
    assert _scan_shards(pdir) == {(0, 0): won, (0, 1): again}


def _in_process_cluster(monkeypatch):
    """``engine_ray.run`` with every task run here, in order, through the real task body (``run_batch``,
    pickled and unpickled like Ray's arguments): the whole driver path of the Ray engine without a cluster."""
    import pickle

    from cnncodes import engine_ray

    def run(address, ts, work, on_batch):
        res = engine_ray.RayRun()
        for item in work:
            br = engine_ray.run_batch(*pickle.loads(pickle.dumps((ts, *item))))
            res.n_computed += br.n
            res.map_shapes.update(br.map_shapes)
            on_batch(br)
        return res

    monkeypatch.setattr(engine_ray, "run", run)


@pytest.mark.parametrize("model,layers,options", [
    ("tiny", LAYERS, {"views": "flip", "input_size": 48, "batch_size": 6, "keep_views": True}),
    ("tiny", ["conv2"], {"views": "multiscale", "combine": "max", "pool": "avg2x2", "decoder": "pil",
                         "batch_size": 9, "dtype": "float32"}),
    pytest.param("alexnet", ["fc7", "conv5"], {"fc_as_conv": True, "input_size": 256, "batch_size": 4},
                 marks=pytest.mark.slow),
])
def test_the_ray_engine_gives_the_local_engines_codes(flowers_small, tmp_path, monkeypatch, model, layers, options):
    """Views combined (and kept), another input size, fc layers as convolutions, a pixel limit some images
    exceed, the plan's images per batch (batch_size counts views): the Ray engine's file equals the local
    engine's."""
    from PIL import Image

    from cnncodes.extraction import extract

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)).save(flowers_small / "rose" / "big.png")
    # the flower photos have 227 x 227 = 51529 px: the limit refuses only big.png
    common = dict(weights="none", device="cpu", workers=0, max_pixels=60_000, error_budget=1.0, **options)
    local = extract(flowers_small, model, layers, out=tmp_path / "local", **common)
    _in_process_cluster(monkeypatch)
    on_ray = extract(flowers_small, model, layers, out=tmp_path / "ray", engine="ray", **common)
    assert on_ray.n_computed == local.n_computed == len(store.load_codes(local.path, local.keys[0]).paths)
    assert on_ray.n_failed == local.n_failed == 1 and on_ray.n_computed == 13  # the pixel limit refused big.png
    with h5py.File(on_ray.path) as f, h5py.File(local.path) as g:
        assert f.attrs["fingerprint"] == g.attrs["fingerprint"]
        assert f["status"].asstr()[:].tolist() == g["status"].asstr()[:].tolist()
        assert on_ray.view_keys == local.view_keys == ([f"{k}#views" for k in local.keys] if "keep_views" in options
                                                       else [])
        for key in local.keys + local.view_keys:
            a, b = store.load_codes(on_ray.path, key).X, store.load_codes(local.path, key).X
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
            assert dict(f[f"codes/{key}"].attrs)["map_shape"].tolist() == dict(g[f"codes/{key}"].attrs)["map_shape"].tolist()
            failed = g["status"].asstr()[:] != "ok"  # big.png: NaN codes, its views included
            assert np.isnan(a[failed]).all() and np.isfinite(a[~failed]).all(), key


def test_a_malformed_ray_address_is_a_usage_error(flowers_small, tmp_path, capsys):
    from cnncodes.cli_extract import main

    rc = main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out",
               str(tmp_path / "out"), "--engine", "ray", "--ray-address", "head node:abc"])
    err = capsys.readouterr().err
    assert rc == 2 and "argument --ray-address: must be HOST:PORT" in err and "Got 'head node:abc'" in err, err
    rc = main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out",
               str(tmp_path / "out"), "--ray-address", "127.0.0.1:6379"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ray-address 127.0.0.1:6379 goes with --engine ray" in err, err
    rc = main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out",
               str(tmp_path / "out"), "--engine", "spark"])
    assert rc == 2 and "--engine" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_engine_ray_without_ray_installed_says_how_to_get_it(flowers_small, tmp_path, monkeypatch):
    from cnncodes.errors import UsageError
    from cnncodes.extraction import extract

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'cnncodes\[ray\]'"):
        extract(flowers_small, "tiny", ["fc1"], weights="none", out=tmp_path / "out", engine="ray")
    assert not (tmp_path / "out").exists()
