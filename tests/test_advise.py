"""The advisor: learning-curve points, ranking, case rules, the CLI contract (exit codes, advice.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

from cnncodes import advise as A
from cnncodes.cli_advise import main
from cnncodes.errors import UsageError
from cnncodes.stats import mcnemar
from cnncodes.store import load_codes
from cnncodes.transferability import gram_eigen, logme
from conftest import FLOWERS, digits_cache, link_subset

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def digits_h5(tmp_path_factory):
    return digits_cache(tmp_path_factory.mktemp("adv") / "digits.h5")


def test_learning_curve_points_equal_fits_by_hand(digits_h5):
    codes = load_codes(digits_h5, ["fc7"])
    X, y = codes.X, codes.labels
    rng = np.random.default_rng(11)
    rows = rng.permutation(len(y))
    pool, test = np.sort(rows[:1200]), np.sort(rows[1200:])
    sizes = [5, 20, 60]
    pts = A.learning_curve(X, y, pool, test, sizes, clf="softmax", C=3.0, seed=4, n_boot=500)
    # the documented subsets: per class (sorted), one permutation from default_rng(seed), the first k
    r = np.random.default_rng(4)
    perms = [r.permutation(pool[y[pool] == c]) for c in np.unique(y[pool])]
    for k, p in zip(sizes, pts):
        sub = np.sort(np.concatenate([q[:k] for q in perms]))  # in cache order
        assert p["n_train"] == len(sub) == 10 * k
        model = Pipeline([("n", Normalizer()), ("c", LogisticRegression(C=3.0, tol=1e-6, max_iter=1000))])
        correct = model.fit(X[sub], y[sub]).predict(X[test]) == y[test]
        assert p["accuracy"] == correct.mean()
        counts = np.random.default_rng(4).multinomial(len(test), np.full(len(test), 1 / len(test)), size=500)
        means = counts @ correct.astype(float) / len(test)
        assert (p["ci_low"], p["ci_high"]) == tuple(np.quantile(means, [0.025, 0.975]))
    assert pts[0]["accuracy"] < pts[-1]["accuracy"]
    # nested: a bigger size keeps every image of a smaller one
    subs = A.curve_subsets(y, pool, sizes, seed=4)
    assert set(subs[5]) <= set(subs[20]) <= set(subs[60])


def test_ranking_is_logme_of_l2_codes_and_ignores_row_order(digits_h5):
    codes = {k: load_codes(digits_h5, [k]).X for k in ("fc6", "fc7")}
    y = load_codes(digits_h5, ["fc6"]).labels
    rows = np.arange(0, len(y), 2)
    ranking = A.rank_layers(codes, y, rows, {"fc6": 1, "fc7": 2})
    for s in ranking:
        F = codes[s.layer][rows].astype(np.float64)
        assert s.logme == pytest.approx(logme(F / np.linalg.norm(F, axis=1, keepdims=True), y[rows]).score, rel=1e-10)
    shuffled = A.rank_layers(codes, y, np.random.default_rng(0).permutation(rows), {"fc6": 1, "fc7": 2})
    assert [s.layer for s in shuffled] == [s.layer for s in ranking]
    np.testing.assert_allclose([s.logme for s in shuffled], [s.logme for s in ranking], rtol=1e-9)


def _scores(top=0.40, earlier=0.30, logits=0.35):
    return sorted([A.LayerScore("block5.linear", 5, 192, earlier, None, 0.0),
                   A.LayerScore("pool", 8, 1280, top, None, 0.0),
                   A.LayerScore("logits", 9, 1000, logits, None, 0.0, "logits")], key=lambda s: -s.logme)


def _logits(n, confident, informative, y):
    """ImageNet-like scores: the top-1 class is the label's (informative) or random, sure or unsure."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(n, 1000))
    # an unrelated top-1 class among a few (with one class per image, H(Y|Z) would be 0: NCE's small-sample bias)
    cls = y * 7 if informative else rng.integers(0, 5, n)
    z[np.arange(n), cls] += 12.0 if confident else 2.0
    return z


def test_similarity_rules():
    y = np.repeat(np.arange(4), 50)
    sim = A.similarity(_scores(), "pool", _logits(200, True, True, y), y)
    assert sim["verdict"] == "similar" and sim["mean_top1_prob"] > A.CONFIDENT_TOP1
    assert sim["nce_normalised"] == pytest.approx(1.0) and sim["earlier_minus_top"] == pytest.approx(-0.10)
    unsure = A.similarity(_scores(), "pool", _logits(200, False, True, y), y)
    assert unsure["verdict"] == "different" and unsure["mean_top1_prob"] < A.CONFIDENT_TOP1
    unrelated = A.similarity(_scores(), "pool", _logits(200, True, False, y), y)
    assert unrelated["verdict"] == "different" and unrelated["nce_normalised"] < A.EXPLAINED_ENTROPY
    earlier_wins = A.similarity(_scores(top=0.2), "pool", _logits(200, True, True, y), y)
    assert earlier_wins["verdict"] == "different" and "block5.linear" in earlier_wins["reasons"][0]
    no_head = A.similarity([s for s in _scores() if s.kind == "code"], "pool", None, y)
    assert no_head["verdict"] == "similar" and "mean_top1_prob" not in no_head


