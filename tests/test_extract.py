"""Extraction values and the cache: codes equal independent computations; hit, miss, append, round trip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, link_subset, need

from cnncodes import load_codes
from cnncodes.cli_extract import main as extract_main
from cnncodes.errors import UsageError
from cnncodes.extract import extract
from cnncodes.store import read_info, read_rows


def _independent_alexnet(paths, state_dict_path, layer_slice):
    """AlexNet codes the way a user would compute them by hand with torchvision."""
    import torchvision
    import torchvision.transforms as T
    from PIL import Image

    m = torchvision.models.alexnet(weights=None)
    m.load_state_dict(torch.load(state_dict_path, weights_only=True))
    m.eval()
    tf = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        h = torch.flatten(m.avgpool(m.features(x)), 1)
        return m.classifier[:layer_slice](h).numpy()


def test_alexnet_fc7_equals_independent_forward(flowers_small, tmp_path, alexnet_state_dict):
    res = extract(flowers_small, "alexnet", ["fc7", "fc7.pre", "fc6"], weights=str(alexnet_state_dict),
                  out=tmp_path / "codes", device="cpu", batch_size=5, workers=0)
    c = load_codes(res.path, "fc7")
    paths = [flowers_small / p for p in c.paths]
    ref7 = _independent_alexnet(paths, alexnet_state_dict, 6)  # features -> avgpool -> classifier[:6]
    assert c.X.shape == (12, 4096)
    np.testing.assert_allclose(c.X, ref7, rtol=2e-3, atol=2e-3 * float(np.abs(ref7).max()))
    assert c.X.min() >= 0 and (c.X == 0).mean() > 0.2  # post-ReLU, sparse
    pre = load_codes(res.path, "fc7.pre").X
    ref_pre = _independent_alexnet(paths, alexnet_state_dict, 5)
    assert (pre < 0).mean() > 0.2, "fc7.pre must hold the values before the in-place ReLU"
    np.testing.assert_allclose(pre, ref_pre, rtol=2e-3, atol=2e-3 * float(np.abs(ref_pre).max()))
    np.testing.assert_array_equal(np.maximum(pre, 0), c.X)  # one forward pass, both stages
    fc6 = load_codes(res.path, "fc6").X
    np.testing.assert_allclose(fc6, _independent_alexnet(paths, alexnet_state_dict, 3), rtol=2e-3,
                               atol=2e-3 * float(np.abs(fc6).max()))


def test_lite0_packaged_weights_classify_real_ants_and_bees(tmp_path):
    """Proves the weights and the preprocessing: ImageNet classes 310 (ant) and 309 (bee)."""
    root = link_subset(need(HYMENOPTERA) / "val", tmp_path / "hym", 8)
    res = extract(root, "efficientnet_lite0", ["logits", "pool"], out=tmp_path / "codes", device="cpu",
                  batch_size=8, workers=0, dtype="float32")
    c = load_codes(res.path, "logits")
    top = c.X.argmax(1)
    ants, bees = top[c.labels == c.class_names.index("ants")], top[c.labels == c.class_names.index("bees")]
    assert (ants == 310).sum() >= 6, ants
    assert (bees == 309).sum() >= 5, bees  # chance is 1/1000; the misses are flowers (cardoon)
    pool = load_codes(res.path, "pool").X
    assert pool.shape == (16, 1280) and pool.min() >= 0


def test_conv_pooling_variants_equal_numpy_pooling(flowers_small, tmp_path):
    kw = dict(weights="none", out=tmp_path / "codes", device="cpu", workers=0, dtype="float32")
    full = extract(flowers_small, "tiny", ["conv2"], pool="none", **kw)
    # conv2 hooks the ReLU before AdaptiveAvgPool2d(4): its map is 16 x 16 x 16 at 32 px
    rec = read_info(full.path).layers["conv2@none"]
    assert rec.map_shape == (16, 16, 16) and rec.dim == 16 * 16 * 16
    maps = load_codes(full.path, "conv2@none").X.reshape(12, 16, 16, 16)
    for pool, expect in [
        ("avg", maps.mean((2, 3))),
        ("max", maps.max((2, 3))),
        ("avg2x2", maps.reshape(12, 16, 2, 8, 2, 8).mean((3, 5)).reshape(12, -1)),
        ("max2x2", maps.reshape(12, 16, 2, 8, 2, 8).max((3, 5)).reshape(12, -1)),
    ]:
        res = extract(flowers_small, "tiny", ["conv2"], pool=pool, **kw)
        key = "conv2" if pool == "avg" else f"conv2@{pool}"
        got = load_codes(res.path, key)
        assert got.records[key].pool == pool
        np.testing.assert_allclose(got.X, expect, rtol=1e-5, atol=1e-6)
    assert {"conv2", "conv2@max", "conv2@avg2x2", "conv2@none"} <= set(read_info(full.path).layers)


def test_same_codes_across_batch_sizes_and_runs(flowers_small, tmp_path):
    kw = dict(weights="none", device="cpu", workers=0, dtype="float32")
    a = load_codes(extract(flowers_small, "tiny", ["fc1", "conv1"], batch_size=5, out=tmp_path / "a", **kw).path,
                   ["fc1", "conv1"])
    b = load_codes(extract(flowers_small, "tiny", ["fc1", "conv1"], batch_size=12, out=tmp_path / "b", **kw).path,
                   ["fc1", "conv1"])
    c = load_codes(extract(flowers_small, "tiny", ["fc1", "conv1"], batch_size=5, out=tmp_path / "c", workers=2,
                           weights="none", device="cpu", dtype="float32").path, ["fc1", "conv1"])
    assert list(a.paths) == list(b.paths) == list(c.paths)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.X, c.X)  # same batch size: bitwise, with or without workers


def test_cache_hit_miss_append_and_new_layer(flowers_small, tmp_path):
    kw = dict(weights="none", out=tmp_path / "codes", device="cpu", workers=0, batch_size=4)
    first = extract(flowers_small, "tiny", ["fc1", "conv2"], **kw)
    assert not first.hit and first.n_computed == 12
    assert 0 < first.stream_seconds < first.seconds  # the streaming part excludes model load and final write
    mtime = os.stat(first.path).st_mtime_ns
    before = load_codes(first.path, ["fc1", "conv2"])

    hit = extract(flowers_small, "tiny", ["fc1"], **kw)
    assert hit.hit and hit.n_computed == 0 and hit.path == first.path and hit.stream_seconds == 0
    assert os.stat(first.path).st_mtime_ns == mtime  # nothing rewritten

    # a changed spec never reuses a stale entry: other dtype -> other file; other pool -> other key
    f32 = extract(flowers_small, "tiny", ["fc1"], dtype="float32", **kw)
    assert f32.path != first.path and not f32.hit
    mx = extract(flowers_small, "tiny", ["conv2"], pool="max", **kw)
    assert mx.keys == ["conv2@max"] and not mx.hit and mx.n_reused == 12
    np.testing.assert_array_equal(load_codes(mx.path, "conv2").X, before.X[:, 32:])  # old layer untouched

    # new images are extracted alone and the others keep their codes
    for i, f in enumerate(sorted(os.listdir(flowers_small / "daisy"))[:2]):
        shutil.copy(flowers_small / "daisy" / f, flowers_small / "rose" / f"added{i}.jpg")
    app = extract(flowers_small, "tiny", ["fc1"], **kw)
    assert app.n_computed == 2 and app.n_reused == 12
    after = load_codes(app.path, ["fc1", "conv2"])
    assert len(after.paths) == 14 and sorted(after.paths) == list(after.paths)
    pos = {p: i for i, p in enumerate(after.paths)}
    np.testing.assert_array_equal(after.X[[pos[p] for p in before.paths]], before.X)
    # and the appended rows equal a clean extraction of the grown folder
    clean = load_codes(extract(flowers_small, "tiny", ["fc1", "conv2"], weights="none", out=tmp_path / "clean",
                               device="cpu", workers=0, batch_size=4).path, ["fc1", "conv2"])
    assert list(clean.paths) == list(after.paths)
    np.testing.assert_allclose(after.X, clean.X, rtol=1e-3, atol=1e-4)

    # a removed image leaves the cache; a changed image is recomputed
    os.remove(flowers_small / "rose" / "added1.jpg")
    rem = extract(flowers_small, "tiny", ["fc1"], **kw)
    assert rem.n_computed == 0 and len(load_codes(rem.path, "fc1").paths) == 13


def test_round_trip_of_every_stored_field(tmp_path):
    link_subset(need(HYMENOPTERA) / "train", tmp_path / "hym" / "train", 3)
    link_subset(need(HYMENOPTERA) / "val", tmp_path / "hym" / "val", 2)
    res = extract(tmp_path / "hym", "tiny", ["fc1", "conv1"], weights="none", out=tmp_path / "codes",
                  device="cpu", workers=0, pool="max")
    c = load_codes(res.path, ["fc1", "conv1@max"])
    rel = sorted(str(p.relative_to(tmp_path / "hym")) for p in (tmp_path / "hym").rglob("*.jpg"))
    assert list(c.paths) == rel
    assert c.class_names == ["ants", "bees"]
    assert list(c.splits) == [p.split("/")[0] for p in rel]
    assert list(c.labels) == [["ants", "bees"].index(p.split("/")[1]) for p in rel]
    assert set(c.status) == {"ok"}
    spec = c.spec
    assert spec["backbone"] == "tiny" and spec["dtype"] == "float16" and spec["weights"]["kind"] == "none"
    assert spec["preprocessing"] == {"resize": 36, "crop": 32, "interpolation": "bilinear",
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "draft": True,
                                     "decoder": "torchvision"}
    assert [r["key"] for r in spec["layers"]] == ["fc1", "conv1@max"]
    # a user reads the file with plain h5py
    with h5py.File(res.path, "r") as f:
        assert f["codes/fc1"].dtype == np.float16 and f["codes/fc1"].shape == (10, 32)
        assert list(f["paths"].asstr()[:]) == rel and f["labels"][:].tolist() == list(c.labels)
        assert f.attrs["fingerprint"] == c.fingerprint and f["codes/conv1@max"].attrs["pool"] == "max"
        np.testing.assert_array_equal(f["codes/fc1"][:].astype(np.float32), c.X[:, :32])
    info = read_info(res.path)
    assert info.n_rows == 10 and info.dataset_root == str((tmp_path / "hym").resolve())
    rows = read_rows(res.path)
    assert rows["file_size"].tolist() == [os.stat(tmp_path / "hym" / p).st_size for p in rel]


def test_csv_input_keeps_csv_order_and_splits(flowers_small, tmp_path):
    files = sorted(flowers_small.rglob("*.jpg"))[:6]
    lines = ["path,label,split"] + [f"{f},{f.parent.name},{'train' if i % 2 else 'test'}" for i, f in enumerate(files)]
    csv = tmp_path / "list.csv"
    csv.write_text("\n".join(lines) + "\n")
    res = extract(csv, "tiny", ["fc1"], weights="none", out=tmp_path / "codes", device="cpu", workers=0)
    c = load_codes(res.path, "fc1")
    assert [Path(p).name for p in c.paths] == [f.name for f in files]
    assert list(c.splits) == ["test", "train"] * 3


def test_cli_prints_the_cache_path_last_and_lists(flowers_small, tmp_path, capsys):
    out = tmp_path / "codes"
    rc = extract_main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "fc1", "conv1",
                       "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    path = Path(stdout[-1])
    assert path.is_file() and load_codes(path, ["fc1", "conv1"]).X.shape == (12, 40)
    assert extract_main(["--list", "--out", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "complete" in listing and "fc1 conv1" in listing and str(path) in listing
    assert extract_main(["--model", "alexnet", "--list-layers"]) == 0
    assert "fc7.pre" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["DATA", "--model", "alexnett", "--layers", "fc7"], "Did you mean 'alexnet'"),
    (["DATA", "--model", "alexnet", "--layers", "fc77"], "Did you mean 'fc7'"),
    (["DATA", "--model", "alexnet", "--layers", "fc7", "--pool", "median"], "Unknown pooling"),
    (["DATA", "--model", "alexnet"], "missing --layers"),
    (["NOPE", "--model", "tiny", "--layers", "fc1", "--weights", "none"], "does not exist"),
])
def test_cli_usage_errors_exit_2(argv, needle, flowers_small, tmp_path, capsys):
    argv = [str(flowers_small) if a == "DATA" else str(tmp_path / a) if a == "NOPE" else a for a in argv]
    assert extract_main(argv + ["--out", str(tmp_path / "codes")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_resize_crop_equals_torchvision(interp, tmp_path):
    """cnncodes resizes in PIL directly; it must equal torchvision's Resize + CenterCrop bit for bit."""
    import torchvision.transforms as T
    from PIL import Image

    from cnncodes.backbones import Preprocessing
    from cnncodes.extract import resize_crop

    rng = np.random.default_rng(0)
    for w, h in [(227, 227), (500, 375), (375, 500), (100, 100), (641, 299), (256, 256)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for resize, crop in [(256, 224), (342, 299), (232, 224)]:
            pre = Preprocessing(resize, crop, interp)
            ref = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(interp)), T.CenterCrop(crop)])(img)
            np.testing.assert_array_equal(resize_crop(img, pre), np.asarray(ref))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_resize_crop_tensor_equals_torchvision_tensor_transforms(interp):
    import torchvision.transforms.v2 as T

    from cnncodes.backbones import Preprocessing
    from cnncodes.extract import resize_crop_tensor

    rng = np.random.default_rng(0)
    for w, h in [(227, 227), (500, 375), (375, 500), (100, 100), (641, 299), (256, 256)]:
        t = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        for resize, crop in [(256, 224), (342, 299), (232, 224)]:
            pre = Preprocessing(resize, crop, interp)
            ref = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(interp), antialias=True),
                             T.CenterCrop(crop)])(t)
            out = resize_crop_tensor(t, pre)
            assert out.dtype == torch.uint8 and out.is_contiguous()
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_each_decoder_equals_its_torchvision_pipeline_on_real_files(interp, tmp_path):
    """decoder='torchvision' = decode_image + v2 tensor transforms; 'pil' = PIL + transforms; both close."""
    import torchvision.transforms.v2 as T
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from cnncodes.backbones import Preprocessing
    from cnncodes.extract import _ImageDataset

    root = link_subset(need(HYMENOPTERA) / "train", tmp_path / "hym", 3)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    png = tmp_path / "photo.png"  # not a JPEG: Pillow decodes it in both back ends
    Image.open(paths[0]).convert("RGB").save(png)
    paths.append(str(png))
    pre = Preprocessing(256, 224, interp)
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode(interp), antialias=True), T.CenterCrop(224)])
    fast, exact = _ImageDataset(paths, pre, False, "torchvision"), _ImageDataset(paths, pre, False, "pil")
    for i, p in enumerate(paths):
        _, a, status, note = fast[i]
        _, b, status_b, _ = exact[i]
        a, b = a[0], b[0]  # one view per image: the centre crop
        assert status == status_b == "ok" and note == ""
        torch.testing.assert_close(a, tf(decode_image(p, mode=ImageReadMode.RGB)), rtol=0, atol=0)
        torch.testing.assert_close(b, torch.from_numpy(np.asarray(tf(Image.open(p).convert("RGB")))).permute(2, 0, 1),
                                   rtol=0, atol=0)
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 2 and (diff > 0).float().mean() < 0.05, (p, diff.max(), (diff > 0).float().mean())


