"""Optimizer and learning-rate schedule for fine-tuning: parameters grouped by the stages the
model declares (``group_matcher``, see ``finetune.models.interface``), each stage with its own
rate scale (head multiplier, layer-wise decay) and frozen until its epoch.

A frozen stage is frozen one of two ways, so that it stays correct with several processes
(parameters must not change ``requires_grad`` once DistributedDataParallel wraps the model):
- stages frozen for the whole run get ``requires_grad=False`` before the model is wrapped: no
  gradients, no optimizer state, no compute for their weight gradients;
- stages that unfreeze at a later epoch (``finetune.unfreeze_at``) keep computing gradients,
  which the training step drops before each update until they thaw, so the optimizer leaves
  them and its state for them untouched.

The scheduler alone sets each group's ``lr``: ``train.lr`` x schedule x the group's
``lr_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finetune.config import FinetuneConfig, TrainConfig
from finetune.errors import ConfigError
from finetune.models.interface import stages, unwrap

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class StagePlan:
    """Per stage, from the input to the head: its name, parameter names, learning-rate scale
    and the epoch from which it trains (0: from the start, None: never)."""

    names: list[str]
    params: list[list[str]]
    scale: list[float]
    trains_from: list[int | None]

    def frozen(self, i: int, epoch: int | None = None) -> bool:
        """Whether stage ``i`` does not train in ``epoch`` (1-based; None: ever, i.e. never
        trains)."""
        start = self.trains_from[i]
        return start is None or (epoch is not None and epoch < start)

    def frozen_params(self, epoch: int | None = None) -> set[str]:
        """Parameter names of the stages frozen in ``epoch`` (None: for the whole run)."""
        return {n for i, names in enumerate(self.params) if self.frozen(i, epoch) for n in names}

    def describe(self) -> str:
        """``stem (frozen), layer4 (frozen until epoch 3, lr x0.7), head (trains, lr x10)``."""
        parts = []
        for name, when, scale in zip(self.names, self.trains_from, self.scale, strict=True):
            state = "frozen" if when is None else f"frozen until epoch {when}" if when else \
                "trains"
            parts.append(f"{name} ({state}, lr x{scale:.3g})")
        return ", ".join(parts)


def plan_stages(model: nn.Module, cfg: FinetuneConfig) -> StagePlan:
    """Which stages are frozen and when they thaw, and each stage's rate scale."""
    found = stages(model)
    names = [n for n, _ in found]
    has_head = names[-1] == "head"
    body = len(names) - has_head
    if cfg.freeze == "none":
        frozen = 0
    elif cfg.freeze == "backbone":
        frozen = body
    elif cfg.freeze.startswith("stages:") and cfg.freeze[7:].isdigit():
        frozen = int(cfg.freeze[7:])
        if not 0 <= frozen <= body:
            raise ConfigError(f"finetune.freeze={cfg.freeze}: this model has {body} stages "
                              f"before its head ({', '.join(names[:body])}).")
    else:
        raise ConfigError(f"invalid finetune.freeze={cfg.freeze!r}; valid: none, backbone, "
                          f"stages:N (the first N of {', '.join(names[:body])}).")
    if len(cfg.unfreeze_at) > frozen:
        raise ConfigError(f"finetune.unfreeze_at lists {len(cfg.unfreeze_at)} epochs but "
                          f"finetune.freeze={cfg.freeze} freezes {frozen} stage"
                          f"{'' if frozen == 1 else 's'}; thaw at most one per frozen stage.")
    if sorted(cfg.unfreeze_at) != list(cfg.unfreeze_at) or any(e < 2 for e in cfg.unfreeze_at):
        raise ConfigError(f"finetune.unfreeze_at={list(cfg.unfreeze_at)} must be increasing "
                          f"epochs >= 2 (epoch 1 trains what freeze leaves trainable).")
    trains_from: list[int | None] = [0] * len(names)
    for i in range(frozen):
        trains_from[i] = None
    # Gradual unfreezing thaws the deepest frozen stage first (nearest the head).
    for k, epoch in enumerate(cfg.unfreeze_at):
        trains_from[frozen - 1 - k] = epoch
    # The head gets its multiplier; the stage next to it decay^1, the first one decay^body.
    scale = [cfg.head_lr_mult if name == "head" else cfg.layer_decay ** (body - i)
             for i, name in enumerate(names)]
    return StagePlan(names, [p for _, p in found], scale, trains_from)


