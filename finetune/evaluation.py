"""Evaluation: accuracy and loss over a test set counted exactly once across processes (used
every epoch by training), and ``finetune evaluate``, which rebuilds an exported model,
measures it and writes the report files."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from finetune.config import load_config, split_options
from finetune.data import DataError, ImageData, is_multilabel, load_data
from finetune.data.hub import StreamedSplit
from finetune.data.loader import (
    BatchTransform,
    Data,
    check_counted,
    eval_batches,
    prepared_eval_loader,
)
from finetune.errors import ConfigError, OutputError, TrainingError
from finetune.files import atomic_write_text, write_failure
from finetune.inference import load, predict_log_probs
from finetune.metrics import CALIBRATION_BINS, calibration_counts, per_class, summary
from finetune.multilabel import evaluate_multilabel, gathered_scores, score
from finetune.multilabel_metrics import pr_curves
from finetune.precision import resolve_mixed_precision
from finetune.runs import (
    CONFUSION,
    EVALUATION,
    METRICS,
    PR_CURVES,
    RELIABILITY,
    config_file,
    held_run,
    lock_run,
    read_metrics,
)
from finetune.speed import joined_processes, make_accelerator
from finetune.step import mark_step_begin


@torch.inference_mode()
def evaluate(model: nn.Module, data: Data, transform: BatchTransform, loader,
             accelerator: Accelerator, tta: tuple[bool, int] | None = None) -> dict:
    """Accuracy, mean loss, top-5, balanced accuracy, macro F1 and calibration over every
    sample of ``data`` exactly once, across processes (see ``finetune.metrics``).

    ``loader`` is an Accelerate-prepared :func:`eval_loader` of ``data`` (resident on the
    device or in host memory, or streamed). A bad image skipped (``data.skip_bad_images``) is
    counted as seen but not scored: ``test_skipped``. ``tta``: ``(mirror, shift)``, the
    probabilities averaged over each image's test-time views (:meth:`BatchTransform.views`).
    """
    if is_multilabel(data):  # a sigmoid per class: mAP and F1 (finetune.multilabel)
        return evaluate_multilabel(model, data, transform, loader, accelerator, tta)
    model.eval()
    k = len(data.classes)
    dev = accelerator.device
    # confusion[true, predicted], accumulated on the device: no host sync per batch.
    confusion = torch.zeros(k * k, dtype=torch.long, device=dev)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    top5 = torch.zeros((), dtype=torch.long, device=dev)
    calibration = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64, device=dev)
    # A stream's processes read disjoint rows and sum once at the end; otherwise each batch is
    # gathered (Accelerate drops the last one's padding) and every index is counted.
    streamed = isinstance(data, StreamedSplit)
    if streamed:  # processes may read different numbers of batches: no DDP collective here
        model = accelerator.unwrap_model(model)
    seen = torch.zeros(1 if streamed else len(data), dtype=torch.long, device=dev)
    for idx, images, labels, decoded in eval_batches(data, loader, dev):
        mark_step_begin()
        views = transform.views(images, *tta) if tta else [transform(images)]
        log_probs = predict_log_probs(model, views)
        scored = torch.ones_like(labels) if decoded is None else decoded.long()
        confidence, preds, in_top5 = _predictions(log_probs, labels)
        loss = F.nll_loss(log_probs, labels, reduction="none")
        if streamed:
            seen += len(labels)
        else:  # per sample a few numbers, not k log-probabilities, cross the processes
            preds, labels, loss, idx, scored, confidence, in_top5 = accelerator.gather_for_metrics(
                (preds, labels, loss, idx, scored, confidence, in_top5))
            seen.index_add_(0, idx, torch.ones_like(idx))
        # index_add_, not bincount: bincount reads its input's max on the host (a sync).
        confusion.index_add_(0, labels * k + preds, scored)
        loss_sum += (loss * scored).sum()
        top5 += (in_top5 * scored).sum()
        calibration += calibration_counts(confidence.exp(), preds == labels, scored)
    if streamed:
        confusion, loss_sum, seen, top5, calibration = (
            accelerator.reduce(t, "sum") for t in (confusion, loss_sum, seen, top5, calibration))
    check_counted(seen, streamed, len(data))
    return _result(confusion.view(k, k).cpu(), float(loss_sum), int(top5), calibration, data)


def score_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, data: Data) -> dict:
    """What :func:`evaluate` reports, from every test image's class log-probabilities at once
    (cached features: one process, no model)."""
    k = log_probs.shape[1]
    confidence, preds, in_top5 = _predictions(log_probs, labels)
    confusion = torch.bincount(labels * k + preds, minlength=k * k).view(k, k)
    top5 = in_top5.sum()
    calibration = calibration_counts(confidence.exp(), preds == labels,
                                     torch.ones_like(labels)).double()
    loss = F.nll_loss(log_probs, labels, reduction="sum")
    return _result(confusion, float(loss), int(top5), calibration, data)


def _predictions(log_probs: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: the top class's log-probability, the top class, and whether the label is
    among the top five (0/1)."""
    confidence, preds = log_probs.max(1)
    top5 = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
    return confidence, preds, (top5 == labels[:, None]).any(1).long()


