"""The backbone registry: every alias resolves, post-ReLU layers are >= 0, preprocessing equals torchvision's."""

from __future__ import annotations

import pytest
import torch

from cnncodes import backbones as B
from cnncodes.errors import UnknownBackboneError, UnknownLayerError, WeightsError, WeightsUnavailableError

TV = ["alexnet", "vgg16", "resnet50", "googlenet", "inception_v3", "mobilenet_v2"]
POOL_DIMS = {"resnet50": 2048, "googlenet": 1024, "inception_v3": 2048, "mobilenet_v2": 1280,
             "efficientnet_lite0": 1280, "efficientnet_lite0_symmetric": 1280}


def test_registry_holds_the_issue_backbones():
    assert set(TV + ["efficientnet_lite0", "efficientnet_lite0_symmetric", "tiny"]) <= set(B.list_backbones())


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        B.register_backbone(B.get_backbone("alexnet"))


def test_unknown_backbone_and_layer_hint():
    with pytest.raises(UnknownBackboneError, match="Did you mean 'alexnet'") as e:
        B.get_backbone("alexnett")
    assert isinstance(e.value, KeyError)
    with pytest.raises(UnknownLayerError, match=r"Did you mean 'fc7'.*Known: conv1") as e:
        B.get_backbone("alexnet").layer("fc77")


@pytest.mark.parametrize("name", TV)
def test_preprocessing_equals_torchvision_weights(name):
    import torchvision.models as tvm

    spec = B.get_backbone(name)
    enum_name, member = spec.arch_args["weights_enum"].split(".")
    w = getattr(getattr(tvm, enum_name), member)
    t = w.transforms()
    pre = spec.preprocessing
    assert (pre.resize, pre.crop) == (t.resize_size[0], t.crop_size[0])
    assert pre.interpolation == t.interpolation.value
    assert list(pre.mean) == list(t.mean) and list(pre.std) == list(t.std)
    assert w.url.endswith(".pth")


def test_inception_is_299():
    assert B.get_backbone("inception_v3").preprocessing.crop == 299


@pytest.mark.parametrize("name", TV + ["efficientnet_lite0", "efficientnet_lite0_symmetric", "tiny"])
def test_every_layer_resolves_and_post_relu_is_nonnegative(name):
    from cnncodes.extract import _Runner, plan_layers

    spec = B.get_backbone(name)
    plan = plan_layers(spec, list(spec.layers), "avg", "fp")
    r = _Runner(spec, B.ResolvedWeights("none", "random-init:seed=0"), plan, "cpu", "fp32")
    modules = dict(r.model.named_modules())
    for ld in spec.layers.values():
        assert ld.node in modules, f"{name}.{ld.alias} -> {ld.node} is not a module"
    assert not any(getattr(m, "inplace", False) is True for m in r.model.modules())
    x = torch.randint(0, 256, (2, 3, spec.preprocessing.crop, spec.preprocessing.crop), dtype=torch.uint8)
    out = r(x)
    assert set(out) == {k for _l, _p, k, _f in plan}
    for ld, _p, key, _f in plan:
        v = out[key]
        assert v.shape[0] == 2 and v.shape[1] > 0 and v.dtype.name == "float32"
        if ld.nonnegative:
            assert v.min() >= 0, f"{name}.{key} should be post-ReLU"
    if name in POOL_DIMS:
        assert out["pool"].shape[1] == POOL_DIMS[name]


def test_alexnet_dims():
    from cnncodes.extract import _Runner, plan_layers

    spec = B.get_backbone("alexnet")
    plan = plan_layers(spec, ["conv5", "pool5", "fc6", "fc7", "fc8"], "none", "fp")
    r = _Runner(spec, B.ResolvedWeights("none", "random-init:seed=0"), plan, "cpu", "fp32")
    out = r(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert out["conv5@none"].shape[1] == 256 * 13 * 13
    assert out["pool5@none"].shape[1] == 256 * 6 * 6
    assert out["fc6"].shape[1] == out["fc7"].shape[1] == 4096 and out["fc8"].shape[1] == 1000


def test_default_weights_use_torchvision_cache_file(tmp_path, monkeypatch, alexnet_state_dict):
    import shutil

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    spec = B.get_backbone("alexnet")
    expected = tmp_path / "th" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    expected.parent.mkdir(parents=True)
    shutil.copy(alexnet_state_dict, expected)
    w = B.resolve_weights(spec, "default")
    assert w.kind == "default" and w.path == str(expected)
    assert w.identity == "AlexNet_Weights.IMAGENET1K_V1:alexnet-owt-7be5be79.pth"
    model = B.build_model(spec, w)
    ref = torch.load(alexnet_state_dict, weights_only=True)
    assert torch.equal(model.classifier[4].weight, ref["classifier.4.weight"])


def test_default_weights_missing_and_offline_names_the_file(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    calls = []

    def offline(url, dst, *a, **k):
        calls.append((url, dst))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as e:
        B.resolve_weights(B.get_backbone("vgg16"), "default")
    msg = str(e.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg and "--weights none" in msg
    assert calls and calls[0][0].endswith("vgg16-397923af.pth")  # the real download path was tried


def test_default_weights_download_path_is_real(tmp_path, monkeypatch, alexnet_state_dict):
    import shutil

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def fake_download(url, dst, *a, **k):  # a local "server": copies the file like a download would
        shutil.copy(alexnet_state_dict, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    w = B.resolve_weights(B.get_backbone("alexnet"), "default")
    assert w.path.endswith("alexnet-owt-7be5be79.pth")
    assert (tmp_path / "th" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()


def test_weights_file_that_does_not_fit(tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(3)}, p)
    with pytest.raises(WeightsError, match="does not fit"):
        B.build_model(B.get_backbone("tiny"), B.resolve_weights(B.get_backbone("tiny"), p))
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        B.resolve_weights(B.get_backbone("tiny"), tmp_path / "missing.pth")


def test_packaged_lite0_weights_map_onto_timm():
    spec = B.get_backbone("efficientnet_lite0")
    w = B.resolve_weights(spec, "default")
    assert w.kind == "default" and w.sha256.startswith("57934424")  # the hex in the file name
    model = B.build_model(spec, w)
    raw = torch.load(w.path, weights_only=True)
    assert torch.equal(model.classifier.weight, raw["_fc.weight"])
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
