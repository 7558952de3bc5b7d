"""The HDF5 cache of CNN codes: schema, fingerprints, writing, verified reading, listing, locking.

This package never imports torch: reading codes, a cache hit and training stay fast.

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
    /codes/<key>#views (N, V x D)  only with extract's keep_views: each image's V view codes side by
                 side (cnncodes.views.split_views); attrs as above plus views=V

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
(-1, ""), and :func:`cnncodes.extraction.extract` rewrites such a file in version 2 when it uses it.

A file only ever appears complete: it is written under a temporary name and renamed.
An extraction in progress lives in ``<file>.partial/`` (see :mod:`cnncodes.workdir`).

Where each part lives: ``_schema`` (versions, fields, fingerprints, records), ``_write`` (write_cache),
``_read`` (read_info, load_codes, open_cache, iter_layer_blocks, list_caches), ``_partial`` (the work
folder's names and progress), ``_lock`` (CacheLock).
"""

from __future__ import annotations

from ._lock import CacheLock
from ._partial import ShardName, partial_dir, partial_progress
from ._read import (ROW_BLOCK, CacheSnapshot, iter_layer_blocks, layer_storage_bytes, list_caches, load_codes, open_cache, read_info,
                    read_rows)
from ._schema import (FORMAT, READABLE_SCHEMAS, ROW_FIELDS, ROW_IDENTITY_DEFAULTS, SCHEMA_VERSION, _ROW_FIELDS_V1,
                      CacheInfo, Codes, LayerRecord, _rows_sha256, canonical_json, fingerprint_of, layer_key, parse_pool)
from ._write import _compression_kwargs, write_cache

__all__ = [
    "SCHEMA_VERSION",
    "ROW_BLOCK",
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
    "ShardName",
    "partial_progress",
    "CacheLock",
]
