"""Kept per-view codes (extract keep_views) and training on every view (train_run train_views="all")."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, link_subset, need
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline as sk_make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC

from conftest import tiny_fc1_by_hand
from cnncodes import load_codes
from cnncodes.backbones import get_backbone
from cnncodes.classify import train_run
from cnncodes.cli_extract import main as extract_main
from cnncodes.cli_train import main as train_main
from cnncodes.errors import InvalidParameterError, UsageError
from cnncodes.extraction import extract
from cnncodes.modelfile import load_model
from cnncodes.splits import make_split
from cnncodes.store import read_info
from cnncodes.views import split_views


@pytest.fixture
def tiny_weights(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "tiny.pth"
    torch.save(get_backbone("tiny").build().state_dict(), path)
    return path


@pytest.fixture
def photos(tmp_path):
    """20 full-size JPEG photos of two classes (landscape and portrait): every crop differs."""
    return link_subset(need(HYMENOPTERA) / "train", tmp_path / "hym", 10)


def _kw(tmp_path, tiny_weights, **more):
    kw = dict(weights=str(tiny_weights), out=tmp_path / "codes", device="cpu", workers=0, dtype="float32",
              draft=False, batch_size=8)
    return {**kw, **more}


# ------------------------------------------------------------------ what is stored


@pytest.mark.parametrize("views", ["10crop", "flip"])
def test_kept_views_are_each_views_code_by_hand_and_average_to_the_stored_code(photos, tmp_path, tiny_weights, views):
    import torchvision.transforms.v2 as T
    from torchvision.io import ImageReadMode, decode_image

    res = extract(photos, "tiny", ["fc1"], views=views, keep_views=True, **_kw(tmp_path, tiny_weights))
    assert res.keys == ["fc1"] and res.view_keys == ["fc1#views"]
    c, kept = load_codes(res.path, "fc1"), load_codes(res.path, "fc1#views")
    n_views = 10 if views == "10crop" else 2
    rec = read_info(res.path).layers["fc1#views"]
    assert (rec.views, rec.dim, rec.alias) == (n_views, n_views * c.X.shape[1], "fc1")
    per_image = split_views(kept.X, n_views)
    pre = get_backbone("tiny").preprocessing
    for row, rel in enumerate(c.paths):
        img = T.Resize(pre.resize, antialias=True)(decode_image(str(photos / rel), mode=ImageReadMode.RGB))
        if views == "10crop":
            crops = list(T.TenCrop(pre.crop)(img))
        else:
            centre = T.CenterCrop(pre.crop)(img)
            crops = [centre, T.RandomHorizontalFlip(p=1.0)(centre)]
        want = tiny_fc1_by_hand(tiny_weights, torch.stack(crops))
        np.testing.assert_allclose(per_image[row], want, rtol=1e-4, atol=1e-5)
    # float32 storage: the stored combined code is the mean of the stored views
    np.testing.assert_allclose(per_image.mean(axis=1), c.X, rtol=1e-6, atol=1e-7)


def test_float16_kept_views_average_to_the_stored_code_within_rounding(photos, tmp_path, tiny_weights):
    res = extract(photos, "tiny", ["fc1"], views="5crop", keep_views=True,
                  **_kw(tmp_path, tiny_weights, dtype="float16"))
    c, kept = load_codes(res.path, "fc1"), load_codes(res.path, "fc1#views")
    np.testing.assert_allclose(split_views(kept.X, 5).mean(axis=1), c.X, rtol=2e-3, atol=1e-3)


# ------------------------------------------------------------------ cache hits and misses


def test_keep_views_adds_views_to_an_old_cache_and_never_retires_it(photos, tmp_path, tiny_weights):
    kw = _kw(tmp_path, tiny_weights, views="10crop")
    plain = extract(photos, "tiny", ["fc1"], **kw)
    before = read_info(plain.path)
    codes_before = load_codes(plain.path, "fc1").X
    # a keep_views request on a cache without kept views is a miss that adds them (one pass over the images)
    added = extract(photos, "tiny", ["fc1"], keep_views=True, **kw)
    assert not added.hit and added.path == plain.path and added.n_computed == 20 and added.n_reused == 20
    after = read_info(added.path)
    assert after.fingerprint == before.fingerprint  # same spec: the cache was not retired
    assert after.layers["fc1"].fingerprint == before.layers["fc1"].fingerprint
    assert after.layers["fc1#views"].fingerprint != after.layers["fc1"].fingerprint
    np.testing.assert_array_equal(load_codes(added.path, "fc1").X, codes_before)
    # then both requests are hits
    assert extract(photos, "tiny", ["fc1"], keep_views=True, **kw).hit
    assert extract(photos, "tiny", ["fc1"], **kw).hit
    # the same as kept from the start
    fresh = extract(photos, "tiny", ["fc1"], keep_views=True, **dict(kw, out=tmp_path / "fresh"))
    np.testing.assert_array_equal(load_codes(fresh.path, "fc1#views").X, load_codes(added.path, "fc1#views").X)
    # a new image gets its views too, even from a call without keep_views: the file stays whole
    src = need(HYMENOPTERA) / "train" / "ants"
    new = sorted(f for f in os.listdir(src) if f.endswith(".jpg"))[10]
    os.symlink(src / new, photos / "ants" / new)
    grown = extract(photos, "tiny", ["fc1"], **kw)
    assert grown.n_computed == 1
    c, kept = load_codes(grown.path, "fc1"), load_codes(grown.path, "fc1#views")
    row = list(c.paths).index(f"ants/{new}")
    np.testing.assert_allclose(split_views(kept.X, 10)[row].mean(axis=0), c.X[row], rtol=1e-6, atol=1e-7)


def test_keep_views_with_one_view_is_refused(photos, tmp_path, tiny_weights, capsys):
    with pytest.raises(InvalidParameterError, match="needs several views of each image"):
        extract(photos, "tiny", ["fc1"], keep_views=True, **_kw(tmp_path, tiny_weights))
    with pytest.raises(InvalidParameterError, match="views='multiscale:40' the stored code is the only view"):
        extract(photos, "tiny", ["fc1"], keep_views=True, views="multiscale:40", **_kw(tmp_path, tiny_weights))
    args = [str(photos), "--model", "tiny", "--weights", "none", "--layers", "fc1", "--out", str(tmp_path / "c")]
    assert extract_main(args + ["--keep-views"]) == 2
    err = capsys.readouterr().err
    assert "argument --keep-views: needs several views of each image: with --views center the stored code" in err
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ training on every view


@pytest.fixture
def kept_cache(photos, tmp_path, tiny_weights):
    return extract(photos, "tiny", ["fc1"], views="10crop", keep_views=True, **_kw(tmp_path, tiny_weights)).path


def test_training_on_views_equals_fits_by_hand_on_the_repeated_rows(kept_cache, tmp_path):
    grid = [1e-2, 1e-1, 1.0, 10.0]
    res = train_run(kept_cache, ["fc1"], train_views="all", grid=grid, early_stop=0, widen=False, refine=0,
                    val_fraction=0.25, test_fraction=0.25, seed=3, n_jobs=1, out=tmp_path / "run", plots=False)
    m = res.metrics
    assert m["settings"]["train_views"] == "all"
    c, kept = load_codes(kept_cache, "fc1"), load_codes(kept_cache, "fc1#views")
    sp = make_split(c.labels, c.splits, c.status, class_names=c.class_names, paths=c.paths, messages=c.messages,
                    val_fraction=0.25, test_fraction=0.25, seed=3)
    assert m["split"]["counts"] == {"train": len(sp.train), "val": len(sp.val), "test": len(sp.test)}
    views, y = split_views(kept.X, 10), c.labels

    def rows(images):  # every view a row, with its image's label
        return views[images].reshape(-1, views.shape[2]), np.repeat(y[images], 10)

    Xtr, ytr = rows(sp.train)
    trval = np.concatenate([sp.train, sp.val])
    Xall, yall = rows(trval)
    # C chosen on val, the val images predicted on their stored (mean) code
    direct = [np.mean(sk_make_pipeline(Normalizer(), LinearSVC(C=C, dual=bool(C <= 1), random_state=3))
                      .fit(Xtr, ytr).predict(c.X[sp.val]) == y[sp.val]) for C in grid]
    svm = m["results"]["fc1"]["svm"]
    np.testing.assert_allclose([p["score"] for p in svm["c_curve"]], direct)
    assert svm["C"] == grid[int(np.argmax(direct))] and svm["n_fit_rows"] == 10 * len(trval)
    for clf, by_hand in (
        ("svm", LinearSVC(C=svm["C"], dual=bool(svm["C"] <= 1), random_state=3)),
        ("softmax", LogisticRegression(C=m["results"]["fc1"]["softmax"]["C"], tol=1e-6, max_iter=1000)),
    ):
        want = sk_make_pipeline(Normalizer(), by_hand).fit(Xall, yall)
        got, meta = load_model(tmp_path / "run" / m["results"]["fc1"][clf]["model"])
        assert meta["train_views"] == "all"
        np.testing.assert_allclose(got[-1].coef_, want[-1].coef_, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got.predict(c.X[sp.test]), want.predict(c.X[sp.test]))
        acc = np.mean(want.predict(c.X[sp.test]) == y[sp.test])
        assert m["results"]["fc1"][clf]["test"]["accuracy"] == pytest.approx(acc)


def test_combined_training_is_unchanged_on_a_cache_with_kept_views(kept_cache, tmp_path, photos, tiny_weights):
    kw = dict(grid=[1e-2, 1.0], early_stop=0, widen=False, refine=0, val_fraction=0.25, test_fraction=0.25, n_jobs=1,
              plots=False, classifiers=["svm"])
    plain = extract(photos, "tiny", ["fc1"], views="10crop", **_kw(tmp_path, tiny_weights, out=tmp_path / "plain"))
    a = train_run(kept_cache, ["fc1"], out=tmp_path / "a", **kw).metrics
    b = train_run(plain.path, ["fc1"], out=tmp_path / "b", **kw).metrics
    assert a["settings"]["train_views"] == "combined"
    assert a["results"]["fc1"]["svm"]["c_curve"] == b["results"]["fc1"]["svm"]["c_curve"]
    assert a["results"]["fc1"]["svm"]["n_fit_rows"] == a["split"]["counts"]["train"] + a["split"]["counts"]["val"]


def test_training_on_views_misuse_is_a_usage_error(kept_cache, photos, tmp_path, tiny_weights, capsys):
    plain = extract(photos, "tiny", ["fc1"], views="10crop", **_kw(tmp_path, tiny_weights, out=tmp_path / "plain"))
    maxed = extract(photos, "tiny", ["fc1"], views="flip", combine="max", keep_views=True,
                    **_kw(tmp_path, tiny_weights, out=tmp_path / "max"))
    base = ["--layers", "fc1", "--no-plots", "--runs-root", str(tmp_path / "runs")]
    cases = [
        ([str(plain.path), "--train-views", "all"], "holds no kept per-view codes of fc1"),
        ([str(maxed.path), "--train-views", "all"], "combines its views with 'max'"),
        ([str(kept_cache), "--train-views", "all", "--stream"], "--train-views all trains in memory"),
        ([str(kept_cache), "--train-views", "every"], "argument --train-views: invalid choice"),
        ([str(kept_cache), "--layers", "fc1#views"], "not a layer to train on"),
        ([str(kept_cache), "--train-views", "all", "--val-fraction", "0"], "chooses C on a val split"),
    ]
    for args, message in cases:
        code = train_main(args[:1] + base + args[1:])
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert code == 2, args
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    with pytest.raises(UsageError, match="'train_views' parameter of train_run must be one of combined, all"):
        train_run(kept_cache, ["fc1"], train_views="views", out=tmp_path / "r")
    meta = json.loads(json.dumps(read_info(kept_cache).layers["fc1#views"].to_dict()))
    assert meta["views"] == 10 and "views" not in read_info(kept_cache).layers["fc1"].to_dict()
