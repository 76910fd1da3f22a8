"""The training loop on Accelerate: ``main(cfg)`` trains, evaluates every epoch and exports.

Device, process count and precision come from ``accelerate launch``; nothing here picks a
device. Top to bottom: ``main`` and ``train`` set the run up and loop over the epochs
(``train_one_epoch``, then ``after_epoch``: batch-norm statistics, evaluations), stopping
after a checkpoint on a signal (``finetune.stopping``), and ``finish`` exports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from finetune import tracking
from finetune.assemble import Parts, Training, check_model, prepare_training, set_up, warm_up
from finetune.checkpoint import LoopState, check_finite, restore, save_checkpoint, starting_point
from finetune.config import UNTRAINED, Config
from finetune.evaluation import accuracy_line, epoch_score, evaluate, prefixed
from finetune.methods import first_phase, run_cached
from finetune.multilabel import export_thresholds
from finetune.optim import enter_epoch
from finetune.precise_bn import check_batches, norms_that_train, refresh_bn
from finetune.runs import (
    BEST,
    early_stopping,
    export_run,
    keep_best,
    metrics_before,
    output_dir,
    run_folder,
    start_run,
    write_metrics,
)
from finetune.speed import copy_to_host, start_processes
from finetune.step import train_step
from finetune.stopping import Stop, interrupted

log = logging.getLogger(__name__)
# checkpoint(steps_done, per-step losses so far, correct so far): called inside an epoch
Checkpointer = Callable[[int, torch.Tensor, torch.Tensor], None]


def main(cfg: Config) -> dict:
    """Train, evaluate after every epoch, export; return the exported model's metrics."""
    check_model(cfg)  # before anything loads: a model that cannot run fails in a second
    tracking.check_trackers(cfg)
    state = start_processes()
    folder = output_dir(cfg)  # computed once: a new run's name is a timestamp
    accelerator = None
    try:
        with run_folder(cfg, state, folder) as out:  # locked; a replaced run stays till export
            tracking.check_tracker_folder(cfg, out)  # before the data loads
            parts, accelerator, precision = set_up(cfg, state)
            if cfg.finetune.method in UNTRAINED:  # cached features, no training loop
                final = run_cached(cfg, parts, accelerator, precision, out)
            else:
                final = train(cfg, parts, accelerator, precision, out, resumable=out == folder)
    finally:  # trackers closed and the process group left, also when the run fails
        if accelerator is not None:
            accelerator.end_training()
        else:
            state.destroy_process_group()
    state.print(f"{accuracy_line(final)}; run saved to {folder}")
    return final


