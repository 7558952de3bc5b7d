"""Reading a cache file, verified: its info, its rows, its codes (whole, by blocks, from one snapshot); listing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import CacheCorruptError, CacheError, CacheIncompleteError, UsageError
from ._partial import partial_progress
from ._schema import (FORMAT, READABLE_SCHEMAS, ROW_FIELDS, ROW_IDENTITY_DEFAULTS, _ROW_FIELDS_V1, _STR_FIELDS, CacheInfo,
                      Codes, LayerRecord, _rows_sha256, _rows_sha256_blocks)


def _is_sparse(node) -> bool:
    return node.attrs.get("layout", "dense") == "sparse"


def _read_dense(node, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a layer node (dataset, or sparse group) as a dense array."""
    if not _is_sparse(node):
        return node[lo:hi]
    dim = int(node.attrs["dim"])
    bits = np.unpackbits(node["mask"][lo:hi], axis=1, count=dim).astype(bool)
    rs = node["row_start"][lo:hi + 1]
    out = np.zeros((hi - lo, dim), dtype=node["values"].dtype)
    vals = node["values"][int(rs[0]):int(rs[-1])]
    if len(vals) != int(bits.sum()) or np.any(np.diff(rs) != bits.sum(axis=1)):
        layer = node.name.rsplit("/", 1)[-1]
        raise CacheCorruptError(
            f"The codes of layer {layer!r} in {node.file.filename} changed after they were written (its mask, "
            f"values and row starts disagree, so the sha256 cannot match). Do not use them; delete the file and "
            f"extract again."
        )
    out[bits] = vals
    return out


def layer_storage_bytes(node) -> int:
    """Bytes a layer takes in its file (all its datasets, after compression)."""
    if not _is_sparse(node):
        return node.id.get_storage_size()
    return sum(node[name].id.get_storage_size() for name in ("mask", "values", "row_start"))


def _open(path: Path):
    import h5py

    if not path.exists():
        prog = partial_progress(path)
        if prog is not None:
            done, todo = prog
            raise CacheIncompleteError(
                f"The extraction into {path} has not finished ({done}/{todo} images done). "
                f"Re-run the same extract command to resume it."
            )
        raise CacheError(f"No cache file at {path}: extract the codes first (extract(), scripts/extract.py).")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheCorruptError(
            f"{path} is not a readable HDF5 file ({e}). Delete it and extract again."
        ) from e
    _bound_metadata_cache(f)
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{path} is an HDF5 file but not a cnncodes cache (no format attribute)")
    if int(f.attrs.get("schema_version", -1)) not in READABLE_SCHEMAS:
        v = f.attrs.get("schema_version")
        f.close()
        raise CacheError(
            f"{path} has schema version {v}; this cnncodes reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}. Read it with the cnncodes that wrote it, or extract again."
        )
    return f


_METADATA_CACHE_BYTES = 2 << 20


def _bound_metadata_cache(f) -> None:
    """Cap HDF5's metadata cache of this handle at 2 MB (default: it grows to 32 MB).

    The strings of the row table live in HDF5's global heap, whose collections pass through the
    metadata cache: reading the string columns of 100,000 rows block by block grew the process by
    3.4 MB more than of 10,000 rows (0.2 MB with this cap). They are read once, in order, so a
    small cache costs no re-reads; codes go through the raw-data chunk cache, which this leaves alone.
    """
    cfg = f.id.get_mdc_config()
    cfg.set_initial_size = True
    cfg.initial_size = cfg.min_size = min(cfg.min_size, _METADATA_CACHE_BYTES)
    cfg.max_size = _METADATA_CACHE_BYTES
    f.id.set_mdc_config(cfg)


