"""Shared fixtures: small real image folders (links into ../shared/datasets), local weight files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
FLOWERS = SHARED / "flowers5"
HYMENOPTERA = SHARED / "hymenoptera"
SIGNS = SHARED / "sign_language_digits"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data {path} is not here (it lies beside the repo in ../shared/datasets)")
    return path


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
