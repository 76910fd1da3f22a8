"""The comparison report: tables and figures as ``report.md`` (beside its PNGs), a
self-contained ``report.html`` (figures embedded) and the numbers as ``summary.json``."""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from finetune import plots
from finetune.compare import BUDGET_KEYS, NOT_USED, Summary, budget_settings, label_runs, summarize
from finetune.config import Config, flat_config, show_value
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs import Run

log = logging.getLogger(__name__)

# A report is a list of blocks: ("h", level, text), ("p", text), ("code", text),
# ("table", header, rows), ("img", file name, caption).
Block = tuple


def pct(x: float | None) -> str:
    """A fraction as a percentage with 2 decimals; – for none."""
    return "–" if x is None else f"{100 * x:.2f}"


def accuracy_table(rows: list, baseline: str, many_seeds: bool) -> Block:
    ci = " (mean ± 95 % CI)" if many_seeds else ""
    paired = len(rows) > 1  # a difference column only when there is something to compare
    ema = any(r.ema_final for r in rows)
    header = ["recipe", "seeds", f"final test acc %{ci}", f"best test acc %{ci}",
              *([f"Δ final vs {baseline} (paired)", f"Δ best vs {baseline} (paired)"]
                if paired else []), *(["EMA final test acc %"] if ema else []),
              "train img/s", "training s", "parameters"]
    body = []
    for r in rows:
        diffs = [r.final_diff.format() if r.final_diff else "–",
                 r.best_diff.format() if r.best_diff else "–"]
        body.append([r.label, ",".join(map(str, r.seeds)), r.final.format(), r.best.format(),
                     *(diffs if paired else []),
                     *([r.ema_final.format() if r.ema_final else "–"] if ema else []),
                     f"{r.images_per_sec:,.0f}", f"{r.train_seconds:,.1f}", f"{r.params:,d}"])
    return ("table", header, body)


def metrics_table(rows: list) -> Block | None:
    """The final epoch's other test metrics per recipe (where every run recorded them)."""
    names = {"test_top5_acc": "top-5 acc %", "test_balanced_acc": "balanced acc %",
             "test_macro_f1": "macro F1 %", "test_ece": "calibration error (ECE) %",
             "test_map": "mAP %", "test_f1_micro": "micro F1 %", "test_f1_macro": "macro F1 %"}
    keys = [k for k in names if all(k in r.metrics for r in rows)]
    if not keys:
        return None
    return ("table", ["recipe", *(names[k] for k in keys)],
            [[r.label, *(r.metrics[k].format() for k in keys)] for r in rows])


def reach_table(rows: list, targets: list[float]) -> Block:
    header = ["recipe"]
    for t in targets:
        header += [f"≥ {pct(t)} %: epoch", "training s", "seeds reaching"]
    body = []
    for r in rows:
        line = [r.label]
        for t in targets:
            n, epoch, seconds = r.reach[t]
            line += ["–" if epoch is None else f"{epoch:.1f}",
                     "–" if seconds is None else f"{seconds:.1f}", f"{n}/{len(r.seeds)}"]
        body.append(line)
    return ("table", header, body)


def _names(names: list[str], most: int = 20) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", … ({len(names)} in all)" if len(names) > most else "")


def classes_block(runs: list[Run]) -> Block:
    """The classes the runs were measured on (each list once, with the labels that used it)."""
    lists: dict[tuple, list[str]] = {}
    for r in runs:
        lists.setdefault(tuple(r.meta["class_names"]), []).append(r.label)
    if len(lists) == 1:
        names = list(next(iter(lists)))
        return ("p", f"Classes ({len(names)}): {_names(names)}.")
    return ("p", "The runs were measured on different classes: " + "; ".join(
        f"Classes ({len(names)}) of {', '.join(dict.fromkeys(labels))}: {_names(list(names))}"
        for names, labels in lists.items()) + ".")


def budget_block(runs: list[Run]) -> Block:
    """The budget every run shares, and the budget settings some runs do not share."""
    flats = [budget_settings(r) for r in runs]
    keys = [k for k in BUDGET_KEYS if k != "data.train_limit"]  # the sizes say it
    # (a setting no run's data depended on, e.g. data.hf_name of IDX runs, is left out)
    used = [k for k in keys if any(f[k] != NOT_USED for f in flats)]
    shared = [k for k in used if len({f[k] for f in flats}) == 1]
    differ = [k for k in used if k not in shared]
    sizes = sorted({r.size for r in runs})
    text = ("Budget: training images " + ", ".join(f"{s:,d}" for s in sizes) + "; shared by "
            "every run: " + (", ".join(f"`{k}={show_value(flats[0][k])}`" for k in shared)
                             or "none"))
    if differ:
        text += ("; not shared: " + ", ".join(f"`{k}`" for k in differ)
                 + " (see what differs, below)")
    return ("p", text + ".")


