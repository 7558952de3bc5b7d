"""Several views per image and FC layers as convolutions, through the whole extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, link_subset, need

from conftest import tiny_fc1_by_hand
from cnncodes import load_codes
from cnncodes.backbones import get_backbone
from cnncodes.cli_extract import main as extract_main
from cnncodes.errors import UsageError
from cnncodes.extraction import extract, extract_images
from cnncodes.store import read_info
from cnncodes.views import combine_codes, parse_views


@pytest.fixture
def tiny_weights(tmp_path):
    """Fixed random weights for the tiny test network, as a local state-dict file."""
    torch.manual_seed(7)
    model = get_backbone("tiny").build()
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def photos(tmp_path):
    """6 full-size JPEG photos (about 500x375, landscape and portrait): crops differ."""
    return link_subset(need(HYMENOPTERA) / "train", tmp_path / "hym", 3)


# ------------------------------------------------------------------ each view equals torchvision's transform


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
@pytest.mark.parametrize("views", ["center", "flip", "5crop", "10crop", "multiscale:256,320"])
def test_each_view_equals_torchvision_transform(photos, views, decoder):
    import torchvision.transforms.v2 as T
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from cnncodes.backbones import Preprocessing
    from cnncodes.extraction._pipeline import _ImageDataset
    from cnncodes.views import resolve

    pre = Preprocessing(256, 224, "bilinear")
    vs = resolve(views, pre)
    paths = sorted(str(p) for p in photos.rglob("*.jpg"))
    ds = _ImageDataset(paths, pre, False, decoder, views=vs)

    def by_hand(img):
        resize = T.Resize(256, antialias=True)
        if vs.kind == "center":
            return [T.CenterCrop(224)(resize(img))]
        if vs.kind == "flip":
            c = T.CenterCrop(224)(resize(img))
            return [c, T.RandomHorizontalFlip(p=1.0)(c)]
        if vs.kind == "5crop":
            return list(T.FiveCrop(224)(resize(img)))
        if vs.kind == "10crop":
            return list(T.TenCrop(224)(resize(img)))
        return [T.CenterCrop(224)(T.Resize(s, antialias=True)(img)) for s in vs.scales]

    for i, p in enumerate(paths):
        _, got, status, _ = ds[i]
        assert status == "ok"
        if decoder == "torchvision":
            want = torch.stack(by_hand(decode_image(p, mode=ImageReadMode.RGB)))
        else:
            want = torch.stack([torch.from_numpy(np.asarray(v)).permute(2, 0, 1)
                                for v in by_hand(Image.open(p).convert("RGB"))])
        assert got.shape == (vs.count(), 3, 224, 224)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_views_are_parsed_and_bad_ones_refused():
    assert parse_views("10crop").count() == 10
    assert parse_views("multiscale:256,320,384").scales == (256, 320, 384)
    for bad in ["12crop", "multiscale:", "multiscale:a,b", "multiscale:256,256", ""]:
        with pytest.raises(UsageError, match="'views' parameter of extract must be one of"):
            parse_views(bad)


def test_combine_codes_takes_mean_or_max_over_adjacent_views():
    codes = np.arange(12, dtype=np.float32).reshape(6, 2)  # 3 images x 2 views
    np.testing.assert_array_equal(combine_codes(codes, 2, "mean"), [[1, 2], [5, 6], [9, 10]])
    np.testing.assert_array_equal(combine_codes(codes, 2, "max"), [[2, 3], [6, 7], [10, 11]])


# ------------------------------------------------------------------ combined codes = combination of per-view codes


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_combined_code_is_the_combination_of_each_views_code(photos, tmp_path, tiny_weights, combine):
    import torchvision.transforms.v2 as T
    from torchvision.io import ImageReadMode, decode_image

    res = extract(photos, "tiny", ["fc1"], weights=str(tiny_weights), out=tmp_path / "codes", device="cpu",
                  workers=0, dtype="float32", views="10crop", combine=combine, batch_size=4, draft=False)
    c = load_codes(res.path, "fc1")
    pre = get_backbone("tiny").preprocessing
    for row, rel in enumerate(c.paths):
        img = decode_image(str(photos / rel), mode=ImageReadMode.RGB)
        views = torch.stack(list(T.TenCrop(pre.crop)(T.Resize(pre.resize, antialias=True)(img))))
        per_view = tiny_fc1_by_hand(tiny_weights, views)
        want = per_view.mean(0) if combine == "mean" else per_view.max(0)
        np.testing.assert_allclose(c.X[row], want, rtol=1e-4, atol=1e-5)


def test_views_are_part_of_the_fingerprint_and_predict_uses_the_recorded_ones(photos, tmp_path, tiny_weights):
    kw = dict(weights=str(tiny_weights), out=tmp_path / "codes", device="cpu", workers=0, dtype="float32")
    centre = extract(photos, "tiny", ["fc1"], **kw)
    ten = extract(photos, "tiny", ["fc1"], views="10crop", **kw)
    ten_max = extract(photos, "tiny", ["fc1"], views="10crop", combine="max", **kw)
    assert len({centre.path, ten.path, ten_max.path}) == 3
    assert len({read_info(r.path).fingerprint for r in (centre, ten, ten_max)}) == 3
    assert extract(photos, "tiny", ["fc1"], views="10crop", **kw).hit
    assert extract(photos, "tiny", ["fc1"], **kw).hit
    # an old cache without views in its spec stays the centre crop: same fingerprint as before views existed
    assert "views" not in read_info(centre.path).spec["preprocessing"]
    info = read_info(ten.path)
    assert info.spec["preprocessing"]["views"] == "10crop"
    c = load_codes(ten.path, "fc1")
    again = extract_images([photos / p for p in c.paths], spec=info.spec, layer_keys=["fc1"], device="cpu", workers=0)
    np.testing.assert_allclose(again["codes"]["fc1"], c.X, rtol=1e-6, atol=1e-7)


def test_bad_views_and_input_sizes_are_usage_errors(photos, tmp_path, capsys):
    base = [str(photos), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out", str(tmp_path / "c")]
    cases = [
        (["--views", "7crop"], "argument --views: must be one of center"),
        (["--views", "multiscale:16"], "argument --views: must not resize below the 32 px crop"),
        (["--combine", "median"], "argument --combine: invalid choice"),
        (["--input-size", "0"], "argument --input-size: must be an int in the range [32, 4096] or None"),
        (["--fc-as-conv"], "argument --fc-as-conv: is defined for alexnet, vgg16 only"),
    ]
    for args, message in cases:
        assert extract_main(base + args) == 2, args
        assert message in capsys.readouterr().err
    alex = [str(photos), "--model", "alexnet", "--weights", "none", "--layers", "fc7", "--out", str(tmp_path / "c")]
    assert extract_main(alex + ["--fc-as-conv", "--input-size", "200"]) == 2
    assert "argument --input-size: must be >= 224 with fc_as_conv" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ FC layers as convolutions, end to end


@pytest.mark.slow
def test_alexnet_fc_as_conv_at_224_equals_plain_fc7_and_448_gives_8x8_maps(photos, tmp_path, alexnet_state_dict):
    kw = dict(weights=str(alexnet_state_dict), out=tmp_path / "codes", device="cpu", workers=0, dtype="float32",
              batch_size=3)
    plain = load_codes(extract(photos, "alexnet", ["fc7"], **kw).path, "fc7").X
    conv = load_codes(extract(photos, "alexnet", ["fc7"], fc_as_conv=True, input_size=224, **kw).path, "fc7").X
    np.testing.assert_allclose(conv, plain, rtol=1e-5, atol=1e-5 * float(np.abs(plain).max()))
    big = extract(photos, "alexnet", ["fc7", "fc8"], fc_as_conv=True, input_size=448, pool="none", **kw)
    info = read_info(big.path)
    assert info.layers["fc7@none"].map_shape == (4096, 8, 8)
    assert info.layers["fc7@none"].dim == 4096 * 64
    assert info.spec["arch_args"]["fc_as_conv"] is True and info.spec["preprocessing"]["crop"] == 448
    maps = load_codes(big.path, "fc7@none").X.reshape(-1, 4096, 8, 8)
    assert maps.min() >= 0  # post-ReLU, as every fc code
    # the same sliding classifier, max-pooled, is the max over the spatial map
    pooled = extract(photos, "alexnet", ["fc7"], fc_as_conv=True, input_size=448, pool="max", **kw)
    np.testing.assert_allclose(load_codes(pooled.path, "fc7@max").X, maps.max((2, 3)), rtol=1e-6)
    # predict rebuilds the converted network from the recorded spec
    again = extract_images([photos / p for p in load_codes(pooled.path, "fc7@max").paths],
                           spec=read_info(pooled.path).spec, layer_keys=["fc7@max"], device="cpu", workers=0)
    np.testing.assert_allclose(again["codes"]["fc7@max"], load_codes(pooled.path, "fc7@max").X, rtol=1e-6)


@pytest.mark.parametrize("views", ["10crop", "multiscale:36,48"])
def test_views_of_an_extreme_strip_are_cut_from_its_bounded_centre(views):
    """A 3 x 40,000 strip must not be resized whole (gigabytes): views come from its centred 16:1 window."""
    import dataclasses

    from PIL import Image

    from cnncodes.transforms import MAX_RESIZED_ASPECT, _PIL_RESAMPLE, _source_window
    from cnncodes.views import pil_views, resolve, tensor_views

    pre = get_backbone("tiny").preprocessing
    vs = resolve(views, pre)
    strip = torch.randint(0, 256, (3, 3, 40_000), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    left, top, right, bottom = _source_window(40_000, 3, dataclasses.replace(pre, resize=max((pre.resize, *vs.scales))))
    assert (top, bottom) == (0, 3) and right - left <= MAX_RESIZED_ASPECT * 3 + 1
    window = strip[:, :, left:right]
    got = tensor_views(strip, pre, vs)
    assert got.shape == (vs.count(), 3, pre.crop, pre.crop)
    torch.testing.assert_close(got, tensor_views(window, pre, vs), rtol=0, atol=0)
    img = Image.fromarray(strip.permute(1, 2, 0).numpy())
    got_pil = pil_views(img, pre, vs, _PIL_RESAMPLE[pre.interpolation])
    want_pil = pil_views(img.crop((left, top, right, bottom)), pre, vs, _PIL_RESAMPLE[pre.interpolation])
    np.testing.assert_array_equal(got_pil, want_pil)
