"""Batch-norm statistics that match the weights ("precise BN"; Wu & Johnson, *Rethinking
"Batch" in BatchNorm*, 2021; ``torch.optim.swa_utils.update_bn``).

During training each batch norm keeps an exponential average of batch statistics with a small
momentum (0.1, torchvision's MobileNetV3 0.01): over an epoch of a few steps it still remembers
the weights of epochs ago, and evaluation, the export and every prediction normalise with stale
numbers (a 1,437-image folder at batch 256: 96 % train, 24 % test accuracy). Here the running
statistics of the batch norms that train are recomputed over training batches without
gradients, as an equal-weight average over batches (momentum 1/(k+1) for batch k), then
averaged over processes so that all hold the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import nn

from finetune.config import TrainConfig
from finetune.data.loader import BatchTransform, TrainLoader
from finetune.errors import ConfigError
from finetune.models import batchnorm
from finetune.optim import StagePlan, enter_epoch

log = logging.getLogger(__name__)

NORMS = (nn.modules.batchnorm._BatchNorm, batchnorm._BatchNorm)


def training_norms(model: nn.Module) -> list[str]:
    """The names of the batch norms that update running statistics in ``model``'s current
    mode (those of frozen stages and ``finetune.bn=freeze_stats`` are in eval mode)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, NORMS) and m.training and getattr(m, "running_mean", None)
            is not None]


def norms_that_train(model: nn.Module, plan: StagePlan, bn: str) -> list[str]:
    """:func:`training_norms` as the first epoch leaves ``model`` (``finetune.freeze``,
    ``finetune.bn``): put in training mode, its frozen batch norms in eval mode."""
    model.train()
    enter_epoch(model, plan, 1, bn)
    return training_norms(model)


def refresh_bn(cfg: TrainConfig, models: list[nn.Module], loader: TrainLoader,
               transform: BatchTransform, epoch: int, accelerator: Accelerator) -> dict:
    """Batch-norm statistics recomputed for the weights an epoch ended with (the model, and
    the weight average if any), over the epoch's first training batches without augmentation
    (``train.precise_bn``); ``{"precise_bn_images": N}``, or nothing without batch norms."""
    names = training_norms(models[0])  # before evaluation switches the model to eval mode
    if not names:
        return {}
    counts = loader.read, loader.bad  # the batches are read again: counted once
    budget = cfg.precise_bn_images // accelerator.num_processes
    used = 0
    for model in models:
        batches = (transform(images) for images, _ in loader.epoch(epoch))
        used = recompute_bn(model, names, batches, budget, accelerator)
    loader.read, loader.bad = counts
    if epoch in (1, cfg.epochs):
        log.info("batch-norm statistics recomputed over %d training images after epoch %d "
                 "(train.precise_bn_images=%d; train.precise_bn=false keeps the running "
                 "averages)", used, epoch, cfg.precise_bn_images)
    return {"precise_bn_images": used}


FEW_STEPS = 20  # fewer steps per epoch than this: a warning with a smaller batch
MIN_SUGGESTED = 16  # the smallest batch the warning suggests


def check_batches(cfg: TrainConfig, steps: int, images: int, processes: int,
                  norms: list[str]) -> None:
    """For a model whose batch norms train (``norms``): refuse slices of one image (a batch
    norm's statistics of one value per channel are undefined), and warn when an epoch is too
    few steps for the running averages to follow the weights, suggesting a batch size."""
    if not norms:
        return
    per_slice = cfg.batch_size // processes // cfg.accumulate
    if per_slice < 2:
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} over {processes} process(es) and "
            f"train.accumulate={cfg.accumulate} gives batch-norm slices of {per_slice} image; "
            f"batch norm ({norms[0]}, ...) needs at least 2. Raise train.batch_size, or lower "
            f"train.accumulate.")
    if steps >= FEW_STEPS:
        return
    batch = 2 ** max(0, (images // FEW_STEPS).bit_length() - 1)
    batch = max(batch, MIN_SUGGESTED, 2 * processes * cfg.accumulate)
    hint = f" (e.g. train.batch_size={batch})" if batch < cfg.batch_size else ""
    log.warning("an epoch is only %d steps of train.batch_size=%d over %d training images: "
                "the batch norms' running statistics lag the weights%s; consider a smaller "
                "batch%s.", steps, cfg.batch_size, images,
                " (recomputed after each epoch: train.precise_bn)" if cfg.precise_bn
                else ", and train.precise_bn=false does not recompute them", hint)


@torch.no_grad()
def recompute_bn(model: nn.Module, names: list[str], batches: Iterable[torch.Tensor],
                 max_images: int, accelerator: Accelerator) -> int:
    """Recompute the running statistics of the batch norms ``names`` of ``model`` over
    ``batches`` (preprocessed inputs) until ``max_images`` (this process's share) were seen;
    the other layers run in eval mode. Returns the images used, all processes together;
    ``model``'s modes, momenta and other state are as they were."""
    modes = {m: m.training for m in model.modules()}
    norms = [model.get_submodule(n) for n in names]
    momenta = [m.momentum for m in norms]
    counts = [m.num_batches_tracked.clone() for m in norms]
    model.eval()
    for m in norms:
        m.train()
    seen, k = 0, 0
    try:
        for x in batches:
            if seen >= max_images:
                break
            for m in norms:  # the k-th batch weighs 1/(k+1): an equal average of all batches
                m.momentum = 1.0 / (k + 1)
            with accelerator.autocast():  # forward, not __call__: a compiled model's
                model.forward(x)          # compiled graph is for training mode
            seen, k = seen + len(x), k + 1
    finally:
        for m, momentum, count in zip(norms, momenta, counts, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for m, mode in modes.items():
            m.training = mode
    if accelerator.num_processes > 1:  # one set of statistics on every process
        for m in norms:
            m.running_mean.copy_(accelerator.reduce(m.running_mean, "mean"))
            m.running_var.copy_(accelerator.reduce(m.running_var, "mean"))
    return int(accelerator.reduce(torch.tensor(seen, device=accelerator.device), "sum"))
