"""Tests of cnncodes.images: folder scanning, CSV lists and image decoding."""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cnncodes.errors import DatasetError, ImageDecodeError, UsageError
from cnncodes.images import (
    IMAGE_EXTENSIONS,
    Manifest,
    Row,
    is_plain_jpeg,
    load_image,
    read_csv_list,
    scan_folder,
)

from conftest import FLOWERS, HYMENOPTERA, REPO, SIGNS, needs

SIGNS7 = SIGNS / "7"
needs_flowers = needs(FLOWERS)
needs_hymenoptera = needs(HYMENOPTERA)
needs_signs = needs(SIGNS7)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _walk_images(root: Path) -> list[str]:
    """Image relpaths below root, computed independently of the module."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in files:
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(out)


def _write_rgb(path: Path, size=(8, 6), color=(10, 200, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _find_real_gif() -> Path:
    for d, _, files in os.walk(HYMENOPTERA):
        for f in sorted(files):
            p = Path(d) / f
            try:
                with Image.open(p) as im:
                    if im.format == "GIF":
                        return p
            except OSError:
                continue
    pytest.skip("no GIF in hymenoptera")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------- #
# scan_folder on real data
# --------------------------------------------------------------------------- #


@needs_hymenoptera
def test_scan_hymenoptera_split_layout():
    m = scan_folder(HYMENOPTERA)
    expected = _walk_images(HYMENOPTERA)
    assert len(expected) == 398
    assert [r.relpath for r in m.rows] == expected
    assert m.source == "folder"
    assert m.root == os.path.realpath(HYMENOPTERA)
    assert m.class_names == ("ants", "bees")
    splits = {r.split for r in m.rows}
    assert splits == {"train", "val"}
    n_train = sum(r.split == "train" for r in m.rows)
    n_val = sum(r.split == "val" for r in m.rows)
    assert n_train == sum(1 for p in expected if p.startswith("train/")) == 245
    assert n_val == sum(1 for p in expected if p.startswith("val/")) == 153
    for r in m.rows:
        split_dir, cls = r.relpath.split("/")[:2]
        assert r.split == split_dir
        assert r.class_name == cls
        assert m.class_names[r.label] == cls
    r0 = m.rows[0]
    st = os.stat(m.abspath(r0))
    assert (r0.size, r0.mtime_ns) == (st.st_size, st.st_mtime_ns)


@needs_flowers
def test_scan_flowers5_labels_and_speed():
    t0 = time.perf_counter()
    m = scan_folder(str(FLOWERS))
    elapsed = time.perf_counter() - t0
    print(f"scan_folder(flowers5): {len(m.rows)} rows in {elapsed * 1000:.1f} ms")
    assert m.class_names == ("daisy", "dandelion", "rose", "sunflower", "tulip")
    assert len(m.rows) == 4064
    assert [r.relpath for r in m.rows] == _walk_images(FLOWERS)
    counts = {c: 0 for c in m.class_names}
    for r in m.rows:
        folder = r.relpath.split("/")[0]
        assert r.class_name == folder
        assert m.class_names[r.label] == folder
        assert r.split == ""
        counts[folder] += 1
    assert counts == {"daisy": 742, "dandelion": 1016, "rose": 759, "sunflower": 694, "tulip": 853}
    assert os.path.isfile(m.abspath(m.rows[-1]))
    # a second scan is identical, digest included
    m2 = scan_folder(FLOWERS)
    assert m2 == m
    assert m2.digest() == m.digest()
    assert len(m.digest()) == 64


# --------------------------------------------------------------------------- #
# scan_folder on crafted trees
# --------------------------------------------------------------------------- #


def _make_tree(root: Path) -> None:
    _write_rgb(root / "cat" / "b.jpg")
    _write_rgb(root / "cat" / "A.PNG", fmt="PNG")
    _write_rgb(root / "cat" / "nested" / "deep" / "c.jpeg", fmt="JPEG")
    _write_rgb(root / "cat" / ".hidden.jpg")
    _write_rgb(root / "cat" / ".thumbs" / "t.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    _write_rgb(root / "dog" / "z.bmp", fmt="BMP")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.md").write_text("x")
    _write_rgb(root / ".git" / "x.jpg")


def test_scan_crafted_tree_filters_and_order(tmp_path, caplog):
    root = tmp_path / "data"
    _make_tree(root)
    with caplog.at_level(logging.WARNING, logger="cnncodes.images"):
        m = scan_folder(root)
    assert m.class_names == ("cat", "dog")
    assert [(r.relpath, r.label, r.class_name, r.split) for r in m.rows] == [
        ("cat/A.PNG", 0, "cat", ""),
        ("cat/b.jpg", 0, "cat", ""),
        ("cat/nested/deep/c.jpeg", 0, "cat", ""),
        ("dog/z.bmp", 1, "dog", ""),
    ]
    assert m.rows[3].size == (root / "dog" / "z.bmp").stat().st_size
    assert m.abspath(m.rows[2]) == str(root.resolve() / "cat" / "nested" / "deep" / "c.jpeg")
    warned = [rec.getMessage() for rec in caplog.records]
    assert any("empty_class" in w and "no image" in w for w in warned), warned


def test_scan_split_aliases_and_union_of_classes(tmp_path):
    root = tmp_path / "d"
    _write_rgb(root / "train" / "a" / "1.jpg")
    _write_rgb(root / "train" / "b" / "2.jpg")
    _write_rgb(root / "validation" / "b" / "3.jpg")
    _write_rgb(root / "test" / "c" / "4.jpg")
    (root / "README.txt").write_text("top-level file is ignored")
    m = scan_folder(root)
    assert m.class_names == ("a", "b", "c")
    assert [(r.relpath, r.label, r.split) for r in m.rows] == [
        ("test/c/4.jpg", 2, "test"),
        ("train/a/1.jpg", 0, "train"),
        ("train/b/2.jpg", 1, "train"),
        ("validation/b/3.jpg", 1, "val"),
    ]


def test_scan_not_split_when_other_top_dirs(tmp_path):
    root = tmp_path / "d"
    _write_rgb(root / "train" / "1.jpg")
    _write_rgb(root / "zebra" / "2.jpg")
    m = scan_folder(root)
    assert m.class_names == ("train", "zebra")
    assert {r.split for r in m.rows} == {""}


def test_digest_ignores_mtime_and_root_but_not_labels(tmp_path):
    a = tmp_path / "a"
    _make_tree(a)
    d1 = scan_folder(a).digest()
    os.utime(a / "cat" / "b.jpg", ns=(1, 1))
    m_touched = scan_folder(a)
    assert m_touched.rows[1].mtime_ns == 1
    assert m_touched.digest() == d1
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert scan_folder(b).digest() == d1
    # the same files under another class name change the identity
    (b / "dog").rename(b / "wolf")
    assert scan_folder(b).digest() != d1
    m = Manifest(root="/x", rows=(Row("p.jpg", 0, "k", "", 1, 2),), class_names=("k",), source="csv")
    m2 = Manifest(root="/y", rows=(Row("p.jpg", 0, "k", "val", 9, 9),), class_names=("k",), source="csv")
    assert m.digest() != m2.digest()


def test_scan_error_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="does not exist") as ei:
        scan_folder(missing)
    assert str(missing) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_scan_error_root_is_file(tmp_path):
    f = _write_rgb(tmp_path / "one.jpg")
    with pytest.raises(DatasetError, match="is not a folder") as ei:
        scan_folder(f)
    assert str(f) in str(ei.value)
    assert "ROOT/<class>/<image>" in str(ei.value)


def test_scan_error_empty_root(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / ".DS_Store").write_text("hidden files do not count")
    with pytest.raises(DatasetError, match="is empty") as ei:
        scan_folder(root)
    assert str(root) in str(ei.value)


def test_scan_error_images_directly_in_root(tmp_path):
    root = tmp_path / "flat"
    for i in range(3):
        _write_rgb(root / f"{i}.jpg")
    with pytest.raises(DatasetError) as ei:
        scan_folder(root)
    msg = str(ei.value)
    assert str(root) in msg
    assert "3 image(s) directly" in msg
    assert "no class subfolders" in msg
    assert "ROOT/<class>/<image>" in msg
    assert "CSV" in msg


def test_scan_error_no_subfolders_no_images(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no class subfolders") as ei:
        scan_folder(root)
    assert "1 .txt" in str(ei.value)


def test_scan_error_subfolders_without_images(tmp_path, caplog):
    root = tmp_path / "noimg"
    (root / "a").mkdir(parents=True)
    (root / "b" / "sub").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("x")
    (root / "a" / "y.TXT").write_text("x")
    (root / "b" / "sub" / "z.heic").write_bytes(b"\0\1")
    with caplog.at_level(logging.WARNING, logger="cnncodes.images"):
        with pytest.raises(DatasetError) as ei:
            scan_folder(root)
    msg = str(ei.value)
    assert str(root) in msg
    assert "2 class subfolders but no image file" in msg
    assert "3 file(s) of other types" in msg
    assert "2 .txt" in msg and "1 .heic" in msg
    assert ".jpg" in msg  # says which extensions are accepted
    assert sum("no image file" in r.getMessage() for r in caplog.records) == 2


# --------------------------------------------------------------------------- #
# read_csv_list
# --------------------------------------------------------------------------- #


@needs_flowers
def test_csv_round_trip_relative_and_absolute(tmp_path):
    folder = scan_folder(FLOWERS)
    picked = list(folder.rows[::101])  # 41 rows spread over every class
    picked = picked[::-1]  # CSV order is kept, whatever it is
    assert len({r.class_name for r in picked}) == 5
    (tmp_path / "data").symlink_to(FLOWERS, target_is_directory=True)
    lines = ["label,extra,path,split"]
    expected = []
    for i, r in enumerate(picked):
        split = ["train", "val", "", "test", "Valid"][i % 5]
        if i % 3 == 0:
            p = folder.abspath(r)  # absolute, outside the CSV's folder
            rel = p
        elif i % 3 == 1:
            p = "data/" + r.relpath
            rel = p
        else:
            p = "./sub/../data/" + r.relpath  # normalised
            rel = "data/" + r.relpath
        lines.append(f"{r.class_name},junk {i},{p},{split}")
        expected.append((rel, r.class_name, {"Valid": "val"}.get(split, split), r.size, r.mtime_ns))
    lines.insert(5, "")  # blank lines are skipped
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")

    m = read_csv_list(csv_path)
    assert m.source == "csv"
    assert m.root == str(tmp_path.resolve())
    assert m.class_names == tuple(sorted({r.class_name for r in picked}))
    got = [(r.relpath, r.class_name, r.split, r.size, r.mtime_ns) for r in m.rows]
    assert got == expected
    for row, src in zip(m.rows, picked):
        assert m.class_names[row.label] == src.class_name
        assert folder.class_names[src.label] == src.class_name
        assert os.path.samefile(m.abspath(row), folder.abspath(src))
    assert read_csv_list(str(csv_path)).digest() == m.digest()


def test_csv_without_split_column_and_crlf(tmp_path):
    _write_rgb(tmp_path / "imgs" / "x.png", fmt="PNG")
    _write_rgb(tmp_path / "imgs" / "y.png", fmt="PNG")
    (tmp_path / "l.csv").write_bytes(b"Path , LABEL\r\nimgs/y.png,zeta\r\nimgs/x.png, alpha \r\n")
    m = read_csv_list(tmp_path / "l.csv")
    assert m.class_names == ("alpha", "zeta")
    assert [(r.relpath, r.label, r.class_name, r.split) for r in m.rows] == [
        ("imgs/y.png", 1, "zeta", ""),
        ("imgs/x.png", 0, "alpha", ""),
    ]


def test_csv_error_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as ei:
        read_csv_list(tmp_path / "none.csv")
    assert "none.csv" in str(ei.value)
    with pytest.raises(DatasetError, match="is a folder"):
        read_csv_list(tmp_path)


def test_csv_error_empty_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="is empty") as ei:
        read_csv_list(empty)
    assert str(empty) in str(ei.value)
    header_only = tmp_path / "h.csv"
    header_only.write_text("path,label\n")
    with pytest.raises(DatasetError, match="no image rows"):
        read_csv_list(header_only)


def test_csv_error_bad_header(tmp_path):
    _write_rgb(tmp_path / "a.jpg")
    c = tmp_path / "nohead.csv"
    c.write_text("a.jpg,cat\n")
    with pytest.raises(DatasetError) as ei:
        read_csv_list(c)
    msg = str(ei.value)
    assert str(c) in msg
    assert "lacks column(s) path, label" in msg
    assert "path,label" in msg
    c.write_text("path,path,label\na.jpg,a.jpg,cat\n")
    with pytest.raises(DatasetError, match="repeats column"):
        read_csv_list(c)


def test_csv_error_lists_bad_lines(tmp_path):
    _write_rgb(tmp_path / "ok.jpg")
    _write_rgb(tmp_path / "ok2.jpg")
    (tmp_path / "adir.jpg").mkdir()
    c = tmp_path / "bad.csv"
    c.write_text(
        "path,label,split\n"  # line 1
        "ok.jpg,cat,train\n"  # 2 fine
        "ok2.jpg,cat\n"  # 3 wrong column count
        ",cat,train\n"  # 4 empty path
        "ok2.jpg,,val\n"  # 5 empty label
        "ok2.jpg,cat,holdout\n"  # 6 bad split
        "missing.jpg,dog,\n"  # 7 missing file
        "./ok.jpg,dog,\n"  # 8 duplicate of line 2
        '"multi\nline.jpg",cat,\n'  # 9-10 missing file (quoted newline)
        "adir.jpg,cat,\n"  # 11 not a file
    )
    with pytest.raises(DatasetError) as ei:
        read_csv_list(c)
    msg = str(ei.value)
    assert str(c) in msg
    assert "has 8 bad row(s):" in msg
    assert "line 3: wrong column count (expected 3, got 2)" in msg
    assert "line 4: empty path" in msg
    assert "line 5: empty label" in msg
    assert "line 6: bad split 'holdout'" in msg
    assert "line 7: file not found: " + str(tmp_path.resolve() / "missing.jpg") in msg
    assert "line 8: duplicate path './ok.jpg' (first on line 2)" in msg
    assert "line 9: file not found" in msg
    assert "line 11: not a file" in msg
    assert "line 2:" not in msg


def test_csv_error_caps_listing_at_ten(tmp_path):
    c = tmp_path / "many.csv"
    c.write_text("path,label\n" + "".join(f"m{i}.jpg,c\n" for i in range(25)))
    with pytest.raises(DatasetError) as ei:
        read_csv_list(c)
    msg = str(ei.value)
    assert "has 25 bad row(s) (first 10 shown)" in msg
    assert "line 11: file not found" in msg  # the 10th bad row
    assert "line 12:" not in msg
    assert msg.count("file not found") == 10


# --------------------------------------------------------------------------- #
# load_image: failures
# --------------------------------------------------------------------------- #


def test_load_empty_file(tmp_path):
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert str(ei.value) == f"{p}: empty file (0 bytes)"
    assert isinstance(ei.value, OSError)


def test_load_missing_file(tmp_path):
    p = tmp_path / "gone.png"
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert str(ei.value) == f"{p}: file not found"
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_load_text_named_jpg(tmp_path):
    p = tmp_path / "fake.jpg"
    p.write_text("hello, I am not a picture\n" * 20)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert str(ei.value).startswith(f"{p}: not an image")
    assert isinstance(ei.value.__cause__, Image.UnidentifiedImageError)


def test_load_truncated_jpeg(tmp_path):
    data = _jpeg_bytes((128, 96))
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: int(len(data) * 0.6)])
    # Pillow opens it and verify() would not notice: only load() does
    with Image.open(p) as im:
        assert im.size == (128, 96)
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ")
    assert "truncated" in msg
    assert isinstance(ei.value.__cause__, OSError)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    # the complete file decodes fine
    p.write_bytes(data)
    img, note = load_image(p)
    assert img.size == (128, 96) and note == ""


def test_load_decompression_bomb_error(tmp_path, monkeypatch):
    from cnncodes.images import pixels_over_limit

    p = _write_rgb(tmp_path / "big.png", size=(100, 100), fmt="PNG")
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p, max_pixels=4000)  # 10000 > 2 * 4000: Pillow's own check would raise too
    msg = str(ei.value)
    assert msg.startswith(f"{p}: image has 10000 pixels, above the limit 4000")
    assert "raise the max_pixels setting" in msg and "--" not in msg and pixels_over_limit(msg) == 10000
    # Pillow's global limit neither lowers nor raises load_image's
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    img, _ = load_image(p)
    assert img.size == (100, 100) and Image.MAX_IMAGE_PIXELS == 4000  # restored after the decode
    with pytest.raises(ImageDecodeError, match="image has 10000 pixels, above the limit 9999"):
        load_image(p, max_pixels=9999)


def test_load_decompression_bomb_warning_is_error(tmp_path, monkeypatch):
    from cnncodes.images import pixels_over_limit

    p = _write_rgb(tmp_path / "big.png", size=(100, 100), fmt="PNG")
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p, max_pixels=6000)  # 6000 < 10000 < 12000: Pillow would only warn
    assert "image has 10000 pixels, above the limit 6000" in str(ei.value)
    img, _ = load_image(p, max_pixels=10000)  # at the limit: fine
    assert img.size == (100, 100)
    img, _ = load_image(p, max_pixels=None)  # no limit, even where Pillow has one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    img, _ = load_image(p, max_pixels=None)
    assert img.size == (100, 100) and Image.MAX_IMAGE_PIXELS == 100
    assert pixels_over_limit("x.jpg: corrupt or truncated image") is None


def test_file_handles_closed_on_success_and_error(tmp_path, monkeypatch):
    good = _write_rgb(tmp_path / "g.png", size=(50, 50), fmt="PNG")
    txt = tmp_path / "t.jpg"
    txt.write_text("nope" * 100)
    data = _jpeg_bytes()
    trunc = tmp_path / "tr.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    before = _open_fds()
    for _ in range(10):
        load_image(good)
        for bad in (txt, trunc):
            with pytest.raises(ImageDecodeError):
                load_image(bad)
    for _ in range(10):
        with pytest.raises(ImageDecodeError):
            load_image(good, max_pixels=100)
    assert _open_fds() == before


def test_load_bad_draft_argument(tmp_path):
    p = _write_rgb(tmp_path / "a.jpg")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="draft must be a positive integer"):
            load_image(p, draft=bad)


# --------------------------------------------------------------------------- #
# load_image: modes
# --------------------------------------------------------------------------- #


def _channels_equal(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[2] == 3
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    return a[..., 0]


def test_load_16bit_grey_png_gradient(tmp_path):
    grad = np.linspace(0, 65535, 256 * 4).round().astype(np.uint16).reshape(4, 256)
    p = tmp_path / "g16.png"
    Image.fromarray(grad).save(p)
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    img, note = load_image(p)
    assert img.mode == "RGB" and img.size == (256, 4)
    assert note == "16-bit grey scaled to 8-bit"
    g = _channels_equal(img).ravel()  # row-major: same order as grad
    assert np.all(np.diff(g.astype(int)) >= 0)
    assert g.min() <= 5 and g.max() >= 250
    assert abs(int(np.median(g)) - 128) <= 3
    assert np.mean(g == 255) < 0.01  # no saturation to white
    np.testing.assert_allclose(g, grad.ravel() / 257.0, atol=1.0)


def test_load_16bit_big_endian_png(tmp_path):
    p = tmp_path / "be.png"
    im = Image.frombytes("I;16B", (3, 1), np.array([0, 32896, 65535], dtype=">u2").tobytes())
    im.save(p)
    img, note = load_image(p)
    assert "16-bit" in note or "32-bit" in note
    assert _channels_equal(img).ravel().tolist() == [0, 128, 255]


def test_load_int32_mode_clipped(tmp_path):
    p = tmp_path / "i.tif"
    Image.fromarray(np.array([[-5, 0, 257 * 100, 70000]], dtype=np.int32)).save(p)
    img, note = load_image(p)
    assert "clipped" in note and "8-bit" in note
    assert _channels_equal(img).ravel().tolist() == [0, 0, 100, 255]


def test_load_float_mode_clipped(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.array([[-3.5, 0.0, 100.4, 254.6, 300.0]], dtype=np.float32)).save(p)
    img, note = load_image(p)
    assert note == "float grey clipped to 0..255"
    assert _channels_equal(img).ravel().tolist() == [0, 0, 100, 255, 255]


def test_load_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    img, note = load_image(p)
    assert note == "CMYK converted to RGB"
    r, g, b = img.getpixel((8, 8))
    assert r >= 245 and g <= 10 and b <= 10
    # and a CMYK JPEG is never drafted
    big = tmp_path / "cmyk_big.jpg"
    Image.new("CMYK", (600, 600), (255, 0, 0, 0)).save(big)  # cyan
    img2, _ = load_image(big, draft=100)
    assert img2.size == (600, 600)
    r, g, b = img2.getpixel((300, 300))
    assert r <= 10 and g >= 245 and b >= 245


def test_load_palette_with_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 red, 1 blue
    pal.putdata([0, 0, 1, 1, 0, 1, 0, 1])
    pal.info["transparency"] = 1  # blue is transparent
    p = tmp_path / "pt.png"
    pal.save(p, transparency=1)
    img, note = load_image(p)
    assert note == "alpha composited on white"
    a = np.asarray(img)
    assert a[0, 0].tolist() == [255, 0, 0]
    assert a[0, 2].tolist() == [255, 255, 255]
    assert a[1, 3].tolist() == [255, 255, 255]
    # the same with a GIF
    g = tmp_path / "pt.gif"
    pal.save(g, transparency=1)
    img_g, note_g = load_image(g)
    assert np.array_equal(np.asarray(img_g), a)
    assert note_g == "alpha composited on white"


def test_load_rgba_and_la(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (20, 120, 220)
    rgba[0, :, 3] = 255  # opaque row
    rgba[1, 0, 3] = 0  # transparent
    rgba[1, 1, 3] = 128  # half
    rgba[1, 2, 3] = 0
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p)
    img, note = load_image(p)
    a = np.asarray(img).astype(int)
    assert note == "alpha composited on white"
    assert a[0, 0].tolist() == [20, 120, 220]
    assert a[1, 0].tolist() == [255, 255, 255]
    assert a[1, 2].tolist() == [255, 255, 255]
    assert np.allclose(a[1, 1], [(20 + 255) / 2, (120 + 255) / 2, (220 + 255) / 2], atol=2)

    la = Image.fromarray(np.array([[[40, 255], [40, 0]]], dtype=np.uint8), "LA")
    q = tmp_path / "la.png"
    la.save(q)
    img2, note2 = load_image(q)
    assert note2 == "alpha composited on white"
    assert np.asarray(img2).tolist() == [[[40, 40, 40], [255, 255, 255]]]

    opaque = tmp_path / "opaque.png"
    Image.new("RGBA", (3, 3), (1, 2, 3, 255)).save(opaque)
    img3, note3 = load_image(opaque)
    assert note3 == "" and img3.getpixel((1, 1)) == (1, 2, 3)


def test_load_grey_and_bilevel(tmp_path):
    p = tmp_path / "l.png"
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L").save(p)
    img, note = load_image(p)
    assert (img.mode, note) == ("RGB", "")
    assert _channels_equal(img).ravel().tolist() == [0, 77, 255]
    b = Image.new("1", (4, 1))
    b.putdata([0, 1, 1, 0])
    q = tmp_path / "b.pbm"
    b.save(q)
    img2, note2 = load_image(q)
    assert note2 == ""
    assert _channels_equal(img2).ravel().tolist() == [0, 255, 255, 0]


def test_load_exif_orientation_6(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr, "RGB").save(p, exif=exif.tobytes(), quality=95)
    img, note = load_image(p)
    assert note == "EXIF orientation 6 applied"
    assert img.size == (20, 40)
    with Image.open(p) as raw:
        assert raw.size == (40, 20)
        by_hand = ImageOps.exif_transpose(raw).convert("RGB")
    assert by_hand.size == (20, 40)
    assert np.abs(np.asarray(img).astype(int) - np.asarray(by_hand).astype(int)).max() == 0
    # orientation 6 = rotate 90 degrees clockwise to display: left half on top
    top = img.getpixel((10, 5))
    bottom = img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@needs_hymenoptera
def test_load_real_gif_and_gif_named_jpg(tmp_path):
    gif = _find_real_gif()
    with Image.open(gif) as raw:
        expected = raw.convert("RGBA") if "transparency" in raw.info else raw.convert("RGB")
        size = raw.size
    img, note = load_image(gif)
    assert img.mode == "RGB" and img.size == size
    if expected.mode == "RGB":
        assert np.array_equal(np.asarray(img), np.asarray(expected))
    if gif.suffix.lower() == ".gif":
        assert "content in a" not in note
    disguised = tmp_path / "photo.jpg"
    shutil.copyfile(gif, disguised)
    img2, note2 = load_image(disguised)
    assert note2.startswith("GIF content in a .jpg file (first frame used)")
    assert np.array_equal(np.asarray(img2), np.asarray(img))


def test_load_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img, note = load_image(p)
    assert note == "first of 3 frames used"
    assert img.getpixel((5, 5)) == (255, 0, 0)
    q = tmp_path / "anim.jpg"
    shutil.copyfile(p, q)
    img2, note2 = load_image(q)
    assert note2 == "GIF content in a .jpg file (first frame used)"
    assert img2.getpixel((5, 5)) == (255, 0, 0)


def test_load_png_named_jpg_note(tmp_path):
    p = tmp_path / "x.jpg"
    Image.new("RGB", (5, 5), (9, 8, 7)).save(p, format="PNG")
    img, note = load_image(p)
    assert note == "PNG content in a .jpg file"
    assert img.getpixel((0, 0)) == (9, 8, 7)


def test_result_is_detached_rgb(tmp_path):
    p = _write_rgb(tmp_path / "d.png", size=(7, 5), color=(1, 2, 3), fmt="PNG")
    img, note = load_image(p)
    os.remove(p)
    assert (img.mode, img.size, note) == ("RGB", (7, 5), "")
    assert img.getpixel((6, 4)) == (1, 2, 3)
    assert np.asarray(img).shape == (5, 7, 3)


# --------------------------------------------------------------------------- #
# load_image: draft
# --------------------------------------------------------------------------- #


@needs_signs
def test_draft_on_huge_jpeg_is_smaller_and_faster():
    big = None
    for name in sorted(os.listdir(SIGNS7)):
        with Image.open(SIGNS7 / name) as im:
            if min(im.size) >= 3000:
                big = SIGNS7 / name
                break
    assert big is not None, "expected 3024x3024 images in sign_language_digits/7"

    def best(draft):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            img, _ = load_image(big, draft=draft)
            times.append(time.perf_counter() - t0)
        return min(times), img

    t_full, full = best(None)
    t_draft, small = best(256)
    print(f"full {full.size} {t_full * 1000:.0f} ms, draft {small.size} {t_draft * 1000:.0f} ms")
    assert full.size == (3024, 3024)
    assert 256 <= min(small.size) < 3024
    assert max(small.size) < 3024
    assert small.mode == "RGB"
    assert t_full / t_draft >= 3.0
    # downscaled content still resembles the full picture
    ref = np.asarray(full.resize(small.size, Image.BILINEAR)).astype(float)
    assert np.abs(ref - np.asarray(small).astype(float)).mean() < 20


def test_draft_skipped_for_small_and_grey_and_non_jpeg(tmp_path):
    jpg = tmp_path / "mid.jpg"
    jpg.write_bytes(_jpeg_bytes((500, 300)))
    img, _ = load_image(jpg, draft=256)  # short side 300 <= 512: untouched
    assert img.size == (500, 300)
    img, _ = load_image(jpg, draft=100)  # 300 > 200: halved, both sides >= 100
    assert img.size == (250, 150)
    grey = tmp_path / "grey.jpg"
    Image.new("L", (800, 800), 90).save(grey)
    img, _ = load_image(grey, draft=64)
    assert img.size == (800, 800)
    assert _channels_equal(img)[0, 0] == 90
    png = _write_rgb(tmp_path / "big.png", size=(800, 800), fmt="PNG")
    img, _ = load_image(png, draft=64)
    assert img.size == (800, 800)


def test_is_plain_jpeg_only_where_a_plain_decoder_gives_load_images_pixels(tmp_path):
    """The fast decoder path may only take files whose load_image result has no note and no transform."""
    rgb = tmp_path / "rgb.jpg"
    rgb.write_bytes(_jpeg_bytes((500, 300)))
    grey = tmp_path / "grey.jpeg"
    Image.new("L", (40, 30), 90).save(grey)
    assert is_plain_jpeg(rgb) and is_plain_jpeg(grey) and is_plain_jpeg(rgb, draft=256)
    assert not is_plain_jpeg(rgb, draft=100)  # Pillow would decode it at half size
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)
    rotated = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (16, 8)).save(rotated, exif=exif.tobytes())
    upright = tmp_path / "upright.jpg"
    exif[0x0112] = 1
    Image.new("RGB", (16, 8)).save(upright, exif=exif.tobytes())
    png = _write_rgb(tmp_path / "x.png", fmt="PNG")
    jpeg_as_png = tmp_path / "jpeg.png"
    jpeg_as_png.write_bytes(_jpeg_bytes())
    gif_as_jpg = tmp_path / "gif.jpg"
    Image.new("P", (8, 8)).save(gif_as_jpg, format="GIF")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    assert is_plain_jpeg(upright)
    for p in (cmyk, rotated, png, jpeg_as_png, gif_as_jpg, text, tmp_path / "missing.jpg"):
        assert not is_plain_jpeg(p), p.name
    # the promise: equal pixels, no note
    img, note = load_image(rgb)
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    np.testing.assert_array_equal(decode_jpeg(read_file(str(rgb)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy(),
                                  np.asarray(img))
    img, note2 = load_image(grey)
    np.testing.assert_array_equal(decode_jpeg(read_file(str(grey)), mode=ImageReadMode.RGB).permute(1, 2, 0).numpy(),
                                  np.asarray(img))
    assert note == note2 == ""


def test_images_module_does_not_import_torch():
    import subprocess

    code = (
        "import sys, cnncodes.images; "
        "print(any(m == 'torch' or m.startswith(('torch.', 'torchvision')) for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        check=True,
    )
    assert out.stdout.strip() == "False"
