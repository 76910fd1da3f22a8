"""Checkpoints: Accelerate's state (model, optimizer, every process's RNG), the schedule, the
weight average and every process's loop position, written so that a folder under its final
name is always complete, and read without running anything a file could smuggle in.

``<output_dir>/checkpoints/epoch0003-step000120/`` means "epoch 3 has done 120 steps"; a
checkpoint taken at an epoch's end has step == steps per epoch. Each is written into a hidden
temporary folder, sealed with ``manifest.json`` (the process count and the SHA-256 of every
file) and renamed into place once every process has finished writing; a run killed mid-write
leaves only a temporary folder, which is ignored and later removed.

Nothing is unpickled with code execution: the schedule is JSON, the weight average
safetensors, and Accelerate's files and the loop positions are read with
``torch.load(weights_only=True)``, after the manifest has vouched for every byte.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils.other import load as accelerate_load
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError, ConfigError, TrainingError, first_line
from finetune.files import output_error, sha256_file

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
SCHEDULER = "scheduler.json"
EMA_WEIGHTS = "ema.safetensors"
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
    """Checkpoints in ``out`` under their final names (not yet verified), oldest first."""
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
    if not (path.is_dir() and _NAME.match(path.name)):
        raise ConfigError(f"resume={resume} is not a checkpoint folder (expected "
                          f"<output_dir>/{CHECKPOINTS}/epochNNNN-stepNNNNNN); use resume=auto "
                          f"to continue from the latest checkpoint of output_dir.")
    return path


def _seal(folder: Path, processes: int) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    manifest = {"processes": processes,
                "files": {str(p.relative_to(folder)): sha256_file(p) for p in files}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def verify(path: Path) -> dict:
    """The checkpoint's manifest, once every file it lists is there unchanged and nothing else
    is; a :class:`CheckpointError` naming what is wrong otherwise."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, processes = manifest["files"], int(manifest["processes"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete, or was "
                              f"written by an older finetune") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged ({e})") from None
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    changed = [name for name, digest in sorted(files.items())
               if not missing and sha256_file(path / name) != digest]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {missing[0]}")
    if extra:
        raise CheckpointError(f"checkpoint {path} holds {extra[0]}, which it was not written "
                              f"with")
    if changed:
        raise CheckpointError(f"checkpoint {path}: {changed[0]} changed since it was written")
    return {"processes": processes, "files": files}


def save_checkpoint(accelerator: Accelerator, out: Path, state: LoopState, keep: int,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ema: ModelEmaV3 | None
                    ) -> Path:
    """Write a checkpoint atomically; keep the newest ``keep``. A failed write (a full disk)
    leaves no temporary folder behind."""
    final = out / CHECKPOINTS / checkpoint_name(state.epoch, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, every process's RNG
        torch.save({"epoch": state.epoch, "step": state.step, "gen_state": state.gen_state,
                    "losses": state.losses.cpu(), "correct": state.correct.cpu()},
                   tmp / f"loop_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            (tmp / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()},
                          str(tmp / EMA_WEIGHTS))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _seal(tmp, accelerator.num_processes)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = output_error(final, e)
        if error is not None:
            raise error from None
        raise
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


def load_checkpoint(accelerator: Accelerator, path: Path,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, ema: ModelEmaV3 | None
                    ) -> LoopState:
    """Verify the checkpoint, restore what it holds; return this process's loop position. A
    checkpoint is resumed by as many processes as wrote it: each restores its own loop position,
    random state and share of the batch."""
    written = verify(path)["processes"]
    if written != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {written} process{'es' if written != 1 else ''}"
            f" and cannot be resumed by {accelerator.num_processes}: each process's position, "
            f"random state and share of every batch are its own. Resume with {written} "
            f"(torchrun --nproc_per_node {written}, accelerate launch --num_processes "
            f"{written}).")
    if (ema is not None) != (path / EMA_WEIGHTS).is_file():
        raise ConfigError(f"checkpoint {path} {'lacks' if ema else 'holds'} a weight average; "
                          f"resume it with the train.ema_decay it was written with.")
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        # Accelerate only logs a random state it cannot read; an exact resume needs it.
        accelerate_load(rng)
        accelerator.load_state(str(path))  # weights_only loading, every file
        scheduler.load_state_dict(json.loads((path / SCHEDULER).read_text()))
        if ema is not None:
            ema.module.load_state_dict(load_file(path / EMA_WEIGHTS))  # copied to its device
        saved = torch.load(path / f"loop_{accelerator.process_index}.pt", weights_only=True)
    except torch.OutOfMemoryError:
        raise  # the device is full, the checkpoint is fine
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path} cannot be restored: a file holds pickled "
                              f"objects that are not plain tensors (refused, nothing of it ran)"
                              ) from None
    except Exception as e:  # whatever a loader raises on bytes it cannot read
        raise CheckpointError(f"checkpoint {path} cannot be restored "
                              f"({type(e).__name__}: {first_line(e)[:200]})") from None
    return LoopState(saved["epoch"], saved["step"], saved["gen_state"],
                     saved["losses"].to(accelerator.device),
                     saved["correct"].to(accelerator.device))


