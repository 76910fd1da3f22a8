"""The run folder, owned here: what each file is called, how config, metrics and exports are
written and read, whether a folder may take a new run or be resumed, and which weights a
finished run exports (the last epoch's or early stopping's best; the weight average beside).

    <run>/config.yaml          the resolved config (``recipe=<run>/config.yaml`` reruns it)
    <run>/metrics.jsonl        one record per finished epoch
    <run>/model.safetensors    the export (+ model.json, config.json: finetune.export's format)
    <run>/ema/                 the weight average's export (train.ema_decay)
    <run>/adapter/             a LoRA run's adapter in peft's format (also in <run>/ema/)
    <run>/best.safetensors     the best epoch's weights while early stopping watches
    <run>/checkpoints/         finetune.checkpoint's
    <run>/evaluation.json, confusion.png, reliability.png   written by ``finetune evaluate``
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file
from torch import nn

from finetune.card import write_model_card
from finetune.checkpoint import CHECKPOINTS, find_checkpoint, list_checkpoints
from finetune.config import UNTRAINED, Config, flat_config, load_config, show_value, to_yaml
from finetune.errors import ConfigError
from finetune.export import META, WEIGHTS, exported_meta, save_model, save_weights
from finetune.fields import is_int, is_real
from finetune.files import atomic_write_text, make_folder
from finetune.lora import lora_summary, merged, save_adapter

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
BEST = "best.safetensors"
EMA = "ema"
ADAPTER = "adapter"
EVALUATION = "evaluation.json"
CONFUSION = "confusion.png"
RELIABILITY = "reliability.png"
PR_CURVES = "pr_curves.png"  # multi-label evaluations
LOCK = ".lock"


# --- starting and resuming -------------------------------------------------------------------

def output_dir(cfg: Config) -> Path:
    """The run folder: ``output_dir``, the run a ``resume=PATH`` checkpoint belongs to, or
    runs/<recipe>/<timestamp> agreed by all processes."""
    if cfg.resume not in (None, "auto"):
        out = find_checkpoint(cfg.resume, Path()).parent.parent  # <run>/checkpoints/<ckpt>
        if cfg.output_dir and Path(cfg.output_dir).resolve() != out.resolve():
            raise ConfigError(f"resume={cfg.resume} belongs to the run in {out}, not to "
                              f"output_dir={cfg.output_dir}; drop output_dir or make them agree.")
        return out
    elif cfg.output_dir:
        return Path(cfg.output_dir)
    elif cfg.resume == "auto":
        raise ConfigError("resume=auto needs output_dir=PATH: the folder of the run to continue.")
    stamp = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]
    return Path("runs") / (cfg.recipe or "run") / stamp


def held_run(out: Path) -> list[str]:
    """What in ``out`` says a run was started there (empty: no run)."""
    held = [name for name in (METRICS, WEIGHTS) if (out / name).exists()]
    return held + ([CHECKPOINTS] if list_checkpoints(out) else [])


@contextlib.contextmanager
def run_folder(cfg: Config, state: PartialState, final: Path) -> Iterator[Path]:
    """The folder a run writes into while it runs (``final``, from :func:`output_dir`): created
    and locked before anything else (a second run into a busy folder is refused with the
    holder's PID; a folder that cannot be written stops the run before its data loads). A
    folder holding a run is refused unless the run is resumed (with the same config) or
    ``overwrite=true``; then the new run is built in a hidden folder beside the old one and
    replaces it, with everything derived from it, only once it has exported: a new run that
    fails leaves the old one as it was."""
    _check_name_lengths(final)  # before anything looks the folder up
    work, lock, created = final, None, not final.exists()
    if state.is_main_process:
        _make(final)
        lock = _lock(final)
    try:
        if cfg.resume:
            check_same_run(final, cfg)
        elif held := held_run(final):
            if not cfg.overwrite:
                raise ConfigError(f"output_dir {final} already holds a run "
                                  f"({', '.join(held)}); continue it with "
                                  f"resume=auto, pass another output_dir=PATH, or "
                                  f"overwrite=true to replace it.")
            work = final.with_name(f".{final.name}.new")
            if state.is_main_process:
                shutil.rmtree(work, ignore_errors=True)  # left by a replacing run that died
                _make(work)
        state.wait_for_everyone()
        try:
            yield work
        except BaseException:
            if state.is_main_process:
                if work != final:
                    shutil.rmtree(work, ignore_errors=True)
                elif created and not held_run(final):  # nothing worth keeping was written
                    shutil.rmtree(final, ignore_errors=True)
            raise
        if work != final and state.is_main_process:
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(work, final)
            shutil.rmtree(old, ignore_errors=True)
        state.wait_for_everyone()
    finally:
        if lock is not None:
            _unlock(final, lock)


def _make(folder: Path) -> None:
    make_folder(folder, f"output_dir {folder}", "pass another output_dir=PATH.")


def _check_name_lengths(folder: Path) -> None:
    """Every name in ``folder`` short enough for its file system, with room for the hidden
    ``.NAME.new``/``.NAME.old`` folders a replacing run makes beside it."""
    existing = Path(folder.absolute().anchor)
    for p in reversed(folder.absolute().parents):  # from the root down, while they exist
        try:
            if not p.is_dir():
                break
        except OSError:  # a name too long to look up
            break
        existing = p
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in folder.parts:
        if len(os.fsencode(part)) + len("..new") > limit:
            raise ConfigError(f"output_dir: the name '{part[:40]}...' is {len(os.fsencode(part))} "
                              f"bytes; this file system allows {limit} (finetune needs "
                              f"{len('..new')} more for a replacing run's folder). Pass a "
                              f"shorter output_dir=PATH.")


def _lock(folder: Path) -> int:
    """An exclusive lock on ``folder`` (``.lock`` holds the holder's PID), released when the
    descriptor is closed or the process dies."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"output_dir {folder} is in use by another finetune run (pid "
                          f"{holder}); wait for it to end, or pass another output_dir=PATH."
                          ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCK[0] = fd
    return fd


def _unlock(folder: Path, fd: int) -> None:
    """Let go of :func:`_lock`'s lock: ``.lock`` unlinked while still held (a run that opened
    it is refused), then the descriptor closed, which releases it (as a process's death does)."""
    (folder / LOCK).unlink(missing_ok=True)
    _HELD_LOCK[0] = None
    os.close(fd)


@contextlib.contextmanager
def lock_run(folder: Path) -> Iterator[bool]:
    """Hold ``folder``'s lock, as a training does, while reading or writing beside its run
    (``finetune evaluate``): refused while a training holds it, and a training is refused
    meanwhile. Yields False, holding nothing, where the folder cannot be written (no training
    can take it either)."""
    try:
        fd = _lock(folder)
    except ConfigError:
        holder = "unknown"
        with contextlib.suppress(OSError):  # (gone if its holder has just ended)
            holder = (folder / LOCK).read_text(errors="replace").strip() or holder
        raise ConfigError(f"{folder} is in use by a finetune run (pid {holder}); try again once "
                          f"it has ended.") from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _unlock(folder, fd)


# The run folder's lock descriptor this process holds. A forked child (a DataLoader worker)
# closes its copy at once: a flock belongs to every descriptor sharing it, and a worker that
# outlives a killed run by the seconds it takes to notice would keep the folder locked.
_HELD_LOCK: list[int | None] = [None]


def _close_held_lock() -> None:
    if _HELD_LOCK[0] is not None:
        try:
            os.close(_HELD_LOCK[0])
        except OSError:
            pass
        _HELD_LOCK[0] = None


os.register_at_fork(after_in_child=_close_held_lock)


def check_same_run(out: Path, cfg: Config) -> None:
    """A resumed run must be the run that was started: same config but for how it is run."""
    saved = out / CONFIG
    if not saved.is_file():
        if held_run(out):
            raise ConfigError(f"cannot resume the run in {out}: its {CONFIG} is missing, so "
                              f"its settings are unknown. Restore the file, or start a new run "
                              f"in another output_dir.")
        return  # nothing started there yet: resume=auto starts it
    old, new = flat_config(load_config([f"recipe={saved}"])), flat_config(cfg)
    # How to run it, not what to run: free to differ.
    changed = sorted(k for k in old if old[k] != new[k]
                     and k not in ("resume", "overwrite", "output_dir"))
    if changed:
        raise ConfigError(
            f"cannot resume the run in {out} with a different config: "
            + ", ".join(f"{k}={show_value(new[k])} (was {show_value(old[k])})" for k in changed)
            + ". Resume with the same settings, or start a new run in another output_dir.")


def start_run(out: Path, cfg: Config, accelerator: Accelerator) -> None:
    """Write the run's config (main process)."""
    if accelerator.is_main_process:
        atomic_write_text(out / CONFIG, to_yaml(cfg))
    accelerator.wait_for_everyone()


def config_file(run_dir: str | Path) -> Path | None:
    """The config of the run an export belongs to: ``<run>/config.yaml``, also for the weight
    average's export in ``<run>/ema``; None when there is none."""
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir.parent) if run_dir.name == EMA else (run_dir,):
        if (folder / CONFIG).is_file():
            return folder / CONFIG
    return None


# --- metrics ---------------------------------------------------------------------------------

def write_metrics(out: Path, records: list[dict]) -> None:
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))


