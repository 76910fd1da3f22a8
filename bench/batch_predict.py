"""Batch prediction at scale: ``finetune predict RUN FOLDER --out predictions.csv`` over folders
of 2,000 and 20,000 PNG files (real Fashion-MNIST images), timed, with the peak memory of the
predict process (GNU time's maximum resident set size): flat in the number of images, since
the images stream through DataLoader workers and each batch's rows are written as they come.

    python bench/batch_predict.py --model runs/source-r18 \\
        --data ../shared/data/fashion-mnist --out /tmp/bp --sizes 2000,20000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from finetune.data.sources import load_idx


def image_folder(data: Path, folder: Path, n: int) -> Path:
    """``n`` Fashion-MNIST images (training images, then test images) as PNG files."""
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    train, test = load_idx(data)
    images = [*train.images[:n, 0].numpy(), *test.images[:max(0, n - len(train)), 0].numpy()]
    for i, image in enumerate(images[:n]):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def predict(model: str, folder: Path, out: Path, workers: int) -> dict:
    out.unlink(missing_ok=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "finetune", "predict", model,
           str(folder), "--out", str(out), "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1])
    rows = len(out.read_text().splitlines()) - 1
    return {"images": rows, "seconds": round(seconds, 1),
            "images_per_sec": round(rows / seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a run folder")
    parser.add_argument("--data", type=Path, required=True, help="Fashion-MNIST IDX folder")
    parser.add_argument("--out", type=Path, default=Path("runs/batch_predict"))
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--workers", type=int, default=2)
    ns = parser.parse_args()
    results = []
    for n in map(int, ns.sizes.split(",")):
        folder = image_folder(ns.data, ns.out / f"images{n}", n)
        results.append(predict(ns.model, folder, ns.out / f"predictions{n}.csv", ns.workers))
        print(results[-1], file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
