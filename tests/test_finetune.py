"""Fine-tuning (issue 11): stage chains, frozen prefix, parameter groups, cached prefix, head init,
kill + resume, prediction and usage errors. The ``tiny`` backbone (with a local random weights file
standing for pretrained weights) keeps them fast; real flower photos are the data."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cnncodes.backbones import (
    backbone_chain,
    build_model,
    get_backbone,
    resolve_weights,
    run_stages,
    split_index,
)
from cnncodes.cli_finetune import main as finetune_main
from cnncodes.finetune.orchestrate import FinetuneConfig, _Job, finetune
from cnncodes.finetune.surgery import param_groups, set_modes

from conftest import FLOWERS, link_subset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 real flower photos: 8 each of daisy, rose, tulip."""
    return link_subset(FLOWERS, tmp_path_factory.mktemp("ft") / "flowers", 8, ["daisy", "rose", "tulip"])


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A fixed random state dict of the tiny network, standing for pretrained weights."""
    spec = get_backbone("tiny")
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(spec.build().state_dict(), path)
    return path


def _run(data, out, weights, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 4)
    return finetune(data, "tiny", weights=str(weights), out=out, device="cpu", workers=0,
                    cache_dir=out.parent / "codes", plots=False, **kw)


# --------------------------------------------------------------------------- chains


@pytest.mark.parametrize("name", ["tiny", "efficientnet_lite0", "mobilenet_v2", "resnet50", "alexnet",
                                  pytest.param("vgg16", marks=pytest.mark.slow)])
def test_chain_reproduces_the_forward_pass(name):
    spec = get_backbone(name)
    model = build_model(spec, resolve_weights(spec, "none"))
    stages = backbone_chain(name, model)
    x = torch.randn(2, 3, 64, 64) if name != "tiny" else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run_stages(model, stages, x), model(x))
    owned = {f"{s.node}.{n}" for s in stages for n, _ in model.get_submodule(s.node).named_parameters()}
    assert owned == {n for n, _ in model.named_parameters()}  # every parameter in exactly one stage
    assert len(owned) == sum(1 for _ in model.parameters())


def test_chain_of_the_tf_padded_lite0_splits_at_block4():
    """tf_efficientnet_lite0 (TF "same" padding) has the same stages; the split at block4 holds."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    spec = get_backbone("efficientnet_lite0")
    stages = backbone_chain("efficientnet_lite0", model)
    k = split_index(spec, stages, "block4")
    assert stages[k].node == "blocks.4"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        mid = run_stages(model, stages[: k + 1], x)
        assert torch.equal(run_stages(model, stages[k + 1:], mid), model(x))


def test_split_refuses_layers_inside_a_stage():
    from cnncodes.errors import UsageError

    spec = get_backbone("mobilenet_v2")
    model = spec.build()
    with pytest.raises(UsageError, match="not the output of a whole stage"):
        split_index(spec, backbone_chain("mobilenet_v2", model), "pool")


# --------------------------------------------------------------------------- groups, freezing, BN


def test_frozen_prefix_is_bitwise_unchanged_and_groups_are_as_configured(data, tiny_weights, tmp_path):
    cfg = FinetuneConfig("tiny", weights=str(tiny_weights), freeze_to="conv1", epochs=3, lr=0.01,
                         backbone_lr_mult=0.1, batch_size=4, augment="default")
    job = _Job(cfg, data, tmp_path / "codes", 0)
    job.prepare_model()
    job.prepare_data()
    before = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    res = job.run(tmp_path / "run", tmp_path / "run.partial", "d", None, False, False)
    after = dict(job.model.named_parameters())
    for n in ("features.0.weight", "features.0.bias"):  # conv1: the frozen prefix
        assert torch.equal(after[n], before[n]) and not after[n].requires_grad
    moved = {n: float((after[n].detach() - before[n]).norm() / before[n].norm()) for n in before}
    head = [moved[n] for n in moved if n.startswith("classifier.3.")]
    body = [moved[n] for n in moved if n.startswith(("features.3", "classifier.1"))]
    assert min(head) > 0 and max(body) < min(head)
    lrs = {g["name"]: g["initial_lr"] for g in job.optimizer.param_groups}
    assert lrs == {"head": 0.01, "head.no_decay": 0.01, "backbone": pytest.approx(0.001),
                   "backbone.no_decay": pytest.approx(0.001)}
    wd = {g["name"]: g["weight_decay"] for g in job.optimizer.param_groups}
    assert wd["head.no_decay"] == wd["backbone.no_decay"] == 0.0 and wd["head"] > 0
    # the scheduler keeps the ratio at every step: the groups' current lrs are still 10:1
    cur = {g["name"]: g["lr"] for g in job.optimizer.param_groups}
    assert cur["backbone"] == pytest.approx(0.1 * cur["head"])
    assert 0 <= res.metrics["results"]["finetune"]["softmax"]["test"]["accuracy"] <= 1


