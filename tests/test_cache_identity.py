"""Issue 9 §3: a cache never mixes up what the user did not ask for.

Every case is provoked for real: real image files (links to ../shared/datasets, or copies where a
file's bytes must change), real ``extract`` calls with the ``tiny`` backbone, and the rows and codes
of the resulting cache files checked against what the user listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FLOWERS, REPO, link_subset, need

from cnncodes import load_codes
from cnncodes.errors import CacheMismatchError
from cnncodes.extraction import extract
from cnncodes.store import read_info, read_rows

KW = dict(weights="none", device="cpu", workers=0, batch_size=4)


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def _reference_codes(files: list[Path], tmp: Path, layer: str = "fc1") -> dict[str, np.ndarray]:
    """Codes of ``files`` extracted alone, by file name: what a clean run gives each image."""
    ref = tmp / f"ref-{len(list(tmp.glob('ref-*')))}"
    (ref / "k").mkdir(parents=True)
    for f in files:
        shutil.copy(f, ref / "k" / f.name)
    c = load_codes(extract(ref, "tiny", [layer], out=ref / "codes", **KW).path, layer)
    return {Path(p).name: x for p, x in zip(c.paths, c.X)}


# --------------------------------------------------------------------------- 1. which list


@pytest.mark.parametrize("name", [None, "same"])
def test_two_csv_lists_of_one_folder_get_their_own_caches(flowers_small, tmp_path, name):
    files = _images(flowers_small)
    a = _write_csv(flowers_small / "A.csv", [(f.relative_to(flowers_small), f.parent.name) for f in files[:6]])
    b = _write_csv(flowers_small / "B.csv", [(f.relative_to(flowers_small), f.parent.name) for f in files[6:]])
    out = tmp_path / "codes"
    ra = extract(a, "tiny", ["fc1"], out=out, name=name, **KW)
    before = load_codes(ra.path, "fc1")
    rb = extract(b, "tiny", ["fc1"], out=out, name=name, **KW)
    assert rb.path != ra.path and not rb.hit and rb.n_computed == 6
    after = load_codes(ra.path, "fc1")  # B's extraction left A's cache as it was
    assert list(after.paths) == [str(f.relative_to(flowers_small)) for f in files[:6]]
    np.testing.assert_array_equal(after.X, before.X)
    assert list(load_codes(rb.path, "fc1").paths) == [str(f.relative_to(flowers_small)) for f in files[6:]]
    again = extract(a, "tiny", ["fc1"], out=out, name=name, **KW)
    assert again.hit and again.path == ra.path
    if name is None:
        assert "_A-" in ra.path.name and "_B-" in rb.path.name  # the file names say which list


def test_same_folder_name_in_two_places_does_not_collide(tmp_path):
    x = link_subset(need(FLOWERS), tmp_path / "x" / "data", 3, ["daisy", "rose"])
    y = link_subset(need(FLOWERS), tmp_path / "y" / "data", 3, ["tulip", "sunflower"])
    out = tmp_path / "codes"
    for name in (None, "same"):
        rx = extract(x, "tiny", ["fc1"], out=out, name=name, **KW)
        ry = extract(y, "tiny", ["fc1"], out=out, name=name, **KW)
        assert rx.path != ry.path and not ry.hit
        assert load_codes(rx.path, "fc1").class_names == ["daisy", "rose"]
        assert load_codes(ry.path, "fc1").class_names == ["sunflower", "tulip"]


def test_a_cache_file_of_another_list_is_refused_not_reused(flowers_small, tmp_path):
    files = _images(flowers_small)
    a = _write_csv(flowers_small / "A.csv", [(f.relative_to(flowers_small), f.parent.name) for f in files[:6]])
    b = _write_csv(flowers_small / "B.csv", [(f.relative_to(flowers_small), f.parent.name) for f in files[:6]])
    out = tmp_path / "codes"
    pa = extract(a, "tiny", ["fc1"], out=out, **KW).path
    pb = extract(b, "tiny", ["fc1"], out=out, **KW).path
    os.replace(pb, pa)  # B's file under A's name: the same rows, but not A's list
    with pytest.raises(CacheMismatchError, match="B.csv"):
        extract(a, "tiny", ["fc1"], out=out, **KW)


# --------------------------------------------------------------------------- 2. labels


def test_renamed_label_updates_the_row_table_without_a_forward_pass(flowers_small, tmp_path, monkeypatch):
    files = _images(flowers_small)
    rows = [(f.relative_to(flowers_small), f.parent.name) for f in files]
    lst = _write_csv(tmp_path / "list.csv", [(flowers_small / p, lab) for p, lab in rows])
    out = tmp_path / "codes"
    first = extract(lst, "tiny", ["fc1"], out=out, **KW)
    before = load_codes(first.path, "fc1")
    assert before.class_names == ["daisy", "rose", "tulip"]

    # "rose" -> "rosa": the same rows, the same label indices (sorted alike), another name
    _write_csv(lst, [(flowers_small / p, "rosa" if lab == "rose" else lab) for p, lab in rows])
    import cnncodes.extraction._api as ex

    def no_forward(*a, **k):
        raise AssertionError("a label-only change ran the network")

    monkeypatch.setattr(ex, "_Runner", no_forward)
    res = extract(lst, "tiny", ["fc1"], out=out, **KW)
    assert not res.hit and res.n_computed == 0 and res.n_reused == len(rows) and res.path == first.path
    after = load_codes(res.path, "fc1")
    assert after.class_names == ["daisy", "rosa", "tulip"]
    assert [after.class_names[i] for i in after.labels] == ["rosa" if lab == "rose" else lab for _p, lab in rows]
    np.testing.assert_array_equal(after.X, before.X)
    assert extract(lst, "tiny", ["fc1"], out=out, **KW).hit  # and the next run is a hit on the new names

    # a relabelled row (another index) also reaches the file
    _write_csv(lst, [(flowers_small / p, "tulip" if i == 0 else lab) for i, (p, lab) in enumerate(rows)])
    moved = load_codes(extract(lst, "tiny", ["fc1"], out=out, **KW).path, "fc1")
    assert moved.class_names[moved.labels[0]] == "tulip"
    np.testing.assert_array_equal(moved.X, before.X)


# --------------------------------------------------------------------------- 3. weights files


def _tiny_weights(path: Path, seed: int) -> Path:
    import torch

    from cnncodes.backbones import get_backbone

    torch.manual_seed(seed)
    model = get_backbone("tiny").build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    tmp = path.with_name(path.name + ".new")
    torch.save(model.state_dict(), tmp)
    return tmp


@pytest.mark.parametrize("how", ["in place", "by rename"])
def test_weights_replaced_with_size_and_mtime_kept_are_hashed_again(flowers_small, tmp_path, monkeypatch, how):
    import cnncodes.backbones._weights as bb  # the hashing module itself: its _RACY_NS is patched
    from cnncodes.extraction import extract_images
    from cnncodes.store import read_info

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "memo"))
    monkeypatch.setattr(bb, "_RACY_NS", 0)  # memoise at once, as for a weights file downloaded long ago
    w = tmp_path / "w.pth"
    os.replace(_tiny_weights(w, 1), w)
    kw = dict(KW, weights=str(w))
    first = extract(flowers_small, "tiny", ["fc1"], out=tmp_path / "codes", **kw)
    assert json.loads(bb._hash_memo().read_text())  # the memo was written: the next look is a memo look-up
    st = os.stat(w)

    other = _tiny_weights(w, 2)
    assert os.path.getsize(other) == st.st_size  # same architecture: the same number of bytes
    if how == "in place":
        w.write_bytes(other.read_bytes())
        other.unlink()
    else:
        os.replace(other, w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime restored
    assert (os.stat(w).st_size, os.stat(w).st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    # predict with the recorded spec: the weights on disk are not those the codes were made with
    spec = read_info(first.path).spec
    with pytest.raises(CacheMismatchError, match="weights differ"):
        extract_images(_images(flowers_small)[:2], spec=spec, layer_keys=["fc1"], device="cpu", workers=0)
    second = extract(flowers_small, "tiny", ["fc1"], out=tmp_path / "codes", **kw)
    assert not second.hit and second.path != first.path and second.n_computed == 12
    # the new codes are those of the new weights: equal to a run with a fresh copy of them elsewhere
    fresh = tmp_path / "fresh.pth"
    shutil.copy(w, fresh)
    ref = extract(flowers_small, "tiny", ["fc1"], out=tmp_path / "ref", **dict(KW, weights=str(fresh)))
    np.testing.assert_array_equal(load_codes(second.path, "fc1").X, load_codes(ref.path, "fc1").X)
    assert not np.array_equal(load_codes(second.path, "fc1").X, load_codes(first.path, "fc1").X)


def test_a_weights_file_changed_moments_ago_is_not_memoised(tmp_path, monkeypatch):
    import cnncodes.backbones._weights as bb  # the hashing module itself: its _RACY_NS is patched

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    os.utime(f, ns=(10**18, 10**18))  # an old mtime, but the ctime is now: a rewrite may follow in this tick
    assert bb.sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert not bb._hash_memo().exists()
    monkeypatch.setattr(bb, "_RACY_NS", 0)
    bb.sha256_file(f)
    assert list(json.loads(bb._hash_memo().read_text()).values()) == [hashlib.sha256(b"a" * 1000).hexdigest()]


# --------------------------------------------------------------------------- 4. image content


def _bmp(path: Path, seed: int) -> Path:
    """A 40x48 BMP of random pixels: every such file has the same size, whatever its content."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture
