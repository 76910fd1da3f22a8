"""The streaming path: DataLoader workers (persistent, pinned, prefetching) open, decode and
transform each batch of a :class:`~finetune.data.samples.Samples` split; the main process only
moves finished uint8 batches to the device. Nothing holds more than the batches in flight.

A training item is a whole batch, keyed ``(epoch, step)``: its images are this process's slice
of the epoch's seeded permutation (the same one the device-resident path uses) and its
augmentation draws are seeded by ``(seed, epoch, step, rank)``. The pixels of a batch therefore
depend on nothing else (not the worker count, not which worker), and a resumed run that starts
at step k sees bit for bit the batches the interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from finetune.data.idx import DataError
from finetune.data.samples import Samples
from finetune.data.workers import batch_seed, or_skip

Transform = Callable[..., torch.Tensor]  # PIL image -> uint8 (C, size, size)


def epoch_permutation(num_samples: int, seed: int, epoch: int,
                      weights: torch.Tensor | None = None, draws: int | None = None
                      ) -> torch.Tensor:
    """The epoch's order of the training samples: the same on every process, a function of
    (seed, epoch) alone (so a resumed epoch sees the same). ``draws`` (default
    ``num_samples``; data.epoch_repeats): the first ``draws`` of as many permutations back to
    back as it takes. With ``weights`` (one per sample): ``draws`` draws with replacement in
    proportion to them (balanced sampling)."""
    draws = num_samples if draws is None else draws
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        rounds = -(-draws // num_samples)
        return torch.cat([torch.randperm(num_samples, generator=gen)
                          for _ in range(rounds)])[:draws]
    return torch.multinomial(weights, draws, replacement=True, generator=gen)


def epoch_draws(num_samples: int, repeats: float) -> int:
    """How many training samples an epoch draws: ``repeats`` (data.epoch_repeats) of them."""
    return max(1, round(num_samples * repeats))


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample weights 1 / (its class's count): every class drawn equally often."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    return (1.0 / counts.clamp_min(1))[labels.cpu()]


class TrainBatches(Dataset):
    """Item ``(epoch, step)``: this process's slice of global batch ``step`` of ``epoch``,
    decoded and augmented: ``(uint8 images, labels, indices of the bad images skipped)``."""

    def __init__(self, samples: Samples, transform: Transform, image_size: int, need: int,
                 batch_size: int, seed: int, rank: int, world_size: int, skip_bad: bool,
                 weights: torch.Tensor | None = None, draws: int | None = None) -> None:
        self.samples, self.transform, self.need, self.skip_bad = samples, transform, need, skip_bad
        self.weights = weights  # per sample: balanced sampling (None: a permutation)
        self.draws = draws  # per epoch (None: one per sample)
        self.image_size = image_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self._perm: tuple[int, torch.Tensor] | None = None  # this worker's epoch, permutation

    def indices(self, epoch: int, step: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = epoch, epoch_permutation(len(self.samples), self.seed, epoch,
                                                  self.weights, self.draws)
        local = self.batch_size // self.world
        start = step * self.batch_size + self.rank * local
        return self._perm[1][start:start + local].tolist()

    def __getitem__(self, key: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        epoch, step = key
        idx = self.indices(epoch, step)
        # The batch's own random stream (the CPU generator, which the v2 transforms draw from);
        # fork_rng gives the caller's back afterwards (workers=0: the main process).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(batch_seed(self.seed, epoch, step,
                                                                  self.rank))
            # one photo decoded at a time: a worker holds one full-size image, not a batch's
            images = [or_skip(lambda i=i: self.transform(self.samples.open(i, self.need)),
                              self.skip_bad) for i in idx]
        return stacked(images, [self.samples.labels[i] for i in idx], idx, epoch, step)


def stacked(images: list[torch.Tensor | None], labels: list, ids: list[int], epoch: int,
            step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """A training batch without its skipped bad images (None): ``(images, labels, the ids of
    the skipped ones)``; ``ids`` name the batch's samples (-1: not known), so that what was
    read can be counted."""
    kept = [i for i, image in enumerate(images) if image is not None]
    if not kept:
        raise DataError(f"every image of training batch {step + 1} (epoch {epoch}) is bad; "
                        f"check the data (data.skip_bad_images skips single images).")
    # a label is an int, a 0-d tensor, or (multi-label) a row of tags
    return (torch.stack([images[i] for i in kept]),
            torch.stack([torch.as_tensor(labels[i]) for i in kept]),
            tuple(ids[i] for i, image in enumerate(images) if image is None))


class EpochSteps(Sampler):
    """The keys of one epoch's batches from step ``first`` on; set before each pass."""

    def __init__(self, steps: int) -> None:
        self.steps, self.epoch, self.first = steps, 1, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, step) for step in range(self.first, self.steps))

    def __len__(self) -> int:
        return self.steps - self.first