def test_layer_decay_gives_geometric_lrs_per_stage(tiny_weights):
    spec = get_backbone("tiny")
    from cnncodes.finetune.surgery import build_finetune_model

    model = build_finetune_model(spec, resolve_weights(spec, str(tiny_weights)), 3)
    groups = param_groups(model, spec, backbone_chain("tiny", model), lr=1.0, backbone_lr_mult=None,
                          layer_decay=0.5, weight_decay=0.1)
    lr = {g["name"]: g["lr"] for g in groups}
    # stages with parameters below the head: classifier.1 (k=1), features.3 (k=2), features.0 (k=3)
    assert lr == {"head": 1.0, "head.no_decay": 1.0, "classifier.1": 0.5, "classifier.1.no_decay": 0.5,
                  "features.3": 0.25, "features.3.no_decay": 0.25, "features.0": 0.125, "features.0.no_decay": 0.125}


def test_frozen_batchnorm_statistics_do_not_move():
    """Lite0: with a frozen prefix its BatchNorms stay in eval mode; bn="frozen" keeps every running stat."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from cnncodes.finetune.surgery import build_finetune_model, freeze_prefix

    spec = get_backbone("efficientnet_lite0")
    for bn, moves_after_prefix in (("frozen", False), ("train", True)):
        model = build_finetune_model(spec, resolve_weights(spec, "none"), 3)
        stages = backbone_chain(spec.name, model)
        frozen = freeze_prefix(model, stages, split_index(spec, stages, "block4"))
        stats = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
        set_modes(model, frozen, bn, True)
        model(torch.randn(4, 3, 64, 64)).sum().backward()
        for n, b in model.named_buffers():
            if "running_mean" not in n:
                continue
            in_prefix = n.startswith(("conv_stem", "bn1")) or any(n.startswith(f"blocks.{i}.") for i in range(5))
            assert torch.equal(b, stats[n]) == (in_prefix or not moves_after_prefix), (bn, n)
        assert all(not m.training for n, m in model.named_modules() if isinstance(m, _BatchNorm)
                   and (bn == "frozen" or n.startswith("blocks.0")))


# --------------------------------------------------------------------------- cached prefix


def test_cached_prefix_gives_the_logits_of_the_full_network(data, tiny_weights, tmp_path):
    """First step: logits from float32-cached conv2 activations equal the full network's, before and
    after one optimizer step on the same batch."""
    from cnncodes.finetune.data import eval_loader, normalise

    cfg = FinetuneConfig("tiny", weights=str(tiny_weights), freeze_to="conv2", augment="none", batch_size=6,
                         cache_dtype="float32")
    job = _Job(cfg, data, tmp_path / "codes", 0)
    job.prepare_model()
    job.prepare_data()
    assert job.cached and job.map_shape == (16, 16, 16)
    full = copy.deepcopy(job.model)
    _idx, xc, y, _ok = next(job.batches(job.rows.split.train, 0))
    idx = list(_idx)
    xf = next(iter(eval_loader(job.rows.paths, job.spec.preprocessing, True, "torchvision", [idx], 0, "cpu")))[1]
    models = {"cached": (job.model, lambda: job.forward(xc)), "full": (full, lambda: full(normalise(xf, job.spec.preprocessing, "cpu")))}
    logits = {}
    for name, (m, fwd) in models.items():
        m.train()
        opt = torch.optim.AdamW(param_groups(m, job.spec, backbone_chain("tiny", m), lr=0.01, backbone_lr_mult=0.1,
                                             layer_decay=None, weight_decay=0.01))
        first = fwd()
        torch.nn.functional.cross_entropy(first, y).backward()
        opt.step()
        logits[name] = (first.detach(), fwd().detach())
    for a, b in zip(logits["cached"], logits["full"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(logits["full"][0], logits["full"][1])  # the step changed something


def test_cache_is_reused_by_a_second_run(data, tiny_weights, tmp_path):
    a = _run(data, tmp_path / "a", tiny_weights, freeze_to="conv2", augment="none")
    b = _run(data, tmp_path / "b", tiny_weights, freeze_to="conv2", augment="none", lr=3e-3)
    assert a.metrics["cache"]["path"] == b.metrics["cache"]["path"]
    assert not a.metrics["cache"]["hit"] and b.metrics["cache"]["hit"]
    from cnncodes.store import read_info

    info = read_info(a.metrics["cache"]["path"])
    assert "conv2@none" in info.layers and info.layers["conv2@none"].map_shape == (16, 16, 16)


# --------------------------------------------------------------------------- head from a linear probe


@pytest.mark.parametrize("norm", ["l2", "standard", "sqrt"])
def test_head_from_train_svm_softmax_reproduces_its_probabilities(data, tiny_weights, tmp_path, norm):
    from cnncodes.classify import find_model, load_model, train_run
    from cnncodes.extraction import extract
    from cnncodes.store import load_codes

    res = extract(data, "tiny", ["fc1"], weights=str(tiny_weights), out=tmp_path / "codes", device="cpu", workers=0)
    run = train_run(res.path, ["fc1"], classifiers=["softmax"], norm=norm, out=tmp_path / "lp", plots=False,
                    n_jobs=1).run_dir
    cfg = FinetuneConfig("tiny", weights=str(tiny_weights), init_head_from=str(run))
    job = _Job(cfg, data, tmp_path / "codes", 0)
    job.prepare_model()
    codes = load_codes(res.path, "fc1")
    est, _ = load_model(find_model(run))
    head = job.model.get_submodule("classifier.3").eval()
    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(codes.X)), 1).numpy()
    np.testing.assert_allclose(p, est.predict_proba(codes.X), atol=2e-5)
    assert head.norm.kind == ("none" if norm == "standard" else norm)


def test_head_from_a_probe_says_which_val_and_test_images_it_was_fitted_on(data, tiny_weights, tmp_path,
                                                                            tmp_path_factory, caplog):
    """train_svm refits on train+val: a head from a probe on the same split has seen every val image (the
    best epoch would be picked on them) and no test image; a probe on other images has seen none."""
    from cnncodes.classify import train_run
    from cnncodes.extraction import extract

    other = link_subset(FLOWERS, tmp_path_factory.mktemp("other") / "flowers", 8, ["daisy", "rose", "tulip"], offset=8)
    seen = {}
    for name, folder in (("same", data), ("other", other)):
        res = extract(folder, "tiny", ["fc1"], weights=str(tiny_weights), out=tmp_path / "codes", device="cpu",
                      workers=0)
        run = train_run(res.path, ["fc1"], classifiers=["softmax"], out=tmp_path / f"lp-{name}", plots=False,
                        n_jobs=1).run_dir
        job = _Job(FinetuneConfig("tiny", weights=str(tiny_weights), init_head_from=str(run)), data,
                   tmp_path / "codes", 0)
        job.prepare_model()
        with caplog.at_level("WARNING", logger="cnncodes"):
            job.prepare_data()
        seen[name] = job.head_init["images_seen"], len(job.rows.split.val)
    (counts, n_val), (counts_other, _) = seen["same"], seen["other"]
    assert n_val > 0 and counts == {"val": n_val, "test": 0}
    assert counts_other == {"val": 0, "test": 0}
    assert "was fitted on" in caplog.text and "val images" in caplog.text


def test_head_from_an_svm_is_refused(data, tiny_weights, tmp_path):
    from cnncodes.classify import train_run
    from cnncodes.extraction import extract

    res = extract(data, "tiny", ["fc1"], weights=str(tiny_weights), out=tmp_path / "codes", device="cpu", workers=0)
    run = train_run(res.path, ["fc1"], classifiers=["svm"], out=tmp_path / "lp", plots=False, n_jobs=1).run_dir
    rc = finetune_main([str(data), "--model", "tiny", "--weights", str(tiny_weights), "--init-head-from", str(run),
                        "--out", str(tmp_path / "r"), "--device", "cpu", "--workers", "0"])
    assert rc == 2


# --------------------------------------------------------------------------- saving and predicting


@pytest.mark.parametrize("mode", [{"freeze_to": None, "augment": "default"},
                                  {"freeze_to": "conv2", "augment": "none", "cache_dtype": "float32"}])
def test_saved_run_predicts_as_the_trained_model(data, tiny_weights, tmp_path, mode):
    from cnncodes.cli_predict import main as predict_main

    res = _run(data, tmp_path / "run", tiny_weights, **mode)
    with open(res.run_dir / "predictions" / "test.csv") as f:
        before = {r["path"]: r for r in csv.DictReader(f)}
    files = [str(data / p) for p in before]
    assert predict_main([str(res.run_dir), *files, "--out", str(tmp_path / "p.csv"), "--device", "cpu"]) == 0
    with open(tmp_path / "p.csv") as f:
        after = {str(Path(r["path"]).relative_to(data)): r for r in csv.DictReader(f)}
    assert after.keys() == before.keys()
    for p, r in before.items():
        assert after[p]["label"] == r["pred"] and after[p]["status"] == "ok"
        assert float(after[p]["score"]) == pytest.approx(float(r["score"]), abs=1e-5)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    acc = m["results"]["finetune"]["softmax"]["test"]["accuracy"]
    assert acc == pytest.approx(np.mean([r["true"] == r["pred"] for r in before.values()]))


def test_tampered_weights_are_refused(data, tiny_weights, tmp_path):
    from cnncodes.cli_predict import main as predict_main

    res = _run(data, tmp_path / "run", tiny_weights, epochs=1)
    w = res.run_dir / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 1
    w.write_bytes(bytes(b))
    assert predict_main([str(res.run_dir), str(data / "rose"), "--device", "cpu"]) == 1


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("extra,needle", [
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1. Got 0 instead."),
    (["--lr", "-1"], "argument --lr: must be a number > 0"),
    (["--freeze-to", "conv9"], "Unknown layer 'conv9'"),
    (["--backbone-lr-mult", "0.1", "--layer-decay", "0.7"], "not allowed with argument"),
    (["--augment", "heavy"], "invalid choice"),
    (["--layer-decay", "1.5"], "argument --layer-decay: must be in (0, 1]"),
    (["--resume"], "--resume: there is no interrupted run to resume"),
    (["--batch-size", "0"], "argument --batch-size/-b: must be an integer >= 1"),
    (["--bn", "magic"], "invalid choice"),
    (["--model", "googlenet", "--freeze-to", "inception4a"], "fine-tune it whole (--freeze-to none)"),
    (["--init-head-from", "/nonexistent/run"], "/nonexistent/run"),
])
def test_bad_options_exit_2(data, tiny_weights, tmp_path, capsys, extra, needle):
    args = [str(data), "--model", "tiny", "--weights", str(tiny_weights), "--out", str(tmp_path / "r"),
            "--device", "cpu", "--workers", "0", "--epochs", "1", *extra]
    if "googlenet" in extra:
        args[args.index(str(tiny_weights))] = "none"
    assert finetune_main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and needle in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kw,needle", [
    ({"epochs": 0}, "The 'epochs' parameter of finetune must be an integer >= 1. Got 0 instead."),
    ({"layer_decay": 1.5}, "The 'layer_decay' parameter of finetune must be in (0, 1]"),
    ({"backbone_lr_mult": 0.1, "layer_decay": 0.7}, "The 'backbone_lr_mult' and 'layer_decay' parameters are two"),
    ({"bn": "magic"}, "The 'bn' parameter of finetune must be auto or frozen or train"),
    ({"resume": True}, "resume=True: there is no interrupted run to resume"),
    ({"model": "googlenet", "weights": "none", "freeze_to": "inception4a"}, "fine-tune it whole (freeze_to='none')"),
])
def test_the_library_names_parameters_where_the_cli_names_flags(data, tiny_weights, tmp_path, kw, needle):
    from cnncodes.errors import UsageError

    kw = dict({"model": "tiny", "weights": str(tiny_weights), "epochs": 1}, **kw)
    with pytest.raises(UsageError) as e:
        finetune(data, kw.pop("model"), out=tmp_path / "r", device="cpu", workers=0, **kw)
    assert needle in str(e.value) and "--" not in str(e.value)
    assert not (tmp_path / "r").exists()


def test_existing_run_folder_is_kept(data, tiny_weights, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    assert finetune_main([str(data), "--model", "tiny", "--weights", str(tiny_weights), "--out", str(out),
                          "--device", "cpu", "--workers", "0", "--epochs", "1"]) == 2
    assert (out / "keep.txt").read_text() == "earlier run"


# --------------------------------------------------------------------------- kill and resume


def _cli(data, out, weights, tmp_path, pause=None):
    """The finetune command; with ``pause``, run through ``tests/pausing_finetune.py`` (waits after that epoch)."""
    script = ["scripts/finetune.py"] if pause is None else ["tests/pausing_finetune.py", str(pause)]
    return [sys.executable, *script, str(data), "--model", "tiny", "--weights", str(weights),
            "--epochs", "4", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--workers", "0",
            "--cache-dir", str(tmp_path / "codes"), "--no-plots", "--patience", "0"]


def _env(tmp_path):
    return dict(os.environ, CNNCODES_CACHE_DIR=str(tmp_path / "cc"), PYTHONPATH=str(REPO))


@pytest.mark.slow
def test_sigkill_then_same_command_ends_as_an_uninterrupted_run(data, tiny_weights, tmp_path):
    from safetensors.torch import load_file

    ref = subprocess.run(_cli(data, tmp_path / "ref", tiny_weights, tmp_path), cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    p = subprocess.Popen(_cli(data, out, tiny_weights, tmp_path, pause=2), cwd=REPO, env=_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(300, p.kill)
    watchdog.start()
    try:
        line = p.stdout.readline()
        assert line.startswith("CNNCODES_PAUSED 2"), line
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        p.stdout.close()
    assert not out.exists() and (tmp_path / "run.partial" / "checkpoint.pt").is_file()
    again = subprocess.run(_cli(data, out, tiny_weights, tmp_path), cwd=REPO, env=_env(tmp_path),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Resuming an interrupted run" in again.stderr and "2 of 4 epochs done" in again.stderr
    assert not (tmp_path / "run.partial").exists()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "ref"))
    assert [h["train_loss"] for h in ma["history"]] == pytest.approx([h["train_loss"] for h in mb["history"]], abs=1e-6)
    assert ma["results"]["finetune"]["softmax"]["test"] == mb["results"]["finetune"]["softmax"]["test"]
    assert ma["resumed_from_epoch"] == 2


def test_resume_refuses_a_partial_run_of_other_settings(data, tiny_weights, tmp_path):
    out = tmp_path / "r"
    work = tmp_path / "r.partial"
    work.mkdir()
    (work / "config.json").write_text(json.dumps({"digest": "other", "config": {"epochs": 99}}))
    assert finetune_main([str(data), "--model", "tiny", "--weights", str(tiny_weights), "--out", str(out),
                          "--device", "cpu", "--workers", "0", "--epochs", "1"]) == 2
    assert (work / "config.json").is_file()  # nothing the user did not ask to delete is deleted


def test_a_failed_run_keeps_the_earlier_run_and_its_checkpoint(data, tiny_weights, tmp_path, monkeypatch):
    """--overwrite replaces a run only once the new one has succeeded; a crash keeps the work folder."""
    out = tmp_path / "run"
    first = _run(data, out, tiny_weights, epochs=1)
    weights = (first.run_dir / "model.safetensors").read_bytes()

    def crash(**kw):
        kw["ckpt"].save(kw["model"], kw["optimizer"], kw["scheduler"], kw["state"])
        raise OSError("disk full (injected)")

    monkeypatch.setattr("cnncodes.finetune.loop.train_epochs", crash)
    with pytest.raises(OSError, match="injected"):
        _run(data, out, tiny_weights, epochs=2, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "run.partial" / "checkpoint.pt").is_file()
    assert not list(tmp_path.glob(".run.*.tmp"))


def test_default_run_draws_its_curves(data, tiny_weights, tmp_path):
    # the other tests turn plots off for speed; this one is the default path a user takes
    from PIL import Image

    res = finetune(data, "tiny", weights=str(tiny_weights), out=tmp_path / "run", device="cpu", workers=0,
                   cache_dir=tmp_path / "codes", epochs=2, batch_size=4)
    with Image.open(res.run_dir / "curves.png") as im:
        assert im.format == "PNG" and im.size == (990, 396)  # 9 x 3.6 inches at 110 dpi
        px = np.asarray(im.convert("L"))
    assert px.min() < 100 < px.max()  # lines and axes drawn on the white page, not an empty figure