def _result(confusion: torch.Tensor, loss_sum: float, top5: int, calibration: torch.Tensor,
            data: Data) -> dict:
    n, correct = int(confusion.sum()), int(confusion.trace())
    if n == 0:
        raise TrainingError("every test image was skipped as bad; check the test data.")
    scores = summary(confusion.tolist(), top5, calibration.tolist())
    result = {"test_acc": correct / n, "test_loss": loss_sum / n,
              "test_correct": correct, "test_total": n,
              **{f"test_{key}": value for key, value in scores.items() if key != "acc"},
              "confusion": confusion.tolist(),
              "calibration": [[round(v, 6) for v in row] for row in calibration.tolist()]}
    skipped = len(data) - n + getattr(data, "dropped", 0)  # resident: dropped when decoded
    if skipped:
        result["test_skipped"] = skipped
    return result


def _eval_loader(data: Data, predictor, cfg, accelerator: Accelerator) -> tuple:
    """``(loader, data)`` reading ``data`` as training's evaluation did, from model.json:
    resident images batch-resized, or files and rows decoded, resized and cropped."""
    if isinstance(data, ImageData) and predictor.crop_pct != 1.0:
        data = data.as_samples()  # it was streamed when trained
    elif isinstance(data, ImageData):
        data = data.to(accelerator.device)
    loader = prepared_eval_loader(data, lambda: predictor.image_transform, predictor.need,
                                  predictor.meta["image_size"], cfg.train.eval_batch_size,
                                  cfg.data.workers, cfg.data.skip_bad_images, accelerator)
    return loader, data


def prefixed(prefix: str, result: dict) -> dict:
    """``test_acc`` -> ``val_acc`` etc.: another split's or model's numbers beside the test's."""
    return {f"{prefix}_{k.removeprefix('test_')}": v for k, v in result.items()
            if k not in ("confusion", "calibration", "per_class")}


def epoch_score(result: dict) -> str:
    """An epoch's test number as training prints it (multi-label: mAP and exact match at 0.5)."""
    if "test_map" in result:
        return f"test mAP {result['test_map']:.4f}, exact match at 0.5 {result['test_acc']:.4f}"
    return f"test acc {result['test_acc']:.4f}"


def accuracy_line(result: dict) -> str:
    """What `finetune train` ends with and `finetune evaluate` prints: the same line."""
    if "test_map" in result:  # multi-label
        return (f"test mAP {result['test_map']:.4f}, micro F1 {result['test_f1_micro']:.4f}, "
                f"exact match {result['test_acc']:.4f} "
                f"({result['test_correct']}/{result['test_total']})")
    return (f"test accuracy {result['test_acc']:.4f} "
            f"({result['test_correct']}/{result['test_total']})")


def _run_precision(run_dir: Path, setting: str, overrides: list[str],
                   device: torch.device) -> str:
    """The precision to evaluate a run in: ``train.mixed_precision`` if given on the command
    line, else the one the run trained in (its metrics record it; on a CPU auto was timed) where
    this device has it (fp16 is CUDA's), else the run's setting."""
    if any(o.startswith("train.mixed_precision=") for o in overrides):
        return setting
    recorded = read_metrics(run_dir)[-1] if (run_dir / METRICS).is_file() else {}
    precision = recorded.get("mixed_precision", setting)
    return precision if precision != "fp16" or device.type == "cuda" else setting


