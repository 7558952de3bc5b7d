"""Fine-tuning and training from scratch: the large-data cases, with the same inputs, preprocessing,
splits, caches and run folders as the linear classifiers on codes.

Modules, one topic each:

* :mod:`.data` — image rows, the train/val/test split (``make_split``, as train_svm), decoding and
  train-time augmentation (torchvision transforms v2), cached prefix activations;
* :mod:`.surgery` — new head (random or from a train_svm softmax), frozen prefix, BatchNorm policy,
  parameter groups (head lr, smaller lr or layer decay for pretrained layers, no weight decay on
  norms and biases);
* :mod:`.loop` — the training loop, warm-up + cosine schedule, early stop, crash-safe checkpoints;
* :mod:`.runfolder` — metrics.json, weights (safetensors) and their sidecar, plots, prediction;
* :mod:`.orchestrate` — :func:`finetune`, what ``scripts/finetune.py`` calls.

Everything here imports torch; :mod:`cnncodes.classify` and :mod:`cnncodes.store` still never do.
"""

from __future__ import annotations

__all__ = ["finetune", "FinetuneResult"]


def __getattr__(name: str):
    if name in __all__:
        from . import orchestrate

        return getattr(orchestrate, name)
    raise AttributeError(f"module 'cnncodes.finetune' has no attribute {name!r}")
