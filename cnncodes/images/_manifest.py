"""A labelled image list: its rows, its class names and its digest."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass


_MANIFEST_DIGEST_VERSION = "cnncodes-manifest-v1"


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