def evaluate_run(run_dir: str | Path, overrides: list[str], tta: bool = False) -> dict:
    """Evaluate the model exported in ``run_dir`` on its recipe's test data (``overrides`` may
    point ``data.*`` elsewhere), print the metrics and write ``evaluation.json``,
    ``confusion.png`` and ``reliability.png`` into the run folder, or ``output_dir=PATH``.
    The run folder's lock is held throughout: never beside a training that replaces the run.
    ``tta``: also with test-time augmentation (the mirror images and shifts the model was
    trained with), beside the plain numbers (``tta`` in evaluation.json)."""
    run_dir = Path(run_dir)
    options, overrides = split_options(overrides, ("output_dir",))
    out = Path(options["output_dir"]) if options.get("output_dir") else run_dir
    if out.resolve() != Path(run_dir).resolve() and held_run(out):
        raise ConfigError(f"output_dir={out} holds another run ({', '.join(held_run(out))}): "
                          f"its evaluation files would be replaced by this model's; pass a "
                          f"folder of its own.")
    saved = config_file(run_dir)
    cfg = load_config(([f"recipe={saved}"] if saved else []) + overrides)
    with joined_processes() as state, contextlib.ExitStack() as held:
        _hold_lock(held, saved.parent if saved else run_dir, state.is_main_process)
        result, meta, accelerator = _measure(run_dir, cfg, overrides, state, tta)
        if accelerator.is_main_process:
            _print_evaluation(result, meta["class_names"], accelerator.print)
            _write_evaluation(result, meta, out, run_dir)
            figures = ([PR_CURVES] if meta.get("task") == "multilabel"
                       else [CONFUSION, RELIABILITY])
            accelerator.print(f"wrote {out / EVALUATION} and "
                              + " and ".join(str(out / f) for f in figures))
    return result


def _hold_lock(held: contextlib.ExitStack, folder: Path, main: bool) -> None:
    """Take the run folder's lock (the main process), or stop every process with one line when
    a training holds it."""
    error = None
    if main and folder.is_dir():
        try:
            held.enter_context(lock_run(folder))
        except ConfigError as e:
            error = str(e)
    error = broadcast_object_list([error])[0]  # the others stop too, not wait for the main one
    if error:
        raise ConfigError(error)


def _measure(run_dir: Path, cfg, overrides: list[str], state, tta: bool) -> tuple:
    """``(result, model.json, accelerator)``: the exported model rebuilt as `finetune predict`
    rebuilds it, measured on the test data in the run's own precision."""
    # The run's own precision and memory layout: its test accuracy is then reproduced exactly
    # (bf16 against fp32 can flip a borderline prediction). On a CPU auto was a measurement:
    # what it chose is in the run's metrics.
    accelerator = make_accelerator(resolve_mixed_precision(
        _run_precision(run_dir, cfg.train.mixed_precision, overrides, state.device),
        state.device))
    predictor = load(run_dir, device=accelerator.device)
    if tta:  # before the test data is read
        predictor.check_tta()
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
    if predictor.multilabel:
        result = _measure_tags(predictor, test_data, loader, accelerator, tta)
        return {**result, "data": source}, meta, accelerator
    with accelerator.autocast():
        result = evaluate(predictor.model, test_data, predictor.transform, loader, accelerator)
        if tta:
            with_tta = evaluate(predictor.model, test_data, predictor.transform, loader,
                                accelerator, tta=predictor.tta)
            result["tta"] = {k.removeprefix("test_"): v for k, v in with_tta.items()
                             if k not in ("confusion", "calibration", "per_class")}
    result["per_class"] = per_class(result["confusion"], meta["class_names"])
    result["data"] = source
    return result, meta, accelerator


def _measure_tags(predictor, data, loader, accelerator: Accelerator, tta: bool) -> dict:
    """A multi-label model's test numbers at its thresholds (``model.json``), with F1 at 0.5
    each beside them (``at_0.5``), and ``tta`` alike."""
    if not is_multilabel(data):
        raise DataError("the model is multi-label (a sigmoid per class) but the test data has "
                        "one label per image; evaluate it on tagged data (data.task=multilabel).")
    with accelerator.autocast():
        scored = gathered_scores(predictor.model, data, predictor.transform, loader,
                                 accelerator)
        result = score(scored, predictor.thresholds)
        result["at_0.5"] = {k.removeprefix("test_"): v for k, v in score(scored).items()
                            if k.startswith("test_f1") or k == "test_acc"}
        if tta:
            with_tta = evaluate_multilabel(predictor.model, data, predictor.transform, loader,
                                           accelerator, predictor.tta, predictor.thresholds)
            result["tta"] = {k.removeprefix("test_"): v for k, v in with_tta.items()
                             if k != "per_class"}
    result["thresholds"] = predictor.meta["thresholds"]
    result["pr_curves"] = pr_curves(scored.probs, scored.targets)
    return result


