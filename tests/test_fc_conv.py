"""Fully connected layers as convolutions: the same numbers at the native size, maps beyond it."""

from __future__ import annotations

import numpy as np
import pytest

from cnncodes.backbones import ResolvedWeights, build_model, get_backbone
from cnncodes.errors import UsageError
from cnncodes.fc_conv import with_fc_as_conv, with_input_size

torch = pytest.importorskip("torch")


def _models(name):
    spec = get_backbone(name)
    none = ResolvedWeights("none", "none")
    dense = build_model(spec, none)  # seed 0: the same random weights in both
    conv = build_model(with_fc_as_conv(spec), none)
    return spec, dense, conv


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
def test_conv_path_equals_dense_path_at_native_size(name):
    spec, dense, conv = _models(name)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        ref = dense(x)
        got = conv(x)
    assert got.shape == (2, 1000, 1, 1)
    np.testing.assert_allclose(got[:, :, 0, 0].numpy(), ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("name,size,grid", [("alexnet", 384, 6), ("alexnet", 448, 8), ("vgg16", 384, 6)])
def test_map_sizes(name, size, grid):
    _spec, _dense, conv = _models(name)
    fc7 = {}
    conv.classifier[5 if name == "alexnet" else 4].register_forward_hook(lambda m, i, o: fc7.setdefault("o", o))
    with torch.inference_mode():
        out = conv(torch.zeros(1, 3, size, size))
    assert out.shape == (1, 1000, grid, grid)
    assert fc7["o"].shape == (1, 4096, grid, grid)


def test_conv_weights_share_the_loaded_values():
    _spec, dense, conv = _models("alexnet")
    w = dense.classifier[1].weight
    cw = conv.classifier[1].weight
    assert cw.shape == (4096, 256, 6, 6)
    # torch.flatten order: (channel, row, column)
    assert torch.equal(cw[17, 3, 2, 5], w[17, 3 * 36 + 2 * 6 + 5])


def test_fc_layers_become_maps_and_other_backbones_are_refused():
    spec = with_fc_as_conv(get_backbone("alexnet"))
    assert spec.layers["fc7"].kind == "map" and spec.layers["conv5"].kind == "map"
    assert spec.arch_args["fc_as_conv"] is True
    with pytest.raises(UsageError, match="fc_as_conv"):
        with_fc_as_conv(get_backbone("resnet50"))


def test_input_size_keeps_the_resize_ratio():
    spec = get_backbone("alexnet")
    assert with_input_size(spec, 224) is spec
    pre = with_input_size(spec, 448).preprocessing
    assert (pre.resize, pre.crop) == (512, 448)
