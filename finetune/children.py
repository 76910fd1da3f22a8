"""Trainings started as child processes by a command that drives many (compare, cv, tune):
each child gets SIGTERM when its parent dies (Linux's PR_SET_PDEATHSIG; a training saves a
checkpoint and ends on SIGTERM), and a Ctrl-C of the parent sends it SIGTERM and waits, so
that no training outlives the command that started it or writes after it has gone."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# Resolved here, not after fork: dlopen in a forked child of a threaded parent can deadlock.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec (Linux only; elsewhere nothing is set); a
    parent that died before the call leaves the child orphaned: it ends at once."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Start ``cmd`` with its output appended to ``log_path``, in a session of its own: a
    Ctrl-C reaches it only as the one SIGTERM :func:`stop` sends (a second signal would stop
    a training before its checkpoint)."""
    parent = os.getpid()
    with open(log_path, "a") as logfile:  # the child holds its own descriptor
        return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: _die_with_parent(parent),
                                start_new_session=True)


def stop(child: subprocess.Popen) -> None:
    """SIGTERM to a child still running, and wait for it to end."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    child.wait()


def run(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` to its end (output to ``log_path``); its exit code. Interrupted (Ctrl-C),
    the child gets SIGTERM and is waited for before the interruption goes on."""
    child = start(cmd, log_path)
    try:
        return child.wait()
    except BaseException:
        stop(child)
        raise
