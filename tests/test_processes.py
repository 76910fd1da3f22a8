"""Several processes for real: two CPU processes (gloo) under torchrun, every one checked to
have run (conftest.launch_two_cpu_processes asserts ranks {0, 1} of a world of 2)."""

import pytest
import torch
from conftest import HOOKS, launch_two_cpu_processes, untimed_metrics
from safetensors.torch import load_file

from finetune.config import ConfigError, load_config
from finetune.data.loader import train_batches
from finetune.processes import check_world_size, requested_processes
from finetune.train import main

# Batch norm on running statistics and no random augmentation: a sample's gradient does not
# depend on which process holds its batch-mates, so 2 processes x 8 images must take the step
# of 1 process x 16 (DDP averages the two halves' gradients: the mean over 16).
SAME_STEP = ["finetune.bn=freeze_stats", "data.hflip=false", "train.mixed_precision=fp32"]


def _weights(run):
    return load_file(run / "model.safetensors")


@pytest.mark.slow
def test_two_processes_shard_each_global_batch_and_checkpoint_per_rank(tiny_args, tmp_path):
    record = tmp_path / "batches"
    record.mkdir()
    out = launch_two_cpu_processes(HOOKS, "train", *tiny_args, "train.epochs=1",
                                   "train.checkpoint=true",
                                   env={"FT_RECORD_BATCHES": str(record)})
    assert "test accuracy" in out
    (epoch0,), (epoch1,) = (torch.load(record / f"rank{r}.pt") for r in (0, 1))
    single = list(train_batches(96, 16, epoch=1, seed=0, rank=0, world_size=1,
                                device=torch.device("cpu")))
    assert len(epoch0) == len(epoch1) == len(single) == 6
    for mine, theirs, whole in zip(epoch0, epoch1, single, strict=True):
        assert len(mine) == len(theirs) == 8 and not set(mine.tolist()) & set(theirs.tolist())
        assert sorted(mine.tolist() + theirs.tolist()) == sorted(whole.tolist())
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    names = {p.name for p in ckpt.iterdir()}
    assert {"loop_0.pt", "loop_1.pt", "random_states_0.pkl", "random_states_1.pkl"} <= names
    # Each process kept its own augmentation generator (seeded with its rank).
    states = [torch.load(ckpt / f"loop_{r}.pt", weights_only=True)["gen_state"] for r in (0, 1)]
    assert not torch.equal(*states)
    # Resumed by another number of processes: refused, naming the count that wrote it.
    with pytest.raises(ConfigError, match="written by 2 processes and cannot be resumed by 1"):
        main(load_config(tiny_args + ["train.epochs=1", "train.checkpoint=true",
                                      "resume=auto"]))


@pytest.mark.slow
def test_two_processes_take_the_one_process_step(tiny_args, tmp_path):
    args = [a for a in tiny_args if not a.startswith("output_dir=")] + SAME_STEP
    one, two = tmp_path / "one", tmp_path / "two"
    main(load_config(args + [f"output_dir={one}"]))
    launch_two_cpu_processes("-m", "finetune.run", *args, f"output_dir={two}")
    w1, w2 = _weights(one), _weights(two)
    for key in w1:  # equal up to the order of floating-point sums
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
    m1, m2 = untimed_metrics(one), untimed_metrics(two)
    for r1, r2 in zip(m1, m2, strict=True):
        assert r2["batch_loss"] == pytest.approx(r1["batch_loss"], rel=1e-4, abs=1e-5)
        assert r2["test_total"] == r1["test_total"] == 53
    # ... and differently from a 1-process run on half the batch (the test can tell).
    half = tmp_path / "half"
    main(load_config(args + [f"output_dir={half}", "train.batch_size=8"]))
    assert any(not torch.allclose(_weights(half)[k], w1[k], rtol=1e-4, atol=1e-5) for k in w1)