def test_decoder_is_part_of_the_fingerprint_and_predict_uses_the_recorded_one(flowers_small, tmp_path):
    from cnncodes.extract import extract_images

    kw = dict(weights="none", out=tmp_path / "codes", device="cpu", workers=0, dtype="float32")
    fast = extract(flowers_small, "tiny", ["fc1"], **kw)
    exact = extract(flowers_small, "tiny", ["fc1"], decoder="pil", **kw)
    assert fast.path != exact.path and not exact.hit
    assert read_info(exact.path).fingerprint != read_info(fast.path).fingerprint
    a, b = load_codes(fast.path, "fc1"), load_codes(exact.path, "fc1")
    np.testing.assert_allclose(a.X, b.X, atol=0.05 * float(np.abs(b.X).max()))
    assert "decoder" not in b.spec["preprocessing"]  # Pillow: the spec of caches written before the choice
    for c in (a, b):  # new images get the preprocessing their training codes had, bit for bit
        # the same batch as the extraction: oneDNN's kernels may sum in another order for another batch
        # size (seen on Intel Xeon hosts), so only the same batch composition is bitwise
        again = extract_images([flowers_small / p for p in c.paths], spec=c.spec, layer_keys=["fc1"],
                               device="cpu", workers=0)
        np.testing.assert_array_equal(again["codes"]["fc1"], c.X)
    with pytest.raises(UsageError, match="'decoder' parameter"):
        extract(flowers_small, "tiny", ["fc1"], decoder="cv2", **kw)


