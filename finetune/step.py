"""The training step, written once: training, the learning-rate finder and the compile
warm-up all run this function.

One step takes one (per-process) batch, already normalized and augmented: Mixup/CutMix, then
the batch in ``accumulate`` slices under ``accelerator.accumulate`` (forward, loss, backward),
then, on the last slice, the gradients of stages that have not thawed yet are dropped, the
global gradient norm clipped and the optimizer stepped; the scheduler and the weight average
follow. Nothing here reads a value back from the device.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from finetune.config import Config
from finetune.errors import ConfigError
from finetune.mixing import mix_batch, mix_params, soft_targets

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3


@dataclass(frozen=True)
class StepOptions:
    """What a step does besides forward, backward and update; the defaults add nothing."""

    num_classes: int
    seed: int = 0
    accumulate: int = 1
    clip_grad_norm: float = 0.0
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch: float = 0.5
    # The loss's per-class weights, on the device (None: all 1).
    class_weights: torch.Tensor | None = field(default=None, compare=False)
    # Multi-label: a sigmoid per class (binary cross-entropy on multi-hot targets), each
    # class's positives weighted by pos_weight (None: 1).
    multilabel: bool = False
    pos_weight: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def from_config(cls, cfg: Config, num_classes: int, labels: torch.Tensor | None = None,
                    device: torch.device | None = None) -> StepOptions:
        """The step's options; ``labels`` (the training labels) for balanced class weights."""
        t, d = cfg.train, cfg.data
        multilabel = labels is not None and labels.ndim == 2
        weights = None if multilabel else class_weights(t.class_weights, num_classes, labels)
        positive = pos_weight(t.pos_weight, labels) if multilabel else None
        return cls(num_classes, t.seed, t.accumulate, t.clip_grad_norm, t.label_smoothing,
                   d.mixup, d.cutmix, d.mix_switch,
                   None if weights is None else weights.to(device), multilabel,
                   None if positive is None else positive.to(device))

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def mark_step_begin() -> None:
    """``torch.compiler.cudagraph_mark_step_begin()`` (a new step: the last one's outputs are
    done with), only once CUDA graph trees exist. Its first call imports inductor's compiler
    (3.4 s of a CPU process's start with torch._dynamo), which a model that was never compiled
    does not need; before a compiled model's first call there is no earlier output to release.
    """
    if "torch._inductor.cudagraph_trees" in sys.modules:
        torch.compiler.cudagraph_mark_step_begin()


def class_weights(setting: str | list[float], num_classes: int,
                  labels: torch.Tensor | None) -> torch.Tensor | None:
    """``train.class_weights`` as a float32 tensor (None: unweighted): ``balanced`` gives class
    c the weight n / (k * n_c) (scikit-learn's), a class without images 0."""
    if setting == "none":
        return None
    if setting == "balanced":
        if labels is None:
            raise ConfigError("train.class_weights=balanced counts the training labels, which a "
                              "stream (data.streaming=true) does not know up front; give the "
                              "weights as a list [w0,w1,...].")
        counts = torch.bincount(labels.cpu(), minlength=num_classes).float()
        present = counts > 0
        out = torch.zeros(num_classes)
        out[present] = len(labels) / (int(present.sum()) * counts[present])
        return out
    if len(setting) != num_classes:
        raise ConfigError(f"train.class_weights has {len(setting)} weights for {num_classes} "
                          f"classes; give one per class, in the order of the classes.")
    return torch.tensor([float(w) for w in setting])


def pos_weight(setting: str, labels: torch.Tensor) -> torch.Tensor | None:
    """``train.pos_weight`` for multi-hot ``labels``: balanced gives each class its negatives
    over its positives (1 for a class no image has), none gives None."""
    if setting == "none":
        return None
    if setting == "balanced":
        positives = labels.cpu().double().sum(0)
        ratio = (len(labels) - positives) / positives.clamp_min(1)
        return torch.where(positives > 0, ratio, 1.0).float()
    raise ConfigError(f"invalid train.pos_weight={setting!r}; valid: none, balanced.")


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weights: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    """Cross-entropy, class-weighted as torch weights hard targets (the sum divided by the
    weights of the targets); soft targets (Mixup/CutMix) are divided by theirs alike, so that
    mixing does not rescale the loss."""
    if weights is None or target.ndim == 1:
        return F.cross_entropy(logits, target, weight=weights, label_smoothing=smoothing)
    return (F.cross_entropy(logits, target, weight=weights, reduction="sum")
            / (target.float() @ weights).sum())


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct predictions in a batch: the top class, or (multi-hot labels) every tag right at
    the sigmoid's 0.5 (exact match)."""
    if labels.ndim == 2:
        return ((logits > 0) == labels.bool()).all(1).sum()
    return (logits.argmax(1) == labels).sum()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
               x: torch.Tensor, y: torch.Tensor, opts: StepOptions, *, epoch: int = 1,
               step: int = 0, thawing: Sequence[nn.Parameter] = (),
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
               ema: ModelEmaV3 | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch ``x`` (normalized) with labels ``y``; returns the loss
    and the number of correct predictions, both still on the device. ``epoch`` and ``step``
    seed the Mixup/CutMix draw; ``thawing`` are parameters whose gradients are dropped."""
    target = y
    if opts.mixing:  # soft targets, label smoothing included
        mix = mix_params(opts.mixup, opts.cutmix, opts.mix_switch, x.shape[-1], opts.seed,
                         epoch, step)
        x, target = mix_batch(x, y, opts.num_classes, opts.label_smoothing, *mix)
    elif opts.multilabel:  # float targets, label smoothing included
        target = soft_targets(y, opts.num_classes, opts.label_smoothing)
    smoothing = 0.0 if opts.mixing or opts.multilabel else opts.label_smoothing
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    # The augmented batch is sliced, so accumulation changes memory, not the data.
    for xs, ts, ys in zip(x.chunk(opts.accumulate), target.chunk(opts.accumulate),
                          y.chunk(opts.accumulate), strict=True):
        with accelerator.accumulate(model):
            mark_step_begin()
            logits = model(xs)
            loss = (F.binary_cross_entropy_with_logits(logits, ts, pos_weight=opts.pos_weight)
                    if opts.multilabel
                    else weighted_cross_entropy(logits, ts, opts.class_weights, smoothing))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                for p in thawing:
                    p.grad = None
                if opts.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), opts.clip_grad_norm)
            optimizer.step()  # with accumulation: a no-op until the last slice
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() / opts.accumulate
        correct += hits(logits, ys)
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(accelerator.unwrap_model(model))  # the model itself, not DDP's wrapper
    return loss_sum, correct
