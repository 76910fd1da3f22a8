"""finetune against its peers: the same training work (finetune's recipe resnet18_cpu_fmnist)
through finetune, timm's train.py, the Hugging Face Trainer, fastai and a plain Lightning
module, one after the other on this machine, each in its own process, as each tool's own
documentation has users run it. One table: training images/s, time to the first training step,
seconds to 90 % test accuracy, final test accuracy, peak memory, parameters, versions.

    python bench/peers.py --setup        # once: .peers-venv with bench/requirements-peers.txt
    python bench/peers.py [--peers finetune,timm,hf,fastai,lightning] [--epochs 3] [--workers 2]
        [--precision fp32|bf16] [--train-limit N] [--timm-train PATH] [--json FILE] [--out DIR]

Run it with the project's venv (finetune runs from it); the peers run from .peers-venv, never
the project's environment. The data: Fashion-MNIST's IDX files (/usr/share/datasets/fashion-
mnist or ../shared/data/fashion-mnist, or --idx DIR) written once as PNG files,
DATA/train/<class>/*.png and DATA/test/<class>/*.png (--data, default .data/fmnist-png);
--train-limit N: DATA-trainN, with the first N training images (and all 10,000 test images).
MEAN/STD are the training images' pixel statistics (0-1), WORKERS --workers, E --epochs. The
commands, run from the repository root (per peer, with --out DIR/PEER):

finetune (project venv; it decodes the folder once and trains from memory; bf16:
train.mixed_precision=bf16):
    python -m finetune.cli train recipe=resnet18_cpu_fmnist data.root=DATA output_dir=DIR
        train.epochs=E data.workers=WORKERS train.mixed_precision=fp32 train.checkpoint=false
        train.eval_batch_size=500
timm (its repository's train.py at the installed version: --timm-train PATH, else downloaded;
W = E/4 rounded, whole warmup epochs; --device cuda on a GPU; bf16: --amp --amp-dtype bfloat16):
    python train.py --data-dir DATA --train-split train --val-split test --model resnet18
        --model-kwargs zero_init_last=False --num-classes 10 --in-chans 1 --input-size 1 28 28
        --mean MEAN --std STD --crop-pct 1.0 --no-aug -b 256 -vb 500 --opt sgd --lr 0.1
        --momentum 0.9 --weight-decay 5e-5 --sched cosine --sched-on-updates --epochs E-W
        --warmup-epochs W --warmup-prefix --warmup-lr 0.004 --min-lr 4e-7 --smoothing 0.1
        --workers WORKERS --device cpu --seed 0 --output DIR --experiment timm --checkpoint-hist 1
hf, fastai, lightning (bench/peers/hf_trainer.py, fastai_run.py, lightning_run.py; the other
settings default to the recipe's, bench/peers/peerlib.py):
    python bench/peers/hf_trainer.py --data DATA --out DIR --mean MEAN --std STD --epochs E
        --workers WORKERS [--precision bf16]

finetune's command runs through bench/peers/probe.py (python bench/peers/probe.py -m
finetune.cli train ...) and train.py through bench/peers/timm_run.py (python
bench/peers/timm_run.py train.py ...): both run the command unchanged and only report what is
measured below.

How the figures are taken, the same way for every peer:
- training images/s: images trained per second of training passes (evaluation excluded), the
  median over the epochs after the first (the first alone for a 1-epoch run). finetune: its
  metrics.jsonl; the others: their own epoch hooks (bench/peers/*.py; timm: train.py's
  train_one_epoch timed around the call, see bench/peers/timm_run.py).
- first step: seconds from this script starting the peer's process to the first forward pass
  in training mode (a global forward pre-hook, bench/peers/peerlib.py; imports, data indexing
  or decoding, model building and worker start-up all count).
- s to 90 %: the training seconds (the sum of the epochs' training passes) up to the end of the
  first epoch whose accuracy on the 10,000 test images is >= 0.90; '-' if none is.
- peak RSS: the largest sum of the resident memory of the peer's process and all its
  descendants (DataLoader workers), sampled every 0.1 s with psutil; in brackets the peer's
  main process alone. Pages shared between processes (torch's libraries in each worker) count
  once per process in the sum.
- params: counted in the peer's process on the network its first training step enters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from photos import PeakMemory  # bench/photos.py: the process tree's peak RSS
from PIL import Image

from finetune.config import ConfigError
from finetune.data.sources import load_idx
from finetune.runs import read_metrics, time_to_accuracy

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "bench" / "peers"
PEERS_VENV = ROOT / ".peers-venv"
REQUIREMENTS = ROOT / "bench" / "requirements-peers.txt"
PEERS = ("finetune", "timm", "hf", "fastai", "lightning")
IDX_DIRS = (Path("/usr/share/datasets/fashion-mnist"), ROOT.parent / "shared/data/fashion-mnist")
TIMM_URL = "https://raw.githubusercontent.com/huggingface/pytorch-image-models/v{}/train.py"
TARGET = 0.90
# The work: finetune's recipes/resnet18_cpu_fmnist.yaml.
RECIPE = "resnet18_cpu_fmnist"
BATCH, LR, MOMENTUM, WEIGHT_DECAY, SMOOTHING = 256, 0.1, 0.9, 5e-5, 0.1
# Evaluation batches (finetune's default 512) of 500: they divide the 10,000 test images, and
# the HF Trainer's dataloader_drop_last (whole training batches, as everywhere) drops a partial
# evaluation batch too.
EVAL_BATCH = 500
RESNET18_1CH_10 = 11_175_370  # torchvision's / timm's ResNet-18, 1 input channel, 10 classes


@dataclass
class Work:
    data: Path
    epochs: int
    workers: int
    precision: str
    mean: float
    std: float
    device: str


def main() -> None:
    args = parse_args()
    if args.setup:
        setup()
        return
    python = PEERS_VENV / "bin" / "python"
    if set(args.peers) - {"finetune"} and not python.is_file():
        raise SystemExit(f"{PEERS_VENV} does not exist; create it with "
                         f"`python bench/peers.py --setup`.")
    data, mean, std = fashion_mnist_png(args.idx, args.data, args.train_limit)
    work = Work(data, args.epochs, args.workers, args.precision, mean, std,
                "cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or Path(tempfile.mkdtemp(prefix="peers_"))
    # Every command first: a missing train.py stops the run before any peer has trained.
    commands = {peer: command(peer, work, out / peer, python, args.timm_train)
                for peer in args.peers}
    rows = [run_peer(peer, cmd, out / peer) for peer, cmd in commands.items()]
    notes = [n for n in deviations(work) if n.split(":")[0] in (*commands, "init", "seeds")]
    if "timm" in commands:
        notes.append(f"timm: train.py from {commands['timm'][2]}")
    print(table(rows, work, notes))
    if args.json:
        settings = {**asdict(work), "data": str(work.data), "batch_size": BATCH, "lr": LR,
                    "train_limit": args.train_limit, "out": str(out)}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows, "notes": notes},
                                        indent=2) + "\n")
    failed = [r["peer"] for r in rows if r["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (logs in {out}/PEER/peer.log)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", action="store_true", help=f"create {PEERS_VENV.name} and exit")
    p.add_argument("--peers", default=",".join(PEERS), type=lambda s: s.split(","),
                   help=f"comma-separated, from {','.join(PEERS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (data.workers)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast where the CPU has AVX512-BF16/AMX (or on a GPU)")
    p.add_argument("--train-limit", type=int, default=None, help="first N training images")
    p.add_argument("--timm-train", type=Path, default=None, help="a local copy of timm's "
                   "train.py (default: downloaded for the installed timm version)")
    p.add_argument("--idx", type=Path, default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--data", type=Path, default=ROOT / ".data" / "fmnist-png")
    p.add_argument("--out", type=Path, default=None, help="the runs (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the table as JSON here too")
    args = p.parse_args()
    if args.train_limit is not None and args.train_limit < BATCH:
        p.error(f"--train-limit {args.train_limit}: at least one batch ({BATCH}) is needed")
    unknown = [name for name in args.peers if name not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; valid: {', '.join(PEERS)}")
    return args


def setup() -> None:
    """.peers-venv (python -m venv) with bench/requirements-peers.txt (pip)."""
    if not (PEERS_VENV / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "-r",
                    str(REQUIREMENTS)], check=True)
    print(f"{PEERS_VENV} is ready: python bench/peers.py [--peers ...]")


# --- data: Fashion-MNIST as a PNG ImageFolder --------------------------------------------------

def fashion_mnist_png(idx: Path | None, root: Path, limit: int | None
                      ) -> tuple[Path, float, float]:
    """The PNG tree (root, or root-trainN with the first N training images; written once) and
    its training images' mean and std."""
    folder = idx or next((d for d in IDX_DIRS if d.is_dir()), None)
    if folder is None:
        raise SystemExit(f"no Fashion-MNIST IDX files in {' or '.join(map(str, IDX_DIRS))}; "
                         f"apt-get install dataset-fashion-mnist, or pass --idx DIR.")
    train, test = load_idx(folder)
    count = min(limit or len(train), len(train))
    if count < len(train):
        root = root.with_name(f"{root.name}-train{count}")
    names = [f"{i}_{name.replace('/', '-')}" for i, name in enumerate(train.classes)]
    for split, data, n in (("train", train, count), ("test", test, len(test))):
        done = root / f".complete-{split}"  # hidden: no tool reads it as data
        if not done.is_file():
            print(f"writing {n} {split} images of {folder} as PNG files to {root / split}",
                  flush=True)
            write_split(root / split, data, names, n)
            done.write_text(f"{n} images from {folder}\n")
    counts = np.bincount(train.images[:count].numpy().ravel(), minlength=256)  # exact, small
    values = np.arange(256) / 255
    mean = float((counts * values).sum() / counts.sum())
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))
    return root, round(mean, 4), round(std, 4)


