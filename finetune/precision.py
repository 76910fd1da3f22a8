"""The precision a run computes in: ``train.mixed_precision`` resolved to fp32, bf16 or fp16.

On a GPU ``auto`` means bf16 where the GPU computes it natively. On a CPU it is decided by
measurement: whether bf16 pays depends on the CPU model (AVX512-BF16, AMX), the model and the
batch shape — 1.5x faster for ResNet-18 at 64 px here, slower for EfficientNet-B0 — so a few
training steps of the run's own model and batch are timed in both precisions, and the choice is
cached per machine, model and batch shape (``$FINETUNE_CACHE_DIR``, default
``~/.cache/finetune``, file ``precision.json``; delete it to measure again).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn

from finetune.cpu_convs import SmallMapConv2d, conv_calls, is_small
from finetune.errors import ConfigError, first_line
from finetune.fields import is_real
from finetune.files import atomic_write_text
from finetune.version import __version__

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16")  # what auto chooses between on a CPU
# Set to fp32 or bf16, what auto means on a CPU without measuring (CI, reproducible runs).
FORCE_ENV = "FINETUNE_CPU_PRECISION"
CACHE_ENV = "FINETUNE_CACHE_DIR"
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """``Intel(R) Xeon(R) Processor, 2 cores, avx2 avx512f avx512_bf16 amx_bf16 amx_tile``:
    the CPU model and the flags that decide its speed, as every CPU number is reported."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass  # not Linux: the platform's name, no flags
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ", ".join([name, f"{cores} cores"] + [" ".join(f for f in _FLAGS if f in flags)]
                     ).rstrip(", ")


def bf16_is_native(device: torch.device) -> bool:
    """bfloat16 arithmetic in hardware: Ampere or newer GPUs; CPUs with AVX512-BF16 or AMX
    (elsewhere bf16 autocast on the CPU is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``train.mixed_precision`` -> fp32, bf16 or fp16 without measuring (Accelerate calls
    fp32 "no"): auto takes the launcher's choice (``accelerate launch --mixed_precision``) if it
    made one, else bf16 on a GPU that computes it natively, else fp32."""
    if setting == "auto":
        setting = _launched() or ("bf16" if device.type == "cuda" and bf16_is_native(device)
                                  else "fp32")
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU, but this run is on "
                          f"{device.type}; use bf16 or fp32.")
    return setting


def _launched() -> str | None:
    """The launcher's choice (``accelerate launch --mixed_precision bf16``); its default,
    "no", is none."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    return launched if launched in ("bf16", "fp16") else None


def choose_precision(setting: str, state: PartialState, model: nn.Module,
                     shape: tuple[int, ...], memory_format: torch.memory_format,
                     name: str) -> str:
    """The precision of a run of ``model`` (named ``name``) on batches of ``shape`` (this
    process's, in the model's memory layout): ``setting`` if forced, the launcher's, else
    :func:`resolve_mixed_precision` — on a CPU, auto is timed (:func:`measure`) or read from
    the cache. Every process gets the main process's choice."""
    device = state.device
    if setting != "auto" or device.type != "cpu" or _launched():
        precision = resolve_mixed_precision(setting, device)
        if precision == "bf16" and device.type == "cpu":
            check_cpu_bf16(model, shape)
            if not bf16_is_native(device):
                log.warning("this CPU has no bf16 arithmetic (AVX512-BF16/AMX): bf16 is "
                            "emulated and slower than fp32 here; set train.mixed_precision=fp32")
        return precision
    _forced()  # checked by every process: a bad value must not leave the others waiting
    choice = [cpu_auto(device, model, shape, memory_format, name) if state.is_main_process
              else None]
    if state.num_processes > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


