"""``finetune lr-find``: the learning-rate range test (Smith 2015, as fastai's ``lr_find``).

A short run from the recipe's starting weights raises the learning rate geometrically from
``start_lr`` to ``end_lr``, one training step per rate (the training step itself: stage
scales, frozen stages, accumulation, clipping and Mixup/CutMix of the recipe apply), and
records the loss; it stops early once the smoothed loss passes 4x its minimum. The suggestion
is the rate where the smoothed loss falls fastest (per log-rate), before its minimum. Nothing
is exported: the weights are thrown away.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch

from finetune.assemble import check_model, set_up, train_loader
from finetune.config import Config, load_config, split_options
from finetune.errors import ConfigError
from finetune.files import atomic_write_text
from finetune.optim import enter_epoch, make_optimizer, make_scheduler
from finetune.speed import start_processes
from finetune.step import StepOptions, train_step

log = logging.getLogger(__name__)
OPTIONS = {"start_lr": float, "end_lr": float, "steps": int}


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The rate where the smoothed loss falls fastest against log(rate) before its minimum,
    the slope taken across a tenth of the sweep on either side, so that a few noisy batches
    (the average still settling at the start) do not decide. Too short a fall: a tenth of the
    rate at the minimum (fastai's other rule)."""
    stop = min(range(len(smoothed)), key=smoothed.__getitem__)
    w = max(2, len(lrs) // 10)  # a tenth of the sweep on each side: batch noise averages out
    points = range(w, stop - w)
    if len(points) < 3:
        return lrs[stop] / 10
    logs = [math.log(lr) for lr in lrs]
    slope = {i: (smoothed[i + w] - smoothed[i - w]) / (logs[i + w] - logs[i - w]) for i in points}
    return lrs[min(slope, key=slope.__getitem__)]


def lr_find(cfg: Config, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 100,
            out: Path | None = None) -> dict:
    """Sweep the learning rate; write ``lr_find.json`` and ``lr_find.png`` into ``out``."""
    if not 0 < start_lr < end_lr or steps < 5:
        raise ConfigError(f"lr-find needs 0 < start_lr < end_lr and steps >= 5, got "
                          f"start_lr={start_lr}, end_lr={end_lr}, steps={steps}.")
    tcfg = cfg.train
    check_model(cfg)
    state = start_processes()
    parts, accelerator, _ = set_up(cfg, state)
    # Base rate 1: the schedule's factor is the rate itself, start_lr * ratio**step.
    optimizer = make_optimizer(parts.model, dataclasses.replace(tcfg, lr=1.0), parts.plan)
    ratio = (end_lr / start_lr) ** (1 / (steps - 1))
    scheduler = make_scheduler(optimizer, lambda step: start_lr * ratio ** step)
    model, optimizer = accelerator.prepare(parts.model, optimizer)
    opts = StepOptions.from_config(cfg, len(parts.train_data.classes),
                                   getattr(parts.train_data, "labels", None), accelerator.device)
    gen = torch.Generator(device=accelerator.device).manual_seed(tcfg.seed)
    model.train()
    thawing = enter_epoch(parts.model, parts.plan, 1, cfg.finetune.bn)
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    loader = train_loader(cfg, parts, accelerator)
    batches = itertools.chain.from_iterable(map(loader.epoch, itertools.count(1)))
    for i, (images, y) in zip(range(steps), batches, strict=False):
        lrs.append(start_lr * ratio ** i)
        x = parts.transform(images, train=True, gen=gen)
        loss, _ = train_step(model, optimizer, accelerator, x, y, opts, step=i,
                             thawing=thawing, scheduler=scheduler)
        value = float(accelerator.reduce(loss, "mean"))  # one sync per rate: needed
        avg = 0.98 * avg + 0.02 * value  # fastai's smoothing, bias-corrected below
        losses.append(value)
        smoothed.append(avg / (1 - 0.98 ** (i + 1)))
        best = min(best, smoothed[-1])
        if not math.isfinite(value) or smoothed[-1] > 4 * best:
            break
    result = {"suggested_lr": suggest(lrs, smoothed), "min_loss_lr": lrs[smoothed.index(best)],
              "lr": lrs, "loss": losses, "smoothed_loss": smoothed,
              "stopped_early": len(lrs) < steps, "recipe": cfg.recipe}
    if accelerator.is_main_process:
        from finetune.plots import plot_lr_find  # matplotlib: only when there is a figure

        out = out or Path("runs") / "lr_find" / (cfg.recipe or "run") / time.strftime(
            "%Y%m%d-%H%M%S")
        atomic_write_text(out / "lr_find.json", json.dumps(result, indent=2) + "\n")
        plot_lr_find(result, out / "lr_find.png")
        accelerator.print(f"suggested train.lr={result['suggested_lr']:.3g} (steepest descent; "
                          f"the loss was lowest at {result['min_loss_lr']:.3g}); wrote "
                          f"{out / 'lr_find.json'} and {out / 'lr_find.png'}")
    accelerator.end_training()
    return result


def main(args: list[str]) -> dict:
    """``finetune lr-find recipe=NAME [start_lr=1e-7] [end_lr=10] [steps=100]
    [output_dir=DIR] [key=value ...]``."""
    given, rest = split_options(args, tuple(OPTIONS))
    options = {}
    for key, value in given.items():
        try:
            options[key] = OPTIONS[key](value)
        except ValueError:
            raise ConfigError(f"{key}={value}: expected a number.") from None
    cfg = load_config(rest)
    return lr_find(cfg, out=Path(cfg.output_dir) if cfg.output_dir else None, **options)