def train(cfg: Config, parts: Parts, accelerator: Accelerator, precision: str,
          out: Path, resumable: bool = True) -> dict:
    """The run of ``parts`` in ``out``: train and evaluate epoch by epoch, export. SIGINT or
    SIGTERM stops it after a checkpoint at the next step (:class:`Interrupted`; ``resumable``:
    ``out`` is kept, not a replacement that is discarded)."""
    tcfg = cfg.train
    t = prepare_training(cfg, parts, accelerator)
    check_batches(tcfg, t.steps_per_epoch, t.loader.draws,
                  accelerator.num_processes, norms_that_train(t.raw, parts.plan, cfg.finetune.bn))
    start_epoch, partial = starting_point(restore(cfg.resume, out, accelerator, t.gen,
                                                  t.steps_per_epoch, t.scheduler, t.ema),
                                          t.steps_per_epoch)
    records = metrics_before(out, start_epoch)
    start_run(out, cfg, accelerator)
    probe = first_phase(cfg, parts, t, accelerator, precision, out, start_epoch, partial)
    compile_time = warm_up(cfg, parts, t, accelerator) if tcfg.compile else None
    tracking.start_trackers(cfg, accelerator, out)

    def save(epoch: int, step: int, losses: torch.Tensor, correct: torch.Tensor) -> None:
        save_checkpoint(accelerator, out, LoopState(epoch, step, t.gen.get_state(), losses,
                                                    correct), tcfg.keep_checkpoints,
                        t.scheduler, t.ema)

    def checkpoint(epoch: int, step: int, losses: torch.Tensor, correct: torch.Tensor) -> None:
        # Only a state reached with finite losses is saved: the last checkpoint stays good.
        check_finite(accelerator.reduce(losses[:step].clone(), "mean").tolist(), epoch,
                     t.steps_per_epoch, out)
        save(epoch, step, losses[:step], correct)

    with Stop(accelerator) as stop:
        for epoch in range(start_epoch, tcfg.epochs + 1):
            resume = partial if epoch == start_epoch else None
            start = time.perf_counter()
            record = train_one_epoch(cfg, parts, t, accelerator, epoch, resume,
                                     (lambda *a, e=epoch: checkpoint(e, *a))
                                     if tcfg.checkpoint else None, stop)
            if "stopped_at" in record:
                raise interrupted(stop, out, epoch, record["stopped_at"], t.steps_per_epoch,
                                  resumable)
            check_finite(record["batch_loss"], epoch, t.steps_per_epoch, out)
            record.update(**probe, **after_epoch(cfg, parts, t, accelerator, record, start,
                                                 resume, compile_time, precision))
            records.append(record)
            best, early = early_stopping(records, tcfg.early_stopping)
            if accelerator.is_main_process:
                if tcfg.early_stopping and best == epoch:  # the weights to export if it stops
                    keep_best(t.raw, out)
                write_metrics(out, records)
            tracking.log_epoch(accelerator, record, t.steps_per_epoch,
                               lambda s: tcfg.lr * t.factor(s))
            if tcfg.checkpoint:  # the epoch is complete (and checked): the next is at step 0
                save(epoch, t.steps_per_epoch, torch.zeros(0), torch.zeros((), dtype=torch.long))
            if epoch < tcfg.epochs and not early and stop.at_boundary():
                raise interrupted(stop, out, epoch, t.steps_per_epoch, t.steps_per_epoch,
                                  resumable)
            if early:
                accelerator.print(f"early stopping: the validation score has not improved for "
                                  f"{tcfg.early_stopping} epochs since epoch {best}")
                break
    return finish(cfg, out, parts, t, accelerator, records)


def after_epoch(cfg: Config, parts: Parts, t: Training, accelerator: Accelerator,
                record: dict, start: float, resume: LoopState | None,
                compile_time: float | None, precision: str) -> dict:
    """A trained epoch's batch-norm statistics, evaluations and timings (printed)."""
    tcfg, epoch = cfg.train, record["epoch"]
    train_time = time.perf_counter() - start  # its .tolist() waited for the device
    done = refresh_bn(cfg.train, [t.raw] + ([t.ema.module] if t.ema else []), t.loader,
                      parts.transform, epoch, accelerator) if tcfg.precise_bn else {}
    done.update(end_epoch(parts, t, accelerator, compile_time if epoch == 1 else None))
    images = (t.steps_per_epoch - (resume.step if resume else 0)) * tcfg.batch_size
    done.update(mixed_precision=precision, placement=parts.placement,
                lr=tcfg.lr * t.factor(t.scheduler.last_epoch),
                epoch_time=round(train_time, 3),
                eval_time=round(time.perf_counter() - start - train_time, 3),
                train_images_per_sec=round(images / train_time, 1))
    accelerator.print(
        f"epoch {epoch}/{tcfg.epochs}: train loss {record['train_loss']:.4f}, train acc "
        f"{record['train_acc']:.4f}, {epoch_score(done)}, "
        f"{train_time:.1f} s ({done['train_images_per_sec']:.0f} img/s)")
    return done


def finish(cfg: Config, out: Path, parts: Parts, t: Training, accelerator: Accelerator,
           records: list[dict]) -> dict:
    """Export (the best epoch's weights with early stopping) and return its metrics."""
    best, _ = early_stopping(records, cfg.train.early_stopping)  # None without early stopping
    unreadable = len(set(gather_object(sorted(t.loader.bad_items))))  # streamed, skipped
    meta, ema_meta = parts.meta(cfg, unreadable), {"ema_decay": cfg.train.ema_decay}
    if meta["task"] == "multilabel":  # thresholds of the weights exported, on every process
        export_thresholds(t, out / BEST if best else None, parts, accelerator, meta, ema_meta)
    if accelerator.is_main_process:
        export_run(out, t.raw, meta, records, best, cfg, t.ema.module if t.ema else None, ema_meta)
    tracking.log_run_figures(accelerator, out, records, parts.train_data.classes,
                    records[-1]["epoch"] * t.steps_per_epoch)
    accelerator.wait_for_everyone()
    return records[-1] if best is None else records[best - 1]


