"""Batches for training and evaluation.

The fast path keeps the uint8 dataset on the device: each batch is indexed, resized, augmented
and normalized there in one go (no per-sample Python, no PIL). A resident dataset too large for
the device stays in host memory: DataLoader workers gather the same index batches into pinned
memory and the device does the rest. Photos too many or too large to decode up front are
streamed (:mod:`finetune.data.stream`): workers decode and transform each batch, and the device
normalizes it. ``place`` chooses among the three.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from finetune.data.hub import StreamedSplit
from finetune.data.idx import DataError
from finetune.data.samples import Samples, probe
from finetune.data.sources import ImageData
from finetune.data.stream import (
    EpochSteps,
    EvalSamples,
    StreamedBatches,
    StreamedEval,
    TrainBatches,
    epoch_permutation,
)
from finetune.data.workers import from_workers, loader_options
from finetune.errors import TrainingError

log = logging.getLogger(__name__)
# Resident uint8 images, images read one at a time, or a Hugging Face stream.
Data = ImageData | Samples | StreamedSplit

# ITU-R 601 luma weights, as PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert a float batch (N, C, H, W) to ``in_chans`` channels (grey <-> RGB)."""
    c = x.shape[1]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(-1, in_chans, -1, -1)
    if c == 3 and in_chans == 1:
        w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {in_chans} channels; "
                     f"set model.in_chans to {c} (or 1 or 3).")


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random translation by up to ``pad`` pixels (zero padding), batched."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_erasing(x: torch.Tensor, p: float, gen: torch.Generator,
                   scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Set a random rectangle of each image to 0 (the mean, after normalization) with
    probability ``p``: torchvision's RandomErasing defaults, batched. A rectangle that does
    not fit is clipped to the image instead of redrawn (torchvision retries ten times)."""
    n, _, h, w = x.shape
    u = torch.rand(5, n, device=x.device, generator=gen)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    eh = (area * aspect).sqrt().round().clamp(1, h)
    ew = (area / aspect).sqrt().round().clamp(1, w)
    top = (u[2] * (h - eh + 1)).floor()
    left = (u[3] * (w - ew + 1)).floor()
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]))
    erase = inside & (u[4] < p)[:, None, None]
    return x.masked_fill(erase[:, None], 0.0)


class BatchTransform:
    """uint8 (N, C, h, w) -> normalized float (N, in_chans, size, size), with training
    augmentation (random flip, random translation, random erasing) drawn from a seeded
    generator; ``channels_last`` returns the layout convolutions run fastest in."""

    def __init__(self, image_size: int, in_chans: int, mean: tuple[float, ...],
                 std: tuple[float, ...], hflip: bool = False, crop_pad: int = 0,
                 erase: float = 0.0, channels_last: bool = False) -> None:
        self.image_size, self.in_chans = image_size, in_chans
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.crop_pad, self.erase = hflip, crop_pad, erase
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Copied to the device once, not per batch (a host-to-device copy every step).
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                                   torch.tensor(self.std, device=device).view(1, -1, 1, 1))
        return self._stats[device]

    def __call__(self, images: torch.Tensor, train: bool = False,
                 gen: torch.Generator | None = None) -> torch.Tensor:
        x = self._resized(images)
        if train and self.hflip:
            flip = torch.rand(len(x), device=x.device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if train and self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        x = self._normalized(x)
        if train and self.erase:
            x = random_erasing(x, self.erase, gen)
        return x.contiguous(memory_format=self.memory_format)

    def views(self, images: torch.Tensor, flip: bool = True, shift: int = 0
              ) -> list[torch.Tensor]:
        """Test-time augmentation: normalized views of a uint8 batch, as evaluated, mirrored
        (``flip``) and translated by ``shift`` pixels along both diagonals (zero padding, as
        training's ``crop_pad`` translates)."""
        x = self._resized(images)
        xs = [x, *([x.flip(-1)] if flip else [])]
        if shift:
            h, w = x.shape[-2:]
            padded = F.pad(x, (shift, shift, shift, shift))
            xs += [padded[..., dy:dy + h, dx:dx + w] for dy in (0, 2 * shift)
                   for dx in (0, 2 * shift)]
        return [self._normalized(v).contiguous(memory_format=self.memory_format) for v in xs]

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        x = match_channels(images.float().div_(255), self.in_chans)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_on(x.device)
        return (x - mean) / std


def train_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int,
                  world_size: int, device: torch.device, weights: torch.Tensor | None = None,
                  draws: int | None = None) -> Iterator[torch.Tensor]:
    """This process's index batches for one epoch.

    Every process draws the same permutation (seeded by seed and epoch; with ``weights``, the
    same weighted draw) and takes its own slice of each global batch, so processes never
    overlap and the global batch is ``batch_size``. The incomplete last batch is dropped (all
    processes take equal steps).
    """
    perm = epoch_permutation(num_samples, seed, epoch, weights, draws).to(device)
    local = batch_size // world_size
    for step in range(len(perm) // batch_size):
        start = step * batch_size + rank * local
        yield perm[start:start + local]


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether a dataset of ``nbytes`` should live on ``device``: always on the CPU (it is in
    that memory already); on a GPU when it takes at most ``fraction`` of the free memory, which
    leaves the rest to activations."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


# Above this many bytes of decoded full-size images, data.placement=auto streams a file or row
# source instead of decoding it all before the first step: a JPEG decodes at roughly 0.1-0.2
# GB of pixels per second and core, so 1 GB keeps the wait before training to seconds.
PRELOAD_LIMIT = 1_000_000_000


def place(train: Data, test: Data, placement: str, device: torch.device, image_size: int,
          ) -> tuple[str, str]:
    """Resolve ``data.placement`` for the two splits together: ``(placement, why)``, one of
    "device" (uint8 images resident on the device, batches indexed there), "host" (resident in
    host memory, batches gathered by workers) or "stream" (decoded and transformed per batch
    in workers from the files or rows)."""
    if isinstance(train, StreamedSplit):
        return "stream", "data.streaming=true"
    if placement != "auto":
        return placement, f"data.placement={placement}"
    if isinstance(train, Samples):
        channels, pixels = train.channels, train.pixels or probe(train)[1]
        decoded = pixels * channels * (len(train) + len(test))
        if decoded > PRELOAD_LIMIT:
            return "stream", (f"{len(train) + len(test)} images of {pixels / 1e6:.2g} "
                              f"megapixels on average decode to {decoded / 1e9:.1f} GB, above "
                              f"the {PRELOAD_LIMIT / 1e9:.1f} GB worth decoding once up front")
        resident = channels * image_size ** 2 * (len(train) + len(test))
        why = (f"{decoded / 1e9:.2f} GB decoded, {resident / 1e9:.2f} GB resident at "
               f"{image_size} px")
    else:
        resident = sum(d.images.nbytes + d.labels.nbytes for d in (train, test))
        why = f"{resident / 1e9:.2f} GB as uint8"
    if fits_on_device(resident, device):
        return "device", f"{why}: fits on the {device.type}"
    return "host", (f"{why}: more than a quarter of the {device.type}'s free memory, so it "
                    f"stays in host memory and batches are gathered by workers")


class _GatherBatches(Dataset):
    """Item i is the i-th index batch's (uint8 images, labels), gathered in a worker."""

    def __init__(self, data: ImageData, batches: list[torch.Tensor]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[i]
        return self.data.images[idx], self.data.labels[idx]


def gather(data: ImageData, idx: torch.Tensor, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (uint8 images, labels) of ``idx``, on ``device``, wherever ``data`` lives."""
    idx = idx.to(data.images.device)
    return (data.images[idx].to(device, non_blocking=True),
            data.labels[idx].to(device, non_blocking=True))


def batches_on(data: ImageData, index_batches: Iterable[torch.Tensor], device: torch.device,
               placement: str = "device", workers: int = 0
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) on ``device`` for each index batch. ``placement="device"``: the
    data is there already and batches are indexed in place; ``"host"``: ``workers`` DataLoader
    workers gather them into pinned memory and they are copied without blocking."""
    if placement == "device":
        for idx in index_batches:
            yield data.images[idx], data.labels[idx]
    elif placement == "host":
        loader = DataLoader(_GatherBatches(data, list(index_batches)), batch_size=None,
                            num_workers=workers, pin_memory=device.type == "cuda")
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    else:
        raise ValueError(f"unknown placement {placement!r}; valid: device, host")


class TrainLoader:
    """This process's training batches, epoch by epoch: ``(uint8 images, labels)`` on the
    device, from resident data (``device``/``host``) or streamed from files (``stream``, whose
    workers persist across epochs). So far, this process has read ``read`` images and skipped
    ``bad`` bad ones (``data.skip_bad_images``): ``bad_items`` the distinct ones by index or
    row number (a hub stream's rows, whose numbers are not known, are not in it)."""

    def __init__(self, data: Data, placement: str, batch_size: int, seed: int, rank: int,
                 world_size: int, device: torch.device, workers: int,
                 stream: TrainBatches | StreamedBatches | None = None,
                 weights: torch.Tensor | None = None, draws: int | None = None) -> None:
        self.data, self.placement, self.batch_size, self.seed = data, placement, batch_size, seed
        self.weights = weights  # per sample: balanced sampling of resident data
        # samples per epoch (data.epoch_repeats; None: one per sample)
        self.draws = len(data) if draws is None else draws
        self.rank, self.world, self.device, self.workers = rank, world_size, device, workers
        self.steps = self.draws // batch_size  # the last partial batch drops
        self.read, self.bad, self.bad_items = 0, 0, set()
        self._sampler: EpochSteps | None = None
        self._loader: DataLoader | None = None
        if placement == "stream" and stream is None:
            raise ValueError("the streaming path needs its TrainBatches dataset")
        if isinstance(stream, StreamedBatches):  # its epoch is set on the dataset itself,
            # which each epoch's fresh workers then copy; a worker needs a shard of its own
            workers = min(workers, data.rows.num_shards)
            self._loader = DataLoader(stream, batch_size=None, **loader_options(
                workers, persistent=False, pin=device.type == "cuda"))
        elif stream is not None:
            self._sampler = EpochSteps(self.steps)
            self._loader = DataLoader(stream, sampler=self._sampler, batch_size=None,
                                      **loader_options(workers, pin=device.type == "cuda"))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training images and labels on the device, for the compile warm-up (streamed
        data: blank images and labels of the batches' shapes, decoding nothing; multi-label:
        multi-hot rows)."""
        if isinstance(self.data, ImageData):
            return gather(self.data, torch.arange(n), self.device)
        size = self._loader.dataset.image_size
        labels = getattr(self.data, "labels", None)  # a stream's may be unknown: single
        like = labels[:1] if labels is not None else torch.zeros(1, dtype=torch.long)
        return (torch.zeros(n, self.data.channels, size, size, dtype=torch.uint8,
                            device=self.device),
                torch.zeros((n, *like.shape[1:]), dtype=like.dtype, device=self.device))

    def epoch(self, epoch: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``first..`` of ``epoch`` (a resumed epoch skips the ones it had)."""
        if self._loader is not None:
            # the sampler's keys, or the stream itself
            keys = self._sampler if self._sampler is not None else self._loader.dataset
            keys.epoch, keys.first = epoch, first
            for images, labels, skipped in from_workers(self._loader):
                self.read, self.bad = self.read + len(labels), self.bad + len(skipped)
                self.bad_items.update(i for i in skipped if i >= 0)
                yield (images.to(self.device, non_blocking=True),
                       labels.to(self.device, non_blocking=True))
            return
        if self.rank == 0:  # images decoded up front and left out: skipped by every epoch
            self.bad += self.data.dropped
        indices = itertools.islice(train_batches(len(self.data), self.batch_size, epoch,
                                                 self.seed, self.rank, self.world,
                                                 self.data.images.device, self.weights,
                                                 self.draws),
                                   first, None)
        for images, labels in batches_on(self.data, indices, self.device, self.placement,
                                         self.workers):
            self.read += len(labels)
            yield images, labels


def eval_loader(data: Data, batch_size: int, workers: int = 0,
                stream: EvalSamples | StreamedEval | None = None) -> DataLoader:
    """The loader of an evaluation split, to be prepared by Accelerate (which shards it across
    processes and lets ``gather_for_metrics`` drop the padding): index batches of resident
    data, or ``(index, uint8 image, label, decoded)`` batches decoded in workers. A Hugging
    Face stream is not prepared: each process reads its own rows (``StreamedEval``)."""
    if isinstance(data, ImageData):
        return index_loader(len(data), batch_size)
    if isinstance(stream, StreamedEval):
        workers = 0 if data.taken else min(workers, data.rows.num_shards)
        return DataLoader(stream, batch_size=None, **loader_options(
            workers, persistent=False, pin=torch.cuda.is_available()))
    return DataLoader(stream, batch_size=batch_size, shuffle=False,
                      **loader_options(workers, pin=torch.cuda.is_available()))


def prepared_eval_loader(data: Data, make_transform: Callable[[], Callable], need: int,
                         image_size: int, batch_size: int, workers: int, skip_bad: bool,
                         accelerator) -> Iterable:
    """The evaluation loader of ``data`` for this process: resident or read one image at a time
    (``make_transform()``: resize and crop, built only then), prepared by Accelerate; or a
    stream's own rows."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if isinstance(data, StreamedSplit):
        return eval_loader(data, batch_size, workers, StreamedEval(
            data, make_transform(), need, image_size, batch_size, rank, world, skip_bad))
    stream = (EvalSamples(data, make_transform(), need, image_size, skip_bad)
              if isinstance(data, Samples) else None)
    return accelerator.prepare(eval_loader(data, batch_size, workers, stream))


def check_counted(seen: torch.Tensor, streamed: bool, expected: int) -> None:
    """Every evaluated sample counted exactly once, over all processes (``seen``: per sample;
    a stream: the rows read, as many as announced)."""
    if streamed and int(seen) != expected:
        raise DataError(f"the streamed test split gave {int(seen)} rows, not the {expected} "
                        f"expected (data.eval_limit, or the dataset card's size); set "
                        f"data.eval_limit to at most the split's size.")
    if not streamed and not bool((seen == 1).all()):  # each sample once, over all processes
        raise TrainingError(f"evaluation counted {int((seen == 0).sum())} test samples never "
                            f"and {int((seen > 1).sum())} more than once; this is a bug in "
                            f"finetune's sharding, please report it.")


def eval_batches(data: Data, loader: Iterable, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(indices, uint8 images, labels, decoded or None)`` on ``device`` from a prepared
    :func:`eval_loader`."""
    for batch in (loader if isinstance(data, ImageData) else from_workers(loader)):
        if isinstance(data, ImageData):
            yield batch, *gather(data, batch, device), None
        elif isinstance(data, StreamedSplit):  # this process's own rows: no indices
            yield None, *(t.to(device, non_blocking=True) for t in batch)
        else:
            yield tuple(t.to(device, non_blocking=True) for t in batch)


def index_loader(num_samples: int, batch_size: int) -> DataLoader:
    """A DataLoader of index batches; prepared by Accelerate it shards them across processes
    and lets ``gather_for_metrics`` drop the padding, so each sample counts exactly once."""
    return DataLoader(range(num_samples), batch_size=batch_size, shuffle=False,
                      collate_fn=torch.tensor)
