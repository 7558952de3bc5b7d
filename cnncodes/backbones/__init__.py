"""Backbones: the registry of networks (architecture, weights, preprocessing, named layers).

- :mod:`._registry`: :class:`BackboneSpec`, :class:`LayerDef`, :class:`Preprocessing`, look-up by name;
- :mod:`._weights`: where weights come from, their sha256, :func:`build_model`;
- :mod:`._torchvision`, :mod:`._lite0`, :mod:`._tiny`: the families, each registering its backbones;
- :mod:`._chains`: a network's forward pass as stages, to split it at a layer (fine-tuning).

Building a network imports torch; looking specs up does not (the store and the classifiers never
import torch).
"""

from . import _lite0, _tiny, _torchvision
from ._chains import Stage, backbone_chain, classifier_node, run_stages, split_index
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    LayerDef,
    Preprocessing,
    ResolvedWeights,
    get_backbone,
    list_backbones,
    register_backbone,
    resolve_layer_alias,
)
from ._weights import build_model, resolve_weights, sha256_file

__all__ = [
    "Preprocessing",
    "LayerDef",
    "BackboneSpec",
    "ResolvedWeights",
    "register_backbone",
    "get_backbone",
    "list_backbones",
    "resolve_weights",
    "build_model",
    "sha256_file",
    "Stage",
    "backbone_chain",
    "classifier_node",
    "run_stages",
    "split_index",
    "resolve_layer_alias",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

for _family in (_torchvision, _lite0, _tiny):  # the order the registry always had
    _family.register()
del _family
