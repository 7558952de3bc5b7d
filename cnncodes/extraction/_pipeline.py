"""The image pipeline: decode, resize and crop in DataLoader workers, batches for the network, the gate."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import CnnCodesError, UsageError
from ..images import DEFAULT_MAX_PIXELS, is_plain_jpeg, load_image
from ..transforms import _PIL_RESAMPLE, resize_crop, resize_crop_tensor
from ..views import ViewSet, pil_views, tensor_views


#: Image decoding + resizing back ends (part of the fingerprint: their pixels differ slightly).
#: ``torchvision``: JPEGs through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, the same pixels as
#: Pillow) and torch's uint8 resize, as torchvision's tensor transforms do; other files through Pillow.
#: ``pil``: Pillow decoding and resampling, as torchvision's transforms on PIL images do.
DECODERS = ("torchvision", "pil")


def _check_decoder(decoder: str, pre) -> None:
    if decoder not in DECODERS:
        raise UsageError(f"Unknown decoder {decoder!r}: use {' or '.join(DECODERS)}")
    if decoder == "torchvision" and pre.interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UsageError(f"decoder='torchvision' cannot resample with {pre.interpolation!r}; use decoder='pil'")


@functools.cache
def _tv_decode():
    """torchvision's JPEG decoder, or None where this torchvision has none (Pillow decodes then:
    the same libjpeg-turbo pixels, only slower)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
    except ImportError:  # pragma: no cover - torchvision without its image extension
        return None
    return ImageReadMode, decode_jpeg, read_file


def decode_uint8(path: str, decoder: str, draft: int | None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """One image file as a uint8 (3, H, W) tensor at its decoded size, and a note.

    ``decoder="torchvision"`` decodes plain JPEGs with ``decode_jpeg`` (the same pixels as Pillow);
    anything else, and every file with ``decoder="pil"``, goes through :func:`cnncodes.images.load_image`
    (which raises :class:`~cnncodes.errors.ImageDecodeError` for a bad file). Shared by extraction and
    fine-tuning's train-time augmentation.
    """
    import torch

    t = None
    tv = _tv_decode() if decoder != "pil" else None
    if tv is not None and is_plain_jpeg(path, draft=draft, max_pixels=max_pixels):
        ImageReadMode, decode_jpeg, read_file = tv
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t, note = decode_jpeg(read_file(path), mode=ImageReadMode.RGB), ""
            # torchvision 0.29 deprecates its image decoders (DeprecationWarning at every call);
            # any other warning ("corrupt JPEG data") leaves the file to Pillow's judgement
            if any(not issubclass(w.category, DeprecationWarning) for w in caught):
                t = None
        except Exception:  # noqa: BLE001 - load_image below says what is wrong with the file
            t = None
    if t is None:
        img, note = load_image(path, draft=draft, max_pixels=max_pixels)
        t = torch.from_numpy(np.array(img).transpose(2, 0, 1))
    return t, note


class _ImageDataset:
    """Decodes and resizes one image to a uint8 CHW tensor; failures become a status, not an exception."""

    def __init__(self, paths: Sequence[str], pre, draft: bool, decoder: str = "pil", gate=None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, views: ViewSet = ViewSet("center")):
        if pre.resize < pre.crop:
            raise UsageError(f"preprocessing resizes to {pre.resize} px, less than its {pre.crop} px crop")
        _check_decoder(decoder, pre)
        self.paths = list(paths)
        self.pre = pre
        self.views = views
        # draft decoding keeps at least the largest size any view is resized to
        self.draft_size = max((pre.resize, *views.scales))
        self.draft = self.draft_size if draft else None
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.gate = gate  # see _loader
        self._parent = os.getpid()
        if decoder == "torchvision":
            _tv_decode()  # imported here, in the parent, not once per forked worker

    def _wait_for_gate(self) -> None:
        while not self.gate.wait(0.5):
            if os.getppid() != self._parent:  # the extraction was killed: do not linger
                os._exit(0)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: str):
        import torch

        if self.decoder == "pil":
            img, note = load_image(path, draft=self.draft, max_pixels=self.max_pixels)
            if self.views.kind == "center":
                return torch.from_numpy(resize_crop(img, self.pre).transpose(2, 0, 1).copy())[None], note
            v = pil_views(img, self.pre, self.views, _PIL_RESAMPLE[self.pre.interpolation])
            return torch.from_numpy(v.transpose(0, 3, 1, 2).copy()), note
        t, note = decode_uint8(path, self.decoder, self.draft, self.max_pixels)
        if self.views.kind == "center":
            return resize_crop_tensor(t, self.pre)[None], note
        return tensor_views(t, self.pre, self.views), note

    def __getitem__(self, i: int):
        import torch

        if self.gate is not None and os.getpid() != self._parent:
            self._wait_for_gate()
        pre = self.pre
        try:
            t, note = self._decode(self.paths[i])
            return i, t, "ok", note
        except CnnCodesError as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001 - any decoder/resizer failure is this row's status
            msg = f"{self.paths[i]}: {type(e).__name__}: {e}"
        return i, torch.zeros(self.views.count(), 3, pre.crop, pre.crop, dtype=torch.uint8), "error", msg


def _collate(items):
    import torch

    # each item holds its image's V views; they go through the network side by side
    idx = [it[0] for it in items]
    return idx, torch.cat([it[1] for it in items]), [it[2] for it in items], [it[3] for it in items]


def _default_workers(device: str) -> int:
    n = os.cpu_count() or 1
    return min(8, n) if device == "cuda" else max(1, min(4, n))


def _loader(paths, pre, draft, decoder, batches: list[list[int]], workers: int, device: str, gated: bool = False,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, views: ViewSet = ViewSet("center")):
    """A DataLoader of decoded batches, and its gate (None when not ``gated``).

    On a CPU the forward pass keeps every core busy, and a decoding worker that runs alongside
    it does not only take its own time: the model's OpenMP threads wait at their barriers for
    the thread it displaced (whole flowers5, AlexNet: streaming efficiency 0.81 where decoding
    alone would cost 5 %). A gated loader's workers decode only while the gate is open; the
    extraction closes it for each forward pass, so that decoding (on all cores, in the workers)
    and the forward pass (on all cores, in the model) take turns instead of fighting.
    No more workers start than there are batches to decode.
    """
    import multiprocessing

    import torch
    from torch.utils.data import DataLoader

    workers = min(workers, len(batches))
    gate = None
    if gated and workers > 0:
        gate = multiprocessing.get_context().Event()
        gate.set()
    ds = _ImageDataset(paths, pre, draft, decoder, gate, max_pixels, views)
    kw = {}
    if workers > 0:
        kw = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=(device == "cuda" and torch.cuda.is_available()), **kw), gate
