"""The compact row table and block-wise predictions file of a streamed run (:mod:`cnncodes.stream_rows`)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cnncodes import classify as C
from cnncodes import stream_rows
from cnncodes.classify._run import _write_predictions
from cnncodes.errors import CacheCorruptError
from cnncodes.store import CacheSnapshot, _rows_sha256, load_codes, open_cache, read_rows
from cnncodes.store._read import _row_fields
from conftest import digits_cache

N = 1797


def _cache(tmp_path, name="d.h5"):
    """Digits with failed rows, a recorded train/val/test split, and paths JSON must escape."""
    status = ["ok"] * N
    for i in (3, 50, 700, 1796):
        status[i] = "error"
    splits = list(np.random.default_rng(1).choice(["train", "val", "test"], N, p=[.6, .2, .2]))
    path = digits_cache(tmp_path / name, status=status, splits=splits)
    with h5py.File(path, "r+") as f:  # unicode, quotes, commas and a newline in a few paths; rows hash redone
        p = f["paths"].asstr()[:]
        for i, extra in ((0, 'é "q",x'), (17, "新\nline"), (900, "\\back")):
            p[i] = p[i].replace(".png", f"{extra}.png")
        del f["paths"]
        f.create_dataset("paths", data=p.astype(object), dtype=h5py.string_dtype("utf-8"))
        rows = {name: (f[name].asstr()[:] if f[name].dtype == object else f[name][:]) for name in _row_fields(f)}
        f.attrs["rows_sha256"] = _rows_sha256(rows, [str(c) for c in f["class_names"].asstr()[:]], _row_fields(f))
    return path


@pytest.mark.parametrize("block", [1, 5, 1000, N, 8192])
def test_blockwise_rows_hash_accepts_an_intact_table_and_reads_what_rows_reads(tmp_path, block):
    path = _cache(tmp_path)
    rows = read_rows(path)  # verifies with the whole-table hash
    with open_cache(path) as snap:
        snap.verify_rows(block)
        for name in ("paths", "split", "status", "message", "labels", "content_sha256", "file_inode"):
            got = np.concatenate([snap.row_block(name, lo, lo + block) for lo in range(0, N, block)])
            assert list(got) == list(rows[name]), name


@pytest.mark.parametrize("block", [7, 8192])
def test_blockwise_rows_hash_detects_a_changed_path(tmp_path, block):
    path = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        f["paths"][1000] = "d0/other.png"
    with open_cache(path) as snap, pytest.raises(CacheCorruptError, match="row table"):
        snap.verify_rows(block)


def test_compact_rows_and_their_split_equal_the_full_tables(tmp_path):
    path = _cache(tmp_path)
    codes = load_codes(path, "fc7")
    with open_cache(path) as snap:
        table = stream_rows.read_compact_rows(snap, block=100)
        assert table.labels.dtype == np.int64 and table.split_codes.dtype == np.int32
        assert np.array_equal(table.labels, codes.labels)
        assert list(table.splits()) == list(codes.splits) and list(table.status()) == list(codes.status)
        got = stream_rows.make_compact_split(snap, table, val_fraction=0.15, test_fraction=0.2, seed=0)
    want = C.make_split(codes.labels, codes.splits, codes.status, class_names=codes.class_names, paths=codes.paths,
                        messages=codes.messages, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert got.to_dict() == want.to_dict() and got.n_failed == 4
    assert got.failed_examples[0] == f"{codes.paths[3]}: decode failed"
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(got, part), getattr(want, part))


@pytest.mark.parametrize("block", [1, 64, 8192])
def test_blockwise_predictions_file_is_byte_for_byte_the_in_memory_one(tmp_path, block):
    path = _cache(tmp_path)
    codes = load_codes(path, "fc7")
    split = C.make_split(codes.labels, codes.splits, codes.status, class_names=codes.class_names)
    trval, test = np.sort(np.concatenate([split.train, split.val])), np.sort(split.test)
    rng = np.random.default_rng(0)
    pred_all = {p: (rng.integers(0, 10, len(r)), rng.normal(0, 3, len(r)) * 10.0 ** rng.integers(-8, 8, len(r)))
                for p, r in (("train", trval), ("test", test))}
    _write_predictions(tmp_path / "memory.csv", codes, trval, split, pred_all)
    val = np.sort(split.val)
    with open_cache(path) as snap:
        stream_rows.write_predictions(tmp_path / "stream.csv", snap, codes.labels, codes.class_names, [
            (trval, lambda r: np.where(np.isin(r, val), "val", "train"), *pred_all["train"]),
            (test, lambda r: np.full(len(r), "test"), *pred_all["test"])], block=block)
    assert (tmp_path / "stream.csv").read_bytes() == (tmp_path / "memory.csv").read_bytes()


def test_streamed_run_never_holds_more_than_a_block_of_row_strings(tmp_path, monkeypatch):
    """The guard against materialising paths (or any string column) for all rows: every read of a
    string field of the row table, by any route, spans at most ROW_BLOCK rows."""
    from cnncodes.store import _read

    path = _cache(tmp_path)
    block = 100
    monkeypatch.setattr(stream_rows, "ROW_BLOCK", block)
    monkeypatch.setattr(_read, "ROW_BLOCK", block)
    spans = []
    real = _read._field_block

    def spy(f, name, lo, hi):
        out = real(f, name, lo, hi)
        if out.dtype == object:
            spans.append((name, len(out)))
        return out

    monkeypatch.setattr(_read, "_field_block", spy)
    monkeypatch.setattr(CacheSnapshot, "rows", lambda *a, **k: pytest.fail("the whole row table was read"))
    res = C.train_run(path, ["fc7"], classifiers=["svm"], grid=[1.0, 10.0], out=tmp_path / "run", plots=False,
                      stream=True, stream_options={"chunk_rows": 256}, max_iter=5)
    assert res.metrics["split"]["counts"]["test"] > 0
    assert {n for n, _ in spans} >= {"paths", "split", "status", "message"}
    assert max(k for _, k in spans) <= block, max(spans, key=lambda t: t[1])
