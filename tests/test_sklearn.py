"""cnncodes.sklearn.CNNCodes: codes equal a normal extraction, cache hits, sklearn's checks, a search round trip."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import FLOWERS, link_subset
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.svm import LinearSVC
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnncodes import load_codes
from cnncodes.errors import DatasetError, UnknownLayerError, UsageError
from cnncodes.sklearn import CNNCodes

KW = dict(weights="none", device="cpu", workers=0, batch_size=5)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """18 real flower photos (6 each of daisy, rose, tulip), their paths and labels."""
    root = link_subset(FLOWERS, tmp_path_factory.mktemp("sk") / "flowers", 6, ["daisy", "rose", "tulip"])
    paths = sorted(root.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in paths])
    return root, [str(p) for p in paths], labels


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """Codes of the same images from a normal extraction of the folder, by absolute path."""
    from cnncodes.extraction import extract

    root = images[0]
    res = extract(root, "tiny", ["fc1", "conv2"], out=tmp_path_factory.mktemp("ref"), **KW)
    c = load_codes(res.path, ["fc1", "conv2"])
    return {str(root / p): x for p, x in zip(c.paths, c.X)}, c.records


def _ref(reference, paths, keys=("fc1", "conv2")):
    table, records = reference
    cols = {"fc1": slice(0, records["fc1"].dim), "conv2": slice(records["fc1"].dim, None)}
    return np.stack([np.concatenate([table[p][cols[k]] for k in keys]) for p in paths])


def test_transform_equals_a_normal_extraction_row_for_row(images, reference, tmp_path, monkeypatch):
    _, paths, _ = images
    est = CNNCodes("tiny", ["fc1", "conv2"], cache_dir=tmp_path, **KW)
    part = [paths[i] for i in (5, 0, 11, 3)]
    np.testing.assert_array_equal(est.transform(part), _ref(reference, part))
    # another order, a repeated path and images not seen before: still row i = path i
    mixed = paths[::-1] + [paths[2]]
    got = est.fit_transform(mixed)
    assert got.dtype == np.float32 and got.shape == (19, 32 + 16)
    np.testing.assert_array_equal(got, _ref(reference, mixed))
    assert list(est.get_feature_names_out()[[0, 31, 32, 47]]) == ["fc1_0", "fc1_31", "conv2_0", "conv2_15"]
    # every image is cached now: another subset is a cache hit, the model is never built
    import cnncodes.extraction._api as ex

    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran on a cache hit")

    monkeypatch.setattr(ex, "_Runner", no_forward)
    np.testing.assert_array_equal(est.transform(paths[6:9]), _ref(reference, paths[6:9]))
    # one layer of the same spec: the same file, column for column
    one = CNNCodes("tiny", "conv2", cache_dir=tmp_path, **KW)
    np.testing.assert_array_equal(one.transform(paths[:4]), _ref(reference, paths[:4], ["conv2"]))
    assert one.cache_path_ == est.cache_path_


def test_undecodable_images_raise_or_give_nan_rows(images, reference, tmp_path):
    _, paths, _ = images
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    est = CNNCodes("tiny", "fc1", cache_dir=tmp_path / "c", **KW)
    with pytest.raises(DatasetError, match=r"1 of 3 images could not be decoded.*broken.jpg.*errors='nan'"):
        est.transform([paths[0], str(bad), paths[1]])
    got = est.set_params(errors="nan").transform([paths[0], str(bad), paths[1]])
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], _ref(reference, [paths[0], paths[1]], ["fc1"]))


@pytest.mark.parametrize("X, match", [
    (np.zeros((3, 4)), "list of image paths.*ndarray of shape \\(3, 4\\)"),
    ("one.jpg", "single path"),
    ([], "no image path"),
    (["/no/such/image.jpg"], "not files"),
])
def test_bad_input_is_explained(X, match, tmp_path):
    with pytest.raises((UsageError, DatasetError), match=match):
        CNNCodes("tiny", "fc1", cache_dir=tmp_path, **KW).transform(X)


def test_bad_parameters_are_refused_at_fit():
    with pytest.raises(UnknownLayerError, match="fc77"):
        CNNCodes("tiny", "fc77").fit()
    with pytest.raises(UsageError, match="'errors' parameter of CNNCodes"):
        CNNCodes("tiny", "fc1", errors="skip").fit()
    with pytest.raises(UsageError, match="'batch_size' parameter"):
        CNNCodes("tiny", "fc1", batch_size=0).fit()


# ----------------------------------------------------------------- scikit-learn's estimator checks


@parametrize_with_checks([CNNCodes("tiny", "fc1", weights="none")])
def test_sklearn_estimator_checks(estimator, check):
    # with string input (two_d_array=False, as HashingVectorizer), sklearn runs its generic checks only
    check(estimator)


API_CHECKS = [
    "check_estimator_tags_renamed", "check_valid_tag_types", "check_estimator_repr", "check_no_attributes_set_in_init",
    "check_estimators_overwrite_params", "check_dont_overwrite_parameters", "check_estimators_fit_returns_self",
    "check_readonly_memmap_input", "check_do_not_raise_errors_in_init_or_set_params",
    "check_n_features_in_after_fitting", "check_mixin_order", "check_positive_only_tag_during_fit",
    "check_parameters_default_constructible", "check_get_params_invariance", "check_set_params",
    "check_fit_check_is_fitted", "check_requires_y_none",
]
# checks that transform a numeric matrix: they cannot apply to a transformer over image paths
NUMERIC_INPUT = {
    "check_fit_score_takes_y": "calls fit_transform on a random numeric matrix",
    "check_estimators_pickle": "compares transform outputs on a random numeric matrix before/after pickling",
}


@pytest.mark.parametrize("name", API_CHECKS)
def test_sklearn_api_checks_that_apply(name):
    """The API checks of sklearn's battery (skipped by parametrize_with_checks for string input), run one by one."""
    getattr(estimator_checks, name)("CNNCodes", CNNCodes("tiny", "fc1", weights="none"))


