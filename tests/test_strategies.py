"""Fine-tuning strategies: freezing and gradual unfreezing (also on 2 processes), batch-norm
modes, stage learning rates, schedules, EMA, Mixup/CutMix, early stopping, accumulation,
clipping and the learning-rate finder."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import launch_two_cpu_processes, untimed_metrics
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.config import ConfigError, FinetuneConfig, TrainConfig, load_config
from finetune.mixing import mix_batch, mix_params, soft_targets
from finetune.models import create_model, stages
from finetune.optim import make_optimizer, make_scheduler, plan_stages, schedule_factor
from finetune.runs import read_metrics
from finetune.train import main

STEM = ("conv1.", "bn1.")


def _stage_of(key: str) -> str:
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if key.startswith(name + "."):
            return name
    return "head" if key.startswith("fc.") else "stem"


@pytest.fixture
def start_weights(tmp_path):
    """A 10-class 1-channel ResNet-18 state dict (the 'pretrained' weights), as a .pth file."""
    torch.manual_seed(3)
    state = create_model("resnet18", num_classes=10, in_chans=1, image_size=16).state_dict()
    path = tmp_path / "start.pth"
    torch.save(state, path)
    return state, path


@pytest.fixture
def ft_args(tiny_args, start_weights):
    """The tiny run, starting from ``start_weights`` (same classes: the head is kept)."""
    return [a for a in tiny_args if not a.startswith("recipe=")] + [
        "recipe=resnet18_cpu_fmnist", "model.pretrained=true",
        f"model.weights={start_weights[1]}", "train.mixed_precision=fp32", "train.lr=0.05"]


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- stages and freezing ---------------------------------------------------------------------


def test_stages_cover_every_parameter_once():
    for name, expected in [
        ("resnet18", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
        ("vgg11_narrow", ["features1", "features2", "features3", "features4", "features5",
                          "classifier", "head"]),
        ("alexnet_lecture", ["features1", "features2", "features3", "classifier", "head"]),
    ]:
        model = create_model(name, num_classes=10, in_chans=1, image_size=64)
        found = stages(model)
        assert [n for n, _ in found] == expected
        params = [n for n, _ in model.named_parameters()]
        owners = [sum(n == p or n.startswith(p + ".") for _, ps in found for p in ps)
                  for n in params]
        assert owners == [1] * len(params)


def test_linear_probe_changes_only_the_head(ft_args, start_weights, tmp_path):
    main(load_config(ft_args + ["finetune.freeze=backbone", "train.epochs=1"]))
    after = load_file(tmp_path / "run" / "model.safetensors")
    before = {k: v for k, v in start_weights[0].items()}
    # Weights and batch-norm statistics of the backbone: untouched. The head: trained.
    assert _changed(before, after) == {"fc.weight", "fc.bias"}


def test_frozen_stages_and_bn_modes(ft_args, start_weights, tmp_path):
    before = start_weights[0]
    main(load_config(ft_args + ["finetune.freeze=stages:3", "train.epochs=1",
                                "finetune.bn=freeze_stats"]))
    changed = _changed(before, load_file(tmp_path / "run" / "model.safetensors"))
    assert {_stage_of(k) for k in changed} == {"layer3", "layer4", "head"}
    # freeze_stats: no running statistics moved, anywhere; scale and shift did train.
    assert not any("running_" in k or "num_batches" in k for k in changed)
    assert "layer4.0.bn1.weight" in changed
    main(load_config(ft_args + ["finetune.bn=freeze", "train.epochs=1", "overwrite=true"]))
    changed = _changed(before, load_file(tmp_path / "run" / "model.safetensors"))
    assert not any("bn" in k or "downsample.1" in k for k in changed)
    assert "layer1.0.conv1.weight" in changed


def _check_unfreezing(run: Path, before: dict) -> None:
    """freeze=backbone, unfreeze_at=[2, 3]: epoch 1 trains the head, epoch 2 adds layer4,
    epoch 3 adds layer3; nothing else ever moves."""
    ckpts = sorted((run / "checkpoints").iterdir())
    trained = [{_stage_of(k) for k in _changed(before, load_file(c / "model.safetensors"))}
               for c in ckpts]
    assert trained == [{"head"}, {"head", "layer4"}, {"head", "layer4", "layer3"}]


def test_gradual_unfreezing_thaws_one_stage_per_epoch(ft_args, start_weights, tmp_path):
    main(load_config(ft_args + ["finetune.freeze=backbone", "finetune.unfreeze_at=[2,3]",
                                "train.epochs=3", "train.checkpoint=true",
                                "train.keep_checkpoints=3"]))
    _check_unfreezing(tmp_path / "run", start_weights[0])


@pytest.mark.slow
def test_gradual_unfreezing_on_two_processes(ft_args, start_weights, tmp_path):
    launch_two_cpu_processes(str(Path(finetune.__file__).parent / "run.py"), *ft_args,
                              "finetune.freeze=backbone", "finetune.unfreeze_at=[2,3]",
                              "train.epochs=3", "train.checkpoint=true",
                              "train.keep_checkpoints=3")
    _check_unfreezing(tmp_path / "run", start_weights[0])


@pytest.mark.parametrize("settings, message", [
    (["finetune.freeze=stages:6"], "5 stages before its head"),
    (["finetune.freeze=layer3"], "valid: none, backbone, stages:N"),
    (["finetune.unfreeze_at=[2]"], "freezes 0 stages; thaw at most one per frozen stage"),
    (["finetune.freeze=stages:2", "finetune.unfreeze_at=[3,2]"], "must be increasing"),
    (["model.name=vgg11_narrow", "data.image_size=32", "finetune.freeze=stages:7"],
     "6 stages before its head"),
])
def test_freeze_settings_are_checked_up_front(settings, message, tmp_path, capsys):
    from finetune.assemble import check_model
    from finetune.cli import main as cli_main

    with pytest.raises(ConfigError, match=message):
        check_model(load_config(settings))
    # Training refuses them before it looks for data (there is none here) or weights.
    assert cli_main(["train", *settings, f"data.root={tmp_path / 'none'}",
                     f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message.split("[")[0] in err and "data.root" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["train.early_stopping=2"], "needs a validation split"),
    (["train.accumulate=3", "train.batch_size=16"], "equal slices"),
    (["train.schedule=step"], "train.step_epochs"),
    (["data.val_split=1.5"], r"'data.val_split' must be in \[0, 1\)"),
])
def test_strategy_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args)


# --- learning rates and schedules ------------------------------------------------------------


def test_head_multiplier_and_layer_decay():
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=16)
    plan = plan_stages(model, FinetuneConfig(head_lr_mult=10, layer_decay=0.5))
    optimizer = make_optimizer(model, TrainConfig(lr=0.1, weight_decay=1e-4), plan)
    make_scheduler(optimizer, schedule_factor(TrainConfig(lr=0.1), steps_per_epoch=5))
    lr = {plan.names[g["stage"]]: g["lr"] for g in optimizer.param_groups}
    assert lr == pytest.approx({"head": 1.0, "layer4": 0.05, "layer3": 0.025,
                                "layer2": 0.0125, "layer1": 0.00625, "stem": 0.003125})
    # Weight decay: conv and linear weights only.
    for g in optimizer.param_groups:
        assert (g["weight_decay"] > 0) == all(p.ndim > 1 for p in g["params"])


def _lrs(cfg: TrainConfig, steps: int, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, schedule_factor(cfg, steps_per_epoch))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_values():
    cfg = TrainConfig(lr=1.0, epochs=4, schedule="step", step_epochs=[2, 4], step_gamma=0.1)
    lrs = _lrs(cfg, 20, 5)
    # Epoch 1 (steps 0-4) at 1.0, epochs 2-3 at 0.1, epoch 4 at 0.01.
    assert lrs == pytest.approx([1.0] * 5 + [0.1] * 10 + [0.01] * 5)


@pytest.mark.parametrize("warmup", [0.0, 0.4])
def test_onecycle_matches_torch_step_for_step(warmup):
    cfg = TrainConfig(lr=0.3, epochs=3, schedule="onecycle", warmup_epochs=warmup)
    mine = _lrs(cfg, 30, 10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=30,
                                              pct_start=(warmup * 10 / 30) or 0.25,
                                              cycle_momentum=False)
    theirs = []
    for _ in range(30):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert mine == pytest.approx(theirs, rel=1e-9)


# --- EMA, mixing -----------------------------------------------------------------------------


def test_ema_is_the_hand_computed_average():
    from timm.utils import ModelEmaV3

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEmaV3(model, decay=0.9, exclude_buffers=True)  # as the trainer makes it
    w0 = model[0].weight.detach().clone()
    history = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.add_(step + 1.0)
            model[1].running_mean.fill_(step)
        history.append(model[0].weight.detach().clone())
        ema.update(model)
    expected = w0
    for w in history:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ema.module[0].weight, expected, rtol=0, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 2.0))  # buffers copied


def test_ema_run_evaluates_and_exports_the_average(ft_args, tmp_path):
    main(load_config(ft_args + ["train.ema_decay=0.5", "train.epochs=1"]))
    record = read_metrics(tmp_path / "run")[0]
    assert 0 <= record["ema_test_acc"] <= 1 and record["ema_test_total"] == 53
    ema, raw = (load_file(tmp_path / "run" / d / "model.safetensors") for d in ("ema", "."))
    assert ema.keys() == raw.keys() and not torch.equal(ema["fc.weight"], raw["fc.weight"])
    assert json.loads((tmp_path / "run" / "ema" / "model.json").read_text())["ema_decay"] == 0.5
    # `finetune evaluate RUN/ema` rebuilds the average with its run's data and precision.
    from finetune.evaluation import evaluate_run

    result = evaluate_run(tmp_path / "run" / "ema", [])
    assert result["test_correct"] == record["ema_test_correct"]


def test_mixup_mixes_images_and_labels():
    x = torch.arange(4 * 1 * 2 * 2, dtype=torch.float32).view(4, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 1])
    mixed, t = mix_batch(x, y, 3, 0.0, "mixup", 0.7, None)
    torch.testing.assert_close(mixed, 0.7 * x + 0.3 * x.flip(0))
    # Sample 0 is 0.7 of class 0 and 0.3 of sample 3's class 1.
    torch.testing.assert_close(t[0], torch.tensor([0.7, 0.3, 0.0]))
    torch.testing.assert_close(t[1], torch.tensor([0.0, 0.7, 0.3]))
    smoothed = soft_targets(torch.tensor([2]), 4, 0.2)  # as F.cross_entropy's smoothing
    torch.testing.assert_close(smoothed, torch.tensor([[0.05, 0.05, 0.85, 0.05]]))


def test_cutmix_pastes_a_box_and_weights_labels_by_area():
    kind, lam, box = mix_params(0.0, 1.0, 0.5, 16, seed=0, epoch=1, step=3)
    assert kind == "cutmix" and (kind, lam, box) == mix_params(0.0, 1.0, 0.5, 16, 0, 1, 3)
    y0, y1, x0, x1 = box
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 256)
    x = torch.randn(2, 1, 16, 16)
    mixed, t = mix_batch(x, torch.tensor([0, 1]), 2, 0.0, kind, lam, box)
    torch.testing.assert_close(mixed[0, :, y0:y1, x0:x1], x[1, :, y0:y1, x0:x1])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    torch.testing.assert_close(mixed[0, 0][outside], x[0, 0][outside])
    torch.testing.assert_close(t[0], torch.tensor([lam, 1 - lam]))
    kinds = {mix_params(1.0, 1.0, 0.5, 16, 0, 1, s)[0] for s in range(40)}
    assert kinds == {"mixup", "cutmix"}  # both on: each batch picks one


def test_mixup_run_trains(ft_args, tmp_path):
    main(load_config(ft_args + ["data.mixup=0.4", "data.cutmix=1.0", "train.epochs=1"]))
    record = read_metrics(tmp_path / "run")[0]
    assert math.isfinite(record["train_loss"]) and record["test_total"] == 53


# --- early stopping, accumulation, clipping --------------------------------------------------


def test_early_stopping_exports_the_best_epoch(ft_args, tmp_path, monkeypatch):
    import finetune.train as train

    scripted = iter([0.5, 0.8, 0.6, 0.7, 0.9])  # validation accuracy of epochs 1..5
    real = train.end_epoch

    def end_epoch(*args):
        record = real(*args)
        assert "val_acc" in record  # the validation split was evaluated
        record["val_acc"] = next(scripted)
        return record

    monkeypatch.setattr(train, "end_epoch", end_epoch)
    final = main(load_config(ft_args + ["data.val_split=0.25", "train.early_stopping=2",
                                        "train.epochs=5", "train.checkpoint=true",
                                        "train.keep_checkpoints=5"]))
    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["val_acc"] for r in records] == [0.5, 0.8, 0.6, 0.7]  # stopped after epoch 4
    # 96 images, 9 or 10 per class: a quarter of each class (2) held out, 76 left to train.
    assert records[0]["val_total"] == 20 and records[0]["test_total"] == 53
    exported = load_file(run / "model.safetensors")
    best = load_file(run / "checkpoints" / "epoch0002-step000004" / "model.safetensors")
    last = load_file(run / "checkpoints" / "epoch0004-step000004" / "model.safetensors")
    assert not _changed(best, exported) and _changed(last, exported)
    meta = json.loads((run / "model.json").read_text())
    assert meta["early_stopping"] == {"best_epoch": 2, "epochs_run": 4, "val_acc": 0.8}
    assert final["epoch"] == 2
    # A comparison reads it as finished, with the exported (best) epoch's accuracy as final.
    from finetune.runs import read_run

    assert read_run(run).final_acc == records[1]["test_acc"]


def test_accumulation_equals_one_step_on_the_whole_batch(ft_args, start_weights, tmp_path):
    # Batch norm on running statistics (freeze_stats) makes a slice's output independent of
    # the other slices, so 4 slices of 4 must give the step of one batch of 16.
    common = ft_args + ["finetune.bn=freeze_stats", "train.epochs=1"]
    main(load_config(common + [f"output_dir={tmp_path / 'one'}"]))
    main(load_config(common + ["train.accumulate=4", f"output_dir={tmp_path / 'four'}"]))
    one, four = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "four"))
    for k in one:
        torch.testing.assert_close(four[k], one[k], rtol=1e-4, atol=1e-5)
    assert "layer1.0.conv1.weight" in _changed(start_weights[0], one)  # it did train
    losses = [read_metrics(tmp_path / d)[0]["batch_loss"]
              for d in ("one", "four")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_gradient_clipping_bounds_the_step(ft_args, start_weights, tmp_path):
    # Plain SGD (no momentum) with the gradient norm clipped to 1e-6: no weight moves more
    # than lr * 1e-6 per step, over 6 steps.
    main(load_config(ft_args + ["train.clip_grad_norm=1e-6", "train.momentum=0",
                                "train.epochs=1", "train.schedule=constant",
                                "train.weight_decay=0", "finetune.bn=freeze_stats"]))
    after = load_file(tmp_path / "run" / "model.safetensors")
    moved = max(float((after[k] - v).abs().max()) for k, v in start_weights[0].items()
                if v.is_floating_point())
    assert 0 < moved <= 6 * 0.05 * 1e-6 * 1.001


# --- LR finder -------------------------------------------------------------------------------


def test_lr_find_writes_plot_and_suggestion(ft_args, tmp_path, capsys):
    from finetune.cli import main as cli_main

    out = tmp_path / "lr"
    args = [a for a in ft_args if not a.startswith("output_dir=")] + [f"output_dir={out}"]
    assert cli_main(["lr-find", *args, "start_lr=1e-5", "end_lr=1e3", "steps=40"]) == 0
    result = json.loads((out / "lr_find.json").read_text())
    lrs = result["lr"]
    assert lrs[0] == pytest.approx(1e-5) and lrs[1] / lrs[0] == pytest.approx(1e8 ** (1 / 39))
    assert lrs[0] <= result["suggested_lr"] <= result["min_loss_lr"]
    assert len(result["loss"]) == len(lrs) <= 40
    assert "suggested train.lr=" in capsys.readouterr().out
    with Image.open(out / "lr_find.png") as im:
        im.verify()
    assert not (out / "model.safetensors").exists()


def test_resume_is_exact_with_every_strategy_on(ft_args, tmp_path):
    """Stopped mid-epoch and resumed, a run with gradual unfreezing, discriminative rates,
    Mixup/CutMix, EMA, clipping, accumulation, early stopping, class weights and balanced
    sampling ends bit-identical."""
    args = ft_args + ["finetune.freeze=backbone", "finetune.unfreeze_at=[2]",
                      "finetune.head_lr_mult=5", "finetune.layer_decay=0.8", "data.mixup=0.4",
                      "data.cutmix=1.0", "train.ema_decay=0.9", "train.clip_grad_norm=2.0",
                      "train.class_weights=balanced", "data.sampler=balanced",
                      "train.accumulate=2", "data.val_split=0.2", "train.early_stopping=5",
                      "train.epochs=2", "train.checkpoint=true", "train.checkpoint_every=2",
                      "train.keep_checkpoints=10"]
    run = tmp_path / "run"
    main(load_config(args))
    weights = {d: load_file(run / d / "model.safetensors") for d in (".", "ema")}
    metrics = untimed_metrics(run)
    mid = run / "checkpoints" / "epoch0002-step000002"
    main(load_config(args + [f"resume={mid}", "output_dir=null"]))
    assert untimed_metrics(run) == metrics
    for d, w in weights.items():
        resumed = load_file(run / d / "model.safetensors")
        assert not _changed(w, resumed), d
