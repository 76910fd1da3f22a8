"""Any backbone: timm and torchvision models by name, with weights written by the tests (timm's
tiny test models, random init): loading and adaptation, stages and freezing, training, export,
and timm / ONNX rebuilding the export."""

import json
import logging

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

import finetune
from finetune.assemble import check_model
from finetune.cli import main as cli_main
from finetune.config import ConfigError, FinetuneConfig, ModelConfig, load_config
from finetune.models import WeightsError, build_model, create_model, list_models, stages
from finetune.models.interface import group_parameters
from finetune.optim import freeze_for_good, plan_stages
from finetune.train import main

TIMM_TEST = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"]


def _save(model: torch.nn.Module, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """ImageNet-shaped (3 channels, 1000 classes) weights of timm's test models, as files."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return {arch: (_save(m := timm.create_model(arch), folder / f"{arch}.safetensors"), m)
            for arch in TIMM_TEST}


def _first_conv(model: torch.nn.Module) -> torch.Tensor:
    return model.get_parameter(model.pretrained_cfg["first_conv"] + ".weight")


@pytest.mark.parametrize("arch", TIMM_TEST)
def test_timm_weights_adapt_to_one_channel_and_a_new_head(arch, timm_weights, caplog):
    path, source = timm_weights[arch]
    with caplog.at_level(logging.INFO, logger="finetune"):
        model, loaded = build_model(ModelConfig(name=f"timm:{arch}", pretrained=True,
                                                weights=str(path)),
                                    num_classes=10, in_chans=1, image_size=32)
    # 1 channel as timm adapts it: the RGB filters summed; the body as it was; a new head.
    torch.testing.assert_close(_first_conv(model), _first_conv(source).sum(1, keepdim=True))
    head = model.pretrained_cfg["classifier"]
    body = {k: v for k, v in source.state_dict().items()
            if not k.startswith(head + ".") and k != model.pretrained_cfg["first_conv"] + ".weight"
            and "pos_embed" not in k}
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in body.items())
    assert model.get_classifier().weight.shape[0] == 10
    assert "1 input channels (summed RGB filters" in caplog.text
    assert "classifier replaced, 1000 -> 10 classes" in caplog.text
    # The weights' own preprocessing (timm's pretrained config of the model).
    cfg = timm.models.get_pretrained_cfg(arch)
    assert loaded.mean == (sum(cfg.mean) / 3,) and loaded.preprocessing["crop_pct"] == cfg.crop_pct
    assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_torchvision_models_by_name_adapt_the_same_way(tmp_path):
    torch.manual_seed(1)
    for arch in ("resnet18", "mobilenet_v3_small", "vit_b_16"):
        source = torchvision.models.get_model(arch)
        path = tmp_path / f"{arch}.pth"
        torch.save(source.state_dict(), path)
        model, loaded = build_model(ModelConfig(name=f"tv:{arch}", pretrained=True,
                                                weights=str(path)),
                                    num_classes=10, in_chans=1, image_size=32)
        first = model.pretrained_cfg["first_conv"]
        torch.testing.assert_close(model.get_parameter(first + ".weight"),
                                   source.get_parameter(first + ".weight").sum(1, keepdim=True))
        assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 10), arch
        assert loaded.mean == (0.449,) and stages(model)[-1][0] == "head"
    # ViT at 32 px: the 14x14 position embeddings were interpolated to 2x2 (+ class token).
    assert model.encoder.pos_embedding.shape == (1, 5, 768)


@pytest.mark.parametrize("name", ["timm:test_convnext", "timm:test_vit", "tv:resnet18",
                                  "tv:efficientnet_b0"])
def test_freezing_follows_the_models_own_stages(name):
    """freeze=backbone trains only the classifier; stages:N freezes exactly the first N groups
    of the model's group_matcher."""
    for freeze, frozen_groups in (("backbone", -1), ("stages:2", 2)):
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=1, image_size=32)
        groups = stages(model)
        plan = plan_stages(model, FinetuneConfig(freeze=freeze))
        freeze_for_good(model, plan, "train")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()(torch.randn(8, 1, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
        expected = {k for _, names in groups[frozen_groups:] for k in names}
        trainable = {k for k, v in model.named_parameters() if v.requires_grad}
        # (Some trainable weights may not move visibly in one step, e.g. behind a ConvNeXt's
        # 1e-6 layer scale; none outside the trained groups may move at all.)
        assert trainable == expected and changed <= expected, (name, freeze)
        assert len(changed) > len(expected) / 2
        if freeze == "backbone":  # the last group: the classifier (and a head norm, if any)
            assert groups[-1][0] == "head"
            assert model.pretrained_cfg["classifier"] + ".weight" in changed


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(name="timm:test_vit", grad_checkpointing=on),
                               num_classes=10, in_chans=1, image_size=32)
        model.train()(torch.randn(4, 1, 32, 32)).sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    assert model.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ConfigError, match="set_grad_checkpointing"):
        check_model(load_config(["model.name=tv:resnet18", "model.grad_checkpointing=true",
                                 "data.image_size=32"]))