def bmp_data(tmp_path) -> Path:
    root = tmp_path / "bmp"
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            _bmp(root / cls / f"{i}.bmp", 10 * c + i)
    return root


def _rewrite_keeping_size_and_mtime(path: Path, seed: int) -> None:
    st = os.stat(path)
    new = _bmp(path.with_suffix(".tmp.bmp"), seed)
    path.write_bytes(new.read_bytes())  # in place: same inode, same size
    new.unlink()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def _codes_by_path(path: Path) -> dict[str, np.ndarray]:
    c = load_codes(path, "fc1")
    return {p: x for p, x in zip(c.paths, c.X)}


def test_image_rewritten_with_size_and_mtime_kept_is_redone(bmp_data, tmp_path):
    out = tmp_path / "codes"
    first = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    before = _codes_by_path(first.path)
    _rewrite_keeping_size_and_mtime(bmp_data / "a" / "1.bmp", 99)
    res = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    assert not res.hit and res.n_computed == 1 and res.n_reused == 5
    after = _codes_by_path(res.path)
    ref = _reference_codes([bmp_data / "a" / "1.bmp"], tmp_path)["1.bmp"]
    np.testing.assert_array_equal(after["a/1.bmp"], ref)
    assert not np.array_equal(after["a/1.bmp"], before["a/1.bmp"])
    for p in before:
        if p != "a/1.bmp":
            np.testing.assert_array_equal(after[p], before[p])
    # each row records the bytes it was made of
    rows = read_rows(res.path)
    assert list(rows["content_sha256"]) == [hashlib.sha256((bmp_data / p).read_bytes()).hexdigest()
                                            for p in rows["paths"]]
    assert rows["file_inode"].tolist() == [os.stat(bmp_data / p).st_ino for p in rows["paths"]]
    assert extract(bmp_data, "tiny", ["fc1"], out=out, **KW).hit


