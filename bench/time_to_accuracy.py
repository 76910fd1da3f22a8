"""Time to accuracy: train a recipe over several seeds and report the training seconds until
the test accuracy first reaches each target.

    python bench/time_to_accuracy.py recipe=resnet18_fast_fmnist --seeds 0,1,2 \
        --targets 0.90,0.93,0.94 [key=value ...] [--out DIR] [--json FILE]

Each seed runs as its own ``finetune train`` process (a fresh Accelerate state, as a user's
run would have); seconds come from the runs' metrics.jsonl (``epoch_time``: training passes
only, evaluation and compilation excluded; compilation is reported on its own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.runs import read_metrics, time_to_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="+", help="recipe=NAME and key=value overrides")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--targets", default="0.90,0.93,0.94")
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    out = args.out or Path(tempfile.mkdtemp(prefix="tta_"))

    rows = []
    for seed in seeds:
        run = out / f"seed{seed}"
        cmd = [sys.executable, "-m", "finetune.cli", "train", *args.overrides,
               f"train.seed={seed}", f"output_dir={run}", "overwrite=true"]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        records = read_metrics(run)
        reached = {t: time_to_accuracy(records, t) for t in targets}
        rows.append({"seed": seed, "final_acc": records[-1]["test_acc"],
                     "best_acc": max(r["test_acc"] for r in records),
                     "train_seconds": round(sum(r["epoch_time"] for r in records), 3),
                     "compile_seconds": records[0].get("compile_time"),
                     "command_seconds": round(wall, 1),
                     "images_per_sec": round(statistics.median(
                         r["train_images_per_sec"] for r in records), 1),
                     "mixed_precision": records[0].get("mixed_precision"),
                     "reached": {str(t): reached[t] for t in targets}})

    print(f"\n{' '.join(args.overrides)}  (seconds of training until test accuracy >= target)")
    head = ["seed", "final", "best", "train s", "compile s", "img/s"] + [f">={t:.2%}"
                                                                       for t in targets]
    print(" | ".join(head))
    for r in rows:
        cells = [str(r["seed"]), f"{r['final_acc']:.4f}", f"{r['best_acc']:.4f}",
                 f"{r['train_seconds']:.1f}", str(r["compile_seconds"]),
                 f"{r['images_per_sec']:.0f}"]
        cells += [f"{v[1]:.1f} (ep {v[0]})" if v else "never"
                  for v in r["reached"].values()]
        print(" | ".join(cells))
    summary = {"command": " ".join(args.overrides), "seeds": rows,
               "median_final_acc": statistics.median(r["final_acc"] for r in rows),
               "median_train_seconds": statistics.median(r["train_seconds"] for r in rows)}
    for t in targets:
        times = [r["reached"][str(t)][1] if r["reached"][str(t)] else float("inf") for r in rows]
        summary[f"median_seconds_to_{t}"] = statistics.median(times)
    print("median: final acc {median_final_acc:.4f}, train {median_train_seconds:.1f} s".format(
        **summary) + "".join(f", to {t:.2%}: {summary[f'median_seconds_to_{t}']:.1f} s"
                             for t in targets))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
