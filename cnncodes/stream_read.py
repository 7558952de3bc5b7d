"""Reading codes for the streamed training: chunks of a cache snapshot, and a scratch copy read back per pass.

The exact solver (:mod:`cnncodes.stream_solver`) reads the training rows once per iteration,
hundreds of times. Read from the cache, every pass would decompress the codes again (gzip, chunks of
128 rows: ~1 s per pass of 4,550 x 4,096 float16 codes here, most of the fit's time), so
:class:`SpilledRows` copies the rows once, as stored (float16 stays float16) and uncompressed, to a
scratch file beside the run, and every pass reads that file back sequentially, one chunk at a time,
with plain reads (the OS page cache keeps it while memory allows; a memory map would count its pages in
the process's resident memory). The copy is deleted when the fit ends.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from .errors import CacheCorruptError, CacheError, ScratchSpaceError

_GAP = 64  # rows between two reads of a chunk below which one read spans both


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, looked up on first use, not at import: ``find_library`` runs
    ``ldconfig -p`` in a subprocess, which every importer of this module would pay."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_freed_memory() -> None:
    """Hand the heap pages freed by the last chunk back to the OS (glibc's ``malloc_trim``).

    A chunk's arrays (a few MB each: the read block, its float32 copy, the normalised rows,
    sklearn's copies) are freed and allocated again for every chunk. glibc serves them from
    the heap once one of that size has been freed (its mmap threshold rises to it), and the
    heap's holes grew the process by ~20 MB over a run of 100,000 rows (1024-D) more than over
    10,000; trimming once a chunk keeps the peak at what one chunk needs. A no-op elsewhere.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


class ChunkReader:
    """Normalised float32 rows of a layer set, read through one cache snapshot."""

    def __init__(self, snap, keys, norm: str):
        from .classify._estimators import make_normaliser

        self.snap, self.keys, self.norm = snap, list(keys), norm
        self.normaliser = make_normaliser(norm)
        self.fitted = norm != "standard"  # the others are row-wise: nothing to learn

    def raw(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Rows ``rows`` (any order) as ``dtype`` (None: as stored), read in one contiguous block per layer."""
        release_freed_memory()  # the previous chunk's arrays (see there)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        # one read per run of nearby rows (a chunk's blocks lie far apart in the file)
        cuts = np.flatnonzero(np.diff(srt) > _GAP) + 1
        segs = np.split(srt, cuts)
        parts = [np.concatenate([self.snap.read_block(k, int(g[0]), int(g[-1]) + 1)[g - g[0]] for g in segs])
                 for k in self.keys]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        out = np.empty(block.shape, dtype=block.dtype if dtype is None else dtype)
        out[order] = block
        return out

    def fit(self, rows: np.ndarray, chunk_rows: int) -> None:
        """Learn ``standard``'s mean and variance over ``rows`` in a streamed pass."""
        if not self.fitted:
            for s in range(0, len(rows), chunk_rows):
                self.normaliser.partial_fit(self.raw(rows[s:s + chunk_rows]))
            self.fitted = True

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` normalised (float32)."""
        return self.normalise(self.raw(rows))

    def normalise(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return self.normaliser.transform(X) if self.norm != "none" else X


def verify_and_check(snap, keys, used: np.ndarray, chunk_rows: int) -> None:
    """One sequential pass: each layer's sha256 (as :func:`load_codes` checks it) and finite codes on ``used``."""
    from .splits import check_codes

    n = snap.info.n_rows
    for k in keys:
        h = hashlib.sha256()
        for s in range(0, n, chunk_rows):
            release_freed_memory()
            block = snap.read_block(k, s, min(n, s + chunk_rows))
            h.update(np.ascontiguousarray(block).tobytes())
            sel = used[(used >= s) & (used < s + len(block))]
            if len(sel):
                check_codes(block.astype(np.float32), sel - s, what=f"layer {k}")
        if h.hexdigest() != snap.layer_sha256(k):
            raise CacheCorruptError(f"The codes of layer {k!r} in {snap.path} changed after they were written "
                                    f"(sha256 mismatch). Do not use them; delete the file and extract again.")


class SpilledRows:
    """Raw codes of ``rows`` (in that order) copied once to ``path``; :meth:`chunks` reads them back.

    Use as a context manager: the file is deleted on exit, whatever happened.
    """

    def __init__(self, reader: ChunkReader, rows: np.ndarray, path: Path, chunk_rows: int):
        self.reader, self.rows, self.path, self.chunk_rows = reader, np.asarray(rows), Path(path), chunk_rows
        self.dtype = None  # as stored: known from the first block
        self.dim = sum(reader.snap.info.layers[k].dim for k in reader.keys)
        with open(self.path, "xb") as f:  # x: never over a file that is not ours
            try:
                for s in range(0, len(self.rows), chunk_rows):
                    block = np.ascontiguousarray(reader.raw(self.rows[s:s + chunk_rows], dtype=None))
                    self.dtype = block.dtype
                    f.write(block.data)
                f.flush()
            except CacheError:  # reading the cache failed: its own error, and no scratch file left behind
                self.path.unlink(missing_ok=True)
                raise
            except OSError as e:
                self.path.unlink(missing_ok=True)
                need = len(self.rows) * self.dim * np.dtype(self.dtype or np.float32).itemsize
                raise ScratchSpaceError(
                    f"The streamed training copies the codes it reads on every pass, uncompressed, to {self.path} "
                    f"(about {need / 1e9:.2f} GB); writing it failed: {e}. Free that much space beside the run "
                    f"folder, or give the run a folder on another disk (the 'out' parameter)."
                ) from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)

    def blocks(self):
        """``(positions, raw block)`` of each chunk, in order, read back from the scratch file."""
        release_freed_memory()
        with open(self.path, "rb", buffering=0) as f:
            for s in range(0, len(self.rows), self.chunk_rows):
                n = min(self.chunk_rows, len(self.rows) - s)
                buf = np.empty((n, self.dim), dtype=self.dtype)
                if f.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                    raise OSError(f"the scratch copy {self.path} of the codes was cut short while training")
                yield np.arange(s, s + n), buf
                release_freed_memory()

    def chunks(self, normalise, t: np.ndarray):
        """:data:`cnncodes.stream_solver.Chunks`: ``normalise(raw)`` and ``t`` of the rows, chunk by chunk."""
        def chunks():
            for pos, raw in self.blocks():
                yield normalise(raw), t[self.rows[pos]]
        return chunks
