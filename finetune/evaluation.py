"""Evaluation: accuracy and loss over a test set counted exactly once across processes (used
every epoch by training), and ``finetune evaluate``, which rebuilds an exported model,
measures it and writes the report files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from finetune.config import load_config
from finetune.data import DataError, ImageData, load_data
from finetune.data.hub import StreamedSplit
from finetune.data.loader import BatchTransform, Data, eval_batches, prepared_eval_loader
from finetune.errors import TrainingError
from finetune.files import atomic_write_text
from finetune.inference import load
from finetune.runs import CONFUSION, EVALUATION, config_file
from finetune.speed import make_accelerator


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, transform: BatchTransform, loader,
             accelerator: Accelerator) -> dict:
    """Accuracy and mean loss over every sample of ``data`` exactly once, across processes.

    ``loader`` is an Accelerate-prepared :func:`eval_loader` of ``data`` (resident on the
    device or in host memory, or streamed). A bad image skipped (``data.skip_bad_images``) is
    counted as seen but not scored: ``test_skipped``.
    """
    model.eval()
    k = len(data.classes)
    # confusion[true, predicted], accumulated on the device: no host sync per batch.
    confusion = torch.zeros(k * k, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    # A stream's processes read disjoint rows and sum once at the end; otherwise each batch is
    # gathered (Accelerate drops the last one's padding) and every index is counted.
    streamed = isinstance(data, StreamedSplit)
    if streamed:  # processes may read different numbers of batches: no DDP collective here
        model = accelerator.unwrap_model(model)
    seen = torch.zeros(1 if streamed else len(data), dtype=torch.long, device=accelerator.device)
    for idx, images, labels, decoded in eval_batches(data, loader, accelerator.device):
        torch.compiler.cudagraph_mark_step_begin()
        logits = model(transform(images))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        scored = torch.ones_like(labels) if decoded is None else decoded.long()
        preds = logits.argmax(1)
        if streamed:
            seen += len(labels)
        else:
            preds, labels, loss, idx, scored = accelerator.gather_for_metrics(
                (preds, labels, loss, idx, scored))
            seen.index_add_(0, idx, torch.ones_like(idx))
        # index_add_, not bincount: bincount reads its input's max on the host (a sync).
        confusion.index_add_(0, labels * k + preds, scored)
        loss_sum += (loss * scored).sum()
    if streamed:
        confusion, loss_sum, seen = (accelerator.reduce(t, "sum") for t in
                                     (confusion, loss_sum, seen))
    confusion = confusion.view(k, k).cpu()
    n, correct = int(confusion.sum()), int(confusion.trace())
    if n == 0:
        raise TrainingError("every test image was skipped as bad; check the test data.")
    if streamed and int(seen) != len(data):
        raise DataError(f"the streamed test split gave {int(seen)} rows, not the {len(data)} "
                        f"expected (data.eval_limit, or the dataset card's size); set "
                        f"data.eval_limit to at most the split's size.")
    if not streamed and not bool((seen == 1).all()):  # each sample once, over all processes
        raise TrainingError(f"evaluation counted {int((seen == 0).sum())} test samples never "
                            f"and {int((seen > 1).sum())} more than once; this is a bug in "
                            f"finetune's sharding, please report it.")
    result = {"test_acc": correct / n, "test_loss": float(loss_sum) / n,
              "test_correct": correct, "test_total": n, "confusion": confusion.tolist()}
    if n < len(data):
        result["test_skipped"] = len(data) - n
    return result


def _eval_loader(data: Data, predictor, cfg, accelerator: Accelerator) -> tuple:
    """``(loader, data)`` reading ``data`` as training's evaluation did, from model.json:
    resident images batch-resized, or files and rows decoded, resized and cropped."""
    if isinstance(data, ImageData) and predictor.crop_pct != 1.0:
        data = data.as_samples()  # it was streamed when trained
    elif isinstance(data, ImageData):
        data = data.to(accelerator.device)
    loader = prepared_eval_loader(data, predictor.image_transform, predictor.need,
                                  predictor.meta["image_size"], cfg.train.eval_batch_size,
                                  cfg.data.workers, cfg.data.skip_bad_images, accelerator)
    return loader, data


def prefixed(prefix: str, result: dict) -> dict:
    """``test_acc`` -> ``val_acc`` etc.: another split's or model's numbers beside the test's."""
    return {f"{prefix}_{k.removeprefix('test_')}": v for k, v in result.items()
            if k != "confusion"}


