"""Speed settings around the loop: the processes and their CPU threads, the Accelerator with
its mixed precision, backend tuning, torch.compile, and reading a device value without waiting
for it."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import GradientAccumulationPlugin
from torch import nn

from finetune.data.loader import BatchTransform
from finetune.errors import ConfigError, first_line
from finetune.processes import check_world_size, describe_process
from finetune.processes import log as process_log
from finetune.step import StepOptions, train_step

log = logging.getLogger(__name__)


def start_processes() -> PartialState:
    """This run's processes, joined, each with its share of the CPU cores.

    Without CUDA the processes are CPU processes: under torchrun or a multi-process
    ``accelerate launch`` they join one gloo group (Accelerate takes a CUDA-less launch for
    one process unless told ``cpu``). A run with fewer processes than its launcher asked for
    is refused.
    """
    state = PartialState(cpu=not torch.cuda.is_available())
    check_world_size(state)
    process_log.info(describe_process(state))
    use_cpu_cores(state)
    return state


@contextlib.contextmanager
def joined_processes() -> Iterator[PartialState]:
    """:func:`start_processes` for a command that does not train: at its end every process waits
    for the others and the group is left. A gloo process that exits while its peer still
    writes can abort at exit ("terminate called without an active exception")."""
    state = start_processes()
    try:
        yield state
        state.wait_for_everyone()
    finally:
        state.destroy_process_group()


def make_accelerator(precision: str, accumulate: int = 1) -> Accelerator:
    """The Accelerator, after :func:`start_processes`, for ``precision`` (fp32, bf16 or fp16:
    resolved by ``finetune.precision``) and ``train.accumulate`` gradient-accumulation slices;
    training and ``finetune evaluate`` both start here, so an evaluation runs in the precision
    its run trained in."""
    # Training batches do not come from a prepared DataLoader: accumulation counts slices only
    # (sync_with_dataloader would also sync at the end of every evaluation loader).
    plugin = GradientAccumulationPlugin(num_steps=accumulate, sync_with_dataloader=False)
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision="no" if precision == "fp32" else precision,
                       gradient_accumulation_plugin=plugin)


def use_cpu_cores(state: PartialState) -> None:
    """On CPU, give each local process its share of the cores.

    ``accelerate launch`` without a config sets OMP_NUM_THREADS=1, which halves CPU speed on a
    2-core machine; a process that got one thread takes its share instead.
    """
    if state.device.type != "cpu" or torch.get_num_threads() > 1:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local))
    if share > 1:
        torch.set_num_threads(share)
        log.info("using %d CPU threads per process (OMP_NUM_THREADS was 1)", share)


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
            raise ConfigError(
                f"train.compile=true: torch.compile failed ({type(e).__name__}: "
                f"{first_line(e)[:300]}). "
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
