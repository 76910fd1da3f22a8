"""``finetune inspect RUN``: what the model gets wrong, on its test set.

Every test image is scored once (the model's log-probabilities, preprocessed as ``finetune
predict`` does, in the precision the run was evaluated in); from those scores: the top losses
(cross-entropy of the true class, no label smoothing: the images the model is most confidently
wrong about, or least sure of), the most confused class pairs (off-diagonal counts of the
confusion matrix) with their most confident examples, and Grad-CAM heatmaps
(:mod:`finetune.gradcam`) over a few correct and a few wrong images, each for two classes.
Written to ``RUN/inspect/`` (``--out``): ``report.md`` beside its PNGs, a self-contained
``report.html``, and the numbers as ``inspect.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune import plots
from finetune.data.sources import ImageData
from finetune.errors import ConfigError
from finetune.files import atomic_write_text
from finetune.gradcam import grad_cam, target_layer
from finetune.inference import Predictor, load, single_label
from finetune.report import Block, to_html, to_markdown
from finetune.run_data import model_inputs, run_data, split_image
from finetune.runs import METRICS, read_metrics


@dataclass
class Scores:
    """The model's log-probabilities (N, classes) of the test images and their labels."""

    log_probs: torch.Tensor
    labels: torch.Tensor

    @property
    def losses(self) -> torch.Tensor:
        return -self.log_probs.gather(1, self.labels[:, None])[:, 0]

    @property
    def predicted(self) -> torch.Tensor:
        return self.log_probs.argmax(1)


@dataclass
class Options:
    top: int = 16  # top losses shown
    pairs: int = 6  # confused pairs
    examples: int = 4  # images per confused pair
    cams: int = 4  # Grad-CAM: this many correct and this many wrong images
    layer: str | None = None  # Grad-CAM's layer (default: gradcam.target_layer)

    def __post_init__(self) -> None:  # each is a grid of images: a figure, not a data dump
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if not 0 <= value <= most or (value == 0 and name != "cams"):
                low = 0 if name == "cams" else 1
                raise ConfigError(f"--{name} {value}: between {low} and {most} (the images of "
                                  f"a figure); inspect.json and the report list what is shown")


LIMITS = {"top": 128, "pairs": 20, "examples": 16, "cams": 16}


