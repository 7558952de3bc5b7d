"""Listing a labelled image collection: an image-folder layout or a CSV list, into a :class:`Manifest`."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator

from ..errors import DatasetError
from ._decode import _ext
from ._manifest import Manifest, _row

logger = logging.getLogger("cnncodes.images")

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


_MAX_LISTED_ERRORS = 10


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


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
    root_abs, top_dirs = _check_root(os.fspath(root))
    found, split_layout, other_exts, n_class_dirs = _collect(root_abs, top_dirs)
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


def _check_root(root_str: str) -> tuple[str, list[os.DirEntry[str]]]:
    """The resolved dataset folder and its visible top-level folders; a clear error for any other layout."""
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

    return root_abs, top_dirs


def _collect(root_abs: str, top_dirs: list[os.DirEntry[str]]):
    """The images below the class folders, one walk for the whole tree: (relpath, class, split, stat) each,
    whether it is a split layout, the other extensions seen and the number of class folders."""
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

    return found, split_layout, other_exts, n_class_dirs


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
    columns = _parse_header(csv_abs, records[0])
    parsed, problems = _parse_rows(records, columns, roots)

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


def _parse_header(csv_abs: str, first: tuple[int, list[str]]) -> tuple[int, int, int | None, int]:
    """The columns of path, label and split (None if absent), and the number of columns."""
    header_line, header = first
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
    return i_path, i_label, i_split, n_cols


def _parse_rows(records, columns: tuple[int, int, int | None, int], roots: tuple[str, ...]):
    """(relpath, label, split, stat) of each good row below the header, and (line, problem) of each bad one."""
    i_path, i_label, i_split, n_cols = columns
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
    return parsed, problems


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