@pytest.mark.parametrize("args, message", [
    (["model.name=timm:convnext_tinyy"], "unknown timm model 'convnext_tinyy'.*convnext_tiny"),
    (["model.name=timm:resnet18.no_such_tag"], "no pretrained tag 'no_such_tag'.*a1_in1k"),
    (["model.name=tv:resnet19"], "unknown torchvision model 'resnet19'.*resnet18"),
    (["model.name=timm:test_vit", "data.image_size=20"], "cannot take data.image_size=20"),
    (["model.name=tv:resnet18", "model.drop_path_rate=0.1"], "drop_path_rate applies to timm"),
    (["model.name=timm:test_resnet", "model.norm=scratch"], "applies to the lecture's models"),
    (["model.name=tv:vit_b_16", "data.image_size=24"], "cannot take data.image_size=24"),
    (["model.name=timm:cait_xxs24_224", "data.image_size=32"], "cannot read its stages"),
    (["model.name=timm:vgg11", "model.grad_checkpointing=true", "data.image_size=32"],
     "gradient checkpointing not supported"),
])
def test_bad_backbones_are_refused_up_front(args, message):
    with pytest.raises(ConfigError, match=message):
        check_model(load_config(args))


def test_the_image_size_defaults_to_the_weights_input_size(timm_weights, tmp_path):
    cfg = load_config(["model.name=timm:test_vit", "model.pretrained=true"])
    check_model(cfg)
    assert cfg.data.image_size == 160  # timm's pretrained config of test_vit.r160_in1k
    cfg = load_config(["model.name=tv:resnet18", "model.pretrained=true"])
    check_model(cfg)
    assert cfg.data.image_size == 224
    cfg = load_config(["model.name=timm:test_resnet"])
    check_model(cfg)
    assert cfg.data.image_size == 28  # no weights: Fashion-MNIST's size
    cfg = load_config(["model.name=timm:test_vit", "model.pretrained=true",
                       "data.image_size=32"])
    check_model(cfg)
    assert cfg.data.image_size == 32  # an explicit size wins


def test_a_timm_folder_and_its_config(timm_weights, tmp_path):
    """model.weights=FOLDER as timm saves one: model.safetensors + config.json, whose
    pretrained_cfg says how the weights were made."""
    from timm.models import save_for_hf

    _, source = timm_weights["test_convnext"]
    source.pretrained_cfg = {**source.pretrained_cfg, "mean": (0.1, 0.2, 0.3),
                             "std": (0.4, 0.5, 0.6), "crop_pct": 0.8}
    save_for_hf(source, tmp_path / "folder")
    model, loaded = build_model(ModelConfig(name="timm:test_convnext", pretrained=True,
                                            weights=str(tmp_path / "folder")),
                                num_classes=10, in_chans=3, image_size=32)
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6)
    assert loaded.preprocessing["crop_pct"] == 0.8
    torch.testing.assert_close(_first_conv(model), _first_conv(source))


