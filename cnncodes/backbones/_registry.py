"""The registry of backbones: what a backbone is (:class:`BackboneSpec`: how to build it, its
preprocessing, its named layers, where its weights come from) and how one is looked up by name.

Every alias is **post-activation** unless its name says otherwise: ``fc7.pre``
is AlexNet's fc7 before its ReLU, ``block3.linear`` is a MobileNetV2 / EfficientNet
block output (those blocks end in a linear bottleneck), ``fc8`` / ``logits`` are
class scores. The families' specs are registered by :mod:`._torchvision`, :mod:`._lite0`
and :mod:`._tiny`; this module imports no torch.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import UnknownBackboneError, UnknownLayerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB picture becomes the network's input tensor.

    The shorter side is resized to ``resize`` pixels with ``interpolation``
    (antialiased), the centre ``crop`` x ``crop`` square is kept, values are
    scaled to [0, 1] and normalised with ``mean`` / ``std``. ``draft`` allows
    JPEG DCT downscale-on-decode to no less than ``resize`` pixels (faster for
    big photos; codes differ slightly, so it is part of the fingerprint).
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    draft: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d


@dataclass(frozen=True)
class LayerDef:
    """A layer a user can ask for.

    Parameters
    ----------
    alias : str
        Readable name (``fc7``).
    node : str
        Dotted module path whose *output* is the code (``classifier.5``).
    stage : str
        ``relu``/``relu6`` (post-activation), ``pre`` (before the activation),
        ``linear`` (a block that ends without activation), ``logits``.
    kind : str
        ``map`` for a conv feature map (pooled), ``vector`` for a flat output.
    fixed_pool : str or None
        A pooling the layer always uses (``pool`` aliases on a feature map).
    """

    alias: str
    node: str
    stage: str = "relu"
    kind: str = "map"
    fixed_pool: str | None = None
    description: str = ""

    @property
    def nonnegative(self) -> bool:
        return self.stage in ("relu", "relu6")


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone."""

    name: str
    build: Callable[[], "object"]  # () -> torch.nn.Module, random init
    preprocessing: Preprocessing
    layers: dict[str, LayerDef]
    default_weights: Callable[[], "ResolvedWeights"]
    description: str = ""
    arch_args: dict = field(default_factory=dict)
    # state-dict prefixes of heads used only in training (GoogLeNet's aux1/aux2, Inception's AuxLogits):
    # the network is built without them, and weight files that hold them (torchvision's do) load
    training_only: tuple[str, ...] = ()
    #: applied to the network once its weights are loaded (e.g. fully connected layers as convolutions)
    convert: Callable[["object"], "object"] | None = None

    def layer(self, alias: str) -> LayerDef:
        """Return the layer called ``alias``, with a "did you mean" hint if unknown.

        Raises
        ------
        UnknownLayerError
            If the backbone has no such layer.
        """
        try:
            return self.layers[alias]
        except KeyError:
            close = difflib.get_close_matches(alias, list(self.layers), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownLayerError(
                f"Unknown layer {alias!r} for backbone {self.name!r}.{hint} "
                f"Known: {', '.join(self.layers)}."
            ) from None


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights come from, and their identity for the fingerprint."""

    kind: str  # "default", "file", "none"
    identity: str  # what goes into the fingerprint
    path: str | None = None
    sha256: str | None = None
    remap: str | None = None  # "ordered" for the lukemelas EfficientNet layout

    def to_dict(self) -> dict:
        return asdict(self)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry.

    Raises
    ------
    ValueError
        If a backbone of that name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name.

    Raises
    ------
    UnknownBackboneError
        With the known names and a "did you mean" hint.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownBackboneError(
            f"Unknown backbone {name!r}.{hint} Known: {', '.join(list_backbones())}."
        ) from None


def _L(*items) -> dict[str, LayerDef]:
    return {d.alias: d for d in items}


def resolve_layer_alias(spec: BackboneSpec, alias: str) -> LayerDef:
    """``spec.layer(alias)``, also accepting a unique dotted prefix (``block4`` -> ``block4.linear``)."""
    if alias in spec.layers:
        return spec.layers[alias]
    matches = [a for a in spec.layers if a.split(".")[0] == alias]
    if len(matches) == 1:
        return spec.layers[matches[0]]
    return spec.layer(alias)  # raises with a hint
