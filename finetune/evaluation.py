"""``finetune evaluate``: rebuild an exported model, measure it, write the report files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.data import DataError, load_data
from finetune.data.loader import index_loader
from finetune.files import atomic_write, atomic_write_text
from finetune.inference import load
from finetune.speed import make_accelerator
from finetune.train import accuracy_line, evaluate


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


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path,
                   title: str) -> None:
    """Row-normalized confusion matrix with counts, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = torch.tensor(confusion, dtype=torch.float64)
    rates = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k), dpi=120)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def evaluate_run(run_dir: str | Path, overrides: list[str]) -> dict:
    """Evaluate the model exported in ``run_dir`` on its recipe's test data (``overrides`` may
    point ``data.*`` elsewhere); write ``evaluation.json`` and ``confusion.png`` there."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file() and (run_dir.parent / "config.yaml").is_file():
        saved = run_dir.parent / "config.yaml"  # <run>/ema/: the weight average of a run
    cfg = load_config(([f"recipe={saved}"] if saved.is_file() else []) + overrides)
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
    loader = accelerator.prepare(index_loader(len(test_data), cfg.train.eval_batch_size))
    with accelerator.autocast():
        result = evaluate(predictor.model, test_data.to(accelerator.device),
                          predictor.transform, loader, accelerator)
    result["per_class"] = per_class(result["confusion"], meta["class_names"])
    result["data"] = source
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "evaluation.json", json.dumps(result, indent=2) + "\n")
        plot_confusion(result["confusion"], meta["class_names"], run_dir / "confusion.png",
                       f"{meta['architecture']}: accuracy {result['test_acc']:.4f}")
        accelerator.print(f"{accuracy_line(result)} on {source}")
        width = max(len(name) for name in meta["class_names"])
        accelerator.print(f"{'class':<{width}}  precision  recall  support")
        for row in result["per_class"]:
            accelerator.print(f"{row['class']:<{width}}  {row['precision']:9.4f}  "
                              f"{row['recall']:6.4f}  {row['support']:7d}")
        accelerator.print(f"wrote {run_dir / 'evaluation.json'} and {run_dir / 'confusion.png'}")
    return result
