"""The fast path: on-device augmentation, channels_last, mixed precision, fused optimizers,
streaming fallback, torch.compile, and the benchmark scripts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ConfigError, TrainConfig, load_config
from finetune.data.loader import BatchTransform, place, random_erasing
from finetune.data.sources import ImageData
from finetune.models import create_model
from finetune.optim import make_optimizer
from finetune.precision import check_cpu_bf16, cpu_description, resolve_mixed_precision
from finetune.runs import read_metrics, time_to_accuracy
from finetune.speed import copy_to_host
from finetune.train import main

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def test_random_erasing_erases_one_rectangle_per_image():
    x = torch.rand(200, 2, 24, 20) + 1.0  # no zeros before erasing
    gen = torch.Generator().manual_seed(0)
    out = random_erasing(x, 1.0, gen)
    erased = out == 0
    assert torch.equal(erased[:, 0], erased[:, 1])  # the same rectangle in every channel
    assert torch.equal(out[~erased], x[~erased])  # the rest untouched
    m = erased[:, 0]
    rows, cols = m.any(2), m.any(1)
    # A rectangle: the mask is the outer product of its row and column ranges.
    assert torch.equal(m, rows[:, :, None] & cols[:, None, :])
    frac = m.float().mean(dim=(1, 2))
    assert (frac > 0).all() and frac.max() <= 0.40  # 0.33 of the area, sides rounded
    assert frac.mean() == pytest.approx((0.02 + 0.33) / 2, abs=0.05)
    # Seeded: the same generator state gives the same rectangles.
    again = random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_random_erasing_probability():
    x = torch.rand(2000, 1, 16, 16) + 1.0
    hit = (random_erasing(x, 0.3, torch.Generator().manual_seed(1)) == 0).flatten(1).any(1)
    assert hit.float().mean() == pytest.approx(0.3, abs=0.04)
    assert torch.equal(random_erasing(x, 0.0, torch.Generator()), x)


def test_random_erasing_probability_checked():
    with pytest.raises(ConfigError, match=r"'data.random_erasing' is a probability in \[0, 1\], "
                                          r"got 1.5"):
        load_config(["data.random_erasing=1.5"])


def test_transform_channels_last_same_values():
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    plain = BatchTransform(32, 3, (0.5,) * 3, (0.25,) * 3)(images)
    cl = BatchTransform(32, 3, (0.5,) * 3, (0.25,) * 3, channels_last=True)(images)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, cl)
    # Erasing happens only for training batches.
    t = BatchTransform(28, 1, (0.0,), (1.0,), erase=1.0)
    assert torch.equal(t(images), images.float() / 255)
    assert (t(images, train=True, gen=torch.Generator()) != images.float() / 255).any()


def test_mixed_precision_resolution(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision("auto", CPU) == "fp32"
    assert resolve_mixed_precision("bf16", CPU) == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision
    assert resolve_mixed_precision("auto", CPU) == "bf16"
    assert resolve_mixed_precision("fp32", CPU) == "fp32"  # the recipe's explicit choice wins
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_mixed_precision("fp16", CPU)
    with pytest.raises(ConfigError, match=r"\(no/off/yes/on are read as booleans\)\. "
                                          r"Valid values: auto, fp32, bf16, fp16"):
        load_config(["train.mixed_precision=no"])


def test_cpu_bf16_refused_where_onednn_is_wrong():
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=16)
    with pytest.raises(ConfigError, match=r"layer4.0.conv1, layer4.0.downsample.0 .*1x1"):
        check_cpu_bf16(model, (2, 1, 16, 16))
    assert model.training  # mode restored
    check_cpu_bf16(model, (2, 1, 32, 32))


class _Declared(torch.nn.Sequential):
    """A model that says what its stages and classifier are (finetune.models.interface)."""

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"body": r"^[01]\."}

    def get_classifier(self):
        return self[2]


def test_fused_optimizer_matches_the_loop_implementation():
    torch.manual_seed(0)
    model = _Declared(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=0.1, nesterov=True, weight_decay=1e-2)
    fused = make_optimizer(model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    plain = torch.optim.SGD([{"params": [p for p in twin.parameters() if p.ndim > 1],
                              "weight_decay": 1e-2},
                             {"params": [p for p in twin.parameters() if p.ndim <= 1],
                              "weight_decay": 0.0}], lr=0.1, momentum=0.9, nesterov=True,
                            foreach=False)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_placement_auto_falls_back_to_streaming(monkeypatch, caplog):
    data = ImageData(torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.zeros(10).long(),
                     ["a"])
    assert place(data, data, "auto", CPU, 28) == ("device", "0.00 GB as uint8: fits on the cpu")
    assert place(data, data, "host", CPU, 28) == ("host", "data.placement=host")
    assert place(data, data, "stream", CPU, 28)[0] == "stream"
    monkeypatch.setattr("finetune.data.loader.fits_on_device", lambda nbytes, device: False)
    placement, why = place(data, data, "auto", torch.device("cuda"), 28)
    assert placement == "host" and "batches are gathered by workers" in why


def test_streamed_batches_train_exactly_like_device_batches(tiny_args, tmp_path):
    a = main(load_config(tiny_args + [f"output_dir={tmp_path / 'a'}"]))
    b = main(load_config(tiny_args + [f"output_dir={tmp_path / 'b'}", "data.placement=host",
                                      "data.workers=1"]))
    assert b["placement"] == "host" and a["placement"] == "device"
    assert a["batch_loss"] == b["batch_loss"] and a["test_correct"] == b["test_correct"]
    wa, wb = (load_file(tmp_path / r / "model.safetensors") for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_copy_to_host_on_cpu():
    t = torch.tensor(1.5)
    value, event = copy_to_host(t)
    assert event is None and float(value) == 1.5


def test_time_to_accuracy():
    records = [{"epoch": 1, "epoch_time": 2.0, "test_acc": 0.85},
               {"epoch": 2, "epoch_time": 1.5, "test_acc": 0.91},
               {"epoch": 3, "epoch_time": 1.5, "test_acc": 0.90},
               {"epoch": 4, "epoch_time": 1.0, "test_acc": 0.93}]
    assert time_to_accuracy(records, 0.90) == (2, 3.5)
    assert time_to_accuracy(records, 0.93) == (4, 6.0)
    assert time_to_accuracy(records, 0.85) == (1, 2.0)
    assert time_to_accuracy(records, 0.95) is None


@pytest.mark.slow
def test_compiled_run_matches_eager(tiny_args, tmp_path):
    eager = main(load_config(tiny_args + ["train.epochs=1", f"output_dir={tmp_path / 'e'}"]))
    compiled = main(load_config(tiny_args + ["train.epochs=1", "train.compile=true",
                                             f"output_dir={tmp_path / 'c'}"]))
    assert compiled["compile_time"] > 0 and "compile_time" not in eager
    # Same data, same augmentation draws, same starting batch-norm statistics: the warm-up
    # step that compiled the model left no trace. The kernels differ, so losses agree to float
    # tolerance at first and drift apart over the steps (lr is high for batch 16).
    assert compiled["batch_loss"][:3] == pytest.approx(eager["batch_loss"][:3], abs=2e-3)
    we, wc = (load_file(tmp_path / r / "model.safetensors") for r in "ec")
    assert we.keys() == wc.keys()  # compiled in place: no _orig_mod. prefixes in the export


@pytest.mark.slow
def test_benchmark_scripts_run(fmnist_dir, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin",
           "FINETUNE_CPU_PRECISION": "fp32", "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    loop = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loop_speed.py"), "--model", "resnet18",
         "--image-size", "32", "--batch-size", "8", "--steps", "2", "--warmup", "1",
         "--workers", "1", "--variants", "auto,fp32+nchw", "--data-root", str(fmnist_dir),
         "--json", str(tmp_path / "speed.jsonl")], capture_output=True, text=True, env=env)
    assert loop.returncode == 0, loop.stderr
    speed = json.loads((tmp_path / "speed.jsonl").read_text())
    assert speed["lecture"] > 0 and speed["auto"] > 0 and speed["fp32+nchw"] > 0
    assert speed["auto_precision"] in ("fp32", "bf16") and "x the lecture loop" in loop.stdout
    assert speed["cpu"] == cpu_description() and cpu_description() in loop.stdout
    tta = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "time_to_accuracy.py"),
         "recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=16",
         "train.epochs=2", "train.batch_size=16", "train.checkpoint=false", "--seeds", "0",
         "--targets", "0.0,1.01",
         "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "tta.json")],
        capture_output=True, text=True, env=env)
    assert tta.returncode == 0, tta.stderr
    summary = json.loads((tmp_path / "tta.json").read_text())
    (seed,) = summary["seeds"]
    records = read_metrics(tmp_path / "runs" / "seed0")
    assert seed["reached"]["0.0"] == [1, records[0]["epoch_time"]]
    assert seed["reached"]["1.01"] is None
    assert seed["final_acc"] == records[-1]["test_acc"]


def test_evaluate_reproduces_a_bf16_channels_last_run(tiny_args, tmp_path):
    from finetune.evaluation import evaluate_run

    final = main(load_config(tiny_args + ["train.mixed_precision=bf16", "data.image_size=32",
                                          "train.epochs=1"]))
    assert final["mixed_precision"] == "bf16"
    result = evaluate_run(tmp_path / "run", [])
    # Evaluated as it was trained (bf16 autocast, channels_last): the same numbers, not ones
    # off by bf16's rounding.
    assert result["test_correct"] == final["test_correct"]
    assert result["test_loss"] == pytest.approx(final["test_loss"], rel=1e-6)


def test_compile_failure_is_a_clear_error(tiny_args, monkeypatch, capsys):
    from finetune.cli import main as cli_main

    def broken_compile(self, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        self._compiled_call_impl = fail

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    assert cli_main(["train", *tiny_args, "train.compile=true"]) == 2
    err = capsys.readouterr().err
    assert ("error: train.compile=true: torch.compile failed (RuntimeError: InvalidCxxCompiler: "
            "No working C++ compiler found). On a CPU it needs a C++ compiler (g++)") in err
