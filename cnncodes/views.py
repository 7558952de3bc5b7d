"""Several views of each image (crops, flips, scales) whose codes are combined into one row.

Razavian et al. 2014 ("CNN features off-the-shelf") average codes over crops and flips. A view
set is recorded in the extraction spec, so prediction uses the same views:

- ``center``: the backbone's preprocessing (shorter side to ``resize``, centre ``crop``);
- ``flip``: the centre crop and its mirror image;
- ``5crop``: the four corners and the centre of the resized image (torchvision's ``FiveCrop``);
- ``10crop``: those five and the five of the mirrored image (``TenCrop``);
- ``multiscale:S1,S2,...``: the centre crop after resizing the shorter side to each ``S``.

The views of one image go through the network in the same batch; their codes are combined
with ``mean`` or ``max`` (:func:`combine_codes`). Views are cut from a uint8 (3, H, W) tensor
or a PIL image with the same offsets as torchvision's functional crops.

Kept views (``extract(keep_views=True)``): next to each layer's combined codes ``/codes/<key>``
the cache holds ``/codes/<key>#views`` (:func:`views_key`), one row per image of width V x D:
the image's V view codes side by side, in the order above (reshape a block to (n, V, D) with
:func:`split_views`). It is an ordinary layer of the file (same rows, shards, compression and
sha256), whose record says ``views=V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameterError

__all__ = ["COMBINE", "ViewSet", "parse_views", "combine_codes", "views_key", "is_views_key", "split_views"]

COMBINE = ("mean", "max")
_NAMED = ("center", "flip", "5crop", "10crop")
#: Suffix of the key of a layer's kept per-view codes (``pool#views``); ``#`` is never in a layer key.
VIEWS_SUFFIX = "#views"


@dataclass(frozen=True)
class ViewSet:
    """A parsed ``views`` argument."""

    kind: str  # center, flip, 5crop, 10crop, multiscale
    scales: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """The canonical spelling, as recorded in the spec."""
        if self.kind == "multiscale":
            return "multiscale:" + ",".join(str(s) for s in self.scales)
        return self.kind

    def count(self) -> int:
        return {"center": 1, "flip": 2, "5crop": 5, "10crop": 10}.get(self.kind, len(self.scales))

    def check(self, crop: int) -> None:
        """Every scale of a multiscale set must hold the crop."""
        small = [s for s in self.scales if s < crop]
        if small:
            raise InvalidParameterError("views", "extract", f"must not resize below the {crop} px crop. Got scales "
                                                             f"{small} instead.")


def parse_views(views: str) -> ViewSet:
    """Parse ``center``, ``flip``, ``5crop``, ``10crop`` or ``multiscale[:S1,S2,...]``
    (``multiscale`` alone gets its scales from the preprocessing: see :func:`resolve`).

    Raises
    ------
    InvalidParameterError
        For anything else.
    """
    v = str(views).strip().lower()
    if v in _NAMED:
        return ViewSet(v)
    if v == "multiscale":
        return ViewSet("multiscale", ())  # filled in by resolve() from the crop size
    if v.startswith("multiscale:"):
        try:
            scales = tuple(int(s) for s in v.split(":", 1)[1].split(","))
        except ValueError:
            scales = ()
        if scales and all(s >= 1 for s in scales) and len(set(scales)) == len(scales):
            return ViewSet("multiscale", scales)
    raise InvalidParameterError("views", "extract", "must be one of center, flip, 5crop, 10crop, multiscale or "
                                "multiscale:S1,S2,... (distinct sizes in px). Got {!r} instead.".format(views))


def resolve(views: str, pre) -> ViewSet:
    """Parse ``views`` for a preprocessing ``pre``; plain ``multiscale`` becomes the shorter side at
    1x, 1.25x and 1.5x the backbone's resize (256, 320, 384 for a 256/224 preset)."""
    vs = parse_views(views)
    if vs.kind == "multiscale" and not vs.scales:
        vs = ViewSet("multiscale", tuple(int(round(pre.resize * f)) for f in (1.0, 1.25, 1.5)))
    vs.check(pre.crop)
    return vs


def check_combine(combine: str) -> str:
    if combine not in COMBINE:
        raise InvalidParameterError("combine", "extract", f"must be one of {', '.join(COMBINE)}. Got {combine!r} instead.")
    return combine


def _resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(short)`` output size."""
    s, long = (w, h) if w <= h else (h, w)
    new_long = int(short * long / s)
    return (short, new_long) if w <= h else (new_long, short)


def _centre(new_w: int, new_h: int, c: int) -> tuple[int, int]:
    return int(round((new_h - c) / 2.0)), int(round((new_w - c) / 2.0))


def _five_boxes(w: int, h: int, c: int) -> list[tuple[int, int]]:
    """(top, left) of torchvision's ``five_crop``: top-left, top-right, bottom-left, bottom-right, centre."""
    return [(0, 0), (0, w - c), (h - c, 0), (h - c, w - c), _centre(w, h, c)]


