"""The row table and the predictions file of a streamed run, in memory that does not grow with the strings.

The in-memory path holds the whole row table as Python strings (paths, splits, statuses, messages,
content hashes: some 300 bytes a row) and builds the predictions CSV as one string before writing
it. A streamed run keeps only what it computes with, a few bytes a row: the labels (int64) and the
split and status of each row as codes into their few distinct values. It verifies the table's
sha256 and reads paths block by block (:meth:`cnncodes.store.CacheSnapshot.row_block`), and
writes the predictions CSV block by block, byte for byte the file the in-memory writer
(:func:`cnncodes.classify._run._write_predictions`) makes from the same predictions.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fileio import atomic_path
from .runfolder import PREDICTIONS_HEADER
from .store import ROW_BLOCK  # rows of one field held as Python strings at a time (~0.6 MB of paths)


@dataclass
class CompactRows:
    """Labels, and the split and status of each row as codes into their distinct values."""

    labels: np.ndarray  # int64
    split_codes: np.ndarray  # int32 into split_values
    split_values: list[str]
    status_codes: np.ndarray  # int32 into status_values
    status_values: list[str]

    @property
    def n(self) -> int:
        return len(self.labels)

    def splits(self) -> np.ndarray:
        """Each row's recorded split, as a fixed-width str array (what :func:`make_split` makes of it)."""
        return np.asarray(self.split_values, dtype=str)[self.split_codes]

    def status(self) -> np.ndarray:
        return np.asarray(self.status_values, dtype=str)[self.status_codes]


def _encode(values: np.ndarray, vocab: dict[str, int]) -> np.ndarray:
    """Codes of ``values`` into ``vocab`` (extended with the values it lacks, in the order met)."""
    uniq, inv = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    ids = np.array([vocab.setdefault(str(u), len(vocab)) for u in uniq], dtype=np.int32)
    return ids[inv.reshape(-1)] if len(uniq) else np.zeros(0, np.int32)


def read_compact_rows(snap, block: int | None = None) -> CompactRows:
    """The verified row table of a cache snapshot, compact (see the module's docstring).

    Raises
    ------
    CacheCorruptError
        The row table changed after it was written (as :meth:`CacheSnapshot.rows`).
    """
    block = block or ROW_BLOCK
    snap.verify_rows(block)
    n = snap.info.n_rows
    labels = np.empty(n, dtype=np.int64)
    codes = {"split": np.empty(n, dtype=np.int32), "status": np.empty(n, dtype=np.int32)}
    vocabs: dict[str, dict[str, int]] = {"split": {}, "status": {}}
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        labels[lo:hi] = snap.row_block("labels", lo, hi)
        for name in codes:
            codes[name][lo:hi] = _encode(snap.row_block(name, lo, hi), vocabs[name])
    return CompactRows(labels, codes["split"], list(vocabs["split"]), codes["status"], list(vocabs["status"]))


class LazyField:
    """One string field of the row table, read a row at a time (for the few failed rows a split lists)."""

    def __init__(self, snap, name: str):
        self.snap, self.name = snap, name

    def __getitem__(self, i) -> str:
        return str(self.snap.row_block(self.name, int(i), int(i) + 1)[0])


def make_compact_split(snap, table: CompactRows, *, val_fraction: float, test_fraction: float, seed: int):
    """:func:`cnncodes.splits.make_split` of the snapshot's rows, from the compact table."""
    from .splits import make_split

    return make_split(table.labels, table.splits(), table.status(), class_names=snap.info.class_names,
                      paths=LazyField(snap, "paths"), messages=LazyField(snap, "message"),
                      val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


def write_predictions(path: Path, snap, labels: np.ndarray, class_names, parts, block: int | None = None) -> None:
    """The predictions CSV, written block by block (atomically).

    ``parts`` lists ``(rows, split_names, pred, score)`` in the order written: ``rows`` sorted row
    indices, ``split_names(rows)`` the split column of those rows, ``pred``/``score`` aligned with
    ``rows``. Each block covers ``block`` consecutive rows of the table (whatever part of them is
    written), so no more than ``block`` paths are ever held, however sparse ``rows`` are.
    """
    block = block or ROW_BLOCK
    names = np.asarray(list(class_names), dtype=object)
    n = snap.info.n_rows
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)  # newline="" and csv's \r\n: the bytes of the in-memory writer
        w.writerow(PREDICTIONS_HEADER)
        for rows, split_names, pred, score in parts:
            rows = np.asarray(rows, dtype=np.int64)
            if np.any(np.diff(rows) < 0):
                raise ValueError("write_predictions needs sorted rows")  # a bug of the caller, not bad input
            bounds = np.searchsorted(rows, np.arange(0, n + block, block))
            for lo, a, b in zip(range(0, n, block), bounds[:-1], bounds[1:]):
                if a == b:
                    continue
                r = rows[a:b]
                paths = snap.row_block("paths", lo, int(r[-1]) + 1)[r - lo]
                scores = [f"{float(s):.6g}" for s in score[a:b]]
                w.writerows(zip(paths, split_names(r), names[labels[r]], names[np.asarray(pred[a:b], int)], scores))
