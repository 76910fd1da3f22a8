"""The ecosystem: experiment trackers, the model card and `finetune push`, the metrics users
expect (top-5, balanced accuracy, macro F1, calibration, test-time augmentation), and class
imbalance (class weights, balanced sampling)."""

import glob
import json
import math

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

import finetune
from finetune.cli import main as cli_main
from finetune.config import ConfigError, load_config
from finetune.data.loader import BatchTransform, train_batches
from finetune.data.stream import balanced_weights, epoch_permutation
from finetune.inference import predict_log_probs
from finetune.metrics import calibration_counts, expected_calibration_error, per_class, summary
from finetune.runs import read_metrics
from finetune.step import class_weights
from finetune.train import main

# --- metrics ---------------------------------------------------------------------------------


def test_metrics_by_hand():
    # true 0: 3 right, 1 as 1; true 1: 2 right, 2 as 2; true 2: 1 right; class 3 never seen.
    confusion = [[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = summary(confusion, top5_hits=9, calibration=None)
    assert s["acc"] == pytest.approx(6 / 9)
    assert s["balanced_acc"] == pytest.approx((3 / 4 + 2 / 4 + 1 / 1) / 3)  # classes present
    p = [3 / 3, 2 / 3, 1 / 3]
    r = [3 / 4, 2 / 4, 1 / 1]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)  # class 3: neither true nor predicted
    assert "top5_acc" not in s  # 4 classes: top-5 is always right
    rows = per_class(confusion, ["a", "b", "c", "d"])
    assert [row["f1"] for row in rows[:3]] == pytest.approx(f1) and rows[3]["f1"] == 0
    assert summary([[1] * 6 for _ in range(6)], top5_hits=30)["top5_acc"] == pytest.approx(30 / 36)


def test_expected_calibration_error_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 7, generator=gen).softmax(1) ** 0.5
    probs = probs / probs.sum(1, keepdim=True)
    labels = torch.randint(0, 7, (500,), generator=gen)
    confidence, preds = probs.max(1)
    hit = preds == labels
    counts = calibration_counts(confidence, hit, torch.ones(500), bins=10)
    direct = 0.0
    for b in range(10):
        inside = [(c, h) for c, h in zip(confidence.tolist(), hit.tolist(), strict=True)
                  if b / 10 <= c < (b + 1) / 10 or (b == 9 and c == 1.0)]
        if inside:
            acc = sum(h for _, h in inside) / len(inside)
            conf = sum(c for c, _ in inside) / len(inside)
            direct += len(inside) / 500 * abs(acc - conf)
    assert expected_calibration_error(counts) == pytest.approx(direct, abs=1e-9)
    assert expected_calibration_error(counts) > 0.01


