import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import launch_two_cpu_processes
from safetensors.torch import load_file

import finetune
from finetune.cli import main as cli_main
from finetune.config import ConfigError, load_config
from finetune.evaluation import evaluate_run
from finetune.optim import make_scheduler, schedule_factor
from finetune.runs import read_metrics
from finetune.train import main


def test_end_to_end_writes_every_output(tiny_args, tmp_path, capsys):
    final = main(load_config(tiny_args))
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "config.yaml",
                                                     "metrics.jsonl", "model.json",
                                                     "model.safetensors"]
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert len(r["batch_loss"]) == 96 // 16
        assert r["test_total"] == 53 and 0 <= r["test_correct"] <= 53
        assert r["test_acc"] == r["test_correct"] / 53
        assert r["epoch_time"] > 0 and r["train_images_per_sec"] > 0
        assert r["train_loss"] == pytest.approx(sum(r["batch_loss"]) / 6, abs=1e-4)
    assert final == records[-1]
    meta = json.loads((out / "model.json").read_text())
    assert meta["architecture"] == "resnet18" and meta["in_chans"] == 1
    assert meta["image_size"] == 16 and len(meta["class_names"]) == 10
    assert meta["recipe"] == "resnet18_scratch_fmnist" and meta["finetune_version"]
    rerun = load_config([f"recipe={out / 'config.yaml'}"])
    assert rerun.data.image_size == 16 and rerun.recipe == "resnet18_scratch_fmnist"
    # `finetune evaluate` rebuilds the model from the two files and prints the same accuracy.
    capsys.readouterr()
    assert cli_main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy {final['test_acc']:.4f} ({final['test_correct']}/53)" in printed


def test_learns_the_fake_task(tiny_args, tmp_path):
    final = main(load_config(tiny_args + ["train.epochs=4", "data.image_size=28"]))
    # Bands at ten heights are easy; chance is 10 %.
    assert final["test_acc"] >= 0.5


def test_seeded_runs_repeat_exactly(tiny_args, tmp_path):
    a = main(load_config(tiny_args + [f"output_dir={tmp_path / 'a'}"]))
    b = main(load_config(tiny_args + [f"output_dir={tmp_path / 'b'}"]))
    assert a["batch_loss"] == b["batch_loss"] and a["test_correct"] == b["test_correct"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(
        tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = main(load_config(tiny_args + [f"output_dir={tmp_path / 'c'}", "train.seed=1"]))
    assert c["batch_loss"] != a["batch_loss"]


def test_existing_run_is_not_overwritten(tiny_args, tmp_path):
    main(load_config(tiny_args + ["train.epochs=1"]))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*overwrite=true"):
        main(load_config(tiny_args))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    main(load_config(tiny_args + ["overwrite=true"]))
    assert len(read_metrics(tmp_path / "run")) == 2


def test_pretrained_from_local_file_trains(tiny_args, tmp_path):
    import torchvision

    path = tmp_path / "tv.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    args = [a for a in tiny_args if not a.startswith("recipe=")]
    main(load_config(["recipe=resnet18_fmnist", *args, "train.epochs=1",
                      f"model.weights={path}"]))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["pretrained"] == str(path.resolve())
    assert meta["mean"] == pytest.approx([0.449]) and meta["in_chans"] == 1


def test_training_from_an_export_brings_its_statistics(tiny_args, tmp_path):
    """model.weights=<an earlier run's export>: its mean/std (here the data's own) come along,
    not ImageNet's."""
    main(load_config([*tiny_args, "train.epochs=1"]))
    source = json.loads((tmp_path / "run" / "model.json").read_text())
    args = [a for a in tiny_args if not a.startswith(("recipe=", "output_dir="))]
    main(load_config(["recipe=resnet18_fmnist", *args, "train.epochs=1",
                      f"model.weights={tmp_path / 'run' / 'model.safetensors'}",
                      f"output_dir={tmp_path / 'second'}"]))
    meta = json.loads((tmp_path / "second" / "model.json").read_text())
    assert meta["mean"] == source["mean"] and meta["std"] == source["std"]
    assert meta["mean"] != pytest.approx([0.449])  # not ImageNet's


def test_cli_errors_exit_nonzero_with_message(tiny_args, capsys, monkeypatch):
    assert cli_main(["train", *tiny_args, "train.epoch=3"]) == 2
    assert "Did you mean 'train.epochs'?" in capsys.readouterr().err

    import urllib.error

    import torchvision

    def offline(self, *a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    args = [a for a in tiny_args if not a.startswith("recipe=")]
    assert cli_main(["train", "recipe=resnet18_fmnist", *args]) == 2
    err = capsys.readouterr().err
    assert "ResNet18_Weights.IMAGENET1K_V1" in err and "model.weights=PATH" in err


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules(schedule):
    cfg = load_config(["train.lr=1.0", f"train.schedule={schedule}", "train.epochs=2",
                       "train.warmup_epochs=0.5"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, schedule_factor(cfg.train, steps_per_epoch=10))
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1.0, rel=1e-6)
    if schedule == "constant":
        assert lrs[0] == pytest.approx(0.2) and lrs[4:] == [pytest.approx(1.0)] * 16
    elif schedule == "cosine":
        # 5 warmup steps, then half a cosine over the remaining 15.
        assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
        assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
        assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    else:
        assert lrs.index(max(lrs)) == 4 and lrs[0] == pytest.approx(0.04) and lrs[-1] < 1e-3


@pytest.mark.slow
def test_two_process_run_counts_every_test_image_once(tiny_args, tmp_path):
    """Train with 2 CPU processes through the real entry point, then evaluate the export with
    1 and with 2 processes: the accuracies agree and every test image counts exactly once."""
    run = tmp_path / "run"
    # 53 test images in per-process batches of 8: Accelerate pads the last batches, and
    # gather_for_metrics must drop that padding.
    launch_two_cpu_processes(str(Path(finetune.__file__).parent / "run.py"), *tiny_args,
                              "train.epochs=1")
    records = read_metrics(run)
    # Global batch 16 = 2 x 8: an epoch is still 96 // 16 steps, and the schedule took those 6
    # steps (not 12): its last learning rate is the 1-process one after 6 steps.
    assert len(records[0]["batch_loss"]) == 6 and records[0]["test_total"] == 53
    cfg = load_config(tiny_args + ["train.epochs=1"]).train
    scheduler = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr),
                               schedule_factor(cfg, steps_per_epoch=6))
    for _ in range(6):
        scheduler.optimizer.step()
        scheduler.step()
    assert records[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0], rel=1e-9)
    assert records[0]["train_acc"] * 96 == pytest.approx(round(records[0]["train_acc"] * 96))

    single = evaluate_run(run, [])
    assert single["test_total"] == 53
    assert single["test_correct"] == records[0]["test_correct"]
    out = launch_two_cpu_processes("-m", "finetune.cli", "evaluate", str(run),
                                    "train.eval_batch_size=8")
    assert f"test accuracy {single['test_acc']:.4f} ({single['test_correct']}/53)" in out