def test_unavailable_weights_stop_with_the_fix(tmp_path, monkeypatch, timm_weights):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # huggingface_hub read the variables at import: without these it retries the network
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError, match="test_vit.r160_in1k.*model.weights=PATH"):
        build_model(ModelConfig(name="timm:test_vit", pretrained=True), num_classes=10,
                    in_chans=1, image_size=32)
    with pytest.raises(WeightsError, match="do not fit timm:test_convnext.*another arch"):
        build_model(ModelConfig(name="timm:test_convnext", pretrained=True,
                                weights=str(timm_weights["test_vit"][0])),
                    num_classes=10, in_chans=1, image_size=32)
    # timm loads non-strictly once it drops the classifier: what did not fit is still refused
    for source, target in (("test_convnext", "test_resnet"), ("test_resnet", "test_vit")):
        with pytest.raises(WeightsError, match=f"do not fit timm:{target}: .*missing"):
            build_model(ModelConfig(name=f"timm:{target}", pretrained=True,
                                    weights=str(timm_weights[source][0])),
                        num_classes=10, in_chans=1, image_size=32)
    with pytest.raises(WeightsError, match="model.name=timm:resnet50d"):
        build_model(ModelConfig(name="resnet18", pretrained=True, weights="timm:resnet50d"),
                    num_classes=10, in_chans=1, image_size=32,
                    fetched=_fake_fetched("timm:timm/resnet50d.a1_in1k", "resnet50d"))


def _fake_fetched(source: str, arch: str):
    from finetune.models import Fetched

    torch.manual_seed(0)
    return Fetched(timm.create_model(arch).state_dict(), source, {})


def test_models_lists_timm_and_torchvision_names(capsys):
    assert cli_main(["models", "timm:test_vi*"]) == 0
    out = capsys.readouterr().out
    assert "timm:test_vit.r160_in1k" in out and "timm:test_vit2.r160_in1k" in out
    assert cli_main(["models", "tv:efficientnet_b*"]) == 0
    out = capsys.readouterr().out
    assert "tv:efficientnet_b0  IMAGENET1K_V1" in out and "tv:resnet18" not in out
    assert cli_main(["models"]) == 0
    assert "timm:NAME" in capsys.readouterr().out
    assert cli_main(["models", "timm:zzz*"]) == 2


@pytest.fixture(scope="module")
def trained_backbones(tmp_path_factory, timm_weights):
    """One short fine-tuning run per timm test model (1 channel, 10 classes, 32 px)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_fake_fmnist

    root = tmp_path_factory.mktemp("backbones")
    data = write_fake_fmnist(root / "fmnist")
    runs = {}
    for arch in TIMM_TEST:
        run = root / arch
        result = main(load_config([
            "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=32",
            f"model.name=timm:{arch}", "model.pretrained=true",
            f"model.weights={timm_weights[arch][0]}", "train.epochs=1", "train.batch_size=16",
            "train.eval_batch_size=20", "train.lr=0.01", "train.checkpoint=false",
            f"output_dir={run}"]))
        runs[arch] = (run, result)
    return runs


@pytest.mark.parametrize("arch", TIMM_TEST)
def test_exported_timm_models_rebuild_with_identical_logits(arch, trained_backbones):
    run, result = trained_backbones[arch]
    meta = json.loads((run / "model.json").read_text())
    assert meta["architecture"] == f"timm:{arch}"
    assert meta["pretrained_cfg"]["architecture"] == arch  # the backbone's own config
    assert meta["mean"] == [0.5] or meta["mean"] == [pytest.approx(0.449)]
    ours = finetune.load(run)
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    expected = ours.logits(x)
    # timm alone, from the run folder: the same architecture, channels, head and logits.
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ours.transform(x)), expected, rtol=0, atol=1e-6)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (1, 32, 32) and list(cfg["mean"]) == meta["mean"]
    # `finetune evaluate` reproduces the run's test accuracy.
    assert cli_main(["evaluate", str(run)]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["test_acc"] == result["test_acc"]
    state = load_file(run / "model.safetensors")
    assert state.keys() == model.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["test_convnext", "test_vit"])
def test_onnx_export_of_timm_models(arch, trained_backbones, tmp_path):
    import onnxruntime

    run, _ = trained_backbones[arch]
    out = tmp_path / "m.onnx"
    assert cli_main(["export-onnx", str(run), "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out))
    model = finetune.load(run).model
    x = torch.randn(3, 1, 32, 32)
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, arch", [("convnext_tiny_fmnist", "convnext_tiny"),
                                          ("efficientnet_b0_fmnist", "efficientnet_b0"),
                                          ("vit_small_fmnist", "vit_small_patch16_224")])
def test_backbone_recipes_run_offline(recipe, arch, fmnist_dir, tmp_path):
    """The shipped timm recipes, offline: their weights given as a file (random init here),
    shrunk to a few seconds; their settings (drop path, layer decay, clipping) hold."""
    torch.manual_seed(0)
    weights = _save(timm.create_model(arch), tmp_path / "w.safetensors")
    cfg = load_config([f"recipe={recipe}", f"model.weights={weights}", f"data.root={fmnist_dir}",
                       "data.image_size=32", "train.epochs=1", "train.batch_size=16",
                       "train.checkpoint=false", f"output_dir={tmp_path / 'run'}"])
    result = main(cfg)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["architecture"] == f"timm:{arch}" and meta["pretrained"].endswith("w.safetensors")
    assert 0 <= result["test_acc"] <= 1 and meta["interpolation"] == "bilinear"  # resident
    assert meta["mean"] == [pytest.approx(sum(timm.models.get_pretrained_cfg(arch).mean) / 3)]


@pytest.mark.parametrize("name", [*list_models(), *(f"timm:{a}" for a in TIMM_TEST),
                                  "timm:cait_xxs24_224", "timm:deit_tiny_distilled_patch16_224",
                                  "tv:resnet18", "tv:mnasnet0_5", "tv:vit_b_16"])
def test_stages_group_parameters_as_timm_does(name):
    """finetune's twin of timm.models.group_parameters (kept to spare every run timm's import)
    groups every parameter as timm's does, in timm's order, with coarse and fine matchers;
    cait's matcher is a function."""
    from timm.models import group_parameters as timms

    model = create_model(name, num_classes=10, in_chans=1, image_size=224 if "vit_b" in name
                         else 64 if ":" not in name else 32)
    for coarse in (True, False):
        matcher = model.group_matcher(coarse=coarse)
        assert group_parameters(model, matcher) == list(timms(model, matcher).values())


