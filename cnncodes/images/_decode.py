"""Decoding one image file into an RGB picture, with the pixel-count guard and the notes of what was done."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageDecodeError, UsageError


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


#: Pillow format expected for each image extension (to spot mislabelled files).
_EXPECTED_FORMAT: dict[str, str] = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
}


def _composite_on_white(img: Image.Image) -> tuple[Image.Image, str]:
    """Return ``img`` (any mode with alpha) as RGB over a white background."""
    rgba = img.convert("RGBA")
    alpha = rgba.getchannel("A")
    lo, _ = alpha.getextrema()
    if lo == 255:  # alpha channel present but fully opaque: nothing to blend
        return rgba.convert("RGB"), ""
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba.convert("RGB"), (0, 0), alpha)
    return white, "alpha composited on white"


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert a loaded image of any mode to a new ``"RGB"`` image and a note."""
    mode = img.mode
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)
        grey = ((a + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "16-bit grey scaled to 8-bit"
    if mode == "I":
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((a + 128) // 257).astype(np.uint8)
        return (
            Image.fromarray(grey, "L").convert("RGB"),
            "32-bit integer grey clipped to 0..65535 and scaled to 8-bit",
        )
    if mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        grey = np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "float grey clipped to 0..255"
    if mode == "CMYK":
        return img.convert("RGB"), "CMYK converted to RGB"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode in ("P", "L", "RGB") and "transparency" in img.info:
        return _composite_on_white(img)
    if mode == "1":
        return img.convert("L").convert("RGB"), ""
    if mode in ("RGB", "L", "P"):
        return img.convert("RGB"), ""
    return img.convert("RGB"), f"{mode} converted to RGB"


#: Default pixel limit of :func:`load_image`: Pillow's own default (``PIL.Image.MAX_IMAGE_PIXELS``,
#: a 1 GB RGBA image), a constant so that a cache's failures do not depend on a global setting.
DEFAULT_MAX_PIXELS: int = 1024 * 1024 * 1024 // 4 // 3


_LIMIT_MESSAGE = "image has {pixels} pixels, above the limit {limit}"


_LIMIT_RE = re.compile(r"image has (\d+) pixels, above the limit (\d+)")


_PILLOW_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


_pillow_limit_lock = threading.Lock()


def _check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise UsageError(f"max_pixels must be a positive integer or None; got {max_pixels!r} instead.")


def pixels_over_limit(message: str) -> int | None:
    """The pixel count of an image that :func:`load_image` refused for its size, from its message.

    ``None`` when ``message`` is about something else. A caller that raised the limit uses it to
    retry exactly the images the old limit refused.
    """
    m = _LIMIT_RE.search(message)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _pillow_allows(max_pixels: int | None) -> Iterator[None]:
    """Let Pillow's own decompression-bomb checks pass images of up to ``max_pixels`` pixels.

    Pillow checks ``PIL.Image.MAX_IMAGE_PIXELS`` (a global) when it opens a file and in some
    plugins (GIF frames, TIFF tiles); its warnings are errors here. Where ``max_pixels`` is above
    that global, the global is raised for the duration of the decode, under a lock so that
    threads never restore each other's value (decodes that need it take turns; those within
    Pillow's limit, the usual case, do not wait). Below it, :func:`load_image`'s own check is the
    stricter one.
    """
    own = Image.MAX_IMAGE_PIXELS
    if own is None or (max_pixels is not None and max_pixels <= own):
        yield
        return
    with _pillow_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _refuse_over_limit(path_str: str, size: tuple[int, int], max_pixels: int | None) -> None:
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(_limit_message(path_str, pixels, max_pixels))


def _limit_message(path_str: str, pixels: int | str, max_pixels: int | None) -> str:
    return (f"{path_str}: {_LIMIT_MESSAGE.format(pixels=pixels, limit=max_pixels)}; raise the "
            "max_pixels setting if you trust the file (a guard against decompression bombs)")


def is_plain_jpeg(
    path: str | os.PathLike[str], *, draft: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> bool:
    """Whether a plain JPEG decoder gives exactly what :func:`load_image` would.

    True for a single-frame RGB or grey JPEG in a file named ``.jpg``/``.jpeg``
    (or an extension that promises no other format), without an EXIF rotation,
    within ``max_pixels`` (see :func:`load_image`), and that ``draft`` would not downscale. For
    such a file, :func:`load_image` adds no note and any libjpeg-turbo decoder
    (``torchvision.io.decode_jpeg`` with ``mode=RGB``) returns the same pixels.
    Reads the header only; any doubt (a file Pillow cannot open) is False, so
    that :func:`load_image` gives the diagnosis.
    """
    path_str = os.fspath(path)
    try:
        with warnings.catch_warnings(), _pillow_allows(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path_str) as img:
                if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
                    return False
                if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                    return False
                if _EXPECTED_FORMAT.get(_ext(path_str), "JPEG") != "JPEG":
                    return False
                if getattr(img, "n_frames", 1) != 1 or "transparency" in img.info:
                    return False
                if draft is not None and img.mode == "RGB" and min(img.size) > 2 * draft:
                    return False
                orientation = img.getexif().get(0x0112)
                return not (isinstance(orientation, int) and 2 <= orientation <= 8)
    except Exception:  # noqa: BLE001 - load_image will say what is wrong
        return False


def _check_nonempty_file(path_str: str) -> None:
    try:
        size = os.stat(path_str).st_size
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{path_str}: file not found") from e
    except OSError as e:
        raise ImageDecodeError(f"{path_str}: cannot read file ({e})") from e
    if size == 0:
        raise ImageDecodeError(f"{path_str}: empty file (0 bytes)")


def _format_notes(img: Image.Image, ext: str) -> list[str]:
    """What is remarkable about the file's format: content of another format than its suffix says, frames."""
    fmt = img.format or "unknown"
    n_frames = getattr(img, "n_frames", 1)
    expected = _EXPECTED_FORMAT.get(ext)
    if expected is not None and expected != fmt:
        note = f"{fmt} content in a {ext} file"
        if fmt == "GIF" or n_frames > 1:
            note += " (first frame used)"
        return [note]
    if n_frames > 1:
        return [f"first of {n_frames} frames used"]
    return []


def _decode_rgb(img: Image.Image, draft: int | None, notes: list[str]) -> Image.Image:
    """The open file's pixels, DCT-downscaled where ``draft`` allows, EXIF-oriented, made RGB and loaded;
    what was done is appended to ``notes``."""
    if draft is not None and img.format == "JPEG" and img.mode in ("RGB", "YCbCr") and min(img.size) > 2 * draft:
        img.draft("RGB", (draft, draft))
    img.load()
    orientation = img.getexif().get(0x0112)
    out: Image.Image = img
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        transposed = ImageOps.exif_transpose(img)
        if transposed is not None:
            out = transposed
        notes.append(f"EXIF orientation {orientation} applied")
    rgb, note = _to_rgb(out)
    if note:
        notes.append(note)
    rgb.load()
    return rgb


def load_image(
    path: str | os.PathLike[str], *, draft: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, str]:
    """Decode an image file into a fully loaded RGB picture.

    The first frame of a multi-frame file is used; the EXIF orientation is
    applied; 16-bit grey is scaled (not clipped) to 8 bits; float grey is
    clipped to 0..255; CMYK is converted; transparency is composited on white.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    draft : int, optional
        For a colour JPEG whose short side exceeds ``2 * draft``, let the
        decoder downscale by a power of two (DCT scaling) while keeping both
        sides at least ``draft`` pixels: much faster for large photos.
    max_pixels : int or None, default DEFAULT_MAX_PIXELS
        Refuse images with more pixels (width x height, as the file declares them) than
        this: a decompression bomb guard, applied before any pixel is decoded, whatever
        ``PIL.Image.MAX_IMAGE_PIXELS`` says. ``None``: no limit.

    Returns
    -------
    image : PIL.Image.Image
        Mode ``"RGB"``, pixels loaded, not tied to the file.
    note : str
        ``""`` when the decoding was unremarkable, else short notes separated
        by ``"; "`` (e.g. ``"CMYK converted to RGB"``, ``"EXIF orientation 6
        applied"``, ``"GIF content in a .jpg file (first frame used)"``).

    Raises
    ------
    ImageDecodeError
        If the file is missing, empty, not an image, truncated or corrupt, has
        more than ``max_pixels`` pixels ("image has N pixels, above the limit M"),
        or is in a mode that cannot be made RGB. The message starts with the path.
    UsageError
        If ``draft`` or ``max_pixels`` is not a positive integer (or None).
    """
    if draft is not None and (
        isinstance(draft, bool) or not isinstance(draft, int) or draft < 1
    ):
        raise UsageError(f"draft must be a positive integer or None; got {draft!r} instead.")
    _check_max_pixels(max_pixels)
    path_str = os.fspath(path)
    _check_nonempty_file(path_str)
    notes: list[str] = []
    try:
        with warnings.catch_warnings(), _pillow_allows(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path_str) as img:
                _refuse_over_limit(path_str, img.size, max_pixels)
                notes += _format_notes(img, _ext(path_str))
                rgb = _decode_rgb(img, draft, notes)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own check, at open (over the limit) or in a plugin (a GIF frame, a TIFF tile)
        m = _PILLOW_PIXELS_RE.search(str(e))
        raise ImageDecodeError(_limit_message(path_str, m.group(1) if m else "too many", max_pixels)) from e
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"{path_str}: not an image (Pillow cannot identify the format)"
        ) from e
    except Exception as e:
        raise ImageDecodeError(
            f"{path_str}: corrupt or truncated image ({type(e).__name__}: {e})"
        ) from e
    if rgb.mode != "RGB":  # defensive: every branch of _to_rgb returns RGB
        raise ImageDecodeError(f"{path_str}: could not convert mode {rgb.mode} to RGB")
    return rgb, "; ".join(notes)
