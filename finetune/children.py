"""Trainings started as child processes by a command that drives many (compare, cv, tune):
each child gets SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG; a training saves a
checkpoint and ends on SIGTERM), and a Ctrl-C of the parent waits for the child to end, so
that no training outlives the command that started it or writes after it has gone."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (Linux only; elsewhere nothing is set)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Start ``cmd`` with its output appended to ``log_path``."""
    with open(log_path, "a") as logfile:  # the child holds its own descriptor
        return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)


def stop(child: subprocess.Popen) -> None:
    """SIGTERM to a child still running, and wait for it to end."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    child.wait()


def run(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` to its end (output to ``log_path``); its exit code. Interrupted (Ctrl-C,
    which reached the child too), the child is stopped before the interruption goes on."""
    child = start(cmd, log_path)
    try:
        return child.wait()
    except BaseException:
        stop(child)
        raise
