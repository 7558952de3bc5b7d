"""The device, the autocast precision and the CPU heap setting of an extraction."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

from ..errors import UsageError


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"Unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device != "cuda":
        raise UsageError("--precision fp16 needs --device cuda; use fp32 or bf16 on the CPU")
    return precision


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Raises
    ------
    UsageError
        ``cuda`` asked for on a machine without one.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"Unknown device {device!r}: use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    return "cpu"


def _probe_device() -> str:
    """Guess, without importing torch, whether ``auto`` will find a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"


@contextlib.contextmanager
def _heap_for_big_blocks(device: str) -> Iterator[None]:
    """Keep big tensors in the heap during a CPU extraction (glibc only).

    glibc serves every block above its mmap threshold (at most 32 MB) with ``mmap`` and gives
    it back with ``munmap``, so each batch page-faults its activations in again: on this
    project's machines half of a CPU forward pass went to the kernel (EfficientNet-Lite0,
    batch 64: 1.3 M page faults for 64 images; 7.3 -> 14.6 img/s without them). Disable mmap
    for the duration and restore glibc's defaults afterwards. ``CNNCODES_MALLOPT=0`` turns it off.
    """
    libc = None
    if device == "cpu" and os.environ.get("CNNCODES_MALLOPT", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4
            if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
                libc = None
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-4, 65536)  # M_MMAP_MAX default
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD default
            libc.malloc_trim(0)