def _bounded_window(w: int, h: int, pre, vs: ViewSet):
    """The centred window of an image longer than 16:1 that views are cut from (None: all of it),
    as the single centre crop does (:func:`cnncodes.transforms._source_window`), for the largest
    size any view resizes to: no image costs more than a 16:1 one. For such a strip, the corner
    crops of ``5crop``/``10crop`` come from the ends of that window, not of the whole strip."""
    import dataclasses

    from .transforms import _source_window

    return _source_window(w, h, dataclasses.replace(pre, resize=max((pre.resize, *vs.scales))))


def tensor_views(t, pre, vs: ViewSet):
    """The views of a uint8 (3, H, W) tensor as a uint8 (V, 3, crop, crop) tensor.

    Resizing is torch's antialiased uint8 interpolation, as ``torchvision.transforms.v2.Resize``
    on a tensor image.
    """
    import torch

    c = pre.crop
    window = _bounded_window(t.shape[2], t.shape[1], pre, vs)
    if window is not None:
        left, top, right, bottom = window
        t = t[:, top:bottom, left:right]

    def resized(short):
        _, h, w = t.shape
        new_w, new_h = _resized_size(w, h, short)
        if (new_w, new_h) == (w, h):
            return t
        return torch.nn.functional.interpolate(t[None], size=(new_h, new_w), mode=pre.interpolation,
                                               antialias=True)[0]

    def crops(img, boxes):
        return [img[:, top:top + c, left:left + c] for top, left in boxes]

    if vs.kind == "multiscale":
        out = []
        for s in vs.scales:
            r = resized(s)
            out += crops(r, [_centre(r.shape[2], r.shape[1], c)])
        return torch.stack(out).contiguous()
    r = resized(pre.resize)
    h, w = r.shape[1:]
    if vs.kind in ("center", "flip"):
        out = crops(r, [_centre(w, h, c)])
        if vs.kind == "flip":
            out.append(out[0].flip(-1))
        return torch.stack(out).contiguous()
    out = crops(r, _five_boxes(w, h, c))
    if vs.kind == "10crop":
        out += crops(r.flip(-1), _five_boxes(w, h, c))  # TenCrop: five crops of the mirrored image
    return torch.stack(out).contiguous()


def pil_views(img, pre, vs: ViewSet, resample: int) -> np.ndarray:
    """The views of a PIL image as a uint8 (V, crop, crop, 3) array (Pillow resampling, as
    torchvision's transforms on PIL images)."""
    from PIL import Image

    c = pre.crop
    window = _bounded_window(*img.size, pre, vs)
    if window is not None:
        img = img.crop(window)

    def resized(short):
        new = _resized_size(*img.size, short)
        return img if new == img.size else img.resize(new, resample)

    def crops(im, boxes):
        return [np.asarray(im.crop((left, top, left + c, top + c)), dtype=np.uint8) for top, left in boxes]

    if vs.kind == "multiscale":
        out = []
        for s in vs.scales:
            r = resized(s)
            out += crops(r, [_centre(*r.size, c)])
        return np.stack(out)
    r = resized(pre.resize)
    w, h = r.size
    if vs.kind in ("center", "flip"):
        out = crops(r, [_centre(w, h, c)])
        if vs.kind == "flip":
            out.append(np.ascontiguousarray(out[0][:, ::-1]))
        return np.stack(out)
    out = crops(r, _five_boxes(w, h, c))
    if vs.kind == "10crop":
        out += crops(r.transpose(Image.Transpose.FLIP_LEFT_RIGHT), _five_boxes(w, h, c))
    return np.stack(out)


def combine_codes(codes: np.ndarray, n_views: int, combine: str) -> np.ndarray:
    """Combine (B x V, D) codes, the V views of each image adjacent, into (B, D)."""
    if n_views == 1:
        return codes
    per_image = codes.reshape(-1, n_views, codes.shape[1])
    return per_image.mean(axis=1) if combine == "mean" else per_image.max(axis=1)


def views_key(key: str) -> str:
    """The dataset name of the kept per-view codes of layer ``key`` (``pool`` -> ``pool#views``)."""
    return key + VIEWS_SUFFIX


def is_views_key(key: str) -> bool:
    return key.endswith(VIEWS_SUFFIX)


def combined_key(key: str) -> str:
    """The combined layer whose views ``key`` keeps (``pool#views`` -> ``pool``); ``key`` itself otherwise."""
    return key[:-len(VIEWS_SUFFIX)] if is_views_key(key) else key


def split_views(block: np.ndarray, n_views: int) -> np.ndarray:
    """Stored (n, V x D) kept-view codes as (n, V, D)."""
    n, width = block.shape
    if n_views < 1 or width % n_views:
        raise ValueError(f"a row of width {width} does not hold {n_views} views")
    return block.reshape(n, n_views, width // n_views)


def codes_of_keys(out: dict[str, np.ndarray], keys, n_views: int, combine: str) -> dict[str, np.ndarray]:
    """Rows of each key from a forward pass's (B x V, D) outputs, the V views of each image adjacent:
    the combined code (B, D), or for a kept-views key the views side by side (B, V x D). Shared by
    the local and the Ray engine, so that both write the same shards."""
    res = {}
    for k in keys:
        v = out[k]
        res[k] = v.reshape(-1, n_views * v.shape[1]) if is_views_key(k) else combine_codes(v, n_views, combine)
    return res
