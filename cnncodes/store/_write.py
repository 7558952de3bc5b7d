"""Writing a cache file (atomically), dense or sparse layers streamed block by block."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import CacheError, UsageError
from ..fileio import atomic_path
from ._read import read_info
from ._schema import (FORMAT, ROW_FIELDS, ROW_IDENTITY_DEFAULTS, SCHEMA_VERSION, _STR_FIELDS, CacheInfo, LayerRecord,
                      _rows_sha256, canonical_json)


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
            raise UsageError("compression='zstd' needs the package hdf5plugin: pip install hdf5plugin") from e
        return dict(hdf5plugin.Zstd(clevel=3), shuffle=True)
    if compression == "none":
        return {}
    raise UsageError(f"Unknown compression {compression!r}: use gzip, sparse, lzf, zstd or none")


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
            _write_rows(f, rows, class_names, str_dt)
            g = f.create_group("codes")
            for key, (rec, blocks) in layers.items():
                _write_layer(g, key, rec, blocks, n, dtype, compression, comp)
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


def _write_rows(f, rows: Mapping[str, np.ndarray], class_names: Sequence[str], str_dt) -> None:
    """The row table and the class names."""
    for name in ROW_FIELDS:
        if name in _STR_FIELDS:
            f.create_dataset(name, data=np.asarray([str(v) for v in rows[name]], dtype=object), dtype=str_dt)
        else:
            f.create_dataset(name, data=np.asarray(rows[name], dtype=np.int64))
    f.create_dataset("class_names", data=np.asarray(list(class_names), dtype=object), dtype=str_dt)


def _write_layer(g, key: str, rec: LayerRecord, blocks: Iterable[np.ndarray], n: int, dtype: str, compression: str,
                 comp: dict) -> None:
    """Stream one layer's blocks into ``codes/<key>``, checking their shapes and count; its record and the
    sha256 of its (N, dim) bytes as attributes."""
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