def test_copied_dataset_is_rehashed_not_reextracted(bmp_data, tmp_path, monkeypatch):
    out = tmp_path / "codes"
    before = _codes_by_path(extract(bmp_data, "tiny", ["fc1"], out=out, **KW).path)
    # the dataset replaced by a copy (new inodes and ctimes, mtimes kept), one file of it changed meanwhile
    copy = shutil.copytree(bmp_data, tmp_path / "copy", copy_function=shutil.copy2)
    _rewrite_keeping_size_and_mtime(copy / "b" / "2.bmp", 77)
    shutil.rmtree(bmp_data)
    os.replace(copy, bmp_data)
    res = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    assert not res.hit and res.n_computed == 1 and res.n_reused == 5  # the bytes decided, row by row
    after = _codes_by_path(res.path)
    np.testing.assert_array_equal(after["b/2.bmp"], _reference_codes([bmp_data / "b" / "2.bmp"], tmp_path)["2.bmp"])
    for p in before:
        if p != "b/2.bmp":
            np.testing.assert_array_equal(after[p], before[p])
    import cnncodes.extraction._plan as ex

    read = []
    monkeypatch.setattr(ex, "_sha256_of", lambda p: read.append(p) or "")
    again = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    assert again.hit and read == []  # the new identities were recorded: no file is read again


