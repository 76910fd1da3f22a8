"""The training loop on Accelerate: ``main(cfg)`` trains, evaluates every epoch and exports.

Device, process count and mixed precision come from ``accelerate launch`` (or its config);
nothing here picks a device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from tqdm.auto import tqdm

from finetune import __version__
from finetune.config import Config, TrainConfig, to_yaml
from finetune.data import ImageData, load_data
from finetune.data.loader import (
    BatchTransform,
    batches_on,
    gather,
    index_loader,
    place,
    train_batches,
)
from finetune.errors import ConfigError, TrainingError
from finetune.export import save_model
from finetune.files import atomic_write_text
from finetune.models import LoadedWeights, build_model, fetch_state_dict
from finetune.speed import (
    bf16_is_native,
    check_cpu_bf16,
    compile_model,
    copy_to_host,
    resolve_mixed_precision,
    tune_backends,
)

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay only on weights of convs and linears (not norms, biases).

    The fused implementation (one kernel for all parameters) is used where the parameters'
    device has one; build the optimizer after moving the model.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
                for p in decay + no_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    elif cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    else:
        raise ConfigError(f"unknown train.optimizer '{cfg.optimizer}'; valid: sgd, adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule over the whole run."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        pct = warmup / total if warmup else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=pct, cycle_momentum=False)
    elif cfg.schedule in ("cosine", "constant"):
        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if cfg.schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        raise ConfigError(f"unknown train.schedule '{cfg.schedule}'; "
                          f"valid: constant, cosine, onecycle")


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
    for idx in loader:
        torch.compiler.cudagraph_mark_step_begin()
        images, labels = gather(data, idx, accelerator.device)
        logits = model(transform(images))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        preds, labels, loss = accelerator.gather_for_metrics((logits.argmax(1), labels, loss))
        # index_add_, not bincount: bincount reads its input's max on the host (a sync).
        confusion.index_add_(0, labels * k + preds, torch.ones_like(preds))
        loss_sum += loss.sum()
    confusion = confusion.view(k, k).cpu()
    n, correct = int(confusion.sum()), int(confusion.trace())
    return {"test_acc": correct / n, "test_loss": float(loss_sum) / n,
            "test_correct": correct, "test_total": n, "confusion": confusion.tolist()}


def check_finite(batch_loss: list[float], epoch: int, steps_per_epoch: int) -> None:
    """Stop at the end of an epoch whose loss stopped being finite (checked once per epoch, so
    that no step waits for the device)."""
    bad = next((i for i, v in enumerate(batch_loss) if not math.isfinite(v)), None)
    if bad is not None:
        step = (epoch - 1) * steps_per_epoch + bad + 1
        raise TrainingError(
            f"the training loss became {batch_loss[bad]} at step {step} (epoch {epoch}, batch "
            f"{bad + 1}); stopped before evaluating or exporting (metrics.jsonl keeps the "
            f"earlier epochs). Lower train.lr, add warmup (train.warmup_epochs), or check the "
            f"data.")


def accuracy_line(result: dict) -> str:
    """What `finetune train` ends with and `finetune evaluate` prints: the same line."""
    return (f"test accuracy {result['test_acc']:.4f} "
            f"({result['test_correct']}/{result['test_total']})")


def train_one_epoch(model: nn.Module, data: ImageData, transform: BatchTransform,
                    optimizer: torch.optim.Optimizer, scheduler, accelerator: Accelerator,
                    cfg: TrainConfig, epoch: int, gen: torch.Generator,
                    stream_workers: int | None = None) -> dict:
    """One pass over the training data; metrics are accumulated on the device and read once.

    Batches are indexed from ``data`` where it lives (the device), or, with ``stream_workers``
    set, streamed from host memory by that many DataLoader workers. Nothing in the step waits
    for the device.
    """
    model.train()
    device = accelerator.device
    steps = len(data) // cfg.batch_size
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    indices = train_batches(len(data), cfg.batch_size, epoch, cfg.seed,
                            accelerator.process_index, accelerator.num_processes,
                            data.images.device)
    bar = tqdm(batches_on(data, indices, device, stream_workers), total=steps,
               desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               # None: shown on a terminal only (not in logs), on one process per machine.
               disable=None if accelerator.is_local_main_process else True, dynamic_ncols=True)
    shown = None
    for step, (images, y) in enumerate(bar):
        torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the last step's outputs are done
        x = transform(images, train=True, gen=gen)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        losses[step] = loss.detach()
        correct += (logits.argmax(1) == y).sum()
        if step % cfg.log_every == 0 and not bar.disable:
            if shown is not None and (shown[1] is None or shown[1].query()):
                bar.set_postfix(loss=f"{float(shown[0]):.4f}")
            shown = copy_to_host(loss)
    # Each process saw its slice of every global batch: average / sum across processes.
    batch_loss = accelerator.reduce(losses, "mean")
    correct = accelerator.reduce(correct, "sum")
    return {"train_loss": float(batch_loss.mean()), "train_acc": int(correct) / (steps *
            cfg.batch_size), "batch_loss": [round(v, 5) for v in batch_loss.tolist()]}


def prepare_output_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run folder: ``output_dir``, or runs/<recipe>/<timestamp> agreed by all processes."""
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        stamp = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]
        out = Path("runs") / (cfg.recipe or "run") / stamp
    held = [name for name in ("metrics.jsonl", "model.safetensors") if (out / name).exists()]
    if held and not cfg.overwrite:
        raise ConfigError(f"output_dir {out} already holds a run ({', '.join(held)}); "
                          f"pass another output_dir=PATH, or overwrite=true to replace it.")
    return out