def test_distilled_models_keep_both_heads_in_the_head_stage():
    """timm's distilled models return (head, head_dist) from get_classifier()."""
    cfg = load_config(["model.name=timm:deit_tiny_distilled_patch16_224", "data.image_size=32"])
    check_model(cfg)
    model = create_model(cfg.model.name, num_classes=10, in_chans=1, image_size=32)
    head = dict(stages(model))["head"]
    assert "head.weight" in head and "head_dist.weight" in head


def test_googlenet_weights_load_without_their_auxiliary_heads(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.googlenet(aux_logits=True, init_weights=True)
    path = tmp_path / "googlenet.pth"
    torch.save(source.state_dict(), path)
    model, loaded = build_model(ModelConfig(name="tv:googlenet", pretrained=True,
                                            weights=str(path)),
                                num_classes=10, in_chans=3, image_size=64)
    torch.testing.assert_close(model.inception5b.branch1.conv.weight,
                               source.inception5b.branch1.conv.weight)
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_weights_of_the_wrong_family_are_refused_with_the_fix():
    with pytest.raises(WeightsError, match="tv:NAME"):
        build_model(ModelConfig(name="timm:test_resnet", pretrained=True,
                                weights="torchvision"), num_classes=10, in_chans=1,
                    image_size=32)
    with pytest.raises(ConfigError, match="model.weights: timm has no pretrained tag 'nope'"):
        check_model(load_config(["model.name=timm:test_vit", "model.pretrained=true",
                                 "model.weights=timm:test_vit.nope", "data.image_size=32"]))
    with pytest.raises(ConfigError, match="does not take these model"):
        check_model(load_config(["model.name=timm:vgg11", "model.drop_path_rate=0.1",
                                 "data.image_size=32"]))


def test_torchvision_stages_keep_hidden_classifier_layers_apart():
    model = create_model("tv:vgg11", num_classes=10, in_chans=1, image_size=32)
    groups = dict(stages(model))
    assert groups["head"] == ["classifier.6.weight", "classifier.6.bias"]
    assert "classifier.0.weight" in groups["classifier"]
    names = [name for name, _ in stages(create_model("tv:mnasnet0_5", num_classes=10,
                                                     in_chans=1, image_size=32))]
    assert len(names) > 8  # MNASNet's `layers`, block by block
    every = [p for _, ps in stages(model) for p in ps]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())


def test_models_lists_only_matching_tags(capsys):
    assert cli_main(["models", "timm:test_vit.r160*"]) == 0
    out = capsys.readouterr().out
    assert "timm:test_vit.r160_in1k" in out and "no pretrained weights" not in out
