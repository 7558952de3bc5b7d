"""The sparse layout of stored codes: lossless round trips, row access, corruption, size."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cnncodes import store
from cnncodes.errors import CacheCorruptError
from cnncodes.store import (
    LayerRecord,
    fingerprint_of,
    iter_layer_blocks,
    load_codes,
    write_cache,
)


def _post_relu(n: int, d: int, seed: int, dtype) -> np.ndarray:
    """Half-sparse post-ReLU codes with the awkward values: -0.0, NaN rows, all-zero rows, subnormals."""
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.standard_normal((n, d)), 0).astype(dtype)
    X[1] = 0  # an image whose codes are all zero
    special = np.array([-0.0, 6e-8, 1e-5, 65504, 0.5], dtype=dtype)  # -0.0 must survive as -0.0
    X[2, :min(d, 5)] = special[:min(d, 5)]
    X[3] = np.nan  # a failed image
    return X


def _write(path, X, compression, block=7):
    n, d = X.shape
    spec = {"backbone": "test"}
    rows = {"paths": np.array([f"c/{i:03d}.jpg" for i in range(n)]), "labels": np.zeros(n, np.int64),
            "split": np.array([""] * n), "status": np.array(["ok"] * n), "message": np.array([""] * n),
            "file_size": np.zeros(n, np.int64), "file_mtime_ns": np.zeros(n, np.int64)}
    rec = LayerRecord("fc7", "fc7", "classifier.5", "post", "avg", d)
    blocks = (X[s:s + block] for s in range(0, n, block))
    return write_cache(path, spec=spec, fingerprint=fingerprint_of(spec), manifest_hash="m" * 64, dataset_root="/d",
                       class_names=["c"], rows=rows, layers={"fc7": (rec, blocks)}, dtype=X.dtype.name,
                       compression=compression)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("d", [1, 13, 64])
def test_sparse_layout_round_trips_bit_for_bit(tmp_path, dtype, d):
    X = _post_relu(50, d, seed=d, dtype=dtype)
    _write(tmp_path / "s.h5", X, "sparse")
    back = load_codes(tmp_path / "s.h5", "fc7", dtype=dtype).X
    assert back.dtype == dtype and back.shape == X.shape
    np.testing.assert_array_equal(back.view(np.uint8), X.view(np.uint8))  # -0.0 and NaN payloads too
    with h5py.File(tmp_path / "s.h5", "r") as f:
        g = f["codes/fc7"]
        assert g.attrs["layout"] == "sparse" and g.attrs["dim"] == d
        bits = X.view(np.uint16 if X.dtype.itemsize == 2 else np.uint32) != 0
        assert g["values"].shape == (bits.sum(),) and g["row_start"][-1] == bits.sum()


def test_sparse_rows_in_any_order_equal_the_dense_matrix(tmp_path):
    X = _post_relu(300, 40, seed=1, dtype=np.float16)
    _write(tmp_path / "s.h5", X, "sparse")
    _write(tmp_path / "d.h5", X, "gzip")
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.permutation(300), [5, 5, 299, 0], rng.integers(0, 300, 50)])
    for block in (1, 16, 1000):
        for path in ("s.h5", "d.h5"):
            got = np.concatenate(list(iter_layer_blocks(tmp_path / path, "fc7", index, block=block)))
            np.testing.assert_array_equal(got.view(np.uint16), X[index].view(np.uint16))


def test_flipped_byte_in_sparse_values_is_detected(tmp_path):
    X = _post_relu(200, 64, seed=2, dtype=np.float16)
    _write(tmp_path / "s.h5", X, "sparse")
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        v = f["codes/fc7/values"]
        i = len(v) // 2
        v[i] = np.float16(float(v[i]) + 1.0)  # rewritten through HDF5: every filter passes, the value is wrong
    with pytest.raises(CacheCorruptError, match="fc7.*sha256 mismatch"):
        load_codes(tmp_path / "s.h5", "fc7")
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # a moved bit in the mask is caught as well
        m = f["codes/fc7/mask"]
        m[10, 0] = m[10, 0] ^ 0x01
    with pytest.raises(CacheCorruptError, match="fc7.*disagree"):
        load_codes(tmp_path / "s.h5", "fc7")


def test_sparse_is_smaller_than_gzip_on_half_sparse_codes(tmp_path):
    rng = np.random.default_rng(3)
    # post-ReLU of an average: about half zeros, the rest with a spread of exponents
    X = np.maximum(rng.standard_normal((512, 1280)) * rng.lognormal(0, 1, 1280), 0).astype(np.float16)
    sizes = {}
    for comp in ("gzip", "sparse"):
        _write(tmp_path / f"{comp}.h5", X, comp, block=64)
        with h5py.File(tmp_path / f"{comp}.h5", "r") as f:
            sizes[comp] = store.layer_storage_bytes(f["codes/fc7"])
    raw32 = X.size * 4
    assert sizes["sparse"] < 0.86 * sizes["gzip"], sizes
    assert sizes["sparse"] / raw32 < 1 / 3.5, sizes["sparse"] / raw32