def test_size_threshold_and_recommendations():
    names = ["a", "b", "c"]
    small = A.measure_size(np.repeat([0, 1, 2], [999, 999, 5000]), names)
    large = A.measure_size(np.repeat([0, 1, 2], [10, 1000, 1000]), names)
    assert (small["regime"], small["median_per_class"], large["regime"], large["min_per_class"]) == \
        ("small", 999, "large", 10)
    ranking = _scores(top=0.2, logits=0.1)  # block5.linear first
    kw = dict(top_key="pool", first_alias="stem", shallowest_key="block2.linear", data="D", model="m", cache="c.h5")
    rec = A.recommend(small, {"verdict": "different"}, ranking, **kw)
    assert rec["case"] == "small-different" and rec["layer"] == "block5.linear"
    assert rec["command"] == "python scripts/train_svm.py c.h5 --layers block5.linear pool --clf svm softmax"
    # the top layer picked: the best earlier layer runs beside it
    rec = A.recommend(small, {"verdict": "similar", "best_earlier_layer": "block5.linear"}, _scores(), **kw)
    assert (rec["case"], rec["layer"], rec["linear_layers"]) == ("small-similar", "pool", ["pool", "block5.linear"])
    rec = A.recommend(large, {"verdict": "similar"}, ranking, **kw)
    assert rec["case"] == "large-similar" and rec["freeze_to"] == "block2.linear"
    assert rec["command"] == ("python scripts/finetune.py D --model m --freeze-to block2.linear --lr 0.001 "
                              "--backbone-lr-mult 0.1")
    rec = A.recommend(large, {"verdict": "different"}, ranking, **kw)
    assert rec["case"] == "large-different" and rec["freeze_to"] == "stem" and rec["backbone_lr_mult"] == 0.3


@pytest.mark.slow
def test_run_trains_the_pick_and_reports_mcnemar(digits_h5, tmp_path, capsys):
    assert main([str(digits_h5), "--out", str(tmp_path / "adv"), "--run", "--bootstrap", "200", "-q"]) == 0
    a = json.loads((tmp_path / "adv" / "advice.json").read_text())
    m = json.loads((tmp_path / "adv" / "train" / "linear" / "metrics.json").read_text())
    assert set(m["results"]) == {"fc6", "fc7"} and a["run"]["linear"]["best"] == m["best"]
    assert len(m["pairwise"]) == 3 and "p vs best" in capsys.readouterr().out
    assert a["case"] in ("small-similar", "small-different")


