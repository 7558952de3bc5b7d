"""Bounded resources and argument checks: extreme aspect ratios, the pixel limit, every option's range."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from cnncodes import load_codes
from cnncodes.backbones import Preprocessing, build_model, get_backbone, resolve_weights
from cnncodes.errors import InvalidParameterError, UsageError
from cnncodes.extraction import extract, extract_images, resize_crop, resize_crop_tensor
from cnncodes.store import read_rows

# --------------------------------------------------------------------------- extreme aspect ratios


def _reference_window(w: int, h: int, resize: int) -> tuple[int, int, int, int] | None:
    """The documented bound, written out: an image whose resized long side would exceed 16 x resize
    keeps the centred 16 x short pixels of its long side (one more when that leaves unequal margins)."""
    short, long = min(w, h), max(w, h)
    if int(resize * long / short) <= 16 * resize:
        return None
    keep = 16 * short
    if (long - keep) % 2:
        keep += 1
    start = (long - keep) // 2
    return (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)


def _reference_pil(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    import torchvision.transforms as T

    window = _reference_window(*img.size, pre.resize)
    if window is not None:
        img = img.crop(window)
    tf = T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)), T.CenterCrop(pre.crop)])
    return np.asarray(tf(img))


def _reference_tensor(t: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    import torchvision.transforms.v2 as T

    window = _reference_window(t.shape[2], t.shape[1], pre.resize)
    if window is not None:
        left, top, right, bottom = window
        t = t[:, top:bottom, left:right]
    tf = T.Compose([T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation), antialias=True),
                    T.CenterCrop(pre.crop)])
    return tf(t)


# (w, h): cut (40,000 and 40,001 long: both parities), at the 16:1 bound (resized whole), just
# past it and cut to all of it, and 17:1
SHAPES = [(3, 40000), (40000, 3), (3, 40001), (100, 1600), (1601, 100), (100, 1700), (30, 900)]


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_extreme_aspect_ratios_resize_their_centre_window_as_torchvision_would(interp):
    rng = np.random.default_rng(1)
    for w, h in SHAPES:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        t = torch.from_numpy(a).permute(2, 0, 1)
        for resize, crop in [(256, 224), (36, 32)]:
            pre = Preprocessing(resize, crop, interp)
            np.testing.assert_array_equal(resize_crop(Image.fromarray(a), pre), _reference_pil(Image.fromarray(a), pre))
            torch.testing.assert_close(resize_crop_tensor(t, pre), _reference_tensor(t, pre), rtol=0, atol=0)
    # the window is the image's centre: a strip whose centre rows are white and the rest black
    strip = np.zeros((40000, 3, 3), np.uint8)
    strip[20000 - 24:20000 + 24] = 255
    out = resize_crop(Image.fromarray(strip), Preprocessing(256, 224, interp))
    assert out.min() == 255
    # at the bound and below, an image is resized whole: torchvision's unbounded result
    import torchvision.transforms as T

    img = Image.fromarray(rng.integers(0, 256, (1600, 100, 3), dtype=np.uint8))
    pre = Preprocessing(256, 224, interp)
    full = T.Compose([T.Resize(256, interpolation=T.InterpolationMode(interp)), T.CenterCrop(224)])(img)
    np.testing.assert_array_equal(resize_crop(img, pre), np.asarray(full))


_PEAK_SCRIPT = r"""
import json, resource, sys
from PIL import Image
import numpy as np
from cnncodes.backbones import Preprocessing
from cnncodes.extraction._pipeline import _ImageDataset

folder, decoder = sys.argv[1], sys.argv[2]
ds = _ImageDataset([f"{folder}/normal.png", f"{folder}/tall.png", f"{folder}/wide.png"],
                   Preprocessing(256, 224), True, decoder)
