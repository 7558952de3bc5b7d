"""Train/val/test splits of a cache's rows: recorded ones checked, missing ones drawn stratified; the codes checked.

This module never imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import TrainingDataError, UsageError

log = logging.getLogger("cnncodes.classify")

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """Row indices (into the cache's rows) of each split, and how they were made.

    Attributes
    ----------
    train, val, test : ndarray of int
        Only rows with ``status == "ok"``; ``val`` may be empty (then C is chosen by CV).
    source : {"recorded", "stratified"}
    seed : int or None
        Seed of the stratified split (None for a recorded split).
    n_failed : int
        Rows left out because their image failed to decode.
    failed_examples : list of str
        ``"path: message"`` of the first failed rows.
    notes : list of str
    warnings : list of str
        What makes the evaluation less than it seems: a class with no image in a split
        (see :func:`make_split`). Logged, listed in the summary and in ``metrics.json``.
    roles : dict
        Where each part comes from (``{"train": ..., "val": ..., "test": ...}``), e.g. the
        recorded val split used as the test split of a train/val layout.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str
    seed: int | None
    n_rows: int
    n_failed: int
    failed_examples: list[str] = field(default_factory=list)
    val_fraction: float | None = None
    test_fraction: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_dict(self) -> dict:
        return {
            "source": self.source, "seed": self.seed, "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction, "counts": self.counts(), "n_rows": self.n_rows,
            "n_failed": self.n_failed, "failed_examples": list(self.failed_examples), "notes": list(self.notes),
            "warnings": list(self.warnings), "roles": dict(self.roles),
        }


def _class_list(labels: np.ndarray, class_names: Sequence[str]) -> str:
    vals, counts = np.unique(labels, return_counts=True)
    return ", ".join(f"{_name(class_names, v)} ({c})" for v, c in zip(vals, counts))


def _name(class_names: Sequence[str], i) -> str:
    i = int(i)
    return str(class_names[i]) if 0 <= i < len(class_names) else str(i)


def make_split(
    labels: np.ndarray,
    splits: np.ndarray,
    status: np.ndarray,
    *,
    class_names: Sequence[str] = (),
    paths: np.ndarray | None = None,
    messages: np.ndarray | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Split the usable rows of a cache into train / val / test.

    The split recorded per row is used when every usable row has one; otherwise a
    stratified split (seeded, recorded) is drawn. Rows with ``status != "ok"`` are
    left out and counted.

    A drawn split follows one rule, so that every class is trained on and, where it can
    be, tested: a class with >= 3 usable images has at least one in each of train, val
    and test (val only when ``val_fraction > 0``); a class with 2 images has one in
    train and one in test; a class with 1 image is in train only. Where the proportional
    split leaves a class out of a part, one image is moved there from the part holding
    most of that class (a note says so).

    A recorded layout with ``train`` and ``val`` but no ``test`` rows (e.g. a dataset
    shipped with ``train/`` and ``val/`` folders) is used as follows: the recorded val
    rows become the test split, used once; C is chosen on a stratified val split drawn
    from the recorded train rows (``val_fraction`` of them, ``seed``), or by
    cross-validation on train when ``val_fraction == 0``. ``Split.roles`` and a note
    record this.

    Every class that ends up with no image in train, in a non-empty val split or in the
    test split gets a warning in ``Split.warnings``.

    Parameters
    ----------
    labels, splits, status : ndarray of length N
    class_names : sequence of str
        For messages.
    paths, messages : ndarray of str, optional
        For the list of failed rows.
    val_fraction, test_fraction : float
        Fractions of the usable rows for a drawn split; ``val_fraction=0`` means no
        val split (C is then chosen by cross-validation on train).
    seed : int

    Returns
    -------
    Split

    Raises
    ------
    TrainingDataError
        No usable row, a single class, an empty train or test split, an unknown or
        partly missing recorded split, or a stratified split sklearn cannot draw.
    UsageError
        Fractions outside [0, 1) or summing to 1 or more.
    """
    labels = np.asarray(labels)
    splits = np.asarray(splits).astype(str)
    status = np.asarray(status).astype(str)
    n = len(labels)
    ok = status == "ok"
    idx_ok = np.flatnonzero(ok)
    failed = np.flatnonzero(~ok)
    examples = []
    for i in failed[:10]:
        p = str(paths[i]) if paths is not None else f"row {i}"
        m = str(messages[i]) if messages is not None else ""
        examples.append(f"{p}: {m}" if m else p)
    if failed.size:
        log.info("Leaving out %d of %d rows whose image failed to decode", failed.size, n)
    if idx_ok.size == 0:
        raise TrainingDataError(f"No usable row: all {n} images failed to decode (or the cache is empty).")
    n_classes = np.unique(labels[idx_ok]).size
    if n_classes < 2:
        raise TrainingDataError(
            f"The usable rows hold a single class ({_class_list(labels[idx_ok], class_names)}): a classifier needs "
            f"at least two. Check the dataset's class folders."
        )
    common = dict(n_rows=n, n_failed=int(failed.size), failed_examples=examples)
    sp = splits[idx_ok]
    has = sp != ""
    if has.any():
        split = _recorded_split(labels, idx_ok, sp, has, class_names, val_fraction, seed, common)
    else:
        _check_fractions(val_fraction, test_fraction)
        train, val, test, notes = _draw_stratified(idx_ok, labels, val_fraction, test_fraction, seed, class_names)
        split = Split(train, val, test, "stratified", int(seed), val_fraction=float(val_fraction),
                      test_fraction=float(test_fraction), notes=notes, roles=dict.fromkeys(SPLITS, "drawn"), **common)
    split.warnings = _absent_class_warnings(labels, idx_ok, split, class_names)
    return split


def _check_fractions(val_fraction, test_fraction) -> None:
    for what, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            raise UsageError(f"The '{what}' parameter must be a float in [0, 1). Got {v!r} instead.")
    if test_fraction <= 0:
        raise UsageError("The 'test_fraction' parameter must be > 0 when the cache records no split.")
    if val_fraction + test_fraction >= 1:
        raise UsageError(f"val_fraction + test_fraction must be < 1. Got {val_fraction} + {test_fraction}.")


def _recorded_split(labels, idx_ok, sp, has, class_names, val_fraction, seed, common) -> Split:
    unknown = sorted(set(sp[has]) - set(SPLITS))
    if unknown:
        raise TrainingDataError(
            f"Unknown recorded split name(s) {', '.join(map(repr, unknown))}: expected train, val or test."
        )
    if not has.all():
        raise TrainingDataError(
            f"{int((~has).sum())} of {idx_ok.size} usable rows have no recorded split while the others have one: "
            f"put every image in a train/val/test folder, or none."
        )
    parts = {s: idx_ok[sp == s] for s in SPLITS}
    if parts["test"].size == 0 and parts["val"].size and parts["train"].size:
        return _train_val_layout(labels, parts, class_names, val_fraction, seed, common)
    for s in ("train", "test"):
        if parts[s].size == 0:
            raise TrainingDataError(
                f"The recorded {s} split is empty (counts: train {parts['train'].size}, val {parts['val'].size}, "
                f"test {parts['test'].size}). Add a {s}/ folder, or extract without split folders for a drawn split."
            )
    if np.unique(labels[parts["train"]]).size < 2:
        raise TrainingDataError(
            f"The recorded train split holds a single class ({_class_list(labels[parts['train']], class_names)})."
        )
    return Split(parts["train"], parts["val"], parts["test"], "recorded", None,
                 roles={s: f"recorded {s}" for s in SPLITS}, **common)


def _train_val_layout(labels, parts, class_names, val_fraction, seed, common) -> Split:
    """train/ and val/ recorded, no test/: the recorded val is the test split; val is drawn from train."""
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise UsageError(f"The 'val_fraction' parameter must be a float in [0, 1). Got {val_fraction!r} instead.")
    rec_train, rec_val = parts["train"], parts["val"]
    if np.unique(labels[rec_train]).size < 2:
        raise TrainingDataError(
            f"The recorded train split holds a single class ({_class_list(labels[rec_train], class_names)})."
        )
    how = "by cross-validation on train"
    if val_fraction > 0:
        train, _, val, notes = _draw_stratified(rec_train, labels, 0.0, val_fraction, seed, class_names,
                                                shown={"test": "val"})
        how = f"on a stratified val split drawn from the recorded train split ({val_fraction:g} of it, seed {seed})"
    else:
        train, val, notes = rec_train, np.array([], dtype=np.int64), []
    notes = [f"the cache records train and val splits but no test split: the recorded val split ({rec_val.size} "
             f"images) is used as the test split, once; C is chosen {how}"] + notes
    roles = {"train": "recorded train" + (" less the drawn val" if val_fraction > 0 else ""),
             "val": "drawn from recorded train" if val_fraction > 0 else "none (C by cross-validation)",
             "test": "recorded val"}
    return Split(train, val, np.sort(rec_val), "recorded", int(seed), val_fraction=float(val_fraction), notes=notes,
                 roles=roles, **common)


def _draw_stratified(rows, labels, val_fraction, test_fraction, seed, class_names, shown: Mapping | None = None):
    """Stratified train/val/test of ``rows`` by the rule of :func:`make_split`.

    Classes large enough to get at least one image of each part in proportion go through
    sklearn's ``train_test_split`` (as they always did: the same seed gives the same split);
    the others start in train and :func:`_give_every_class` places them.
    """
    from sklearn.model_selection import train_test_split

    y = labels[rows]
    classes, counts = np.unique(y, return_counts=True)
    smallest = min(test_fraction, val_fraction) if val_fraction > 0 else test_fraction
    small = np.isin(y, classes[counts * smallest < 1])
    big = rows[~small]
    try:
        if big.size:
            rest, test = train_test_split(big, test_size=test_fraction, stratify=labels[big], random_state=seed)
        else:
            rest, test = big, big
        if val_fraction > 0 and rest.size:
            train, val = train_test_split(
                rest, test_size=val_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
            )
        else:
            train, val = rest, np.array([], dtype=np.int64)
    except ValueError as e:
        raise TrainingDataError(
            f"Cannot draw a stratified split of {rows.size} images ({_class_list(y, class_names)}) with "
            f"test_fraction={test_fraction}, val_fraction={val_fraction}: {e}. Add images to the small classes, "
            f"or use val_fraction=0 (C chosen by cross-validation) or other fractions."
        ) from e
    parts = {"train": np.concatenate([train, rows[small]]), "val": np.asarray(val), "test": np.asarray(test)}
    notes = _give_every_class(labels, parts, need_val=val_fraction > 0, seed=seed, class_names=class_names,
                              shown=shown)
    return (np.sort(parts["train"]).astype(np.int64), np.sort(parts["val"]).astype(np.int64),
            np.sort(parts["test"]).astype(np.int64), notes)


def _give_every_class(labels, parts: dict, *, need_val: bool, seed: int, class_names,
                      shown: Mapping | None = None) -> list[str]:
    """Move single images between parts (in place) until every class has what the rule asks:
    test when it has >= 2 images, val too when it has >= 3 (and a val split is drawn).
    ``shown`` renames parts in the notes (a drawn val is the "test" part of its draw)."""
    shown = shown or {}
    rng = np.random.default_rng(seed)
    notes = []
    for c in np.unique(labels[np.concatenate(list(parts.values())).astype(np.int64)]):
        in_part = {s: parts[s][labels[parts[s]] == c] for s in parts}
        n_c = sum(v.size for v in in_part.values())
        wanted = (["test"] if n_c >= 2 else []) + (["val"] if need_val and n_c >= 3 else [])
        for s in wanted:
            donors = [d for d in parts if d != s and in_part[d].size > 1]
            if in_part[s].size or not donors:
                continue
            donor = max(donors, key=lambda d: in_part[d].size)
            row = rng.choice(np.sort(in_part[donor]))
            parts[donor] = parts[donor][parts[donor] != row]
            parts[s] = np.append(parts[s], row)
            in_part[donor] = in_part[donor][in_part[donor] != row]
            in_part[s] = np.array([row])
            notes.append(f"class {_name(class_names, c)} ({n_c} images): 1 image moved from {shown.get(donor, donor)} "
                         f"to {shown.get(s, s)} so that every part has one")
    return notes


_ABSENT_CONSEQUENCE = {
    "train": "the model can never predict it",
    "val": "C is chosen without it",
    "test": "it is not tested (the test accuracy and balanced accuracy leave it out)",
}


def _absent_class_warnings(labels, idx_ok, split: Split, class_names) -> list[str]:
    classes, counts = np.unique(labels[idx_ok], return_counts=True)
    out = []
    for part in SPLITS:
        rows = getattr(split, part)
        if part == "val" and rows.size == 0:
            continue  # C by cross-validation on train: no val split to miss a class
        absent = np.setdiff1d(classes, labels[rows])
        for c in absent:
            n_c = int(counts[np.searchsorted(classes, c)])
            out.append(f"class {_name(class_names, c)} ({n_c} usable image{'s' if n_c != 1 else ''}) has no image "
                       f"in the {part} split: {_ABSENT_CONSEQUENCE[part]}")
    return out


def check_codes(X: np.ndarray, rows: np.ndarray, paths: np.ndarray | None = None, what: str = "codes") -> None:
    """Raise if codes of the given (usable) rows hold NaN or inf.

    Raises
    ------
    TrainingDataError
        Naming the number of bad rows and the first few paths.
    """
    bad = rows[~np.isfinite(X[rows]).all(axis=1)]
    if bad.size:
        ex = ", ".join(str(paths[i]) if paths is not None else f"row {i}" for i in bad[:5])
        raise TrainingDataError(
            f"{bad.size} usable row(s) of {what} hold NaN or inf values (e.g. {ex}). The cache is damaged or the "
            f"backbone overflowed (try float32 codes); delete it and extract again."
        )
