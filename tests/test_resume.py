"""Checkpoints and resume: bit-exact continuation (also after SIGKILL), atomic checkpoint
folders, and the refusals around them."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import untimed_metrics, write_photos
from safetensors.torch import load_file

from finetune.checkpoint import list_checkpoints
from finetune.cli import main as cli_main
from finetune.config import ConfigError, load_config
from finetune.train import main


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def tiny_args(tiny_args):
    """conftest's tiny run, with checkpoints on (the default) again."""
    return tiny_args + ["train.checkpoint=true"]


@pytest.fixture
def ckpt_args(tiny_args):
    return tiny_args + ["train.epochs=2", "train.checkpoint_every=2", "train.keep_checkpoints=10",
                        "train.mixed_precision=fp32"]


def test_resume_from_mid_epoch_checkpoint_is_exact(ckpt_args, tmp_path):
    out = tmp_path / "run"
    main(load_config(ckpt_args))
    names = [p.name for p in list_checkpoints(out)]
    # Every 2 of 6 steps, and each epoch's end (step 6).
    assert names == ["epoch0001-step000002", "epoch0001-step000004", "epoch0001-step000006",
                     "epoch0002-step000002", "epoch0002-step000004", "epoch0002-step000006"]
    weights = load_file(out / "model.safetensors")
    metrics = untimed_metrics(out)
    for name in ("epoch0001-step000004", "epoch0002-step000002", "epoch0001-step000006"):
        main(load_config(ckpt_args + [f"resume={out / 'checkpoints' / name}",
                                      "output_dir=null"]))
        again = load_file(out / "model.safetensors")
        assert all(torch.equal(weights[k], again[k]) for k in weights), name
        assert untimed_metrics(out) == metrics, name


def test_an_epoch_of_repeats_resumes_mid_epoch_exactly(ckpt_args, tmp_path):
    out, args = tmp_path / "run", [*ckpt_args, "data.epoch_repeats=1.5", "train.epochs=1"]
    main(load_config(args))  # 9 steps of the training images' permutation and a half
    assert [p.name for p in list_checkpoints(out)][-1] == "epoch0001-step000009"
    weights, metrics = load_file(out / "model.safetensors"), untimed_metrics(out)
    main(load_config(args + [f"resume={out / 'checkpoints' / 'epoch0001-step000008'}",
                             "output_dir=null"]))
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert untimed_metrics(out) == metrics


def test_keeps_the_newest_checkpoints(tiny_args, tmp_path):
    main(load_config(tiny_args + ["train.epochs=2", "train.checkpoint_every=1",
                                  "train.keep_checkpoints=3"]))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "epoch0002-step000004", "epoch0002-step000005", "epoch0002-step000006"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no temporary folders


def test_existing_run_refused_with_resume_hint(tiny_args, tmp_path):
    main(load_config(tiny_args + ["train.epochs=1"]))
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, model.safetensors"
                                          r", checkpoints\); continue it with resume=auto"):
        main(load_config(tiny_args + ["train.epochs=1"]))


def test_resume_refuses_another_config(tiny_args, tmp_path):
    main(load_config(tiny_args + ["train.epochs=1"]))
    with pytest.raises(ConfigError, match=r"different config: train.epochs=3 \(was 1\), "
                                          r"train.lr=0.5 \(was 0.01\)"):
        main(load_config(tiny_args + ["train.epochs=3", "train.lr=0.5", "resume=auto"]))


def test_resume_auto_needs_output_dir_and_starts_fresh_without_checkpoint(tiny_args, tmp_path):
    args = [a for a in tiny_args if not a.startswith("output_dir=")]
    with pytest.raises(ConfigError, match="resume=auto needs output_dir=PATH"):
        main(load_config(args + ["resume=auto"]))
    fresh = main(load_config(tiny_args + ["train.epochs=1", "resume=auto"]))
    assert fresh["epoch"] == 1 and (tmp_path / "run" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        main(load_config(tiny_args + [f"resume={tmp_path}"]))


def test_nan_keeps_the_last_good_checkpoint(tiny_args, tmp_path, capsys):
    code = cli_main(["train", *tiny_args, "train.lr=1e12", "train.schedule=constant",
                     "train.epochs=1", "train.checkpoint_every=1"])
    err = capsys.readouterr().err
    assert code == 2 and "The last good checkpoint is" in err, err
    named = Path(err.split("The last good checkpoint is ")[1].split(".")[0].strip())
    kept = list_checkpoints(tmp_path / "run")
    assert kept and kept[-1] == named
    state = torch.load(named / "loop_0.pt", weights_only=True)
    assert torch.isfinite(state["losses"]).all() and len(state["losses"]) == state["step"]
    assert not (tmp_path / "run" / "model.safetensors").exists()


# Runs `finetune train` and, with KILL_AT_CHECKPOINT=k, kills itself with SIGKILL at the k-th
# checkpoint's final rename: every file of the checkpoint written, the folder not yet in place.
_WRAPPER = """
import os, signal, sys
kill_at = int(os.environ.get("KILL_AT_CHECKPOINT", "0"))
real_replace, calls = os.replace, [0]
def replace(src, dst):
    if os.path.basename(str(src)).startswith(".epoch"):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from finetune.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _start(args: list[str], kill_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "KILL_AT_CHECKPOINT": str(kill_at), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_new_checkpoint(out: Path, seen: set, proc: subprocess.Popen) -> bool:
    """Wait until ``proc`` has completed a checkpoint not in ``seen``; False if it ended."""
    while proc.poll() is None:
        if {p.name for p in list_checkpoints(out)} - seen:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path):
    """On the streaming path (the resident path's resume: the mid-epoch and 2-process kill
    tests): 40 training JPEGs and PNGs decoded by 2 persistent workers, 5 steps per epoch."""
    source = [f"data.root={write_photos(tmp_path / 'photos', per_class=5)}",
              "data.placement=stream", "data.workers=2", "data.hflip=true",
              "data.auto_augment=trivial", "data.random_erasing=0.5"]
    args = ["recipe=resnet18_scratch_fmnist", *source, "data.image_size=16",
            "train.epochs=3", "train.batch_size=8", "train.eval_batch_size=20", "train.lr=0.01",
            "train.checkpoint_every=1", "train.mixed_precision=fp32"]
    ref = tmp_path / "ref"
    proc = _start(args + [f"output_dir={ref}"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    out = tmp_path / "run"
    resumed = args + [f"output_dir={out}", "resume=auto"]
    # 1. Killed during a checkpoint write: the half-made checkpoint is not taken for one.
    proc = _start(resumed, kill_at=3)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["epoch0001-step000001",
                                                       "epoch0001-step000002"]
    assert [p.name for p in (out / "checkpoints").glob(".*.tmp")] == [
        ".epoch0001-step000003.tmp"]
    # 2. Killed at five random moments (seeded): each run resumes the last, makes progress
    # (a new checkpoint), then dies mid-step or mid-write up to two steps later.
    rng = random.Random(0)
    for _ in range(5):
        seen = {p.name for p in list_checkpoints(out)}
        proc = _start(resumed)
        assert _wait_for_new_checkpoint(out, seen, proc), "the run ended before a kill"
        time.sleep(rng.uniform(0.0, 0.6))
        assert proc.poll() is None, "the run ended before a kill"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    # 3. Resumed to the end.
    proc = _start(resumed)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert _same_weights(ref, out)
    assert untimed_metrics(ref) == untimed_metrics(out)
