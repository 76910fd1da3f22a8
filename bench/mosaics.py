"""Multi-label Fashion-MNIST mosaics: 2x2 tiles of real Fashion-MNIST images, tagged with the
set of classes they show.

Each image is 56x56 grayscale; each of its four 28x28 tiles is, independently, black with
probability ``--p-empty`` or else a Fashion-MNIST image drawn at random (train split from the
train IDX files, test split from the t10k files; seeded, so one seed gives the same bytes).
An image's labels are the set of classes present: 0 to 4 tags, duplicates collapsed.

    python bench/mosaics.py --out runs/mosaics                 # folder format (the default)
    python bench/mosaics.py --out runs/mosaics-hf --format hf  # a datasets.DatasetDict
    # options: --train 4000 --test 1000 --seed 0 --p-empty 0.25 --fmnist DIR --force

``folder`` writes ``OUT/{train,test}/NNNNN.png`` plus ``OUT/{train,test}/labels.csv`` with the
header ``file,tags``: the file name relative to that folder, then the tags space-separated in
one field (empty for an image with no tag). Tags are the class names with ``/``, whitespace and
commas replaced by ``_`` ("T-shirt/top" -> "T-shirt_top", "Ankle boot" -> "Ankle_boot"), so a
tag never holds a separator. ``hf`` saves ``DatasetDict(train, test)`` with ``save_to_disk``;
features ``image`` (``datasets.Image``) and ``labels`` (``Sequence(ClassLabel)`` with the
original names). Either way the output is built in ``OUT.tmp`` and renamed to OUT at the end,
so a killed run leaves no half-written OUT. Fashion-MNIST is read from ``--fmnist``, else
/usr/share/datasets/fashion-mnist (``apt-get install -y dataset-fashion-mnist``), else
../shared/data/fashion-mnist beside the repository.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.idx import DataError
from finetune.data.sources import DEFAULT_IDX_DIRS, find_idx_dir, load_idx

SHARED_IDX_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
TILE = 28
SPLIT_STREAMS = {"train": 0, "test": 1}  # one independent random stream per split


def tag_name(name: str) -> str:
    """A class name spelled to survive space- or comma-separated tag lists."""
    return re.sub(r"[/,\s]+", "_", name.strip())


def find_source(given: Path | None) -> Path:
    candidates = [given] if given is not None else [*DEFAULT_IDX_DIRS, SHARED_IDX_DIR]
    for root in candidates:
        folder = find_idx_dir(root)
        if folder is not None:
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise DataError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] and the other "
                    f"three) in {where}; run `apt-get install -y dataset-fashion-mnist` or "
                    f"pass --fmnist DIR.")


# --- Composing --------------------------------------------------------------------------------

def compose(images: np.ndarray, labels: np.ndarray, n: int, num_classes: int, p_empty: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics, uint8 (n, 56, 56), and their tags as a bool (n, num_classes) matrix."""
    filled = rng.random((n, 4)) >= p_empty
    picks = rng.integers(0, len(images), (n, 4))
    tiles = images[picks] * filled[:, :, None, None].astype(np.uint8)  # blank tiles are black
    # (n, 4, 28, 28) in reading order -> (n, row, col, 28, 28) -> (n, row, 28, col, 28).
    mosaics = tiles.reshape(n, 2, 2, TILE, TILE).transpose(0, 1, 3, 2, 4)
    hot = np.zeros((n, num_classes), dtype=bool)
    rows = np.repeat(np.arange(n), 4).reshape(n, 4)
    hot[rows[filled], labels[picks][filled]] = True
    return np.ascontiguousarray(mosaics.reshape(n, 2 * TILE, 2 * TILE)), hot


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- Writing ----------------------------------------------------------------------------------

def write_folder(tmp: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 classes: list[str]) -> None:
    tags = [tag_name(c) for c in classes]
    for split, (mosaics, hot) in splits.items():
        folder = tmp / split
        folder.mkdir(parents=True)
        width = max(5, len(str(len(mosaics) - 1)))
        with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["file", "tags"])
            for i, (pixels, row) in enumerate(zip(mosaics, hot, strict=True)):
                name = f"{i:0{width}d}.png"
                (folder / name).write_bytes(png_bytes(pixels))
                writer.writerow([name, " ".join(t for t, on in zip(tags, row, strict=True) if on)])


def write_hf(tmp: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
             classes: list[str]) -> None:
    import datasets

    datasets.disable_progress_bars()  # the summary line is the script's only output
    features = datasets.Features({
        "image": datasets.Image(),
        "labels": datasets.Sequence(datasets.ClassLabel(names=classes)),
    })
    parts = {}
    for split, (mosaics, hot) in splits.items():
        rows = {"image": [{"bytes": png_bytes(p), "path": None} for p in mosaics],
                "labels": [np.flatnonzero(row).tolist() for row in hot]}
        parts[split] = datasets.Dataset.from_dict(rows, features=features,
                                                  split=datasets.NamedSplit(split))
    datasets.DatasetDict(parts).save_to_disk(str(tmp))


WRITERS = {"folder": write_folder, "hf": write_hf}


def publish(out: Path, force: bool, write, *write_args) -> None:
    """Build into OUT.tmp, then swap it in as OUT: a killed run leaves no half-written OUT."""
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or add "
                              f"--force to replace it.")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # what a killed run left behind
        shutil.rmtree(tmp)
    try:
        write(tmp, *write_args)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --- Command line -----------------------------------------------------------------------------

def summary(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> str:
    hots = {split: hot for split, (_, hot) in splits.items()}
    counts = "; ".join(f"{split} {len(hot)} images, {hot.sum(1).mean():.2f} tags/image, "
                       f"{int((hot.sum(1) == 0).sum())} with no tag"
                       for split, hot in hots.items())
    rates = " ".join(f"{tag_name(c)} " + "/".join(f"{hot[:, k].mean():.3f}"
                                                  for hot in hots.values())
                     for k, c in enumerate(classes))
    return f"{counts}; positive rate ({'/'.join(hots)}): {rates}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (built as OUT.tmp)")
    p.add_argument("--train", type=int, default=4000, help="training mosaics (default 4000)")
    p.add_argument("--test", type=int, default=1000, help="test mosaics (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--p-empty", type=float, default=0.25,
                   help="probability that a tile is blank, 0 to 1 (default 0.25)")
    p.add_argument("--format", choices=sorted(WRITERS), default="folder",
                   help="folder: PNGs + labels.csv per split; hf: DatasetDict.save_to_disk")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--fmnist", type=Path, default=None,
                   help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    args = p.parse_args(argv)
    if args.train < 1 or args.test < 1:
        p.error(f"--train and --test must be at least 1, got {args.train} and {args.test}")
    if not 0.0 <= args.p_empty <= 1.0:
        p.error(f"--p-empty is a probability from 0 to 1, got {args.p_empty}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        train, test = load_idx(find_source(args.fmnist))
        sources = {"train": train, "test": test}
        sizes = {"train": args.train, "test": args.test}
        splits = {}
        for split, data in sources.items():
            rng = np.random.default_rng([args.seed, SPLIT_STREAMS[split]])
            splits[split] = compose(data.images[:, 0].numpy(), data.labels.numpy(),
                                    sizes[split], len(data.classes), args.p_empty, rng)
        publish(args.out, args.force, WRITERS[args.format], splits, train.classes)
    except (DataError, FileExistsError) as e:
        sys.exit(f"mosaics: {e}")
    print(f"{args.out} ({args.format}, {time.perf_counter() - start:.1f} s): "
          f"{summary(splits, train.classes)}")


if __name__ == "__main__":
    main()
