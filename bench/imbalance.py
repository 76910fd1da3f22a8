"""Class imbalance: does weighting the loss or balancing the sampler help a rare class?

A Fashion-MNIST training subset with one class made rare (``--per-class`` images of every
class, ``--rare-share`` of that for the rare class), the full balanced test set; three
variants (plain, ``train.class_weights=balanced``, ``data.sampler=balanced``) over paired
seeds, one `finetune train` process each; the balanced accuracy and the rare class's recall.

    python bench/imbalance.py --root ../shared/data/fashion-mnist --out runs/imbalance
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {"plain": [], "class weights": ["train.class_weights=balanced"],
            "balanced sampler": ["data.sampler=balanced"]}
COMMON = ["recipe=resnet18_cpu_fmnist", "train.epochs=3", "train.checkpoint=false"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_subset(root: Path, out: Path, per_class: int, rare: int, share: float, seed: int
                ) -> dict:
    """IDX files of the imbalanced training subset (and the whole test set) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        keep.append(idx[:round(per_class * share) if c == rare else per_class])
    keep = np.sort(np.concatenate(keep))
    write_idx(out / "train-images-idx3-ubyte.gz", images[keep])
    write_idx(out / "train-labels-idx1-ubyte.gz", labels[keep])
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (out / name).write_bytes((root / name).read_bytes())
    return {int(c): int((labels[keep] == c).sum()) for c in range(10)}


def run(variant: str, seed: int, data: Path, out: Path, extra: list[str]) -> dict:
    folder = out / f"{variant.replace(' ', '-')}-seed{seed}"
    if not (folder / "model.json").is_file():
        args = [*COMMON, *VARIANTS[variant], f"train.seed={seed}", f"data.root={data}",
                f"output_dir={folder}", "overwrite=true", *extra]
        subprocess.run([sys.executable, "-m", "finetune", "train", *args], check=True)
    last = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
    return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("runs/imbalance"))
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--rare", type=int, default=6, help="the rare class (6: Shirt)")
    parser.add_argument("--rare-share", type=float, default=0.05)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("extra", nargs="*", help="overrides for every run")
    ns = parser.parse_args()
    counts = make_subset(ns.root, ns.out / "data", ns.per_class, ns.rare, ns.rare_share, 0)
    seeds = [int(s) for s in ns.seeds.split(",")]
    rows = {}
    start = time.perf_counter()
    for variant in VARIANTS:
        per_seed = []
        for seed in seeds:
            last = run(variant, seed, ns.out / "data", ns.out, ns.extra)
            m = np.array(last["confusion"], dtype=float)
            per_seed.append({"seed": seed, "balanced_acc": last["test_balanced_acc"],
                             "acc": last["test_acc"], "macro_f1": last["test_macro_f1"],
                             "rare_recall": m[ns.rare, ns.rare] / m[ns.rare].sum()})
        rows[variant] = per_seed
    result = {"train_counts": counts, "common": COMMON, "extra": ns.extra, "seeds": seeds,
              "date": time.strftime("%Y-%m-%d"), "runs": rows,
              "seconds": round(time.perf_counter() - start)}
    (ns.out / "imbalance.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| variant | balanced acc (mean of seeds) | per seed | rare-class recall | accuracy | "
          "macro F1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant, per_seed in rows.items():
        mean = {k: statistics.mean(r[k] for r in per_seed)
                for k in ("balanced_acc", "rare_recall", "acc", "macro_f1")}
        each = ", ".join(format(r["balanced_acc"], ".4f") for r in per_seed)
        print(f"| {variant} | {mean['balanced_acc']:.4f} | {each} | {mean['rare_recall']:.4f} | "
              f"{mean['acc']:.4f} | {mean['macro_f1']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