class _FlipInvariant(nn.Module):
    """Global average pooling, then a linear layer: mirror images give the same logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def test_tta_on_a_flip_invariant_model_equals_the_plain_result():
    torch.manual_seed(0)
    model = _FlipInvariant()
    transform = BatchTransform(8, 1, (0.5,), (0.25,))
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    views = transform.views(images)  # as evaluated, and mirrored
    torch.testing.assert_close(predict_log_probs(model, views), predict_log_probs(model, views[:1]))
    sided = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # sees left from right
    assert not torch.allclose(predict_log_probs(sided, views), predict_log_probs(sided, views[:1]))


def test_tta_views_mirror_and_shift_as_training_translates():
    transform = BatchTransform(6, 1, (0.5,), (0.5,))
    images = torch.arange(36, dtype=torch.uint8).view(1, 1, 6, 6) * 7
    plain, mirror, *shifted = transform.views(images, flip=True, shift=2)
    assert len(shifted) == 4
    torch.testing.assert_close(mirror, plain.flip(-1))
    black = (0 - 0.5) / 0.5  # zero padding before normalization, as random_crop pads
    # dy=0, dx=0 of the padded image: the image moved 2 pixels down and right
    torch.testing.assert_close(shifted[0][..., 2:, 2:], plain[..., :4, :4])
    assert (shifted[0][..., :2, :] == black).all() and (shifted[0][..., :, :2] == black).all()
    torch.testing.assert_close(shifted[3][..., :4, :4], plain[..., 2:, 2:])
    assert len(transform.views(images, flip=False, shift=0)) == 1


# --- a trained run: metrics, card, TTA -------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_fake_fmnist

    root = tmp_path_factory.mktemp("eco")
    data = write_fake_fmnist(root / "fmnist")
    out = root / "run"
    main(load_config(["recipe=resnet18_scratch_fmnist", f"data.root={data}",
                      "data.image_size=16", "train.epochs=2", "train.batch_size=16",
                      "train.lr=0.01", "train.checkpoint=false", "train.ema_decay=0.9",
                      f"output_dir={out}"]))
    return out, data


def test_epoch_metrics_are_recorded(run):
    out, _ = run
    record = read_metrics(out)[-1]
    scores = summary(record["confusion"], calibration=record["calibration"])
    assert record["test_balanced_acc"] == pytest.approx(scores["balanced_acc"])
    assert record["test_macro_f1"] == pytest.approx(scores["macro_f1"])
    assert record["test_ece"] == pytest.approx(scores["ece"])
    assert 0 <= record["test_acc"] <= record["test_top5_acc"] <= 1
    assert sum(record["calibration"][0]) == record["test_total"]
    assert "ema_test_macro_f1" in record and "ema_test_calibration" not in record


def test_evaluate_reports_every_metric_and_tta(run, capsys):
    out, _ = run
    assert cli_main(["evaluate", str(out), "--tta"]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads((out / "evaluation.json").read_text())
    record = read_metrics(out)[-1]
    for key in ("test_acc", "test_top5_acc", "test_balanced_acc", "test_macro_f1", "test_ece"):
        assert evaluation[key] == pytest.approx(record[key]), key
    assert set(evaluation["tta"]) >= {"acc", "top5_acc", "balanced_acc", "macro_f1", "ece"}
    assert "with TTA" in printed and "macro F1" in printed
    assert (out / "reliability.png").stat().st_size > 1000
    predictor = finetune.load(out)
    files = sorted(glob.glob(str(run[1] / "*.png")))
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    assert predictor.tta == (True, 0)  # the recipe trains with flips, no translation
    tta = predictor.logits(x, tta=True)
    plain, mirrored = predictor.logits(x), predictor.logits(x.flip(-1))
    expected = torch.logaddexp(plain.log_softmax(1), mirrored.log_softmax(1)) - math.log(2)
    torch.testing.assert_close(tta, expected, rtol=1e-4, atol=1e-4)
    assert not files or predictor.predict(files[:1], tta=True)


def test_model_card_is_a_valid_hub_card(run):
    out, _ = run
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert "finetune" in data.tags and data.license == "other"  # trained from scratch
    record = read_metrics(out)[-1]
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["acc"] == pytest.approx(record["test_acc"], abs=1e-6)
    assert results["macro_f1"] == pytest.approx(record["test_macro_f1"], abs=1e-6)
    # The metadata round-trips through the hub's own model-index parser.
    from huggingface_hub.repocard_data import (
        eval_results_to_model_index,
        model_index_to_eval_results,
    )

    name, parsed = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == out.name and len(parsed) == len(data.eval_results)
    assert eval_results_to_model_index(name, parsed) == data.to_dict()["model-index"]
    text = card.text
    assert "recipe=resnet18_scratch_fmnist" in text and "| T-shirt/top |" in text
    assert "timm.create_model" in text and "finetune.load" in text
    ema = ModelCard.load(out / "ema" / "README.md")
    assert {r.metric_name: r.metric_value for r in ema.data.eval_results}["acc"] == \
        pytest.approx(record["ema_test_acc"], abs=1e-6)


def test_push_stops_offline_with_the_fix(run, monkeypatch, capsys):
    out, _ = run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli_main(["push", str(out), "me/my-model"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(out.parent / "no-hf-home"))
    assert cli_main(["push", str(out), "me/my-model"]) == 2
    assert "hf auth login" in capsys.readouterr().err


# --- trackers --------------------------------------------------------------------------------


def _tracked_run(tmp_path, fmnist_dir, tracker: str) -> tuple:
    out = tmp_path / "run"
    main(load_config(["recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}",
                      "data.image_size=16", "train.epochs=2", "train.batch_size=32",
                      "train.checkpoint=false", f"train.log_with=[{tracker}]",
                      "train.project=tests", f"output_dir={out}"]))
    return out, read_metrics(out)


def _expected(records: list[dict]) -> tuple[list[float], list[float]]:
    steps = [v for r in records for v in r["batch_loss"]]
    return steps, [r["test_acc"] for r in records]


def test_tensorboard_scalars_equal_the_metrics(tmp_path, fmnist_dir):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = _tracked_run(tmp_path, fmnist_dir, "tensorboard")
    events = EventAccumulator(str(out / "trackers" / "tests"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    steps, accs = _expected(records)
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, len(steps) + 1))
    assert [e.value for e in losses] == pytest.approx(steps, rel=1e-6)
    assert [e.value for e in events.Scalars("epoch/test_acc")] == pytest.approx(accs)
    assert {"confusion_matrix", "loss"} <= set(events.Tags()["images"])


def test_wandb_offline_history_equals_the_metrics(tmp_path, fmnist_dir, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, records = _tracked_run(tmp_path, fmnist_dir, "wandb")
    [path] = glob.glob(str(out / "trackers" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item}
               for record in _wandb_records(path) if record.WhichOneof("record_type") == "history"]
    steps, accs = _expected(records)
    assert [h["train/loss"] for h in history if "train/loss" in h] == pytest.approx(steps)
    assert [h["epoch/test_acc"] for h in history if "epoch/test_acc" in h] == pytest.approx(accs)


def _wandb_records(path: str) -> list:
    """The records of an offline W&B run file: LevelDB's log format (32 KiB blocks of
    length-prefixed chunks) after a 7-byte ':W&B' header, each record a protobuf Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, partial, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        partial += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            records.append(record)
            partial = b""
        elif kind == 0:
            break
    return records


