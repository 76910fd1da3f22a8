"""Experiment trackers: ``train.log_with=[tensorboard,wandb,mlflow,...]``, through Accelerate's
trackers, on the main process only.

What they get: the config at the start; every step's training loss and learning rate (sent at
the end of each epoch from the losses the loop keeps on the device, so that tracking never
makes a step wait); every epoch's metrics (the numbers of ``metrics.jsonl``, which stays the
record); the confusion matrix and the loss curve as images (TensorBoard, W&B) or files
(MLflow).
Each tracker is an optional extra (``pip install 'finetune[tensorboard]'``), imported only
when asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

from finetune.config import Config, flat_config
from finetune.errors import ConfigError, one_line

log = logging.getLogger(__name__)

# tracker -> the module it needs (its pip extra has the tracker's name)
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
           "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive",
           "trackio": "trackio"}
TRACKERS_DIR = "trackers"  # in the run folder: the files of trackers that write locally


def check_trackers(cfg: Config) -> None:
    """Refuse a tracker whose package is not installed, before anything runs."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in cfg.train.log_with:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"train.log_with={name}: this Accelerate has no {name} tracker; "
                              f"pip install -U accelerate.")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise ConfigError(f"train.log_with={name} needs the {MODULES[name]} package: "
                              f"pip install 'finetune[{name}]' (or pip install "
                              f"{MODULES[name]}).")


def check_tracker_folder(cfg: Config, out: Path) -> None:
    """``<run>/trackers`` must be a folder (or absent) when a tracker writes there."""
    folder = out / TRACKERS_DIR
    if cfg.train.log_with and (folder.is_symlink() or folder.exists()) and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, but train.log_with={','.join(cfg.train.log_with)}"
                          f" writes its tracker files into a folder of that name; move the file "
                          f"away, or pass another output_dir=PATH.")


def start_trackers(cfg: Config, accelerator: Accelerator, out: Path) -> None:
    """Start the trackers of ``train.log_with`` for the run in ``out``, with its config."""
    if not cfg.train.log_with or not accelerator.is_main_process:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    project = cfg.train.project or cfg.recipe or "finetune"
    folder = out / TRACKERS_DIR  # checked before the data loaded: check_tracker_folder
    folder.mkdir(exist_ok=True)
    # Per tracker: the run's name, and local files inside the run folder.
    options = {"wandb": {"name": out.name, "dir": str(folder)},
               "mlflow": {"run_name": out.name}, "dvclive": {"dir": str(folder / "dvclive")}}
    if "mlflow" in cfg.train.log_with and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        # No tracking server named: a file store in the run folder (MLflow 3 asks for an
        # explicit opt-in to its file store, in maintenance but working; a database or server
        # is one MLFLOW_TRACKING_URI away).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
    trackers = []
    for name in cfg.train.log_with:
        tracker = LOGGER_TYPE_TO_CLASS[name]
        if tracker.requires_logging_directory:
            trackers.append(tracker(project, str(folder), **options.get(name, {})))
        else:
            trackers.append(tracker(project, **options.get(name, {})))
    accelerator.log_with = trackers  # initialized here: init_trackers starts them
    try:
        accelerator.init_trackers(project, config=_scalars(flat_config(cfg)))
    except Exception as e:  # no API key, a bad project name, no server: one line
        accelerator.trackers = []  # nothing half-started for end_training to close
        raise ConfigError(f"train.log_with={','.join(cfg.train.log_with)}: the tracker did not "
                          f"start: {one_line(e)}") from None
    log.info("tracking with %s (project %s)", ", ".join(cfg.train.log_with), project)


def _scalars(config: dict) -> dict:
    """Config values as trackers take them (TensorBoard's hparams: numbers, strings, bools)."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in config.items()}


def log_epoch(accelerator: Accelerator, record: dict, steps_per_epoch: int,
              lr_at: Callable[[int], float]) -> None:
    """The epoch's step losses and rates (at global steps 1, 2, ...), then its metrics (at its
    last step). A resumed epoch sends all its steps: they were not sent before it ended."""
    if not accelerator.trackers:
        return
    start = (record["epoch"] - 1) * steps_per_epoch
    for i, loss in enumerate(record["batch_loss"]):
        accelerator.log({"train/loss": loss, "train/lr": lr_at(start + i)}, step=start + i + 1)
    accelerator.log(epoch_scalars(record), step=start + steps_per_epoch)


def log_run_figures(accelerator: Accelerator, out: Path, records: list[dict],
                    class_names: list[str], step: int) -> None:
    """The final confusion matrix and the loss curve, drawn into ``<run>/trackers``."""
    if not accelerator.trackers:
        return
    from finetune.plots import plot_confusion, plot_training_loss

    folder = out / TRACKERS_DIR
    figures = {"loss": plot_training_loss(records, folder / "loss.png")}
    if "confusion" in records[-1]:  # single-label (multi-label: mAP among the scalars)
        figures["confusion_matrix"] = plot_confusion(
            records[-1]["confusion"], class_names, folder / "confusion.png",
            f"test accuracy {records[-1]['test_acc']:.4f}")
    log_figures(accelerator, figures, step)


def epoch_scalars(record: dict) -> dict[str, float]:
    """The epoch's numbers from its metrics.jsonl record, named ``epoch/KEY``."""
    return {f"epoch/{k}": float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def log_figures(accelerator: Accelerator, figures: dict[str, Path], step: int) -> None:
    """PNG figures to the trackers that take images (TensorBoard, W&B) or files (MLflow)."""
    if not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    # a batch of one image (N, H, W, C) each
    images = {name: np.asarray(Image.open(path).convert("RGB"))[None]
              for name, path in figures.items()}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images(images, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images(images, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            for path in figures.values():
                mlflow.log_artifact(str(path))