def write_split(folder: Path, data, names: list[str], count: int) -> None:
    """The first ``count`` images as folder/<label>_<class>/<index>.png."""
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted write
    for name in names:
        (folder / name).mkdir(parents=True)
    for i in range(count):
        Image.fromarray(data.images[i, 0].numpy()).save(
            folder / names[int(data.labels[i])] / f"{i:05d}.png")


# --- the peers' commands ---------------------------------------------------------------------

def command(peer: str, work: Work, out: Path, python: Path, timm_train: Path | None
            ) -> list[str]:
    if peer == "finetune":
        return finetune_command(work, out)
    elif peer == "timm":
        return [str(python), str(SCRIPTS / "timm_run.py"),
                str(timm_train_py(timm_train, python)), *timm_args(work, out)]
    elif peer == "hf":
        return script_command(python, "hf_trainer.py", work, out)
    elif peer == "fastai":
        return script_command(python, "fastai_run.py", work, out)
    elif peer == "lightning":
        return script_command(python, "lightning_run.py", work, out)
    else:
        raise ValueError(f"unknown peer {peer!r}; valid: {', '.join(PEERS)}")


def finetune_command(work: Work, out: Path) -> list[str]:
    """`python -m finetune.cli train ...` from this venv, through probe.py (first step)."""
    return [sys.executable, str(SCRIPTS / "probe.py"), "-m", "finetune.cli", "train",
            f"recipe={RECIPE}", f"data.root={work.data}", f"output_dir={out / 'run'}",
            f"train.epochs={work.epochs}", f"data.workers={work.workers}",
            f"train.mixed_precision={work.precision}", "train.checkpoint=false",
            f"train.eval_batch_size={EVAL_BATCH}"]


