"""Weights: which file a backbone's weights come from (the torchvision download path, a user's file, none),
their sha256 (memoised for big files), and building a network with them (safe loading, name remapping,
shape checks). A built network has its in-place activations switched off, so that a hook on a
pre-activation module sees pre-activation values."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import WeightsError, WeightsUnavailableError
from ._registry import BackboneSpec, ResolvedWeights

log = logging.getLogger("cnncodes.backbones")


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
            from ..fileio import atomic_write_text

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
