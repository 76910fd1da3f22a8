"""Several processes: what the launcher asked for, what this process is, and a refusal to run
with fewer processes than were asked for.

Two real CPU processes (gloo) on a machine without CUDA are started by
``torchrun --standalone --nproc_per_node 2 -m finetune.run ...`` or by
``accelerate launch --multi_gpu --num_processes 2 -m finetune.run ...``; Accelerate 1.15's
``accelerate launch --cpu --num_processes 2`` starts one process, which :func:`check_world_size`
refuses instead of letting a "2-process" run train alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import PartialState

from finetune.errors import ConfigError

log = logging.getLogger("finetune.process")  # every process's one line (cli: all ranks talk)

CPU_COMMAND = ("torchrun --standalone --nproc_per_node N -m finetune.run ... or, on a machine "
               "without CUDA, accelerate launch --multi_gpu --num_processes N -m finetune.run ...")


def _launcher_args(pid: int) -> list[str]:
    """The arguments after ``launch`` of ``pid`` when it is ``accelerate launch`` (or
    ``python -m accelerate.commands.launch``), else []."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS) or the parent is gone: nothing to read
        return []
    return launch_args(args)


def launch_args(args: list[str]) -> list[str]:
    """The arguments after ``launch`` in a command line of ``accelerate launch``, else []."""
    for i, arg in enumerate(args[:4]):
        name = Path(arg).name
        if name == "accelerate" and args[i + 1:i + 2] == ["launch"]:
            return args[i + 2:]
        if name == "accelerate-launch":
            return args[i + 1:]
        if arg == "-m" and args[i + 1:i + 2] == ["accelerate.commands.launch"]:
            return args[i + 2:]
    return []


def _flag(args: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` (``--flag V`` or ``--flag=V``) in ``args``."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.partition("=")[2]
    return None


def requested_processes() -> tuple[int, str]:
    """(how many processes the launcher asked for, where that was said): ``WORLD_SIZE`` (set
    by torchrun and by Accelerate's multi-process launchers), else, for a process that
    ``accelerate launch``'s one-process launcher started (it sets ``ACCELERATE_USE_CPU``), the
    ``--num_processes`` on its command line or, without ``--cpu``, in its config file; else 1."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), f"WORLD_SIZE={os.environ['WORLD_SIZE']}"
    args = _launcher_args(os.getppid()) if "ACCELERATE_USE_CPU" in os.environ else []
    if not args:
        return 1, "no launcher"
    given = _flag(args, "--num_processes", "--num-processes")
    if given is not None:
        return int(given), f"accelerate launch --num_processes {given}"
    if "--cpu" in args:
        return 1, "accelerate launch --cpu"
    config = _flag(args, "--config_file", "--config-file")
    if config is None:
        from accelerate.commands.config import default_config_file

        config = default_config_file if Path(default_config_file).is_file() else None
    if config is not None:
        from accelerate.commands.config.config_args import load_config_from_file

        asked = load_config_from_file(config).num_processes or 1
        return asked, f"num_processes: {asked} in {config}"
    return 1, "accelerate launch"


def check_world_size(state: PartialState) -> None:
    """Refuse a run with fewer processes than the launcher asked for: never a silent
    single-process run."""
    asked, where = requested_processes()
    if state.num_processes < asked:
        hint = (" (`accelerate launch --cpu` starts one process whatever --num_processes "
                "says)" if "accelerate" in where else "")
        raise ConfigError(
            f"the launcher asked for {asked} processes ({where}) but this run has "
            f"{state.num_processes}{hint}. For {asked} CPU processes use "
            f"{CPU_COMMAND.replace('N', str(asked))}")


def describe_process(state: PartialState) -> str:
    """``process 1 of 2 (local 1), backend gloo, device cpu, pid 1234``."""
    return (f"process {state.process_index} of {state.num_processes} (local "
            f"{state.local_process_index}), backend {state.backend or 'none'}, device "
            f"{state.device}, pid {os.getpid()}")
