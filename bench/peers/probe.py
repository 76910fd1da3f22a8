"""Run ``python -m MODULE ARGS...`` unchanged, reporting its first training step to
$PEERS_EVENTS (bench/peers.py runs finetune's command this way):

    python bench/peers/probe.py -m finetune.cli train recipe=resnet18_cpu_fmnist ...
"""

from __future__ import annotations

import runpy
import sys

from peerlib import probe_first_step


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: python bench/peers/probe.py -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    probe_first_step()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
