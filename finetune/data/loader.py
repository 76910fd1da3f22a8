"""Device-resident batches: uint8 images live on the device, each batch is indexed, resized,
augmented and normalized there in one go (no per-sample Python, no PIL)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

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


class BatchTransform:
    """uint8 (N, C, h, w) -> normalized float (N, in_chans, size, size), with training
    augmentation (random flip, random translation) drawn from a seeded generator."""

    def __init__(self, image_size: int, in_chans: int, mean: tuple[float, ...],
                 std: tuple[float, ...], hflip: bool = False, crop_pad: int = 0) -> None:
        self.image_size, self.in_chans = image_size, in_chans
        self.mean, self.std = tuple(mean), tuple(std)
        self.hflip, self.crop_pad = hflip, crop_pad
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
        return (x - mean) / std


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


def index_loader(num_samples: int, batch_size: int) -> DataLoader:
    """A DataLoader of index batches; prepared by Accelerate it shards them across processes
    and lets ``gather_for_metrics`` drop the padding, so each sample counts exactly once."""
    return DataLoader(range(num_samples), batch_size=batch_size, shuffle=False,
                      collate_fn=torch.tensor)
