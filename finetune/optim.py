"""Optimizer and learning-rate schedule for fine-tuning: parameters grouped by network stage,
each stage with its own rate (head multiplier, layer-wise decay) and frozen until its epoch.

Stages run from the input to the classifier: for ResNets ``stem, layer1..layer4, head``; for
VGG/AlexNet the feature blocks between poolings, the classifier's hidden layers, ``head``; for
any other model ``body, head`` (head: the last linear layer).

Freezing is done two ways, so that it stays correct with several processes (parameters must not
change ``requires_grad`` once DistributedDataParallel wraps the model):
- stages frozen for the whole run get ``requires_grad=False`` before the model is wrapped: no
  gradients, no optimizer state, no compute for their weight gradients;
- stages that unfreeze at a later epoch (``finetune.unfreeze_at``) keep their gradients but have
  a learning rate of zero, and their gradients are dropped before each step, so the optimizer
  leaves them and its state for them untouched until they thaw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finetune.config import FinetuneConfig, TrainConfig
from finetune.errors import ConfigError

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(stage name, [module prefixes]), ...]`` from the input to the classifier."""
    model = getattr(model, "_orig_mod", model)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNets
        layers = [f"layer{i}" for i in range(1, 5)]
        stem = [name for name, _ in model.named_children()
                if name not in layers and name != head and _has_params(getattr(model, name))]
        out = [("stem", stem)] + [(name, [name]) for name in layers]
    elif isinstance(getattr(model, "features", None), nn.Sequential):  # VGG, AlexNet
        out, block = [], []
        for name, m in model.features.named_children():
            block.append(f"features.{name}")
            if isinstance(m, nn.MaxPool2d):
                out.append((f"features{len(out) + 1}", block))
                block = []
        if block:
            out.append((f"features{len(out) + 1}", block))
        hidden = [f"classifier.{n}" for n, m in model.classifier.named_children()
                  if f"classifier.{n}" != head and _has_params(m)]
        if hidden:
            out.append(("classifier", hidden))
    else:
        out = [("body", [name for name, m in model.named_children()
                         if name != head and _has_params(m)])]
    out = [(name, prefixes) for name, prefixes in out if prefixes]
    return out + ([("head", [head])] if head else [])


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _in(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@dataclass
class StagePlan:
    """Per stage: its learning-rate scale and the epoch from which it trains (0: from the start,
    None: never)."""

    names: list[str]
    prefixes: list[list[str]]
    scale: list[float]
    trains_from: list[int | None]

    def frozen(self, i: int, epoch: int | None = None) -> bool:
        """Whether stage ``i`` does not train in ``epoch`` (1-based; None: ever, i.e. never
        trains)."""
        start = self.trains_from[i]
        return start is None or (epoch is not None and epoch < start)

    def frozen_prefixes(self, epoch: int | None = None) -> list[str]:
        """Module prefixes of the stages frozen in ``epoch`` (None: frozen for the whole run)."""
        return [q for i, prefixes in enumerate(self.prefixes) if self.frozen(i, epoch)
                for q in prefixes]


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
    scale = []
    for i, name in enumerate(names):
        if name == "head":
            scale.append(cfg.head_lr_mult)
        else:  # the stage next to the head gets decay^1, the stem decay^body
            scale.append(cfg.layer_decay ** (body - i))
    return StagePlan(names, [p for _, p in found], scale, trains_from)


def freeze_for_good(model: nn.Module, plan: StagePlan, bn: str) -> None:
    """``requires_grad=False`` for stages that never train (and for batch-norm weights with
    ``finetune.bn=freeze``); call before the model is wrapped for distribution."""
    never = plan.frozen_prefixes()
    for name, p in model.named_parameters():
        if _in(name, never):
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
    that thaw later): their gradients are to be dropped before each step."""
    frozen = plan.frozen_prefixes(epoch)
    for name, m in model.named_modules():
        if isinstance(m, BN_TYPES) and (bn != "train" or _in(name, frozen)):
            m.eval()
    return [p for n, p in model.named_parameters() if p.requires_grad and _in(n, frozen)]


def make_optimizer(model: nn.Module, cfg: TrainConfig, plan: StagePlan | None = None
                   ) -> torch.optim.Optimizer:
    """SGD or AdamW over one parameter group per (stage, decay or not): weight decay only on
    conv and linear weights, never on norms and biases; each group's ``lr_scale`` is its
    stage's. Parameters that do not require gradients are left out.

    The fused implementation (one kernel for all parameters) is used where the parameters'
    device has one; build the optimizer after moving the model.
    """
    plan = plan or plan_stages(model, FinetuneConfig())
    named = [(n, p) for n, p in getattr(model, "_orig_mod", model).named_parameters()
             if p.requires_grad]
    groups = []
    for i, prefixes in enumerate(plan.prefixes):
        mine = [p for n, p in named if _in(n, prefixes)]
        for decay in (True, False):
            params = [p for p in mine if (p.ndim > 1) == decay]
            if params:
                groups.append({"params": params, "stage": i, "lr_scale": plan.scale[i],
                               "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr": cfg.lr * plan.scale[i]})
    grouped = sum(len(g["params"]) for g in groups)
    if grouped != len(named):  # a parameter outside every stage would silently never train
        raise ConfigError(f"{len(named) - grouped} parameters belong to no stage of "
                          f"{type(model).__name__}; this is a bug in finetune.optim.stages.")
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
                for _, p in named)
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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                   plan: StagePlan | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the whole run, per group: the schedule's factor, times the
    group's stage scale, times zero while its stage is frozen."""
    factor = schedule_factor(cfg, steps_per_epoch)
    for group in optimizer.param_groups:  # LambdaLR multiplies initial_lr: make that train.lr
        group["lr"] = cfg.lr
        group.setdefault("lr_scale", 1.0)

    def for_group(group: dict) -> Callable[[int], float]:
        stage, scale = group.get("stage") if plan else None, group["lr_scale"]

        def lam(step: int) -> float:
            frozen = stage is not None and plan.frozen(stage, step // steps_per_epoch + 1)
            return 0.0 if frozen else scale * factor(step)
        return lam

    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             [for_group(g) for g in optimizer.param_groups])
