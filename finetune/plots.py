"""Every figure finetune draws (matplotlib, Agg backend), each written atomically as a PNG:
the report's, the confusion matrix of ``finetune evaluate`` and the learning-rate finder's.

The report's functions take runs grouped by label (``{label: [Run, ...]}``, one Run per seed)
and draw each label in one colour, so the figures of one report read together.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from finetune.files import atomic_write  # noqa: E402
from finetune.stats import mean_ci  # noqa: E402

Groups = dict[str, list]  # label -> runs (finetune.compare.Run), one per seed


def colour(i: int) -> str:
    return plt.get_cmap("tab10")(i % 10)


def save_figure(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path


def _mean_band(ax: plt.Axes, x: np.ndarray, per_seed: list[list[float]], c: str, label: str,
               style: str = "-") -> None:
    """Mean accuracy over seeds as a line; its 95 % interval as a band (two or more seeds)."""
    estimates = [mean_ci([s[i] for s in per_seed]) for i in range(len(x))]
    mean = np.array([e.mean for e in estimates])
    ax.plot(x, mean, style, color=c, label=label, marker="o", markersize=3)
    if all(e.half_width is not None for e in estimates):
        half = np.array([e.half_width for e in estimates])
        # An accuracy cannot leave [0, 1], whatever a 3-seed interval says.
        ax.fill_between(x, np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1), color=c,
                        alpha=0.15, linewidth=0)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve starts at step 1."""
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_loss(groups: Groups, path: Path) -> Path:
    """Training loss of every batch (mean over seeds, faint) and its moving average."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, runs) in enumerate(groups.items()):
        steps = min(sum(len(r["batch_loss"]) for r in run.records) for run in runs)
        if not steps:  # fitted on cached features (finetune.method=linear, knn): no batches
            continue
        losses = np.mean([[v for r in run.records for v in r["batch_loss"]][:steps]
                          for run in runs], axis=0)
        x = np.arange(1, steps + 1)
        ax.plot(x, losses, color=colour(i), alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(losses, max(1, steps // 30)), color=colour(i),
                label=f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        per_epoch = steps / max(1, len(runs[0].records))
        for e in range(1, len(runs[0].records)):
            ax.axvline(e * per_epoch, color="0.85", linewidth=0.6, zorder=0)
    ax.set_xlabel("training batch (grey lines: epoch ends)")
    ax.set_ylabel("training loss")
    ax.set_title("Loss per training batch (faint: every batch; solid: moving average)")
    if ax.lines:
        ax.legend()
    else:  # only runs fitted on cached features
        ax.text(0.5, 0.5, "no training batches (finetune.method=linear or knn)",
                ha="center", va="center", transform=ax.transAxes)
    return save_figure(fig, path)


def plot_accuracy(groups: Groups, path: Path) -> Path:
    """Train (dashed) and test (solid) accuracy per epoch, mean over seeds with 95 % band."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, runs) in enumerate(groups.items()):
        epochs = min(len(run.records) for run in runs)
        x = np.arange(1, epochs + 1)
        for key, style, what in (("test_acc", "-", "test"), ("train_acc", "--", "train")):
            if any(key not in r for run in runs for r in run.records[:epochs]):
                continue  # kNN has no training accuracy
            _mean_band(ax, x, [[r[key] for r in run.records[:epochs]] for run in runs],
                       colour(i), f"{label}: {what}", style)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("Train and test accuracy per epoch (band: 95 % interval over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_accuracy_vs_time(groups: Groups, path: Path) -> Path:
    """Test accuracy against cumulative training seconds, one line per run."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, runs) in enumerate(groups.items()):
        for j, run in enumerate(runs):
            t = np.cumsum([r["epoch_time"] for r in run.records])
            ax.plot(t, [r["test_acc"] for r in run.records], color=colour(i), marker="o",
                    markersize=3, alpha=0.8, label=label if j == 0 else None)
    ax.set_xlabel("training time, s (evaluation and compilation excluded)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against wall-clock training time (one line per seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_per_class(best: dict[str, tuple[list[str], list[list[int]]]], path: Path) -> Path:
    """Per-class test accuracy (recall) of each label's best run, as grouped bars."""
    # Every class of every label, in order of first appearance (runs on other data: their own).
    names = list(dict.fromkeys(n for classes, _ in best.values() for n in classes))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(1, len(best)) / 1.5), 4.2))
    width = 0.8 / len(best)
    for i, (label, (classes, confusion)) in enumerate(best.items()):
        m = np.array(confusion, dtype=float)
        recall = np.diag(m) / np.maximum(m.sum(axis=1), 1)
        ax.bar(np.array([names.index(c) for c in classes]) + (i - (len(best) - 1) / 2) * width,
               recall, width, color=colour(i), label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy of the class (recall)")
    ax.set_title("Per-class accuracy of each recipe's best run")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_data_efficiency(curves: dict[str, list[tuple[int, object]]], path: Path) -> Path:
    """Final test accuracy against training-set size: ``curves[label] = [(size, Estimate)]``."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (label, points) in enumerate(curves.items()):
        sizes = [s for s, _ in points]
        means = [e.mean for _, e in points]
        errors = [e.half_width or 0.0 for _, e in points]
        ax.errorbar(sizes, means, yerr=errors, color=colour(i), marker="o", capsize=4,
                    label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Data efficiency: accuracy against training-set size (bars: 95 % interval)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def plot_predictions(images: np.ndarray, true: list[str], predicted: list[str],
                     indices: list[int], title: str, path: Path, columns: int = 8) -> Path:
    """A grid of test images (uint8 N, C, H, W) titled with their index, true and predicted
    classes; wrong predictions in red with a red frame."""
    titles = [f"#{i} {t}\n" + (f"✓ {p}" if t == p else f"✗ {p}")
              for t, p, i in zip(true, predicted, indices, strict=False)]
    return plot_grid(images, titles, [t != p for t, p in zip(true, predicted, strict=False)],
                     title, path, columns)


def _show(ax: plt.Axes, image: np.ndarray) -> None:
    """A uint8 (C, H, W) image on ``ax``, filling the unit square (for overlays)."""
    picture = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    ax.imshow(picture, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255,
              extent=(0, 1, 1, 0))


def _frame_red(ax: plt.Axes) -> None:
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("red")
        spine.set_linewidth(2.5)


def plot_grid(images: np.ndarray, titles: list[str], red: list[bool], title: str, path: Path,
              columns: int = 8) -> Path:
    """A grid of images (uint8 N, C, H, W) with their titles; ``red`` ones framed in red."""
    rows = -(-len(images) // columns)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(1.55 * columns, (1.55 + 0.15 * lines) * rows + 0.4))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text, wrong in zip(axes.flat, images, titles, red, strict=False):
        _show(ax, image)
        ax.set_title(text, fontsize=7, color="red" if wrong else "black")
        if wrong:
            _frame_red(ax)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_cams(images: np.ndarray, cams: list[np.ndarray], titles: list[list[str]],
              red: list[bool], title: str, path: Path) -> Path:
    """One row per image: the image, then each of its heatmaps (H, W in [0, 1]) over it."""
    columns = 1 + len(cams)
    fig, axes = plt.subplots(len(images), columns, figsize=(1.9 * columns, 2.0 * len(images)
                                                            + 0.4), squeeze=False)
    for r, image in enumerate(images):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            _show(ax, image)
            if c:
                ax.imshow(cams[c - 1][r], cmap="jet", alpha=0.45, vmin=0, vmax=1,
                          extent=(0, 1, 1, 0))
            ax.set_title(titles[r][c], fontsize=7, color="red" if red[r] and not c else "black")
        if red[r]:
            _frame_red(axes[r][0])
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path,
                   title: str) -> Path:
    """Row-normalized confusion matrix with counts."""
    m = np.array(confusion, dtype=np.float64)
    rates = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k), dpi=120)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(fig, path, dpi=120)


def plot_pr_curves(curves: list[dict | None], class_names: list[str], ap: list[float | None],
                   path: Path, title: str) -> Path:
    """Multi-label: each tag's precision-recall curve, its average precision in the legend."""
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for curve, name, value in zip(curves, class_names, ap, strict=True):
        if curve is not None:  # a tag without positives in the test split has no curve
            ax.step(curve["recall"], curve["precision"], where="post", linewidth=1.2,
                    label=f"{name} (AP {value:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path, dpi=120)


def plot_reliability(calibration: list[list[float]], path: Path, title: str) -> Path:
    """Reliability diagram: per confidence bin, the accuracy against the mean confidence (a
    calibrated model follows the diagonal), and how many samples each bin holds."""
    count, confidence, hits = (np.array(row, dtype=np.float64) for row in calibration)
    bins = len(count)
    edges = np.linspace(0, 1, bins + 1)
    filled = count > 0
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="calibrated")
    ax.bar(edges[:-1][filled], hits[filled] / count[filled], width=1 / bins, align="edge",
           edgecolor="black", alpha=0.8, label="accuracy")
    ax.plot(confidence[filled] / count[filled], hits[filled] / count[filled], "o",
            color="red", markersize=3, label="(mean confidence, accuracy)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    bx.bar(edges[:-1], count / max(count.sum(), 1), width=1 / bins, align="edge",
           edgecolor="black", color="0.7")
    bx.set_xlabel("confidence (top softmax probability)")
    bx.set_ylabel("share")
    bx.set_xlim(0, 1)
    return save_figure(fig, path, dpi=120)


def plot_training_loss(records: list[dict], path: Path) -> Path:
    """One run's training loss per step (smoothed) and test loss per epoch."""
    losses = np.array([v for r in records for v in r["batch_loss"]])
    steps = len(records[0]["batch_loss"]) if records else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1) / steps, losses, color="0.75", linewidth=0.6,
            label="training loss per step")
    ax.plot(np.arange(1, len(losses) + 1) / steps, _smooth(losses, max(1, steps // 10)),
            label="smoothed")
    ax.plot([r["epoch"] for r in records], [r["test_loss"] for r in records], "o-",
            label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return save_figure(fig, path)


def plot_lr_find(result: dict, path: Path) -> Path:
    """The learning-rate range test: loss per batch and smoothed, the suggested rate."""
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
    return save_figure(fig, path)
