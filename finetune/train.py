"""The training loop on Accelerate: ``main(cfg)`` trains, evaluates every epoch and exports.

Device, process count and mixed precision come from ``accelerate launch`` (or its config);
nothing here picks a device.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from finetune import __version__
from finetune.checkpoint import (
    CHECKPOINTS,
    LoopState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from finetune.config import Config, TrainConfig, flat_config, load_config, show_value, to_yaml
from finetune.data import ImageData, load_data, validation_split
from finetune.data.loader import (
    BatchTransform,
    batches_on,
    gather,
    index_loader,
    place,
    train_batches,
)
from finetune.ema import EMA
from finetune.errors import ConfigError, TrainingError
from finetune.export import save_model, save_weights
from finetune.files import atomic_write_text
from finetune.mixing import mix_batch, mix_params
from finetune.models import LoadedWeights, build_model, fetch_state_dict
from finetune.optim import (
    StagePlan,
    enter_epoch,
    freeze_for_good,
    make_optimizer,
    make_scheduler,
    plan_stages,
)
from finetune.runs import read_metrics
from finetune.speed import (
    bf16_is_native,
    check_cpu_bf16,
    compile_model,
    copy_to_host,
    make_accelerator,
    tune_backends,
)

log = logging.getLogger(__name__)


def normalization(mode: str, loaded: LoadedWeights | None, train: ImageData, in_chans: int
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the model sees: the pretrained weights', the training images', or none."""
    if mode == "none":
        return (0.0,) * in_chans, (1.0,) * in_chans
    elif mode in ("auto", "imagenet") and loaded is not None:
        return loaded.mean, loaded.std
    elif mode == "imagenet":
        from finetune.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, channel_stats

        return channel_stats(IMAGENET_MEAN, in_chans), channel_stats(IMAGENET_STD, in_chans)
    elif mode in ("auto", "dataset"):
        from finetune.data.loader import match_channels

        sample = match_channels(train.images[:10_000].float().div(255), in_chans)
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
    else:
        raise ConfigError(f"unknown data.normalize '{mode}'; valid: auto, imagenet, dataset, none")


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageData, transform: BatchTransform, loader,
             accelerator: Accelerator) -> dict:
    """Accuracy and mean loss over every sample of ``data`` exactly once, across processes.

    ``data`` lives on the device; ``loader`` is an Accelerate-prepared index loader.
    """
    model.eval()
    k = len(data.classes)
    # confusion[true, predicted], accumulated on the device: no host sync per batch.
    confusion = torch.zeros(k * k, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    seen = torch.zeros(len(data), dtype=torch.long, device=accelerator.device)
    for idx in loader:
        torch.compiler.cudagraph_mark_step_begin()
        images, labels = gather(data, idx, accelerator.device)
        logits = model(transform(images))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        preds, labels, loss, idx = accelerator.gather_for_metrics(
            (logits.argmax(1), labels, loss, idx))
        # index_add_, not bincount: bincount reads its input's max on the host (a sync).
        confusion.index_add_(0, labels * k + preds, torch.ones_like(preds))
        seen.index_add_(0, idx, torch.ones_like(idx))
        loss_sum += loss.sum()
    confusion = confusion.view(k, k).cpu()
    n, correct = int(confusion.sum()), int(confusion.trace())
    if not bool((seen == 1).all()):  # every test sample counted exactly once, over all processes
        raise TrainingError(f"evaluation counted {int((seen == 0).sum())} test samples never and "
                            f"{int((seen > 1).sum())} more than once; this is a bug in finetune's "
                            f"sharding, please report it.")
    return {"test_acc": correct / n, "test_loss": float(loss_sum) / n,
            "test_correct": correct, "test_total": n, "confusion": confusion.tolist()}


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


# The best epoch's weights, kept while early stopping watches (and exported at the end).
BEST = "best.safetensors"


def early_stopping(records: list[dict], patience: int) -> tuple[int | None, bool]:
    """(the epoch with the best validation accuracy, whether to stop now): stop once
    ``patience`` epochs have passed without improving on it. (None, False) when off."""
    if not patience:
        return None, False
    best = max(records, key=lambda r: (r["val_acc"], -r["epoch"]))["epoch"]
    return best, records[-1]["epoch"] - best >= patience


def _prefixed(prefix: str, result: dict) -> dict:
    """``test_acc`` -> ``val_acc`` etc.: another split's or model's numbers beside the test's."""
    return {f"{prefix}_{k.removeprefix('test_')}": v for k, v in result.items()
            if k != "confusion"}


def _describe_stage(plan: StagePlan, i: int, lr: float) -> str:
    when = plan.trains_from[i]
    state = "frozen" if when is None else f"frozen until epoch {when}" if when else "trains"
    return f"{plan.names[i]} ({state}, lr {lr * plan.scale[i]:.3g})"


def accuracy_line(result: dict) -> str:
    """What `finetune train` ends with and `finetune evaluate` prints: the same line."""
    return (f"test accuracy {result['test_acc']:.4f} "
            f"({result['test_correct']}/{result['test_total']})")


@dataclass
class Extras:
    """What fine-tuning adds to a plain step: frozen stages and batch-norm modes, Mixup/CutMix,
    the weight average. The defaults change nothing."""

    plan: StagePlan | None = None
    bn: str = "train"
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch: float = 0.5
    ema: EMA | None = None
    raw_model: nn.Module | None = None  # the unwrapped model, which the average follows


def train_one_epoch(model: nn.Module, data: ImageData, transform: BatchTransform,
                    optimizer: torch.optim.Optimizer, scheduler, accelerator: Accelerator,
                    cfg: TrainConfig, epoch: int, gen: torch.Generator,
                    stream_workers: int | None = None, resume: LoopState | None = None,
                    checkpoint: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                    extras: Extras | None = None) -> dict:
    """One pass over the training data; metrics are accumulated on the device and read once.

    Batches are indexed from ``data`` where it lives (the device), or, with ``stream_workers``
    set, streamed from host memory by that many DataLoader workers. Nothing in the step waits
    for the device. ``resume`` continues the epoch where a checkpoint left it (its first
    ``resume.step`` batches skipped, its accumulators restored); ``checkpoint(steps_done, losses,
    correct)`` is called every ``cfg.checkpoint_every`` steps. Each step's batch is processed in
    ``cfg.accumulate`` slices under ``accelerator.accumulate`` (one update per step).
    """
    extras = extras or Extras()
    model.train()
    thawing = []  # parameters of stages that train later: their gradients are dropped
    if extras.plan is not None:
        # names as the plan has them (not DDP's module.*)
        thawing = enter_epoch(extras.raw_model or model, extras.plan, epoch, extras.bn)
    mixing = extras.mixup > 0 or extras.cutmix > 0
    num_classes = len(data.classes)
    device = accelerator.device
    steps = len(data) // cfg.batch_size
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first = 0
    if resume is not None:
        first = resume.step
        losses[:first] = resume.losses
        correct += resume.correct
    indices = itertools.islice(train_batches(len(data), cfg.batch_size, epoch, cfg.seed,
                                             accelerator.process_index,
                                             accelerator.num_processes, data.images.device),
                               first, None)
    bar = tqdm(batches_on(data, indices, device, stream_workers), total=steps, initial=first,
               desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               # None: shown on a terminal only (not in logs), on one process per machine.
               disable=None if accelerator.is_local_main_process else True, dynamic_ncols=True)
    shown = None
    for step, (images, y) in enumerate(bar, start=first):
        x = transform(images, train=True, gen=gen)
        target = y
        if mixing:  # soft targets, label smoothing included
            mix = mix_params(extras.mixup, extras.cutmix, extras.mix_switch, x.shape[-1],
                             cfg.seed, epoch, step)
            x, target = mix_batch(x, y, num_classes, cfg.label_smoothing, *mix)
        # The augmented batch is sliced, so accumulation changes memory, not the data.
        for xs, ts, ys in zip(x.chunk(cfg.accumulate), target.chunk(cfg.accumulate),
                              y.chunk(cfg.accumulate), strict=True):
            with accelerator.accumulate(model):
                torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: last outputs are done
                logits = model(xs)
                loss = F.cross_entropy(logits, ts,
                                       label_smoothing=0.0 if mixing else cfg.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for p in thawing:
                        p.grad = None
                    if cfg.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                optimizer.step()  # with accumulation: a no-op until the last slice
                optimizer.zero_grad(set_to_none=True)
            losses[step] += loss.detach() / cfg.accumulate
            correct += (logits.argmax(1) == ys).sum()
        scheduler.step()
        if extras.ema is not None:
            extras.ema.update(extras.raw_model)
        if step % cfg.log_every == 0 and not bar.disable:
            if shown is not None and (shown[1] is None or shown[1].query()):
                bar.set_postfix(loss=f"{float(shown[0]):.4f}")
            shown = copy_to_host(loss)
        every = cfg.checkpoint_every
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(step + 1, losses, correct)
    # Each process saw its slice of every global batch: average / sum across processes.
    batch_loss = accelerator.reduce(losses, "mean")
    correct = accelerator.reduce(correct, "sum")
    return {"train_loss": float(batch_loss.mean()), "train_acc": int(correct) / (steps *
            cfg.batch_size), "batch_loss": [round(v, 5) for v in batch_loss.tolist()]}


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run folder: ``output_dir``, the run a ``resume=PATH`` checkpoint belongs to, or
    runs/<recipe>/<timestamp> agreed by all processes. A folder holding a run is refused unless
    the run is resumed (with the same config) or ``overwrite=true``."""
    if cfg.resume not in (None, "auto"):
        out = find_checkpoint(cfg.resume, Path()).parent.parent  # <run>/checkpoints/<ckpt>
        if cfg.output_dir and Path(cfg.output_dir).resolve() != out.resolve():
            raise ConfigError(f"resume={cfg.resume} belongs to the run in {out}, not to "
                              f"output_dir={cfg.output_dir}; drop output_dir or make them agree.")
    elif cfg.output_dir:
        out = Path(cfg.output_dir)
    elif cfg.resume == "auto":
        raise ConfigError("resume=auto needs output_dir=PATH: the folder of the run to continue.")
    else:
        stamp = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]
        out = Path("runs") / (cfg.recipe or "run") / stamp
    if cfg.resume:
        check_same_run(out, cfg)
        return out
    held = [name for name in ("metrics.jsonl", "model.safetensors") if (out / name).exists()]
    held += [CHECKPOINTS] if list_checkpoints(out) else []
    if held and not cfg.overwrite:
        raise ConfigError(f"output_dir {out} already holds a run ({', '.join(held)}); continue "
                          f"it with resume=auto, pass another output_dir=PATH, or overwrite=true "
                          f"to replace it.")
    return out


def check_same_run(out: Path, cfg: Config) -> None:
    """A resumed run must be the run that was started: same config but for how it is run."""
    saved = out / "config.yaml"
    if not saved.is_file():
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


def resume_run(cfg: Config, out: Path, accelerator: Accelerator, gen: torch.Generator,
               steps_per_epoch: int) -> tuple[int, LoopState | None, list[dict]]:
    """Restore the checkpoint ``cfg.resume`` names (model, optimizer, scheduler, RNG, the
    augmentation generator). Returns the epoch to start at, the loop state inside it (None:
    from its first step) and the metrics of the epochs before it."""
    path = find_checkpoint(cfg.resume, out) if cfg.resume else None
    if path is None:
        if cfg.resume:
            accelerator.print(f"resume=auto: no checkpoint in {out}; starting from scratch")
        return 1, None, []
    state = load_checkpoint(accelerator, path)
    gen.set_state(state.gen_state)
    start_epoch, partial = ((state.epoch + 1, None) if state.step >= steps_per_epoch
                            else (state.epoch, state))
    records = ([r for r in read_metrics(out) if r["epoch"] < start_epoch]
               if (out / "metrics.jsonl").is_file() else [])
    accelerator.print(f"resumed from {path} (epoch {state.epoch}, {state.step} of "
                      f"{steps_per_epoch} steps done)")
    return start_epoch, partial, records


@dataclass
class Setup:
    """A run's model (on its device, stages frozen, not yet wrapped), data and preprocessing."""

    model: nn.Module
    loaded: LoadedWeights | None
    plan: StagePlan
    transform: BatchTransform
    train_data: ImageData
    test_data: ImageData
    val_data: ImageData | None
    source: str
    placement: str
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def setup(cfg: Config, accelerator: Accelerator, precision: str) -> Setup:
    """Load the data and the model (pretrained weights, frozen stages) and place both; shared
    by training and the learning-rate finder."""
    tcfg = cfg.train
    if tcfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} is the global batch and must "
                          f"divide evenly over {accelerator.num_processes} processes.")

    with accelerator.main_process_first():  # the main process fills any download cache first
        # Weights first: a run that cannot get them should fail in seconds, not after the data.
        fetched = (fetch_state_dict(cfg.model.name, cfg.model.weights)
                   if cfg.model.pretrained else None)
        train_data, test_data, source = load_data(cfg.data)
    val_data = None
    if cfg.data.val_split:  # carved from the training images: early stopping never sees test
        train_data, val_data = validation_split(train_data, cfg.data.val_split, tcfg.seed)
    if len(train_data) < tcfg.batch_size:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} exceeds the {len(train_data)} "
                          f"training images; lower train.batch_size or raise data.train_limit.")
    in_chans = cfg.model.in_chans or train_data.images.shape[1]
    model, loaded = build_model(cfg.model, num_classes=len(train_data.classes),
                                in_chans=in_chans, image_size=cfg.data.image_size,
                                fetched=fetched, class_names=train_data.classes)
    mean, std = normalization(cfg.data.normalize, loaded, train_data, in_chans)
    transform = BatchTransform(cfg.data.image_size, in_chans, mean, std,
                               hflip=cfg.data.hflip, crop_pad=cfg.data.crop_pad,
                               erase=cfg.data.random_erasing, channels_last=tcfg.channels_last)
    log.info("data %s: %d train / %d test images, %d classes; model %s (%s), %d parameters",
             source, len(train_data), len(test_data), len(train_data.classes), cfg.model.name,
             loaded.source if loaded else "random init",
             sum(p.numel() for p in model.parameters()))

    # The whole dataset moves to the device once and batches are indexed there, unless it
    # does not fit: then it stays in host memory and batches are streamed.
    device = accelerator.device
    placement = place(train_data, cfg.data.placement, device, test_data)
    if placement == "device":
        train_data, test_data = train_data.to(device), test_data.to(device)
    if val_data is not None:
        val_data = val_data.to(device) if placement == "device" else val_data
    log.info("mixed precision %s, %s, data on the %s%s", precision,
             "channels_last" if tcfg.channels_last else "NCHW", placement,
             ", torch.compile" if tcfg.compile else "")
    if precision == "bf16" and device.type == "cpu":
        check_cpu_bf16(model, in_chans, cfg.data.image_size)
        if not bf16_is_native(device):
            log.warning("this CPU has no bf16 arithmetic (AVX512-BF16/AMX): bf16 is emulated "
                        "and slower than fp32 here; set train.mixed_precision=fp32")
    model.to(device, memory_format=transform.memory_format)
    plan = plan_stages(model, cfg.finetune)
    freeze_for_good(model, plan, cfg.finetune.bn)  # before DDP wraps the model
    log.info("stages %s", ", ".join(_describe_stage(plan, i, tcfg.lr)
                                    for i in range(len(plan.names))))
    return Setup(model, loaded, plan, transform, train_data, test_data, val_data, source,
                 placement, in_chans, mean, std)


