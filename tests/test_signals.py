"""SIGINT and SIGTERM stop a run after a checkpoint at the next step, with one line and exit
status 128 + the signal's number; the resumed run is bit-identical to an uninterrupted one,
with one process and with two (where only one of them is signalled, or a real Ctrl-C reaches
the whole process group)."""

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HOOKS, launch_two_cpu_processes, untimed_metrics, write_fake_fmnist

from finetune.checkpoint import list_checkpoints

STEPS = 6  # 96 images, batch 16


def _args(tmp_path: Path) -> list[str]:
    return ["recipe=resnet18_scratch_fmnist", f"data.root={write_fake_fmnist(tmp_path / 'd')}",
            "data.image_size=16", "train.epochs=2", "train.batch_size=16",
            "train.eval_batch_size=20", "train.lr=0.01", "train.mixed_precision=fp32",
            "train.keep_checkpoints=1"]


def _sha256(run: Path) -> str:
    return hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()


def _one_process(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, HOOKS, "train", *args], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1", **env})


def _signalled(name: str, at: int, rank: int = 0) -> dict:
    return {"FT_SIGNAL": name, "FT_SIGNAL_RANK": str(rank), "FT_SIGNAL_AT_STEP": str(at)}


def _check_stopped(err: str, status: int, expected: int, name: str, out: Path) -> str:
    """The one line a stopped run ends with, checked; the checkpoint it names."""
    assert status == expected, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(rf"interrupted \((?:{name}|a signal to another process)\) at epoch "
                         rf"(\d), step (\d) of {STEPS}: checkpoint (\S+) saved; resume with "
                         rf"resume=auto output_dir={re.escape(str(out))}", line)
    assert match, line
    epoch, step, path = int(match[1]), int(match[2]), Path(match[3])
    assert path.name == f"epoch{epoch:04d}-step{step:06d}" == list_checkpoints(out)[-1].name
    return path.name


def test_sigint_then_sigterm_then_resume_is_bit_identical(tmp_path):
    args = _args(tmp_path)
    ref = tmp_path / "ref"
    assert _one_process(args + [f"output_dir={ref}"]).returncode == 0
    out = tmp_path / "run"
    rng = random.Random(28)
    stops = []
    for name, expected in (("INT", 130), ("TERM", 143)):
        at = rng.randint(1, STEPS)  # the 6th step ends an epoch: stopped after its evaluation
        proc = _one_process(args + [f"output_dir={out}", "resume=auto"], **_signalled(name, at))
        stops.append(_check_stopped(proc.stderr, proc.returncode, expected, "SIG" + name, out))
    assert stops[0] != stops[1]  # the second run made progress
    done = _one_process(args + [f"output_dir={out}", "resume=auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert _sha256(out) == _sha256(ref)
    assert untimed_metrics(out) == untimed_metrics(ref)


def test_signal_without_checkpoints_says_so(tmp_path):
    out = tmp_path / "run"
    proc = _one_process(_args(tmp_path) + [f"output_dir={out}", "train.checkpoint=false"],
                        **_signalled("TERM", 2))
    assert proc.returncode == 143 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"interrupted (SIGTERM) at epoch 1, step 2 of 6; no checkpoint (train.checkpoint=false "
        f"saves none); start again output_dir={out}")


@pytest.mark.slow
def test_two_processes_stop_together_and_resume_bit_identical(tmp_path):
    args = _args(tmp_path) + ["train.checkpoint_every=2", "train.epochs=3"]
    ref = tmp_path / "ref"
    launch_two_cpu_processes(HOOKS, "train", *args, f"output_dir={ref}")
    out = tmp_path / "run"
    resumed = [*args, f"output_dir={out}", "resume=auto"]
    # Only rank 1 is signalled, at a random step: rank 0 learns it at the next step's agreement.
    at = random.Random(5).randint(1, STEPS - 1)
    log = launch_two_cpu_processes(HOOKS, "train", *resumed, expect=1,
                                   env=_signalled("TERM", at, rank=1))
    # Each process says where it stopped (torchrun may end one before it has printed, once
    # the other has exited): the same step, after a checkpoint both wrote.
    lines = {x.replace("SIGTERM", "a signal to another process")
             for x in log.splitlines() if x.startswith("interrupted (") and " at epoch " in x}
    step = min(at + 1, STEPS)
    assert len(lines) == 1 and f"step {step} of {STEPS}: checkpoint " in next(iter(lines)), \
        (at, lines, log[-3000:])
    assert list_checkpoints(out)[-1].name.endswith(f"-step{step:06d}")
    # A real Ctrl-C: SIGINT to the launcher and both processes, at a random moment of the
    # training (or before it: then nothing new is saved, and nothing is lost either).
    log_file = tmp_path / "ctrl-c.log"
    with log_file.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "2", HOOKS, "train", *resumed],
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TQDM_DISABLE": "1"})
        seen = {p.name for p in list_checkpoints(out)}
        while proc.poll() is None and not {p.name for p in list_checkpoints(out)} - seen:
            time.sleep(0.05)  # training: a checkpoint (every 2 steps) was written
        time.sleep(random.Random(7).uniform(0.0, 1.0))
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    stopped = [x for x in log_file.read_text().splitlines() if x.startswith("interrupted")]
    saved = [x for x in stopped if re.fullmatch(
        r"interrupted \(SIGINT\) at epoch [123], step \d of 6: checkpoint \S+ saved; resume with "
        r"resume=auto output_dir=\S+", x)]
    assert saved and len(set(saved)) == 1 and len(stopped) <= 2, stopped
    launch_two_cpu_processes(HOOKS, "train", *resumed)
    assert _sha256(out) == _sha256(ref)
    assert untimed_metrics(out) == untimed_metrics(ref)
