"""finetune.method=linear|knn|lp_ft: cached features, the ridge and L-BFGS probes, kNN, LP-FT.

One source model is trained once for the module (a few CPU seconds); every run here transfers
from its export to the fake Fashion-MNIST at 16 px."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    launch_two_cpu_processes,
    refused,
    resumes_identically,
    untimed_metrics,
    write_fake_fmnist,
)
from safetensors.torch import load_file, save_file

from finetune.config import load_config
from finetune.features import read_cached
from finetune.inference import load
from finetune.probe import (
    fit_logistic,
    fit_probe,
    fit_ridge,
    fit_temperature,
    knn_log_probs,
    standardize,
)
from finetune.train import main


def _args(root, weights, out, *extra):
    return ["recipe=resnet18_pretrained_cpu_fmnist", f"data.root={root}", "data.image_size=16",
            f"model.weights={weights}", "train.batch_size=16", "train.eval_batch_size=20",
            "train.epochs=2", "train.checkpoint=false", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(data root, an exported model trained on it for one epoch)."""
    tmp = tmp_path_factory.mktemp("transfer")
    root = write_fake_fmnist(tmp / "fmnist")
    out = tmp / "source"
    main(load_config(["recipe=resnet18_scratch_fmnist", f"data.root={root}",
                      "data.image_size=16", "train.epochs=1", "train.batch_size=16",
                      "train.eval_batch_size=20", "train.checkpoint=false",
                      f"output_dir={out}"]))
    return root, out


def _cache(run):
    return {p.name.split("-")[0]: p for p in (run / "features").glob("*.safetensors")}


def test_linear_probe_exports_an_ordinary_model_and_cached_features_equal_fresh(source,
                                                                               tmp_path):
    root, weights = source
    run = tmp_path / "linear"
    record = main(load_config(_args(root, weights, run, "finetune.method=linear")))
    assert record["method"] == "linear" and record["features_reused"] is False
    assert set(_cache(run)) == {"train", "test"}
    cached = load_file(_cache(run)["test"])
    x, y = cached["x"], cached["y"]
    # The features a fresh forward pass of the exported backbone gives, image by image.
    predictor = load(run)
    from finetune.data import load_data
    from finetune.features import headless

    cfg = load_config(_args(root, weights, run))
    _, test, _ = load_data(cfg.data)
    with torch.no_grad(), headless(predictor.model) as backbone:
        fresh = backbone(predictor.transform(test.images))  # resized as training's batches
    assert torch.equal(y, test.labels)
    torch.testing.assert_close(x, fresh, rtol=1e-4, atol=1e-4)
    # The exported head is the probe: its test accuracy is the record's.
    logits = predictor.model(predictor.transform(test.images))
    assert (logits.argmax(1) == test.labels).float().mean().item() == pytest.approx(
        record["test_acc"], abs=1 / len(y))
    meta = json.loads((run / "model.json").read_text())
    assert meta["method"] == "linear" and (run / "config.json").is_file()


@pytest.fixture(scope="module")
def cached(source, tmp_path_factory):
    """A kNN run's feature cache, and a second run that read it."""
    root, weights = source
    tmp = tmp_path_factory.mktemp("cached")
    args = ["finetune.method=knn", f"finetune.cache_dir={tmp / 'cache'}"]
    first = main(load_config(_args(root, weights, tmp / "a", *args)))
    again = main(load_config(_args(root, weights, tmp / "b", *args)))
    assert first["features_reused"] is False and again["features_reused"] is True
    return tmp / "cache"


@pytest.mark.parametrize("change", [
    "weights", "data.root", "data.train_limit=60", "data.normalize=none", "data.image_size=20",
    "damaged"])
def test_each_part_of_the_key_invalidates_the_cache(source, cached, tmp_path, change, caplog):
    root, weights = source
    cache = tmp_path / "cache"
    shutil.copytree(cached, cache)
    files = set(cache.iterdir())
    extra = []
    if change == "weights":  # the same architecture, one backbone weight changed
        other = tmp_path / "other-weights"
        shutil.copytree(weights, other)
        state = load_file(other / "model.safetensors")
        state["layer4.1.conv2.weight"][0, 0, 0, 0] += 0.5
        save_file(state, other / "model.safetensors")
        extra = [f"model.weights={other}"]
    elif change == "data.root":
        extra = [f"data.root={write_fake_fmnist(tmp_path / 'other', n_train=90)}"]
    elif change == "damaged":
        path = sorted(files)[0]
        raw = bytearray(path.read_bytes())
        raw[-8:] = b"\x7f" * 8  # the last values: still a readable file, other numbers
        path.write_bytes(bytes(raw))
    else:
        extra = [change]
    caplog.clear()
    third = main(load_config(_args(root, weights, tmp_path / "c", "finetune.method=knn",
                                   f"finetune.cache_dir={cache}", *extra)))
    assert third["features_reused"] is False
    if change == "damaged":
        assert "do not match their digest" in caplog.text
        assert set(cache.iterdir()) == files  # rewritten in place
    else:
        assert len(set(cache.iterdir()) - files) >= 1


