"""Training on every view of each image (``train_run(train_views="all")``).

A cache extracted with ``keep_views`` holds each view's code (``<key>#views``, see
:mod:`cnncodes.views`). Training on all views makes each view of a training image a training row
with the image's label (V rows per image: augmentation by the crops and flips that extraction
already computed); val and test images are predicted on the mean of their views, which is the
stored combined code when the cache combines views with ``mean`` (so ``predict.py``, which uses
the combined code, predicts exactly as the run evaluated). C is still chosen on the val split;
cross-validation is refused, because its folds would put views of one image on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidParameterError, UsageError
from ..views import is_views_key, split_views, views_key

#: What ``train_views`` accepts: the combined code of each image, or every kept view.
TRAIN_VIEWS = ("combined", "all")


def check_layers(sets: Sequence[Sequence[str]]) -> None:
    """Kept per-view codes are not a layer to train on: they are the training rows of their layer."""
    bad = [k for s in sets for k in s if is_views_key(k)]
    if bad:
        raise UsageError(f"{', '.join(bad)} hold(s) the kept per-view codes of a layer, not a layer to train on: "
                         f"name the layer ({', '.join(k.rsplit('#', 1)[0] for k in bad)}) with train_views='all'.")


def check_train_views(train_views: str, stream) -> None:
    """The argument alone (before the cache is opened)."""
    if train_views not in TRAIN_VIEWS:
        raise InvalidParameterError("train_views", "train_run",
                                    f"must be one of {', '.join(TRAIN_VIEWS)}. Got {train_views!r} instead.")
    if train_views == "all" and stream:
        raise UsageError("train_views='all' trains in memory; streamed training (stream=True) uses the combined "
                         "codes. Leave one of them out.")


def check_cache(info, sets: Sequence[Sequence[str]], cache) -> int:
    """The number of kept views V of the cache, refused unless every layer has them and views are averaged."""
    missing = [k for s in sets for k in s if views_key(k) not in info.layers]
    if missing:
        raise UsageError(f"The cache {cache} holds no kept per-view codes of {', '.join(missing)}. Extract it again "
                         f"with the same views and keep_views=True (the combined codes are kept), then train.")
    combine = info.spec.get("preprocessing", {}).get("combine", "mean")
    if combine != "mean":
        raise UsageError(f"The cache {cache} combines its views with {combine!r}: training on every view predicts on "
                         f"the mean of the views, which is the stored code only with combine='mean'. Extract with "
                         f"combine='mean', or train on the combined codes.")
    counts = {info.layers[views_key(k)].views for s in sets for k in s}
    if len(counts) != 1 or min(counts) < 2:
        raise AssertionError(f"kept views of {cache} with view counts {counts}")
    return counts.pop()


@dataclass
class ViewRows:
    """The kept views of one layer set: ``X`` (n_images, V, D), the layers' views side by side per view."""

    X: np.ndarray

    @property
    def n_views(self) -> int:
        return self.X.shape[1]

    def rows(self, images: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training rows of ``images``: each image's V views, its label repeated (image-major)."""
        X = self.X[images].reshape(len(images) * self.n_views, self.X.shape[2])
        return X, np.repeat(y[images], self.n_views)


def load_view_rows(snap, lset: Sequence[str], n_views: int, usable: np.ndarray, paths, name: str) -> ViewRows:
    """The kept views of ``lset`` from one cache snapshot, checked finite on the ``usable`` rows."""
    from ..splits import check_codes

    parts = [split_views(snap.load(views_key(k)).X, n_views) for k in lset]
    X = np.ascontiguousarray(np.concatenate(parts, axis=2), dtype=np.float32)
    check_codes(X.reshape(len(X), -1), usable, paths, what=f"the kept views of {name}")
    return ViewRows(X)


def need_val(split) -> None:
    if not len(split.val):
        raise UsageError("Training on every view chooses C on a val split, and this run has none (val_fraction=0?): "
                         "cross-validation folds would put views of one image on both sides. Give a val fraction "
                         "> 0, or train on the combined codes.")
