"""Multi-label evaluation: each image's sigmoid probabilities gathered exactly once across
processes, then mAP, micro and macro F1 at the per-class thresholds, per-class AP and F1
(:mod:`finetune.multilabel_metrics`), and the thresholds tuned on a validation split.

A model trained on multi-label data has a sigmoid per class; its ``model.json`` says
``"task": "multilabel"`` and holds the ``thresholds`` over which a tag is predicted."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from finetune.data.loader import BatchTransform, Data, check_counted, eval_batches
from finetune.errors import TrainingError
from finetune.multilabel_metrics import multilabel_summary, tune_thresholds

DEFAULT_THRESHOLD = 0.5


def sigmoid_probs(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Per-class probabilities (float32) of a batch given as one or more normalized views:
    the views' sigmoids averaged."""
    return torch.stack([torch.sigmoid(model(v).float()) for v in views]).mean(0)


def bce_per_image(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each image's binary cross-entropy, the mean over its classes (probabilities clamped
    away from 0 and 1, as a float32 sigmoid saturates)."""
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    return F.binary_cross_entropy(p, targets.double(), reduction="none").mean(1)


@torch.inference_mode()
def gathered_scores(model: nn.Module, data: Data, transform: BatchTransform, loader,
                    accelerator: Accelerator, tta: tuple[bool, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(probs, targets, skipped)`` on the CPU, one row per image of ``data`` scored once,
    in its order, over every process (a bad image skipped is counted, not scored)."""
    model.eval()
    dev = accelerator.device
    k = len(data.classes)
    probs = torch.zeros(len(data), k)
    targets = torch.zeros(len(data), k, dtype=torch.uint8)
    seen = torch.zeros(len(data), dtype=torch.long)
    scored = torch.zeros(len(data), dtype=torch.bool)
    for idx, images, labels, decoded in eval_batches(data, loader, dev):
        torch.compiler.cudagraph_mark_step_begin()
        views = transform.views(images, *tta) if tta else [transform(images)]
        p = sigmoid_probs(model, views)
        good = torch.ones(len(idx), dtype=torch.bool, device=dev) if decoded is None \
            else decoded.bool()
        p, y, idx, good = accelerator.gather_for_metrics((p, labels.float(), idx, good))
        idx = idx.cpu()
        probs[idx], targets[idx] = p.cpu(), y.cpu().to(torch.uint8)
        seen.index_add_(0, idx, torch.ones_like(idx))
        scored[idx] = good.cpu()
    check_counted(seen, False, len(data))
    skipped = int((~scored).sum())
    return probs[scored], targets[scored], skipped + getattr(data, "dropped", 0)


def score(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor | None = None,
          skipped: int = 0) -> dict:
    """The ``test_*`` numbers of multi-label scores: ``test_acc`` is the exact-match ratio
    (every tag right), ``test_map`` the mean over classes of average precision; F1,
    precision and recall at ``thresholds`` (None: 0.5 each); ``per_class`` AP and F1."""
    n = len(probs)
    if n == 0:
        raise TrainingError("every test image was skipped as bad; check the test data.")
    if thresholds is None:
        thresholds = torch.full((probs.shape[1],), DEFAULT_THRESHOLD)
    s = multilabel_summary(probs, targets, thresholds)
    correct = int(((probs >= thresholds) == targets.bool()).all(1).sum())
    result = {"test_acc": correct / n, "test_loss": float(bce_per_image(probs, targets).mean()),
              "test_correct": correct, "test_total": n, "test_map": s["map"],
              "test_f1_micro": s["f1_micro"], "test_f1_macro": s["f1_macro"],
              "test_precision_micro": s["precision_micro"],
              "test_recall_micro": s["recall_micro"],
              "per_class": [{k: (None if v != v else v) for k, v in row.items()}  # NaN: null
                            for row in s["per_class"]]}
    if skipped:
        result["test_skipped"] = skipped
    return result


def evaluate_multilabel(model: nn.Module, data: Data, transform: BatchTransform, loader,
                        accelerator: Accelerator, tta: tuple[bool, int] | None = None,
                        thresholds: torch.Tensor | None = None) -> dict:
    """What :func:`finetune.evaluation.evaluate` returns, for multi-label data (:func:`score`)."""
    probs, targets, skipped = gathered_scores(model, data, transform, loader, accelerator, tta)
    return score(probs, targets, thresholds, skipped)


def validation_thresholds(model: nn.Module, data: Data | None, transform: BatchTransform,
                          loader, accelerator: Accelerator, classes: int) -> dict:
    """``model.json``'s ``thresholds`` (one per class) and where they came from: tuned for the
    best F1 of each class on the validation split, else 0.5 each."""
    if data is None:
        return {"thresholds": [DEFAULT_THRESHOLD] * classes,
                "thresholds_from": "0.5 (no validation split to tune them on: data.val_split)"}
    probs, targets, _ = gathered_scores(model, data, transform, loader, accelerator)
    tuned = tune_thresholds(probs, targets, DEFAULT_THRESHOLD)
    return {"thresholds": tuned.tolist(),  # exact: a rounded cut could land on a score
            "thresholds_from": f"tuned for each class's best F1 on the validation split "
                               f"({len(probs)} images)"}


def export_thresholds(t, best: Path | None, parts, accelerator: Accelerator) -> dict:
    """:func:`validation_thresholds` of the weights a run exports (``best``: early stopping's
    file, loaded on every process once the main one has written it)."""
    if best is not None:
        accelerator.wait_for_everyone()
        t.raw.load_state_dict(load_file(best))
    return validation_thresholds(t.model, parts.val_data, parts.transform, t.val_loader,
                                 accelerator, len(parts.train_data.classes))
