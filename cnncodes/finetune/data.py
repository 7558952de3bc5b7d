"""Data for fine-tuning: image rows, the split, decoding, augmentation and batches.

* The rows are extract.py's: an image folder (with or without split folders) or a CSV list,
  listed by :mod:`cnncodes.images`; the split is :func:`cnncodes.classify.make_split` with the
  same seed and fractions as ``train_svm.py``, so a fine-tuned run and a linear probe on the same
  data test on the same images.
* Evaluation images are decoded, resized and centre-cropped exactly as extract.py does (its
  ``_ImageDataset``), so val/test inputs equal the pixels the codes were computed from.
* Train-time augmentation (``augment="default"``) starts from the same decoded pixels
  (:func:`cnncodes.extraction._pipeline.decode_uint8`) and applies torchvision transforms v2:
  ``RandomResizedCrop(crop, scale=(0.35, 1))`` (fastai's ``aug_transforms`` minimum scale: small
  data does not survive ImageNet's 0.08) and ``RandomHorizontalFlip``. Each image's randomness is
  seeded by (seed, epoch, row), so a resumed run sees the same crops as an uninterrupted one,
  whatever the number of decoding workers.
* Batches are a permutation per epoch drawn from a generator seeded by (seed, epoch): no RNG state
  needs to survive a crash.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..classify import Split, make_split
from ..extraction._pipeline import _ImageDataset, _loader, decode_uint8
from ..extraction._plan import _load_manifest
from ..images import Manifest

__all__ = ["Rows", "list_rows", "epoch_batches", "augmented_loader", "eval_loader", "normalise", "mix_seed",
           "iter_cached", "AUGMENT_SCALE"]

AUGMENT_SCALE = (0.35, 1.0)


@dataclass
class Rows:
    """The labelled images of a run and their split.

    Attributes
    ----------
    manifest : Manifest
    paths : list of str
        Absolute image paths, in the manifest's (= the cache's) row order.
    labels : ndarray of int64
    class_names : list of str
    split : Split
        Indices into the rows.
    """

    manifest: Manifest
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    split: Split


def list_rows(data: str | os.PathLike, *, status: np.ndarray | None = None, messages: np.ndarray | None = None,
              seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Rows:
    """List ``data`` and split it as ``train_svm.py`` would.

    ``status``/``messages`` (per row, from a cache) leave failed images out of the split exactly as
    train_svm does; without them every row counts as decodable (a row that then fails to decode is
    masked out of the loss and counted).

    Raises
    ------
    DatasetError, TrainingDataError, UsageError
        A missing/empty dataset, a single class, an empty split, bad fractions.
    """
    manifest = _load_manifest(data)
    n = len(manifest.rows)
    labels = np.array([r.label for r in manifest.rows], dtype=np.int64)
    splits = np.array([r.split for r in manifest.rows], dtype=object)
    rel = np.array([r.relpath for r in manifest.rows], dtype=object)
    st = np.array(["ok"] * n, dtype=object) if status is None else np.asarray(status)
    split = make_split(labels, splits, st, class_names=manifest.class_names, paths=rel, messages=messages,
                       val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    paths = [manifest.abspath(r) for r in manifest.rows]
    return Rows(manifest, paths, labels, list(manifest.class_names), split)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_batches(rows: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Row indices of ``rows`` cut into batches, in a permutation fixed by (seed, epoch)."""
    import torch

    rows = np.asarray(rows, dtype=np.int64)
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
        rows = rows[torch.randperm(len(rows), generator=g).numpy()]
    return [rows[s:s + batch_size].tolist() for s in range(0, len(rows), batch_size)]


def normalise(x_u8, pre, device: str):
    """uint8 (B, 3, H, W) -> float, scaled and normalised as extract.py's runner does (channels_last)."""
    import torch

    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    x = x_u8.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x.float().div_(255.0).sub_(mean).div_(std)


class _AugmentedDataset(_ImageDataset):
    """extract.py's decoding, then a random resized crop and a flip seeded by (seed, epoch, row)."""

    def __init__(self, paths: Sequence[str], pre, draft: bool, decoder: str, seed: int, epoch: int):
        super().__init__(paths, pre, draft, decoder)
        self.seed, self.epoch = seed, epoch

    def _decode(self, path: str):
        import torch
        from torchvision.transforms import v2

        t, note = decode_uint8(path, self.decoder, self.draft, self.max_pixels)
        i = self._index
        interp = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}.get(self.pre.interpolation, v2.InterpolationMode.BILINEAR)
        tf = v2.Compose([v2.RandomResizedCrop(self.pre.crop, scale=AUGMENT_SCALE, interpolation=interp,
                                              antialias=True), v2.RandomHorizontalFlip()])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, self.epoch, i))
            return tf(t).contiguous()[None], note  # one view: extract's collate concatenates views

    _index = None

    def __getitem__(self, i: int):
        self._index = i  # the row's seed; one item at a time per process
        try:
            return super().__getitem__(i)
        finally:
            self._index = None


def augmented_loader(paths: Sequence[str], pre, draft: bool, decoder: str, batches: list[list[int]],
                     workers: int, device: str, seed: int, epoch: int):
    """A DataLoader of augmented training batches ``(idx, uint8 x, status, notes)``."""
    import torch
    from torch.utils.data import DataLoader

    from ..extraction._pipeline import _collate

    ds = _AugmentedDataset(paths, pre, draft, decoder, seed, epoch)
    kw = {"prefetch_factor": 4} if workers > 0 else {}
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                      pin_memory=(device == "cuda" and torch.cuda.is_available()), **kw)


def eval_loader(paths: Sequence[str], pre, draft: bool, decoder: str, batches: list[list[int]], workers: int,
                device: str, **kw):
    """Batches decoded exactly as extract.py decodes them (resize, centre crop)."""
    loader, _gate = _loader(paths, pre, draft, decoder, batches, workers, device, **kw)
    return loader


def iter_cached(X: np.ndarray, map_shape: Sequence[int], batches: list[list[int]]) -> Iterator:
    """Batches of cached prefix activations ``(idx, float32 (B, *map_shape))``."""
    import torch

    for b in batches:
        x = torch.from_numpy(np.ascontiguousarray(X[b], dtype=np.float32)).view(len(b), *map_shape)
        yield b, x

