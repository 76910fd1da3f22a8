"""Training images/s of the lecture's loop against finetune's, same model, size and data,
timed in one process one after the other.

    python bench/loop_speed.py --model resnet18 --image-size 224 --batch-size 256 \
        [--steps 40] [--variants fp32,bf16,bf16+compile] [--json FILE]

lecture: the d2l-style loop the course used. A Dataset returns PIL images, torchvision's
  Resize + ToTensor run per sample in DataLoader workers (--workers, 2 as in the lecture), fp32,
  NCHW, plain SGD, and the loss and accuracy read on the host after every batch.
finetune: ``finetune.train.train_one_epoch`` itself on the uint8 data held on the device
  (batch resize/normalize/flip there), channels_last, fused SGD; the variant names the
  precision (auto: what ``train.mixed_precision=auto`` chooses, on a CPU by timing a step in
  fp32 and bf16; or fp32 or bf16 through Accelerate), +nchw for the plain memory layout, and
  whether the model is torch.compile'd. Both loops train the same model (finetune's builder).

Each loop is warmed up first (--warmup steps: workers started, cuDNN autotuned, compiled);
then --steps steps are timed, waiting for the device at both ends.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from finetune.assemble import Parts, Training
from finetune.config import Config, DataConfig, TrainConfig
from finetune.data import ImageData, load_data
from finetune.data.loader import BatchTransform, TrainLoader
from finetune.models import create_model, resnet
from finetune.optim import make_optimizer, make_scheduler, plan_stages
from finetune.precision import cpu_auto, cpu_description, resolve_mixed_precision
from finetune.speed import compile_model, tune_backends
from finetune.step import StepOptions
from finetune.train import train_one_epoch


class LectureFashionMNIST(Dataset):
    """What torchvision.datasets.FashionMNIST does per item: uint8 array -> PIL -> transform."""

    def __init__(self, data: ImageData, transform) -> None:
        self.images, self.labels, self.transform = data.images[:, 0].numpy(), data.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lecture_loop(data: ImageData, args, device: torch.device) -> float:
    """img/s of the lecture's loop (d2l train_ch6 style)."""
    tf = transforms.Compose([transforms.Resize(args.image_size), transforms.ToTensor()])
    loader = DataLoader(LectureFashionMNIST(data, tf), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, drop_last=True)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=1,
                         image_size=args.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    batches = iter(loader)
    start, seen = None, 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device), y.to(device)
        y_hat = model(x)
        loss = F.cross_entropy(y_hat, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # d2l's metric.add(l * X.shape[0], accuracy(y_hat, y), ...)
            float(loss) * x.shape[0], float((y_hat.argmax(1) == y).sum())
        seen += len(y) if step >= args.warmup else 0
    sync(device)
    return seen / (time.perf_counter() - start)


def finetune_loop(data: ImageData, args, variant: str) -> tuple[float, str]:
    """img/s of finetune's own epoch function on device-resident data, and the precision it
    ran in (``auto``: what ``train.mixed_precision=auto`` chooses, timed on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layout = torch.contiguous_format if "nchw" in variant else torch.channels_last
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=1, image_size=args.image_size)
    model.to(device, memory_format=layout)
    precision = "bf16" if "bf16" in variant else "fp32"
    if variant.startswith("auto"):  # as a run decides (and caches) it; logged
        precision = (cpu_auto(device, model, (args.batch_size, 1, args.image_size,
                                              args.image_size), layout, args.model)
                     if device.type == "cpu" else resolve_mixed_precision("auto", device))
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
    tune_backends(device)
    cfg = Config(train=TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01,
                                   log_every=10**9))
    transform = BatchTransform(args.image_size, 1, (0.286,), (0.353,), hflip=True,
                               channels_last=layout == torch.channels_last)
    plan = plan_stages(model, cfg.finetune)
    optimizer = make_optimizer(model, cfg.train, plan)
    scheduler = make_scheduler(optimizer, lambda step: 1.0)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    on_device = data.to(device)
    opts = StepOptions(num_classes=10)
    gen = torch.Generator(device).manual_seed(0)
    if "compile" in variant:
        mode = "reduce-overhead" if "cudagraphs" in variant else "default"
        compile_model(prepared, optimizer, on_device.images[:args.batch_size],
                      on_device.labels[:args.batch_size], transform, accelerator, opts, mode)

    def epoch(n_steps: int) -> float:
        n = n_steps * args.batch_size
        part = ImageData(on_device.images[:n], on_device.labels[:n], on_device.classes)
        parts = Parts(model, None, plan, transform, part, part, None, "bench", "device", 1,
                      transform.mean, transform.std, 1.0, "bilinear", "batch")
        loader = TrainLoader(part, "device", args.batch_size, 0, 0, 1, device, 0)
        t = Training(prepared, model, optimizer, scheduler, lambda step: 1.0, opts, n_steps,
                     loader, None, None, None, gen)
        start = time.perf_counter()
        train_one_epoch(cfg, parts, t, accelerator, 1)
        return time.perf_counter() - start  # train_one_epoch ends by reading its metrics

    epoch(args.warmup)
    images_per_sec = args.steps * args.batch_size / epoch(args.steps)
    if args.profile:
        profile(lambda: epoch(args.steps), args.steps, device)
    return images_per_sec, precision


def profile(run, steps: int, device: torch.device) -> None:
    """Where a step's time goes: wall time against the time kernels ran on the device (a gap
    means the host is the limit), and the kernels that take the most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        wall = run()
    events = prof.key_averages()
    # Kernels are the rows with no host time of their own; the operator rows that launched
    # them repeat their device time, so summing every row would count it twice.
    device_us = sum(e.self_device_time_total for e in events
                    if e.self_cpu_time_total == 0 and e.self_device_time_total > 0)
    print(f"    profile: {wall / steps * 1e3:.2f} ms/step wall, "
          f"{device_us / steps / 1e3:.2f} ms/step of kernels on the device "
          f"({device_us / 1e6 / wall:.0%} busy)")
    print(events.table(sort_by="self_device_time_total" if device.type == "cuda"
                       else "self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", default="auto,fp32,bf16",
                        help="finetune variants: auto (what train.mixed_precision=auto "
                             "chooses), fp32 or bf16; +nchw (else channels_last), +compile, "
                             "+compile+cudagraphs")
    parser.add_argument("--plain-conv", action="store_true",
                        help="convolve small maps too (finetune.models.resnet.Conv2d off), "
                             "for the side-by-side")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each finetune variant (torch.profiler)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder")
    parser.add_argument("--json", type=Path, default=None, help="append the result as a line")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="    %(message)s")
    logging.getLogger("finetune.precision").setLevel(logging.INFO)  # auto's two timings
    if args.plain_conv:
        resnet.Conv2d.forward = nn.Conv2d.forward

    train, _, source = load_data(DataConfig(root=args.data_root))
    need = (args.warmup + args.steps) * args.batch_size
    if len(train) < need:
        raise SystemExit(f"need {need} training images for warmup+steps, have {len(train)}")
    device = Accelerator().device
    if device.type == "cpu":
        torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_description()}, {torch.get_num_threads()} threads"
    print(f"{args.model} @ {args.image_size} px, batch {args.batch_size}, {args.steps} timed "
          f"steps after {args.warmup} warm-up, on {name}; data {source}"
          f"{'; small maps convolved' if args.plain_conv else ''}", flush=True)
    result = {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "device": name, "torch": torch.__version__,
              "cpu": cpu_description() if device.type == "cpu" else None,
              "plain_conv": args.plain_conv,
              "lecture": round(lecture_loop(train, args, device), 1)}
    print(f"  lecture loop            {result['lecture']:9.0f} img/s", flush=True)
    for variant in args.variants.split(","):
        ips, precision = finetune_loop(train, args, variant)
        result[variant] = round(ips, 1)
        if variant.startswith("auto"):
            result[f"{variant}_precision"] = precision
        print(f"  finetune {variant:14s} {ips:9.0f} img/s  {ips / result['lecture']:5.2f}x "
              f"the lecture loop{f' ({precision})' if variant.startswith('auto') else ''}",
              flush=True)
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