def cpu_auto(device: torch.device, model: nn.Module, shape: tuple[int, ...],
             memory_format: torch.memory_format, name: str) -> str:
    """``auto`` on this CPU: forced by $FINETUNE_CPU_PRECISION, fp32 where bf16 cannot win or
    is unsafe, else the faster of the two, measured once per machine, model and batch shape."""
    forced = _forced()
    if forced:
        log.info("mixed precision auto: %s (%s=%s)", forced, FORCE_ENV, forced)
        return forced
    if not bf16_is_native(device):
        log.info("mixed precision auto: fp32 (this CPU has no bf16 arithmetic, AVX512-BF16 "
                 "or AMX)")
        return "fp32"
    unsafe = bf16_unsafe_convs(model, shape)
    if unsafe:
        log.info("mixed precision auto: fp32 (%s (strided) sees a 1x1 input, where oneDNN's "
                 "bf16 weight gradient is wrong)", ", ".join(unsafe))
        return "fp32"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cpu = cpu_description()
    key = (f"{cpu} | torch {torch.__version__}, finetune {__version__} | "
           f"{torch.get_num_threads()} threads | {name}, {trainable} trainable | batch "
           f"{'x'.join(map(str, shape))} "
           f"{'channels_last' if memory_format == torch.channels_last else 'NCHW'}")
    entry, source = _read_cache().get(key), "cached in " + str(cache_file())
    if not _sound(entry):  # none, or damaged: measured again
        try:
            timings = measure(model, shape, memory_format)
        except Exception as e:  # noqa: BLE001 - whatever failed, fp32 is the safe answer
            log.warning("mixed precision auto: fp32 (timing a training step failed: %s: %s)",
                        type(e).__name__, first_line(e)[:200])
            return "fp32"
        entry = {"precision": min(timings, key=timings.__getitem__)}
        entry.update({f"{p}_images_per_sec": round(shape[0] / s, 1) for p, s in timings.items()})
        entry["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _write_cache({**_read_cache(), key: entry})  # read again: another run may have written
        source = "timed now"
    log.info("mixed precision auto: %s (a training step of %s on a %s batch, %s: fp32 %.0f "
             "img/s, bf16 %.0f img/s; CPU %s)", entry["precision"], name,
             "x".join(map(str, shape)), source, entry["fp32_images_per_sec"],
             entry["bf16_images_per_sec"], cpu)
    return entry["precision"]


def _sound(entry: object) -> bool:
    """A cache entry that names a precision and two positive finite speeds."""
    return (isinstance(entry, dict) and entry.get("precision") in PRECISIONS
            and all(is_real(v := entry.get(f"{p}_images_per_sec")) and v > 0
                    for p in PRECISIONS))


def _forced() -> str | None:
    """$FINETUNE_CPU_PRECISION, checked."""
    forced = os.environ.get(FORCE_ENV) or None
    if forced is not None and forced not in PRECISIONS:
        raise ConfigError(f"{FORCE_ENV}={forced}: use one of {', '.join(PRECISIONS)}, or unset "
                          f"it to let train.mixed_precision=auto measure.")
    return forced


def measure(model: nn.Module, shape: tuple[int, ...], memory_format: torch.memory_format,
            rounds: int = 3) -> dict[str, float]:
    """Seconds per training step (forward, loss, backward; the optimizer's step is the same
    in both) of a copy of ``model`` on a random batch of ``shape``, in fp32 and in bf16
    autocast: a warm-up step each, then ``rounds`` rounds alternating the two (a virtual
    machine's speed drifts), the fastest of each. The model itself, its statistics and the
    random state are left as they were."""
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(shape, device=_device(model)).contiguous(memory_format=memory_format)

        def step(precision: str) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = probe(x)
            loss = F.cross_entropy(logits.float(), torch.zeros(len(x), dtype=torch.long,
                                                               device=x.device))
            loss.backward()
            for p in probe.parameters():
                p.grad = None
            return time.perf_counter() - start

        for precision in PRECISIONS:
            step(precision)
        best = dict.fromkeys(PRECISIONS, float("inf"))
        for _ in range(rounds):
            for p in PRECISIONS:
                best[p] = min(best[p], step(p))
    return best


def check_cpu_bf16(model: nn.Module, shape: tuple[int, ...]) -> None:
    """Refuse bf16 on the CPU for a model with a strided convolution that sees a 1x1 input
    (:func:`bf16_unsafe_convs`)."""
    bad = bf16_unsafe_convs(model, shape)
    if bad:
        raise ConfigError(
            f"train.mixed_precision=bf16 on the CPU: {', '.join(bad)} (strided) sees a 1x1 "
            f"input at data.image_size={shape[-1]}, where oneDNN's bf16 weight gradient is "
            f"wrong. Raise data.image_size (32 is enough for the ResNets) or use "
            f"train.mixed_precision=fp32.")


def bf16_unsafe_convs(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    """The strided convolutions of ``model`` that see a 1x1 input on batches of ``shape``:
    there oneDNN's bf16 weight gradient (torch 2.14) comes back as uninitialised memory
    (values like 1e36 in the taps that only see padding), silently wrecking the weights."""
    # a swapped layer trains a map smaller than its kernel as a matrix product, not oneDNN
    return [name for name, conv, seen in conv_calls(model, shape)
            if conv.stride != (1, 1) and seen[-2:] == (1, 1)
            and not (isinstance(conv, SmallMapConv2d) and is_small(conv, seen))]


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune"
    return Path(root) / "precision.json"


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure again (and rewrite it)
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file(), json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError as e:  # a read-only home must not stop a run; it measures next time too
        log.warning("could not cache the precision choice in %s: %s", cache_file(), e)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.zeros(())).device