def score(predictor: Predictor, split, batch: int = 512) -> Scores:
    """Log-probabilities of every image of ``split``, ``batch`` images at a time."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(split), batch):
            x = model_inputs(predictor, split, list(range(start, min(start + batch, len(split)))))
            chunks.append(predictor.log_probs([x]).cpu())
    return Scores(torch.cat(chunks), split.labels[:len(split)].long())


def top_losses(scores: Scores, n: int) -> list[int]:
    """The ``n`` images with the highest loss, highest first."""
    return scores.losses.topk(min(n, len(scores.labels))).indices.tolist()


def confused_pairs(scores: Scores, n: int) -> list[tuple[int, int, int]]:
    """(true class, predicted class, count) of the ``n`` most frequent mistakes."""
    k = scores.log_probs.shape[1]
    counts = torch.bincount(scores.labels * k + scores.predicted, minlength=k * k).view(k, k)
    counts.fill_diagonal_(0)
    order = sorted(((int(counts[t, p]), t, p) for t in range(k) for p in range(k)
                    if counts[t, p] > 0), key=lambda c: (-c[0], c[1], c[2]))
    return [(t, p, c) for c, t, p in order[:n]]


def pair_examples(scores: Scores, true: int, predicted: int, n: int) -> list[int]:
    """The ``n`` images of class ``true`` predicted as ``predicted``, most confident first."""
    idx = torch.nonzero((scores.labels == true) & (scores.predicted == predicted)).flatten()
    return idx[scores.log_probs[idx, predicted].argsort(descending=True)][:n].tolist()


def shown(predictor: Predictor, split, indices: list[int]) -> np.ndarray:
    """The images (uint8 N, C, S, S) as the model saw them, for the figures."""
    images = [split.images[i] if isinstance(split, ImageData) else split_image(split, i)
              for i in indices]
    return torch.stack([predictor.to_uint8(im) for im in images]).cpu().numpy()


OUTPUTS = ("top_losses.png", "confused_pairs.png", "gradcam.png", "inspect.json", "report.html",
           "report.md")  # report.md last: its presence says the rest is whole


def inspect_run(run_dir: str | Path, out: str | Path | None = None,
                options: Options | None = None, overrides: list[str] | None = None) -> Path:
    """Write the error analysis of the run in ``run_dir`` (a run folder or its weights file)
    into ``out`` (default ``RUN/inspect``); return the path of its report.md. The files are
    made in a folder beside ``out`` and moved in at the end: a killed run leaves the previous
    report whole."""
    run_dir, options, overrides = Path(run_dir), options or Options(), overrides or []
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out) if out else folder / "inspect"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; name a folder for the report.")
    if other := [o for o in overrides if not o.startswith("data.")]:
        raise ConfigError(f"finetune inspect takes data.* overrides only (the data it "
                          f"inspects); got {other[0]}.")
    predictor = single_label(load(run_dir, precision=recorded_precision(folder)),
                             "finetune inspect")
    _, test, source = run_data(folder, overrides, predictor, "finetune inspect", "inspect it")
    if options.cams:  # a bad --layer, or a model Grad-CAM refuses: before anything is written
        options.layer = _cam_layer(predictor, test, options.layer)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _analyse(predictor, test, source, options, folder, partial)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            if (partial / name).exists():
                os.replace(partial / name, out / name)
            else:  # not made this time (--cams 0, no mistakes): not left from an earlier run
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out / "report.md"


def _analyse(predictor: Predictor, test, source: str, options: Options, run_dir: Path,
             out: Path) -> None:
    """Score the test set and write the figures, report and inspect.json into ``out``."""
    scores = score(predictor, test)
    accuracy = float((scores.predicted == scores.labels).float().mean())
    blocks: list[Block] = [
        ("h", 1, f"What the model in {run_dir} gets wrong"),
        ("p", f"{len(test):,d} test images of {source}; accuracy {100 * accuracy:.2f} %. "
              f"Losses are the cross-entropy of the true class.")]
    record = {"run": str(run_dir), "data": source, "test_images": len(test),
              "test_acc": round(accuracy, 6)}
    blocks += _top_loss_blocks(predictor, test, scores, options, out, record)
    blocks += _pair_blocks(predictor, test, scores, options, out, record)
    if options.cams:
        blocks += _cam_blocks(predictor, test, scores, options, out, record)
    atomic_write_text(out / "inspect.json", json.dumps(record, indent=2) + "\n")
    atomic_write_text(out / "report.html", to_html(blocks, out, f"inspect {run_dir.name}"))
    atomic_write_text(out / "report.md", to_markdown(blocks))


def _cam_layer(predictor: Predictor, test, layer: str | None) -> str:
    """``--layer``, checked, or the layer :func:`target_layer` picks."""
    x = model_inputs(predictor, test, [0])
    if layer is None:
        return target_layer(predictor.model, x)
    grad_cam(predictor.model, layer, x, torch.zeros(1, dtype=torch.long))  # raises if unusable
    return layer


def recorded_precision(run_dir: Path) -> str:
    """The precision the run was evaluated in (its last metrics record), else fp32."""
    if not (run_dir / METRICS).is_file():  # an export copied without its records
        return "fp32"
    return read_metrics(run_dir)[-1].get("mixed_precision", "fp32")


def _top_loss_blocks(predictor, test, scores: Scores, options: Options, out: Path,
                     record: dict) -> list[Block]:
    names, idx = predictor.class_names, top_losses(scores, options.top)
    probs, pred, losses = scores.log_probs.exp(), scores.predicted, scores.losses
    record["top_losses"] = [
        {"index": i, "true": names[int(scores.labels[i])], "predicted": names[int(pred[i])],
         "probability": round(float(probs[i, pred[i]]), 6), "loss": round(float(losses[i]), 6)}
        for i in idx]
    titles = [f"#{r['index']} {r['true']}\n→ {r['predicted']} {r['probability']:.2f}\n"
              f"loss {r['loss']:.2f}" for r in record["top_losses"]]
    plots.plot_grid(shown(predictor, test, idx), titles,
                    [r["true"] != r["predicted"] for r in record["top_losses"]],
                    f"The {len(idx)} test images with the highest loss", out / "top_losses.png")
    return [("h", 2, "Top losses"),
            ("img", "top_losses.png", "Test index, true class, → predicted class and its "
             "probability, loss; wrong predictions framed in red.")]


def _pair_blocks(predictor, test, scores: Scores, options: Options, out: Path, record: dict
                 ) -> list[Block]:
    names, pairs = predictor.class_names, confused_pairs(scores, options.pairs)
    per_class = torch.bincount(scores.labels, minlength=len(names))
    record["confused_pairs"] = [
        {"true": names[t], "predicted": names[p], "count": c,
         "share_of_true": round(c / int(per_class[t]), 6),
         "examples": pair_examples(scores, t, p, options.examples)} for t, p, c in pairs]
    blocks: list[Block] = [("h", 2, "Most confused pairs")]
    if not pairs:
        return [*blocks, ("p", "No test image is misclassified.")]
    blocks.append(("table", ["true", "predicted as", "images", "% of the true class"],
                   [[r["true"], r["predicted"], str(r["count"]),
                     f"{100 * r['share_of_true']:.1f}"] for r in record["confused_pairs"]]))
    idx = [i for r in record["confused_pairs"] for i in r["examples"]]
    titles = [f"#{i} {r['true']}\n→ {r['predicted']} "
              f"{float(scores.log_probs[i, names.index(r['predicted'])].exp()):.2f}"
              for r in record["confused_pairs"] for i in r["examples"]]
    plots.plot_grid(shown(predictor, test, idx), titles, [True] * len(idx),
                    "The most confident examples of each confused pair",
                    out / "confused_pairs.png", columns=max(options.examples, 4))
    return [*blocks, ("img", "confused_pairs.png", "Examples of each pair, most confident "
                      "mistake first.")]


def _cam_blocks(predictor, test, scores: Scores, options: Options, out: Path, record: dict
                ) -> list[Block]:
    """Grad-CAM of the first correct images and the highest-loss wrong ones: the predicted
    class, then the runner-up (correct images) or the true class (wrong ones)."""
    right = torch.nonzero(scores.predicted == scores.labels).flatten()[:options.cams].tolist()
    wrong = [i for i in top_losses(scores, len(scores.labels))
             if scores.predicted[i] != scores.labels[i]][:options.cams]
    idx = right + wrong
    if not idx:
        return []
    x = model_inputs(predictor, test, idx)
    layer = options.layer
    second = scores.log_probs[idx].topk(2, dim=1).indices[:, 1]
    other = torch.where(scores.predicted[idx] == scores.labels[idx], second, scores.labels[idx])
    names = predictor.class_names
    cams = [grad_cam(predictor.model, layer, x, classes).cpu().numpy()
            for classes in (scores.predicted[idx], other)]
    record["gradcam"] = {"layer": layer, "input_size": list(x.shape[-2:]), "images": [
        {"index": i, "true": names[int(scores.labels[i])],
         "classes": [names[int(scores.predicted[i])], names[int(other[k])]]}
        for k, i in enumerate(idx)]}
    titles = [[f"#{r['index']} true {r['true']}", f"Grad-CAM: {r['classes'][0]}\n(predicted)",
               f"Grad-CAM: {r['classes'][1]}\n"
               + ("(true)" if r["classes"][0] != r["true"] else "(runner-up)")]
              for r in record["gradcam"]["images"]]
    plots.plot_cams(shown(predictor, test, idx), cams, titles,
                    [i in wrong for i in idx], f"Grad-CAM on layer {layer}",
                    out / "gradcam.png")
    return [("h", 2, "Grad-CAM"),
            ("p", f"Where the evidence for a class lies (Grad-CAM on `{layer}`, its feature map "
                  f"upsampled to the input's {x.shape[-1]} px): {len(right)} correct images "
                  f"(predicted class, runner-up) and {len(wrong)} of the highest-loss wrong ones "
                  f"(predicted class, true class)."),
            ("img", "gradcam.png", "Heatmaps over each image: red is where the class's "
             "evidence is strongest.")]