@pytest.mark.slow
def test_two_process_evaluation_counts_10000_distinct_samples(tmp_path):
    """2 CPU processes (gloo) evaluate 10,000 test images: each is counted exactly once
    (evaluate() counts every gathered index and raises otherwise), and the accuracy equals a
    1-process evaluation of the same weights."""
    from conftest import write_fake_fmnist

    data = write_fake_fmnist(tmp_path / "data", n_train=96, n_test=10_000)
    run = tmp_path / "run"
    # 512 per process and batch: 10,000 = 9 x 1,024 + 784, so the last batch is padded.
    # Launched the other way the README gives: accelerate launch --multi_gpu (no CUDA here).
    launch_two_cpu_processes("-m", "finetune.run", "recipe=resnet18_scratch_fmnist",
                             f"data.root={data}", "data.image_size=16", "train.epochs=1",
                             "train.batch_size=16", "train.eval_batch_size=512",
                             "train.lr=0.01", f"output_dir={run}", "train.checkpoint=false",
                             launcher="accelerate")
    (record,) = read_metrics(run)
    assert record["test_total"] == 10_000 and sum(map(sum, record["confusion"])) == 10_000
    single = evaluate_run(run, [])
    assert single["test_total"] == 10_000
    assert single["test_correct"] == record["test_correct"]


@pytest.mark.parametrize("recipe, model_args", [
    ("alexnet_fmnist", []),
    ("vgg11_fmnist", []),
    ("resnet18_scratch_fmnist", ["model.norm=scratch"]),
])
def test_zoo_recipes_train_and_export(recipe, model_args, fmnist_dir, tmp_path):
    """Each lecture recipe runs end to end (shrunk); its export rebuilds to the same accuracy."""
    from finetune.export import load_model

    args = [f"recipe={recipe}", f"data.root={fmnist_dir}", "data.image_size=64",
            "data.train_limit=32", "data.eval_limit=16", "train.epochs=1",
            "train.batch_size=16", f"output_dir={tmp_path / 'run'}", *model_args]
    cfg = load_config(args)
    final = main(cfg)
    assert final["test_total"] == 16
    _, meta = load_model(tmp_path / "run")
    assert meta["architecture"] == cfg.model.name and meta["norm"] == cfg.model.norm
    if recipe != "resnet18_scratch_fmnist":
        assert meta["mean"] == [0.0] and meta["std"] == [1.0]  # normalize: none
    assert evaluate_run(tmp_path / "run", [])["test_correct"] == final["test_correct"]


def test_diverging_loss_stops_with_the_step(tiny_args, tmp_path, capsys):
    code = cli_main(["train", *tiny_args, "train.lr=1e12", "train.schedule=constant",
                     "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"loss became (nan|inf) at step \d+ \(epoch 1, batch \d+\)", err), err
    assert "Lower train.lr" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_batch_larger_than_the_data_is_refused(tiny_args, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=16 exceeds the 8 training images"):
        main(load_config(tiny_args + ["data.train_limit=8", "data.allow_empty_classes=true"]))
    assert not (tmp_path / "run").exists()


def test_a_run_without_output_dir_names_the_folder_it_wrote(tiny_args, tmp_path, monkeypatch,
                                                            capsys):
    import time

    monkeypatch.chdir(tmp_path)
    args = [a for a in tiny_args if not a.startswith("output_dir=")]
    real = time.strftime
    stamps = iter(["20261130-100000", "20261130-100500"])  # the clock moves during training
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: next(stamps) if fmt ==
                        "%Y%m%d-%H%M%S" else real(fmt, *a))
    main(load_config(args + ["train.epochs=1"]))
    saved = capsys.readouterr().out.split("run saved to ")[1].strip()
    assert saved == "runs/resnet18_scratch_fmnist/20261130-100000"
    assert (tmp_path / saved / "model.safetensors").is_file()