def use_cpu_cores(accelerator: Accelerator) -> None:
    """On CPU, give each local process its share of the cores.

    ``accelerate launch`` without a config sets OMP_NUM_THREADS=1, which halves CPU speed on a
    2-core machine; a process that got one thread takes its share instead.
    """
    if accelerator.device.type != "cpu" or torch.get_num_threads() > 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local))
    if share > 1:
        torch.set_num_threads(share)
        log.info("using %d CPU threads per process (OMP_NUM_THREADS was 1)", share)


def main(cfg: Config) -> dict:
    """Train, evaluate after every epoch, export; return the last epoch's metrics."""
    tcfg = cfg.train
    precision = resolve_mixed_precision(tcfg.mixed_precision, PartialState().device)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
    use_cpu_cores(accelerator)
    out = prepare_output_dir(cfg, accelerator)
    set_seed(tcfg.seed)
    tune_backends(accelerator.device)
    if tcfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} is the global batch and must "
                          f"divide evenly over {accelerator.num_processes} processes.")

    with accelerator.main_process_first():  # the main process fills any download cache first
        # Weights first: a run that cannot get them should fail in seconds, not after the data.
        fetched = (fetch_state_dict(cfg.model.name, cfg.model.weights)
                   if cfg.model.pretrained else None)
        train_data, test_data, source = load_data(cfg.data)
    if len(train_data) < tcfg.batch_size:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} exceeds the {len(train_data)} "
                          f"training images; lower train.batch_size or raise data.train_limit.")
    in_chans = cfg.model.in_chans or train_data.images.shape[1]
    model, loaded = build_model(cfg.model, num_classes=len(train_data.classes),
                                in_chans=in_chans, image_size=cfg.data.image_size,
                                fetched=fetched)
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
    log.info("mixed precision %s, %s, data on the %s%s", precision,
             "channels_last" if tcfg.channels_last else "NCHW", placement,
             ", torch.compile" if tcfg.compile else "")
    if precision == "bf16" and device.type == "cpu":
        check_cpu_bf16(model, in_chans, cfg.data.image_size)
        if not bf16_is_native(device):
            log.warning("this CPU has no bf16 arithmetic (AVX512-BF16/AMX): bf16 is emulated "
                        "and slower than fp32 here; set train.mixed_precision=fp32")
    model.to(device, memory_format=transform.memory_format)
    optimizer = make_optimizer(model, tcfg)
    steps_per_epoch = len(train_data) // tcfg.batch_size  # the last partial batch is dropped
    scheduler = make_scheduler(optimizer, tcfg, steps_per_epoch)
    model, optimizer, eval_loader = accelerator.prepare(
        model, optimizer, index_loader(len(test_data), tcfg.eval_batch_size))
    gen = torch.Generator(device=device).manual_seed(tcfg.seed * 7919 + accelerator.process_index)
    compile_time = None
    if tcfg.compile:
        sample = gather(train_data, torch.arange(tcfg.batch_size // accelerator.num_processes),
                        device)
        compile_time = compile_model(model, *sample, transform, accelerator, tcfg.compile_mode)
        accelerator.print(f"compiled the model in {compile_time:.1f} s (not counted as training)")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    records: list[dict] = []
    for epoch in range(1, tcfg.epochs + 1):
        start = time.perf_counter()
        record = {"epoch": epoch}
        record.update(train_one_epoch(model, train_data, transform, optimizer, scheduler,
                                      accelerator, tcfg, epoch, gen,
                                      cfg.data.workers if placement == "host" else None))
        train_time = time.perf_counter() - start  # the .tolist() above waited for the device
        check_finite(record["batch_loss"], epoch, steps_per_epoch)
        record.update(evaluate(model, test_data, transform, eval_loader, accelerator))
        if epoch == 1 and compile_time is not None:
            record["compile_time"] = round(compile_time, 3)
        record.update(mixed_precision=precision, placement=placement,
                      lr=scheduler.get_last_lr()[0], epoch_time=round(train_time, 3),
                      eval_time=round(time.perf_counter() - start - train_time, 3),
                      train_images_per_sec=round(steps_per_epoch * tcfg.batch_size / train_time,
                                                 1))
        records.append(record)
        accelerator.print(
            f"epoch {epoch}/{tcfg.epochs}: train loss {record['train_loss']:.4f}, train acc "
            f"{record['train_acc']:.4f}, test acc {record['test_acc']:.4f}, "
            f"{train_time:.1f} s ({record['train_images_per_sec']:.0f} img/s)")
        if accelerator.is_main_process:
            atomic_write_text(out / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in records))

    if accelerator.is_main_process:
        meta = {"architecture": cfg.model.name, "num_classes": len(train_data.classes),
                "in_chans": in_chans, "image_size": cfg.data.image_size,
                "norm": cfg.model.norm, "mean": list(mean),
                "std": list(std), "interpolation": "bilinear", "class_names": train_data.classes,
                "recipe": cfg.recipe, "pretrained": loaded.source if loaded else None,
                "data": source, "finetune_version": __version__}
        save_model(accelerator.unwrap_model(model), meta, out)
    accelerator.wait_for_everyone()
    final = records[-1]
    accelerator.print(f"{accuracy_line(final)}; run saved to {out}")
    accelerator.end_training()
    return final