def test_streamed_images_are_cached_too(source, tmp_path):
    root, weights = source
    cache = [f"finetune.cache_dir={tmp_path / 'cache'}", "data.placement=stream",
             "finetune.method=linear", "data.workers=0"]
    first = main(load_config(_args(root, weights, tmp_path / "a", *cache)))
    again = main(load_config(_args(root, weights, tmp_path / "b", *cache)))
    assert first["features_reused"] is False and again["features_reused"] is True
    assert again["test_acc"] == first["test_acc"] and again["placement"] == "stream"


def test_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=gen)
    y = torch.arange(600) % 5
    x = centers[y] + 2.5 * torch.randn(600, 32, generator=gen)
    train, test = slice(0, 400), slice(400, 600)
    mean, std = standardize(x[train])
    z = (x - mean) / std
    wd = 1e-3
    w, b = (t[0, 0] for t in fit_logistic(z[train], y[train], 5, [wd]))
    ours = ((z[test] @ w.T + b).argmax(1) == y[test]).float().mean().item()
    sk = LogisticRegression(C=1 / (wd * 400), max_iter=5000, tol=1e-8).fit(
        z[train].numpy(), y[train].numpy())
    theirs = float((sk.predict(z[test].numpy()) == y[test].numpy()).mean())
    assert 0.5 < theirs < 0.99  # not trivially separable: the comparison means something
    assert abs(ours - theirs) <= 0.005
    np.testing.assert_allclose(F.softmax(z[test] @ w.T + b, 1).numpy(),
                               sk.predict_proba(z[test].numpy()), atol=2e-3)
    # fit_probe folds the standardization into a head on raw features
    probe = fit_probe(x[train], y[train], 5, [wd], kind="logistic")
    raw = ((x[test] @ probe.weight.T + probe.bias).argmax(1) == y[test]).float().mean().item()
    assert raw == pytest.approx(ours, abs=1e-6)


