"""Multi-label evaluation: each image's sigmoid probabilities gathered exactly once across
processes, then mAP, micro and macro F1 at the per-class thresholds, per-class AP and F1
(:mod:`finetune.multilabel_metrics`), and the thresholds tuned on a validation split.

A model trained on multi-label data has a sigmoid per class; its ``model.json`` says
``"task": "multilabel"`` and holds the ``thresholds`` over which a tag is predicted."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from finetune.data.loader import BatchTransform, Data, check_counted, eval_batches
from finetune.errors import TrainingError
from finetune.multilabel_metrics import multilabel_summary, tune_thresholds
from finetune.step import mark_step_begin

DEFAULT_THRESHOLD = 0.5


class Scored(NamedTuple):
    """Every scored image's probabilities, tags and binary cross-entropy, and how many bad
    images were skipped."""

    probs: torch.Tensor  # float32 (N, classes)
    targets: torch.Tensor  # uint8 (N, classes)
    losses: torch.Tensor  # float64 (N,): the mean over classes
    skipped: int


def sigmoid_probs(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Per-class probabilities (float32) of a batch given as one or more normalized views:
    the views' sigmoids averaged."""
    return torch.stack([torch.sigmoid(model(v).float()) for v in views]).mean(0)


def _scores(model: nn.Module, views: list[torch.Tensor], targets: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, each image's loss)`` of a batch: the loss from the logits (exact where
    a float32 sigmoid rounds to 0 or 1), or for several views from their averaged sigmoids."""
    if len(views) == 1:
        logits = model(views[0]).float()
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return torch.sigmoid(logits), losses.mean(1)
    probs = sigmoid_probs(model, views)
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    return probs, F.binary_cross_entropy(p, targets.double(), reduction="none").mean(1).float()


@torch.inference_mode()
def gathered_scores(model: nn.Module, data: Data, transform: BatchTransform, loader,
                    accelerator: Accelerator, tta: tuple[bool, int] | None = None) -> Scored:
    """One row per image of ``data`` scored once, in its order, over every process, on the
    CPU (a bad image skipped is counted, not scored)."""
    model.eval()
    dev = accelerator.device
    k = len(data.classes)
    probs, losses = torch.zeros(len(data), k), torch.zeros(len(data))
    targets = torch.zeros(len(data), k, dtype=torch.uint8)
    seen = torch.zeros(len(data), dtype=torch.long)
    scored = torch.zeros(len(data), dtype=torch.bool)
    for idx, images, labels, decoded in eval_batches(data, loader, dev):
        mark_step_begin()
        views = transform.views(images, *tta) if tta else [transform(images)]
        p, loss = _scores(model, views, labels.float())
        good = torch.ones(len(idx), dtype=torch.bool, device=dev) if decoded is None \
            else decoded.bool()
        p, loss, y, idx, good = accelerator.gather_for_metrics((p, loss, labels.float(), idx,
                                                                good))
        idx = idx.cpu()
        probs[idx], losses[idx], targets[idx] = p.cpu(), loss.cpu(), y.cpu().to(torch.uint8)
        seen.index_add_(0, idx, torch.ones_like(idx))
        scored[idx] = good.cpu()
    check_counted(seen, False, len(data))
    skipped = int((~scored).sum())
    return Scored(probs[scored], targets[scored], losses[scored].double(),
                  skipped + getattr(data, "dropped", 0))


def score(scored: Scored, thresholds: torch.Tensor | None = None) -> dict:
    """The ``test_*`` numbers of multi-label scores: ``test_acc`` is the exact-match ratio
    (every tag right), ``test_map`` the mean over classes of average precision; F1,
    precision and recall at ``thresholds`` (None: 0.5 each); ``per_class`` AP and F1."""
    probs, targets = scored.probs, scored.targets
    n = len(probs)
    if n == 0:
        raise TrainingError("every test image was skipped as bad; check the test data.")
    if thresholds is None:
        thresholds = torch.full((probs.shape[1],), DEFAULT_THRESHOLD)
    s = multilabel_summary(probs, targets, thresholds)
    correct = int(((probs >= thresholds) == targets.bool()).all(1).sum())
    result = {"test_acc": correct / n, "test_loss": float(scored.losses.mean()),
              "test_correct": correct, "test_total": n, "test_map": s["map"],
              "test_f1_micro": s["f1_micro"], "test_f1_macro": s["f1_macro"],
              "test_precision_micro": s["precision_micro"],
              "test_recall_micro": s["recall_micro"],
              "per_class": [{k: (None if v != v else v) for k, v in row.items()}  # NaN: null
                            for row in s["per_class"]]}
    if scored.skipped:
        result["test_skipped"] = scored.skipped
    return result


def evaluate_multilabel(model: nn.Module, data: Data, transform: BatchTransform, loader,
                        accelerator: Accelerator, tta: tuple[bool, int] | None = None,
                        thresholds: torch.Tensor | None = None) -> dict:
    """What :func:`finetune.evaluation.evaluate` returns, for multi-label data (:func:`score`)."""
    return score(gathered_scores(model, data, transform, loader, accelerator, tta), thresholds)


def validation_thresholds(model: nn.Module, data: Data | None, transform: BatchTransform,
                          loader, accelerator: Accelerator, classes: int) -> dict:
    """``model.json``'s ``thresholds`` (one per class) and where they came from: tuned for the
    best F1 of each class on the validation split, else 0.5 each."""
    if data is None:
        return {"thresholds": [DEFAULT_THRESHOLD] * classes,
                "thresholds_from": "0.5 (no validation split to tune them on: data.val_split)"}
    probs, targets, _, _ = gathered_scores(model, data, transform, loader, accelerator)
    tuned = tune_thresholds(probs, targets, DEFAULT_THRESHOLD)
    return {"thresholds": tuned.tolist(),  # exact: a rounded cut could land on a score
            "thresholds_from": f"tuned for each class's best F1 on the validation split "
                               f"({len(probs)} images)"}


def export_thresholds(t, best: Path | None, parts, accelerator: Accelerator, meta: dict,
                      ema_meta: dict) -> None:
    """Adds :func:`validation_thresholds` of the weights a run exports to their ``meta``
    (``best``: early stopping's file, loaded on every process once the main one has written
    it), and of the weight average (``t.ema``) to ``ema_meta``: each model its own."""
    if best is not None:
        accelerator.wait_for_everyone()
        t.raw.load_state_dict(load_file(best))
    classes = len(parts.train_data.classes)
    for model, into in [(t.model, meta)] + ([(t.ema.module, ema_meta)] if t.ema else []):
        into.update(validation_thresholds(model, parts.val_data, parts.transform, t.val_loader,
                                          accelerator, classes))