def _info_from_open(f, path: Path) -> CacheInfo:
    spec = json.loads(f.attrs["spec_json"])
    order = [r["key"] for r in spec.get("layers", [])]
    keys = sorted(f["codes"].keys(), key=lambda k: (order.index(k) if k in order else len(order), k))
    layers = {k: LayerRecord.from_attrs(k, f["codes"][k].attrs) for k in keys}  # in extraction order
    n = int(f.attrs["n_rows"])
    # counted by blocks: the whole column as Python strings costs ~60 bytes a row
    n_failed = sum(int(np.sum(_field_block(f, "status", lo, min(n, lo + ROW_BLOCK)) != "ok"))
                   for lo in range(0, n, ROW_BLOCK))
    return CacheInfo(
        path=path,
        fingerprint=str(f.attrs["fingerprint"]),
        spec=spec,
        layers=layers,
        n_rows=n,
        n_failed=n_failed,
        manifest_hash=str(f.attrs["manifest_hash"]),
        dataset_root=str(f.attrs["dataset_root"]),
        created=str(f.attrs["created"]),
        updated=str(f.attrs["updated"]),
        size_bytes=path.stat().st_size,
        rows_sha256=str(f.attrs["rows_sha256"]),
        versions=json.loads(f.attrs["versions_json"]),
        dataset_list=str(f.attrs.get("dataset_list", "")),
        class_names=[str(c) for c in f["class_names"].asstr()[:]],
        schema_version=int(f.attrs["schema_version"]),
    )


def read_info(path: str | os.PathLike) -> CacheInfo:
    """Read a cache's metadata (no codes).

    Raises
    ------
    CacheIncompleteError
        If only an unfinished extraction exists at ``path``.
    CacheCorruptError
        If the file is not readable HDF5.
    CacheError
        If it is not a cnncodes cache.
    """
    path = Path(path)
    with _open(path) as f:
        return _info_from_open(f, path)