class EvalSamples(Dataset):
    """Item i: ``(i, uint8 image, label, decoded)``; a skipped bad image is zeros, not decoded,
    so that every process still counts each test sample exactly once."""

    def __init__(self, samples: Samples, transform: Transform, need: int, size: int,
                 skip_bad: bool) -> None:
        self.samples, self.transform, self.need = samples, transform, need
        self.size, self.skip_bad = size, skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
        image = or_skip(lambda: self.samples.open(i, self.need), self.skip_bad)
        if image is None:
            blank = torch.zeros(self.samples.channels, self.size, self.size, dtype=torch.uint8)
            return i, blank, self.samples.labels[i], False
        return i, self.transform(image), self.samples.labels[i], True


def _decode_rows(split, rows: list[dict], transform: Transform, need: int, skip_bad: bool,
                 where: str) -> tuple[list[torch.Tensor | None], list[int]]:
    """Decode and transform Hugging Face rows: ``(images, labels)``; a skipped bad image is
    None when ``skip_bad``. Errors name the row by its number in the split, or by its place
    in the batch ``where`` names. Labels are checked first: a bad one is never skipped."""
    names = [split.name(row, f"{where}, row {i + 1}") for i, row in enumerate(rows)]
    labels = [split.label_of(row, name) for row, name in zip(rows, names, strict=True)]
    images = [or_skip(lambda row=row, name=name: split.open(row, need, name), skip_bad)
              for row, name in zip(rows, names, strict=True)]
    return [None if im is None else transform(im) for im in images], labels


class StreamedBatches(torch.utils.data.IterableDataset):
    """An epoch of this process's training batches from a Hugging Face stream
    (``data.streaming=true``): its every-``world_size``-th rows, shuffled in a seeded buffer
    (the seed and the epoch fix the order), in batches decoded and augmented by seeded draws.

    Each DataLoader worker reads its own shards and makes global steps ``w, w + W, ...``, which
    the DataLoader hands out in that order; a worker whose shards run out starts them again,
    so that every process takes the epoch's ``steps``. Set ``epoch`` and ``first`` (a resumed
    epoch's first step: the rows before it are skipped, not decoded) before iterating."""

    def __init__(self, split, transform: Transform, image_size: int, need: int, batch_size: int,
                 seed: int, rank: int, world_size: int, skip_bad: bool, steps: int,
                 buffer: int) -> None:
        self.split, self.transform, self.image_size, self.need = split, transform, image_size, need
        self.local, self.seed = batch_size // world_size, seed
        self.rank, self.world = rank, world_size
        self.skip_bad, self.steps, self.buffer = skip_bad, steps, buffer
        self.epoch, self.first = 1, 0

    def _rows(self) -> Iterator[dict]:
        rows = self.split.node(self.rank, self.world).shuffle(seed=self.seed,
                                                              buffer_size=self.buffer)
        rows.set_epoch(self.epoch)
        while True:  # again from the start if this worker's shards run out first
            empty = True
            for row in rows:
                empty = False
                yield row
            if empty:
                raise DataError("a data worker was given no rows; lower data.workers to at "
                                "most the dataset's number of shards.")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rows = self._rows()
        for step in range(worker, self.steps, workers):
            batch = [next(rows) for _ in range(self.local)]
            if step < self.first:
                continue  # a resumed epoch: read past, not decoded
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(
                    batch_seed(self.seed, self.epoch, step, self.rank))
                images, labels = _decode_rows(
                    self.split, batch, self.transform, self.need, self.skip_bad,
                    f"training batch {step + 1} of epoch {self.epoch} (process {self.rank})")
            yield stacked(images, labels, [self.split.number(row) for row in batch],
                          self.epoch, step)


class StreamedEval(torch.utils.data.IterableDataset):
    """This process's share of a streamed test split (each worker its own shards), in batches
    of ``(uint8 images, labels, decoded)``; a skipped bad image is zeros, not decoded."""

    def __init__(self, split, transform: Transform, need: int, image_size: int,
                 batch_size: int, rank: int, world_size: int, skip_bad: bool) -> None:
        self.split, self.transform, self.need, self.size = split, transform, need, image_size
        self.batch_size, self.rank, self.world, self.skip_bad = (batch_size, rank, world_size,
                                                                 skip_bad)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        rows = iter(self.split.node(self.rank, self.world))
        number = 0
        while batch := [row for _, row in zip(range(self.batch_size), rows, strict=False)]:
            number += 1
            images, labels = _decode_rows(
                self.split, batch, self.transform, self.need, self.skip_bad,
                f"test batch {number} (process {self.rank})")
            blank = torch.zeros(self.split.channels, self.size, self.size, dtype=torch.uint8)
            yield (torch.stack([blank if im is None else im for im in images]),
                   torch.tensor(labels), torch.tensor([im is not None for im in images]))
