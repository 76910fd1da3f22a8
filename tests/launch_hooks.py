"""``finetune`` under a launcher, with test hooks switched on by environment variables:

- ``FT_RECORD_BATCHES=DIR``: each process saves the index batches it trained on, per epoch,
  to ``DIR/rank<R>.pt`` (resident data; streamed data with ``data.workers=0``, whose batches are
  then read in the process itself);
- ``FT_KILL_RANK=R`` and ``FT_KILL_AT_STEP=K``: process R kills itself with SIGKILL at its K-th
  training step (counted over the whole run);
- ``FT_SIGNAL=INT|TERM``, ``FT_SIGNAL_RANK=R`` and ``FT_SIGNAL_AT_STEP=K``: process R sends
  itself SIGINT or SIGTERM during its K-th training step (counted from its start).

Run as ``torchrun ... tests/launch_hooks.py train recipe=...`` (not collected by pytest).
"""

import os
import signal
import sys

import torch

import finetune.data.loader as loader
import finetune.train as train
from finetune.cli import main
from finetune.data.stream import TrainBatches

rank = int(os.environ.get("RANK", "0"))

if os.environ.get("FT_RECORD_BATCHES"):
    real_batches, real_indices, recorded = loader.train_batches, TrainBatches.indices, []
    path = os.path.join(os.environ["FT_RECORD_BATCHES"], f"rank{rank}.pt")

    def train_batches(*args, **kwargs):
        if len(recorded) >= args[2]:  # the epoch read again (train.precise_bn): recorded
            yield from real_batches(*args, **kwargs)
            return
        epoch = []
        recorded.append(epoch)
        for batch in real_batches(*args, **kwargs):
            epoch.append(batch.cpu().clone())
            yield batch
        torch.save(recorded, path)

    def indices(self, epoch, step):
        while len(recorded) < epoch:
            recorded.append([])
        batch = real_indices(self, epoch, step)
        if len(recorded[epoch - 1]) > step:  # read again (train.precise_bn): recorded
            return batch
        recorded[epoch - 1].append(torch.tensor(batch))
        torch.save(recorded, path)
        return batch

    loader.train_batches = train_batches
    TrainBatches.indices = indices

if os.environ.get("FT_KILL_RANK") == str(rank):
    real_step, calls = train.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["FT_KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(*args, **kwargs)

    train.train_step = train_step

if os.environ.get("FT_SIGNAL_RANK") == str(rank):
    signalled_step, signal_calls = train.train_step, [0]

    def signalled(*args, **kwargs):
        signal_calls[0] += 1
        if signal_calls[0] == int(os.environ["FT_SIGNAL_AT_STEP"]):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["FT_SIGNAL"]))
        return signalled_step(*args, **kwargs)

    train.train_step = signalled

sys.exit(main(sys.argv[1:]))