def read_rows(path: str | os.PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
    """The row table of a cache: every field of ``ROW_FIELDS`` (unknown identities of a version 1 file
    as in ``ROW_IDENTITY_DEFAULTS``)."""
    path = Path(path)
    with _open(path) as f:
        rows, _ = _read_rows(f, path, verify)
    return rows


ROW_BLOCK = 8192  # rows of one field read at a time by the block readers of the row table (~0.6 MB as str)


def _field_block(f, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of one row field (str fields as an object array of str), as :func:`_read_rows` reads it."""
    return f[name].asstr()[lo:hi] if name in _STR_FIELDS else f[name][lo:hi]


def _row_fields(f) -> tuple[str, ...]:
    return _ROW_FIELDS_V1 if int(f.attrs["schema_version"]) == 1 else ROW_FIELDS


def _rows_tampered(path: Path) -> CacheCorruptError:
    return CacheCorruptError(
        f"The row table of {path} (paths, labels, splits) changed after it was written: its sha256 "
        f"does not match. Do not use it; delete the file and extract again."
    )


def _read_rows(f, path: Path, verify: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    fields = _row_fields(f)
    rows = {name: _field_block(f, name, 0, len(f[name])) for name in fields}
    class_names = [str(c) for c in f["class_names"].asstr()[:]]
    tampered = verify and _rows_sha256(rows, class_names, fields) != str(f.attrs["rows_sha256"])
    n = len(rows["paths"])
    for name, unknown in ROW_IDENTITY_DEFAULTS.items():
        rows.setdefault(name, np.full(n, unknown, dtype=object if isinstance(unknown, str) else np.int64))
    if tampered:
        raise _rows_tampered(path)
    return rows, class_names


def load_codes(
    path: str | os.PathLike,
    layers: str | Sequence[str],
    *,
    dtype=np.float32,
    verify: bool = True,
) -> Codes:
    """Read the codes of one or more layers with every row's identity.

    Parameters
    ----------
    path : path-like
        A cache file written by :func:`cnncodes.extract`.
    layers : str or list of str
        Layer keys (``"fc7"``, ``"conv5@max"``); several are concatenated column-wise.
    dtype : numpy dtype
        Type of the returned matrix (codes are stored as float16 by default).
    verify : bool
        Check each layer's sha256 and the row table's before returning.

    Returns
    -------
    Codes

    Raises
    ------
    CacheIncompleteError
        The extraction has not finished: resume it first.
    CacheCorruptError
        The file's bytes changed after it was written.
    UsageError
        A layer that the cache does not hold.
    """
    from .._validation import NonEmptyStr, PathLike, SequenceOf, validate_params

    # None or a list of non-strings ended in a TypeError traceback
    validate_params({"path": path, "layers": layers},
                    {"path": [PathLike()], "layers": [NonEmptyStr(), SequenceOf(NonEmptyStr(), min_len=1)]},
                    "load_codes")
    path = Path(path)
    keys = [layers] if isinstance(layers, str) else list(layers)
    _register_filters()
    with _open(path) as f:
        return _codes_from_open(f, path, keys, dtype, verify)


def _register_filters() -> None:
    try:  # readers of zstd-compressed files need the plugin registered
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass


def _codes_from_open(f, path: Path, keys: list[str], dtype, verify: bool) -> Codes:
    have = list(f["codes"].keys())
    missing = [k for k in keys if k not in have]
    if missing:
        raise UsageError(
            f"{path} holds no layer {', '.join(repr(m) for m in missing)}. It holds: {', '.join(have) or 'none'}. "
            f"Extract the missing layer(s) of {json.loads(f.attrs['spec_json']).get('backbone')} into it first "
            f"(extract() with the same data and model)."
        )
    rows, class_names = _read_rows(f, path, verify)
    mats, records = [], {}
    for k in keys:
        ds = f["codes"][k]
        raw = _read_dense(ds, 0, int(f.attrs["n_rows"]))
        if verify and hashlib.sha256(np.ascontiguousarray(raw).tobytes()).hexdigest() != ds.attrs["sha256"]:
            raise CacheCorruptError(
                f"The codes of layer {k!r} in {path} changed after they were written (sha256 mismatch). "
                f"Do not use them; delete the file and extract again."
            )
        mats.append(raw.astype(dtype, copy=False))
        records[k] = LayerRecord.from_attrs(k, ds.attrs)
    X = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=1)
    return Codes(
        X=X, labels=rows["labels"].astype(np.int64), paths=rows["paths"], splits=rows["split"], status=rows["status"],
        messages=rows["message"], class_names=class_names, layers=keys, records=records,
        spec=json.loads(f.attrs["spec_json"]), fingerprint=str(f.attrs["fingerprint"]), path=path,
        rows_sha256=str(f.attrs["rows_sha256"]),
    )


class CacheSnapshot:
    """One open handle on a finished cache: every read through it sees the same version of the file.

    The extractor replaces a cache only by writing a new file and renaming it over the old one
    (:func:`write_cache`, :func:`~cnncodes.fileio.atomic_path`), never in place, so a handle opened
    before the rename keeps reading the old inode: the row table and every layer read through one
    snapshot belong together, even while another process rewrites the cache. Use it as a context
    manager (:func:`open_cache`).

    Attributes
    ----------
    path : Path
    info : CacheInfo
        The metadata of the opened version.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _register_filters()
        self._f = _open(self.path)
        try:
            self.info = _info_from_open(self._f, self.path)
        except BaseException:
            self._f.close()
            raise

    def load(self, layers: str | Sequence[str], *, dtype=np.float32, verify: bool = True) -> Codes:
        """:func:`load_codes` through this snapshot's handle."""
        keys = [layers] if isinstance(layers, str) else list(layers)
        if not keys:
            raise UsageError("Name at least one layer to load")
        return _codes_from_open(self._f, self.path, keys, dtype, verify)

    def rows(self, *, verify: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
        """The row table and class names of this version, without any codes."""
        return _read_rows(self._f, self.path, verify)

    def row_block(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of one field of the row table (``paths``, ``labels`` ...; str fields as
        Python strings), for readers that must not hold the whole table. A version 1 file's
        unknown identities read as in ``ROW_IDENTITY_DEFAULTS``."""
        if name in ROW_IDENTITY_DEFAULTS and name not in _row_fields(self._f):
            unknown = ROW_IDENTITY_DEFAULTS[name]
            return np.full(max(0, min(hi, self.info.n_rows) - lo), unknown,
                           dtype=object if isinstance(unknown, str) else np.int64)
        if name not in ROW_FIELDS:
            raise UsageError(f"No row field {name!r}; the row table has: {', '.join(ROW_FIELDS)}")
        return _field_block(self._f, name, lo, hi)

    def verify_rows(self, block: int = ROW_BLOCK) -> None:
        """Check the row table's sha256 as :meth:`rows` does, reading ``block`` rows of a field at a time.

        Raises
        ------
        CacheCorruptError
            The row table changed after it was written.
        """
        digest = _rows_sha256_blocks(lambda name, lo, hi: _field_block(self._f, name, lo, hi), self.info.n_rows,
                                     self.info.class_names, _row_fields(self._f), block)
        if digest != str(self._f.attrs["rows_sha256"]):
            raise _rows_tampered(self.path)

    def read_block(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of layer ``key`` (stored dtype), for readers of codes larger than memory."""
        return _read_dense(self._f["codes"][key], lo, hi)

    def layer_sha256(self, key: str) -> str:
        """The sha256 recorded for layer ``key``'s codes (of all rows, in order, stored dtype)."""
        return str(self._f["codes"][key].attrs["sha256"])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "CacheSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | os.PathLike) -> CacheSnapshot:
    """Open a cache once for several consistent reads (see :class:`CacheSnapshot`).

    Raises
    ------
    CacheIncompleteError, CacheCorruptError, CacheError
        As :func:`read_info`.
    """
    return CacheSnapshot(path)


def iter_layer_blocks(path: str | os.PathLike, key: str, index: np.ndarray, block: int = 4096) -> Iterator[np.ndarray]:
    """Yield the rows ``index`` (in that order) of layer ``key``, ``block`` rows at a time."""
    with _open(Path(path)) as f:
        ds = f["codes"][key]
        for s in range(0, len(index), block):
            idx = np.asarray(index[s:s + block])
            if len(idx) == 0:
                continue
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            uniq, inv = np.unique(sorted_idx, return_inverse=True)
            if _is_sparse(ds):  # decode windows of `block` rows that start at a row asked for
                parts, j = [], 0
                while j < len(uniq):
                    lo = int(uniq[j])
                    k = int(np.searchsorted(uniq, lo + block))
                    parts.append(_read_dense(ds, lo, int(uniq[k - 1]) + 1)[uniq[j:k] - lo])
                    j = k
                data = np.concatenate(parts)[inv]
            else:
                data = ds[uniq][inv]  # h5py fancy indexing needs increasing indices
            out = np.empty_like(data)
            out[order] = data
            yield out


def list_caches(folder: str | os.PathLike) -> list[dict]:
    """Describe every cache under ``folder``: finished files and unfinished extractions.

    Returns
    -------
    list of dict
        Keys: path, status ("complete", "partial", "unreadable"), dataset, backbone,
        layers, rows, failed, size_bytes, updated, progress.
    """
    folder = Path(folder)
    out = []
    if not folder.is_dir():
        return out
    for p in sorted(folder.glob("*.h5")):
        try:
            info = read_info(p)
            out.append({
                "path": str(p), "status": "complete", "dataset": info.dataset_list or info.dataset_root,
                "backbone": info.backbone,
                "layers": list(info.layers), "rows": info.n_rows, "failed": info.n_failed,
                "size_bytes": info.size_bytes, "updated": info.updated,
                "progress": "", "dtype": info.spec.get("dtype", ""),
            })
        except CacheError as e:
            out.append({"path": str(p), "status": "unreadable", "dataset": "", "backbone": "", "layers": [],
                        "rows": 0, "failed": 0, "size_bytes": p.stat().st_size, "updated": "", "progress": str(e),
                        "dtype": ""})
    for pdir in sorted(folder.glob("*.h5.partial")):
        target = pdir.with_name(pdir.name[: -len(".partial")])
        done, todo = partial_progress(target) or (0, 0)
        try:
            plan = json.loads((pdir / "plan.json").read_text())
        except (OSError, ValueError):
            plan = {}
        spec = plan.get("spec", {})
        out.append({
            "path": str(target), "status": "partial",
            "dataset": plan.get("dataset_list") or plan.get("dataset_root", ""),
            "backbone": spec.get("backbone", ""), "layers": [r["key"] for r in plan.get("layers", [])],
            "rows": plan.get("n_rows", 0), "failed": 0, "size_bytes": sum(q.stat().st_size for q in pdir.iterdir()),
            "updated": plan.get("created", ""), "progress": f"{done}/{todo} images", "dtype": spec.get("dtype", ""),
        })
    return out