def test_sparse_storage_holds_the_same_codes_through_appends(flowers_small, tmp_path):
    kw = dict(weights="none", device="cpu", workers=0, batch_size=4)
    extra = tmp_path / "extra"
    shutil.copytree(flowers_small, extra)
    moved = sorted(extra.rglob("*.jpg"))[:3]
    for p in moved:  # left out of the first run, added later
        p.rename(tmp_path / p.name)
    first = extract(extra, "tiny", ["fc1", "conv2"], out=tmp_path / "sparse", compression="sparse", **kw)
    for p in moved:
        p.parent.mkdir(exist_ok=True)
        (tmp_path / p.name).rename(p)
    app = extract(extra, "tiny", ["fc1"], out=tmp_path / "sparse", compression="sparse", **kw)
    assert app.path == first.path and app.n_computed == 3 and app.n_reused == 9
    # a new layer for the old rows: the old layers are read back through the sparse reader
    app = extract(extra, "tiny", ["fc1", "conv1"], pool="max", out=tmp_path / "sparse", compression="sparse", **kw)
    assert app.path == first.path and app.n_computed == 12 and app.keys == ["fc1", "conv1@max"]
    dense = extract(extra, "tiny", ["fc1", "conv2"], out=tmp_path / "dense", **kw)
    extract(extra, "tiny", ["conv1"], pool="max", out=tmp_path / "dense", **kw)
    for key in ("fc1", "conv2", "conv1@max"):
        a, b = load_codes(app.path, key), load_codes(dense.path, key)
        assert list(a.paths) == list(b.paths)
        np.testing.assert_array_equal(a.X, b.X)
    with h5py.File(app.path, "r") as f:
        assert all(f["codes"][k].attrs["layout"] == "sparse" for k in ("fc1", "conv2", "conv1@max"))