def starting_point(state: LoopState | None, steps_per_epoch: int
                   ) -> tuple[int, LoopState | None]:
    """The epoch to start at and the loop state inside it (None: from its first step):
    epoch 1, or where the restored ``state`` left off."""
    if state is None:
        return 1, None
    return (state.epoch + 1, None) if state.step >= steps_per_epoch else (state.epoch, state)


def restore(resume: str | None, out: Path, accelerator: Accelerator, gen: torch.Generator,
            steps_per_epoch: int, scheduler: torch.optim.lr_scheduler.LRScheduler,
            ema: ModelEmaV3 | None) -> LoopState | None:
    """Restore the checkpoint ``resume`` names (model, optimizer, schedule, weight average,
    RNG, and the augmentation generator ``gen``); return this process's loop state, or None
    when the run starts from its beginning. With ``resume=auto`` a damaged newest checkpoint is
    named and the newest sound one before it taken."""
    if not resume:
        return None
    candidates = (list_checkpoints(out)[::-1] if resume == "auto"
                  else [find_checkpoint(resume, out)])
    for path in candidates:
        try:
            state, problem = load_checkpoint(accelerator, path, scheduler, ema), None
        except CheckpointError as e:
            state, problem = None, e
        # Every process takes the same checkpoint: one that failed anywhere failed everywhere.
        failed = accelerator.reduce(torch.tensor(float(problem is not None),
                                                 device=accelerator.device), "max")
        if bool(failed):
            if resume != "auto":
                raise problem or CheckpointError(f"checkpoint {path} cannot be restored by "
                                                 f"another process (see its error)")
            accelerator.print(f"warning: {problem or 'another process could not read ' + str(path)}"
                              f"; trying the checkpoint before it")
            continue
        gen.set_state(state.gen_state)
        accelerator.print(f"resumed from {path} (epoch {state.epoch}, {state.step} of "
                          f"{steps_per_epoch} steps done)")
        return state
    if candidates:
        raise CheckpointError(f"no checkpoint in {out / CHECKPOINTS} can be resumed (see the "
                              f"warnings above); restore one, or start again with "
                              f"overwrite=true.")
    accelerator.print(f"resume=auto: no checkpoint in {out}; starting from scratch")
    return None


def check_finite(batch_loss: list[float], epoch: int, steps_per_epoch: int,
                 out: Path | None = None) -> None:
    """Stop at the end of an epoch (or before a checkpoint) whose loss stopped being finite:
    checked then, not every step, so that no step waits for the device."""
    bad = next((i for i, v in enumerate(batch_loss) if not math.isfinite(v)), None)
    if bad is not None:
        step = (epoch - 1) * steps_per_epoch + bad + 1
        kept = list_checkpoints(out) if out else []
        note = f" The last good checkpoint is {kept[-1]}." if kept else ""
        raise TrainingError(
            f"the training loss became {batch_loss[bad]} at step {step} (epoch {epoch}, batch "
            f"{bad + 1}); stopped before evaluating or exporting (metrics.jsonl keeps the "
            f"earlier epochs).{note} Lower train.lr, add warmup (train.warmup_epochs), or check "
            f"the data.")