def train_one_epoch(cfg: Config, parts: Parts, t: Training, accelerator: Accelerator,
                    epoch: int, resume: LoopState | None = None,
                    checkpoint: Checkpointer | None = None, stop: Stop | None = None) -> dict:
    """One pass over the training data; metrics are accumulated on the device and read once.

    ``resume`` continues the epoch where a checkpoint left it (its first ``resume.step``
    batches skipped, its accumulators restored); ``checkpoint`` is called every
    ``train.checkpoint_every`` steps. When ``stop`` says so after a step, the epoch ends
    there, checkpointed (``stopped_at``: the steps done) unless it was the last step.
    """
    tcfg, device = cfg.train, accelerator.device
    t.model.train()
    # Stages that thaw later have gradients but must not move: the step drops them.
    thawing = enter_epoch(t.raw, parts.plan, epoch, cfg.finetune.bn)
    steps = t.steps_per_epoch
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first = 0
    if resume is not None:
        first = resume.step
        losses[:first] = resume.losses
        correct += resume.correct
    bad_before, read_before = t.loader.bad, t.loader.read
    bar = tqdm(t.loader.epoch(epoch, first), total=steps, initial=first,
               desc=f"epoch {epoch}/{tcfg.epochs}", leave=False,
               # None: shown on a terminal only (not in logs), by the main process alone.
               disable=None if accelerator.is_main_process else True, dynamic_ncols=True)
    shown = None
    for step, (images, y) in enumerate(bar, start=first):
        x = parts.transform(images, train=True, gen=t.gen)
        loss, hits = train_step(t.model, t.optimizer, accelerator, x, y, t.opts, epoch=epoch,
                                step=step, thawing=thawing, scheduler=t.scheduler, ema=t.ema)
        losses[step] += loss
        correct += hits
        if step % tcfg.log_every == 0 and not bar.disable:
            if shown is not None and (shown[1] is None or shown[1].query()):
                bar.set_postfix(loss=f"{float(shown[0]):.4f}")
            shown = copy_to_host(loss)
        every = tcfg.checkpoint_every
        if step + 1 < steps and stop is not None and stop.after_step():
            if checkpoint is not None:
                checkpoint(step + 1, losses, correct)
            return {"stopped_at": step + 1}
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(step + 1, losses, correct)
    # Each process saw its slice of every global batch: average / sum across processes.
    batch_loss = accelerator.reduce(losses, "mean")
    correct = accelerator.reduce(correct, "sum")
    read = accelerator.reduce(torch.tensor(t.loader.read - read_before, device=device), "sum")
    record = {"epoch": epoch, "train_loss": float(batch_loss.mean()),
              # over the images read: bad ones skipped (data.skip_bad_images) are not counted
              "train_acc": int(correct) / (first * tcfg.batch_size + int(read)),
              "batch_loss": [round(v, 5) for v in batch_loss.tolist()]}
    if cfg.data.skip_bad_images:  # bad training images skipped this epoch, all processes
        bad = torch.tensor(t.loader.bad - bad_before, device=device)
        record["bad_images"] = int(accelerator.reduce(bad, "sum"))
    return record


def end_epoch(parts: Parts, t: Training, accelerator: Accelerator,
              compile_time: float | None) -> dict:
    """The epoch's evaluations: the test set, the validation split (early stopping watches
    it), the weight average on the test set."""
    record = evaluate(t.model, parts.test_data, parts.transform, t.eval_loader, accelerator)
    if parts.val_data is not None:
        record.update(prefixed("val", evaluate(t.model, parts.val_data, parts.transform,
                                                t.val_loader, accelerator)))
    if t.ema is not None:
        with accelerator.autocast():
            record.update(prefixed("ema_test", evaluate(t.ema.module, parts.test_data,
                                                         parts.transform, t.eval_loader,
                                                         accelerator)))
    if compile_time is not None:
        record["compile_time"] = round(compile_time, 3)
    return record