# The numbers of a record that finetune reads back (reports, comparisons, resumes): each a
# finite number where present.
_NUMBERS = ("train_loss", "train_acc", "test_acc", "test_loss", "test_top5_acc",
            "test_balanced_acc", "test_macro_f1", "test_ece", "val_acc", "ema_test_acc",
            "epoch_time", "eval_time", "train_images_per_sec", "compile_time", "lr")


def _record_problem(record: object) -> str | None:
    """What is wrong with one parsed line of metrics.jsonl, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a JSON object (one epoch's record)"
    epoch = record.get("epoch")
    if not (is_int(epoch) and epoch >= 1):
        return f"field 'epoch' is {json.dumps(epoch)}, not a whole number from 1"
    for key in _NUMBERS:
        if key in record and record[key] is not None and not is_real(record[key]):
            return f"field '{key}' is {json.dumps(record[key])}, not a finite number"
    losses = record.get("batch_loss", [])
    if not (isinstance(losses, list) and all(map(is_real, losses))):
        return "field 'batch_loss' is not a list of finite numbers"
    return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl``, one per finished epoch; a one-line error
    naming the line of a record that is not valid JSON, or lacks or garbles what is read."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {METRICS}: not a finetune run folder, or "
                          f"its first epoch has not finished.")
    fix = (f"restore the file from a copy, or delete that line and the ones after it and finish "
           f"the run with `finetune train recipe={Path(run_dir) / CONFIG} output_dir={run_dir} "
           f"resume=auto`.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                          f"{fix}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {number}: not a complete JSON record ({e.msg}, "
                              f"column {e.colno}; a run killed mid-write?); {fix}") from None
        problem = _record_problem(record)
        if problem:
            raise ConfigError(f"{path}, line {number}: {problem}; {fix}")
        records.append(record)
    return records


def metrics_before(out: Path, epoch: int) -> list[dict]:
    """The records of the epochs before ``epoch`` (a resumed run continues them)."""
    return [r for r in read_metrics(out) if r["epoch"] < epoch] if (out / METRICS).is_file() \
        else []


# --- what a run exports ----------------------------------------------------------------------

def early_stopping(records: list[dict], patience: int) -> tuple[int | None, bool]:
    """(the epoch with the best validation accuracy (mAP: :func:`watched`), whether to stop
    now): stop once
    ``patience`` epochs have passed without improving on it. (None, False) when off."""
    if not patience:
        return None, False
    key = watched(records[-1])
    best = max(records, key=lambda r: (r[key], -r["epoch"]))["epoch"]
    return best, records[-1]["epoch"] - best >= patience


def watched(record: dict) -> str:
    """The validation number early stopping watches: the mAP of multi-label data (its exact
    match ratio is too coarse to rank epochs), else the accuracy."""
    return "val_map" if "val_map" in record else "val_acc"


def keep_best(model: nn.Module, out: Path) -> None:
    """Keep this epoch's weights as the best so far (early stopping exports them)."""
    save_weights(model, out / BEST)


