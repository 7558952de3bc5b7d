"""``tiny``: a 2-conv network with random weights only, a fast stand-in for tests (same hook semantics as
AlexNet)."""

from __future__ import annotations

from ._registry import BackboneSpec, LayerDef, Preprocessing, _L, register_backbone
from ._weights import _no_default


def _tiny_layers() -> dict[str, LayerDef]:
    return _L(
        LayerDef("conv1", "features.1", "relu", "map", description="8 ch, after ReLU"),
        LayerDef("conv1.pre", "features.0", "pre", "map", description="8 ch, before ReLU"),
        LayerDef("conv2", "features.4", "relu", "map", description="16 ch, after ReLU"),
        LayerDef("fc1", "classifier.2", "relu", "vector", description="32-D, after ReLU"),
        LayerDef("fc1.pre", "classifier.1", "pre", "vector", description="32-D, before ReLU"),
        LayerDef("fc2", "classifier.3", "logits", "vector", description="10 logits"),
    )


def _tiny():
    import torch.nn as nn

    class TinyNet(nn.Module):
        """Two convs and two linears: a fast stand-in with the same hook semantics as AlexNet."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(4),
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    return TinyNet()


def register() -> None:
    register_backbone(BackboneSpec(
        "tiny", _tiny, Preprocessing(36, 32), _tiny_layers(), _no_default("tiny"),
        "A 2-conv test network (random weights only) for fast tests",
    ))