def accuracy_line(result: dict) -> str:
    """What `finetune train` ends with and `finetune evaluate` prints: the same line."""
    return (f"test accuracy {result['test_acc']:.4f} "
            f"({result['test_correct']}/{result['test_total']})")


def per_class(confusion: list[list[int]], class_names: list[str]) -> list[dict]:
    """Precision, recall and support per class from ``confusion[true][predicted]``.

    A class never predicted has precision 0 (no true positives to credit), as scikit-learn's
    ``zero_division=0``.
    """
    m = torch.tensor(confusion, dtype=torch.float64)
    tp, predicted, actual = m.diag(), m.sum(dim=0), m.sum(dim=1)
    rows = []
    for i, name in enumerate(class_names):
        rows.append({"class": name, "precision": float(tp[i] / predicted[i]) if predicted[i]
                     else 0.0, "recall": float(tp[i] / actual[i]) if actual[i] else 0.0,
                     "support": int(actual[i])})
    return rows


def evaluate_run(run_dir: str | Path, overrides: list[str]) -> dict:
    """Evaluate the model exported in ``run_dir`` on its recipe's test data (``overrides`` may
    point ``data.*`` elsewhere); write ``evaluation.json`` and ``confusion.png`` there."""
    from finetune.plots import plot_confusion  # matplotlib: only when there is a figure

    run_dir = Path(run_dir)
    saved = config_file(run_dir)
    cfg = load_config(([f"recipe={saved}"] if saved else []) + overrides)
    # The run's own precision and memory layout: its test accuracy is then reproduced exactly
    # (bf16 against fp32 can flip a borderline prediction).
    accelerator, _ = make_accelerator(cfg.train.mixed_precision)
    # The model and preprocessing as `finetune predict` rebuilds them.
    predictor = load(run_dir, device=accelerator.device)
    if cfg.train.channels_last:
        predictor.model.to(memory_format=torch.channels_last)
        predictor.transform.memory_format = torch.channels_last
    meta = predictor.meta
    with accelerator.main_process_first():
        _, test_data, source = load_data(cfg.data)
    if test_data.classes != meta["class_names"]:
        raise DataError(f"the test data's classes {test_data.classes} differ from the model's "
                        f"{meta['class_names']}")
    loader, test_data = _eval_loader(test_data, predictor, cfg, accelerator)
    with accelerator.autocast():
        result = evaluate(predictor.model, test_data, predictor.transform, loader, accelerator)
    result["per_class"] = per_class(result["confusion"], meta["class_names"])
    result["data"] = source
    if accelerator.is_main_process:
        atomic_write_text(run_dir / EVALUATION, json.dumps(result, indent=2) + "\n")
        plot_confusion(result["confusion"], meta["class_names"], run_dir / CONFUSION,
                       f"{meta['architecture']}: accuracy {result['test_acc']:.4f}")
        accelerator.print(f"{accuracy_line(result)} on {source}")
        width = max(len(name) for name in meta["class_names"])
        accelerator.print(f"{'class':<{width}}  precision  recall  support")
        for row in result["per_class"]:
            accelerator.print(f"{row['class']:<{width}}  {row['precision']:9.4f}  "
                              f"{row['recall']:6.4f}  {row['support']:7d}")
        accelerator.print(f"wrote {run_dir / EVALUATION} and {run_dir / CONFUSION}")
    return result