def export_run(out: Path, model: nn.Module, meta: dict, records: list[dict], best: int | None,
               cfg: Config, ema: nn.Module | None = None, ema_meta: dict | None = None) -> None:
    """Export the run's model: the last epoch's weights, or with early stopping (``best``)
    the best epoch's; the weight average's (``ema``, its own entries of model.json in
    ``ema_meta``: ema_decay, a multi-label model's thresholds) into ``<run>/ema``. Each export
    folder gets its model card (README.md): a Hub model repository."""
    if best is not None:
        model.load_state_dict(load_file(out / BEST))
        key = watched(records[best - 1])
        meta = {**meta, "early_stopping": {"best_epoch": best, "epochs_run": len(records),
                                           key: records[best - 1][key]}}
    record = records[-1] if best is None else records[best - 1]
    if cfg.finetune.method == "lora":
        meta = {**meta, "lora": lora_summary(model)}
    _save_export(model, meta, out, cfg)
    write_model_card(out, meta, record, cfg)
    if ema is not None:
        _save_export(ema, {**meta, **(ema_meta or {})}, out / EMA, cfg)
        # the average's own test numbers (its confusion matrix is not kept)
        ema_record = {k.replace("ema_test_", "test_"): v for k, v in record.items()
                      if k.startswith("ema_test_")}
        write_model_card(out / EMA, meta, {"epoch": record["epoch"], **ema_record}, cfg)


