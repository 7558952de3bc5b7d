"""Atomic writes: the destination is either the old file or the new one, with normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from cnncodes.fileio import atomic_path, atomic_write_text, sha256_bytes, sha256_of_file


def test_atomic_write_replaces_and_keeps_umask_permissions(tmp_path):
    p = tmp_path / "a.json"
    old = os.umask(0o022)
    try:
        atomic_write_text(p, "one")
        atomic_write_text(p, "two")
    finally:
        os.umask(old)
    assert p.read_text() == "two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary file left behind
    assert sha256_of_file(p) == sha256_bytes(b"two")


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "model.bin"
    atomic_write_text(p, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"half a mod")
            raise RuntimeError("killed mid-write")
    assert p.read_text() == "good" and sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_atomic_write_never_touches_the_process_umask(tmp_path, monkeypatch):
    """Reading the umask means setting it, process-wide: a thread creating a file meanwhile (the shard
    writer) would get mode 0o666. The kernel applies the umask to the new file instead."""
    calls = []
    real_umask = os.umask

    def spy(mask):
        calls.append(mask)
        return real_umask(mask)

    old = real_umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", spy)
        atomic_write_text(tmp_path / "a.json", "one")
    finally:
        real_umask(old)
    assert calls == []
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