def _gated_dataset(flowers_small, gate):
    from cnncodes.backbones import get_backbone
    from cnncodes.extract import _ImageDataset

    paths = sorted(str(p) for p in flowers_small.rglob("*.jpg"))
    return _ImageDataset(paths, get_backbone("tiny").preprocessing, True, "torchvision", gate)


def test_gated_worker_decodes_only_while_the_gate_is_open(flowers_small):
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    gate = ctx.Event()  # closed, as during a forward pass
    ds = _gated_dataset(flowers_small, gate)
    done = ctx.Queue()
    worker = ctx.Process(target=lambda: done.put(ds[0][2]))
    worker.start()
    try:
        time.sleep(1.5)
        assert done.empty() and worker.is_alive()  # waiting, not decoding
        gate.set()
        assert done.get(timeout=30) == "ok"
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return "gone"


def test_gated_worker_exits_when_its_extraction_dies(flowers_small):
    """A worker waiting at a closed gate must not outlive a killed extraction."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("fork")
    pids = ctx.Queue()

    def extraction():  # owns the dataset and a worker, then dies without opening the gate
        gate = ctx.Event()
        ds = _gated_dataset(flowers_small, gate)
        worker = ctx.Process(target=lambda: ds[0])
        worker.start()
        pids.put(worker.pid)
        time.sleep(0.5)
        os._exit(1)

    parent = ctx.Process(target=extraction)
    parent.start()
    pid = pids.get(timeout=30)
    parent.join(30)
    deadline = time.monotonic() + 10
    while _state(pid) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.1)
    state = _state(pid)
    if state not in ("gone", "Z"):
        os.kill(pid, 9)
    assert state in ("gone", "Z"), f"worker {pid} still {state} after its extraction died"


def test_gated_and_ungated_extractions_give_the_same_codes(flowers_small, tmp_path, monkeypatch):
    kw = dict(weights="none", device="cpu", workers=2, batch_size=4)
    gated = extract(flowers_small, "tiny", ["fc1", "conv2"], out=tmp_path / "a", **kw)
    monkeypatch.setenv("CNNCODES_GATE", "0")
    free = extract(flowers_small, "tiny", ["fc1", "conv2"], out=tmp_path / "b", **kw)
    for key in ("fc1", "conv2"):
        np.testing.assert_array_equal(load_codes(gated.path, key).X, load_codes(free.path, key).X)


_HEAP_PROBE = """
import ctypes, torch
from cnncodes.extract import _heap_for_big_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_growth():
    before = libc.mallinfo2().hblkhd
    a = torch.ones(1 << 24)  # 64 MB, alive while we look
    grown = libc.mallinfo2().hblkhd - before
    del a
    return grown

default = mmapped_growth()
with _heap_for_big_blocks("cpu"):
    inside = mmapped_growth()
print(default, inside, mmapped_growth())
"""


def test_big_blocks_stay_in_the_heap_during_cpu_extraction():
    """During a CPU extraction a 64 MB tensor comes from the heap, not from mmap: glibc's mmap'ed blocks
    are unmapped on free and page-faulted in again at the next batch (half of the forward pass's time
    went to the kernel on these machines). glibc's defaults come back afterwards. A fresh process, as
    the CLI runs: in a long-lived one, free heap left by earlier work can serve the block either way."""
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], cwd=repo, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(repo)))
    default, inside, after = (int(v) for v in out.stdout.split())
    assert default >= 64 << 20  # glibc's default: mmap
    assert inside == 0  # from the heap, reused batch after batch
    assert after >= 64 << 20  # restored
