import pytest

from finetune.assemble import check_model
from finetune.config import ConfigError, list_recipes, load_config, to_yaml


def test_recipe_and_overrides_resolve():
    cfg = load_config(["recipe=resnet18_scratch_fmnist", "train.epochs=3", "data.image_size=32",
                       "model.weights=null", "train.lr=0.5"])
    assert cfg.recipe == "resnet18_scratch_fmnist"
    assert (cfg.train.epochs, cfg.data.image_size, cfg.train.lr) == (3, 32, 0.5)
    assert cfg.train.optimizer == "sgd" and cfg.model.pretrained is False


@pytest.mark.parametrize("arg, hint", [
    ("train.epoch=3", "Did you mean 'train.epochs'?"),
    ("data.imagesize=3", "Did you mean 'data.image_size'?"),
    ("modl.name=resnet18", "Did you mean 'model.name'?"),
])
def test_unknown_key_suggests(arg, hint):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(["recipe=resnet18_fmnist", arg])
    assert hint in str(e.value)


def test_unknown_key_lists_valid_keys_of_section():
    with pytest.raises(ConfigError) as e:
        load_config(["train.bogus=1"])
    assert "train.epochs" in str(e.value) and "train.batch_size" in str(e.value)


@pytest.mark.parametrize("arg, msg", [
    ("train.epochs=abc", "train.epochs"),
    ("train.batch_size=0", "'train.batch_size' must be a positive integer"),
    ("data.image_size=-8", "'data.image_size' must be a positive integer"),
    ("train.lr=-1", "'train.lr' must be >= 0"),
    ("data.source=ftp", "Valid values: auto, hf, idx, imagefolder"),
    ("train.schedule=linear", "Valid values: constant, cosine, onecycle"),
    ("model.name=resnet19", "Did you mean 'resnet18'?"),
    ("train.label_smoothing=1.5", "must be < 1"),
    ("model.pretrained=maybe", "model.pretrained"),
    ("model.norm=layer", "Valid values: torch, scratch"),
    ("data.image_size=16 model.name=vgg11_narrow", "cannot take data.image_size=16"),
])
def test_invalid_values_fail_before_work(arg, msg):
    """Refused by reading the config or, for what depends on the model, by the model check
    every command runs before any data or weights load."""
    with pytest.raises(ConfigError) as e:
        check_model(load_config(["recipe=resnet18_scratch_fmnist", *arg.split()]))
    assert msg in str(e.value)


def test_reading_a_config_needs_no_model_zoo():
    import subprocess
    import sys

    code = ("import sys; from finetune.config import load_config; "
            "load_config(['recipe=resnet18_scratch_fmnist', 'model.name=resnet19']); "
            "print(sorted(m for m in sys.modules if m.startswith('finetune.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'resnet18_fmnist'"):
        load_config(["recipe=resnet18_fmnst"])


def test_argument_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(["train.epochs"])


def test_weights_without_pretrained_is_rejected():
    with pytest.raises(ConfigError, match="model.pretrained=true"):
        load_config(["recipe=resnet18_scratch_fmnist", "model.weights=/x.pth"])


def test_unknown_key_inside_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match="Did you mean 'train.epochs'"):
        load_config([f"recipe={path}"])


def test_shipped_recipes_all_load_and_round_trip():
    recipes = list_recipes()
    assert {"resnet18_fmnist", "resnet152_fmnist", "resnet18_scratch_fmnist"} <= set(recipes)
    for name, description in recipes.items():
        assert description, f"{name} has no description"
        cfg = load_config([f"recipe={name}"])
        assert cfg.recipe == name
        assert "epochs:" in to_yaml(cfg)
    assert load_config(["recipe=resnet18_fmnist"]).model.pretrained is True
    assert load_config(["recipe=resnet152_fmnist"]).model.name == "resnet152"


def test_cli_lists_recipes_and_shows_config(capsys):
    from finetune.cli import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("resnet18_fmnist ") and "ImageNet-pretrained" in line
               for line in lines)
    assert main(["show", "recipe=resnet18_fmnist", "train.epochs=7"]) == 0
    shown = capsys.readouterr().out
    assert "epochs: 7" in shown and "pretrained: true" in shown
    assert main(["show", "recipe=resnet18_fmnist", "train.epoch=7"]) == 2
    assert "Did you mean 'train.epochs'?" in capsys.readouterr().err
