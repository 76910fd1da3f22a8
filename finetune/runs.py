"""Reading finished run folders: per-epoch metrics and time to a given accuracy."""

from __future__ import annotations

import json
from pathlib import Path

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
