"""Labelled image lists and robust image decoding.

This module turns a labelled image collection into a :class:`Manifest`, either
from an image-folder layout (:func:`scan_folder`) or from a CSV list
(:func:`read_csv_list`), and decodes one image file into an RGB picture
(:func:`load_image`), reporting anything unusual it had to do.

It depends on Pillow, NumPy and the standard library only: no torch, so that
listing a dataset or checking a manifest stays fast.

Where each part lives: ``_manifest`` (:class:`Row`, :class:`Manifest`), ``_listing`` (folder layouts,
CSV lists, the walk), ``_decode`` (:func:`load_image`, :func:`is_plain_jpeg`, the pixel-count guard).
"""

from __future__ import annotations

from ._decode import DEFAULT_MAX_PIXELS, is_plain_jpeg, load_image, pixels_over_limit
from ._listing import IMAGE_EXTENSIONS, list_image_files, read_csv_list, scan_folder
from ._manifest import Manifest, Row

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "Manifest",
    "Row",
    "is_plain_jpeg",
    "list_image_files",
    "load_image",
    "pixels_over_limit",
    "read_csv_list",
    "scan_folder",
]
