"""Photos on the streaming path against torchvision's ImageFolder + DataLoader, side by side.

    python bench/photos.py make DIR [--images 2000]      # generated camera-sized JPEGs
    python bench/photos.py run DIR [--image-size 128] [--steps 40] [--json FILE]
        [--model resnet18] [--precision fp32] [--sides stream,reference] [--workers 2]

``make`` writes a photo-like ImageFolder tree (10 classes; 1,600-3,200 px on the long side;
3:2, 4:3, 16:9, portrait and landscape; smooth colour fields, a class-specific shape, grain),
nothing of which is committed. ``run`` trains ResNet-18 from scratch on it at --image-size,
once with ``finetune train`` (``data.placement=auto``, which streams these) and once with the
reference loop a user would write (``torchvision.datasets.ImageFolder`` + ``DataLoader``, the
same RandomResizedCrop + flip + normalize, the same workers, model, precision, memory layout,
optimizer and batch), each in its own process, and reports for each side:

- seconds from the process's start to its first training step;
- training images/s over --steps steps after the first 5;
- peak resident memory of the main process, and of it plus its DataLoader workers (sampled
  every 0.1 s; shared pages count once per process, so the sum overstates).

Sides: ``stream`` (finetune, ``data.placement=auto``, which streams camera-sized photos),
``device`` (finetune, ``data.placement=device``: every photo decoded once, resized and
center-cropped, before the first step, then batches indexed and augmented on the device; what
a GPU gets from holding the data) and ``reference``. On a GPU each timed step waits for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

START = time.perf_counter()  # before torch is imported: "from the process's start"


_GRAIN = []  # one full-size grain image per generating process, cropped for each photo


def _make_one(args: tuple[Path, int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    root, i, classes = args
    rng = np.random.default_rng(i)
    k = i % classes
    long_side = int(rng.integers(1600, 3201))
    w_ratio, h_ratio = [(3, 2), (4, 3), (16, 9), (2, 3), (3, 4)][int(rng.integers(0, 5))]
    w = long_side if w_ratio >= h_ratio else long_side * w_ratio // h_ratio
    h = long_side * h_ratio // w_ratio if w_ratio >= h_ratio else long_side
    # A smooth colour field (a few coarse random colours upsampled), a class-specific shape
    # in a class-specific hue at a random place and size, and grain.
    field = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    size = int(min(w, h) * rng.uniform(0.2, 0.5))
    x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
    hue = tuple(int(v) for v in (np.array([k * 25, 255 - k * 20, (k * 70) % 256])))
    box = (x, y, x + size, y + size)
    [draw.ellipse, draw.rectangle, draw.pieslice][k % 3](
        box, fill=hue, **({"start": 30 * k, "end": 30 * k + 200} if k % 3 == 2 else {}))
    if not _GRAIN:
        _GRAIN.append(Image.effect_noise((3200, 3200), 40).convert("RGB"))
    gx, gy = int(rng.integers(0, 3201 - w)), int(rng.integers(0, 3201 - h))
    photo = Image.blend(field, _GRAIN[0].crop((gx, gy, gx + w, gy + h)), 0.12)
    folder = root / f"class{k}"
    photo.save(folder / f"{i:05d}.jpg", quality=90)


def make(root: Path, images: int, classes: int = 10) -> None:
    from multiprocessing import Pool

    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        pool.map(_make_one, [(root, i, classes) for i in range(images)], chunksize=8)
    size = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    print(f"wrote {images} JPEGs ({size / 1e9:.2f} GB) to {root} in "
          f"{time.perf_counter() - start:.0f} s")


class PeakMemory(threading.Thread):
    """Peak RSS of process ``pid`` (default: this one), and of it plus its children, sampled
    every 0.1 s until it ends. (PSS would count shared pages once, but reading it costs ~10 ms
    a process: too much beside a training on two cores.)"""

    def __init__(self, pid: int | None = None) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.me, self.main, self.total = psutil, psutil.Process(pid), 0, 0

    def run(self) -> None:
        while True:
            try:
                main = self.me.memory_info().rss
                children = self.me.children(recursive=True)
            except self.psutil.Error:  # the process ended
                return
            total = main
            for child in children:
                try:
                    total += child.memory_info().rss
                except self.psutil.Error:  # a worker that just ended
                    pass
            self.main, self.total = max(self.main, main), max(self.total, total)
            time.sleep(0.1)


def _result(times: list[float], batch: int, memory: PeakMemory, skip: int = 5) -> dict:
    timed = times[skip:]
    return {"first_step_s": round(times[0] - START, 2),
            "images_per_s": round((len(timed) - 1) * batch / (timed[-1] - timed[0]), 1),
            "steps_timed": len(timed) - 1,
            "peak_rss_main_gb": round(memory.main / 2**30, 2),
            "peak_rss_with_workers_gb": round(memory.total / 2**30, 2)}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU step is done when the device is, not when it returns


def run_finetune(root: Path, a: argparse.Namespace, placement: str) -> dict:
    """``finetune train`` on the folder, stopped after ``a.steps`` steps."""
    memory = PeakMemory()
    memory.start()
    import finetune.train as train
    from finetune.config import load_config

    real_step, times = train.train_step, []

    class Done(Exception):
        pass

    def timed_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        _sync()
        times.append(time.perf_counter())
        if len(times) == a.steps + 6:
            raise Done
        return out

    train.train_step = timed_step
    cfg = load_config(["recipe=resnet18_scratch_fmnist", f"data.root={root}",
                       f"model.name={a.model}", f"data.image_size={a.image_size}",
                       f"train.batch_size={a.batch_size}", f"data.workers={a.workers}",
                       f"data.placement={placement}", "data.hflip=true",
                       "data.normalize=imagenet", f"train.mixed_precision={a.precision}",
                       "train.epochs=1000", "train.checkpoint=false",  # stopped by Done
                       f"output_dir={root.parent / 'bench-run'}", "overwrite=true"])
    try:
        train.main(cfg)
    except Done:
        pass
    return _result(times, a.batch_size, memory)


def run_reference(root: Path, a: argparse.Namespace) -> dict:
    """The loop a user writes: ImageFolder + DataLoader + the same transforms and model."""
    memory = PeakMemory()
    memory.start()
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from finetune.models import create_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image_size, batch, steps, workers = a.image_size, a.batch_size, a.steps, a.workers
    transform = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True),
                            v2.RandomHorizontalFlip(), v2.PILToTensor(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    model = create_model(a.model, num_classes=len(data.classes), in_chans=3,
                         image_size=image_size).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    dtype = {"fp32": None, "bf16": torch.bfloat16}[a.precision]
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync()
        times.append(time.perf_counter())
        if len(times) == steps + 6:
            break
    return _result(times, batch, memory)


def _one_side(a: argparse.Namespace) -> dict:
    if a.only == "stream":
        return run_finetune(a.root, a, "auto")
    elif a.only == "device":
        return run_finetune(a.root, a, "device")
    elif a.only == "reference":
        return run_reference(a.root, a)
    else:
        raise ValueError(f"unknown side {a.only!r}; valid: {', '.join(SIDES)}")


SIDES = ("stream", "device", "reference")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("root", type=Path)
    m.add_argument("--images", type=int, default=2000)
    r = sub.add_parser("run")
    r.add_argument("root", type=Path)
    r.add_argument("--model", default="resnet18")
    r.add_argument("--image-size", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    r.add_argument("--sides", default="stream,reference", help=f"of {', '.join(SIDES)}")
    r.add_argument("--json", type=Path)
    r.add_argument("--only", choices=SIDES)  # one side, in this process
    a = p.parse_args()
    if a.cmd == "make":
        make(a.root, a.images)
        return
    if a.only:
        print(json.dumps(_one_side(a)))
        return
    sides = a.sides.split(",")
    if not sides or set(sides) - set(SIDES):
        p.error(f"--sides {a.sides!r}: choose from {', '.join(SIDES)}")
    results = {"images": sum(1 for _ in a.root.rglob("*.jpg")), "model": a.model,
               "image_size": a.image_size, "batch_size": a.batch_size,
               "precision": a.precision, "workers": a.workers, "cpus": os.cpu_count()}
    for side in sides:  # each in a fresh process: memory and start-up
        out = subprocess.run([sys.executable, __file__, "run", str(a.root), "--only", side,
                              "--model", a.model, "--image-size", str(a.image_size),
                              "--batch-size", str(a.batch_size), "--steps", str(a.steps),
                              "--workers", str(a.workers), "--precision", a.precision],
                             capture_output=True, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(side, results[side], flush=True)
    if "reference" in results and "stream" in results:
        results["speed_ratio"] = round(results["stream"]["images_per_s"]
                                       / results["reference"]["images_per_s"], 2)
    print(json.dumps(results, indent=2))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
