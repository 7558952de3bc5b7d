"""The torchvision families: AlexNet, VGG16, ResNet-50, GoogLeNet, Inception v3, MobileNetV2 (their layers,
preprocessing and default weights through torchvision's cache)."""

from __future__ import annotations

from ._registry import BackboneSpec, LayerDef, Preprocessing, _L, register_backbone
from ._weights import _torchvision_default


def _alexnet_layers() -> dict[str, LayerDef]:
    convs = {1: 0, 2: 3, 3: 6, 4: 8, 5: 10}
    items = []
    for i, idx in convs.items():
        items.append(LayerDef(f"conv{i}", f"features.{idx + 1}", "relu", "map", description=f"conv{i} after ReLU"))
        items.append(LayerDef(f"conv{i}.pre", f"features.{idx}", "pre", "map", description=f"conv{i} before ReLU"))
    items += [
        LayerDef("pool5", "features.12", "relu", "map", description="conv5 after ReLU and max-pool (256x6x6)"),
        LayerDef("fc6", "classifier.2", "relu", "vector", description="4096-D, after ReLU"),
        LayerDef("fc6.pre", "classifier.1", "pre", "vector", description="4096-D, before ReLU"),
        LayerDef("fc7", "classifier.5", "relu", "vector", description="4096-D, after ReLU (the classic CNN code)"),
        LayerDef("fc7.pre", "classifier.4", "pre", "vector", description="4096-D, before ReLU"),
        LayerDef("fc8", "classifier.6", "logits", "vector", description="1000 ImageNet logits"),
    ]
    return _L(*items)


def _vgg16_layers() -> dict[str, LayerDef]:
    blocks = [2, 2, 3, 3, 3]
    items, idx = [], 0
    for b, n in enumerate(blocks, start=1):
        for j in range(1, n + 1):
            items.append(LayerDef(f"conv{b}_{j}", f"features.{idx + 1}", "relu", "map", description="after ReLU"))
            items.append(LayerDef(f"conv{b}_{j}.pre", f"features.{idx}", "pre", "map", description="before ReLU"))
            idx += 2
        items.append(LayerDef(f"pool{b}", f"features.{idx}", "relu", "map", description=f"block {b} max-pool"))
        idx += 1
    items += [
        LayerDef("fc6", "classifier.1", "relu", "vector", description="4096-D, after ReLU"),
        LayerDef("fc6.pre", "classifier.0", "pre", "vector", description="4096-D, before ReLU"),
        LayerDef("fc7", "classifier.4", "relu", "vector", description="4096-D, after ReLU"),
        LayerDef("fc7.pre", "classifier.3", "pre", "vector", description="4096-D, before ReLU"),
        LayerDef("fc8", "classifier.6", "logits", "vector", description="1000 ImageNet logits"),
    ]
    return _L(*items)


def _resnet50_layers() -> dict[str, LayerDef]:
    return _L(
        LayerDef("conv1", "relu", "relu", "map", description="stem conv+BN+ReLU (64 ch)"),
        *[LayerDef(f"layer{i}", f"layer{i}", "relu", "map", description=f"stage {i} output") for i in range(1, 5)],
        LayerDef("pool", "avgpool", "relu", "map", description="2048-D global average pool"),
        LayerDef("fc", "fc", "logits", "vector", description="1000 ImageNet logits"),
    )


def _googlenet_layers() -> dict[str, LayerDef]:
    blocks = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    return _L(
        *[LayerDef(f"conv{i}", f"conv{i}", "relu", "map", description="conv+BN+ReLU") for i in (1, 2, 3)],
        *[LayerDef(f"inception{b}", f"inception{b}", "relu", "map", description="inception block") for b in blocks],
        LayerDef("pool", "avgpool", "relu", "map", description="1024-D global average pool"),
        LayerDef("fc", "fc", "logits", "vector", description="1000 ImageNet logits"),
    )


def _inception_layers() -> dict[str, LayerDef]:
    mixed = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
    return _L(
        LayerDef("conv4a", "Conv2d_4a_3x3", "relu", "map", description="last stem conv (192 ch)"),
        *[LayerDef(f"mixed_{m}", f"Mixed_{m}", "relu", "map", description="inception block") for m in mixed],
        LayerDef("pool", "avgpool", "relu", "map", description="2048-D global average pool"),
        LayerDef("fc", "fc", "logits", "vector", description="1000 ImageNet logits"),
    )


def _mobilenet_v2_layers() -> dict[str, LayerDef]:
    return _L(
        LayerDef("conv0", "features.0", "relu6", "map", description="stem conv+BN+ReLU6"),
        *[
            LayerDef(f"block{i}.linear", f"features.{i}", "linear", "map", description="inverted residual (linear bottleneck)")
            for i in range(1, 18)
        ],
        LayerDef("conv_last", "features.18", "relu6", "map", description="1280-ch conv+BN+ReLU6"),
        LayerDef("pool", "features.18", "relu6", "map", fixed_pool="avg", description="1280-D global average pool"),
        LayerDef("logits", "classifier.1", "logits", "vector", description="1000 ImageNet logits"),
    )


def _tv(name: str, **kw):
    def build():
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kw)

    return build


_TV_PRE = Preprocessing(256, 224, "bilinear")  # torchvision's ImageClassification preset for most weights


def register() -> None:
    # Preprocessing equals each weights enum's transforms() (checked by tests/test_backbones.py),
    # written out so that listing layers needs no torchvision import.
    tv = [
        ("alexnet", "AlexNet_Weights.IMAGENET1K_V1", _TV_PRE, _alexnet_layers, {},
         "AlexNet (torchvision); fc7 is the classic 4096-D CNN code"),
        ("vgg16", "VGG16_Weights.IMAGENET1K_V1", _TV_PRE, _vgg16_layers, {}, "VGG16 (torchvision)"),
        ("resnet50", "ResNet50_Weights.IMAGENET1K_V2", Preprocessing(232, 224), _resnet50_layers, {},
         "ResNet-50 (torchvision)"),
        ("googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", _TV_PRE, _googlenet_layers,
         {"aux_logits": False, "transform_input": True, "init_weights": False}, "GoogLeNet (torchvision)"),
        ("inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", Preprocessing(342, 299), _inception_layers,
         {"aux_logits": False, "transform_input": True, "init_weights": False}, "Inception v3 (torchvision), 299 px"),
        ("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V2", Preprocessing(232, 224), _mobilenet_v2_layers, {},
         "MobileNetV2 (torchvision)"),
    ]
    aux_heads = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
    for name, enum_path, pre, layers, kw, desc in tv:
        register_backbone(BackboneSpec(name, _tv(name, **kw), pre, layers(), _torchvision_default(enum_path), desc,
                                       dict(kw, weights_enum=enum_path), aux_heads.get(name, ())))
