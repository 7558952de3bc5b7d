"""The cache file's schema: versions, row fields, canonical JSON and fingerprints, layer keys, records."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import UsageError


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
    #: V for the kept per-view codes of a layer (``<key>#views``, V x D wide), 0 for a layer's codes
    views: int = 0

    def to_dict(self) -> dict:
        d = {
            "key": self.key, "alias": self.alias, "node": self.node, "stage": self.stage, "pool": self.pool,
            "dim": int(self.dim), "map_shape": [int(v) for v in self.map_shape], "fingerprint": self.fingerprint,
        }
        if self.views:  # absent otherwise: the records of files and models written before stay as they were
            d["views"] = int(self.views)
        return d

    @classmethod
    def from_attrs(cls, key: str, attrs: Mapping) -> "LayerRecord":
        return cls(
            key=key, alias=str(attrs["alias"]), node=str(attrs["node"]), stage=str(attrs["stage"]),
            pool=str(attrs["pool"]), dim=int(attrs["dim"]), map_shape=tuple(int(v) for v in attrs["map_shape"]),
            fingerprint=str(attrs["fingerprint"]), views=int(attrs.get("views", 0)),
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


def _rows_sha256_blocks(read: Callable[[str, int, int], np.ndarray], n: int, class_names: Sequence[str],
                        fields: Sequence[str] = ROW_FIELDS, block: int = 65536) -> str:
    """:func:`_rows_sha256` of a row table read ``block`` rows at a time by ``read(field, lo, hi)``.

    Equal to it because the canonical JSON of a list of strings is ``[`` + the elements' JSON joined
    by ``,`` + ``]``, so each block's list can be encoded on its own (its brackets dropped); memory
    holds one block of one field, not the whole table as Python strings.
    """
    h = hashlib.sha256()
    for name in fields:
        if name in _STR_FIELDS:
            h.update(b"[")
            for lo in range(0, n, block):
                part = canonical_json([str(v) for v in read(name, lo, min(n, lo + block))])[1:-1]
                h.update(((b"," if lo else b"") + part.encode()))
            h.update(b"]")
        else:
            for lo in range(0, n, block):
                h.update(np.ascontiguousarray(read(name, lo, min(n, lo + block)), dtype=np.int64).tobytes())
    h.update(canonical_json(list(class_names)).encode())
    return h.hexdigest()
