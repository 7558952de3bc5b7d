"""The HDF5 cache of CNN codes: schema, fingerprints, writing, verified reading, listing, locking.

This module never imports torch: reading codes, a cache hit and training stay fast.

Schema (version 2) of one cache file, for one dataset and one extraction spec::

    /                      attrs: format="cnncodes", schema_version, fingerprint, spec_json,
                                  manifest_hash, dataset_root, dataset_list, created, updated,
                                  versions_json, n_rows, rows_sha256
    /paths      (N,)  str  relative image path (the identity of a row)
    /labels     (N,)  int64
    /class_names (K,) str
    /split      (N,)  str  "train" / "val" / "test" / ""
    /status     (N,)  str  "ok" or "error"
    /message    (N,)  str  why a row failed, or a note ("CMYK converted to RGB")
    /file_size  (N,)  int64, /file_mtime_ns (N,) int64   to notice changed images
    /file_ctime_ns (N,) int64, /file_inode (N,) int64     to notice rewrites that keep size and mtime
                                                         (-1: unknown)
    /content_sha256 (N,) str  sha256 of the image file's bytes when extracted ("" unknown)
    /codes/<key> (N, D) float16 (or float32), chunked, compressed; attrs: alias, node, stage,
                 pool, dim, map_shape, fingerprint, sha256 (of the array's bytes)

With ``compression="sparse"`` a layer is instead a group ``/codes/<key>`` (attrs as above plus
``layout="sparse"``) that stores the same (N, D) matrix losslessly as:

    mask      (N, ceil(D/8)) uint8   np.packbits of "this value's bits are not all zero", per row
    values    (nnz,) float16/32      the other values in row-major order, byte-shuffled + gzip
    row_start (N+1,) int64           row i's values are values[row_start[i]:row_start[i+1]]

Post-ReLU codes are about half zeros: this layout stores each zero in one bit and keeps the
exponent bytes of the other values together, 0.25 of raw float32 where gzip on the dense
matrix gives 0.32 (EfficientNet-Lite0 pool on flowers5, float16). ``load_codes`` reads both.

``<key>`` is the layer alias (``fc7``) for the default pooling (global average, or a
vector layer), else ``alias@pool`` (``conv5@max``, ``conv5@avg2x2``, ``conv5@none``).
Rows are in the canonical order of the manifest (sorted relative paths); failed rows
hold NaN codes.

Version 1 files (no ctime, inode or content hash) are still read: those rows' identity is unknown
(-1, ""), and :func:`cnncodes.extract.extract` rewrites such a file in version 2 when it uses it.

A file only ever appears complete: it is written under a temporary name and renamed.
An extraction in progress lives in ``<file>.partial/`` (see :mod:`cnncodes.extract`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import CacheCorruptError, CacheError, CacheIncompleteError, CacheLockedError, UsageError
from .fileio import atomic_path

__all__ = [
    "SCHEMA_VERSION",
    "Codes",
    "CacheInfo",
    "LayerRecord",
    "canonical_json",
    "fingerprint_of",
    "layer_key",
    "parse_pool",
    "write_cache",
    "read_info",
    "load_codes",
    "CacheSnapshot",
    "open_cache",
    "list_caches",
    "partial_dir",
    "partial_progress",
    "CacheLock",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
FORMAT = "cnncodes"
_ROW_FIELDS_V1 = ("paths", "labels", "split", "status", "message", "file_size", "file_mtime_ns")
#: Each row's file identity added in schema 2, and its value when unknown (a version 1 file, or a
#: writer that does not know it): unknown never matches a file on disk, so it is never trusted blindly.
ROW_IDENTITY_DEFAULTS = {"file_ctime_ns": -1, "file_inode": -1, "content_sha256": ""}
ROW_FIELDS = _ROW_FIELDS_V1 + tuple(ROW_IDENTITY_DEFAULTS)
_STR_FIELDS = ("paths", "split", "status", "message", "content_sha256")


def canonical_json(obj) -> str:
    """JSON with sorted keys and no whitespace: the input of every fingerprint."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_of(obj) -> str:
    """sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def parse_pool(pool: str) -> tuple[str, int]:
    """Split ``"avg"``, ``"max"``, ``"none"``, ``"avg2x2"``, ``"max3x3"`` into (mode, grid).

    Raises
    ------
    UsageError
        For anything else.
    """
    p = pool.strip().lower()
    for mode in ("avg", "max"):
        if p == mode:
            return mode, 1
        if p.startswith(mode):
            rest = p[len(mode):]
            a, _, b = rest.partition("x")
            if a.isdigit() and a == b and int(a) >= 1:
                return mode, int(a)
    if p == "none":
        return "none", 0
    raise UsageError(f"Unknown pooling {pool!r}. Use avg, max, none, or a grid such as avg2x2 / max3x3.")


def layer_key(alias: str, pool: str, kind: str = "map") -> str:
    """The name of a layer's dataset under ``/codes``."""
    if kind == "vector" or pool == "avg":
        return alias
    return f"{alias}@{pool}"