def main(cfg: Config) -> dict:
    """Train, evaluate after every epoch, export; return the last epoch's metrics."""
    tcfg = cfg.train
    accelerator, precision = make_accelerator(tcfg.mixed_precision, tcfg.accumulate)
    out = prepare_output_dir(cfg, accelerator)
    set_seed(tcfg.seed)
    tune_backends(accelerator.device)
    run = setup(cfg, accelerator, precision)
    model, plan, transform, placement = run.model, run.plan, run.transform, run.placement
    train_data, test_data, val_data = run.train_data, run.test_data, run.val_data
    device = accelerator.device
    optimizer = make_optimizer(model, tcfg, plan)
    steps_per_epoch = len(train_data) // tcfg.batch_size  # the last partial batch is dropped
    scheduler = make_scheduler(optimizer, tcfg, steps_per_epoch, plan)
    model, optimizer, eval_loader = accelerator.prepare(
        model, optimizer, index_loader(len(test_data), tcfg.eval_batch_size))
    val_loader = (accelerator.prepare(index_loader(len(val_data), tcfg.eval_batch_size))
                  if val_data is not None else None)
    accelerator.register_for_checkpointing(scheduler)
    raw = accelerator.unwrap_model(model)
    ema = EMA(raw, tcfg.ema_decay) if tcfg.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    extras = Extras(plan, cfg.finetune.bn, cfg.data.mixup, cfg.data.cutmix,
                    cfg.data.mix_switch, ema, raw)
    gen = torch.Generator(device=device).manual_seed(tcfg.seed * 7919 + accelerator.process_index)
    compile_time = None
    if tcfg.compile:
        per_slice = tcfg.batch_size // accelerator.num_processes // tcfg.accumulate
        sample = gather(train_data, torch.arange(per_slice), device)
        compile_time = compile_model(model, *sample, transform, accelerator, tcfg.compile_mode)
        accelerator.print(f"compiled the model in {compile_time:.1f} s (not counted as training)")

    start_epoch, partial, records = resume_run(cfg, out, accelerator, gen, steps_per_epoch)
    if accelerator.is_main_process:
        if cfg.overwrite and not cfg.resume:  # a replaced run's checkpoints must not be resumed
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    accelerator.wait_for_everyone()

    def save(epoch: int, step: int, losses: torch.Tensor, correct: torch.Tensor) -> None:
        save_checkpoint(accelerator, out, LoopState(epoch, step, gen.get_state(), losses,
                                                    correct), tcfg.keep_checkpoints)

    def checkpoint(epoch: int, step: int, losses: torch.Tensor, correct: torch.Tensor) -> None:
        # Only a state reached with finite losses is saved: the last checkpoint stays good.
        check_finite(accelerator.reduce(losses[:step].clone(), "mean").tolist(), epoch,
                     steps_per_epoch, out)
        save(epoch, step, losses[:step], correct)

    for epoch in range(start_epoch, tcfg.epochs + 1):
        start = time.perf_counter()
        record = {"epoch": epoch}
        resume = partial if epoch == start_epoch else None
        record.update(train_one_epoch(
            model, train_data, transform, optimizer, scheduler, accelerator, tcfg, epoch, gen,
            cfg.data.workers if placement == "host" else None, resume,
            functools.partial(checkpoint, epoch) if tcfg.checkpoint else None, extras))
        train_time = time.perf_counter() - start  # the .tolist() above waited for the device
        check_finite(record["batch_loss"], epoch, steps_per_epoch, out)
        images = (steps_per_epoch - (resume.step if resume else 0)) * tcfg.batch_size
        record.update(evaluate(model, test_data, transform, eval_loader, accelerator))
        if val_data is not None:
            record.update(_prefixed("val", evaluate(model, val_data, transform, val_loader,
                                                    accelerator)))
        if ema is not None:
            with accelerator.autocast():
                record.update(_prefixed("ema_test", evaluate(ema.module, test_data, transform,
                                                             eval_loader, accelerator)))
        if epoch == 1 and compile_time is not None:
            record["compile_time"] = round(compile_time, 3)
        record.update(mixed_precision=precision, placement=placement,
                      lr=scheduler.get_last_lr()[0], epoch_time=round(train_time, 3),
                      eval_time=round(time.perf_counter() - start - train_time, 3),
                      train_images_per_sec=round(images / train_time, 1))
        records.append(record)
        accelerator.print(
            f"epoch {epoch}/{tcfg.epochs}: train loss {record['train_loss']:.4f}, train acc "
            f"{record['train_acc']:.4f}, test acc {record['test_acc']:.4f}, "
            f"{train_time:.1f} s ({record['train_images_per_sec']:.0f} img/s)")
        best, stop = early_stopping(records, tcfg.early_stopping)
        if accelerator.is_main_process:
            if tcfg.early_stopping and best == epoch:  # the weights to export if it stops
                save_weights(raw, out / BEST)
            atomic_write_text(out / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in records))
        if tcfg.checkpoint:  # the epoch is complete (and checked): the next starts at step 0
            save(epoch, steps_per_epoch, torch.zeros(0), torch.zeros((), dtype=torch.long))
        if stop:
            accelerator.print(f"early stopping: validation accuracy has not improved for "
                              f"{tcfg.early_stopping} epochs since epoch {best}")
            break

    best, _ = early_stopping(records, tcfg.early_stopping)  # None without early stopping
    if accelerator.is_main_process:
        meta = {"architecture": cfg.model.name, "num_classes": len(train_data.classes),
                "in_chans": run.in_chans, "image_size": cfg.data.image_size,
                "norm": cfg.model.norm, "mean": list(run.mean), "std": list(run.std),
                "interpolation": "bilinear", "class_names": train_data.classes,
                "recipe": cfg.recipe, "pretrained": run.loaded.source if run.loaded else None,
                "data": run.source, "train_images": len(train_data),
                "test_images": len(test_data), "finetune_version": __version__}
        if best is not None:  # export the best epoch's weights, not the last one's
            raw.load_state_dict(load_file(out / BEST))
            meta["early_stopping"] = {"best_epoch": best, "epochs_run": len(records),
                                      "val_acc": records[best - 1]["val_acc"]}
        save_model(raw, meta, out)
        if ema is not None:
            save_model(ema.module, {**meta, "ema_decay": tcfg.ema_decay}, out / "ema")
    accelerator.wait_for_everyone()
    # The exported model's numbers: the last epoch's, or the best one's with early stopping.
    final = records[-1] if best is None else records[best - 1]
    accelerator.print(f"{accuracy_line(final)}; run saved to {out}")
    accelerator.end_training()
    return final