def _module_names(params: set[str]) -> set[str]:
    return {name.rpartition(".")[0] for name in params}


def freeze_for_good(model: nn.Module, plan: StagePlan, bn: str) -> None:
    """``requires_grad=False`` for stages that never train (and for batch-norm weights with
    ``finetune.bn=freeze``); call before the model is wrapped for distribution."""
    never = plan.frozen_params()
    for name, p in model.named_parameters():
        if name in never:
            p.requires_grad_(False)
    if bn == "freeze":
        for m in model.modules():
            if isinstance(m, BN_TYPES):
                for p in m.parameters():
                    p.requires_grad_(False)


def enter_epoch(model: nn.Module, plan: StagePlan, epoch: int, bn: str) -> list[nn.Parameter]:
    """After ``model.train()``, set up ``epoch``: batch norms of frozen stages, and all of them
    unless ``finetune.bn=train``, normalise with their running statistics and stop updating
    them. Returns the parameters that have gradients but must not change this epoch (stages
    that thaw later): the training step drops their gradients."""
    model = unwrap(model)
    frozen = plan.frozen_params(epoch)
    frozen_modules = _module_names(frozen)
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES) and (bn != "train" or name in frozen_modules):
            m.eval()
    return [p for n, p in model.named_parameters() if p.requires_grad and n in frozen]


def make_optimizer(model: nn.Module, cfg: TrainConfig, plan: StagePlan | None = None
                   ) -> torch.optim.Optimizer:
    """SGD or AdamW over one parameter group per (stage, decay or not): weight decay only on
    conv and linear weights, never on norms and biases; each group carries its stage's
    ``lr_scale`` (the scheduler applies it). Parameters that do not require gradients are
    left out.

    The fused implementation (one kernel for all parameters) is used where the parameters'
    device has one; build the optimizer after moving the model.
    """
    model = unwrap(model)
    plan = plan or plan_stages(model, FinetuneConfig())
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    groups = []
    for i, names in enumerate(plan.params):
        mine = [params[n] for n in names if n in trainable]
        for decay in (True, False):
            chosen = [p for p in mine if (p.ndim > 1) == decay]
            if chosen:
                groups.append({"params": chosen, "stage": i, "lr_scale": plan.scale[i],
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    grouped = sum(len(g["params"]) for g in groups)
    if grouped != len(trainable):  # a parameter outside every stage would silently never train
        raise ConfigError(f"{len(trainable) - grouped} parameters belong to no stage of "
                          f"{type(model).__name__}; its group_matcher misses them.")
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
                for p in params.values() if p.requires_grad)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    elif cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    else:
        raise ConfigError(f"unknown train.optimizer '{cfg.optimizer}'; valid: sgd, adamw")


def schedule_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate at optimizer step ``s`` (0-based) as a fraction of ``train.lr``."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        # torch's OneCycleLR (cos annealing, div_factor 25, final_div_factor 1e4) step for step.
        up = float((warmup if warmup else 0.25 * total) - 1)
        start, end = 1 / 25, 1 / 25 / 1e4

        def factor(step: int) -> float:
            if step <= up:
                return _cos(start, 1.0, step / up if up > 0 else 1.0)
            return _cos(1.0, end, (step - up) / (total - 1 - up))
        return factor
    elif cfg.schedule in ("cosine", "constant", "step"):
        milestones = [(e - 1) * steps_per_epoch for e in cfg.step_epochs]  # epoch e starts

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if cfg.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            if cfg.schedule == "step":
                return cfg.step_gamma ** sum(step >= m for m in milestones)
            return 1.0
        return factor
    else:
        raise ConfigError(f"unknown train.schedule '{cfg.schedule}'; "
                          f"valid: constant, cosine, onecycle, step")


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def make_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """The one place a group's ``lr`` is set: per step, the optimizer's base rate
    (``train.lr``) x ``factor(step)`` x the group's ``lr_scale``."""
    def for_group(scale: float) -> Callable[[int], float]:
        return lambda step: scale * factor(step)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [for_group(g.setdefault("lr_scale", 1.0)) for g in optimizer.param_groups])
