"""Batch-norm statistics recomputed for the final weights (train.precise_bn): a run with few
steps per epoch evaluates as its weights deserve; equal to torch's update_bn."""

import copy
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import write_fake_fmnist
from torch import nn

from finetune.config import load_config
from finetune.data.sources import load_idx
from finetune.inference import load
from finetune.models import create_model
from finetune.precise_bn import recompute_bn, training_norms
from finetune.runs import read_metrics
from finetune.train import main

# 480 images at batch 96: 5 steps an epoch, where the running averages lag the weights.
FEW_STEPS = ["recipe=resnet18_scratch_fmnist", "data.image_size=16", "train.epochs=3",
             "train.batch_size=96", "train.lr=0.05", "train.checkpoint=false"]


@pytest.fixture(scope="module")
def few_steps(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, the run with precise_bn=false, the same run with it on)."""
    tmp = tmp_path_factory.mktemp("precise_bn")
    data = write_fake_fmnist(tmp / "data", n_train=480, n_test=200)
    runs = []
    for on in ("false", "true"):
        main(load_config(FEW_STEPS + [f"data.root={data}", f"output_dir={tmp / on}",
                                      f"train.precise_bn={on}"]))
        runs.append(tmp / on)
    return data, *runs


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_recomputed_statistics_match_train_mode_accuracy(few_steps):
    data, stale_run, _ = few_steps
    predictor = load(stale_run)
    _, test = load_idx(data)
    x = predictor.transform(test.images)
    labels = test.labels
    model = predictor.model
    train_mode = _accuracy(model.train(), x, labels)  # each batch normalised by itself
    stale = _accuracy(model.eval(), x, labels)
    assert train_mode >= 0.9 and stale <= train_mode - 0.3  # far below without recomputing
    train, _ = load_idx(data)
    batches = predictor.transform(train.images).split(96)
    used = recompute_bn(model, training_norms(model.train()), batches, 4096, Accelerator(cpu=True))
    assert used == 480 and model.training  # modes as they were
    assert abs(_accuracy(model.eval(), x, labels) - train_mode) <= 0.02


def test_run_recomputes_after_every_epoch_and_trains_the_same(few_steps):
    _, stale_run, precise_run = few_steps
    stale, precise = read_metrics(stale_run), read_metrics(precise_run)
    # Only evaluation changes: the steps, and so the losses, are the same.
    assert [r["batch_loss"] for r in stale] == [r["batch_loss"] for r in precise]
    assert [r["precise_bn_images"] for r in precise] == [480, 480, 480]
    assert "precise_bn_images" not in stale[0]
    assert precise[-1]["test_acc"] >= 0.95 and stale[-1]["test_acc"] <= 0.6


@pytest.mark.parametrize("norm", ["torch", "scratch"])
def test_equals_torch_update_bn(norm):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=16, norm=norm)
    batches = [torch.randn(8, 1, 16, 16) * 3 + 1 for _ in range(5)]
    mine = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "num_batches" in k}
    recompute_bn(mine.train(), training_norms(mine), batches, 10_000, Accelerator(cpu=True))
    # update_bn knows torch's batch norms only: the reference is torch's model, same weights
    reference = create_model("resnet18", num_classes=10, in_chans=1, image_size=16)
    reference.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn(batches, reference)
    got, want = mine.state_dict(), reference.state_dict()
    stats_keys = [k for k in got if k.endswith(("running_mean", "running_var"))]
    assert len(stats_keys) == 40
    for k in stats_keys:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    for k, v in before.items():  # the step count is left as it was
        assert torch.equal(got[k], v)


def test_frozen_batch_norms_are_left_alone():
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=16)
    model.train()
    model.layer1.eval()  # as enter_epoch leaves a frozen stage
    names = training_norms(model)
    assert names and not any(n.startswith("layer1.") for n in names)
    frozen = {k: v.clone() for k, v in model.layer1.state_dict().items()}
    recompute_bn(model, names, [torch.randn(4, 1, 16, 16)], 100, Accelerator(cpu=True))
    assert all(torch.equal(v, model.layer1.state_dict()[k]) for k, v in frozen.items())
    assert model.training and not model.layer1.training
