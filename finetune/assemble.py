"""Assembly: everything a run needs before its first step, from a config and an Accelerator.

``check_model`` refuses what the model cannot do (unknown name, an image size it cannot take,
freezing settings its stages do not allow) before any data or weights load; ``assemble`` loads
the data and the model (pretrained weights, normalization, frozen stages) and places both;
``prepare_training`` adds the optimizer, the schedule and Accelerate's wrapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from finetune.config import Config
from finetune.data import ImageData, load_data, validation_split
from finetune.data.loader import BatchTransform, index_loader, match_channels, place
from finetune.ema import EMA
from finetune.errors import ConfigError
from finetune.export import meta_beside, model_meta
from finetune.models import LoadedWeights, build_model, create_model, fetch_state_dict
from finetune.models.pretrained import channel_stats
from finetune.models.registry import IMAGENET_MEAN, IMAGENET_STD, check_model_name
from finetune.optim import (
    StagePlan,
    freeze_for_good,
    make_optimizer,
    make_scheduler,
    plan_stages,
    schedule_factor,
)
from finetune.speed import bf16_is_native, check_cpu_bf16
from finetune.step import StepOptions

log = logging.getLogger(__name__)


def check_model(cfg: Config) -> None:
    """The model the config names, built on the meta device (shapes only, instantly): its
    name, the image size and the freezing settings are checked."""
    try:
        check_model_name(cfg.model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e} (see `finetune models`).") from None
    try:
        with torch.device("meta"):
            model = create_model(cfg.model.name, num_classes=10,
                                 in_chans=cfg.model.in_chans or 1,
                                 image_size=cfg.data.image_size, norm=cfg.model.norm)
    except ValueError as e:
        raise ConfigError(f"model.name={cfg.model.name} cannot take data.image_size="
                          f"{cfg.data.image_size}: {e}") from None
    plan_stages(model, cfg.finetune)


def normalization(mode: str, loaded: LoadedWeights | None, train: ImageData, in_chans: int
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the model sees: the pretrained weights', the training images', or none."""
    if mode == "none":
        return (0.0,) * in_chans, (1.0,) * in_chans
    elif mode in ("auto", "imagenet") and loaded is not None:
        return loaded.mean, loaded.std
    elif mode == "imagenet":
        return channel_stats(IMAGENET_MEAN, in_chans), channel_stats(IMAGENET_STD, in_chans)
    elif mode in ("auto", "dataset"):
        sample = match_channels(train.images[:10_000].float().div(255), in_chans)
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
    else:
        raise ConfigError(f"unknown data.normalize '{mode}'; valid: auto, imagenet, dataset, none")


@dataclass
class Parts:
    """A run's model (on its device, stages frozen, not yet wrapped), data and preprocessing."""

    model: nn.Module
    loaded: LoadedWeights | None
    plan: StagePlan
    transform: BatchTransform
    train_data: ImageData
    test_data: ImageData
    val_data: ImageData | None
    source: str
    placement: str  # "device": the data lives there; "host": batches are streamed
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def meta(self, cfg: Config) -> dict:
        """The exported model's ``model.json``."""
        return model_meta(architecture=cfg.model.name, class_names=self.train_data.classes,
                          in_chans=self.in_chans, image_size=cfg.data.image_size,
                          norm=cfg.model.norm, mean=self.mean, std=self.std, recipe=cfg.recipe,
                          pretrained=self.loaded.source if self.loaded else None,
                          data=self.source, train_images=len(self.train_data),
                          test_images=len(self.test_data))


def _load(cfg: Config, accelerator: Accelerator
          ) -> tuple[tuple[dict, str] | None, ImageData, ImageData, ImageData | None, str]:
    """Pretrained weights (first: a run that cannot get them fails in seconds, not after the
    data), then the data; the main process fills any download cache first."""
    with accelerator.main_process_first():
        fetched = (fetch_state_dict(cfg.model.name, cfg.model.weights)
                   if cfg.model.pretrained else None)
        train_data, test_data, source = load_data(cfg.data)
    val_data = None
    if cfg.data.val_split:  # carved from the training images: early stopping never sees test
        train_data, val_data = validation_split(train_data, cfg.data.val_split, cfg.train.seed)
    if len(train_data) < cfg.train.batch_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                          f"{len(train_data)} training images; lower train.batch_size or raise "
                          f"data.train_limit.")
    return fetched, train_data, test_data, val_data, source


def assemble(cfg: Config, accelerator: Accelerator, precision: str) -> Parts:
    """Load the data and the model (pretrained weights, frozen stages) and place both; shared
    by training and the learning-rate finder."""
    tcfg = cfg.train
    if tcfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} is the global batch and must "
                          f"divide evenly over {accelerator.num_processes} processes.")
    fetched, train_data, test_data, val_data, source = _load(cfg, accelerator)
    in_chans = cfg.model.in_chans or train_data.images.shape[1]
    model, loaded = build_model(cfg.model, num_classes=len(train_data.classes),
                                in_chans=in_chans, image_size=cfg.data.image_size,
                                fetched=fetched, class_names=train_data.classes,
                                exported=meta_beside(cfg.model.weights))
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
        val_data = val_data.to(device) if val_data is not None else None
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
    log.info("stages %s (train.lr %g)", plan.describe(), tcfg.lr)
    return Parts(model, loaded, plan, transform, train_data, test_data, val_data, source,
                 placement, in_chans, mean, std)


@dataclass
class Training:
    """What the loop steps: the wrapped model and its optimizer, schedule and loaders."""

    model: nn.Module  # as Accelerate prepared it (DDP on several processes)
    raw: nn.Module  # the model itself, which checkpoints, the average and the export read
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    factor: Callable[[int], float]  # the schedule: step -> fraction of train.lr
    opts: StepOptions
    steps_per_epoch: int
    eval_loader: DataLoader
    val_loader: DataLoader | None
    ema: EMA | None
    gen: torch.Generator  # augmentation draws, one stream per process


def prepare_training(cfg: Config, parts: Parts, accelerator: Accelerator) -> Training:
    """Optimizer and schedule over the model's stages, Accelerate's wrapping, the weight
    average (checkpoints save the schedule and the average themselves: nothing pickled)."""
    tcfg = cfg.train
    optimizer = make_optimizer(parts.model, tcfg, parts.plan)
    steps_per_epoch = len(parts.train_data) // tcfg.batch_size  # the last partial batch drops
    factor = schedule_factor(tcfg, steps_per_epoch)
    scheduler = make_scheduler(optimizer, factor)
    model, optimizer, eval_loader = accelerator.prepare(
        parts.model, optimizer, index_loader(len(parts.test_data), tcfg.eval_batch_size))
    val_loader = (accelerator.prepare(index_loader(len(parts.val_data), tcfg.eval_batch_size))
                  if parts.val_data is not None else None)
    raw = accelerator.unwrap_model(model)
    ema = EMA(raw, tcfg.ema_decay) if tcfg.ema_decay else None
    gen = torch.Generator(device=accelerator.device).manual_seed(
        tcfg.seed * 7919 + accelerator.process_index)
    return Training(model, raw, optimizer, scheduler, factor,
                    StepOptions.from_config(cfg, len(parts.train_data.classes)),
                    steps_per_epoch, eval_loader, val_loader, ema, gen)
