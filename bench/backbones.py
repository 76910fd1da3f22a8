"""Backbones side by side: each model trained from scratch on Fashion-MNIST with the same
budget (epochs, batch, optimizer, schedule, image size, precision), one `finetune train`
process each, one after the other; test accuracy, training images/s and parameters.

    python bench/backbones.py --root ../shared/data/fashion-mnist --out runs/backbones

Finished runs are kept (the script continues where it stopped); the table and the raw numbers
go to OUT/backbones.json and standard output.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# name in the table -> model.name (and its own overrides)
MODELS: dict[str, list[str]] = {
    "ResNet-18 (own)": ["model.name=resnet18"],
    "timm:resnet18": ["model.name=timm:resnet18"],
    "timm:convnext_atto": ["model.name=timm:convnext_atto"],
    "timm:efficientnet_b0": ["model.name=timm:efficientnet_b0"],
    "timm:vit_tiny_patch16_224": ["model.name=timm:vit_tiny_patch16_224"],
}
# The same budget for every model: AdamW with warmup and cosine (what all of them train with),
# 3 epochs at 32 px (a ViT/16 sees 2x2 patches), fp32 (bf16 is 1.5x faster for the ResNets
# on this CPU, but 2x slower for EfficientNet and slower for ConvNeXt: one precision for all).
COMMON = ["recipe=resnet18_cpu_fmnist", "data.image_size=32", "train.epochs=3",
          "train.batch_size=256", "train.optimizer=adamw", "train.lr=0.002",
          "train.weight_decay=0.05", "train.schedule=cosine", "train.warmup_epochs=0.5",
          "train.label_smoothing=0.1", "train.mixed_precision=fp32", "train.checkpoint=false"]


def run(name: str, overrides: list[str], root: str, out: Path, extra: list[str]) -> dict:
    folder = out / name.split(" ")[0].replace(":", "_")
    if not (folder / "model.json").is_file():
        args = [*COMMON, *overrides, f"data.root={root}", f"output_dir={folder}",
                "overwrite=true", *extra]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune", "train", *args], check=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
              if '"epoch"' in line]
    meta = json.loads((folder / "model.json").read_text())
    from finetune.models import count_parameters

    params = count_parameters(meta["architecture"], num_classes=meta["num_classes"],
                              in_chans=meta["in_chans"], image_size=meta["image_size"])
    train_time = sum(e["epoch_time"] for e in epochs)
    images = sum(e["epoch_time"] * e["train_images_per_sec"] for e in epochs)
    return {"name": name, "model": meta["architecture"], "params": params,
            "test_acc": epochs[-1]["test_acc"], "epochs": len(epochs),
            "train_time_s": round(train_time, 1), "train_images_per_s": round(images / train_time),
            "precision": epochs[-1]["mixed_precision"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/backbones"))
    parser.add_argument("--only", default=None, help="comma-separated table names")
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    ns = parser.parse_args()
    names = ns.only.split(",") if ns.only else list(MODELS)
    rows = [run(n, MODELS[n], ns.root, ns.out, ns.extra) for n in names]
    result = {"machine": platform.processor() or platform.machine(), "common": COMMON,
              "extra": ns.extra, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    (ns.out / "backbones.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| model | parameters | test acc | train images/s | train time |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['model']}` | {r['params']:,} | {r['test_acc']:.4f} | "
              f"{r['train_images_per_s']:,} | {r['train_time_s']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