@dataclass(frozen=True)
class LayerRecord:
    """What was extracted for one layer: enough to know whether codes are comparable."""

    key: str
    alias: str
    node: str
    stage: str
    pool: str
    dim: int
    map_shape: tuple[int, ...] = ()
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return {
            "key": self.key, "alias": self.alias, "node": self.node, "stage": self.stage, "pool": self.pool,
            "dim": int(self.dim), "map_shape": [int(v) for v in self.map_shape], "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_attrs(cls, key: str, attrs: Mapping) -> "LayerRecord":
        return cls(
            key=key, alias=str(attrs["alias"]), node=str(attrs["node"]), stage=str(attrs["stage"]),
            pool=str(attrs["pool"]), dim=int(attrs["dim"]), map_shape=tuple(int(v) for v in attrs["map_shape"]),
            fingerprint=str(attrs["fingerprint"]),
        )


@dataclass
class CacheInfo:
    """What a finished cache file holds (no codes read)."""

    path: Path
    fingerprint: str
    spec: dict
    layers: dict[str, LayerRecord]
    n_rows: int
    n_failed: int
    manifest_hash: str
    dataset_root: str
    created: str
    updated: str
    size_bytes: int
    rows_sha256: str
    versions: dict = field(default_factory=dict)
    dataset_list: str = ""  # the CSV list the rows came from ("" for an image folder)
    class_names: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def backbone(self) -> str:
        return str(self.spec.get("backbone", "?"))


@dataclass
class Codes:
    """Codes of one or more layers (concatenated column-wise) with each row's identity.

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_features)
        The codes; NaN in rows whose image failed to decode.
    labels : ndarray of int64
    paths, splits, status, messages : ndarray of str (object)
    class_names : list of str
    layers : list of str
        The keys read, in column order.
    records : dict
        The :class:`LayerRecord` of each key.
    spec : dict
        The extraction spec stored in the file.
    fingerprint : str
        The file's extraction fingerprint.
    rows_sha256 : str
        The sha256 of the row table the codes were read with (the file's ``rows_sha256``).
    """

    X: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    status: np.ndarray
    messages: np.ndarray
    class_names: list[str]
    layers: list[str]
    records: dict[str, LayerRecord]
    spec: dict
    fingerprint: str
    path: Path
    rows_sha256: str = ""

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the rows whose image decoded."""
        return self.status == "ok"


# --------------------------------------------------------------------------- writing


def _compression_kwargs(compression: str) -> dict:
    if compression == "sparse":  # dense parts of the sparse layout (see the module docstring)
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "gzip":
        # no byte shuffle: on float16 post-ReLU codes it made files 2-3 % larger at the same speed (measured)
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "zstd":
        try:
            import hdf5plugin
        except ImportError as e:
            raise UsageError("--compression zstd needs the package hdf5plugin: pip install hdf5plugin") from e
        return dict(hdf5plugin.Zstd(clevel=3), shuffle=True)
    if compression == "none":
        return {}
    raise UsageError(f"Unknown compression {compression!r}: use gzip, sparse, lzf, zstd or none")


def _rows_sha256(rows: Mapping[str, np.ndarray], class_names: Sequence[str],
                 fields: Sequence[str] = ROW_FIELDS) -> str:
    h = hashlib.sha256()
    for name in fields:
        arr = rows[name]
        if name in _STR_FIELDS:
            h.update(canonical_json([str(v) for v in arr]).encode())
        else:
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(canonical_json(list(class_names)).encode())
    return h.hexdigest()


def write_cache(
    path: str | os.PathLike,
    *,
    spec: dict,
    fingerprint: str,
    manifest_hash: str,
    dataset_root: str,
    class_names: Sequence[str],
    rows: Mapping[str, np.ndarray],
    layers: Mapping[str, tuple[LayerRecord, Iterable[np.ndarray]]],
    dtype: str = "float16",
    compression: str = "gzip",
    created: str | None = None,
    versions: dict | None = None,
    dataset_list: str = "",
) -> CacheInfo:
    """Write a complete cache file atomically.

    Parameters
    ----------
    rows : mapping
        The row table: every name in ``ROW_FIELDS``, each an array of length N; the file
        identity fields of ``ROW_IDENTITY_DEFAULTS`` may be left out (written as unknown).
    layers : mapping
        ``key -> (record, blocks)`` where ``blocks`` yields row blocks (2-D arrays)
        whose concatenation, in order, is the (N, dim) code matrix. Blocks are
        streamed to disk, so memory stays flat.

    Returns
    -------
    CacheInfo

    Raises
    ------
    CacheError
        If a block has the wrong shape or count (nothing is written then).
    OSError
        If the disk is full; the previous file, if any, is untouched.
    """
    import h5py

    n = len(rows["paths"])
    rows = {**{k: np.full(n, v, dtype=object if isinstance(v, str) else np.int64)
               for k, v in ROW_IDENTITY_DEFAULTS.items()}, **rows}
    for name in ROW_FIELDS:
        if len(rows[name]) != n:
            raise CacheError(f"row field {name!r} has {len(rows[name])} entries, expected {n}")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    comp = _compression_kwargs(compression)
    str_dt = h5py.string_dtype("utf-8")
    rows_sha = _rows_sha256(rows, class_names)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name in ROW_FIELDS:
                if name in _STR_FIELDS:
                    f.create_dataset(name, data=np.asarray([str(v) for v in rows[name]], dtype=object), dtype=str_dt)
                else:
                    f.create_dataset(name, data=np.asarray(rows[name], dtype=np.int64))
            f.create_dataset("class_names", data=np.asarray(list(class_names), dtype=object), dtype=str_dt)
            g = f.create_group("codes")
            for key, (rec, blocks) in layers.items():
                dim = int(rec.dim)
                writer = (_SparseLayerWriter(g, key, n, dim, dtype, comp) if compression == "sparse"
                          else _DenseLayerWriter(g, key, n, dim, dtype, comp))
                ds = writer.node
                h = hashlib.sha256()
                start = 0
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=dtype)
                    if block.ndim != 2 or block.shape[1] != dim or start + len(block) > n:
                        raise CacheError(f"layer {key!r}: block of shape {block.shape} does not fit ({n}, {dim})")
                    writer.write(start, block)
                    h.update(block.tobytes())
                    start += len(block)
                if start != n:
                    raise CacheError(f"layer {key!r}: {start} rows written, expected {n}")
                writer.close()
                for k, v in rec.to_dict().items():
                    if k != "key":
                        ds.attrs[k] = v if not isinstance(v, list) else np.asarray(v, dtype=np.int64)
                ds.attrs["sha256"] = h.hexdigest()
            f.attrs.update({
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "fingerprint": fingerprint,
                "spec_json": canonical_json(spec),
                "manifest_hash": manifest_hash,
                "dataset_root": dataset_root,
                "dataset_list": dataset_list,
                "created": created or now,
                "updated": now,
                "versions_json": canonical_json(versions or {}),
                "n_rows": n,
                "rows_sha256": rows_sha,
            })
    return read_info(path)


class _DenseLayerWriter:
    """A layer as one chunked (N, D) dataset: readable by any HDF5 tool."""

    def __init__(self, g, key: str, n: int, dim: int, dtype: str, comp: dict):
        chunk_rows = max(1, min(n, (1 << 20) // max(1, dim * np.dtype(dtype).itemsize)))
        self.node = g.create_dataset(key, shape=(n, dim), dtype=dtype, chunks=(chunk_rows, dim) if n else None, **comp)

    def write(self, start: int, block: np.ndarray) -> None:
        self.node[start:start + len(block)] = block

    def close(self) -> None:
        pass


def _nonzero_bits(block: np.ndarray) -> np.ndarray:
    """True where a value's bits are not all zero (so -0.0 and NaN are kept, bit for bit)."""
    return block.view(np.uint16 if block.dtype.itemsize == 2 else np.uint32) != 0


class _SparseLayerWriter:
    """A layer as bit mask + non-zero values + row starts (see the module docstring)."""

    def __init__(self, g, key: str, n: int, dim: int, dtype: str, gz: dict):
        self.node = g.create_group(key)
        self.node.attrs["layout"] = "sparse"
        self._gz = gz
        nb = (dim + 7) // 8
        self.mask = self.node.create_dataset("mask", shape=(n, nb), dtype=np.uint8,
                                             chunks=(max(1, min(n, (1 << 20) // max(1, nb))), nb) if n else None, **gz)
        self.values = self.node.create_dataset("values", shape=(0,), maxshape=(None,), dtype=dtype,
                                               chunks=(1 << 19,), shuffle=True, **gz)
        self.row_start = np.zeros(n + 1, dtype=np.int64)
        self.nnz = 0

    def write(self, start: int, block: np.ndarray) -> None:
        bits = _nonzero_bits(block)
        self.mask[start:start + len(block)] = np.packbits(bits, axis=1)
        vals = block[bits]
        if len(vals):
            self.values.resize((self.nnz + len(vals),))
            self.values[self.nnz:] = vals
        self.row_start[start + 1:start + 1 + len(block)] = self.nnz + np.cumsum(bits.sum(axis=1))
        self.nnz += len(vals)

    def close(self) -> None:
        self.node.create_dataset("row_start", data=self.row_start, **self._gz)


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


# --------------------------------------------------------------------------- reading


def partial_dir(path: str | os.PathLike) -> Path:
    """The work folder of an unfinished extraction into ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def partial_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(images done, images planned) of an unfinished extraction, or None if there is none."""
    pdir = partial_dir(path)
    try:
        plan = json.loads((pdir / "plan.json").read_text())
    except (OSError, ValueError):
        return (0, 0) if pdir.is_dir() else None
    done = 0
    for p in pdir.glob("shard-*.npz"):
        try:
            done += int(p.name.split("-")[2])
        except (IndexError, ValueError):
            continue
    return done, int(plan.get("n_todo", 0))


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
        raise CacheError(f"No cache file at {path}. Create one with: python scripts/extract.py DATA --model NAME --layers L")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CacheCorruptError(
            f"{path} is not a readable HDF5 file ({e}). Delete it and extract again."
        ) from e
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


def _info_from_open(f, path: Path) -> CacheInfo:
    spec = json.loads(f.attrs["spec_json"])
    order = [r["key"] for r in spec.get("layers", [])]
    keys = sorted(f["codes"].keys(), key=lambda k: (order.index(k) if k in order else len(order), k))
    layers = {k: LayerRecord.from_attrs(k, f["codes"][k].attrs) for k in keys}  # in extraction order
    status = f["status"].asstr()[:]
    return CacheInfo(
        path=path,
        fingerprint=str(f.attrs["fingerprint"]),
        spec=spec,
        layers=layers,
        n_rows=int(f.attrs["n_rows"]),
        n_failed=int(np.sum(status != "ok")),
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


def _read_rows(f, path: Path, verify: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    fields = _ROW_FIELDS_V1 if int(f.attrs["schema_version"]) == 1 else ROW_FIELDS
    rows = {}
    for name in fields:
        rows[name] = f[name].asstr()[:] if name in _STR_FIELDS else f[name][:]
    class_names = [str(c) for c in f["class_names"].asstr()[:]]
    tampered = verify and _rows_sha256(rows, class_names, fields) != str(f.attrs["rows_sha256"])
    n = len(rows["paths"])
    for name, unknown in ROW_IDENTITY_DEFAULTS.items():
        rows.setdefault(name, np.full(n, unknown, dtype=object if isinstance(unknown, str) else np.int64))
    if tampered:
        raise CacheCorruptError(
            f"The row table of {path} (paths, labels, splits) changed after it was written: its sha256 "
            f"does not match. Do not use it; delete the file and extract again."
        )
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
    from ._validation import NonEmptyStr, PathLike, SequenceOf, validate_params

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
            f"Extract it with: python scripts/extract.py DATA --model {json.loads(f.attrs['spec_json']).get('backbone')}"
            f" --layers {' '.join(missing)}"
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


# --------------------------------------------------------------------------- locking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """One writer per cache: an ``O_EXCL`` lock file holding the writer's pid and host.

    A lock left by a killed process on this host is detected (its pid is gone) and
    broken with a warning; a live holder makes :meth:`acquire` raise at once.
    """

    def __init__(self, path: str | os.PathLike, *, lock_path: str | os.PathLike | None = None,
                 error: type[Exception] = CacheLockedError):
        self.target = Path(path)
        self.path = Path(lock_path) if lock_path is not None else self.target.with_name(self.target.name + ".lock")
        self.error = error  # what a refusal raises (run folders use their own class)
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def acquire(self) -> "CacheLock":
        """Take the lock.

        Raises
        ------
        CacheLockedError
            If a live process holds it.
        """
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None:
                    continue  # released between our open and read
                if h == {} and self._age() > 10:
                    # created but never filled in: its writer died between O_EXCL and the write (microseconds)
                    log.warning("Breaking an empty lock on %s (left by a process killed while taking it)", self.target)
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                same_host = h.get("host") == me["host"]
                if h and same_host and not _pid_alive(int(h.get("pid", -1))):
                    log.warning("Breaking a stale lock on %s left by pid %s (no longer running)", self.target, h.get("pid"))
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise self.error(
                    f"{self.target} is being written by pid {h.get('pid', '?')} on host {h.get('host', '?')} "
                    f"since {h.get('started', '?')}. Wait for it to finish. If that process is gone (another host, "
                    f"or a crashed machine), delete {self.path} and run again."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise self.error(f"Could not take the lock {self.path}; try again")

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "CacheLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