def test_bad_input_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--model", "efficientnet_lite0", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d" / "a").mkdir(parents=True)
    assert main([str(tmp_path / "d"), "--model", "no_such_net", "--out", str(tmp_path / "o")]) == 2
    assert "no_such_net" in capsys.readouterr().err
    assert main([str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([str(tmp_path / "d"), "--model", "tiny", "--bootstrap", "5"]) == 2


@pytest.mark.slow
def test_cli_on_real_flowers_with_lite0(tmp_path, capsys):
    data = link_subset(FLOWERS, tmp_path / "flowers", 14, ["daisy", "rose", "sunflower"])
    out = tmp_path / "advice"
    rc = main([str(data), "--model", "efficientnet_lite0", "--out", str(out), "--cache-dir", str(tmp_path / "codes"),
               "--bootstrap", "200", "-q"])
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    a = json.loads((out / "advice.json").read_text())
    assert a["case"] in ("small-similar", "small-different", "large-similar", "large-different")
    assert a["case"].startswith("small")  # 14 images per class
    keys = {r["layer"] for r in a["ranking"]}
    assert keys == set(A.DEFAULT_LAYERS["efficientnet_lite0"]) and a["layer"] in keys
    # each score is LogME of that layer's L2-normalised train+val codes, recomputed here from the cache
    codes = load_codes(a["cache"], ["pool"])
    from cnncodes.classify import make_split

    sp = make_split(codes.labels, codes.splits, codes.status, val_fraction=0.15, test_fraction=0.2, seed=0)
    rows = np.sort(np.concatenate([sp.train, sp.val]))
    for r in a["ranking"]:
        F = load_codes(a["cache"], [r["layer"]]).X[rows].astype(np.float64)
        F /= np.linalg.norm(F, axis=1, keepdims=True)
        assert r["score"] == pytest.approx(logme(F, codes.labels[rows]).score, rel=1e-9)
    assert [r["score"] for r in a["ranking"]] == sorted((r["score"] for r in a["ranking"]), reverse=True)
    assert a["similarity"]["mean_top1_prob"] > 0  # the logits layer fed the ImageNet-head signals
    assert (out / "report.md").read_text().count("| ") > 10
    # the same command again: refused (advice is never overwritten silently), then allowed with --overwrite
    assert main([str(data), "--model", "efficientnet_lite0", "--out", str(out), "--cache-dir",
                 str(tmp_path / "codes"), "-q"]) == 2


# ---- the validated pick: LogME shortlists, a held-out ridge fit decides -------------------------------------

def _loo_by_sklearn(X, y, g):
    """Leave-one-out accuracy by refitting sklearn's Ridge without each row (the lam of the full rows)."""
    from sklearn.linear_model import Ridge

    F = Normalizer().transform(X.astype(np.float64))
    lam = g * np.sum(F ** 2) / F.shape[1]  # trace of the Gram matrix / D
    classes = np.unique(y)
    Y = (y[:, None] == classes[None, :]).astype(float)
    right = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        model = Ridge(alpha=lam, fit_intercept=False, solver="svd").fit(F[keep], Y[keep])
        right += classes[model.predict(F[i:i + 1]).argmax()] == y[i]
    return right / len(y)


@pytest.mark.parametrize("n", [120, 40])  # primal (n >= D = 64) and dual (n < D) paths
def test_ridge_loo_accuracy_equals_refits_without_each_row(digits_h5, n):
    from cnncodes.layer_pick import ridge_loo_accuracy

    codes = load_codes(digits_h5, ["fc7"])
    rows = np.random.default_rng(3).permutation(len(codes.labels))[:n]
    X, y = codes.X[rows], codes.labels[rows]
    grid = (1e-3, 1e-1, 1.0)
    r = ridge_loo_accuracy(X, y, grid)
    assert r["accuracies"] == pytest.approx([_loo_by_sklearn(X, y, g) for g in grid], abs=1e-12)
    assert r["accuracy"] == max(r["accuracies"]) and r["strength"] == grid[int(np.argmax(r["accuracies"]))]
    assert 0.3 < r["accuracy"] <= 1.0
    # row order does not matter; LogME's eigendecomposition gives the same
    p = np.random.default_rng(0).permutation(n)
    assert ridge_loo_accuracy(X[p], y[p], grid)["accuracies"] == pytest.approx(r["accuracies"], abs=1e-12)
    F = Normalizer().transform(X.astype(np.float64))
    reused = ridge_loo_accuracy(X, y, grid, gram_eigen(F))
    assert reused["accuracies"] == r["accuracies"] and (reused["correct"] == r["correct"]).all()


def _logme_misleads(seed=0, n=400):
    """A: one Gaussian class direction (a linear classifier: ~85 %); B: the class is the sign of a heavy-tailed
    feature (separable, but badly fitted by LogME's linear-Gaussian regression of the labels)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    A = np.c_[np.full(n, 20.0), rng.normal(size=(n, 3))]
    A[:, 1] += 2.0 * y
    B = np.c_[np.full(n, 20.0), rng.normal(size=(n, 3))]
    B[:, 1] = (2 * y - 1) * (0.3 + np.exp(2.0 * rng.normal(size=n)))
    return {"A": A, "B": B}, y


def test_pick_follows_the_held_out_fit_when_logme_misleads():
    from cnncodes.layer_pick import validated_pick

    codes, y = _logme_misleads()
    rows = np.arange(len(y))
    ranking = A.rank_layers(codes, y, rows, {"A": 1, "B": 2})
    assert [s.layer for s in ranking] == ["A", "B"]  # LogME prefers A ...
    p = validated_pick(codes, y, ranking, rows, k=2)
    acc = {c["layer"]: c["loo_accuracy"] for c in p["candidates"]}
    assert acc["B"] > acc["A"] + 0.05  # ... the held-out fits clearly prefer B
    assert p["layer"] == "B" and p["logme_layer"] == "A"
    # a shortlist of one is LogME's pick
    assert validated_pick(codes, y, ranking, rows, k=1)["layer"] == "A"


def test_pick_ties_go_to_the_better_logme_and_test_rows_are_unread():
    from cnncodes.layer_pick import validated_pick

    codes, y = _logme_misleads(seed=1)
    same = {"A": codes["A"], "A2": codes["A"].copy(), "B": codes["B"]}
    rows = np.arange(len(y))
    trval, test = rows[rows % 2 == 0], rows[rows % 2 == 1]
    scores = [A.LayerScore(k, i, 4, -0.1 * i, None, 0.0) for i, k in enumerate(["A", "A2"])]
    assert validated_pick(same, y, scores, trval)["layer"] == "A"
    assert validated_pick(same, y, scores[::-1], trval)["layer"] == "A2"
    # the test rows are never read: NaN there changes nothing
    poisoned = {k: v.copy() for k, v in same.items()}
    for v in poisoned.values():
        v[test] = np.nan
    ranked = [A.LayerScore(k, i, 4, -0.1 * i, None, 0.0) for i, k in enumerate(["A", "B"])]
    a, b = validated_pick(same, y, ranked, trval), validated_pick(poisoned, y, ranked, trval)
    assert [c["loo_accuracy"] for c in a["candidates"]] == [c["loo_accuracy"] for c in b["candidates"]]
    assert a["layer"] == b["layer"] == "B" and a["candidates"][1]["loo_accuracy"] > a["candidates"][0]["loo_accuracy"]
    with pytest.raises(UsageError):
        validated_pick(same, y, ranked, trval[y[trval] == 0])  # one class


def test_pick_keeps_logme_first_unless_the_loo_difference_is_significant():
    from cnncodes.layer_pick import ridge_loo_accuracy, validated_pick

    rng = np.random.default_rng(0)
    n = 400
    y = np.repeat([0, 1], n // 2)
    A0 = np.c_[np.full(n, 20.0), rng.normal(size=(n, 3))]
    A0[:, 1] += 2.0 * y
    A1 = A0.copy()
    A1[:, 1] += rng.normal(size=n) * 0.4  # the same signal, a little noisier: a few rows differ
    codes, rows = {"A0": A0, "A1": A1}, np.arange(n)
    acc = {k: ridge_loo_accuracy(v, y)["accuracy"] for k, v in codes.items()}
    worse, better = sorted(codes, key=lambda k: acc[k])
    assert 0 < acc[better] - acc[worse] < 0.02
    ranked = [A.LayerScore(worse, 0, 4, 0.0, None, 0.0), A.LayerScore(better, 1, 4, -0.1, None, 0.0)]
    p = validated_pick(codes, y, ranked, rows, k=2)
    assert p["candidates"][1]["p_vs_first"] > 0.05
    assert (p["layer"], p["loo_best_layer"]) == (worse, better)  # not significant: LogME's first stays
    assert validated_pick(codes, y, ranked, rows, k=2, alpha=1.0)["layer"] == better  # the plain best


def test_advice_pick_is_the_shortlist_loo_on_the_train_val_rows(digits_h5, tmp_path):
    from cnncodes.classify import make_split
    from cnncodes.layer_pick import ridge_loo_accuracy

    out = tmp_path / "adv"
    assert main([str(digits_h5), "--out", str(out), "--shortlist", "2", "--bootstrap", "100", "--no-plots",
                 "-q"]) == 0
    a = json.loads((out / "advice.json").read_text())
    pk = a["pick"]
    assert [c["layer"] for c in pk["candidates"]] == [r["layer"] for r in a["ranking"][:2]]
    c0 = load_codes(digits_h5, ["fc6"])
    sp = make_split(c0.labels, c0.splits, c0.status, val_fraction=0.15, test_fraction=0.2, seed=0)
    trval = np.sort(np.concatenate([sp.train, sp.val]))
    assert pk["rows"] == len(trval)
    right = {}
    for c in pk["candidates"]:
        want = ridge_loo_accuracy(load_codes(digits_h5, [c["layer"]]).X[trval], c0.labels[trval])
        assert (c["loo_accuracy"], c["strength"]) == (want["accuracy"], want["strength"])
        right[c["layer"]] = want["correct"]
    first, second = pk["candidates"]
    assert first["p_vs_first"] == 1.0
    assert second["p_vs_first"] == mcnemar(right[second["layer"]], right[first["layer"]]).p_value
    best = max(pk["candidates"], key=lambda c: c["loo_accuracy"])  # max keeps the first (better LogME) on ties
    assert pk["loo_best_layer"] == best["layer"]
    switch = second["loo_accuracy"] > first["loo_accuracy"] and second["p_vs_first"] < 0.05
    assert a["layer"] == pk["layer"] == (second if switch else first)["layer"] == a["recommendation"]["layer"]
    assert "Pick:" in (out / "report.md").read_text()
    assert main([str(digits_h5), "--out", str(tmp_path / "o2"), "--shortlist", "0", "-q"]) == 2
