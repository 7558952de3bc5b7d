"""Extract CNN codes into a crash-safe, incremental HDF5 cache.

The flow of :func:`extract`:

1. **Plan.** List the images (folder or CSV), resolve the backbone, weights and layers,
   and compute the extraction fingerprint. The cache file is named after the dataset and
   the fingerprint, so the same command finds the same file.
2. **Hit, append or extend.** If the file exists, rows whose image is unchanged (same
   path, size, mtime, label, split) keep their codes; new or changed images, and layers
   the file does not hold yet, are the only work. No work is a *cache hit*: no forward
   pass, no torch import.
3. **Run.** The work is cut into batches with fixed boundaries. Each finished batch is
   written as a shard file ``<cache>.partial/shard-...npz`` (temporary name, fsync,
   rename; its sha256 is in its name). A killed run leaves finished shards behind; the
   same command resumes from them and recomputes only the missing batches, so the
   result equals a clean run (bitwise on CPU with the same batch size).
4. **Consolidate.** Old codes and shards are streamed, in the manifest's order, into a
   new HDF5 file written under a temporary name and renamed over the old one. Only then
   is the ``.partial`` folder removed.

Bad images are recorded (status ``error``, a message, NaN codes), never replaced by a
neighbour; above ``error_budget`` the run stops, keeping its shards.

Where each part lives: ``_api`` (:func:`extract`, :func:`extract_images`), ``_spec`` (the spec,
its fingerprint, the layer plan), ``_plan`` (the cache file of a dataset, which rows are reused),
``_features`` (the model with its pooling hooks), ``_pipeline`` (decoding workers, batches, the gate),
``_runtime`` (device, precision, heap); the work folder of shards is :mod:`cnncodes.workdir` and the
resize/crop :mod:`cnncodes.transforms`.
"""

from __future__ import annotations

from ..transforms import MAX_RESIZED_ASPECT, resize_crop, resize_crop_tensor
from ._api import DEFAULT_OUT, ExtractResult, extract, extract_images
from ._pipeline import DECODERS
from ._runtime import keep_big_blocks_in_heap, resolve_device, resolve_precision
from ._spec import ExtractConfig, effective_backbone, plan_layers

__all__ = ["DECODERS", "DEFAULT_OUT", "MAX_RESIZED_ASPECT", "ExtractConfig", "ExtractResult", "effective_backbone",
           "extract", "extract_images", "keep_big_blocks_in_heap", "plan_layers", "resize_crop", "resize_crop_tensor",
           "resolve_device", "resolve_precision"]