def test_mlflow_file_store_metrics_equal_the_metrics(tmp_path, fmnist_dir, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, records = _tracked_run(tmp_path, fmnist_dir, "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    [experiment] = [e for e in client.search_experiments() if e.name == "tests"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    steps, accs = _expected(records)
    losses = sorted(client.get_metric_history(mlrun.info.run_id, "train/loss"),
                    key=lambda m: m.step)
    assert [m.value for m in losses] == pytest.approx(steps)
    accuracy = client.get_metric_history(mlrun.info.run_id, "epoch/test_acc")
    assert [m.value for m in sorted(accuracy, key=lambda m: m.step)] == pytest.approx(accs)
    assert mlrun.data.params["train.epochs"] == "2"


def test_tracker_settings_are_checked_and_a_failed_start_is_one_line(tmp_path, fmnist_dir,
                                                                     monkeypatch):
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(["train.log_with=[tensorboard,tensorboard]"])
    with pytest.raises(ConfigError, match="plain name"):
        load_config(["train.project=../elsewhere"])
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    import accelerate.tracking

    def unreachable(self) -> None:  # as a tracker without its server or API key fails
        raise RuntimeError("cannot reach the tracking server")

    monkeypatch.setattr(accelerate.tracking.TensorBoardTracker, "start", unreachable)
    with pytest.raises(ConfigError, match="did not start: RuntimeError: cannot reach"):
        _tracked_run(tmp_path, fmnist_dir, "tensorboard")
    assert not (tmp_path / "run").exists()  # a new run that failed leaves nothing


def test_a_missing_tracker_names_its_extra(monkeypatch):
    import importlib.util

    from finetune.tracking import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "aim" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'finetune\[aim\]'"):
        check_trackers(load_config(["train.log_with=[aim]"]))


# --- class imbalance -------------------------------------------------------------------------


def test_balanced_class_weights_by_hand():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    w = class_weights("balanced", 4, labels)  # n / (classes present * count); class 3: none
    assert w.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0])
    assert class_weights("none", 3, labels) is None
    assert class_weights([1, 2, 3], 3, None).tolist() == [1, 2, 3]
    with pytest.raises(ConfigError, match="3 weights for 4 classes"):
        class_weights([1, 2, 3], 4, None)


def test_balanced_sampling_is_even_seeded_and_split_over_processes():
    labels = torch.tensor([0] * 950 + [1] * 50)
    weights = balanced_weights(labels, 2)
    draw = epoch_permutation(1000, seed=3, epoch=2, weights=weights)
    share = float((labels[draw] == 1).float().mean())
    assert 0.45 < share < 0.55  # 5 % of the images, half of the draws
    assert torch.equal(draw, epoch_permutation(1000, seed=3, epoch=2, weights=weights))
    assert not torch.equal(draw, epoch_permutation(1000, seed=3, epoch=3, weights=weights))
    # Two processes take disjoint halves of the same global batches.
    ranks = [list(train_batches(1000, 100, 2, 3, rank, 2, torch.device("cpu"), weights))
             for rank in (0, 1)]
    for a, b, step in zip(*ranks, range(10), strict=True):
        assert torch.equal(torch.cat([a, b]), draw[step * 100:(step + 1) * 100])


def test_epoch_repeats_draw_a_fresh_part_or_permutations_back_to_back():
    whole = epoch_permutation(100, seed=3, epoch=2)
    part = epoch_permutation(100, seed=3, epoch=2, draws=30)
    assert torch.equal(part, whole[:30]) and len(set(part.tolist())) == 30
    assert not torch.equal(part, epoch_permutation(100, seed=3, epoch=3, draws=30))
    over = epoch_permutation(100, seed=3, epoch=2, draws=250)
    assert torch.equal(over[:100], whole)  # data.epoch_repeats=1 is the plain permutation
    assert sorted(over[100:200].tolist()) == list(range(100))
    assert set(torch.bincount(over).tolist()) == {2, 3}
    weights = balanced_weights(torch.tensor([0] * 90 + [1] * 10), 2)
    assert len(epoch_permutation(100, seed=3, epoch=2, weights=weights, draws=250)) == 250
    batches = list(train_batches(100, 10, 2, 3, 0, 1, torch.device("cpu"), draws=250))
    assert len(batches) == 25 and torch.equal(torch.cat(batches), over)


