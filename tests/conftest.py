"""Shared fixtures and helpers: data paths, the one skip for missing data, small real image folders (links into
../shared/datasets), a cache of real digit codes, local weight files, one BLAS thread for sklearn fits.

The quick loop is ``pytest -m "not slow"``; ``pytest`` runs everything (the kill tests too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from cnncodes.store import LayerRecord, fingerprint_of, write_cache

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
FLOWERS = SHARED / "flowers5"
HYMENOPTERA = SHARED / "hymenoptera"
SIGNS = SHARED / "sign_language_digits"

_MISSING = "real data {} is not here (it lies beside the repo in ../shared/datasets)"


def need(path: Path) -> Path:
    """``path``, or skip the calling test when the shared data is not beside the repo."""
    if not path.exists():
        pytest.skip(_MISSING.format(path))
    return path


def needs(path: Path) -> pytest.MarkDecorator:
    """:func:`need` as a test's mark."""
    return pytest.mark.skipif(not path.exists(), reason=_MISSING.format(path))


def image_files(folder: Path) -> list[Path]:
    """The photos of one class folder, sorted."""
    return sorted(p for p in need(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def link_subset(src_root: Path, dst_root: Path, per_class: int, classes: list[str] | None = None,
                offset: int = 0) -> Path:
    """An image folder of symbolic links to the first ``per_class`` images of each class."""
    need(src_root)
    for cls in classes or sorted(p.name for p in src_root.iterdir() if p.is_dir()):
        files = sorted(f for f in os.listdir(src_root / cls) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        (dst_root / cls).mkdir(parents=True, exist_ok=True)
        for f in files[offset:offset + per_class]:
            os.symlink(src_root / cls / f, dst_root / cls / f)
    return dst_root


@pytest.fixture
def one_blas_thread():
    """sklearn fits in the tests on one BLAS/OpenMP thread: on a busy 2-core machine, spinning
    threads make small fits 10-30x slower (the library does the same for small problems)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# --------------------------------------------------------------------------- a cache of real codes

SPEC = {
    "backbone": "alexnet",
    "weights": {"kind": "default", "identity": "AlexNet_Weights.IMAGENET1K_V1:alexnet-owt-7be5be79.pth",
                "sha256": "7be5be79" + "0" * 56},
    "preprocessing": {"resize": 256, "crop": 224, "interpolation": "bilinear", "draft": True},
    "dtype": "float16",
    "layers": [],
    "weights_path": "/somewhere/alexnet-owt-7be5be79.pth",
}


def layer_record(key: str, node: str, dim: int, spec: dict = SPEC) -> LayerRecord:
    return LayerRecord(key, key, node, "relu", "avg", dim, (), fingerprint_of({"spec": spec, "key": key, "node": node}))


def digits_cache(path, *, splits=None, status=None, n=None, nan_rows=(), labels=None, spec=SPEC) -> Path:
    """A cache of real codes: fc6 = the digit pixels, fc7 = their square root (both 64-D)."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    if n is not None:
        X, y = X[:n], y[:n]
    if labels is not None:
        y = np.asarray(labels)
    n = len(y)
    X7 = np.sqrt(X)
    for i in nan_rows:
        X[i] = np.nan
    status = np.array(status if status is not None else ["ok"] * n)
    X[status != "ok"] = np.nan
    X7[status != "ok"] = np.nan
    rows = {
        "paths": np.array([f"d{y[i]}/img{i:04d}.png" for i in range(n)]),
        "labels": y,
        "split": np.array(splits if splits is not None else [""] * n),
        "status": status,
        "message": np.array(["decode failed" if s != "ok" else "" for s in status]),
        "file_size": np.zeros(n, np.int64),
        "file_mtime_ns": np.zeros(n, np.int64),
    }
    layers = {"fc6": (layer_record("fc6", "classifier.2", 64, spec), [X]), "fc7": (layer_record("fc7", "classifier.5", 64, spec), [X7])}
    write_cache(path, spec=spec, fingerprint=fingerprint_of(spec), manifest_hash="m" * 64, dataset_root="/data/digits",
                class_names=[f"digit{k}" for k in range(10)], rows=rows, layers=layers)
    return Path(path)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    # the sha256 memo of weight files goes to a temporary folder, never to ~/.cache
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cnncodes-cache"))


@pytest.fixture
def flowers_small(tmp_path) -> Path:
    """12 real flower photos: 4 each of daisy, rose, tulip."""
    return link_subset(FLOWERS, tmp_path / "flowers", 4, ["daisy", "rose", "tulip"])


@pytest.fixture(scope="session")
def alexnet_state_dict(tmp_path_factory) -> Path:
    """A fixed random AlexNet state dict saved as a local weights file."""
    import torch
    import torchvision

    torch.manual_seed(1234)
    model = torchvision.models.alexnet(weights=None)
    path = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    torch.save(model.state_dict(), path)
    return path


def tiny_fc1_by_hand(weights_path, views_u8) -> np.ndarray:
    """fc1 (post-ReLU) of the tiny network on uint8 (V, 3, 32, 32) views, with plain torch: the independent
    computation that stored view codes are compared with."""
    import torch

    from cnncodes.backbones import get_backbone

    spec = get_backbone("tiny")
    m = spec.build()
    m.load_state_dict(torch.load(weights_path, weights_only=True))
    m.eval()
    pre = spec.preprocessing
    x = (views_u8.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return m.classifier[:3](m.features(x)).numpy()