def _save_export(model: nn.Module, meta: dict, folder: Path, cfg: Config) -> None:
    """``save_model``'s files in ``folder``; a LoRA run's model with its adapters merged into
    plain weights (what timm and ``finetune.load`` rebuild), its adapter in peft's format in
    ``folder/adapter``."""
    if cfg.finetune.method == "lora":
        save_model(merged(model), meta, folder)
        save_adapter(model, folder / ADAPTER)
    else:
        save_model(model, meta, folder)


# --- finished runs ---------------------------------------------------------------------------

def time_to_accuracy(records: list[dict], target: float) -> tuple[int, float] | None:
    """(epoch, training seconds) when the test accuracy first reached ``target``: seconds
    are the sum of ``epoch_time`` up to that epoch (training passes only; evaluation and
    compilation excluded). None if it never did."""
    seconds = 0.0
    for r in records:
        seconds += r["epoch_time"]
        if r["test_acc"] >= target:
            return r["epoch"], round(seconds, 3)
    return None


@dataclass
class Run:
    """A finished run folder: its config, per-epoch metrics and exported model's metadata."""

    path: Path
    config: Config
    records: list[dict]
    meta: dict
    label: str = ""

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def train_images(self) -> int:
        """Training-set size, as recorded in model.json; runs exported before it was recorded:
        the batches of an epoch times the batch size (the partial last batch is dropped)."""
        return (self.meta.get("train_images")
                or len(self.records[0]["batch_loss"]) * self.config.train.batch_size)

    @property
    def size(self) -> int:
        """The training-set size of the budget: ``data.train_limit`` when set (a run that holds
        out a validation split from it trains on fewer), else the training images."""
        return self.config.data.train_limit or self.train_images

    @property
    def final(self) -> dict:
        """The record of the exported model: the last epoch's, or the best one's when early
        stopping chose it."""
        best = self.meta.get("early_stopping", {}).get("best_epoch")
        return self.records[best - 1] if best else self.records[-1]

    @property
    def final_acc(self) -> float:
        return self.final["test_acc"]

    @property
    def best_acc(self) -> float:
        return max(r["test_acc"] for r in self.records)

    @property
    def train_seconds(self) -> float:
        return sum(r["epoch_time"] for r in self.records)

    @property
    def images_per_sec(self) -> float:
        """Training images over training seconds, all epochs together."""
        images = sum(r["train_images_per_sec"] * r["epoch_time"] for r in self.records)
        return images / self.train_seconds if self.train_seconds else 0.0


def read_run(path: str | Path) -> Run:
    """Read a finished run folder; a clear error for anything else."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} is not a finetune run folder (no {CONFIG}).")
    cfg = load_config([f"recipe={path / CONFIG}"])
    records = read_metrics(path)
    for record in records:  # what reports and comparisons read of every epoch
        missing = [k for k in ("test_acc", "epoch_time", "train_images_per_sec")
                   if record.get(k) is None]
        if missing:
            raise ConfigError(f"{path / METRICS}: the record of epoch {record['epoch']} lacks "
                              f"{', '.join(missing)}; restore the file from a copy, or leave "
                              f"the run out.")
    meta = exported_meta(path)
    # An early-stopped run finished with fewer epochs than planned.
    planned = (meta.get("early_stopping", {}).get("epochs_run")
               or (1 if cfg.finetune.method in UNTRAINED else cfg.train.epochs))
    if len(records) < planned or not meta:
        raise ConfigError(f"{path}: the run has not finished ({len(records)} of {planned} "
                          f"epochs, model {'exported' if meta else 'not exported'})"
                          f"; finish it with `finetune train recipe={path / CONFIG} "
                          f"output_dir={path} resume=auto`, or leave it out.")
    return Run(path, cfg, records, meta)


def finished_run(path: Path) -> Run | None:
    """The run in ``path`` if it has finished, else None."""
    try:
        return read_run(path)
    except (ConfigError, OSError, ValueError):
        return None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Finished runs in ``paths``: run folders, or folders searched for run folders."""
    runs = []
    for path in map(Path, paths):
        if (path / CONFIG).is_file():
            runs.append(read_run(path))
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob(META) if (p.parent / METRICS).is_file()
                           and not any(part.startswith(".") for part in p.parent.parts))
            if not found:
                raise ConfigError(f"{path} holds no finished finetune runs (folders with "
                                  f"{CONFIG}, {METRICS} and an exported model).")
            runs += [read_run(p) for p in found]
        else:
            raise FileNotFoundError(f"{path}: no such run folder")
    if not runs:
        raise ConfigError("no runs given: finetune compare RUN_DIR [RUN_DIR ...]")
    return runs