def warmup_epochs(epochs: int) -> int:
    """timm's whole-epoch warmup nearest one-cycle's 25 % (0 for 1 epoch, 1 for 2-5, ...)."""
    return int(epochs / 4 + 0.5)


def timm_args(work: Work, out: Path) -> list[str]:
    """train.py's flags for the same work: no augmentation (--no-aug), the eval crop off
    (--crop-pct 1.0: else 28 px is resized to 32 and centre-cropped), torchvision's init
    (zero_init_last=False), Nesterov SGD (timm's 'sgd'), and the cosine schedule nearest
    one-cycle: W warmup epochs from lr/25, then cosine to lr/25/1e4, E epochs in all."""
    warmup = warmup_epochs(work.epochs)
    flags = ["--data-dir", str(work.data), "--train-split", "train", "--val-split", "test",
             "--model", "resnet18", "--model-kwargs", "zero_init_last=False",
             "--num-classes", "10", "--in-chans", "1", "--input-size", "1", "28", "28",
             "--mean", str(work.mean), "--std", str(work.std), "--crop-pct", "1.0", "--no-aug",
             "-b", str(BATCH), "-vb", str(EVAL_BATCH), "--opt", "sgd", "--lr", str(LR),
             "--momentum", str(MOMENTUM), "--weight-decay", str(WEIGHT_DECAY),
             "--sched", "cosine", "--sched-on-updates", "--epochs", str(work.epochs - warmup),
             "--warmup-epochs", str(warmup), "--warmup-prefix", "--warmup-lr", str(LR / 25),
             "--min-lr", str(LR / 25 / 1e4), "--smoothing", str(SMOOTHING),
             "--workers", str(work.workers), "--device", work.device, "--seed", "0",
             "--output", str(out), "--experiment", "timm", "--checkpoint-hist", "1"]
    if work.precision == "bf16":
        flags += ["--amp", "--amp-dtype", "bfloat16"]
    return flags


