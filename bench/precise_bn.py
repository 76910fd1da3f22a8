"""Batch-norm statistics on a small image folder: evaluation with the running averages kept
while training (``train.precise_bn=false``) against statistics recomputed for the final weights
(the default), for finetune's, torchvision's and timm's models.

The folder: 1,437 real Fashion-MNIST training images drawn at random (the classes as they
fall), 2,000 test images, PNGs at 32 px in ``train/<class>/`` and ``test/<class>/``; the CPU
recipe at batch 256, so 5 steps per epoch (``--epochs``, 5), each model trained from scratch.

    python bench/precise_bn.py --root ../shared/data/fashion-mnist --out runs/precise_bn
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from imbalance import read_idx  # bench/imbalance.py: the IDX reader
from PIL import Image

MODELS = ["resnet18", "tv:mobilenet_v3_small", "timm:resnet10t"]
COMMON = ["recipe=resnet18_cpu_fmnist", "model.pretrained=false", "data.image_size=32",
          "train.checkpoint=false"]
CLASSES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def make_folder(root: Path, out: Path, train: int, test: int, seed: int = 0) -> None:
    """``out/train`` and ``out/test``: random images of the IDX splits as 32 px PNGs."""
    if (out / "done").is_file():
        return
    rng = np.random.default_rng(seed)
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        for i in rng.choice(len(images), n, replace=False):
            folder = out / split / CLASSES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((32, 32), Image.BILINEAR).save(folder / f"{i}.png")
    (out / "done").write_text("")


def run(model: str, precise: bool, data: Path, out: Path, epochs: int) -> dict:
    folder = out / f"{model.replace(':', '-')}-{'precise' if precise else 'running'}"
    if not (folder / "model.json").is_file():
        args = [*COMMON, f"train.epochs={epochs}", f"model.name={model}", f"data.root={data}",
                f"output_dir={folder}", f"train.precise_bn={str(precise).lower()}",
                "overwrite=true"]
        subprocess.run([sys.executable, "-m", "finetune", "train", *args], check=True)
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {"train_acc": records[-1]["train_acc"], "test_acc": records[-1]["test_acc"],
            "test_acc_per_epoch": [r["test_acc"] for r in records],
            "train_seconds": round(sum(r["epoch_time"] for r in records), 1),
            "eval_seconds": round(sum(r["eval_time"] for r in records), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/precise_bn"))
    parser.add_argument("--epochs", type=int, default=5)
    ns = parser.parse_args()
    make_folder(ns.root, ns.out / "data", 1437, 2000)
    rows = {m: {p: run(m, p == "precise", ns.out / "data", ns.out, ns.epochs)
                for p in ("running", "precise")} for m in MODELS}
    from finetune.precision import cpu_description

    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(),
              "python": platform.python_version(), "common": COMMON, "epochs": ns.epochs,
              "runs": rows}
    (ns.out / "precise_bn.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| model | train acc | test acc, running averages | test acc, recomputed | "
          f"recomputation s ({ns.epochs} epochs) |")
    print("| --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        extra = r["precise"]["eval_seconds"] - r["running"]["eval_seconds"]
        print(f"| {m} | {r['precise']['train_acc']:.4f} | {r['running']['test_acc']:.4f} | "
              f"{r['precise']['test_acc']:.4f} | {extra:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