@pytest.mark.parametrize("name", sorted(NUMERIC_INPUT))
def test_sklearn_checks_on_numeric_input_fail_with_a_clear_error(name):
    with pytest.raises(UsageError, match="list of image paths"):
        getattr(estimator_checks, name)("CNNCodes", CNNCodes("tiny", "fc1", weights="none"))


def test_pickle_and_clone_round_trip(images, reference, tmp_path):
    import pickle

    _, paths, _ = images
    est = CNNCodes("tiny", ["fc1", "conv2"], cache_dir=tmp_path, **KW)
    a = est.transform(paths[:3])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(est)).transform(paths[:3]), a)
    np.testing.assert_array_equal(clone(est).transform(paths[:3]), a)


# ----------------------------------------------------------------- Pipeline + GridSearchCV


@pytest.mark.slow
def test_grid_search_over_layers_and_C_equals_a_search_on_cached_codes(images, reference, tmp_path):
    _, paths, labels = images
    pipe = make_pipeline(CNNCodes("tiny", "fc1", cache_dir=tmp_path, **KW), Normalizer(),
                         LinearSVC(dual=True, random_state=0))
    grid = {"cnncodes__layers": ["fc1", "conv2"], "linearsvc__C": [0.1, 10.0]}
    cv = StratifiedKFold(3, shuffle=True, random_state=1)
    search = GridSearchCV(pipe, grid, cv=cv).fit(paths, labels)
    # the same search by hand on the codes of a normal extraction
    folds = list(cv.split(paths, labels))
    for i, params in enumerate(search.cv_results_["params"]):
        X = _ref(reference, paths, [params["cnncodes__layers"]])
        scores = []
        for tr, te in folds:
            m = make_pipeline(Normalizer(), LinearSVC(C=params["linearsvc__C"], dual=True, random_state=0))
            scores.append(m.fit(X[tr], labels[tr]).score(X[te], labels[te]))
        assert search.cv_results_["mean_test_score"][i] == pytest.approx(np.mean(scores), abs=1e-12), params
    best = search.best_estimator_
    assert best.predict(paths[:5]).tolist() == search.predict(paths[:5]).tolist()
    names = best[:-1].get_feature_names_out()
    assert names[0] == f"{search.best_params_['cnncodes__layers']}_0"
