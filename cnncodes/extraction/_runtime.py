"""The device, the autocast precision and the CPU heap setting of an extraction."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from pathlib import Path

from ..errors import UsageError


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"Unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device != "cuda":
        raise UsageError("precision='fp16' needs device='cuda'; use precision='fp32' or precision='bf16' on the CPU")
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
        raise UsageError("device='cuda' was asked for, but torch sees no CUDA GPU here; use device='cpu' or device='auto'")
    return "cpu"


def _probe_device() -> str:
    """Guess, without importing torch, whether ``auto`` will find a GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"


def gpu_model() -> str | None:
    """The first NVIDIA GPU's model as the driver reports it, read without importing torch."""
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with contextlib.suppress(OSError):
            for line in Path(info).read_text().splitlines():
                if line.startswith("Model:"):
                    return line.split(":", 1)[1].strip()
    return None


#: mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_big_blocks_in_heap() -> bool:
    """Serve big blocks from the heap for the rest of this process (glibc only); True when set.

    glibc serves every block above its mmap threshold (at most 32 MB) with ``mmap`` and gives it
    back with ``munmap``, so each batch of a CPU extraction page-faults its activations in again:
    on this project's machines half of a CPU forward pass went to the kernel (EfficientNet-Lite0,
    batch 64: 1.3 M page faults for 64 images; 7.3 -> 14.6 img/s without them).

    This is a setting of the process, so the program decides, once, at start: the command-line
    tools call it for CPU runs, and a program that extracts on the CPU may do the same (the heap
    then keeps its peak size until exit). The library never calls it: mallopt(3) turns glibc's
    dynamic mmap threshold off for good once ``M_MMAP_MAX`` or ``M_TRIM_THRESHOLD`` is set, so no
    call could give a host process its settings back. Equivalent at process start:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