def test_verify_content_catches_what_the_file_system_does_not_show(bmp_data, tmp_path):
    from cnncodes.cli_extract import main as extract_main
    from cnncodes.store import read_info, write_cache

    out = tmp_path / "codes"
    first = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    before = _codes_by_path(first.path)
    victim = bmp_data / "b" / "0.bmp"
    _rewrite_keeping_size_and_mtime(victim, 55)
    # A file system whose timestamps are too coarse to tell the rewrite (FAT, some network mounts):
    # the cache records the rewritten file's ctime and inode, as if the rewrite came before the listing.
    info, rows, c = read_info(first.path), read_rows(first.path), load_codes(first.path, "fc1", dtype=None)
    j = list(rows["paths"]).index("b/0.bmp")
    rows["file_ctime_ns"][j] = os.stat(victim).st_ctime_ns
    write_cache(first.path, spec=info.spec, fingerprint=info.fingerprint, manifest_hash=info.manifest_hash,
                dataset_root=info.dataset_root, class_names=c.class_names, rows=rows,
                layers={"fc1": (c.records["fc1"], [c.X])}, created=info.created)
    assert extract(bmp_data, "tiny", ["fc1"], out=out, **KW).hit  # the default trusts the file system

    argv = [str(bmp_data), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out", str(out),
            "--workers", "0", "--device", "cpu", "--batch-size", "4", "--no-progress", "--verify-content"]
    assert extract_main(argv) == 0
    after = _codes_by_path(first.path)
    np.testing.assert_array_equal(after["b/0.bmp"], _reference_codes([victim], tmp_path)["0.bmp"])
    for p in before:
        if p != "b/0.bmp":
            np.testing.assert_array_equal(after[p], before[p])
    res = extract(bmp_data, "tiny", ["fc1"], out=out, verify_content=True, **KW)
    assert res.hit  # verified again: every hash matches now


def _as_schema_1(path: Path) -> None:
    """Rewrite a cache file as cnncodes wrote it before schema 2 (no inode, ctime or content hash)."""
    import h5py

    from cnncodes import store

    rows, class_names = read_rows(path), read_info(path).class_names
    with h5py.File(path, "r+") as f:
        for name in store.ROW_IDENTITY_DEFAULTS:
            del f[name]
        f.attrs["schema_version"] = 1
        del f.attrs["dataset_list"]
        f.attrs["rows_sha256"] = store._rows_sha256(rows, class_names, store._ROW_FIELDS_V1)


