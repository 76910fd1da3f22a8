"""Reading run folders: per-epoch metrics, time to a given accuracy, finished runs with their
config and exported model's metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.config import Config, load_config
from finetune.errors import ConfigError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl``, one per finished epoch."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: not a finetune run folder, or "
                          f"its first epoch has not finished.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to_accuracy(records: list[dict], target: float) -> tuple[int, float] | None:
    """(epoch, training seconds) when the test accuracy first reached ``target``: seconds
    are the sum of ``epoch_time`` up to that epoch (training passes only; evaluation and
    compilation excluded). None if it never did."""
    seconds = 0.0
    for r in records:
        seconds += r["epoch_time"]
        if r["test_acc"] >= target:
            return r["epoch"], round(seconds, 3)
    return None


@dataclass
class Run:
    """A finished run folder: its config, per-epoch metrics and exported model's metadata."""

    path: Path
    config: Config
    records: list[dict]
    meta: dict
    label: str = ""

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def train_images(self) -> int:
        """Training-set size, as recorded in model.json; runs exported before it was recorded:
        the batches of an epoch times the batch size (the partial last batch is dropped)."""
        return (self.meta.get("train_images")
                or len(self.records[0]["batch_loss"]) * self.config.train.batch_size)

    @property
    def size(self) -> int:
        """The training-set size of the budget: ``data.train_limit`` when set (a run that holds
        out a validation split from it trains on fewer), else the training images."""
        return self.config.data.train_limit or self.train_images

    @property
    def final(self) -> dict:
        """The record of the exported model: the last epoch's, or the best one's when early
        stopping chose it."""
        best = self.meta.get("early_stopping", {}).get("best_epoch")
        return self.records[best - 1] if best else self.records[-1]

    @property
    def final_acc(self) -> float:
        return self.final["test_acc"]

    @property
    def best_acc(self) -> float:
        return max(r["test_acc"] for r in self.records)

    @property
    def train_seconds(self) -> float:
        return sum(r["epoch_time"] for r in self.records)

    @property
    def images_per_sec(self) -> float:
        """Training images over training seconds, all epochs together."""
        images = sum(r["train_images_per_sec"] * r["epoch_time"] for r in self.records)
        return images / self.train_seconds if self.train_seconds else 0.0


def read_run(path: str | Path) -> Run:
    """Read a finished run folder; a clear error for anything else."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a finetune run folder (no config.yaml).")
    cfg = load_config([f"recipe={path / 'config.yaml'}"])
    records = read_metrics(path)
    meta = json.loads((path / "model.json").read_text()) if (path / "model.json").is_file() else {}
    # An early-stopped run finished with fewer epochs than planned.
    planned = meta.get("early_stopping", {}).get("epochs_run") or cfg.train.epochs
    if len(records) < planned or not meta:
        raise ConfigError(f"{path}: the run has not finished ({len(records)} of {planned} "
                          f"epochs, model {'exported' if meta else 'not exported'})"
                          f"; finish it with `finetune train recipe={path / 'config.yaml'} "
                          f"output_dir={path} resume=auto`, or leave it out.")
    return Run(path, cfg, records, meta)


def finished_run(path: Path) -> Run | None:
    """The run in ``path`` if it has finished, else None."""
    try:
        return read_run(path)
    except (ConfigError, OSError, ValueError):
        return None


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Finished runs in ``paths``: run folders, or folders searched for run folders."""
    runs = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            runs.append(read_run(path))
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob("model.json")
                           if (p.parent / "metrics.jsonl").is_file())
            if not found:
                raise ConfigError(f"{path} holds no finished finetune runs (folders with "
                                  f"config.yaml, metrics.jsonl and model.json).")
            runs += [read_run(p) for p in found]
        else:
            raise FileNotFoundError(f"{path}: no such run folder")
    if not runs:
        raise ConfigError("no runs given: finetune compare RUN_DIR [RUN_DIR ...]")
    return runs
