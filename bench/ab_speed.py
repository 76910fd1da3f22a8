"""Training speed of two checkouts, interleaved: the same ``finetune train`` command run
alternately from checkout A and checkout B (``PYTHONPATH``), so that a machine's drift (other
jobs, thermal state) falls on both alike. Prints every run's ``epoch_time`` (the training pass)
and test accuracy, and the medians per checkout, as JSON.

    git worktree add /tmp/before <commit>
    python bench/ab_speed.py --a /tmp/before --b . --rounds 3 --out /tmp/ab -- \\
        recipe=resnet18_cpu_fmnist data.root=../shared/data/fashion-mnist

Run it on a quiet machine: it times, and nothing else should.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def one_run(checkout: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "finetune", "train", *args, f"output_dir={out}",
           "overwrite=true", "train.checkpoint=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"epoch_times": [r["epoch_time"] for r in records],
            "train_time": round(sum(r["epoch_time"] for r in records), 2),
            "test_acc": records[-1]["test_acc"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="checkout B (the change)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/ab"))
    parser.add_argument("args", nargs="*", help="finetune train's key=value arguments")
    ns = parser.parse_args()
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for i in range(ns.rounds):
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):  # alternate who goes first
            result = one_run(getattr(ns, name), ns.args, ns.out / f"{name}{i}")
            runs[name].append(result)
            print(f"round {i} {name}: {result}", file=sys.stderr, flush=True)
    summary = {name: {"median_train_time": statistics.median(r["train_time"] for r in rs),
                      "test_accs": [r["test_acc"] for r in rs]} for name, rs in runs.items()}
    summary["b_over_a"] = round(summary["b"]["median_train_time"]
                                / summary["a"]["median_train_time"], 4)
    print(json.dumps({"args": ns.args, "runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
