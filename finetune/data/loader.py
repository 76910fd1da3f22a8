"""Batches for training and evaluation.

The fast path keeps the uint8 dataset on the device: each batch is indexed, resized, augmented
and normalized there in one go (no per-sample Python, no PIL). A dataset too large for the
device stays in host memory and is streamed: DataLoader workers gather the same index batches
into pinned memory and the device does the rest, as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from finetune.data.sources import ImageData

log = logging.getLogger(__name__)

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
        x = match_channels(images.float().div_(255), self.in_chans)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        if train and self.hflip:
            flip = torch.rand(len(x), device=x.device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if train and self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        mean, std = self._stats_on(x.device)
        x = (x - mean) / std
        if train and self.erase:
            x = random_erasing(x, self.erase, gen)
        return x.contiguous(memory_format=self.memory_format)


def train_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int,
                  world_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """This process's index batches for one epoch.

    Every process draws the same permutation (seeded by seed and epoch) and takes its own
    slice of each global batch, so processes never overlap and the global batch is
    ``batch_size``. The incomplete last batch is dropped (all processes take equal steps).
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_samples, generator=gen).to(device)
    local = batch_size // world_size
    for step in range(num_samples // batch_size):
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


def place(data: ImageData, placement: str, device: torch.device, other: ImageData) -> str:
    """Resolve ``data.placement``: "device" or "host" for the two splits together."""
    if placement != "auto":
        return placement
    nbytes = sum(d.images.nbytes + d.labels.nbytes for d in (data, other))
    if fits_on_device(nbytes, device):
        return "device"
    log.warning("the dataset (%.1f GB as uint8) does not fit comfortably in the free memory "
                "of %s: streaming batches from host memory with a DataLoader instead "
                "(data.placement=host; slower)", nbytes / 1e9, device)
    return "host"


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
    data is there already and batches are indexed in place; ``"host"`` (the streaming
    fallback, for data kept in host memory): ``workers`` DataLoader workers gather them into
    pinned memory and they are copied without blocking."""
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


def index_loader(num_samples: int, batch_size: int) -> DataLoader:
    """A DataLoader of index batches; prepared by Accelerate it shards them across processes
    and lets ``gather_for_metrics`` drop the padding, so each sample counts exactly once."""
    return DataLoader(range(num_samples), batch_size=batch_size, shuffle=False,
                      collate_fn=torch.tensor)