@pytest.mark.parametrize("repeats,steps", [(0.5, 2), (2.0, 8)])
def test_an_epoch_of_epoch_repeats_trains_that_many_steps(tmp_path, fmnist_dir, repeats, steps):
    out = tmp_path / "run"
    main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=16",
        "train.epochs=1", "train.batch_size=16", "train.checkpoint=false",
        "data.train_limit=64", f"data.epoch_repeats={repeats}", f"output_dir={out}"]))
    assert len(read_metrics(out)[0]["batch_loss"]) == steps


def test_bad_epoch_repeats_are_one_line(tmp_path, fmnist_dir, monkeypatch):
    from finetune import assemble

    with pytest.raises(ConfigError, match="'data.epoch_repeats' must be positive"):
        load_config(["data.epoch_repeats=0"])
    with pytest.raises(ConfigError, match="at most 1000 passes"):
        load_config(["data.epoch_repeats=1e6"])
    with pytest.raises(ConfigError, match="epoch_repeats=0.5.*random access"):
        load_config(["data.epoch_repeats=0.5", "data.streaming=true", "data.source=hf"])
    with pytest.raises(ConfigError, match="draws 13 of the 64 .*fewer than train.batch_size=16"):
        main(load_config(["recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}",
                          "data.train_limit=64", "train.batch_size=16", "data.epoch_repeats=0.2",
                          f"output_dir={tmp_path / 'run'}"]))
    monkeypatch.setattr(assemble, "MAX_DRAWS", 100)
    with pytest.raises(ConfigError, match="draws 128 of the 64 .*above 100"):
        main(load_config(["recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}",
                          "data.train_limit=64", "train.batch_size=16", "data.epoch_repeats=2",
                          f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match="method=linear .*epoch_repeats means nothing"):
        load_config(["finetune.method=linear", "data.epoch_repeats=2"])


def test_weighted_and_balanced_runs_train(tmp_path, fmnist_dir):
    out = tmp_path / "run"
    result = main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=16",
        "train.epochs=1", "train.batch_size=16", "train.checkpoint=false",
        "train.class_weights=balanced", "data.sampler=balanced", "data.train_limit=60",
        f"output_dir={out}"]))
    assert 0 <= result["test_balanced_acc"] <= 1
    with pytest.raises(ConfigError, match="random access"):
        load_config(["data.sampler=balanced", "data.streaming=true", "data.source=hf"])


def test_class_weights_keep_the_loss_scale_with_soft_targets():
    from finetune.step import weighted_cross_entropy

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    w = torch.tensor([1.0, 2.0, 0.5, 4.0])
    hard = weighted_cross_entropy(logits, labels, w, 0.0)
    soft = weighted_cross_entropy(logits, torch.nn.functional.one_hot(labels, 4).float(), w, 0.0)
    torch.testing.assert_close(hard, soft)  # one-hot soft targets: the hard-target loss
    scaled = weighted_cross_entropy(logits, torch.nn.functional.one_hot(labels, 4).float(),
                                    10 * w, 0.0)
    torch.testing.assert_close(scaled, soft)  # the weights' scale does not scale the loss
    with pytest.raises(ConfigError, match="not all 0"):
        load_config(["train.class_weights=[0,0]"])


def test_card_licenses_the_hub_accepts():
    from finetune.card import _license

    assert _license(None) == {"license": "other"}
    assert _license("apache-2.0") == {"license": "apache-2.0"}
    assert _license("dinov3-license") == {"license": "other", "license_name": "dinov3-license"}


@pytest.mark.slow
def test_two_processes_report_to_the_tracker_once(tiny_args, tmp_path):
    """Under 2 processes only the main one tracks: one event file, the global numbers."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from conftest import HOOKS, launch_two_cpu_processes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    launch_two_cpu_processes(HOOKS, "train", *tiny_args, "train.epochs=1",
                             "train.log_with=[tensorboard]", "train.project=two")
    run = tmp_path / "run"
    assert len(glob.glob(str(run / "trackers" / "two" / "events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(run / "trackers" / "two"), size_guidance={"scalars": 0})
    events.Reload()
    steps, accs = _expected(read_metrics(run))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(steps, rel=1e-6)
    assert [e.value for e in events.Scalars("epoch/test_acc")] == pytest.approx(accs)
