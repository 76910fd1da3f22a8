"""finetune.method=lora (peft): the adapted layers of each family, frozen base and trainable
adapters and head in the stages, the merged export and the peft adapter giving the trained
model's logits, bit-exact resume, and the refusals."""

import copy
import json
import logging
import sys

import pytest
import timm
import torch
from conftest import refused, untimed_metrics
from safetensors.torch import load_file, save_file
from torch import nn

import finetune
from finetune.checkpoint import list_checkpoints
from finetune.config import FinetuneConfig, ModelConfig, TrainConfig, load_config
from finetune.lora import apply_lora, default_targets, merged, save_adapter
from finetune.models import build_model, create_model
from finetune.models.interface import classifier_name
from finetune.optim import make_optimizer, plan_stages
from finetune.train import main

peft = pytest.importorskip("peft")
LORA = FinetuneConfig(method="lora")
SAME = {"rtol": 1e-5, "atol": 1e-5}


def _model(name: str, size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        kwargs = {"img_size": size} if "vit" in name else {}
        return timm.create_model(name[5:], num_classes=10, in_chans=1, **kwargs)
    return create_model(name, num_classes=10, in_chans=1, image_size=size)


def _lora_params(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("name", ["resnet18", "alexnet_lecture", "timm:test_vit",
                                  "timm:test_convnext", "timm:test_efficientnet"])
def test_targets_by_family_and_what_trains(name, caplog):
    model = _model(name)
    targets = default_targets(model)
    modules = dict(model.named_modules())
    head, first = classifier_name(model), model.pretrained_cfg["first_conv"]
    assert targets and head not in targets and first not in targets
    if "vit" in name:  # attention and MLP linears only
        assert {t.rpartition(".")[2] for t in targets} == {"qkv", "proj", "fc1", "fc2"}
        assert all(isinstance(modules[t], nn.Linear) for t in targets)
    else:  # every linear and ungrouped convolution but the input's and the classifier
        assert any(isinstance(modules[t], nn.Conv2d) for t in targets)
        assert all(getattr(modules[t], "groups", 1) == 1 for t in targets)
        plain = {n for n, m in modules.items() if isinstance(m, nn.Linear | nn.Conv2d)
                 and getattr(m, "groups", 1) == 1}
        assert set(targets) == plain - {head, first}
    with caplog.at_level(logging.INFO, logger="finetune"):
        apply_lora(model, LORA)
    assert f"LoRA rank 8 on {len(targets)} modules: " in caplog.text
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == _lora_params(model) | {n for n, _ in model.named_parameters()
                                            if n.startswith(head + ".")}
    # The stages still group every parameter; the optimizer gets the trainable ones.
    plan = plan_stages(model, LORA)
    assert plan.names[-1] == "head" and len(plan.names) > 2
    assert {n for n in trains if n.startswith(head + ".")} <= set(plan.params[-1])
    optimizer = make_optimizer(model, TrainConfig(), plan)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trains)


@pytest.mark.parametrize("name", ["resnet18", "timm:test_vit", "timm:test_convnext"])
def test_merged_model_gives_the_adapted_logits_with_plain_keys(name):
    model = _model(name)
    plain_keys = model.state_dict().keys()
    apply_lora(model, LORA)
    with torch.no_grad():  # adapters that have learnt something, moved statistics
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.mul_(1.5)
    x = torch.randn(3, 1, 32, 32)
    expected = model.eval()(x)
    plain = merged(model)
    assert plain.state_dict().keys() == plain_keys
    assert not _lora_params(plain) and not hasattr(plain, "peft_config")
    torch.testing.assert_close(plain.eval()(x), expected, **SAME)
    # The source keeps its adapters, unmerged, and trains on.
    assert _lora_params(model) and not any(getattr(m, "merged", False)
                                           for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)


def test_adapter_loads_into_peft_with_the_same_logits(tmp_path):
    base = _model("resnet18")
    model = apply_lora(copy.deepcopy(base), LORA)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or n.startswith("fc."):
                p.normal_(0, 0.05)
        model.layer1[0].bn1.running_mean.add_(0.3)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert "fc" in config["modules_to_save"]
    x = torch.randn(3, 1, 32, 32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """ImageNet-shaped (3 channels, 1000 classes) weights, random, as files."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {}
    for name in ("resnet18", "timm:test_convnext"):
        model = (timm.create_model(name[5:]) if name.startswith("timm:")
                 else create_model(name, num_classes=1000, in_chans=3))
        files[name] = folder / f"{name.replace(':', '_')}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files[name])
    return files


@pytest.mark.parametrize("name", ["resnet18", "timm:test_convnext"])
def test_lora_run_exports_merged_weights_and_its_adapter(name, weights, fmnist_dir, tmp_path):
    run = tmp_path / "run"
    main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=32",
        f"model.name={name}", "model.pretrained=true", f"model.weights={weights[name]}",
        "finetune.method=lora", "train.epochs=1", "train.batch_size=16",
        "train.eval_batch_size=40", "train.lr=0.05", "train.checkpoint=false",
        "train.precise_bn=false", "train.ema_decay=0.5", "data.val_split=0.2",
        "train.early_stopping=3", f"output_dir={run}"]))
    base_cfg = ModelConfig(name=name, pretrained=True, weights=str(weights[name]))
    x = torch.randn(4, 1, 32, 32)
    for folder in (run, run / "ema"):
        ours = finetune.load(folder).model
        expected = ours(x)
        # The plain model's keys; timm rebuilds it from the folder alone.
        state = load_file(folder / "model.safetensors")
        assert state.keys() == _model(name).state_dict().keys()
        rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(x), expected, **SAME)
        # The adapter on the pretrained model with a new head: the same logits.
        base, _ = build_model(base_cfg, num_classes=10, in_chans=1, image_size=32)
        adapted = peft.PeftModel.from_pretrained(base, folder / "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(x), expected, **SAME)
    # The merged adapters changed the adapted layers; the input convolution is the pretrained.
    base, _ = build_model(base_cfg, num_classes=10, in_chans=1, image_size=32)
    first = base.pretrained_cfg["first_conv"] + ".weight"
    assert torch.equal(state[first], base.state_dict()[first])
    target = default_targets(base)[-1] + ".weight"
    assert not torch.equal(state[target], base.state_dict()[target])
    meta = json.loads((run / "model.json").read_text())
    assert meta["lora"]["rank"] == 8 and meta["early_stopping"]["best_epoch"] == 1
    assert f"LoRA rank 8 (alpha 16) on {meta['lora']['modules']} modules" in (
        run / "README.md").read_text()


def test_lora_run_resumed_mid_epoch_is_bit_exact(fmnist_dir, tmp_path):
    out = tmp_path / "run"
    args = ["recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=32",
            "model.name=timm:test_resnet", "finetune.method=lora", "train.epochs=1",
            "train.batch_size=16", "train.eval_batch_size=20", "train.lr=0.05",
            "train.checkpoint_every=4", "train.keep_checkpoints=10", "train.mixed_precision=fp32",
            "train.ema_decay=0.5", "train.precise_bn=false", f"output_dir={out}"]
    main(load_config(args))
    assert [p.name for p in list_checkpoints(out)] == ["epoch0001-step000004",
                                                       "epoch0001-step000006"]
    files = ("model.safetensors", "adapter/adapter_model.safetensors",
             "ema/model.safetensors", "ema/adapter/adapter_model.safetensors")
    before = {f: load_file(out / f) for f in files}
    metrics = untimed_metrics(out)
    main(load_config(args + [f"resume={out / 'checkpoints' / 'epoch0001-step000004'}",
                             "output_dir=null"]))
    for f in files:
        again = load_file(out / f)
        assert again.keys() == before[f].keys()
        assert all(torch.equal(before[f][k], again[k]) for k in again), f
    assert untimed_metrics(out) == metrics


def _train(fmnist_dir, tmp_path, *extra: str) -> list[str]:
    return ["train", "recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}",
            "data.image_size=16", "train.epochs=1", "train.batch_size=16",
            "train.checkpoint=false", f"output_dir={tmp_path / 'run'}", "finetune.method=lora",
            *extra]


@pytest.mark.parametrize("extra, needles", [
    (["finetune.lora_targets=[attn.qkv]"],
     ["finetune.lora_targets=['attn.qkv'] matches no", "layer1.0.conv1"]),
    (["finetune.lora_targets=[fc]"], ["finetune.lora_targets=['fc'] matches no"]),
    (["finetune.lora_targets=['layer[']"], ["finetune.lora_targets", "not a regular"]),
    (["finetune.freeze=backbone"], ["finetune.freeze=backbone", "finetune.method=lora"]),
])
def test_bad_lora_settings_are_one_line(extra, needles, fmnist_dir, tmp_path, capsys):
    refused(capsys, _train(fmnist_dir, tmp_path, *extra), *needles)
    assert not (tmp_path / "run").exists()


def test_missing_peft_names_the_extra(fmnist_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails as if not installed
    refused(capsys, _train(fmnist_dir, tmp_path),
            "finetune.method=lora needs the peft library: pip install 'finetune[peft]'")
