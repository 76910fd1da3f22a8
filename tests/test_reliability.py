"""Reliability: checkpoints that never run code and fall back when damaged, run folders that
change as a whole (overwrite, two runs at once, resume without its config), and write errors
that end as one line with nothing partial left."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import untimed_metrics, write_fake_fmnist
from safetensors.torch import load_file

from finetune.checkpoint import MANIFEST, _seal, list_checkpoints
from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.train import main


class Payload:
    """Unpickled, it leaves a marker file: proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A finished 2-epoch run with two checkpoints kept (epoch 2 at steps 3 and 6), EMA on,
    and its uninterrupted metrics and weights."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_fake_fmnist(root / "fmnist")
    args = ["recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=16",
            "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=20",
            "train.mixed_precision=fp32", "train.checkpoint_every=3", "train.ema_decay=0.9",
            f"output_dir={root / 'run'}"]
    main(load_config(args))
    return args, root / "run"


def _copy(checkpointed, tmp_path) -> tuple[list[str], Path]:
    args, run = checkpointed
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "model.safetensors").unlink()  # made again by the resumed run
    return [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={out}"], out


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                  "loop_0.pt", "scheduler.json", "ema.safetensors", MANIFEST,
                                  "custom_checkpoint_0.pkl"])
def test_a_planted_payload_never_runs_and_the_checkpoint_before_is_taken(
        checkpointed, tmp_path, capsys, name):
    args, out = _copy(checkpointed, tmp_path)
    newest = list_checkpoints(out)[-1]
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, newest / name)  # replaces it, or adds it
    assert cli_main(["train", *args, "resume=auto"]) == 0
    assert not marker.exists()
    text = capsys.readouterr().out
    assert f"warning: checkpoint {newest}" in text and "trying the checkpoint before it" in text
    assert "resumed from" in text and "epoch0002-step000003" in text
    # ... and the run ends as the uninterrupted one did.
    assert untimed_metrics(out) == untimed_metrics(checkpointed[1])
    a, b = load_file(out / "model.safetensors"), load_file(checkpointed[1] / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["optimizer.bin", "loop_0.pt", "random_states_0.pkl"])