out = {"status": [ds[0][2]]}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["status"] += [ds[1][2], ds[2][2]]
out["peak_rise_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(out))
"""


def _extreme_pngs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (40000, 3, 3), dtype=np.uint8)).save(folder / "tall.png")
    Image.fromarray(rng.integers(0, 256, (3, 40000, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(folder / "normal.png")


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_extreme_aspect_pngs_cost_no_more_memory_than_a_normal_image(decoder, tmp_path):
    """Unbounded, a 3x40,000 PNG became 256x3,413,333 pixels: the peak rose by 2.6 GB (Pillow) to 5 GB."""
    _extreme_pngs(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), decoder], capture_output=True,
                          text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == ["ok", "ok", "ok"]
    assert out["peak_rise_mb"] < 50, out  # a decoded 3x40,000 image is 0.36 MB; the resize adds ~3 MB


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_extreme_aspect_pngs_extract_to_the_codes_of_the_bounded_transform(decoder, tmp_path):
    data = tmp_path / "data"
    _extreme_pngs(data / "strips")
    (data / "strips" / "normal.png").rename(data / "normal.png")
    (data / "photos").mkdir()
    (data / "normal.png").rename(data / "photos" / "normal.png")
    res = extract(data, "tiny", ["fc1"], weights="none", out=tmp_path / "codes", device="cpu", workers=0,
                  dtype="float32", decoder=decoder)
    codes = load_codes(res.path, "fc1")
    assert list(codes.status) == ["ok"] * 3 and res.n_failed == 0
    # by hand: the bounded transform's pixels through the same randomly initialised network
    spec = get_backbone("tiny")
    pre = spec.preprocessing
    model = build_model(spec, resolve_weights(spec, "none")).eval()
    pixels = []
    for rel in codes.paths:
        img = Image.open(data / rel).convert("RGB")
        if decoder == "pil":
            pixels.append(torch.from_numpy(_reference_pil(img, pre)).permute(2, 0, 1))
        else:
            pixels.append(_reference_tensor(torch.from_numpy(np.array(img)).permute(2, 0, 1), pre))
    x = torch.stack(pixels).float().div(255)
    x = (x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expect = model.classifier[:3](model.features(x)).numpy()
    np.testing.assert_allclose(codes.X, expect, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the pixel limit


def _folder_with_a_big_image(root: Path, size: tuple[int, int]) -> Path:
    for cls, shade in (("a", 40), ("b", 200)):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (60, 50), (shade, i * 90, 255 - shade)).save(root / cls / f"{i}.png")
    Image.new("RGB", size, (90, 140, 30)).save(root / "b" / "big.png")
    return root


def test_raising_the_pixel_limit_redoes_exactly_the_images_it_refused(tmp_path, caplog):
    data = _folder_with_a_big_image(tmp_path / "data", (100, 100))
    kw = dict(weights="none", out=tmp_path / "codes", device="cpu", workers=0, dtype="float32", error_budget=0.5)
    low = extract(data, "tiny", ["fc1"], max_pixels=9_999, **kw)
    rows = read_rows(low.path)
    i = list(rows["paths"]).index("b/big.png")
    assert rows["status"][i] == "error" and low.n_failed == 1
    assert "image has 10000 pixels, above the limit 9999; raise the max_pixels setting" in rows["message"][i]
    again = extract(data, "tiny", ["fc1"], max_pixels=9_999, **kw)
    assert again.hit  # the same limit: nothing to redo
    caplog.set_level("INFO")
    high = extract(data, "tiny", ["fc1"], max_pixels=10_000, **kw)
    assert not high.hit and high.n_computed == 1 and high.n_reused == 4
    assert "Retrying 1 image(s)" in caplog.text
    clean = extract(data, "tiny", ["fc1"], max_pixels=None, **dict(kw, out=tmp_path / "clean"))
    got, ref = load_codes(high.path, "fc1"), load_codes(clean.path, "fc1")
    assert list(got.status) == ["ok"] * 5
    # (alone in its batch, the retried image's codes may differ from a 5-image batch's in the last bit)
    np.testing.assert_allclose(got.X, ref.X, rtol=1e-5, atol=1e-7)
    # prediction's extractor takes the limit too
    out = extract_images([data / "b" / "big.png"], spec=got.spec, layer_keys=["fc1"], device="cpu", workers=0,
                         max_pixels=9_999)
    assert list(out["status"]) == ["error"] and "above the limit 9999" in out["messages"][0]
    out = extract_images([data / "b" / "big.png"], spec=got.spec, layer_keys=["fc1"], device="cpu", workers=0,
                         max_pixels=10_000)
    np.testing.assert_array_equal(out["codes"]["fc1"][0], got.X[list(got.paths).index("b/big.png")])


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_a_110_megapixel_photo_is_refused_by_default_and_taken_with_max_pixels(decoder, tmp_path, capsys):
    from cnncodes.cli_extract import main

    data = _folder_with_a_big_image(tmp_path / "data", (12_000, 9_200))  # 110.4 MP, a flat colour: 0.3 MB
    argv = [str(data), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out", str(tmp_path / "codes"),
            "--workers", "0", "--device", "cpu", "--error-budget", "0.5", "--decoder", decoder, "--no-progress"]
    assert main(argv) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    rows = read_rows(path)
    msg = rows["message"][list(rows["paths"]).index("b/big.png")]
    assert "image has 110400000 pixels, above the limit 89478485; raise the max_pixels setting" in msg
    assert main(argv + ["--max-pixels", "120000000"]) == 0
    codes = load_codes(capsys.readouterr().out.strip().splitlines()[-1], "fc1")
    assert list(codes.status) == ["ok"] * 5
    # a flat colour resizes to the same flat colour whatever its size: the codes of a small copy
    small = tmp_path / "small"
    (small / "b").mkdir(parents=True)
    Image.new("RGB", (120, 92), (90, 140, 30)).save(small / "b" / "big.png")
    ref = extract_images([small / "b" / "big.png"], spec=codes.spec, layer_keys=["fc1"], device="cpu", workers=0)
    np.testing.assert_allclose(codes.X[list(codes.paths).index("b/big.png")], ref["codes"]["fc1"][0], atol=1e-6)


# --------------------------------------------------------------------------- every option's range


def test_validation_messages_are_scikit_learns():
    from numbers import Integral, Real

    from cnncodes._validation import Interval, StrOptions, validate_params

    c = {"batch_size": [Interval(Integral, 1, None, closed="left")],
         "error_budget": [Interval(Real, 0, 1, closed="both")],
         "workers": [Interval(Integral, 0, None, closed="left"), None],
         "device": [StrOptions(("auto", "cpu"))]}
    cases = [
        ({"batch_size": 0}, "The 'batch_size' parameter of f must be an int in the range [1, inf). Got 0 instead."),
        ({"batch_size": True}, "Got True instead."),
        ({"batch_size": 2.0}, "Got 2.0 instead."),
        ({"error_budget": 2}, "must be a float in the range [0.0, 1.0]. Got 2 instead."),
        ({"error_budget": float("nan")}, "Got nan instead."),
        ({"workers": -1}, "must be an int in the range [0, inf) or None. Got -1 instead."),
        ({"device": "gpu"}, "must be a str among {'auto', 'cpu'}. Got 'gpu' instead."),
    ]
    for params, msg in cases:
        with pytest.raises(InvalidParameterError) as ei:
            validate_params(params, c, "f")
        assert msg in str(ei.value) and ei.value.param == next(iter(params))
        assert isinstance(ei.value, UsageError)
    validate_params({"batch_size": np.int64(3), "error_budget": 1, "workers": None, "device": "cpu", "other": -1},
                    c, "f")


EXTRACT_BAD = [
    (["--batch-size", "0"], "--batch-size", "must be an int in the range [1, inf). Got 0 instead."),
    (["--batch-size", "-4"], "--batch-size", "Got -4"),
    (["--batch-size", "x"], "--batch-size", "invalid int value"),
    (["--workers", "-1"], "--workers", "must be an int in the range [0, inf) or None. Got -1 instead."),
    (["--error-budget", "2"], "--error-budget", "must be a float in the range [0.0, 1.0]. Got 2.0 instead."),
    (["--error-budget", "-0.1"], "--error-budget", "Got -0.1"),
    (["--error-budget", "nan"], "--error-budget", "Got nan"),
    (["--max-pixels", "0"], "--max-pixels", "must be an int in the range [1, inf) or None. Got 0 instead."),
    (["--max-pixels", "-1"], "--max-pixels", "Got -1"),
    (["--grid", "0"], "--grid", "must be an int in the range [1, inf). Got 0 instead."),
    (["--device", "gpu"], "--device", "invalid choice"),
    (["--precision", "fp8"], "--precision", "invalid choice"),
    (["--precision", "fp16", "--device", "cpu"], "fp16", "needs --device cuda"),
    (["--dtype", "int8"], "--dtype", "invalid choice"),
    (["--compression", "bzip"], "--compression", "invalid choice"),
    (["--decoder", "cv2"], "--decoder", "invalid choice"),
    (["--pool", "median"], "pool", "Unknown pooling"),
    (["--weights", ""], "--weights", "must be a path"),
    (["--out", "AFILE"], "--out", "must be a folder"),
    (["--model", "tinyy"], "tinyy", "Did you mean 'tiny'"),
    (["--layers", "fc9"], "fc9", "Unknown layer"),
]


@pytest.mark.parametrize("extra, option, needle", EXTRACT_BAD, ids=[" ".join(e[0]) for e in EXTRACT_BAD])
def test_every_bad_extract_option_exits_2_before_any_work(extra, option, needle, tmp_path, capsys, monkeypatch):
    import cnncodes.extraction._api as extract_module
    from cnncodes.cli_extract import main

    data = _folder_with_a_big_image(tmp_path / "data", (20, 20))
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "codes"
    options = {"--model": "tiny", "--layers": "fc1", "--weights": "none", "--out": str(out), "--device": "cpu",
               "--workers": "0"}
    for flag, value in zip(extra[::2], extra[1::2]):  # the bad value replaces the good one
        options[flag] = {"AFILE": str(afile)}.get(value, value)
    argv = [str(data), *(x for kv in options.items() for x in kv), "--no-progress"]
    monkeypatch.setattr(extract_module, "_Runner", None)  # building a model would be a TypeError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("extract.py: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert option in err and needle in err, err
    assert not out.exists()  # nothing written
    assert not any(p.name.endswith(".h5") for p in tmp_path.rglob("*"))


def test_extract_api_checks_every_argument_before_any_work(tmp_path, monkeypatch):
    import cnncodes.extraction._api as extract_module

    monkeypatch.setattr(extract_module, "_Runner", None)
    data = _folder_with_a_big_image(tmp_path / "data", (20, 20))
    kw = dict(data=data, model="tiny", layers=["fc1"], weights="none", out=tmp_path / "codes", device="cpu",
              workers=0)
    bad = [("batch_size", 0), ("batch_size", True), ("workers", -1), ("workers", 1.5), ("error_budget", 2),
           ("error_budget", float("nan")), ("max_pixels", 0), ("device", "gpu"), ("dtype", "int8"),
           ("precision", "fp8"), ("decoder", "cv2"), ("compression", "bzip"), ("draft", "yes"), ("overwrite", 1),
           ("progress", None), ("name", 5), ("out", ""), ("layers", []), ("layers", 7), ("weights", None)]
    for param, value in bad:
        with pytest.raises(InvalidParameterError) as ei:
            extract(**{**kw, param: value})
        assert ei.value.param == param and str(ei.value).startswith(f"The {param!r} parameter of extract must be")
        assert f"Got {value!r} instead." in str(ei.value) and "--" not in str(ei.value)
    with pytest.raises(InvalidParameterError, match="The 'data' parameter of extract"):
        extract(**{**kw, "data": None})
    assert not (tmp_path / "codes").exists()
    spec = {"backbone": "tiny"}
    for param, value in [("batch_size", 0), ("workers", -2), ("max_pixels", -1), ("device", "tpu"),
                         ("layer_keys", []), ("paths", "one.png")]:
        args = {"paths": [data / "a" / "0.png"], "spec": spec, "layer_keys": ["fc1"], "device": "cpu",
                param: value}
        with pytest.raises(InvalidParameterError, match=rf"The '{param}' parameter of extract_images must be"):
            extract_images(**args)


def test_every_bad_predict_option_exits_2_before_any_work(tmp_path, capsys, monkeypatch):
    import cnncodes.predict as P
    from cnncodes.cli_predict import main

    def no_work(*_a, **_k):
        raise AssertionError("a model was loaded for a usage error")

    monkeypatch.setattr(P, "load_model", no_work)
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    monkeypatch.setattr(P, "find_model", lambda r, m: run / "models" / "fc1__svm.joblib")
    images = _folder_with_a_big_image(tmp_path / "data", (20, 20))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--batch-size", "0"], "--batch-size/-b", "must be an int in the range [1, inf). Got 0 instead."),
        (["--max-pixels", "0"], "--max-pixels", "Got 0 instead."),
        (["--device", "tpu"], "--device", "invalid choice"),
        (["--out", str(images)], "--out/-o", "must be a file name ending in .csv or .json"),
        (["--out", str(afile / "p.csv")], "--out/-o", "is a file"),
    ]
    for extra, option, needle in cases:
        assert main([str(run), str(images), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert option in err and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "data", "run"]  # nothing written
    for param, value in [("batch_size", 0), ("max_pixels", 0), ("device", "tpu"), ("model", 3)]:
        with pytest.raises(InvalidParameterError, match=rf"The '{param}' parameter of predict must be"):
            P.predict(run, [images], **{param: value})


def test_no_more_decoding_workers_than_batches(tmp_path):
    from cnncodes.extraction._pipeline import _loader

    data = _folder_with_a_big_image(tmp_path / "data", (20, 20))
    paths = sorted(str(p) for p in data.rglob("*.png"))
    loader, _ = _loader(paths, Preprocessing(36, 32), True, "pil", [[0, 1], [2, 3, 4]], 64, "cpu")
    assert loader.num_workers == 2
    assert [len(idx) for idx, *_ in loader] == [2, 3]
    loader, _ = _loader([], Preprocessing(36, 32), True, "pil", [], 4, "cpu")
    assert loader.num_workers == 0 and list(loader) == []
