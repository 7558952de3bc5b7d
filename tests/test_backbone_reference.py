"""Each torchvision backbone computes what torchvision computes with the same weights file.

No ImageNet weights can be had offline, so each case writes a random state dict in the layout
torchvision's own weights file has (GoogLeNet and Inception v3 files hold their training-only
auxiliary classifiers), loads it into torchvision's builder exactly as ``weights=DEFAULT`` would
(its download replaced by the file), preprocesses with ``weights.transforms()`` and compares the
class scores with the codes cnncodes stores. That checks architecture, builder arguments, weights
loading and preprocessing (resize, crop, interpolation, mean/std, input size) in one number.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, link_subset

from cnncodes import backbones as B
from cnncodes import load_codes
from cnncodes.extract import extract

LAST_LAYER = {"alexnet": "fc8", "vgg16": "fc8", "resnet50": "fc", "googlenet": "fc", "inception_v3": "fc",
              "mobilenet_v2": "logits"}


def _random_weights_file(name: str, path) -> dict:
    import torchvision.models as tvm

    torch.manual_seed(7)
    kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}  # their init is slow
    model = getattr(tvm, name)(weights=None, **kw)  # aux heads included, as in the real files
    # BatchNorm statistics of random inputs: with the initial ones GoogLeNet's tiny initial weights
    # give every photo the same scores, and the comparison would prove nothing
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
    size = B.get_backbone(name).preprocessing.crop
    with torch.no_grad():
        model.train()(torch.randn(2, 3, size, size))
    sd = model.state_dict()
    torch.save(sd, path)
    return sd


def _torchvision_reference(name: str, sd: dict, monkeypatch):
    """torchvision's model for its default weights, with ``sd`` served instead of the download."""
    import torchvision.models as tvm
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *a, **k: sd)
    enum_name, member = B.get_backbone(name).arch_args["weights_enum"].split(".")
    weights = getattr(getattr(tvm, enum_name), member)
    return getattr(tvm, name)(weights=weights).eval(), weights.transforms()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAST_LAYER))
def test_class_scores_equal_torchvision_with_the_same_weights_file(name, tmp_path, monkeypatch):
    from PIL import Image

    data = link_subset(HYMENOPTERA / "val", tmp_path / "data", 2)  # 4 full-size, non-square photos
    sd = _random_weights_file(name, tmp_path / f"{name}.pth")
    layer = LAST_LAYER[name]
    res = extract(data, name, [layer], weights=str(tmp_path / f"{name}.pth"), out=tmp_path / "codes",
                  device="cpu", batch_size=4, workers=0, dtype="float32", draft=False, decoder="pil")
    codes = load_codes(res.path, layer)
    model, transforms = _torchvision_reference(name, sd, monkeypatch)
    x = torch.stack([transforms(Image.open(data / p).convert("RGB")) for p in codes.paths])
    with torch.inference_mode():
        ref = model(x).numpy()
    assert codes.X.shape == ref.shape == (4, 1000)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(codes.X, ref, rtol=1e-3, atol=1e-3 * scale)
    assert np.abs(ref[0] - ref[1]).max() > 1e-2 * scale, "different photos must give different scores"
