"""Behaviour check for refactors: train two fixed-seed runs and print the SHA-256 of their
``model.safetensors`` and ``metrics.jsonl`` (timing fields removed: they are measurements,
not behaviour), so that two checkouts can be compared.

    python bench/same_behaviour.py --data ../shared/data/fashion-mnist --out /tmp/sb > a.json
    ... change the code ...
    python bench/same_behaviour.py --data ../shared/data/fashion-mnist --out /tmp/sb2 \
        --expect a.json

Runs: ``resnet18_cpu_fmnist`` for one epoch, and a fine-tuning-strategies run on 4,000 images
(freeze the first three stages, thaw one at epoch 2, EMA, Mixup).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

# Measured, not computed: these differ from run to run by nature.
TIMINGS = ("epoch_time", "eval_time", "train_images_per_sec", "compile_time")

RUNS = {
    "cpu_1epoch": ["recipe=resnet18_cpu_fmnist", "train.epochs=1"],
    "strategies": ["recipe=resnet18_cpu_fmnist", "train.epochs=3", "data.train_limit=4000",
                   "data.eval_limit=2000", "finetune.freeze=stages:3", "finetune.unfreeze_at=[2]",
                   "train.ema_decay=0.99", "data.mixup=0.2", "train.checkpoint_every=5"],
}


def digest(run: Path) -> dict[str, str]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        for key in TIMINGS:
            r.pop(key, None)
    metrics = "".join(json.dumps(r) + "\n" for r in records).encode()
    return {"model.safetensors": hashlib.sha256((run / "model.safetensors").read_bytes())
            .hexdigest(),
            "metrics.jsonl (untimed)": hashlib.sha256(metrics).hexdigest()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", required=True, help="folder for the runs (replaced)")
    parser.add_argument("--expect", help="a JSON file printed by an earlier call: compare")
    ns = parser.parse_args()
    result = {}
    for name, args in RUNS.items():
        run = Path(ns.out) / name
        subprocess.run([sys.executable, "-m", "finetune.cli", "train", *args,
                        f"data.root={ns.data}", f"output_dir={run}", "overwrite=true"],
                       check=True, stdout=sys.stderr)  # stdout: the JSON alone
        result[name] = digest(run)
    print(json.dumps(result, indent=2))
    if ns.expect:
        expected = json.loads(Path(ns.expect).read_text())
        same = expected == result
        print("identical" if same else f"DIFFERENT from {ns.expect}", file=sys.stderr)
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