def settings_blocks(runs: list[Run], labels: list[str]) -> list[Block]:
    """The budget, the classes, the other settings all runs share where they are not
    finetune's defaults, and a table of the settings that tell the recipes apart (budget
    settings too, when the runs do not share them)."""
    flat = {label: budget_settings(next(r for r in runs if r.label == label))
            for label in labels}
    defaults = flat_config(Config())
    skip = {"train.seed", "output_dir", "resume", "overwrite", "description", "recipe",
            "data.train_limit"}
    keys = [k for k in defaults if k not in skip]
    first = flat[labels[0]]
    same = [k for k in keys if len({f[k] for f in flat.values()}) == 1 and first[k] != defaults[k]
            and k not in BUDGET_KEYS]
    differ = [k for k in keys if len({f[k] for f in flat.values()}) > 1]
    blocks = [budget_block(runs), classes_block(runs),
              ("p", "Other shared settings (where not finetune's defaults): "
               + (", ".join(f"`{k}={show_value(first[k])}`" for k in same) or "none") + ".")]
    if differ:
        blocks += [("p", "What differs between the recipes:"),
                   ("table", ["setting", *labels],
                    [[k, *(show_value(flat[label][k]) for label in labels)] for k in differ])]
    return blocks


def test_head(test, n: int, predictor) -> tuple[list | torch.Tensor, torch.Tensor]:
    """The first ``n`` test images, as the model reads them, and their labels, from any split:
    resident (uint8 N, C, H, W), files or rows (decoded one at a time), or a stream."""
    from finetune.data import ImageData
    from finetune.data.hub import StreamedSplit

    if isinstance(test, ImageData):
        return test.images[:n], test.labels[:n]
    if isinstance(test, StreamedSplit):
        rows = list(test.rows.take(n))
        return ([test.open(row, predictor.need, f"test row {i + 1}")
                 for i, row in enumerate(rows)],
                torch.tensor([test.label_of(row) for row in rows]))
    n = min(n, len(test))
    return [test.open(i, predictor.need) for i in range(n)], test.labels[:n]


def predictions(run: Run, shown: int = 24, errors: int = 16, scanned: int = 1024
                ) -> tuple | None:
    """(images, true names, predicted names, indices) for the first ``shown`` test images and
    the first ``errors`` misclassified ones among the first ``scanned`` after them; None if the
    test data cannot be read."""
    from finetune.data import load_data
    from finetune.inference import load, single_label

    try:
        _, test, _ = load_data(run.config.data)
        predictor = single_label(load(run.path, precision=run.records[-1].get(
            "mixed_precision", "fp32")), "the report's grid of mistakes")
        images, labels = test_head(test, scanned, predictor)
    except FinetuneError as e:
        log.warning("no image grid: %s", e)
        return None
    preds = predictor.logits(images, batch_size=256).argmax(1)
    wrong = [i for i in torch.nonzero(preds != labels).flatten().tolist() if i >= shown]
    idx = list(range(min(shown, len(labels)))) + wrong[:errors]
    # What the model saw: each image resized and center-cropped to the model's size.
    shown_images = torch.stack([predictor.image_transform(images[i]) for i in idx])
    names = predictor.class_names
    return (shown_images.numpy(), [names[int(labels[i])] for i in idx],
            [names[int(preds[i])] for i in idx], idx)


def figure_blocks(runs: list[Run], summary: Summary, labels: list[str], out: Path
                  ) -> list[Block]:
    """Draw the figures into ``out`` (for the largest training set) and return their blocks."""
    size = summary.sizes[-1]
    groups = {label: sorted((r for r in runs if r.label == label and r.size == size),
                            key=lambda r: r.seed) for label in labels}
    groups = {k: v for k, v in groups.items() if v}
    best_of = {label: max(group, key=lambda r: r.final_acc) for label, group in groups.items()}
    best = max(best_of.values(), key=lambda r: r.final_acc)
    classes = best.meta["class_names"]
    blocks: list[Block] = []
    figures = {}
    if len(summary.sizes) > 1:
        curves = {label: [(s, r.final) for s in summary.sizes for r in summary.by_size[s]
                          if r.label == label] for label in labels}
        figures["data_efficiency.png"] = (plots.plot_data_efficiency, (curves,),
                                          "Final test accuracy against training-set size.")
    figures.update({
        "loss.png": (plots.plot_loss, (groups,), "Training loss per batch."),
        "accuracy.png": (plots.plot_accuracy, (groups,), "Train and test accuracy per epoch."),
        "accuracy_vs_time.png": (plots.plot_accuracy_vs_time, (groups,),
                                 "Test accuracy against training time."),
    })
    if all("confusion" in r.final for r in best_of.values()):  # multi-label runs have none
        figures["per_class.png"] = (plots.plot_per_class,
                                    ({k: (r.meta["class_names"], r.final["confusion"])
                                      for k, r in best_of.items()},),
                                    "Per-class test accuracy of each recipe's best run.")
    blocks.append(("h", 2, f"Figures ({size:,d} training images)"))
    for name, (plot, args, caption) in figures.items():
        plot(*args, out / name)
        blocks.append(("img", name, caption))
    if "confusion" in best.final:
        plots.plot_confusion(best.final["confusion"], classes, out / "confusion.png",
                             f"best run: {best.label}\nseed {best.seed}, "
                             f"accuracy {best.final_acc:.4f}")
        blocks.append(("img", "confusion.png", f"Confusion matrix of the best run "
                       f"({best.path}), rows normalised; numbers are counts."))
    if "calibration" in best.final:
        plots.plot_reliability(best.final["calibration"], out / "reliability.png",
                               f"best run: {best.label}, ECE {best.final['test_ece']:.4f}")
        blocks.append(("img", "reliability.png", "Reliability diagram of the best run: "
                       "accuracy against confidence per bin (calibrated: the diagonal)."))
    grid = predictions(best)
    if grid is not None:
        plots.plot_predictions(*grid, title=f"{best.label}, seed {best.seed}: the first test "
                               f"images, then misclassified ones (red)",
                               path=out / "predictions.png")
        blocks.append(("img", "predictions.png", "Test images with true and predicted labels "
                       "(#index true / ✓ or ✗ predicted); wrong ones framed in red."))
    else:
        blocks.append(("p", "No image grid: the best run's model or test data could not be "
                       "read here (see the warning printed with the report)."))
    return [*blocks, inspect_block(best, out)]


