"""Labelled image lists and robust image decoding.

This module turns a labelled image collection into a :class:`Manifest`, either
from an image-folder layout (:func:`scan_folder`) or from a CSV list
(:func:`read_csv_list`), and decodes one image file into an RGB picture
(:func:`load_image`), reporting anything unusual it had to do.

It depends on Pillow, NumPy and the standard library only: no torch, so that
listing a dataset or checking a manifest stays fast.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import re
import threading
import warnings
from collections import Counter
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from cnncodes.errors import DatasetError, ImageDecodeError, UsageError

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

logger = logging.getLogger(__name__)

#: File extensions (lowercase, with the dot) recognised as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
    }
)

#: Folder names that mark a split layout, and the split each one stands for.
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}

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

_MANIFEST_DIGEST_VERSION = "cnncodes-manifest-v1"
_MAX_LISTED_ERRORS = 10


@dataclass(frozen=True)
class Row:
    """One labelled image of a :class:`Manifest`.

    Attributes
    ----------
    relpath : str
        POSIX path relative to the manifest root; absolute when a CSV list gave
        an absolute path (or a ``..`` path) that lies outside the root.
    label : int
        Index of ``class_name`` in :attr:`Manifest.class_names`.
    class_name : str
        Name of the class.
    split : str
        ``"train"``, ``"val"``, ``"test"``, or ``""`` when there is no split.
    size : int
        File size in bytes when listed.
    mtime_ns : int
        File modification time in nanoseconds when listed.
    ctime_ns : int
        File status-change time in nanoseconds when listed (-1: unknown). Any rewrite sets
        it, even one whose mtime was put back with ``os.utime``.
    inode : int
        The file's inode number when listed (-1: unknown): a file replaced by another
        (rename, copy) gets another one.
    """

    relpath: str
    label: int
    class_name: str
    split: str
    size: int
    mtime_ns: int
    ctime_ns: int = -1
    inode: int = -1


@dataclass(frozen=True)
class Manifest:
    """A labelled image list.

    Attributes
    ----------
    root : str
        Absolute, resolved dataset root (the CSV's folder for a CSV list).
    rows : tuple of Row
        The images, sorted by ``relpath`` for a folder, in file order for a CSV.
    class_names : tuple of str
        Sorted class names; a row's ``label`` indexes into it.
    source : str
        ``"folder"`` or ``"csv"``.
    list_path : str
        The resolved path of the CSV list (``""`` for a folder): several lists in one
        folder share their root, so the list itself is part of a cache's identity.
    """

    root: str
    rows: tuple[Row, ...]
    class_names: tuple[str, ...]
    source: str
    list_path: str = ""

    def digest(self) -> str:
        """Return a stable identity of the labelled image list.

        The digest covers, in order, every row's ``relpath``, ``label``,
        ``class_name`` and ``split`` and the ``class_names``; it ignores file
        sizes, modification times, the root and the source, so that the same
        list moved to another folder keeps its identity.

        Returns
        -------
        str
            SHA-256 hex digest (64 characters).
        """
        h = hashlib.sha256()
        h.update(_MANIFEST_DIGEST_VERSION.encode("ascii") + b"\n")
        h.update(_canonical_json(list(self.class_names)) + b"\n")
        for r in self.rows:
            h.update(_canonical_json([r.relpath, r.label, r.class_name, r.split]) + b"\n")
        return h.hexdigest()

    def abspath(self, row: Row) -> str:
        """Return the absolute path of ``row``'s file.

        Parameters
        ----------
        row : Row
            A row of this manifest.

        Returns
        -------
        str
            ``row.relpath`` joined to :attr:`root` (or ``row.relpath`` itself
            when it is already absolute).
        """
        if posixpath.isabs(row.relpath) or os.path.isabs(row.relpath):
            return row.relpath
        return os.path.join(self.root, *row.relpath.split("/"))


def _row(relpath: str, label: int, class_name: str, split: str, st: os.stat_result) -> Row:
    return Row(relpath=relpath, label=label, class_name=class_name, split=split, size=st.st_size,
               mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino)


def _canonical_json(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- #
# Folder layout
# --------------------------------------------------------------------------- #


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _within(path: str, folder: str) -> bool:
    """Whether resolved ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """The state of one walk over a dataset tree, shared by all its folders.

    Each real folder is walked once, by (device, inode). A link to a folder is followed only
    when it leads out of the tree to a folder not walked yet: a link back into the tree (a class
    folder linked into another one, whose images would be listed twice under two labels) or to an
    ancestor of the tree or of the folder holding it (a loop) is skipped with a warning. Links to
    files are always followed.
    """

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.seen: set[tuple[int, int]] = set()

    def enter(self, path: str, is_link: bool) -> bool:
        """Whether to walk folder ``path`` (reached through a link if ``is_link``); marks it walked."""
        try:
            st = os.stat(path)
        except OSError as e:
            logger.warning("Cannot read folder %s (%s); skipped", path, e)
            return False
        if is_link:
            target = os.path.realpath(path)
            holder = os.path.realpath(os.path.dirname(path))
            if _within(target, self.root) or _within(self.root, target):
                why = f"it points back into the dataset {self.root}"
            elif _within(holder, target):
                why = "it loops back to a folder that holds it"
            else:
                why = ""
            if why:
                logger.warning("Folder link %s -> %s skipped: %s (its images would be listed again, under "
                               "another label)", path, target, why)
                return False
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            logger.warning("Folder %s skipped: it was already walked (reached again through a link)", path)
            return False
        self.seen.add(key)
        return True


def _walk_images(
    top: str, rel_top: str, other_exts: Counter[str], walk: _Walk, top_is_link: bool = False
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Yield ``(relpath, entry)`` for every image below ``top``, recursively, in name order.

    Hidden entries are skipped; non-image files are counted by extension in
    ``other_exts``. Folder links are followed as :class:`_Walk` allows.
    """
    stack = [(top, rel_top, top_is_link)]
    while stack:
        path, rel, is_link = stack.pop()
        if not walk.enter(path, is_link):
            continue
        try:
            entries = _list_dir(path)
        except OSError as e:
            logger.warning("Cannot list folder %s (%s); skipped", path, e)
            continue
        subdirs = []
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir():
                    subdirs.append((entry.path, entry_rel, entry.is_symlink()))
                    continue
                if not entry.is_file():
                    continue
            except OSError:
                continue
            ext = _ext(entry.name)
            if ext in IMAGE_EXTENSIONS:
                yield entry_rel, entry
            else:
                other_exts[ext or "(no extension)"] += 1
        stack.extend(reversed(subdirs))  # popped in name order


def list_image_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every image file below ``folder`` (``folder`` joined with its relative path), sorted.

    The same walk as :func:`scan_folder`'s: hidden entries skipped, folder links that lead back
    into ``folder`` or loop skipped with a warning, file links followed.
    """
    top = os.fspath(folder)
    found = _walk_images(top, "", Counter(), _Walk(top))
    return sorted(os.path.join(top, *rel.split("/")) for rel, _entry in found)


def _list_dir(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _format_ext_counts(counts: Counter[str]) -> str:
    if not counts:
        return "no files at all"
    total = sum(counts.values())
    parts = ", ".join(f"{n} {ext}" for ext, n in counts.most_common(8))
    more = "" if len(counts) <= 8 else f", and {len(counts) - 8} other extension(s)"
    return f"{total} file(s) of other types ({parts}{more})"


def _refuse_mixed_layout(root_abs: str, top_dirs) -> None:
    """Split folders beside class folders: read as classes, every image in train/ would get the
    label "train" (silently wrong labels), so neither layout is guessed."""
    # a folder named like a split that holds images directly is a class of that name, as before
    splits = sorted(e.name for e in top_dirs if e.name.lower() in _SPLIT_ALIASES and _has_subfolder(e.path))
    others = sorted(e.name for e in top_dirs if e.name.lower() not in _SPLIT_ALIASES)
    if splits and others:
        raise DatasetError(
            f"Dataset folder {root_abs!r} mixes split folders ({', '.join(splits)}) with other folders "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): use ROOT/<class>/<image> or "
            "ROOT/train|val|test/<class>/<image>, not both (move the other folders into a split), or list "
            "the files with their labels in a CSV (path,label[,split]) if a class is really named like a split."
        )


def _has_subfolder(path: str) -> bool:
    try:
        return any(e.is_dir() and not _is_hidden(e.name) for e in _list_dir(path))
    except OSError:
        return False


def scan_folder(root: str | os.PathLike[str]) -> Manifest:
    """List a labelled image folder.

    Two layouts are recognised:

    * ``ROOT/<class>/<image>`` (any depth below the class folder);
    * ``ROOT/<split>/<class>/<image>`` where every top-level folder is one of
      ``train``, ``val`` (also ``valid``, ``validation``) or ``test``.

    Hidden files and folders (name starting with ``.``) and files whose
    extension is not in :data:`IMAGE_EXTENSIONS` (case-insensitive) are
    ignored. A class folder with no image is dropped with a warning.

    Parameters
    ----------
    root : str or os.PathLike
        The dataset folder.

    Returns
    -------
    Manifest
        Rows sorted by ``relpath``; ``class_names`` is the sorted union of the
        class folders (over all splits) that hold at least one image.

    Raises
    ------
    DatasetError
        If ``root`` is missing, is not a folder, is empty, has no class
        subfolder, or holds no image file.
    """
    root_str = os.fspath(root)
    if not os.path.exists(root_str):
        raise DatasetError(
            f"Dataset folder {root_str!r} does not exist: check the path "
            "(it is resolved against the current directory "
            f"{os.getcwd()!r})."
        )
    if not os.path.isdir(root_str):
        raise DatasetError(
            f"Dataset path {root_str!r} is not a folder: give the folder that "
            "holds one subfolder per class (ROOT/<class>/<image>), or use a CSV "
            "list (path,label[,split]) for a list of files."
        )
    root_abs = os.path.realpath(root_str)
    try:
        top_entries = [e for e in _list_dir(root_abs) if not _is_hidden(e.name)]
    except OSError as e:
        raise DatasetError(
            f"Cannot list dataset folder {root_abs!r} ({e}): check its permissions."
        ) from e
    if not top_entries:
        raise DatasetError(
            f"Dataset folder {root_abs!r} is empty: put the images in one "
            "subfolder per class (ROOT/<class>/<image>)."
        )
    top_dirs = [e for e in top_entries if e.is_dir()]
    top_files = [e for e in top_entries if not e.is_dir()]
    top_images = [e for e in top_files if _ext(e.name) in IMAGE_EXTENSIONS]
    if not top_dirs:
        if top_images:
            raise DatasetError(
                f"Dataset folder {root_abs!r} holds {len(top_images)} image(s) "
                "directly but no class subfolders: the expected layout is "
                "ROOT/<class>/<image> (optionally ROOT/train|val|test/<class>/"
                "<image>); move each image into a subfolder named after its "
                "class, or list the files with their labels in a CSV "
                "(path,label[,split])."
            )
        raise DatasetError(
            f"Dataset folder {root_abs!r} has no class subfolders (found "
            f"{_format_ext_counts(Counter(_ext(e.name) or '(no extension)' for e in top_files))}"
            "): the expected layout is ROOT/<class>/<image>."
        )
    if top_images:
        logger.warning(
            "%d image(s) directly in %s are ignored: images must be in "
            "ROOT/<class>/ subfolders",
            len(top_images),
            root_abs,
        )

    split_layout = all(e.name.lower() in _SPLIT_ALIASES for e in top_dirs)
    _refuse_mixed_layout(root_abs, top_dirs)
    walk = _Walk(root_abs)  # one walk for the whole tree: no folder is listed twice
    walk.enter(root_abs, False)
    # (split, folder path, relpath prefix)
    groups: list[tuple[str, str, str]]
    if split_layout:
        groups = [(_SPLIT_ALIASES[e.name.lower()], e.path, e.name) for e in top_dirs
                  if walk.enter(e.path, e.is_symlink())]
    else:
        groups = [("", root_abs, "")]

    other_exts: Counter[str] = Counter()
    # (relpath, class_name, split, stat of the image: of a link's target)
    found: list[tuple[str, str, str, os.stat_result]] = []
    n_class_dirs = 0
    for split, group_path, group_rel in groups:
        try:
            entries = [e for e in _list_dir(group_path) if not _is_hidden(e.name)]
        except OSError as e:
            raise DatasetError(
                f"Cannot list folder {group_path!r} ({e}): check its permissions."
            ) from e
        stray = [e for e in entries if not e.is_dir()]
        if split_layout and stray:
            logger.warning(
                "%d file(s) directly in split folder %s are ignored: images "
                "must be in <split>/<class>/ subfolders",
                len(stray),
                group_path,
            )
        for entry in entries:
            if not entry.is_dir():
                continue
            n_class_dirs += 1
            class_name = entry.name
            class_rel = f"{group_rel}/{class_name}" if group_rel else class_name
            n_before = len(found)
            for relpath, f in _walk_images(entry.path, class_rel, other_exts, walk, entry.is_symlink()):
                found.append((relpath, class_name, split, f.stat()))
            if len(found) == n_before:
                logger.warning(
                    "Class folder %s holds no image file (extensions %s); it is "
                    "dropped and gets no label",
                    entry.path,
                    ", ".join(sorted(IMAGE_EXTENSIONS)),
                )

    if not found:
        where = "class subfolders" if not split_layout else "split/class subfolders"
        raise DatasetError(
            f"Dataset folder {root_abs!r} has {n_class_dirs} {where} but no "
            f"image file: found {_format_ext_counts(other_exts)}. Image files "
            f"must end in one of {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "(case-insensitive)."
        )

    class_names = tuple(sorted({c for _, c, _, _ in found}))
    index = {c: i for i, c in enumerate(class_names)}
    found.sort(key=lambda t: t[0])
    rows = tuple(_row(rp, index[c], c, s, st) for rp, c, s, st in found)
    logger.debug(
        "Scanned %s: %d images, %d classes%s",
        root_abs,
        len(rows),
        len(class_names),
        ", split layout" if split_layout else "",
    )
    return Manifest(root=root_abs, rows=rows, class_names=class_names, source="folder")


# --------------------------------------------------------------------------- #
# CSV list
# --------------------------------------------------------------------------- #


def _csv_relpath(raw: str, roots: tuple[str, ...]) -> tuple[str, str]:
    """Return ``(relpath, abspath)`` for a path cell of a CSV list.

    ``relpath`` is POSIX and relative to the first root when the file lies
    inside one of ``roots``, else the normalised absolute path.
    """
    if os.path.isabs(raw):
        absolute = os.path.normpath(raw)
    else:
        absolute = os.path.normpath(os.path.join(roots[0], raw))
    for r in roots:
        if absolute == r or not absolute.startswith(r.rstrip(os.sep) + os.sep):
            continue
        rel = os.path.relpath(absolute, r)
        return rel.replace(os.sep, "/"), os.path.join(roots[0], rel)
    return absolute, absolute


def read_csv_list(csv_path: str | os.PathLike[str]) -> Manifest:
    """Read a labelled image list from a CSV file.

    The CSV needs a header naming the columns ``path`` and ``label`` and,
    optionally, ``split`` (any order; other columns are ignored). ``path`` is
    relative to the CSV's folder (the manifest root) or absolute; ``label`` is
    a class name; ``split`` is empty or one of ``train``, ``val`` (also
    ``valid``, ``validation``) and ``test``. Blank lines are skipped.

    Parameters
    ----------
    csv_path : str or os.PathLike
        The CSV file (UTF-8, a byte-order mark is accepted).

    Returns
    -------
    Manifest
        Rows in the CSV's order; ``class_names`` sorted.

    Raises
    ------
    DatasetError
        If the CSV is missing, unreadable, has no header or no data row, or if
        any row is malformed, names a missing file, or repeats a path: one
        error lists the first 10 offending lines and the total count.
    """
    path_str = os.fspath(csv_path)
    if not os.path.exists(path_str):
        raise DatasetError(f"CSV list {path_str!r} does not exist: check the path.")
    if os.path.isdir(path_str):
        raise DatasetError(
            f"CSV list {path_str!r} is a folder: give a CSV file, or use "
            "scan_folder for an image-folder layout."
        )
    csv_abs = os.path.abspath(path_str)
    root = os.path.realpath(os.path.dirname(csv_abs))
    roots = tuple(dict.fromkeys((root, os.path.dirname(csv_abs))))

    try:
        with open(csv_abs, newline="", encoding="utf-8-sig") as fh:
            records = _read_records(fh)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(
            f"Cannot read CSV list {csv_abs!r} ({e}): it must be a UTF-8 text "
            "file with a header line path,label[,split]."
        ) from e

    if not records:
        raise DatasetError(
            f"CSV list {csv_abs!r} is empty: it needs a header line "
            "path,label[,split] and one line per image."
        )
    header_line, header = records[0]
    names = [h.strip().lower() for h in header]
    missing = [c for c in ("path", "label") if c not in names]
    dupes = sorted({n for n in names if names.count(n) > 1 and n})
    if missing or dupes:
        problem = (
            f"lacks column(s) {', '.join(missing)}"
            if missing
            else f"repeats column(s) {', '.join(dupes)}"
        )
        raise DatasetError(
            f"CSV list {csv_abs!r}: header on line {header_line} {problem} "
            f"(got {header!r}): the first line must name the columns, e.g. "
            "path,label or path,label,split."
        )
    i_path = names.index("path")
    i_label = names.index("label")
    i_split = names.index("split") if "split" in names else None
    n_cols = len(names)

    problems: list[tuple[int, str]] = []
    parsed: list[tuple[str, str, str, os.stat_result]] = []
    first_line_of: dict[str, int] = {}
    for line_no, rec in records[1:]:
        if len(rec) != n_cols:
            problems.append(
                (line_no, f"wrong column count (expected {n_cols}, got {len(rec)})")
            )
            continue
        raw_path = rec[i_path].strip()
        label = rec[i_label].strip()
        split_raw = rec[i_split].strip() if i_split is not None else ""
        if not raw_path:
            problems.append((line_no, "empty path"))
            continue
        if not label:
            problems.append((line_no, "empty label"))
            continue
        if split_raw and split_raw.lower() not in _SPLIT_ALIASES:
            problems.append(
                (
                    line_no,
                    f"bad split {split_raw!r} (use train, val, test or leave empty)",
                )
            )
            continue
        split = _SPLIT_ALIASES[split_raw.lower()] if split_raw else ""
        relpath, absolute = _csv_relpath(raw_path, roots)
        if relpath in first_line_of:
            problems.append(
                (line_no, f"duplicate path {raw_path!r} (first on line {first_line_of[relpath]})")
            )
            continue
        first_line_of[relpath] = line_no
        try:
            st = os.stat(absolute)
        except OSError:
            problems.append((line_no, f"file not found: {absolute}"))
            continue
        if not os.path.isfile(absolute):
            problems.append((line_no, f"not a file: {absolute}"))
            continue
        parsed.append((relpath, label, split, st))

    if problems:
        listed = "; ".join(
            f"line {n}: {why}" for n, why in problems[:_MAX_LISTED_ERRORS]
        )
        more = (
            f" (first {_MAX_LISTED_ERRORS} shown)"
            if len(problems) > _MAX_LISTED_ERRORS
            else ""
        )
        raise DatasetError(
            f"CSV list {csv_abs!r} has {len(problems)} bad row(s){more}: {listed}. "
            "Fix or remove these lines; paths are relative to the CSV's folder "
            f"{root!r} or absolute."
        )
    if not parsed:
        raise DatasetError(
            f"CSV list {csv_abs!r} has a header but no image rows: add one line "
            "per image (path,label[,split])."
        )

    class_names = tuple(sorted({lab for _, lab, _, _ in parsed}))
    index = {c: i for i, c in enumerate(class_names)}
    rows = tuple(_row(rp, index[lab], lab, s, st) for rp, lab, s, st in parsed)
    return Manifest(root=root, rows=rows, class_names=class_names, source="csv",
                    list_path=os.path.realpath(csv_abs))


def _read_records(fh: Iterator[str]) -> list[tuple[int, list[str]]]:
    """Return ``(first line number, cells)`` for every non-blank CSV record."""
    reader = csv.reader(fh)
    records: list[tuple[int, list[str]]] = []
    prev_end = 0
    for rec in reader:
        start = prev_end + 1
        prev_end = reader.line_num
        if not rec or all(not c.strip() for c in rec):
            continue
        records.append((start, rec))
    return records


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #


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
    return (f"{path_str}: {_LIMIT_MESSAGE.format(pixels=pixels, limit=max_pixels)}; raise it with --max-pixels "
            "(max_pixels in Python) if you trust the file (a guard against decompression bombs)")


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
    try:
        size = os.stat(path_str).st_size
    except FileNotFoundError as e:
        raise ImageDecodeError(f"{path_str}: file not found") from e
    except OSError as e:
        raise ImageDecodeError(f"{path_str}: cannot read file ({e})") from e
    if size == 0:
        raise ImageDecodeError(f"{path_str}: empty file (0 bytes)")

    notes: list[str] = []
    try:
        with warnings.catch_warnings(), _pillow_allows(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path_str) as img:
                _refuse_over_limit(path_str, img.size, max_pixels)
                fmt = img.format or "unknown"
                n_frames = getattr(img, "n_frames", 1)
                ext = _ext(path_str)
                expected = _EXPECTED_FORMAT.get(ext)
                if expected is not None and expected != fmt:
                    note = f"{fmt} content in a {ext} file"
                    if fmt == "GIF" or n_frames > 1:
                        note += " (first frame used)"
                    notes.append(note)
                elif n_frames > 1:
                    notes.append(f"first of {n_frames} frames used")
                if (
                    draft is not None
                    and fmt == "JPEG"
                    and img.mode in ("RGB", "YCbCr")
                    and min(img.size) > 2 * draft
                ):
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
