"""What every DataLoader that decodes images shares: its options, bad images stopped or skipped,
and errors from its workers told as the one line they were."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from finetune.data.idx import DataError
from finetune.data.images import SKIP_HINT

log = logging.getLogger(__name__)
T = TypeVar("T")


def loader_options(workers: int, persistent: bool = True, pin: bool = False) -> dict:
    """The DataLoader options of every loader that decodes images."""
    # Its own generator: creating an iterator draws the workers' base seed from it, not from
    # the global stream (a resumed run would be a draw ahead). Batches seed themselves.
    return {"num_workers": workers, "persistent_workers": persistent and workers > 0,
            "prefetch_factor": 2 if workers else None, "pin_memory": pin,
            "generator": torch.Generator().manual_seed(0)}


def from_workers(batches: Iterable) -> Iterator:
    """``batches``, with a :class:`DataError` raised in a DataLoader worker re-raised as its own
    one-line message (the DataLoader wraps it in the worker's traceback)."""
    try:
        yield from batches
    except DataError as e:
        lines = str(e).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught DataError"):
            raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
        raise


def or_skip(decode: Callable[[], T], skip_bad: bool) -> T | None:
    """``decode()``, or None for a bad image when bad images are skipped (logged)."""
    try:
        return decode()
    except DataError as e:
        if not skip_bad:
            raise
        # Its advice without the option already set.
        log.warning("skipping a bad image (data.skip_bad_images=true): %s",
                    str(e).replace(SKIP_HINT, ""))
        return None


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of one streamed batch's augmentation draws: its pixels depend on nothing else."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank
