"""Split a backbone at a layer: its forward pass as a chain of stages (for fine-tuning).

Fine-tuning needs to run a network "from layer L onward": the prefix up to L is frozen (and its
output can be cached as codes), the rest is trained. A backbone's forward pass is written here as
a chain of stages, each the call of one module (plus the functional glue around it, such as a
flatten); running the whole chain equals ``model(x)`` (checked by tests/test_finetune.py for every
chain). The output of the stage whose module is a layer's node is that layer's (unpooled) code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UnknownBackboneError, UsageError
from ._registry import BackboneSpec, resolve_layer_alias


@dataclass(frozen=True)
class Stage:
    """One step of a backbone's forward pass: ``x -> module(pre(x))``.

    Attributes
    ----------
    node : str
        Dotted path of the module called; its parameters belong to this stage.
    pre : str
        Functional glue before the call: ``""`` (none), ``"flatten"``, ``"avgflatten"``
        (global average pool + flatten), ``"dropout"`` (the model's ``drop_rate``, timm).
    """

    node: str
    pre: str = ""


def _seq(prefix: str, n: int) -> list[Stage]:
    return [Stage(f"{prefix}.{i}") for i in range(n)]


def _efficientnet_chain(model) -> list[Stage]:
    # timm EfficientNet (efficientnet_lite0 and the TF-padded tf_efficientnet_lite0 alike):
    # forward_features = conv_stem, bn1 (BN+act), blocks, conv_head, bn2; forward_head =
    # global_pool (flattens), dropout(drop_rate), classifier
    return [Stage("conv_stem"), Stage("bn1"), *_seq("blocks", len(model.blocks)), Stage("conv_head"),
            Stage("bn2"), Stage("global_pool"), Stage("classifier", "dropout")]


def _features_classifier_chain(model, pool: str = "avgpool") -> list[Stage]:
    # torchvision AlexNet / VGG: features, avgpool, flatten, classifier
    return [*_seq("features", len(model.features)), Stage(pool),
            Stage("classifier.0", "flatten"), *_seq("classifier", len(model.classifier))[1:]]


def _resnet_chain(model) -> list[Stage]:
    return [Stage("conv1"), Stage("bn1"), Stage("relu"), Stage("maxpool"),
            *[Stage(f"layer{i}") for i in range(1, 5)], Stage("avgpool"), Stage("fc", "flatten")]


def _mobilenet_v2_chain(model) -> list[Stage]:
    return [*_seq("features", len(model.features)), Stage("classifier.0", "avgflatten"), Stage("classifier.1")]


def _tiny_chain(model) -> list[Stage]:
    return [*_seq("features", len(model.features)), *_seq("classifier", len(model.classifier))]


#: backbone name -> (chain builder, node of the classifier that fine-tuning replaces).
#: GoogLeNet and Inception v3 have none (input transform, aux heads): they fine-tune whole only.
_CHAINS: dict[str, tuple[Callable, str]] = {
    "efficientnet_lite0": (_efficientnet_chain, "classifier"),
    "efficientnet_lite0_symmetric": (_efficientnet_chain, "classifier"),
    "alexnet": (_features_classifier_chain, "classifier.6"),
    "vgg16": (_features_classifier_chain, "classifier.6"),
    "resnet50": (_resnet_chain, "fc"),
    "mobilenet_v2": (_mobilenet_v2_chain, "classifier.1"),
    "tiny": (_tiny_chain, "classifier.3"),
}
_HEADS_ONLY = {"googlenet": "fc", "inception_v3": "fc"}


def classifier_node(name: str) -> str:
    """Module path of ``name``'s ImageNet classifier (the layer fine-tuning replaces)."""
    if name in _CHAINS:
        return _CHAINS[name][1]
    if name in _HEADS_ONLY:
        return _HEADS_ONLY[name]
    raise UnknownBackboneError(f"Backbone {name!r} has no known classifier layer to replace")


def backbone_chain(name: str, model) -> list[Stage]:
    """The forward pass of ``model`` (built from backbone ``name``) as a list of stages.

    Raises
    ------
    UsageError
        For a backbone without a chain (its forward pass cannot be split).
    """
    if name not in _CHAINS:
        raise UsageError(
            f"Backbone {name!r} cannot be split at a layer (no stage chain is defined for it); "
            f"fine-tune it whole (freeze_to='none'). Splittable: {', '.join(sorted(_CHAINS))}."
        )
    return _CHAINS[name][0](model)


def run_stages(model, stages: Sequence[Stage], x):
    """Run ``stages`` of ``model`` on ``x`` in order (a slice of :func:`backbone_chain`)."""
    import torch
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    for st in stages:
        if st.pre == "flatten":
            x = torch.flatten(x, 1)
        elif st.pre == "avgflatten":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif st.pre == "dropout":
            p = float(getattr(model, "drop_rate", 0.0) or 0.0)
            if p > 0:
                x = F.dropout(x, p=p, training=model.training)
        x = modules[st.node](x)
    return x


def split_index(spec: BackboneSpec, stages: Sequence[Stage], alias: str) -> int:
    """Index of the stage whose output is layer ``alias``'s code (the last frozen stage).

    ``alias`` may also be a unique prefix of aliases up to a dot (``block4`` for ``block4.linear``).

    Raises
    ------
    UnknownLayerError
        An unknown alias.
    UsageError
        A layer that is not the output of a whole stage (e.g. a pre-activation inside a block,
        a pooled alias of a feature map).
    """
    ld = resolve_layer_alias(spec, alias)
    nodes = [s.node for s in stages]
    # a pooled alias of a map another alias names (MobileNetV2 "pool" on features.18) is not that stage's output
    pooled_map = ld.fixed_pool and any(d.node == ld.node and not d.fixed_pool for d in spec.layers.values())
    if ld.node not in nodes or pooled_map:
        whole = [a for a, d in spec.layers.items() if d.node in nodes and (not d.fixed_pool or not any(
            o.node == d.node and not o.fixed_pool for o in spec.layers.values()))]
        raise UsageError(
            f"Layer {ld.alias!r} of {spec.name} is not the output of a whole stage of the network, so the network "
            f"cannot be split there. Layers it can be split at: {', '.join(whole)}."
        )
    return nodes.index(ld.node)