def test_schema_1_caches_are_read_and_upgraded(bmp_data, tmp_path):
    import h5py

    from cnncodes.errors import CacheError

    out = tmp_path / "codes"
    first = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    before = load_codes(first.path, "fc1")
    _as_schema_1(first.path)
    old = load_codes(first.path, "fc1")  # trainers keep reading old caches, verified
    np.testing.assert_array_equal(old.X, before.X)
    assert read_rows(first.path)["file_inode"].tolist() == [-1] * 6
    res = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    assert res.path == first.path and not res.hit and res.n_computed == 0  # rewritten, not recomputed
    assert read_info(res.path).schema_version == 2
    assert read_rows(res.path)["file_inode"].tolist() == [os.stat(bmp_data / p).st_ino for p in before.paths]
    np.testing.assert_array_equal(load_codes(res.path, "fc1").X, before.X)
    assert extract(bmp_data, "tiny", ["fc1"], out=out, **KW).hit
    # asked to verify, rows without a recorded hash cannot be trusted: they are redone
    _as_schema_1(first.path)
    assert extract(bmp_data, "tiny", ["fc1"], out=out, verify_content=True, **KW).n_computed == 6
    # a schema this cnncodes does not know is refused with a message, never misread
    with h5py.File(first.path, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(CacheError, match="schema version 3"):
        load_codes(first.path, "fc1")


# --------------------------------------------------------------------------- 5. folder links


def test_folder_links_back_into_the_dataset_are_skipped_not_relabelled(tmp_path, caplog):
    data = link_subset(need(FLOWERS), tmp_path / "data", 3, ["daisy", "rose", "tulip"])  # file links: followed
    expected = sorted(str(p.relative_to(data)) for p in _images(data))
    ext = link_subset(FLOWERS, tmp_path / "elsewhere", 2, ["sunflower"]) / "sunflower"
    os.symlink(data, data / "daisy" / "up")  # to the dataset root
    os.symlink(data / "rose", data / "tulip" / "roses")  # into another class
    os.symlink(tmp_path, data / "rose" / "top")  # to an ancestor of the dataset
    os.symlink(ext, data / "daisy" / "more")  # out of the tree: followed...
    os.symlink(ext.parent, ext / "loop")  # ...but not round its own loop
    os.symlink(ext, data / "tulip" / "again")  # nor a second time
    expected += sorted(f"daisy/more/{p.name}" for p in _images(ext))
    with caplog.at_level("WARNING", logger="cnncodes.images"):
        res = extract(data, "tiny", ["fc1"], out=tmp_path / "codes", **KW)
    c = load_codes(res.path, "fc1")
    assert sorted(c.paths) == sorted(expected)
    assert c.class_names == ["daisy", "rose", "tulip"]
    assert [c.class_names[i] for i in c.labels] == [p.split("/")[0] for p in c.paths]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for link in ("daisy/up", "tulip/roses", "rose/top", "daisy/more/loop"):
        assert link in warned
    assert "already walked" in warned  # tulip/again

    # prediction expands a folder with the same walk
    from cnncodes.predict import expand_paths

    assert expand_paths([data]) == sorted(str(data / p) for p in expected)


def test_split_folder_linked_to_another_split_is_skipped(tmp_path):
    root = tmp_path / "data"
    link_subset(need(FLOWERS), root / "train", 2, ["daisy", "rose"])
    os.symlink(root / "train", root / "val")  # would list every train image again as val
    c = load_codes(extract(root, "tiny", ["fc1"], out=tmp_path / "codes", **KW).path, "fc1")
    assert set(c.splits) == {"train"} and len(c.paths) == 4


def test_a_hit_with_the_identity_checks_still_imports_no_torch(bmp_data, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "codes"
    first = extract(bmp_data, "tiny", ["fc1"], out=out, **KW)
    code = ("import sys; from cnncodes.extraction import extract; "
            f"r = extract({str(bmp_data)!r}, 'tiny', ['fc1'], out={str(out)!r}, weights='none', device='cpu'); "
            "print(r.hit, str(r.path), any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert got.stdout.split() == ["True", str(first.path), "False"]