def _write_evaluation(result: dict, meta: dict, out: Path, run_dir: Path) -> None:
    """evaluation.json, confusion.png and reliability.png into ``out``; a folder that cannot
    take them is one line saying where else to write them (the metrics are printed)."""
    from finetune.plots import (  # matplotlib: only for figures
        plot_confusion,
        plot_pr_curves,
        plot_reliability,
    )

    reason = _unwritable(out)
    if reason:
        raise OutputError(f"could not write the evaluation into {out}: {reason}; the metrics "
                          f"are printed above. Write them elsewhere with `finetune evaluate "
                          f"{run_dir} output_dir=PATH`.")
    atomic_write_text(out / EVALUATION, json.dumps(result, indent=2) + "\n")
    if "test_map" in result:  # multi-label: no confusion matrix, no softmax to calibrate
        plot_pr_curves(result["pr_curves"], meta["class_names"],
                       [row["ap"] for row in result["per_class"]], out / PR_CURVES,
                       f"{meta['architecture']}: mAP {result['test_map']:.4f}")
        return
    plot_confusion(result["confusion"], meta["class_names"], out / CONFUSION,
                   f"{meta['architecture']}: accuracy {result['test_acc']:.4f}")
    plot_reliability(result["calibration"], out / RELIABILITY,
                     f"{meta['architecture']}: ECE {result['test_ece']:.4f}")


def _unwritable(out: Path) -> str | None:
    """Why files cannot be created in ``out`` (made if missing), or None when they can."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        return write_failure(e) or e.strerror or type(e).__name__
    return None


def metrics_table(result: dict) -> list[tuple[str, str]]:
    """``(metric, value)`` rows of an evaluation: what `finetune evaluate` prints, and the
    model card's results."""
    rows = [("top-1 accuracy", f"{result['test_acc']:.4f}")]
    if "test_top5_acc" in result:
        rows.append(("top-5 accuracy", f"{result['test_top5_acc']:.4f}"))
    rows += [("balanced accuracy", f"{result['test_balanced_acc']:.4f}"),
             ("macro F1", f"{result['test_macro_f1']:.4f}"),
             ("expected calibration error", f"{result['test_ece']:.4f}"),
             ("loss", f"{result['test_loss']:.4f}")]
    return rows


def _print_tags(result: dict, class_names: list[str], show) -> None:
    """A multi-label evaluation: the scores at the tuned thresholds (at 0.5 and with TTA
    beside them), then each tag's AP, threshold, F1, precision and recall."""
    show(f"{accuracy_line(result)} on {result['data']}")
    tta, plain = result.get("tta", {}), result["at_0.5"]
    for name, key in (("mAP", "map"), ("micro F1", "f1_micro"), ("macro F1", "f1_macro"),
                      ("exact match", "acc"), ("loss", "loss")):
        extra = (f"   at 0.5 {plain[key]:.4f}" if key in plain else "") + (
            f"   with TTA {tta[key]:.4f}" if key in tta else "")
        show(f"{name:<28}{result[f'test_{key}']:.4f}{extra}")
    width = max(len(name) for name in class_names + ["tag"])
    show(f"{'tag':<{width}}      AP  threshold      f1  precision  recall  support")
    for name, row, cut in zip(class_names, result["per_class"], result["thresholds"],
                              strict=True):
        ap = "     -" if row["ap"] is None else f"{row['ap']:6.4f}"
        show(f"{name:<{width}}  {ap}  {cut:9.4f}  {row['f1']:6.4f}  {row['precision']:9.4f}  "
             f"{row['recall']:6.4f}  {row['support']:7d}")


def _print_evaluation(result: dict, class_names: list[str], show) -> None:
    if "test_map" in result:
        _print_tags(result, class_names, show)
        return
    show(f"{accuracy_line(result)} on {result['data']}")
    tta = result.get("tta", {})
    keys = ["acc", "top5_acc", "balanced_acc", "macro_f1", "ece", "loss"]
    for (name, value), key in zip(metrics_table(result), [k for k in keys
                                                          if f"test_{k}" in result],
                                  strict=True):
        extra = f"   with TTA {tta[key]:.4f}" if key in tta else ""
        show(f"{name:<28}{value}{extra}")
    width = max(len(name) for name in class_names)
    show(f"{'class':<{width}}  precision  recall      f1  support")
    for row in result["per_class"]:
        show(f"{row['class']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
             f"{row['f1']:6.4f}  {row['support']:7d}")
