"""Robustness of extraction (issue 4): every fault is provoked for real and the values are checked.

Kills are real ``SIGKILL``s of ``scripts/extract.py`` subprocesses, paused at a chosen shard by the
test hook ``CNNCODES_TEST_PAUSE_AFTER_SHARDS`` or killed at a random moment; bad images are
crafted here with Pillow; ``ENOSPC`` is injected by monkeypatching the writers.

The ``tiny`` backbone with random weights (``--weights none``) keeps every run fast; the
subprocesses use ``--workers 0``. Resumed codes are compared bitwise with a clean run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnncodes import store
from cnncodes.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheLockedError,
    CacheMismatchError,
    ErrorBudgetExceeded,
    ExtractionWriteError,
    WeightsError,
)

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "datasets" / "flowers5"
LAYERS = ["conv2", "fc1"]
BATCH = 4

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def _need_flowers() -> None:
    if not FLOWERS.is_dir():
        pytest.skip(f"real images {FLOWERS} are not here (they lie beside the repo in ../shared/datasets)")


def _flower_files(cls: str) -> list[Path]:
    return sorted(p for p in (FLOWERS / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def make_data(root: Path, per_class: int = 5, classes=("daisy", "rose", "sunflower", "tulip"), offset: int = 0) -> Path:
    """An image folder of symbolic links to real flower photos (nothing is copied)."""
    _need_flowers()
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in _flower_files(cls)[offset:offset + per_class]:
            os.symlink(f, root / cls / f.name)
    return root


def add_image(data: Path, cls: str = "daisy", index: int = 200) -> Path:
    """Link one more flower photo into ``data/cls`` (an image the list did not hold)."""
    f = _flower_files(cls)[index]
    dst = data / cls / f.name
    os.symlink(f, dst)
    return dst


def run_extract(data, out, layers=LAYERS, **kw):
    """In-process extraction with the settings the subprocesses use."""
    from cnncodes.extract import extract

    kw.setdefault("weights", "none")
    kw.setdefault("batch_size", BATCH)
    return extract(data, "tiny", layers, out=out, workers=0, device="cpu", **kw)


def cli_args(data, out, *extra, layers=LAYERS) -> list[str]:
    return [sys.executable, "scripts/extract.py", str(data), "--model", "tiny", "--weights", "none",
            "--layers", *layers, "--out", str(out), "--workers", "0", "--batch-size", str(BATCH),
            "--device", "cpu", "--no-progress", *extra]


def env_for(tmp_path: Path, pause: int | None = None) -> dict:
    env = dict(os.environ)
    env["CNNCODES_CACHE_DIR"] = str(tmp_path / "cnncodes-cache")
    env.pop("CNNCODES_TEST_PAUSE_AFTER_SHARDS", None)
    if pause is not None:
        env["CNNCODES_TEST_PAUSE_AFTER_SHARDS"] = str(pause)
    return env


class Proc:
    """A ``scripts/extract.py`` subprocess with stdout read line by line and stderr in a file."""

    def __init__(self, args, env, errfile: Path, timeout: float = 120):
        self.errfile = errfile
        self._err = open(errfile, "wb")  # noqa: SIM115 - closed in _close, the process outlives this call
        self.p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._err, text=True)
        self.lines: list[str] = []
        self._watchdog = threading.Timer(timeout, self.p.kill)  # never hang the test run
        self._watchdog.daemon = True
        self._watchdog.start()

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_paused(self) -> int:
        """Read stdout until the hook's ``CNNCODES_PAUSED k`` line; return k."""
        for line in self.p.stdout:
            self.lines.append(line)
            if line.startswith("CNNCODES_PAUSED"):
                return int(line.split()[1])
        self.p.wait()
        raise AssertionError(f"the extraction never paused (exit {self.p.returncode}):\n{self.stderr()}")

    def kill(self) -> int:
        self.p.send_signal(signal.SIGKILL)
        rc = self.p.wait()
        self._close()
        return rc

    def finish(self) -> int:
        out, _ = self.p.communicate()
        self.lines += out.splitlines(keepends=True)
        self._close()
        return self.p.returncode

    def _close(self) -> None:
        self._watchdog.cancel()
        self._err.close()
        if self.p.stdout:
            self.p.stdout.close()

    def stderr(self) -> str:
        self._err.flush()
        return self.errfile.read_text(errors="replace")


