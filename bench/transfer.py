"""Transfer methods side by side (finetune.method): kNN, linear probe on cached features, LP-FT,
full fine-tuning and LoRA, on a small target task, over paired seeds.

The sources are models finetune trained itself (offline: no ImageNet weights), on Fashion-MNIST
classes 0-4; the target is classes 5-9 with 50 and 500 training images per class (seed k draws
the same images and batches for every method), tested on all 5,000 test images of those classes:

    finetune train recipe=resnet18_cpu_fmnist 'data.classes=[0,1,2,3,4]' \\
        output_dir=runs/source-r18 train.checkpoint=false
    finetune train recipe=resnet18_cpu_fmnist model.name=timm:convnext_atto data.image_size=32 \\
        train.optimizer=adamw train.lr=0.004 train.weight_decay=0.05 \\
        'data.classes=[0,1,2,3,4]' output_dir=runs/source-convnext train.checkpoint=false
    python bench/transfer.py --resnet runs/source-r18 --convnext runs/source-convnext \\
        --out runs/transfer --families resnet18,convnext_atto,resnet18_112px

Every run is its own `finetune train` process (finished runs are kept: the script continues
where it stopped). Per method: test accuracy (mean and 95 % Student-t interval over the seeds)
and seconds: the method's own (features + fit, or the training epochs) and the whole process.
The linear probe (ridge, the default) runs twice per seed, the second reading the first's cached
features; the logistic-regression probe (finetune.probe=logistic) reads them too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from finetune.runs import read_metrics
from finetune.stats import mean_ci

TARGET = ["data.classes=[5,6,7,8,9]", "data.hflip=false", "train.checkpoint=false"]
# per family: the recipe and its settings, and each method's own overrides
FAMILIES = {
    "resnet18": (["recipe=resnet18_pretrained_cpu_fmnist", "data.image_size=28"], {
        "knn": ["finetune.method=knn"],
        "linear": ["finetune.method=linear"],
        "linear_logistic": ["finetune.method=linear", "finetune.probe=logistic"],
        "lp_ft": ["finetune.method=lp_ft"],
        "full": ["finetune.method=full"],
    }),
    "convnext_atto": (["recipe=resnet18_pretrained_cpu_fmnist", "model.name=timm:convnext_atto",
                       "data.image_size=32", "train.optimizer=adamw", "train.lr=0.0005",
                       "train.weight_decay=0.05"], {
        "knn": ["finetune.method=knn"],
        "linear": ["finetune.method=linear"],
        "linear_logistic": ["finetune.method=linear", "finetune.probe=logistic"],
        "full": ["finetune.method=full"],
        "lora": ["finetune.method=lora", "train.lr=0.002", "train.weight_decay=0.0"],
    }),
    # The same at 112 px (images upsampled): where features cost what they do at photo sizes.
    # One epoch of full fine-tuning is enough to time one.
    "resnet18_112px": (["recipe=resnet18_pretrained_cpu_fmnist", "data.image_size=112"], {
        "linear": ["finetune.method=linear"],
        "full": ["finetune.method=full", "train.epochs=1"],
    }),
}
# training images -> (batch size, epochs) of the methods that train
SCHEDULE = {250: (32, 10), 2500: (64, 5)}


def run(args: list[str], folder: Path) -> dict:
    """Train one run (or keep it when finished); its last record and the process seconds."""
    done = folder / "wall.json"
    if done.is_file() and (folder / "model.safetensors").is_file():
        return {**read_metrics(folder)[-1], **json.loads(done.read_text())}
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "finetune", "train", *args, f"output_dir={folder}",
           "overwrite=true"]
    start = time.perf_counter()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {folder.parent}/{folder.name}.log")
    wall = {"wall_time": round(time.perf_counter() - start, 2)}
    done.write_text(json.dumps(wall))
    return {**read_metrics(folder)[-1], **wall}


def method_seconds(records: list[dict], method: str) -> float:
    """The method's own seconds: features and fit, or the training epochs (with LP-FT's
    features and probe before them)."""
    last = records[-1]
    if method in ("linear", "linear_logistic", "knn"):
        return last["feature_time"] + last.get("probe_fit_time", last.get("knn_time", 0.0))
    trained = sum(r["epoch_time"] for r in records)
    return trained + (last["feature_time"] + last["probe_fit_time"] if method == "lp_ft" else 0)


def one_seed(family: str, weights: str, size: int, seed: int, out: Path) -> dict:
    """Every method of ``family`` on ``size`` training images with seed ``seed``."""
    common, methods = FAMILIES[family]
    batch, epochs = SCHEDULE[size]
    base = [*common, f"model.weights={weights}", *TARGET, f"data.train_limit={size}",
            f"data.split_seed={seed}", f"train.seed={seed}", f"train.batch_size={batch}",
            f"train.epochs={epochs}"]
    folder = out / family / f"n{size}" / f"seed{seed}"
    results = {}
    for method, extra in methods.items():  # a method's own overrides come last: they win
        # the linear probes share a cache: the first computes the features, the rest read them
        cache = [f"finetune.cache_dir={folder / 'features'}"] if "linear" in method else []
        last = run([*base, *extra, *cache], folder / method)
        records = read_metrics(folder / method)
        results[method] = {"test_acc": last["test_acc"], "wall_time": last["wall_time"],
                           "seconds": round(method_seconds(records, method), 3),
                           "epoch_time": round(sum(r.get("epoch_time", 0) for r in records)
                                               / len(records), 3)}
        for key in ("probe_test_acc", "probe_fit_time", "feature_time", "knn_time"):
            if key in last:
                results[method][key] = last[key]
        if method == "linear":  # again, from the features the first run cached
            again = run([*base, *extra, *cache], folder / "linear-cached")
            results["linear-cached"] = {
                "test_acc": again["test_acc"], "wall_time": again["wall_time"],
                "seconds": round(method_seconds([again], "linear"), 3),
                "features_reused": again["features_reused"]}
    return results


def summarize(rows: dict) -> dict:
    """Per family, size and method: accuracy and seconds over the seeds."""
    out = {}
    for key, seeds in rows.items():
        methods = {m for r in seeds.values() for m in r}
        out[key] = {}
        for m in sorted(methods):
            got = [r[m] for r in seeds.values() if m in r]
            acc = mean_ci([g["test_acc"] for g in got])
            out[key][m] = {"accuracy": acc.format(), "accuracy_mean": round(acc.mean, 4),
                           "seconds": round(sum(g["seconds"] for g in got) / len(got), 3),
                           "wall_time": round(sum(g["wall_time"] for g in got) / len(got), 2)}
            for extra in ("epoch_time", "probe_fit_time", "feature_time", "probe_test_acc"):
                if all(extra in g for g in got):
                    out[key][m][extra] = round(sum(g[extra] for g in got) / len(got), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resnet", required=True, help="the ResNet-18 source run folder")
    parser.add_argument("--convnext", required=True, help="the ConvNeXt-atto source run folder")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sizes", default="250,2500")
    parser.add_argument("--families", default="resnet18,convnext_atto")
    ns = parser.parse_args()
    sources = {"resnet18": ns.resnet, "resnet18_112px": ns.resnet, "convnext_atto": ns.convnext}
    rows: dict[str, dict] = {}
    for family in ns.families.split(","):
        for size in map(int, ns.sizes.split(",")):
            for seed in map(int, ns.seeds.split(",")):
                print(f"{family}, {size} images, seed {seed}", flush=True)
                rows.setdefault(f"{family} n={size}", {})[seed] = one_seed(
                    family, sources[family], size, seed, ns.out)
    summary = summarize(rows)
    (ns.out / "transfer.json").write_text(json.dumps({"runs": rows, "summary": summary},
                                                     indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
