"""Checkpoints: Accelerate's state (model, optimizer, scheduler, RNG of every process) plus the
loop's position, written so that a folder under its final name is always complete.

``<output_dir>/checkpoints/epoch0003-step000120/`` means "epoch 3 has done 120 steps"; a
checkpoint taken at an epoch's end has step == steps per epoch. Each is written into a hidden
temporary folder and renamed into place once every process has finished writing; a run killed
mid-write leaves only a temporary folder, which is ignored and later removed.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.errors import ConfigError

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^epoch(\d{4})-step(\d{6})$")


@dataclass
class LoopState:
    """Where the loop stands, per process: the epoch in progress, its steps done, the
    augmentation generator, and the epoch's on-device accumulators so far."""

    epoch: int
    step: int
    gen_state: torch.Tensor
    losses: torch.Tensor  # this process's per-step losses of the epoch so far
    correct: torch.Tensor


def checkpoint_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}-step{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(resume: str, out: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``auto`` the latest in ``out`` (None if there is none),
    else a checkpoint folder's path."""
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path.is_dir() and _NAME.match(path.name) and (path / "loop_0.pt").is_file()):
        raise ConfigError(f"resume={resume} is not a checkpoint folder (expected "
                          f"<output_dir>/{CHECKPOINTS}/epochNNNN-stepNNNNNN); use resume=auto "
                          f"to continue from the latest checkpoint of output_dir.")
    return path


def save_checkpoint(accelerator: Accelerator, out: Path, state: LoopState, keep: int) -> Path:
    """Write a checkpoint atomically; keep the newest ``keep``."""
    final = out / CHECKPOINTS / checkpoint_name(state.epoch, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, scheduler, every process's RNG
    torch.save({"epoch": state.epoch, "step": state.step, "gen_state": state.gen_state,
                "losses": state.losses.cpu(), "correct": state.correct.cpu()},
               tmp / f"loop_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same position written again (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in (out / CHECKPOINTS).glob(".*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> LoopState:
    """Restore Accelerate's state from ``path``; return this process's loop position. A
    checkpoint is resumed by as many processes as wrote it: each restores its own loop position,
    random state and share of the batch."""
    written = len(list(path.glob("loop_*.pt")))
    if written != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {written} process{'es' if written != 1 else ''}"
            f" and cannot be resumed by {accelerator.num_processes}: each process's position, "
            f"random state and share of every batch are its own. Resume with {written} "
            f"(torchrun --nproc_per_node {written}, accelerate launch --num_processes "
            f"{written}).")
    loop_file = path / f"loop_{accelerator.process_index}.pt"
    accelerator.load_state(str(path))
    saved = torch.load(loop_file, weights_only=True)
    return LoopState(saved["epoch"], saved["step"], saved["gen_state"],
                     saved["losses"].to(accelerator.device),
                     saved["correct"].to(accelerator.device))


def restore(resume: str | None, out: Path, accelerator: Accelerator, gen: torch.Generator,
            steps_per_epoch: int) -> LoopState | None:
    """Restore the checkpoint ``resume`` names (model, optimizer, scheduler, RNG, and the
    augmentation generator ``gen``); return this process's loop state, or None when the run
    starts from its beginning."""
    path = find_checkpoint(resume, out) if resume else None
    if path is None:
        if resume:
            accelerator.print(f"resume=auto: no checkpoint in {out}; starting from scratch")
        return None
    state = load_checkpoint(accelerator, path)
    gen.set_state(state.gen_state)
    accelerator.print(f"resumed from {path} (epoch {state.epoch}, {state.step} of "
                      f"{steps_per_epoch} steps done)")
    return state