@pytest.mark.parametrize("rows", [400, 20])  # the covariance, and the Gram matrix (N < D)
def test_ridge_probe_matches_scikit_learn(rows):
    from sklearn.linear_model import Ridge

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 5
    x = torch.randn(5, 32, generator=gen)[y] + 2.5 * torch.randn(600, 32, generator=gen)
    train = slice(0, rows)
    onehot = F.one_hot(y[train], 5).double().numpy()
    decays = [1e-3, 0.1, 3.0]
    w, b = fit_ridge(x[train], y[train], 5, decays)
    for i, wd in enumerate(decays):  # (1/2n)|XW - T|^2 + wd/2 |W|^2 is Ridge(alpha=n * wd)
        sk = Ridge(alpha=rows * wd).fit(x[train].double().numpy(), onehot)
        np.testing.assert_allclose(w[0, i].numpy(), sk.coef_, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b[0, i].numpy(), sk.intercept_, rtol=1e-4, atol=1e-5)
    # one decay is a Cholesky solve: the same solution
    torch.testing.assert_close(fit_ridge(x[train], y[train], 5, [0.1])[0][0, 0], w[0, 1])
    # two subsets at once: each solved as alone
    masks = torch.zeros(2, rows, dtype=torch.bool)
    masks[0, : rows // 2], masks[1] = True, True
    w2, b2 = fit_ridge(x[train], y[train], 5, decays, masks)
    half = slice(0, rows // 2)
    torch.testing.assert_close(w2[0], fit_ridge(x[half], y[half], 5, decays)[0][0])
    torch.testing.assert_close(b2[1], b[0])


def test_ridge_probe_is_calibrated_and_folds_its_temperature():
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(1000) % 4
    x = 3 + torch.randn(4, 16, generator=gen)[y] + 2 * torch.randn(1000, 16, generator=gen)
    probe = fit_probe(x[:500], y[:500], 4, [1e-3, 1e-1], seed=0)
    assert probe.kind == "ridge" and probe.weight_decay in (1e-3, 1e-1)
    assert set(probe.scores) == {"0.001", "0.1"} and 0.5 < probe.val_acc < 1
    # The head on raw features is the temperature times the ridge head on standardized ones.
    mean, std = standardize(x[:500])
    w, b = (t[0, 0] for t in fit_ridge((x[:500] - mean) / std, y[:500], 4,
                                       [probe.weight_decay]))
    ridge = ((x[500:] - mean) / std) @ w.T + b
    torch.testing.assert_close(x[500:] @ probe.weight.T + probe.bias,
                               probe.temperature * ridge, rtol=1e-4, atol=1e-4)
    # The temperature minimises the held-out cross-entropy: its slope there is zero.
    t = fit_temperature(ridge, y[500:])
    nll = [F.cross_entropy(s * ridge, y[500:]).item() for s in (t / 1.2, t, t * 1.2)]
    assert nll[1] < nll[0] and nll[1] < nll[2] and 1 < t < 1e3
    # a perfectly classified held-out set: a finite scale (the smoothed optimum), not the bound
    t = fit_temperature(torch.eye(3), torch.arange(3))
    assert 5 < t < 20 and (t * torch.eye(3)).softmax(1).max() < 0.9999


def test_knn_equals_brute_force():
    gen = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(50, 8, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    query = torch.randn(7, 8, generator=gen)
    got = knn_log_probs(bank, labels, query, 4, k=5, temperature=0.07, chunk=3).exp()
    for i, q in enumerate(query):
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        nearest = sorted(range(50), key=lambda j: -sims[j])[:5]
        votes = [0.0] * 4
        for j in nearest:
            votes[int(labels[j])] += float(np.exp(sims[j] / 0.07))
        np.testing.assert_allclose(got[i].numpy(), np.array(votes) / sum(votes), rtol=1e-4,
                                   atol=1e-9)
    # a temperature whose exp(1 / T) overflows float32 still votes (the nearest wins)
    sharp = knn_log_probs(bank, labels, query, 4, k=5, temperature=1e-3).exp()
    assert torch.isfinite(sharp).all() and torch.allclose(sharp.sum(1), torch.ones(7))


def test_knn_run_predicts_with_its_stored_features(source, tmp_path):
    root, weights = source
    run = tmp_path / "knn"
    record = main(load_config(_args(root, weights, run, "finetune.method=knn",
                                    "finetune.knn_k=3")))
    stored = load_file(run / "knn.safetensors")
    assert len(stored["labels"]) == 96 and record["knn_k"] == 3
    predictor = load(run)
    from finetune.data import load_data

    _, test, _ = load_data(load_config(_args(root, weights, run)).data)
    log_probs = predictor.model(predictor.transform(test.images))
    hits = (log_probs.argmax(1) == test.labels).float().mean().item()
    assert hits == pytest.approx(record["test_acc"], abs=1 / len(test.labels))
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(len(test.labels)))
    # ONNX: the vote over the stored features is part of the graph
    import onnxruntime

    from finetune.export import export_onnx

    session = onnxruntime.InferenceSession(str(export_onnx(run)))
    x = predictor.transform(test.images[:8])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, log_probs[:8].detach().numpy(), atol=1e-4)


def test_lp_ft_records_both_phases_and_resumes_exactly(source, tmp_path, capsys):
    root, weights = source
    run = tmp_path / "lpft"
    args = _args(root, weights, run, "finetune.method=lp_ft", "train.checkpoint=true",
                 "train.checkpoint_every=3", "train.keep_checkpoints=10",
                 "train.mixed_precision=fp32")
    main(load_config(args))
    records = untimed_metrics(run)
    probe = json.loads((run / "probe.json").read_text())
    assert len(records) == 2 and all(r["probe_test_acc"] == probe["probe_test_acc"]
                                     for r in records)
    assert {"test_acc", "probe_weight_decay", "probe_fit_time"} <= set(records[-1])
    # Killed in the fine-tuning phase and resumed: the same weights and records.
    resumes_identically(args, run, "epoch0001-step000003")
    (run / "probe.json").unlink()  # resumed without the first phase's record: refused
    refused(capsys, ["train", *args, "resume=auto"], "no probe.json")


@pytest.mark.slow
def test_two_processes_compute_the_features_and_probe_of_one(source, tmp_path):
    root, weights = source
    one, two = tmp_path / "one", tmp_path / "two"
    args = _args(root, weights, one, "finetune.method=linear", "data.hflip=false")
    main(load_config(args))
    launch_two_cpu_processes("-m", "finetune.run", *args[:-1], f"output_dir={two}",
                             "finetune.method=linear")
    for split in ("train", "test"):
        a, b = load_file(_cache(one)[split]), load_file(_cache(two)[split])
        assert torch.equal(a["y"], b["y"])
        torch.testing.assert_close(a["x"], b["x"], rtol=1e-5, atol=1e-5)
    # The same probe: the same weight decay chosen, the same predictions; its weights agree
    # as far as features equal to float rounding allow (a small decay amplifies them).
    r1, r2 = (json.loads((r / "metrics.jsonl").read_text()) for r in (one, two))
    assert r1["probe_weight_decay"] == r2["probe_weight_decay"]
    assert r1["confusion"] == r2["confusion"]
    w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    torch.testing.assert_close(w1["fc.weight"], w2["fc.weight"], rtol=1e-2, atol=2e-3)


def test_bad_method_and_a_full_disk_are_one_line(source, tmp_path, capsys, monkeypatch):
    root, weights = source
    refused(capsys, ["train", *_args(root, weights, tmp_path / "x", "finetune.method=lnear")],
            "finetune.method", "Did you mean 'linear'?")
    import errno

    import finetune.features

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune.features, "save_file", full)
    cache = tmp_path / "cache"
    refused(capsys, ["train", *_args(root, weights, tmp_path / "y", "finetune.method=linear",
                                     f"finetune.cache_dir={cache}")], "no space left")
    assert not any(cache.rglob("*"))  # nothing half-written
    assert read_cached(cache / "absent.safetensors", {}) is None


