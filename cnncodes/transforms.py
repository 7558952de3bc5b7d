"""Resize and centre-crop, as torchvision's ``Resize`` + ``CenterCrop`` (PIL images and uint8 tensors).

Torch is imported only by :func:`resize_crop_tensor`, so decoding workers that use Pillow stay light.
"""

from __future__ import annotations

import numpy as np


_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def _resized_size(w: int, h: int, pre) -> tuple[int, int]:
    """torchvision's ``Resize(pre.resize)`` output size: the shorter side to ``pre.resize``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _crop_box(new_w: int, new_h: int, c: int) -> tuple[int, int]:
    """torchvision's ``CenterCrop(c)`` offsets (top, left)."""
    return int(round((new_h - c) / 2.0)), int(round((new_w - c) / 2.0))


#: Longest resized side, in multiples of ``pre.resize``, that an image is resized to whole. A
#: 3x40,000 strip would otherwise become 256x3,413,333 pixels (2.6 GB, 6 GB at the peak of a
#: tensor resize) for the 224x224 that the centre crop keeps; see :func:`_source_window`.
MAX_RESIZED_ASPECT = 16


def _source_window(w: int, h: int, pre) -> tuple[int, int, int, int] | None:
    """The centred part of a ``w`` x ``h`` image to resize, as (left, top, right, bottom), or None for all of it.

    Images whose resized long side stays within ``MAX_RESIZED_ASPECT * pre.resize`` (aspect
    ratios up to 16:1: every ordinary photo and panorama) are resized whole, exactly as
    torchvision's ``Resize`` + ``CenterCrop``. A longer one is first cut, along its long side, to
    the centred window that resizes to that bound (an even margin on each side, so the window's
    centre is the image's), then resized and cropped the same way: the resize costs no more than
    a 16:1 image's, and the crop still comes from the image's centre at almost the same scale (within
    about one output pixel in position, from the rounding of sizes and offsets).
    """
    bound = MAX_RESIZED_ASPECT * pre.resize
    if max(_resized_size(w, h, pre)) <= bound:
        return None
    short, long = min(w, h), max(w, h)
    keep = MAX_RESIZED_ASPECT * short  # source pixels that resize to `bound`, at the same scale
    keep = min(long, keep + (long - keep) % 2)
    start = (long - keep) // 2
    return (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)


def resize_crop(img, pre) -> np.ndarray:
    """Resize the shorter side to ``pre.resize`` and keep the centre ``pre.crop`` square, as uint8 HWC.

    The same output sizes, rounding and (antialiased) PIL resampling as torchvision's
    ``Resize(pre.resize)`` + ``CenterCrop(pre.crop)`` on a PIL image, without importing torchvision
    in every decoding worker. Images longer than 16:1 are first cut to their centre
    (:func:`_source_window`), so that the resize stays small.
    """
    window = _source_window(*img.size, pre)
    if window is not None:
        img = img.crop(window)
    w, h = img.size
    new_w, new_h = _resized_size(w, h, pre)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_RESAMPLE[pre.interpolation])
    c = pre.crop
    top, left = _crop_box(new_w, new_h, c)
    return np.asarray(img.crop((left, top, left + c, top + c)), dtype=np.uint8)


def resize_crop_tensor(t, pre):
    """:func:`resize_crop` on a uint8 (3, H, W) tensor with torch's antialiased uint8 kernels.

    Equal to ``torchvision.transforms.v2``'s ``Resize(pre.resize)`` + ``CenterCrop(pre.crop)`` on a
    uint8 tensor image (v1 transforms on tensors resample in float and may differ by 1); 2-6x
    faster than Pillow's resampling on this project's CPUs. It differs from the PIL pipeline by at
    most 1 (bilinear) or 2 (bicubic) grey levels in a few pixels (measured on the shared datasets).
    Images longer than 16:1 are first cut to their centre, as in :func:`resize_crop`.
    """
    import torch

    window = _source_window(t.shape[2], t.shape[1], pre)
    if window is not None:
        left, top, right, bottom = window
        t = t[:, top:bottom, left:right]
    _, h, w = t.shape
    new_w, new_h = _resized_size(w, h, pre)
    if (new_w, new_h) != (w, h):
        t = torch.nn.functional.interpolate(t[None], size=(new_h, new_w), mode=pre.interpolation, antialias=True)[0]
    c = pre.crop
    top, left = _crop_box(new_w, new_h, c)
    return t[:, top:top + c, left:left + c].contiguous()
