"""``finetune lr-find``: the learning-rate range test (Smith 2015, as fastai's ``lr_find``).

A short run from the recipe's starting weights raises the learning rate geometrically from
``start_lr`` to ``end_lr``, one training batch per rate, and records the loss; it stops early
once the smoothed loss passes 4x its minimum. The suggestion is the rate where the smoothed loss
falls fastest (per log-rate), before its minimum. Stage scales and frozen stages of the recipe
apply, as in training. Nothing is exported: the weights are thrown away.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from finetune.config import Config, load_config
from finetune.data.loader import batches_on, train_batches
from finetune.errors import ConfigError
from finetune.files import atomic_write, atomic_write_text
from finetune.optim import enter_epoch, make_optimizer
from finetune.speed import make_accelerator, tune_backends
from finetune.train import setup

log = logging.getLogger(__name__)


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
    accelerator, precision = make_accelerator(tcfg.mixed_precision)
    set_seed(tcfg.seed)
    tune_backends(accelerator.device)
    run = setup(cfg, accelerator, precision)
    optimizer = make_optimizer(run.model, tcfg, run.plan)
    model, optimizer = accelerator.prepare(run.model, optimizer)
    gen = torch.Generator(device=accelerator.device).manual_seed(tcfg.seed)
    data = run.train_data

    def batches():
        for epoch in itertools.count(1):  # as many passes over the data as the sweep needs
            indices = train_batches(len(data), tcfg.batch_size, epoch, tcfg.seed,
                                    accelerator.process_index, accelerator.num_processes,
                                    data.images.device)
            yield from batches_on(data, indices, accelerator.device, None)

    model.train()
    thawing = enter_epoch(run.model, run.plan, 1, cfg.finetune.bn)
    ratio = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    for i, (images, y) in zip(range(steps), batches(), strict=False):
        lr = start_lr * ratio ** i
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        logits = model(run.transform(images, train=True, gen=gen))
        loss = F.cross_entropy(logits, y, label_smoothing=tcfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        for p in thawing:
            p.grad = None
        optimizer.step()
        value = float(accelerator.reduce(loss.detach(), "mean"))  # one sync per rate: needed
        avg = 0.98 * avg + 0.02 * value  # fastai's smoothing, bias-corrected below
        lrs.append(lr)
        losses.append(value)
        smoothed.append(avg / (1 - 0.98 ** (i + 1)))
        best = min(best, smoothed[-1])
        if not math.isfinite(value) or smoothed[-1] > 4 * best:
            break
    result = {"suggested_lr": suggest(lrs, smoothed), "min_loss_lr": lrs[smoothed.index(best)],
              "lr": lrs, "loss": losses, "smoothed_loss": smoothed,
              "stopped_early": len(lrs) < steps, "recipe": cfg.recipe}
    if accelerator.is_main_process:
        out = out or Path("runs") / "lr_find" / (cfg.recipe or "run") / time.strftime(
            "%Y%m%d-%H%M%S")
        atomic_write_text(out / "lr_find.json", json.dumps(result, indent=2) + "\n")
        plot(result, out / "lr_find.png")
        accelerator.print(f"suggested train.lr={result['suggested_lr']:.3g} (steepest descent; "
                          f"the loss was lowest at {result['min_loss_lr']:.3g}); wrote "
                          f"{out / 'lr_find.json'} and {out / 'lr_find.png'}")
    accelerator.end_training()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result["lr"], result["loss"], color="0.75", linewidth=0.8, label="loss per batch")
    ax.plot(result["lr"], result["smoothed_loss"], label="smoothed")
    ax.axvline(result["suggested_lr"], color="red", linestyle="--",
               label=f"suggested {result['suggested_lr']:.3g}")
    ax.set_xscale("log")
    # The divergence at the end would flatten everything else: show up to 1.5x the start.
    low, start = min(result["smoothed_loss"]), result["smoothed_loss"][0]
    ax.set_ylim(low - 0.1 * (start - low), 1.5 * start)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['recipe']}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(args: list[str]) -> dict:
    """``finetune lr-find recipe=NAME [start_lr=1e-7] [end_lr=10] [steps=100]
    [output_dir=DIR] [key=value ...]``."""
    options, rest = {}, []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("start_lr", "end_lr", "steps"):
            try:
                options[key] = int(value) if key == "steps" else float(value)
            except ValueError:
                raise ConfigError(f"{arg}: expected a number.") from None
        else:
            rest.append(arg)
    cfg = load_config(rest)
    return lr_find(cfg, out=Path(cfg.output_dir) if cfg.output_dir else None, **options)