def test_compare_runs_each_method_under_one_budget(source, tmp_path, capsys):
    from finetune.cli import main as cli

    root, weights = source
    out = tmp_path / "cmp"
    args = [a for a in _args(root, weights, out) if not a.startswith("output_dir=")]
    assert cli(["compare", *args, "finetune.method=knn,linear", "seeds=2",
                f"output_dir={out}"]) == 0
    runs = sorted(p.relative_to(out).as_posix() for p in out.glob("*/seed*"))
    assert runs == [f"resnet18_pretrained_cpu_fmnist-{m}/seed{s}"
                    for m in ("knn", "linear") for s in (0, 1)]
    report = (out / "report" / "report.md").read_text()
    assert "finetune.method=knn" in report and "finetune.method=linear" in report


def test_bad_caches_and_kNN_exports_are_one_line(source, tmp_path, capsys):
    root, weights = source
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    refused(capsys, ["train", *_args(root, weights, tmp_path / "a", "finetune.method=knn",
                                     f"finetune.cache_dir={afile}")],
            f"finetune.cache_dir={afile}", "a file is in the way of a folder on the path")
    refused(capsys, ["train", *_args(root, weights, tmp_path / "b", "finetune.method=linear",
                                     "train.ema_decay=0.9")], "train.ema_decay")
    run = tmp_path / "knn"
    main(load_config(_args(root, weights, run, "finetune.method=knn")))
    (path,) = [p for p in (run / "features").iterdir() if p.name.startswith("test-")]
    path.unlink()
    path.mkdir()  # a folder where the cached test features go
    refused(capsys, ["train", *_args(root, weights, tmp_path / "c", "finetune.method=knn",
                                     f"finetune.cache_dir={run / 'features'}")],
            str(path), "in the way")
    stored = load_file(run / "knn.safetensors")
    save_file({"features": stored["features"][:, :100].contiguous(),
               "labels": stored["labels"]}, run / "knn.safetensors")
    refused(capsys, ["evaluate", str(run)], "knn.safetensors", "the backbone's width")


@pytest.mark.parametrize("method, promise", [("linear", "features already cached"),
                                             ("full", "last complete checkpoint")])
def test_an_interrupted_run_promises_what_its_method_keeps(monkeypatch, capsys, tmp_path,
                                                           method, promise):
    import finetune.train
    from finetune.cli import main as cli_main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.train, "main", interrupted)
    code = cli_main(["train", f"finetune.method={method}", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 130 and promise in err
    assert ("checkpoint" in err) == (method == "full")


def test_the_probe_is_ridge_but_logistic_where_fine_tuning_starts_from_it():
    from finetune.methods import probe_kind

    assert probe_kind(load_config(["finetune.method=linear"])) == "ridge"
    assert probe_kind(load_config(["finetune.method=lp_ft"])) == "logistic"
    assert probe_kind(load_config(["finetune.method=lp_ft", "finetune.probe=ridge"])) == "ridge"