def test_a_payload_under_a_rewritten_manifest_is_refused_by_the_loader(
        checkpointed, tmp_path, capsys, name):
    """An attacker who also recomputes the manifest: every file is still read weights_only."""
    args, out = _copy(checkpointed, tmp_path)
    newest = list_checkpoints(out)[-1]
    marker = tmp_path / "pwned"
    with open(newest / name, "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)
    (newest / MANIFEST).unlink()
    _seal(newest, 1)
    assert cli_main(["train", *args, f"resume={newest}"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.splitlines()[-1] == (f"error: checkpoint {newest} cannot be restored: a file "
                                    f"holds pickled objects that are not plain tensors "
                                    f"(refused, nothing of it ran)")
    assert "Traceback" not in err


def test_a_damaged_checkpoint_named_explicitly_is_refused_with_its_file(
        checkpointed, tmp_path, capsys):
    args, out = _copy(checkpointed, tmp_path)
    newest = list_checkpoints(out)[-1]
    (newest / "optimizer.bin").unlink()
    assert cli_main(["train", *args, f"resume={newest}"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: checkpoint {newest} is missing optimizer.bin"
    for ckpt in list_checkpoints(out):
        (ckpt / "loop_0.pt").write_bytes(b"garbage")
    assert cli_main(["train", *args, "resume=auto"]) == 2
    err = capsys.readouterr().err
    assert "error: no checkpoint in" in err and "can be resumed" in err


def test_resume_without_the_runs_config_is_refused(checkpointed, tmp_path, capsys):
    args, out = _copy(checkpointed, tmp_path)
    (out / "config.yaml").unlink()
    assert cli_main(["train", *args, "resume=auto", "train.lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "its config.yaml is missing" in err
    assert not (out / "config.yaml").exists()


# --- the run folder as a whole ---------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def test_overwrite_whose_new_run_fails_keeps_the_old_run(tiny_args, tmp_path, capsys):
    main(load_config(tiny_args + ["train.epochs=1", "train.checkpoint=true"]))
    run = tmp_path / "run"
    (run / "evaluation.json").write_text("{}")
    before = _snapshot(run)
    code = cli_main(["train", *tiny_args, "train.epochs=1", "overwrite=true", "train.lr=1e12",
                     "train.schedule=constant"])
    assert code == 2 and "the training loss became" in capsys.readouterr().err
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_overwrite_replaces_the_old_run_with_everything_derived_from_it(tiny_args, tmp_path):
    main(load_config(tiny_args + ["train.epochs=1"]))
    run = tmp_path / "run"
    (run / "evaluation.json").write_text("{}")
    (run / "confusion.png").write_bytes(b"old")
    main(load_config(tiny_args + ["train.epochs=2", "overwrite=true"]))
    assert sorted(p.name for p in run.iterdir()) == ["README.md", "config.json", "config.yaml",
                                                     "metrics.jsonl", "model.json",
                                                     "model.safetensors"]
    assert len(untimed_metrics(run)) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_second_run_into_a_busy_folder_is_refused_with_the_holders_pid(tiny_args, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "finetune", "train", *tiny_args,
                              "train.epochs=6"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / ".lock").is_file() or not (run / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "finetune", "train", *tiny_args,
                             "train.epochs=1", "train.seed=1"], capture_output=True, text=True)
    assert second.returncode == 2
    assert (f"error: output_dir {run} is in use by another finetune run (pid {first.pid})"
            in second.stderr)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert load_config([f"recipe={run / 'config.yaml'}"]).train.seed == 0
    assert len(untimed_metrics(run)) == 6 and not (run / ".lock").exists()


@pytest.mark.parametrize("where", ["file", "below"])
def test_output_dir_in_the_way_of_a_file_fails_before_the_data(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "run"
    code = cli_main(["train", f"data.root={tmp_path / 'no-data'}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1] == (
        f"error: output_dir {out}: a file is in the way of a folder on the path; pass "
        f"another output_dir=PATH.")
    assert "data idx" not in err  # refused before the data
    assert blocker.read_text() == "x"


# --- write errors ----------------------------------------------------------------------------

ENOSPC = OSError(28, "No space left on device")
SAFETENSORS_FULL = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: '
                                'StorageFull, message: "No space left on device" })')
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                          "failed writing file data/0: file write failed")


def _fail(error):
    def write(*args, **kwargs):
        raise error
    return write


@pytest.mark.parametrize("site, target, error", [
    ("checkpoint", "torch.save", TORCH_FULL),
    ("checkpoint", "finetune.checkpoint.save_file", SAFETENSORS_FULL),
    ("export", "finetune.export.save_file", SAFETENSORS_FULL),
    ("metrics", "finetune.runs.atomic_write_text", ENOSPC),
])
def test_a_full_disk_at_each_write_site_is_one_line(tiny_args, tmp_path, capsys, monkeypatch,
                                                     site, target, error):
    monkeypatch.setattr(target, _fail(error))
    extra = ["train.checkpoint=true", "train.ema_decay=0.9"] if site == "checkpoint" else []
    assert cli_main(["train", *tiny_args, "train.epochs=1", *extra]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: could not write ") and "Traceback" not in err, err
    assert "no space left on the device" in last or "the write failed" in last
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_full_disk_while_writing_a_report_is_one_line(tiny_args, tmp_path, capsys,
                                                        monkeypatch):
    main(load_config(tiny_args + ["train.epochs=1"]))
    monkeypatch.setattr("finetune.plots.atomic_write", _fail(ENOSPC))
    assert cli_main(["report", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: could not write ") and "no space left" in last


def test_a_real_full_disk(tiny_args, tmp_path, capsys):
    """A 40 MB tmpfs: the first checkpoint (~90 MB with the optimizer) does not fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = [a for a in tiny_args if not a.startswith("output_dir=")]
        code = cli_main(["train", *args, "train.epochs=1", "train.checkpoint=true",
                         f"output_dir={mnt / 'run'}"])
        err = capsys.readouterr().err
        assert code == 2 and err.splitlines()[-1].startswith("error: could not write "), err
        assert "Traceback" not in err
        assert not list(mnt.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_file_size_limit_is_one_line(tiny_args, tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE) below the size of a checkpoint: EFBIG, not a traceback."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    proc = subprocess.run([sys.executable, "-m", "finetune", "train", *tiny_args,
                           "train.epochs=1", "train.checkpoint=true"], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: could not write ")
    assert "file too large" in errors[0] or "the write failed" in errors[0]
    assert not list(tmp_path.rglob("*.tmp"))


def test_export_onnx_out_below_a_file_is_one_line(tiny_args, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    main(load_config(tiny_args + ["train.epochs=1"]))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    assert cli_main(["export-onnx", str(tmp_path / "run"), "--out",
                     str(blocker / "model.onnx")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (f"error: could not write {blocker / 'model.onnx'}: a file is in the way of a "
                    f"folder on the path. Free space or write elsewhere (output_dir=PATH); "
                    f"nothing partially written was kept.")


def test_a_killed_runs_forked_workers_do_not_keep_its_folder_locked(tmp_path):
    """SIGKILL reaches the run, not its DataLoader workers (they notice seconds later): they
    must not hold the folder's lock, or an immediate resume is refused as a concurrent run."""
    code = ("import os, signal, sys, time\n"
            "from pathlib import Path\n"
            "from finetune.runs import _lock\n"
            "_lock(Path(sys.argv[1]))\n"
            "if os.fork() == 0:\n"
            "    time.sleep(30)\n"
            "    os._exit(0)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    from finetune.runs import _lock

    os.close(_lock(tmp_path))  # the sleeping child has closed its copy: free at once
