"""What the peer scripts of bench/peers.py share: the common flags, the report of events to
bench/peers.py (JSON lines in the file named by PEERS_EVENTS), the first-training-step probe,
and the optimizer and schedule that every peer is given (finetune's recipe resnet18_cpu_fmnist).

Without PEERS_EVENTS set, the scripts run as plain training scripts and the events are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version

import torch
from torch import nn


def parser(description: str) -> argparse.ArgumentParser:
    """The flags of every peer script (the defaults are finetune's resnet18_cpu_fmnist)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/")
    p.add_argument("--out", required=True, help="folder for the tool's own files")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mean", type=float, required=True, help="the training images' mean (0-1)")
    p.add_argument("--std", type=float, required=True, help="the training images' std (0-1)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    return p


def emit(event: str, **fields) -> None:
    """Append one event to $PEERS_EVENTS (printed when it is not set)."""
    record = {"event": event, "time": time.time(), **fields}
    path = os.environ.get("PEERS_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    else:
        print("peer event:", json.dumps(record), file=sys.stderr)


def emit_versions(*packages: str) -> None:
    emit("versions", versions={name: version(name) for name in packages})


def probe_first_step() -> None:
    """Report the first forward pass in training mode with gradients on (the first training
    step) and the parameter count of the first module with parameters that it enters: the whole
    network, since a forward enters the outermost module first (modules without parameters, such
    as a loss or a batch transform, are passed over). A global forward pre-hook, removed after it
    fired, so that the training that follows runs without it."""
    handle = None

    def hook(module: nn.Module, args: tuple) -> None:
        # The Trainer passes keyword arguments only, which a global hook does not see.
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not (module.training and torch.is_grad_enabled()
                and next(module.parameters(), None) is not None
                and (x is None or x.device.type != "meta")):  # not finetune's shape trial
            return
        handle.remove()
        emit("first_step", params=sum(p.numel() for p in module.parameters()),
             module=type(module).__name__)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)


def decay_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, never on norms and biases (finetune's and
    timm's default: timm's create_optimizer_v2 filters bias and norm parameters)."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def sgd(groups: list[dict], args: argparse.Namespace) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)


def one_cycle(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
              total_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """finetune's train.schedule=onecycle: torch's OneCycleLR stepped per optimizer step,
    without momentum cycling."""
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (a 4-step smoke run); a
    # hair less puts the peak at step 0, where finetune's schedule_factor puts it then.
    pct_start = 0.25 if total_steps != 4 else 0.2499
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=pct_start,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4, cycle_momentum=False)
