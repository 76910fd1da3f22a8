"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (what Slurm and cloud preemption send)
end a training run at the next step, after a checkpoint at that step, so that a preempted job
loses at most one step and ``resume=auto`` continues it bit-exactly.

The handler only notes the signal; the loop asks :meth:`Stop.after_step` after every step. With
several processes they must stop after the same step (the checkpoint is collective, and a
signal reaches them at different moments): each step starts an all-reduce of "signalled", and
the one started a step earlier is read, so that the host waits for no more than the step
before the one the device has queued. A third signal stops at once (``KeyboardInterrupt``).
DataLoader workers forked meanwhile inherit the handler, so they outlive the signal until the
loop has finished its step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator

from finetune.checkpoint import checkpoint_name, list_checkpoints
from finetune.errors import FinetuneError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_STATUS = 130  # as a shell reports a program ended by Ctrl-C


class Interrupted(FinetuneError):
    """A run stopped by a signal after saving where it was; ``finetune`` prints the message
    and exits with ``status``: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, status: int = EXIT_STATUS) -> None:
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop: unwinds (closing and cleaning up) like Ctrl-C."""


def _terminated(signum: int, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM unwinds the program like SIGINT does (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


class Stop:
    """Notes SIGINT/SIGTERM while the training loop runs (a context manager) and tells every
    process, in agreement, when to stop."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: list[str] = []  # the signals' names, in order
        self._pending: torch.Tensor | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            self._saved = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved = {}

    def _note(self, signum: int, frame) -> None:
        self.received.append(signal.Signals(signum).name)
        if len(self.received) >= 3:  # insisted: no more waiting for a step to end
            self.__exit__()
            raise KeyboardInterrupt

    @property
    def signal_name(self) -> str:
        return self.received[0] if self.received else "a signal to another process"

    @property
    def status(self) -> int:
        """The exit status: 128 + the first signal's number (SIGINT: 130)."""
        return 128 + signal.Signals[self.received[0]] if self.received else EXIT_STATUS

    def _signalled(self) -> torch.Tensor:
        """How many processes were signalled (a collective, queued on the device)."""
        flag = torch.tensor([float(bool(self.received))], device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum")

    def after_step(self) -> bool:
        """Whether to stop now, after the step just queued (all processes answer alike)."""
        if self.accelerator.num_processes == 1:
            return bool(self.received)
        previous, self._pending = self._pending, self._signalled()
        return previous is not None and previous.item() > 0

    def at_boundary(self) -> bool:
        """Whether to stop now, between epochs (a collective read at once; the last step's
        agreement, never read, is dropped alike by every process)."""
        if self.accelerator.num_processes == 1:
            return bool(self.received)
        self._pending = None
        return self._signalled().item() > 0


def interrupted(stop: Stop, out: Path, epoch: int, step: int, steps: int,
                resumable: bool) -> Interrupted:
    """What a signal left: where the run stopped and how to go on."""
    where = f"interrupted ({stop.signal_name}) at epoch {epoch}, step {step} of {steps}"
    kept = list_checkpoints(out)
    if not resumable:
        return Interrupted(f"{where}; overwrite=true replaces the old run only with a finished "
                           f"one: the new run was discarded, the old one kept.", stop.status)
    if kept and kept[-1].name == checkpoint_name(epoch, step):
        return Interrupted(f"{where}: checkpoint {kept[-1]} saved; resume with resume=auto "
                           f"output_dir={out}", stop.status)
    last = f"the last complete checkpoint is {kept[-1].name}" if kept else "no checkpoint"
    return Interrupted(f"{where}; {last} (train.checkpoint=false saves none); "
                       + ("resume with resume=auto" if kept else "start again")
                       + f" output_dir={out}", stop.status)
