"""Which cache file a dataset maps to, and which of its rows can be reused."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import store
from ..errors import CacheMismatchError, DatasetError
from ..images import Manifest, pixels_over_limit, read_csv_list, scan_folder

log = logging.getLogger("cnncodes.extraction")


def _load_manifest(data: str | os.PathLike) -> Manifest:
    p = Path(data)
    if p.is_file() and p.suffix.lower() in (".csv", ".txt"):
        return read_csv_list(p)
    if p.is_file():
        raise DatasetError(f"{p} is a file; give an image folder (DATA/<class>/<image>) or a CSV list (path,label[,split])")
    return scan_folder(p)


def _dataset_identity(manifest: Manifest) -> str:
    """What names a dataset: its resolved root, how it was listed, and for a CSV the list itself
    (every list of one folder shares that folder as its root)."""
    ident = f"{manifest.root}|{manifest.source}"  # an image folder's identity, as in caches written before lists had one
    return f"{ident}|{manifest.list_path}" if manifest.list_path else ident


def _cache_path(out: Path, manifest: Manifest, spec_name: str, base_fp: str, name: str | None) -> Path:
    stem = name or Path(manifest.root).name or "data"
    if manifest.list_path and not name:
        stem = f"{stem}_{Path(manifest.list_path).stem}"  # data_train.csv and data_test.csv read apart
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    tag = hashlib.sha256(f"{base_fp}|{_dataset_identity(manifest)}".encode()).hexdigest()[:10]
    return out / f"{stem}-{spec_name}-{tag}.h5"


def _check_same_dataset(info: store.CacheInfo, manifest: Manifest) -> None:
    """Refuse a cache file whose recorded dataset is not this one (a renamed file, a name collision)."""
    if (info.dataset_root, info.dataset_list) != (manifest.root, manifest.list_path):
        def show(root, lst):
            return lst or root

        raise CacheMismatchError(
            f"{info.path} holds the codes of {show(info.dataset_root, info.dataset_list)}, not of "
            f"{show(manifest.root, manifest.list_path)}. Give another --out folder, or pass --overwrite to replace it."
        )


def _match_rows(old_rows: dict | None, manifest: Manifest, verify_content: bool) -> tuple[np.ndarray, np.ndarray]:
    """Which old row each image reuses (-1: none), and each image's content sha256 where known ("").

    An image may reuse the row of its path when its size and mtime are those recorded, and then:

    - by default, when its inode and ctime are those recorded too: nothing rewrote the file
      (a rewrite sets the ctime even when ``os.utime`` puts the mtime back). When they differ (a
      copied or restored dataset, a chmod, a rewrite), its bytes are hashed and must equal the
      recorded hash; a row without one is redone. Rows of a schema 1 file (no inode or ctime
      recorded) are trusted on size and mtime, as they were when written.
    - with ``verify_content``, only when its bytes hash to the recorded sha256: always read.
    """
    n = len(manifest.rows)
    reuse = np.full(n, -1, dtype=np.int64)
    content = np.full(n, "", dtype=object)
    if old_rows is None:
        return reuse, content
    pos = {p: i for i, p in enumerate(old_rows["paths"])}
    doubt = []  # (image, old row) whose bytes decide
    for j, r in enumerate(manifest.rows):
        i = pos.get(r.relpath)
        if i is None or (old_rows["file_size"][i], old_rows["file_mtime_ns"][i]) != (r.size, r.mtime_ns):
            continue
        known = old_rows["file_inode"][i] != -1
        same_file = (old_rows["file_inode"][i], old_rows["file_ctime_ns"][i]) == (r.inode, r.ctime_ns)
        if verify_content or (known and not same_file):
            if old_rows["content_sha256"][i]:
                doubt.append((j, i))
            continue
        reuse[j] = i
        content[j] = old_rows["content_sha256"][i]
    for (j, i), digest in zip(doubt, _hash_files([manifest.abspath(manifest.rows[j]) for j, _ in doubt])):
        content[j] = digest
        if digest and digest == old_rows["content_sha256"][i]:
            reuse[j] = i
    return reuse, content


def _sha256_of(path: str) -> str:
    """sha256 of a file's bytes, or "" when it cannot be read (its decoding will say why)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _hash_files(paths: Sequence[str]) -> list[str]:
    """:func:`_sha256_of` of many files, on threads (hashlib and file reads release the GIL)."""
    if len(paths) < 2:
        return [_sha256_of(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(_sha256_of, paths))


def _same_identity(old_rows: dict, manifest: Manifest, content: np.ndarray) -> bool:
    """True when every row's recorded file identity is the current one (else the row table is rewritten,
    so that the next run trusts the files as they are now, e.g. after a copy whose bytes were checked)."""
    rows = manifest.rows
    return (
        old_rows["file_size"].tolist() == [r.size for r in rows]
        and old_rows["file_mtime_ns"].tolist() == [r.mtime_ns for r in rows]
        and old_rows["file_ctime_ns"].tolist() == [r.ctime_ns for r in rows]
        and old_rows["file_inode"].tolist() == [r.inode for r in rows]
        and list(old_rows["content_sha256"]) == list(content)
    )


def _same_rows(old_rows: dict, old_class_names: Sequence[str], manifest: Manifest) -> bool:
    """True when the cache's row table (order, labels, splits, class names) equals the manifest's.

    A renamed class keeps every label index (``rose`` -> ``rosa`` sorts alike) but not its name:
    the class names are compared too. Codes do not depend on labels, so a difference here only
    rewrites the row table (no forward pass).
    """
    return (
        list(old_class_names) == list(manifest.class_names)
        and list(old_rows["paths"]) == [r.relpath for r in manifest.rows]
        and old_rows["labels"].tolist() == [r.label for r in manifest.rows]
        and list(old_rows["split"]) == [r.split for r in manifest.rows]
    )


def _retry_rows_refused_for_size(reuse_idx: np.ndarray, old_rows: dict, max_pixels: int | None) -> None:
    """Mark for recomputation (-1 in ``reuse_idx``) the old rows that failed only for their pixel
    count and that ``max_pixels`` now admits: raising the limit, as the error told, must not
    give a cache hit that keeps the error."""
    retried = 0
    for j in np.flatnonzero(reuse_idx >= 0):
        i = reuse_idx[j]
        if old_rows["status"][i] == "ok":
            continue
        pixels = pixels_over_limit(str(old_rows["message"][i]))
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            reuse_idx[j] = -1
            retried += 1
    if retried:
        log.info("Retrying %d image(s) that an earlier, lower pixel limit refused", retried)
