"""Speed settings around the loop: the Accelerator with its mixed precision and CPU threads,
backend tuning, torch.compile, and reading a device value without waiting for it."""

from __future__ import annotations

import copy
import logging
import os
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradientAccumulationPlugin
from torch import nn

from finetune.data.loader import BatchTransform
from finetune.errors import ConfigError
from finetune.processes import check_world_size, describe_process
from finetune.processes import log as process_log
from finetune.step import StepOptions, train_step

log = logging.getLogger(__name__)


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``train.mixed_precision`` -> fp32, bf16 or fp16 (Accelerate calls fp32 "no").

    auto takes the launcher's choice (``accelerate launch --mixed_precision``) if it made one,
    else bf16 on a GPU that computes it natively, else fp32. CPUs stay fp32 unless asked:
    bf16 there is fast only with AVX512-BF16/AMX, and see :func:`check_cpu_bf16`.
    """
    if setting == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        setting = (launched if launched in ("bf16", "fp16")
                   else "bf16" if device.type == "cuda" and bf16_is_native(device) else "fp32")
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.mixed_precision=fp16 needs a CUDA GPU, but this run is on "
                          f"{device.type}; use bf16 or fp32.")
    return setting


def make_accelerator(mixed_precision: str, accumulate: int = 1) -> tuple[Accelerator, str]:
    """The Accelerator for ``train.mixed_precision`` (resolved: fp32, bf16 or fp16) and
    ``train.accumulate`` gradient-accumulation slices, with this process's share of the CPU
    cores; training and ``finetune evaluate`` both start here, so an evaluation runs in the
    precision its run trained in.

    Without CUDA the processes are CPU processes: under torchrun or a multi-process
    ``accelerate launch`` they join one gloo group (Accelerate takes a CUDA-less launch for
    one process unless told ``cpu``). A run with fewer processes than its launcher asked for
    is refused.
    """
    cpu = not torch.cuda.is_available()
    precision = resolve_mixed_precision(mixed_precision, PartialState(cpu=cpu).device)
    # Training batches do not come from a prepared DataLoader: accumulation counts slices only
    # (sync_with_dataloader would also sync at the end of every evaluation loader).
    plugin = GradientAccumulationPlugin(num_steps=accumulate, sync_with_dataloader=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if precision == "fp32" else precision,
                              gradient_accumulation_plugin=plugin)
    check_world_size(accelerator)
    process_log.info(describe_process(accelerator))
    use_cpu_cores(accelerator)
    return accelerator, precision


def use_cpu_cores(accelerator: Accelerator) -> None:
    """On CPU, give each local process its share of the cores.

    ``accelerate launch`` without a config sets OMP_NUM_THREADS=1, which halves CPU speed on a
    2-core machine; a process that got one thread takes its share instead.
    """
    if accelerator.device.type != "cpu" or torch.get_num_threads() > 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local))
    if share > 1:
        torch.set_num_threads(share)
        log.info("using %d CPU threads per process (OMP_NUM_THREADS was 1)", share)


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


def check_cpu_bf16(model: nn.Module, in_chans: int, image_size: int) -> None:
    """Refuse bf16 on the CPU for a model with a strided convolution that sees a 1x1 input:
    there oneDNN's bf16 weight gradient (torch 2.14) comes back as uninitialised memory
    (values like 1e36 in the taps that only see padding), silently wrecking the weights."""
    strided = {m: n for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.stride != (1, 1)}
    bad: list[str] = []

    def hook(module: nn.Module, args: tuple) -> None:
        if tuple(args[0].shape[-2:]) == (1, 1):
            bad.append(strided[module])

    handles = [m.register_forward_pre_hook(hook) for m in strided]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, image_size, image_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if bad:
        raise ConfigError(
            f"train.mixed_precision=bf16 on the CPU: {', '.join(bad)} (strided) sees a 1x1 "
            f"input at data.image_size={image_size}, where oneDNN's bf16 weight gradient is "
            f"wrong. Raise data.image_size (32 is enough for the ResNets) or use "
            f"train.mixed_precision=fp32.")


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying a device scalar to the host without waiting for it; the returned event
    (None off CUDA) says when the copy, and so the value, is ready."""
    if t.device.type != "cuda":
        return t.detach(), None
    host = torch.empty((), dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def compile_model(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  labels: torch.Tensor, transform: BatchTransform, accelerator: Accelerator,
                  opts: StepOptions, mode: str = "default") -> float:
    """``torch.compile`` the model in place and run one training step so that compilation is
    over before the first epoch's clock starts. Weights, buffers (batch-norm statistics),
    optimizer state, gradients and random state are left as they were. Returns the seconds
    taken."""
    start = time.perf_counter()
    model.compile(mode=mode)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(optimizer.state_dict())
    scaler = copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler else None
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        model.train()
        x = transform(images, train=True, gen=torch.Generator(images.device).manual_seed(0))
        try:
            loss, _ = train_step(model, optimizer, accelerator, x, labels, opts, epoch=0)
        except torch.OutOfMemoryError:
            raise  # not compilation's fault: the batch does not fit
        except Exception as e:  # Inductor fails in many types; to the user they mean one thing
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(
                f"train.compile=true: torch.compile failed ({type(e).__name__}: {first[:300]}). "
                f"On a CPU it needs a C++ compiler (g++); install one, or set "
                f"train.compile=false.") from e
    float(loss)  # waits for the device
    model.load_state_dict(weights)
    optimizer.load_state_dict(state)
    if scaler is not None:
        accelerator.scaler.load_state_dict(scaler)
    return time.perf_counter() - start


def tune_backends(device: torch.device) -> None:
    """GPU settings for speed: cuDNN autotuning (batch shapes are fixed, so it pays after the
    first steps) and TF32 matrix products for whatever runs in fp32."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
