"""Mixup and CutMix on the device, one mixing draw per batch (timm's batch mode).

A batch is mixed with itself reversed: image ``i`` with image ``n-1-i``, and its target becomes
``lam * onehot(y_i) + (1 - lam) * onehot(y_{n-1-i})`` (label smoothing applied to both; a
multi-label image's multi-hot row takes the place of the one-hot one). The
draws (lam, which of the two, the CutMix box) come from a host generator seeded by run seed,
epoch and step: they need no device sync and repeat exactly on resume.
"""

from __future__ import annotations

import math
import random

import torch


def mix_params(alpha_mixup: float, alpha_cutmix: float, switch: float, size: int, seed: int,
               epoch: int, step: int) -> tuple[str, float, tuple[int, int, int, int] | None]:
    """``(kind, lam, box)`` for one batch: kind is mixup or cutmix; box (y0, y1, x0, x1) is
    CutMix's pasted rectangle, with lam corrected to the area actually kept."""
    rng = random.Random(f"mix-{seed}-{epoch}-{step}")  # str seeds hash the same in every process
    use_cutmix = alpha_cutmix > 0 and (alpha_mixup <= 0 or rng.random() < switch)
    if not use_cutmix:
        return "mixup", rng.betavariate(alpha_mixup, alpha_mixup), None
    lam = rng.betavariate(alpha_cutmix, alpha_cutmix)
    cut = math.sqrt(1 - lam)
    h, w = round(size * cut), round(size * cut)
    cy, cx = rng.randrange(size), rng.randrange(size)
    y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, size)
    x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, size)
    return "cutmix", 1 - (y1 - y0) * (x1 - x0) / (size * size), (y0, y1, x0, x1)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (as ``F.cross_entropy(label_smoothing=)`` uses);
    multi-hot labels (N, classes) smoothed alike, each 1 to ``1 - s + s/k``, each 0 to ``s/k``
    (timm's BinaryCrossEntropy)."""
    off = smoothing / num_classes
    if labels.ndim == 2:
        return labels.float() * (1 - smoothing) + off
    out = torch.full((len(labels), num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1 - smoothing + off)


def mix_batch(x: torch.Tensor, labels: torch.Tensor, num_classes: int, smoothing: float,
              kind: str, lam: float, box: tuple[int, int, int, int] | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed images (N, C, H, W, normalised) and their soft targets (N, classes)."""
    targets = soft_targets(labels, num_classes, smoothing)
    partner = x.flip(0)
    if kind == "mixup":
        x = x * lam + partner * (1 - lam)
    elif kind == "cutmix":
        y0, y1, x0, x1 = box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    else:
        raise ValueError(f"unknown mixing {kind!r}; valid: mixup, cutmix")
    return x, targets * lam + targets.flip(0) * (1 - lam)