@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume_is_bit_exact_with_every_strategy(tiny_args, tmp_path):
    """Rank 1 killed mid-epoch; torchrun ends rank 0; resume=auto with 2 processes gives the
    uninterrupted 2-process run's weights and metrics bit for bit: with gradual unfreezing,
    frozen batch-norm statistics, Mixup, EMA and early stopping's validation split on."""
    args = [a for a in tiny_args if not a.startswith("output_dir=")] + [
        "finetune.freeze=stages:3", "finetune.unfreeze_at=[2]", "finetune.bn=freeze_stats",
        "data.mixup=0.4", "train.ema_decay=0.9", "data.val_split=0.2",
        "train.early_stopping=5", "train.epochs=3", "train.checkpoint=true",
        "train.checkpoint_every=2", "train.keep_checkpoints=10",
        "train.mixed_precision=fp32"]  # 76 training images: 4 steps per epoch
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch_two_cpu_processes(HOOKS, "train", *args, f"output_dir={ref}")
    # Step 7 of rank 1: epoch 2, after the epoch-1 and epoch-2 step-2 checkpoints.
    out = launch_two_cpu_processes(HOOKS, "train", *args, f"output_dir={run}",
                                   env={"FT_KILL_RANK": "1", "FT_KILL_AT_STEP": "7"}, expect=1)
    assert "Signals.SIGKILL" in out or "SIGKILL" in out
    assert not (run / "model.safetensors").exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept[-1] == "epoch0002-step000002", kept
    launch_two_cpu_processes(HOOKS, "train", *args, f"output_dir={run}", "resume=auto")
    for d in (".", "ema"):
        a, b = load_file(ref / d / "model.safetensors"), load_file(run / d / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), d
    assert untimed_metrics(ref) == untimed_metrics(run)
    assert {"val_acc", "ema_test_acc"} <= set(untimed_metrics(run)[-1])


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused(tiny_args, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (Accelerate 1.15): the
    run stops naming the launcher setting instead of training alone."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", "-m", "finetune.run", *tiny_args,
                           "train.epochs=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("error: the launcher asked for 2 processes (accelerate launch --num_processes 2) "
            "but this run has 1") in proc.stderr
    assert "torchrun --standalone --nproc_per_node 2 -m finetune.run" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


class _Accelerator:
    num_processes = 1


def test_fewer_processes_than_world_size_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert requested_processes() == (4, "WORLD_SIZE=4")
    with pytest.raises(ConfigError, match=r"asked for 4 processes \(WORLD_SIZE=4\) but this "
                                          r"run has 1"):
        check_world_size(_Accelerator())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world_size(_Accelerator())


@pytest.mark.parametrize("argv, expected", [
    (["/v/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"], 2),
    (["/v/bin/accelerate", "launch", "--num-processes=3", "-m", "finetune.run"], 3),
    (["/usr/bin/python", "-m", "accelerate.commands.launch", "--num_processes", "2"], 2),
    (["/v/bin/accelerate", "launch", "--cpu", "-m", "finetune.run"], 1),
    (["/home/u/accelerate-exp/bin/python", "-m", "ipykernel_launcher", "launch"], 1),
    (["bash", "launch_accelerate.sh", "--num_processes", "8"], 1),
])
def test_what_accelerate_launch_asked_for(monkeypatch, argv, expected):
    import finetune.processes as processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setattr(processes, "_launcher_args", lambda pid: processes.launch_args(argv))
    assert requested_processes()[0] == expected
    # Not started by accelerate's one-process launcher: nothing read from the parent.
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert requested_processes() == (1, "no launcher")


@pytest.mark.slow
def test_lr_find_and_compare_run_on_two_processes(tiny_args, tmp_path):
    import json

    args = [a for a in tiny_args if not a.startswith("output_dir=")]
    launch_two_cpu_processes("-m", "finetune", "lr-find", *args, f"output_dir={tmp_path / 'lr'}",
                             "start_lr=1e-4", "end_lr=1", "steps=8")
    result = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert len(result["lr"]) == len(result["loss"]) <= 8
    # compare's runs through the launcher: each a 2-process finetune train.
    import sys

    from finetune.cli import main as cli_main

    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    assert cli_main(["compare", *args, "seeds=1", "train.epochs=1", f"output_dir={tmp_path / 'c'}",
                     f"launcher={launcher}"]) == 0
    log = (tmp_path / "c" / "resnet18_scratch_fmnist" / "seed0" / "train.log").read_text()
    assert "process 0 of 2" in log and "process 1 of 2" in log


@pytest.mark.slow
def test_two_machines_launch(tiny_args, tmp_path):
    """A multi-node launch, two "machines" of one process each on this one (torchrun's c10d
    rendezvous on localhost): one group of two, each process the first on its machine."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "ft",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "finetune.run", *tiny_args,
         "train.epochs=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert "process 0 of 2 (local 0)" in outs[0] and "process 1 of 2 (local 0)" in outs[1]
    assert "test accuracy" in outs[0]
