"""Run timm's own train.py with the user's arguments, unchanged, and report to $PEERS_EVENTS
each epoch's training seconds (train.py's ``train_one_epoch``, timed around the call) and test
accuracy (the top-1 that train.py's ``validate`` returns, the same figure it writes to
summary.csv), plus the first training step:

    python bench/peers/timm_run.py PATH/TO/train.py --data-dir DIR --model resnet18 ...

train.py is loaded as a module and its two functions are wrapped before its ``main()`` runs;
nothing else in it is touched (no parsing of its log lines).
"""

from __future__ import annotations

import importlib.util
import sys
import time

from peerlib import emit, emit_versions, probe_first_step


def load(path: str):
    spec = importlib.util.spec_from_file_location("timm_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instrument(train) -> None:
    """Time train_one_epoch(epoch, model, loader, ...) and report it with validate's top-1."""
    train_one_epoch, validate = train.train_one_epoch, train.validate
    done = {}

    def timed_train_one_epoch(epoch, model, loader, *args, **kwargs):
        start = time.perf_counter()
        metrics = train_one_epoch(epoch, model, loader, *args, **kwargs)
        batch_size = getattr(loader, "loader", loader).batch_size  # PrefetchLoader or not
        done.update(epoch=epoch + 1, epoch_time=time.perf_counter() - start,
                    images=len(loader) * batch_size)
        return metrics

    def reported_validate(*args, **kwargs):
        metrics = validate(*args, **kwargs)
        emit("epoch", **done, test_acc=metrics["top1"] / 100)
        return metrics

    train.train_one_epoch, train.validate = timed_train_one_epoch, reported_validate


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        raise SystemExit("usage: python bench/peers/timm_run.py PATH/TO/train.py [ARGS...]")
    path = sys.argv[1]
    sys.argv = [path, *sys.argv[2:]]
    emit_versions("timm", "torch", "torchvision")
    probe_first_step()
    train = load(path)
    instrument(train)
    train.main()


if __name__ == "__main__":
    main()