def inspect_block(run: Run, out: Path) -> Block:
    """A link to the run's error analysis (``finetune inspect``), or the command to make it."""
    page = run.path / "inspect" / "report.html"
    where = (f"[{page}]({os.path.relpath(page, out)})" if page.is_file()
             else f"`finetune inspect {run.path}` writes it to {page}")
    return ("p", "What the best run gets wrong — its top losses, most confused pairs and "
                 f"Grad-CAM heatmaps: {where}.")


def build_report(runs: list[Run], out: str | Path, targets: list[float] | None = None,
                 command: str | None = None) -> Path:
    """Write the report of ``runs`` into ``out``; return the path of report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = label_runs(runs)
    summary = summarize(runs, targets)
    largest = [r for r in runs if r.size == summary.sizes[-1]]  # what the figures show
    many_seeds = any(sum(r.label == label for r in largest) > 1 for label in labels)
    title = (f"Run report: {labels[0]}" if len(labels) == 1
             else f"Comparison: {' vs '.join(labels)}" if len(labels) <= 3
             else f"Comparison of {len(labels)} settings with {labels[0]}")

    blocks: list[Block] = [("h", 1, title)]
    if command:
        blocks += [("p", "Reproduce with:"), ("code", command)]
    blocks += [("p", f"{len(runs)} runs, {len(labels)} recipe{'s' if len(labels) > 1 else ''}"
                + (", seeds paired: seed k of every recipe shares data order and augmentation "
                   "draws. Intervals are 95 % Student-t intervals over seeds; a paired "
                   "difference is the mean of the per-seed differences, with its own interval "
                   "(it excludes 0 when the difference is unlikely to be seed noise)."
                   if many_seeds else ".")
                + " Training time counts training passes only (no evaluation or compilation).")]
    if summary.budget_warnings:
        blocks.append(("p", "**Warning: these runs did not get the same budget** — "
                       + "; ".join(summary.budget_warnings)))
    blocks += settings_blocks(runs, labels)
    for s in summary.sizes:
        rows = summary.by_size[s]
        blocks += [("h", 2, f"Accuracy on {s:,d} training images"),
                   accuracy_table(rows, rows[0].label, many_seeds)]
        others = metrics_table(rows)
        if others is not None:
            blocks += [("h", 3, "Other test metrics of the final epoch"), others]
        blocks += [("h", 3, "Time to accuracy (mean over the seeds that reached it)"),
                   reach_table(rows, summary.targets[s])]
    blocks += figure_blocks(runs, summary, labels, out)
    blocks += [("h", 2, "Runs"),
               ("table", ["recipe", "seed", "training images", "final test acc %",
                          "best test acc %", "training s", "folder"],
                [[r.label, str(r.seed), f"{r.train_images:,d}", pct(r.final_acc),
                  pct(r.best_acc), f"{r.train_seconds:.1f}", str(r.path)] for r in runs])]

    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, out, title))
    atomic_write_text(out / "summary.json", json.dumps(summary_dict(summary), indent=2) + "\n")
    return out / "report.md"


def summary_dict(summary: Summary) -> dict:
    """The summary as plain JSON (target keys as strings)."""
    out = asdict(summary)
    for rows in out["by_size"].values():
        for row in rows:
            row["reach"] = {str(k): list(v) for k, v in row["reach"].items()}
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "code":
            lines += ["```", block[1], "```", ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(map(_md_cell, header)) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        else:
            raise ValueError(f"unknown report block {kind!r}; valid: h, p, code, table, img")
    return "\n".join(lines)


def _inline(text: str) -> str:
    """Escape, then render the inline marks the report uses: `code`, **bold**, [a](link)."""
    text = html.escape(text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"<a href='\2'>\1</a>", text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}
figcaption{color:#555;font-size:14px}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}
code{background:#f6f6f6;padding:0 3px}"""


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    """One self-contained page: the PNGs embedded as data URIs."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_CSS}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                           + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / block[1]).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(block[2], quote=True)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>"
                         f"{html.escape(block[2])}</figcaption></figure>")
        else:
            raise ValueError(f"unknown report block {kind!r}; valid: h, p, code, table, img")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