def run_cli(args, env, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def paused_writer(data: Path, out: Path, tmp_path: Path, k: int, tag: str = "w") -> Proc:
    proc = Proc(cli_args(data, out), env_for(tmp_path, pause=k), tmp_path / f"{tag}-{time.monotonic_ns()}.err")
    assert proc.wait_paused() == k
    return proc


def cache_file(out: Path) -> Path:
    """The one cache path in ``out``: a finished file or the target of an unfinished extraction."""
    names = {p.name for p in out.glob("*.h5")} | {p.name[: -len(".partial")] for p in out.glob("*.h5.partial")}
    assert len(names) == 1, f"expected one cache in {out}, found {sorted(names)}"
    return out / names.pop()


def shard_names(path: Path) -> list[str]:
    return sorted(p.name for p in store.partial_dir(path).glob("shard-*.npz"))


def assert_same_codes(path: Path, ref: Path, layers=LAYERS) -> None:
    """Bitwise equal codes (stored dtype), same rows in the same order, no duplicate or missing row."""
    for key in layers:
        got = store.load_codes(path, key, dtype=None)
        exp = store.load_codes(ref, key, dtype=None)
        assert len(set(got.paths.tolist())) == len(got.paths), "duplicate rows"
        assert got.paths.tolist() == exp.paths.tolist(), "rows missing, added or reordered"
        assert got.labels.tolist() == exp.labels.tolist()
        assert got.status.tolist() == exp.status.tolist()
        assert got.X.dtype == exp.X.dtype
        assert np.array_equal(got.X, exp.X), f"codes of {key} differ from a clean run"


def no_leftovers(out: Path, path: Path) -> None:
    assert not store.partial_dir(path).exists(), "the .partial folder outlived a finished run"
    assert not Path(str(path) + ".lock").exists(), "the lock outlived a finished run"
    assert not list(out.glob(".*.tmp")), f"temporary files left: {list(out.glob('.*.tmp'))}"


# --------------------------------------------------------------------------- shared killed run


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run of 20 images (5 batches of 4) SIGKILLed while paused after its 2nd shard, and a clean reference."""
    base = tmp_path_factory.mktemp("killed")
    data = make_data(base / "flowers")
    ref = run_extract(data, base / "ref").path
    out = base / "out"
    proc = paused_writer(data, out, base, k=2)
    assert proc.kill() == -signal.SIGKILL
    path = cache_file(out)
    return {"base": base, "data": data, "out": out, "path": path, "ref": ref, "pid": proc.pid,
            "shards": shard_names(path)}


def copy_killed(killed, dst: Path) -> Path:
    """A private copy of the killed run's cache folder (same dataset, so the same cache path)."""
    shutil.copytree(killed["out"], dst, symlinks=True)
    return dst / killed["path"].name


# --------------------------------------------------------------------------- 1. kill and resume


def test_kill_at_hook_then_resume_equals_clean_run(killed, tmp_path):
    path = copy_killed(killed, tmp_path / "out")
    assert len(shard_names(path)) == 2
    res = run_cli(cli_args(killed["data"], tmp_path / "out"), env_for(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "Resuming" in res.stderr and "8 of 20 images already done" in res.stderr, res.stderr
    assert "Breaking a stale lock" in res.stderr  # the killed writer's lock
    assert "Traceback" not in res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(path)
    assert_same_codes(path, killed["ref"])
    no_leftovers(tmp_path / "out", path)


def test_kill_at_random_moments_then_resume(tmp_path):
    seed = int(os.environ.get("CNNCODES_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data = make_data(tmp_path / "flowers", per_class=6)  # 24 images, 6 batches
    ref = run_extract(data, tmp_path / "ref").path
    out = tmp_path / "out"
    env = env_for(tmp_path)
    progress = []
    for i in range(3):
        before = set(out.glob("*.h5.partial/shard-*"))
        proc = Proc(cli_args(data, out), env, tmp_path / f"run{i}.err")
        # wait for this run's first shard (torch import takes seconds), then kill at a random moment
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60 and proc.p.poll() is None and set(out.glob("*.h5.partial/shard-*")) <= before:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.6))
        proc.kill()
        path = cache_file(out)
        progress.append(store.partial_progress(path))
    res = run_cli(cli_args(data, out), env)
    assert res.returncode == 0, f"seed {seed}: {res.stderr}"
    assert_same_codes(cache_file(out), ref)
    no_leftovers(out, cache_file(out))
    print(f"seed {seed}; progress at each kill: {progress}")


def test_resume_with_another_batch_size_keeps_the_first(killed, tmp_path, caplog):
    """The batch boundaries are part of a partial: a resume with another --batch-size uses the old one."""
    path = copy_killed(killed, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="cnncodes"):
        res = run_extract(killed["data"], tmp_path / "out", batch_size=3)
    assert "batch size of the interrupted run (4)" in caplog.text
    assert res.resumed_from == 8
    assert_same_codes(path, killed["ref"])


class _Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after the raise point runs."""


def test_kill_while_writing_the_cache_file(killed, tmp_path, monkeypatch):
    """Death inside the final HDF5 write: the half-written temporary file must not pile up."""
    import contextlib
    import tempfile

    import cnncodes.store as st

    @contextlib.contextmanager
    def dies_after_writing(path, suffix=".tmp"):
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        raise _Killed  # before fsync and rename, and without any cleanup, as SIGKILL would

    out = tmp_path / "out"
    path = copy_killed(killed, out)
    monkeypatch.setattr(st, "atomic_path", dies_after_writing)
    with pytest.raises(_Killed):
        run_extract(killed["data"], out)
    monkeypatch.undo()
    assert len(list(out.glob(".*.tmp"))) == 1 and not path.exists()
    assert len(shard_names(path)) == 5
    with pytest.raises(CacheIncompleteError, match="20/20 images"):
        store.load_codes(path, "fc1")
    res = run_extract(killed["data"], out)
    assert res.resumed_from == 20 and res.n_computed == 0  # only the file is written again
    assert_same_codes(path, killed["ref"])
    no_leftovers(out, path)


def test_kill_between_rename_and_cleanup(killed, tmp_path, monkeypatch):
    """Death after the new cache file is in place but before ``.partial`` is removed."""
    import cnncodes.extract as ex

    out = tmp_path / "out"
    path = copy_killed(killed, out)
    real_write = ex.store.write_cache

    def dies(*a, **kw):
        real_write(*a, **kw)
        raise _Killed  # the new file is in place; nothing after this runs

    monkeypatch.setattr(ex.store, "write_cache", dies)
    with pytest.raises(_Killed):
        run_extract(killed["data"], out)
    monkeypatch.undo()
    assert path.exists() and store.partial_dir(path).exists()
    assert_same_codes(path, killed["ref"])  # the file is complete and verified
    # the same command: a cache hit, and the leftover work folder is cleaned up
    res = run_extract(killed["data"], out)
    assert res.hit
    no_leftovers(out, path)
    assert [c["status"] for c in store.list_caches(out)] == ["complete"]


def test_stale_partial_does_not_block_the_next_append(killed, tmp_path, monkeypatch):
    """Same window, then new images: the incremental run must append, not report a false mismatch."""
    import cnncodes.extract as ex

    data = tmp_path / "flowers"
    shutil.copytree(killed["data"], data, symlinks=True)
    out = tmp_path / "out"
    real_write = ex.store.write_cache

    def dies(*a, **kw):
        real_write(*a, **kw)
        raise _Killed  # the new file is in place; nothing after this runs

    monkeypatch.setattr(ex.store, "write_cache", dies)
    with pytest.raises(_Killed):
        run_extract(data, out)
    monkeypatch.undo()
    add_image(data, "daisy", 200)
    res = run_extract(data, out)
    assert res.n_reused == 20 and res.n_computed == 1 and res.info.n_rows == 21
    assert_same_codes(res.path, run_extract(data, tmp_path / "ref").path)
    no_leftovers(out, res.path)


def test_kill_while_removing_the_partial_folder(killed, tmp_path, monkeypatch):
    """Death half-way through deleting ``.partial`` (plan.json already gone, some shards left), then new images.

    Orphan shards must never be matched to the next run's batches: that would pair new rows with old codes.
    """
    import cnncodes.extract as ex

    data = tmp_path / "flowers"
    shutil.copytree(killed["data"], data, symlinks=True)
    out = tmp_path / "out"
    real_rmtree = shutil.rmtree

    def dies_half_way(p, *a, **kw):
        if ".partial" in Path(p).name:
            (Path(p) / "plan.json").unlink()
            for shard in sorted(Path(p).glob("shard-*.npz"))[2:]:  # batches 0 and 1 survive
                shard.unlink()
            raise _Killed
        return real_rmtree(p, *a, **kw)

    monkeypatch.setattr(ex.shutil, "rmtree", dies_half_way)
    with pytest.raises(_Killed):
        run_extract(data, out)
    monkeypatch.undo()
    path = cache_file(out)
    assert_same_codes(path, killed["ref"])
    assert [c["status"] for c in store.list_caches(out)] == ["complete"]  # no phantom partial
    add_image(data, "daisy", 200)  # sorts first: job 0, batch 0 of the next run
    add_image(data, "tulip", 200)
    res = run_extract(data, out)
    assert res.n_reused == 20 and res.resumed_from == 0 and res.info.n_rows == 22
    assert_same_codes(path, run_extract(data, tmp_path / "ref").path)
    no_leftovers(out, path)
    assert not [p for p in out.iterdir() if ".partial" in p.name]


# --------------------------------------------------------------------------- 2. no false completeness


def test_unfinished_cache_is_refused_with_progress(killed, capsys):
    from cnncodes.cli_extract import main

    path = killed["path"]
    assert not path.exists()
    assert store.partial_progress(path) == (8, 20)
    for reader in (lambda: store.load_codes(path, "fc1"), lambda: store.read_info(path)):
        with pytest.raises(CacheIncompleteError) as ei:
            reader()
        msg = str(ei.value)
        assert "8/20 images" in msg and "resume" in msg, msg
    assert main(["--list", "--out", str(killed["out"])]) == 0
    listed = capsys.readouterr().out
    assert "partial 8/20 images" in listed and str(path) in listed, listed
    assert [c["status"] for c in store.list_caches(killed["out"])] == ["partial"]


# --------------------------------------------------------------------------- 3. corruption


def test_flipped_bytes_in_codes_are_detected(tmp_path):
    import h5py

    data = make_data(tmp_path / "flowers", per_class=3)
    path = run_extract(data, tmp_path / "out", compression="none").path
    good = store.load_codes(path, "fc1")
    with h5py.File(path, "r") as f:
        ds = f["codes/fc1"]
        assert ds.compression is None
        # chunked, uncompressed: the first chunk's bytes are the first rows' float16 values
        offset = ds.id.get_offset()
        if offset is None:
            chunk = ds.id.get_chunk_info(0)
            offset, nbytes = chunk.byte_offset, chunk.size
        else:
            nbytes = ds.id.get_storage_size()
        assert nbytes >= ds.size * ds.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(offset + nbytes // 2)
        b = fh.read(1)
        fh.seek(offset + nbytes // 2)
        fh.write(bytes([b[0] ^ 0x5A]))
    with pytest.raises(CacheCorruptError, match="fc1.*sha256 mismatch"):
        store.load_codes(path, "fc1")
    # the other layer is untouched and still readable
    assert store.load_codes(path, "conv2").X.shape == (12, 16)
    assert good.X.shape == (12, 32)


def test_flipped_label_is_detected(tmp_path):
    import h5py

    data = make_data(tmp_path / "flowers", per_class=3)
    path = run_extract(data, tmp_path / "out").path
    with h5py.File(path, "r+") as f:
        lab = f["labels"][...]
        lab[0] = (lab[0] + 1) % 4
        f["labels"][...] = lab
    with pytest.raises(CacheCorruptError, match="row table"):
        store.load_codes(path, "fc1")


def test_corrupt_shard_is_recomputed_on_resume(killed, tmp_path, caplog):
    path = copy_killed(killed, tmp_path / "out")
    shards = sorted(store.partial_dir(path).glob("shard-*.npz"))
    assert len(shards) == 2
    raw = bytearray(shards[1].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        res = run_extract(killed["data"], tmp_path / "out")
    assert any("corrupt" in r.getMessage() and shards[1].name in r.getMessage() for r in caplog.records), caplog.text
    assert res.resumed_from == 4  # only the intact shard counts
    assert_same_codes(path, killed["ref"])


# --------------------------------------------------------------------------- 4. bad images


def _small_rgb(seed: int, size=(64, 48)):
    """A small real photo (no JPEG draft at 36 px), varied by seed."""
    from PIL import Image

    src = _flower_files("sunflower")[seed]
    with Image.open(src) as im:
        return im.convert("RGB").resize(size)


def write_bad_images(folder: Path) -> dict[str, str]:
    """Crafted files in ``folder``: name -> expected status fragment of the message."""
    from PIL import Image

    folder.mkdir(parents=True)
    # truncated JPEG: the first 40 % of a real photo
    real = _flower_files("rose")[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(real[: len(real) * 2 // 5])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image, it is a text file named .jpg\n" * 20)
    # decompression bombs (the tests lower max_pixels to 1e6): one above 2x the limit (Pillow
    # would raise DecompressionBombError), one between 1x and 2x (Pillow would only warn)
    Image.new("L", (2000, 2000), 128).save(folder / "bomb.png")
    Image.new("L", (1200, 1100), 64).save(folder / "bomb_warning.png")
    # decodable oddities
    _small_rgb(1).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "gif_content.jpg", format="GIF")
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    Image.fromarray(ramp).save(folder / "grey16.png")  # mode I;16
    Image.fromarray(((ramp.astype(np.uint32) + 128) // 257).astype(np.uint8), "L").save(folder / "grey8_same.png")
    _small_rgb(2).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    pal = _small_rgb(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.save(folder / "palette_transparent.png", transparency=0)
    exif_src = _small_rgb(4)
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif_src.save(folder / "exif_rot.jpg", exif=ex, quality=95)
    with Image.open(folder / "exif_rot.jpg") as im:  # the same pixels, rotated by hand, lossless
        im.transpose(Image.Transpose.ROTATE_270).save(folder / "exif_rot_by_hand.png")
        im.save(folder / "exif_rot_ignored.png")  # orientation not applied
    return {
        "truncated.jpg": "truncated",
        "zero.jpg": "empty file (0 bytes)",
        "text.jpg": "not an image",
        "bomb.png": "decompression bomb",
        "bomb_warning.png": "decompression bomb",
    }


ODD_OK = {
    "gif_content.jpg": "GIF content in a .jpg file",
    "grey16.png": "16-bit grey",
    "cmyk.jpg": "CMYK",
    "palette_transparent.png": "alpha composited",
    "exif_rot.jpg": "EXIF orientation 6",
}


def test_bad_images_are_recorded_never_substituted(tmp_path):
    data = tmp_path / "mixed"
    make_data(data, per_class=5, classes=("daisy", "tulip"))
    bad = write_bad_images(data / "odd")
    n = 10 + len(list((data / "odd").iterdir()))
    res = run_extract(data, tmp_path / "out", error_budget=0.5, max_pixels=1_000_000)
    codes = {k: store.load_codes(res.path, k) for k in LAYERS}
    rows = codes["fc1"]
    assert len(rows.paths) == n and res.info.n_failed == len(bad) == res.n_failed
    by_path = {p: i for i, p in enumerate(rows.paths)}

    # every bad file: status error, a message with the reason, NaN in every layer
    for name, why in bad.items():
        i = by_path[f"odd/{name}"]
        assert rows.status[i] == "error", (name, rows.messages[i])
        assert why in rows.messages[i], (name, rows.messages[i])
        for k in LAYERS:
            assert np.isnan(codes[k].X[i]).all(), (name, k)
    assert sorted(p for p, _m in res.skipped) == sorted(f"odd/{n_}" for n_ in bad)
    assert all(m for _p, m in res.skipped)

    # decodable oddities: ok, a note, finite codes
    for name, note in ODD_OK.items():
        i = by_path[f"odd/{name}"]
        assert rows.status[i] == "ok", (name, rows.messages[i])
        assert note in rows.messages[i], (name, rows.messages[i])
        for k in LAYERS:
            assert np.isfinite(codes[k].X[i]).all(), (name, k)
    ok = rows.status == "ok"
    assert np.isfinite(rows.X[ok]).all() and np.isnan(rows.X[~ok]).all()

    X = rows.X
    # 16-bit grey is scaled, not saturated: same codes as the 8-bit image with the same values
    assert np.array_equal(X[by_path["odd/grey16.png"]], X[by_path["odd/grey8_same.png"]])
    # the EXIF rotation is applied: codes of the rotated-by-hand copy, not of the raw pixels
    rot = X[by_path["odd/exif_rot.jpg"]]
    np.testing.assert_allclose(rot, X[by_path["odd/exif_rot_by_hand.png"]], atol=1e-3)
    assert not np.allclose(rot, X[by_path["odd/exif_rot_ignored.png"]], atol=1e-3)

    # no neighbour substitution: each good photo's codes are those of that photo extracted alone
    for f in sorted((data / "daisy").iterdir()) + sorted((data / "tulip").iterdir()):
        alone = tmp_path / f"alone-{f.name}"
        (alone / f.parent.name).mkdir(parents=True)
        os.symlink(f.resolve(), alone / f.parent.name / f.name)
        one = store.load_codes(run_extract(alone, tmp_path / "out-alone").path, "fc1")
        np.testing.assert_allclose(X[by_path[f"{f.parent.name}/{f.name}"]], one.X[0], rtol=1e-3, atol=1e-3)
    # ...and the photos' codes are far enough apart for that check to catch a swap
    good = X[[by_path[p] for p in rows.paths if not p.startswith("odd/")]]
    dist = np.abs(good[:, None, :] - good[None, :, :]).max(-1)
    assert dist[~np.eye(len(good), dtype=bool)].min() > 1e-2


def test_error_budget_stops_the_run_and_keeps_shards(tmp_path):
    data = tmp_path / "mixed"
    make_data(data, per_class=4, classes=("daisy", "rose"))  # sorted first: 2 clean batches
    bad = write_bad_images(data / "zz_odd")
    with pytest.raises(ErrorBudgetExceeded) as ei:
        run_extract(data, tmp_path / "out", max_pixels=1_000_000)  # default budget: 5 %
    msg = str(ei.value)
    assert "error budget" in msg and "First failures" in msg
    assert any(f"zz_odd/{name}" in msg for name in bad), msg
    path = cache_file(tmp_path / "out")
    done, todo = store.partial_progress(path)
    assert done >= 8 and todo == 8 + len(list((data / "zz_odd").iterdir()))
    assert not path.exists()
    assert not Path(str(path) + ".lock").exists()
    # with a generous budget the same data resumes from the kept shards
    res = run_extract(data, tmp_path / "out", error_budget=0.9, max_pixels=1_000_000)
    assert res.resumed_from >= 8 and res.n_failed == len(bad)


# --------------------------------------------------------------------------- 5. one writer


def test_second_writer_refused_and_stale_lock_broken(tmp_path, capsys, caplog):
    from cnncodes.cli_extract import main

    data = make_data(tmp_path / "flowers", per_class=3)
    out = tmp_path / "out"
    proc = paused_writer(data, out, tmp_path, k=1)
    try:
        path = cache_file(out)
        lock = json.loads(Path(str(path) + ".lock").read_text())
        assert lock["pid"] == proc.pid
        t0 = time.monotonic()
        rc = main([str(data), "--model", "tiny", "--weights", "none", "--layers", *LAYERS, "--out", str(out),
                   "--workers", "0", "--batch-size", str(BATCH), "--device", "cpu", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1, err
        assert time.monotonic() - t0 < 30  # refused at once, not after waiting
        assert f"pid {proc.pid}" in err and f"host {socket.gethostname()}" in err, err
        assert "Traceback" not in err
        with pytest.raises(CacheLockedError):
            run_extract(data, out)
        # a reader while the first run is in progress: a clear refusal, not an HDF5 error
        with pytest.raises(CacheIncompleteError, match="4/12 images"):
            store.load_codes(path, "fc1")
    finally:
        proc.kill()
    # the killed writer's lock is stale: broken with a warning, and the run succeeds
    assert json.loads(Path(str(path) + ".lock").read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        res = run_extract(data, out)
    assert any("stale lock" in r.getMessage() and str(proc.pid) in r.getMessage() for r in caplog.records)
    assert res.resumed_from == 4
    ref = run_extract(data, tmp_path / "ref").path
    assert_same_codes(path, ref)
    no_leftovers(out, path)


def test_empty_lock_left_by_a_kill_while_locking(tmp_path, caplog):
    """A kill between creating the lock file and writing its pid leaves an empty lock: stale once old."""
    data = make_data(tmp_path / "flowers", per_class=2)
    out = tmp_path / "out"
    ref = run_extract(data, tmp_path / "ref").path
    lock = out / (ref.name + ".lock")
    out.mkdir()
    lock.write_bytes(b"")
    with pytest.raises(CacheLockedError):  # just created: a writer may be filling it in right now
        run_extract(data, out)
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        res = run_extract(data, out)
    assert "empty lock" in caplog.text
    assert_same_codes(res.path, ref)
    no_leftovers(out, res.path)


def test_reader_during_append_gets_old_complete_codes(tmp_path):
    data = make_data(tmp_path / "flowers", per_class=3)
    out = tmp_path / "out"
    path = run_extract(data, out).path
    before = store.load_codes(path, LAYERS)
    add_image(data, "daisy", 200)
    add_image(data, "rose", 200)
    add_image(data, "tulip", 200)
    proc = paused_writer(data, out, tmp_path, k=1)  # appending 3 images: paused after its only shard
    try:
        during = store.load_codes(path, LAYERS)
        assert during.paths.tolist() == before.paths.tolist() and np.array_equal(during.X, before.X)
        assert store.read_info(path).n_rows == 12
        assert [c["status"] for c in store.list_caches(out)] == ["complete", "partial"]
    finally:
        proc.kill()
    res = run_extract(data, out)
    assert res.n_reused == 12 and res.resumed_from == 3 and res.info.n_rows == 15
    assert_same_codes(path, run_extract(data, tmp_path / "ref").path)


# --------------------------------------------------------------------------- 6. changed inputs


def _random_tiny_weights(path: Path) -> Path:
    import torch

    from cnncodes.backbones import get_backbone

    torch.manual_seed(7)
    torch.save(get_backbone("tiny").build().state_dict(), path)
    return path


def test_changed_inputs_are_refused_on_resume(tmp_path):
    data = make_data(tmp_path / "flowers", per_class=4)  # 16 images
    out = tmp_path / "out"
    proc = paused_writer(data, out, tmp_path, k=2)
    proc.kill()
    path = cache_file(out)
    pdir = store.partial_dir(path)
    state = (shard_names(path), (pdir / "plan.json").read_bytes())

    with pytest.raises(CacheMismatchError, match="layers") as ei:
        run_extract(data, out, layers=["fc1"])
    assert "--overwrite" in str(ei.value)
    with pytest.raises(CacheMismatchError, match="layers"):
        run_extract(data, out, layers=["conv2", "fc1", "fc2"])

    # other weights or dtype: another fingerprint, so another file: no conflict, the partial is untouched
    other_w = run_extract(data, out, weights=str(_random_tiny_weights(tmp_path / "tiny7.pt")))
    other_d = run_extract(data, out, dtype="float32")
    assert len({other_w.path, other_d.path, path}) == 3
    assert other_d.info.spec["dtype"] == "float32" and other_w.info.spec["weights"]["kind"] == "file"
    assert (shard_names(path), (pdir / "plan.json").read_bytes()) == state

    # one more image: the same file, another image list
    new = add_image(data, "tulip", 200)
    with pytest.raises(CacheMismatchError, match="image list"):
        run_extract(data, out)
    new.unlink()
    assert (shard_names(path), (pdir / "plan.json").read_bytes()) == state

    # after all that, the same command still resumes and equals a clean run
    res = run_extract(data, out)
    assert res.resumed_from == 8
    ref = run_extract(data, tmp_path / "ref").path
    assert_same_codes(path, ref)

    # and the float32 file equals a clean float32 run
    assert_same_codes(other_d.path, run_extract(data, tmp_path / "ref32", dtype="float32").path)


def test_overwrite_discards_a_conflicting_partial(killed, tmp_path, caplog):
    path = copy_killed(killed, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="cnncodes"):
        res = run_extract(killed["data"], tmp_path / "out", layers=["fc1"], overwrite=True)
    assert any("discarding" in r.getMessage() for r in caplog.records), caplog.text
    assert res.path == path and res.resumed_from == 0 and res.keys == ["fc1"]
    assert_same_codes(path, killed["ref"], layers=["fc1"])
    no_leftovers(tmp_path / "out", path)


def test_image_list_change_with_overwrite(killed, tmp_path):
    data = tmp_path / "flowers"
    shutil.copytree(killed["data"], data, symlinks=True)
    out = tmp_path / "out"
    proc = paused_writer(data, out, tmp_path, k=1)
    proc.kill()
    add_image(data, "rose", 201)
    with pytest.raises(CacheMismatchError, match="image list"):
        run_extract(data, out)
    res = run_extract(data, out, overwrite=True)
    assert res.info.n_rows == 21 and res.resumed_from == 0
    assert_same_codes(res.path, run_extract(data, tmp_path / "ref").path)


# --------------------------------------------------------------------------- 7. disk full


def test_disk_full_on_a_shard_keeps_finished_work(killed, tmp_path, monkeypatch):
    import cnncodes.extract as ex

    real = ex.atomic_write_bytes
    calls = {"n": 0}

    def full_disk(path, data):
        if Path(path).name.startswith("shard-"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(ex, "atomic_write_bytes", full_disk)
    out = tmp_path / "out"
    with pytest.raises(ExtractionWriteError) as ei:
        run_extract(killed["data"], out)
    msg = str(ei.value)
    assert "No space left on device" in msg and "resume" in msg and ".partial" in msg, msg
    path = cache_file(out)
    assert not path.exists()
    assert len(shard_names(path)) == 2 and store.partial_progress(path) == (8, 20)
    assert not Path(str(path) + ".lock").exists()
    monkeypatch.setattr(ex, "atomic_write_bytes", real)
    res = run_extract(killed["data"], out)
    assert res.resumed_from == 8
    assert_same_codes(path, killed["ref"])
    no_leftovers(out, path)


def test_disk_full_while_writing_the_cache_keeps_the_old_file(tmp_path, monkeypatch):
    import cnncodes.store as st

    data = make_data(tmp_path / "flowers", per_class=3)
    out = tmp_path / "out"
    path = run_extract(data, out).path
    before = store.load_codes(path, LAYERS)
    before_bytes = path.read_bytes()
    add_image(data, "daisy", 200)
    add_image(data, "sunflower", 200)

    real = st.write_cache

    def full_disk(path_, **kw):
        def fail_after_first(blocks):
            yield next(iter(blocks))
            raise OSError(errno.ENOSPC, "No space left on device")

        kw["layers"] = {k: (rec, fail_after_first(b)) for k, (rec, b) in kw["layers"].items()}
        return real(path_, **kw)  # the temporary file is half written when the disk "fills"

    monkeypatch.setattr(st, "write_cache", full_disk)
    with pytest.raises(ExtractionWriteError, match="No space left on device") as ei:
        run_extract(data, out)
    assert "run the same command again" in str(ei.value)
    assert path.read_bytes() == before_bytes
    after = store.load_codes(path, LAYERS)
    assert after.paths.tolist() == before.paths.tolist() and np.array_equal(after.X, before.X)
    assert len(shard_names(path)) == 1  # the 2 new images, one batch
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(st, "write_cache", real)
    res = run_extract(data, out)
    assert res.resumed_from == 2 and res.info.n_rows == 14
    assert_same_codes(path, run_extract(data, tmp_path / "ref").path)
    no_leftovers(out, path)


# --------------------------------------------------------------------------- 8. weight files


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears only if the pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_with_pickled_objects_are_refused_unexecuted(tmp_path):
    import collections

    import torch

    from cnncodes.backbones import get_backbone

    data = make_data(tmp_path / "flowers", per_class=1)
    marker = tmp_path / "EXECUTED"
    sd = get_backbone("tiny").build().state_dict()
    evil = tmp_path / "evil.pt"
    torch.save(dict(sd, extra=_Payload(str(marker))), evil)
    counter = tmp_path / "counter.pt"
    torch.save(collections.Counter(a=1), counter)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(_random_bytes(1))  # torch raises UnpicklingError on these bytes
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    for f, why in ((evil, "weights_only"), (counter, "state dict"), (garbage, None), (wrong, "does not fit")):
        with pytest.raises(WeightsError, match=why):
            run_extract(data, tmp_path / "out", weights=str(f))
        assert not marker.exists(), f"{f.name} was unpickled in full"
    # the CLI: a run error, no traceback
    from cnncodes.cli_extract import main

    assert main([str(data), "--model", "tiny", "--layers", "fc1", "--weights", str(evil), "--out",
                 str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "--no-progress"]) == 1
    assert not marker.exists()


def _random_bytes(seed: int, n: int = 4096) -> bytes:
    return bytes(random.Random(seed).getrandbits(8) for _ in range(n))


@pytest.mark.parametrize("seed", [7, 44])  # IndexError: pop from empty list; KeyError
def test_garbage_weights_file_is_a_weights_error(tmp_path, seed):
    data = make_data(tmp_path / "flowers", per_class=1)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(_random_bytes(seed))
    with pytest.raises(WeightsError):
        run_extract(data, tmp_path / "out", weights=str(garbage))


# --------------------------------------------------------------------------- 9. bad arguments


def test_bad_arguments_exit_2_without_traceback(tmp_path, capsys):
    from cnncodes.cli_extract import main

    data = make_data(tmp_path / "flowers", per_class=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "cats").mkdir(parents=True)
    (no_images / "cats" / "notes.txt").write_text("x")
    (no_images / "cats" / "data.csv").write_text("x")
    csv_bad = tmp_path / "list.csv"
    img = next((data / "daisy").iterdir())
    csv_bad.write_text(f"path,label\n{img},daisy\n{img},daisy\nmissing.jpg,rose\nonly-one-cell\n,tulip\n")

    common = ["--weights", "none", "--out", str(tmp_path / "out"), "--workers", "0", "--device", "cpu"]
    cases = [
        ([str(data), "--model", "alexnett", "--layers", "fc7"], ["Unknown backbone 'alexnett'", "Did you mean 'alexnet'"]),
        ([str(data), "--model", "tiny", "--layers", "fc11"], ["Unknown layer 'fc11'", "Did you mean", "Known: conv1"]),
        ([str(tmp_path / "nope"), "--model", "tiny", "--layers", "fc1"], ["does not exist"]),
        ([str(empty), "--model", "tiny", "--layers", "fc1"], ["is empty"]),
        ([str(no_images), "--model", "tiny", "--layers", "fc1"], ["no image file", "2 file(s) of other types"]),
        ([str(csv_bad), "--model", "tiny", "--layers", "fc1"],
         ["bad row(s)", "duplicate path", "file not found", "wrong column count", "empty path"]),
        ([str(data), "--model", "tiny", "--layers", "fc1", "--pool", "median"], ["Unknown pooling"]),
        ([str(data), "--model", "tiny"], ["missing --layers"]),
    ]
    for argv, needles in cases:
        rc = main(argv + common)
        cap = capsys.readouterr()
        assert rc == 2, (argv, cap.err)
        assert "Traceback" not in cap.err and cap.err.startswith("extract.py: error:"), cap.err
        for s in needles:
            assert s in cap.err, (argv, s, cap.err)
    assert not (tmp_path / "out").exists()  # nothing was written for a usage error