def timm_train_py(path: Path | None, python: Path) -> Path:
    """--timm-train, else train.py of the peers' timm version from GitHub (cached)."""
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"--timm-train {path}: no such file.")
        return path
    timm_version = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('timm'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    cached = PEERS_VENV / "cache" / f"timm-{timm_version}-train.py"
    if not cached.is_file():
        url = TIMM_URL.format(timm_version)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                text = response.read()
        except OSError as e:
            raise SystemExit(f"cannot download timm's train.py ({url}: {e}); fetch it where "
                             f"the network allows and pass --timm-train PATH.") from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(text)
    return cached


def script_command(python: Path, script: str, work: Work, out: Path) -> list[str]:
    cmd = [str(python), str(SCRIPTS / script), "--data", str(work.data), "--out", str(out),
           "--mean", str(work.mean), "--std", str(work.std), "--epochs", str(work.epochs),
           "--workers", str(work.workers), "--batch-size", str(BATCH),
           "--eval-batch-size", str(EVAL_BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM),
           "--weight-decay", str(WEIGHT_DECAY), "--smoothing", str(SMOOTHING)]
    return cmd + (["--precision", "bf16"] if work.precision == "bf16" else [])


# --- running one peer ----------------------------------------------------------------------

def run_peer(peer: str, cmd: list[str], out: Path) -> dict:
    """Run ``cmd`` with its output in out/peer.log, sampling its memory; its row."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    events = out / "events.jsonl"
    env = {**os.environ, "PEERS_EVENTS": str(events), "HF_HUB_OFFLINE": "1"}
    print(f"\n== {peer}\n$ {' '.join(cmd)}", flush=True)
    with open(out / "peer.log", "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        memory = PeakMemory(proc.pid)
        memory.start()
        proc.wait()
        memory.join()
        wall = time.time() - launched
    if proc.returncode != 0:
        tail = (out / "peer.log").read_text(errors="replace").splitlines()[-15:]
        print(f"{peer} failed (exit {proc.returncode}); the end of {out / 'peer.log'}:\n"
              + "\n".join(tail), flush=True)
    found = read_events(events)
    records = epoch_records(peer, out, found)
    row = summarize(peer, records, found, launched, memory.total, wall, proc.returncode)
    return {**row, "peak_rss_main_mib": round(memory.main / 2**20)}


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_records(peer: str, out: Path, events: list[dict]) -> list[dict]:
    """Per epoch: epoch, epoch_time (training seconds), test_acc, images_per_sec."""
    if peer == "finetune":
        try:
            return [{"epoch": r["epoch"], "epoch_time": r["epoch_time"],
                     "test_acc": r["test_acc"], "images_per_sec": r["train_images_per_sec"]}
                    for r in read_metrics(out / "run")]
        except ConfigError as e:  # a failed run: no metrics (its log says why)
            print(f"finetune: {e}")
            return []
    return [{"epoch": e["epoch"], "epoch_time": e["epoch_time"], "test_acc": e["test_acc"],
             "images_per_sec": e["images"] / e["epoch_time"]}
            for e in events if e["event"] == "epoch"]


def peer_versions(peer: str, events: list[dict]) -> dict:
    if peer == "finetune":
        return {name: version(name) for name in ("finetune", "torch", "torchvision")}
    return next((e["versions"] for e in events if e["event"] == "versions"), {})


def summarize(peer: str, records: list[dict], events: list[dict], launched: float, peak: int,
              wall: float, returncode: int) -> dict:
    first = next((e for e in events if e["event"] == "first_step"), None)
    steady = records[1:] or records
    reached = time_to_accuracy(records, TARGET) if records else None
    return {"peer": peer, "returncode": returncode,
            "images_per_sec": (round(statistics.median(r["images_per_sec"] for r in steady), 1)
                               if steady else None),
            "first_step_s": round(first["time"] - launched, 2) if first else None,
            "seconds_to_90": reached[1] if reached else None,
            "epoch_to_90": reached[0] if reached else None,
            "final_test_acc": records[-1]["test_acc"] if records else None,
            "train_seconds": round(sum(r["epoch_time"] for r in records), 2),
            "peak_rss_mib": round(peak / 2**20), "wall_s": round(wall, 1),
            "params": first["params"] if first else None,
            "versions": peer_versions(peer, events), "epochs": records}


# --- the report ------------------------------------------------------------------------------

def deviations(work: Work) -> list[str]:
    """What differs between the peers' work, where the tools leave no way to make it equal."""
    warmup = warmup_epochs(work.epochs)
    return [
        f"timm: train.py has no one-cycle schedule; its nearest is used: {warmup} warmup "
        f"epoch(s) linear from lr/25, then cosine to lr/25/1e4 (one-cycle: a cosine rise over "
        f"25 % of the steps, then cosine down)",
        "timm: train.py always saves checkpoints (here --checkpoint-hist 1; outside the "
        "training seconds); its loader keeps workers alive between epochs (fastai, hf, "
        "lightning: workers start anew each epoch; the start counts in the training seconds)",
        "finetune: data placement 'device' (decoded once, batches indexed in memory: no "
        "DataLoader while training), recalibrated batch-norm statistics after each epoch "
        "(train.precise_bn, 4096 images, outside the training seconds), channels_last and "
        "its CPU small-map convolutions; the peers decode PNG files in DataLoader workers "
        "every epoch",
        "lightning: two validation batches before training (its default sanity check, counted "
        "in the time to the first step)",
        "hf: datasets indexes the folder into a fresh Arrow cache every run (counted in the "
        "time to the first step)",
        "init: torchvision's in every peer (Kaiming-normal fan-out convolutions, BN 1/0, "
        "torch's default Linear; timm with zero_init_last=False, fastai with init=None)",
        "seeds: 0 for every tool, but each draws its own batches and initial weights: "
        "accuracies differ by seed noise too (finetune's own seeds 0-2 span 90.8-91.5 % after "
        "3 epochs, README)",
    ]


def table(rows: list[dict], work: Work, notes: list[str]) -> str:
    head = ["peer", "train img/s", "first step s", f"s to {TARGET:.0%}", "final test acc",
            "peak RSS MiB (main)", "params", "versions"]
    lines = [f"\nResNet-18 from scratch, Fashion-MNIST 28 px ({work.data.name}), "
             f"{work.epochs} epoch(s), batch {BATCH}, {work.precision}, {work.workers} workers, "
             f"{work.device}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["peer"] + ("" if r["returncode"] == 0 else " (failed)"),
                 _num(r["images_per_sec"], "{:.0f}"), _num(r["first_step_s"], "{:.1f}"),
                 (f"{r['seconds_to_90']:.1f} (ep {r['epoch_to_90']})"
                  if r["seconds_to_90"] is not None else "-"),
                 _num(r["final_test_acc"], "{:.4f}"),
                 f"{r['peak_rss_mib']} ({r['peak_rss_main_mib']})",
                 _num(r["params"], "{:,}"),
                 ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {r["params"] for r in rows if r["params"] is not None}
    lines.append("")
    lines.append(f"parameters: {'all equal' if len(counts) == 1 else 'DIFFER'} "
                 f"({', '.join(f'{c:,}' for c in sorted(counts))}; ResNet-18 with 1 channel "
                 f"and 10 classes: {RESNET18_1CH_10:,})")
    lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


if __name__ == "__main__":
    main()
