"""train.mixed_precision=auto on a CPU: timed, the faster chosen, cached; and the convolution
that leaves out the taps which only see padding."""

import json
import logging

import pytest
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState

from finetune import evaluation, precision
from finetune.config import load_config
from finetune.errors import ConfigError
from finetune.evaluation import evaluate_run
from finetune.models import create_model
from finetune.runs import read_metrics
from finetune.train import main

SHAPE = (8, 1, 28, 28)


@pytest.fixture
def auto_cpu(monkeypatch, tmp_path):
    """auto as on a CPU with bf16 arithmetic, measuring (conftest fixes it to fp32 for the
    other tests), with its own cache."""
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    return PartialState(cpu=True)


def stub_timings(monkeypatch, fp32: float, bf16: float) -> list:
    calls = []

    def measure(model, shape, memory_format):
        calls.append(shape)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(precision, "measure", measure)
    return calls


def choose(state, model, shape=SHAPE) -> str:
    return precision.choose_precision("auto", state, model, shape, torch.contiguous_format,
                                      "resnet18")


def test_auto_picks_the_faster_and_caches_it(auto_cpu, monkeypatch, caplog):
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    calls = stub_timings(monkeypatch, fp32=0.4, bf16=0.1)
    with caplog.at_level(logging.INFO, logger="finetune.precision"):
        assert choose(auto_cpu, model) == "bf16"
    assert calls == [SHAPE]
    # The log names the choice and both timings (8 images / 0.4 s and / 0.1 s).
    assert "mixed precision auto: bf16" in caplog.text
    assert "fp32 20 img/s, bf16 80 img/s" in caplog.text and "timed now" in caplog.text
    cache = json.loads(precision.cache_file().read_text())
    (key, entry), = cache.items()
    assert "8x1x28x28" in key and "resnet18" in key and precision.cpu_description() in key
    assert entry["precision"] == "bf16" and entry["fp32_images_per_sec"] == 20.0

    # Cached: the same machine, model and batch shape is not timed again, even if it would
    # now come out the other way.
    calls = stub_timings(monkeypatch, fp32=0.1, bf16=0.4)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune.precision"):
        assert choose(auto_cpu, model) == "bf16"
    assert calls == [] and "cached in" in caplog.text
    # Another batch shape is timed, and here fp32 is faster.
    assert choose(auto_cpu, model, (16, 1, 28, 28)) == "fp32"
    assert calls == [(16, 1, 28, 28)]
    assert len(json.loads(precision.cache_file().read_text())) == 2


def test_auto_without_measuring(auto_cpu, monkeypatch, caplog):
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    calls = stub_timings(monkeypatch, fp32=0.4, bf16=0.1)
    # A forced precision is obeyed, and so is the launcher's.
    assert precision.choose_precision("fp32", auto_cpu, model, SHAPE, torch.contiguous_format,
                                      "resnet18") == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_...
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    assert choose(auto_cpu, model) == "bf16"  # even where it is slow: the user asked
    assert calls == []
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the launcher's default
    assert choose(auto_cpu, model) == "bf16"  # timed
    calls.clear()
    precision.cache_file().unlink()
    monkeypatch.setenv(precision.FORCE_ENV, "fp32")
    assert choose(auto_cpu, model) == "fp32"
    monkeypatch.setenv(precision.FORCE_ENV, "fp16")
    with pytest.raises(ConfigError, match="FINETUNE_CPU_PRECISION=fp16: use one of fp32, bf16"):
        choose(auto_cpu, model)
    monkeypatch.delenv(precision.FORCE_ENV)
    # No bf16 arithmetic: fp32 untimed. A model where oneDNN's bf16 gradient is wrong: too.
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    assert choose(auto_cpu, model) == "fp32"
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: True)
    with caplog.at_level(logging.INFO, logger="finetune.precision"):
        assert choose(auto_cpu, model, (8, 1, 16, 16)) == "fp32"
    assert "layer4.0.conv1" in caplog.text
    assert calls == [] and not precision.cache_file().exists()


def test_measure_leaves_the_model_and_random_state_alone():
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    timings = precision.measure(model, (4, 1, 28, 28), torch.channels_last, rounds=1)
    assert set(timings) == {"fp32", "bf16"} and all(t > 0 for t in timings.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_run_trains_and_evaluates_in_the_precision_auto_chose(auto_cpu, tiny_args, tmp_path,
                                                                 monkeypatch):
    stub_timings(monkeypatch, fp32=0.4, bf16=0.1)
    # 32 px: at 16 the ResNet's strided convolutions see 1x1 maps, where bf16 is refused.
    args = tiny_args + ["data.image_size=32", "train.epochs=1"]
    result = main(load_config(args))
    records = read_metrics(tmp_path / "run")
    assert [r["mixed_precision"] for r in records] == ["bf16"]
    # finetune evaluate runs in the precision the run trained in: the same accuracy exactly.
    AcceleratorState._reset_state(reset_partial_state=True)
    stub_timings(monkeypatch, fp32=0.1, bf16=0.4)  # would choose fp32 now: not asked
    made = []
    real = evaluation.make_accelerator
    monkeypatch.setattr(evaluation, "make_accelerator", lambda p: made.append(p) or real(p))
    assert evaluate_run(tmp_path / "run", [])["test_acc"] == result["test_acc"]
    # A precision given on the command line wins over the recorded one.
    AcceleratorState._reset_state(reset_partial_state=True)
    evaluate_run(tmp_path / "run", ["train.mixed_precision=fp32"])
    assert made == ["bf16", "fp32"]


def test_auto_falls_back_to_fp32_when_timing_fails(auto_cpu, monkeypatch, caplog):
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)

    def fails(model, shape, memory_format):
        raise ValueError("Expected more than 1 value per channel when training")

    monkeypatch.setattr(precision, "measure", fails)
    with caplog.at_level(logging.WARNING, logger="finetune.precision"):
        assert choose(auto_cpu, model) == "fp32"
    assert "timing a training step failed: ValueError" in caplog.text
    assert not precision.cache_file().exists()  # tried again next time
    # A damaged cache entry is measured again, not trusted.
    stub_timings(monkeypatch, fp32=0.4, bf16=0.1)
    precision.cache_file().parent.mkdir(parents=True)
    precision.cache_file().write_text(json.dumps({"x": 1}))
    assert choose(auto_cpu, model) == "bf16"
    key = next(k for k in json.loads(precision.cache_file().read_text()) if k != "x")
    precision.cache_file().write_text(json.dumps({key: {"precision": "fp16"}}))
    stub_timings(monkeypatch, fp32=0.1, bf16=0.4)
    assert choose(auto_cpu, model) == "fp32"


@pytest.mark.parametrize("speeds", [("fast", "slow"), (None, 10.0), (float("nan"), 5.0),
                                    (-1.0, 5.0), (True, 5.0)])
def test_a_cache_entry_with_bad_speeds_is_measured_again(auto_cpu, monkeypatch, caplog, speeds):
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    stub_timings(monkeypatch, fp32=0.4, bf16=0.1)
    assert choose(auto_cpu, model) == "bf16"
    key = next(iter(json.loads(precision.cache_file().read_text())))
    precision.cache_file().write_text(json.dumps({key: {
        "precision": "fp32", "fp32_images_per_sec": speeds[0], "bf16_images_per_sec": speeds[1]}}))
    with caplog.at_level(logging.INFO, logger="finetune.precision"):
        assert choose(auto_cpu, model) == "bf16"  # measured again, not read
    assert "timed now" in caplog.text
