"""The command line: every command answers --help, ``python -m finetune``, and
``accelerate launch -m finetune.run`` from outside a checkout."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.cli import build_parser, main
from finetune.runs import read_metrics

COMMANDS = ["train", "evaluate", "predict", "compare", "report", "lr-find", "export-onnx",
            "push", "show", "recipes", "models", "show-model", "sweep", "serve", "inspect",
            "cv", "tune"]
# What each command's help must name: its own arguments and, where it takes them, config keys.
EXPECTED = {
    "train": ["key=value", "train.lr", "data.root", "finetune.freeze", "[sgd|adamw]",
              "[full|linear|knn|lp_ft|lora]", "finetune.lora_rank", "finetune.cache_dir"],
    "evaluate": ["run_dir", "data.root", "data.image_size", "--tta"],
    "predict": ["model", "images", "--top-k", "--json", "--tta", "--out", "--resume",
                "--split", "--image-column"],
    "serve": ["model", "--host", "--port", "--workers", "--max-batch-size", "--batch-wait-ms",
              "--max-request-mb", "--max-pixels", "--max-images", "--device"],
    "inspect": ["run_dir", "--out", "--top", "--pairs", "--examples", "--cams", "--layer",
                "data.*"],
    "push": ["run_dir", "repo_id", "--private", "--revision"],
    "compare": ["recipe=A,B", "seeds=", "targets=", "launcher=", "RUN_DIR", "train.epochs"],
    "report": ["run_dir", "output_dir=DIR"],
    "lr-find": ["start_lr=", "end_lr=", "steps=", "train.lr"],
    "export-onnx": ["run_dir", "--out"],
    "show": ["key=value", "model.name"],
    "recipes": ["--help"],
    "models": ["pattern", "timm:convnext*"],
    "show-model": ["model.name", "data.image_size"],
    "tune": ["loguniform(a,b)", "n_trials=", "pruner=", "metric=", "parallel=", "best.yaml"],
    "cv": ["folds=", "output_dir=", "launcher=", "keeps finished folds", "train.epochs"],
    "sweep": ["models=", "seeds=", "--train-best", "MODEL:key=value", "train.epochs"],
}


def test_every_command_is_covered():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert sorted(sub.choices) == sorted(COMMANDS) == sorted(EXPECTED)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_arguments(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: finetune {command}")
    for needle in EXPECTED[command]:
        assert needle in out, needle


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0  # a stray % in a command's summary made argparse raise
    out = capsys.readouterr().out
    assert out.startswith("usage: finetune") and "mean ± 95 % interval" in " ".join(out.split())
    assert "inspect recipes and models" in " ".join(out.split())
    for command in COMMANDS:
        assert command in out, command


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["trian"]) == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err
    assert main(["evaluate", "data.root=/x"]) == 2
    assert "usage: finetune evaluate RUN_DIR" in capsys.readouterr().err


def test_python_dash_m_finetune():
    proc = subprocess.run([sys.executable, "-m", "finetune", "show", "train.lr=0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.5" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "finetune", "show", "model.name=resnet19"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Did you mean 'resnet18'" in proc.stderr


def test_a_resident_run_and_its_evaluation_start_without_the_slow_imports(tiny_args, tmp_path):
    """A run on resident data (IDX files, and a PNG folder at the run's size), and evaluating
    it, import neither timm nor torchvision (1.4-2.3 s) nor inductor's compiler (2.3 s, which
    torch.compiler.cudagraph_mark_step_begin's first call imports): every process of every
    command would pay for them before its first step."""
    folder = tmp_path / "pngs"
    for split, k in [(s, k) for s in ("train", "test") for k in range(2)]:
        (folder / split / f"c{k}").mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), 60 * k + i).save(folder / split / f"c{k}" / f"{i}.png")
    pngs = [*tiny_args[:-2], f"data.root={folder}", f"output_dir={tmp_path / 'png_run'}",
            "train.batch_size=4", "train.checkpoint=false"]
    script = ("import sys\nfrom finetune.cli import main\n"
              f"main(['train', *{tiny_args!r}, 'train.epochs=1'])\n"
              f"main(['evaluate', {tiny_args[-2][len('output_dir='):]!r}])\n"
              f"main(['train', *{pngs!r}, 'train.epochs=1'])\n"
              "slow = ('timm', 'torchvision', 'torch._inductor.compile_fx',\n"
              "        'torch._inductor.cudagraph_trees')\n"
              "print('loaded:', sorted({m for m in sys.modules if m.startswith(slow)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data resident" in proc.stdout + proc.stderr and "imagefolder:" in proc.stderr
    assert "loaded: []" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_accelerate_launch_dash_m_from_outside_a_checkout(tiny_args, tmp_path):
    """The installed package's entry point, as the README gives it, run from a folder that
    holds no checkout (so finetune comes from site-packages or the editable install)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), "-m", "finetune.run", *tiny_args,
         "train.epochs=1"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    assert len(read_metrics(tmp_path / "run")) == 1


@pytest.mark.slow
def test_the_quickstart_command_runs_as_written(fmnist_dir, tmp_path):
    """`accelerate launch finetune/run.py recipe=resnet18_fmnist`, literally, from the checkout
    (the README's quickstart); shrunk by overrides, and offline: the ImageNet weights are a
    local file of torchvision's format."""
    import torchvision

    import finetune

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    accelerate = Path(sys.executable).with_name("accelerate")
    checkout = Path(finetune.__file__).parent.parent
    assert accelerate.is_file() and (checkout / "finetune" / "run.py").is_file()
    proc = subprocess.run(
        [str(accelerate), "launch", "finetune/run.py", "recipe=resnet18_fmnist",
         f"model.weights={weights}", f"data.root={fmnist_dir}", "data.image_size=16",
         "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=20",
         f"output_dir={tmp_path / 'run'}", "train.checkpoint=false"],
        cwd=checkout, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "resnet18_fmnist" in (
        tmp_path / "run" / "config.yaml").read_text()
    assert len(read_metrics(tmp_path / "run")) == 1
