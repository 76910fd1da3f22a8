"""Shared fixtures: fake Fashion-MNIST-style IDX files and a tiny CPU config."""

from __future__ import annotations

import contextlib
import gzip
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import numpy as np
import pytest
import torch
from PIL import Image

NUM_CLASSES = 10

# Property tests draw the same examples on every run and keep no example database.
hypothesis.settings.register_profile("deterministic", derandomize=True, database=None)
hypothesis.settings.load_profile("deterministic")


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake images: class k is a bright horizontal band at a class-specific height."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    band = size // NUM_CLASSES
    for i, k in enumerate(labels):
        images[i, k * band:(k + 1) * band + 1, :] = 230
    return images, labels.astype(np.uint8)


CLASSES = 10


def photo(k: int, rng: np.random.Generator, grey: bool = False) -> Image.Image:
    """Class k: a bright vertical band at a class-specific place, on noise, of random size
    and aspect ratio."""
    w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    a = rng.integers(0, 70, (h, w, 3), dtype=np.uint8)
    left = k * w // CLASSES
    a[:, left:left + max(2, w // CLASSES)] = 230
    image = Image.fromarray(a)
    return image.convert("L") if grey else image


def write_photos(root, per_class: int = 20, seed: int = 0):
    """A class-sorted ImageFolder tree of JPEGs and PNGs of mixed sizes."""
    rng = np.random.default_rng(seed)
    for k in range(CLASSES):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            suffix = ".png" if i % 4 == 0 else ".jpg"
            photo(k, rng).save(folder / f"{i:03d}{suffix}")
    return root


def write_fake_fmnist(folder: Path, n_train: int = 96, n_test: int = 53, gz: bool = True
                      ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, gz)
    return folder


# Seconds and speeds differ from run to run (an interrupted run and an uninterrupted one too).
TIMING = {"epoch_time", "eval_time", "train_images_per_sec", "compile_time"}


def untimed_metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl records without the fields that measure time."""
    from finetune.runs import read_metrics

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]


HOOKS = str(Path(__file__).with_name("launch_hooks.py"))


def launch_two_cpu_processes(*args: str, launcher: str = "torchrun", env: dict | None = None,
                             expect: int = 0) -> str:
    """Run ``ARGS`` (a script and its arguments, or ``-m module ...``) in 2 CPU processes
    (gloo), as the README says: ``torchrun --standalone --nproc_per_node 2`` or ``accelerate
    launch --multi_gpu --num_processes 2``. Returns stdout + stderr, after checking the exit
    status and, for a run that succeeded, that two processes of one group of two ran."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *args]
    elif launcher == "accelerate":
        with socket.socket() as sock:  # a free port, so parallel CI jobs do not collide
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    else:
        raise ValueError(f"unknown launcher {launcher}; valid: torchrun, accelerate")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-6000:]
    if expect == 0:
        ranks = set(re.findall(r"process (\d+) of (\d+) \(local \d+\), backend (\w+)", out))
        assert ranks == {("0", "2", "gloo"), ("1", "2", "gloo")}, ranks
    return out


def resumes_identically(args: list[str], run: Path, checkpoint: str) -> None:
    """Train ``args`` again from ``run``'s checkpoint ``checkpoint``: the exported weights and
    the records (timings aside) must come out unchanged."""
    from safetensors.torch import load_file

    from finetune.config import load_config
    from finetune.train import main

    weights, records = load_file(run / "model.safetensors"), untimed_metrics(run)
    main(load_config(args + [f"resume={run / 'checkpoints' / checkpoint}", "output_dir=null"]))
    again = load_file(run / "model.safetensors")
    assert again.keys() == weights.keys(), checkpoint
    assert all(torch.equal(weights[k], again[k]) for k in weights), checkpoint
    assert untimed_metrics(run) == records, checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run: Path, *options: str):
    """``finetune serve RUN OPTIONS`` as its own process on a free port, up; its URL."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "serve", str(run), "--port",
                             str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not start: {proc.stdout.read()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def without_views(run: Path, dest: Path) -> Path:
    """A copy of the run's export (no checkpoints) as if trained with neither mirror images nor
    shifts: a model with no test-time views."""
    import json
    import shutil

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    meta = json.loads((dest / "model.json").read_text())
    meta["augment"] = {**meta.get("augment", {}), "hflip": False, "crop_pad": 0}
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Run ``finetune ARGV``: it must fail with exit status 2 and exactly one ``error:`` line,
    which names every one of ``needles``, and no traceback. The line."""
    from finetune.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def fmnist_dir(tmp_path: Path) -> Path:
    return write_fake_fmnist(tmp_path / "fmnist")


@pytest.fixture
def tiny_args(fmnist_dir: Path, tmp_path: Path) -> list[str]:
    """A scratch run shrunk to a few CPU seconds."""
    return ["recipe=resnet18_scratch_fmnist", f"data.root={fmnist_dir}", "data.image_size=16",
            "train.epochs=2", "train.batch_size=16", "train.eval_batch_size=20",
            "train.lr=0.01", f"output_dir={tmp_path / 'run'}",
            # A ResNet-18 checkpoint is ~90 MB; the tests of checkpoints turn them back on.
            "train.checkpoint=false"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, _fixed_cpu_precision):
    """One ResNet-18 that learned the fake band task (28 px, 4 epochs), and its test split:
    shared by the tests of what comes after training (predict, serve, inspect). Read it;
    write anything new to the test's own folder."""
    from accelerate.state import AcceleratorState

    from finetune.config import load_config
    from finetune.data.sources import load_idx
    from finetune.train import main as train_main

    root = tmp_path_factory.mktemp("trained")
    data = write_fake_fmnist(root / "fmnist")
    run = root / "run"
    train_main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=28",
        "train.epochs=4", "train.batch_size=16", "train.lr=0.01", f"output_dir={run}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    _, test = load_idx(data)
    return run, test


@pytest.fixture(autouse=True, scope="session")
def _fixed_cpu_precision(tmp_path_factory):
    """train.mixed_precision=auto on a CPU times fp32 against bf16: the tests' numbers must
    not depend on what this machine chooses (tests/test_precision.py unsets this), and no test
    writes the user's cache. Environment variables: the launched processes inherit them."""
    saved = {k: os.environ.get(k) for k in ("FINETUNE_CPU_PRECISION", "FINETUNE_CACHE_DIR")}
    os.environ["FINETUNE_CPU_PRECISION"] = "fp32"
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _guard_state():
    """Keep RNG state and Accelerate's process-wide singletons from leaking between tests."""
    from accelerate.state import AcceleratorState

    torch_state, np_state, py_state = (torch.get_rng_state(), np.random.get_state(),
                                       random.getstate())
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)
    AcceleratorState._reset_state(reset_partial_state=True)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
