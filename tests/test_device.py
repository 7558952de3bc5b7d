"""Device selection: CPU fallback here; GPU paths checked where a GPU exists (skipped otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnncodes import load_codes
from cnncodes.cli_extract import main as extract_main
from cnncodes.extraction import extract, resolve_device, resolve_precision
from cnncodes.extraction._runtime import _probe_device

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU; CI and this machine have none")


@pytest.mark.skipif(GPU, reason="checks the CPU fallback, on a machine without GPU")
def test_auto_falls_back_to_cpu_and_cuda_is_a_usage_error(flowers_small, tmp_path, capsys):
    assert resolve_device("auto") == "cpu" and _probe_device() == "cpu"
    assert resolve_precision("auto", "cpu") == "fp32"
    rc = extract_main([str(flowers_small), "--model", "tiny", "--weights", "none", "--layers", "fc1",
                       "--device", "cuda", "--out", str(tmp_path / "c"), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU" in err and "--device cpu" in err
    res = extract(flowers_small, "tiny", ["fc1"], weights="none", device="auto", out=tmp_path / "c", workers=0)
    assert load_codes(res.path, "fc1").spec["precision"] == "fp32"


def test_precision_values():
    assert resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="fp16' needs device='cuda'"):
        resolve_precision("fp16", "cpu")


@needs_gpu
def test_gpu_codes_match_cpu(flowers_small, tmp_path):
    kw = dict(weights="none", workers=0, dtype="float32")
    cpu = load_codes(extract(flowers_small, "tiny", ["fc1", "conv2"], device="cpu", out=tmp_path / "a", **kw).path,
                     ["fc1", "conv2"])
    g32 = extract(flowers_small, "tiny", ["fc1", "conv2"], device="cuda", precision="fp32", out=tmp_path / "b", **kw)
    gbf = extract(flowers_small, "tiny", ["fc1", "conv2"], device="cuda", out=tmp_path / "c", **kw)
    a = load_codes(g32.path, ["fc1", "conv2"])
    b = load_codes(gbf.path, ["fc1", "conv2"])
    assert b.spec["precision"] == "bf16" and g32.path != gbf.path  # precision is part of the fingerprint
    np.testing.assert_allclose(a.X, cpu.X, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b.X, cpu.X, rtol=5e-2, atol=5e-2 * float(np.abs(cpu.X).max()))
