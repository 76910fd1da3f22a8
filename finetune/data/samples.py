"""Splits read one image at a time: :class:`Samples` holds an ImageFolder tree's files, a Hugging
Face dataset's rows or in-memory images, with their labels, and opens any one of them.

Nothing is decoded when a split is made: its channel mode (grey when every probed image is) and
its decoded size come from a seeded sample of image headers (:func:`probe`), which is what
``data.placement=auto`` chooses by. :func:`preload` decodes a whole split in parallel, one image
at a time resized and center-cropped, into the :class:`ImageData` of the device-resident path.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from finetune.data.idx import DataError
from finetune.data.images import DATA_FIX, eval_transform, open_image, pil_to_uint8
from finetune.data.workers import from_workers, loader_options, or_skip

GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
PROBE = 2000  # headers read to decide the channel mode and estimate the decoded size
PRELOAD_BATCH_BYTES = 16 * 2**20


@dataclass
class Samples:
    """One split, read lazily: ``items`` are file paths, or row numbers of ``rows`` (a Hugging
    Face dataset whose ``column`` holds undecoded images, or a uint8 tensor (N, C, H, W))."""

    items: list
    labels: torch.Tensor  # int64 (N,), or multi-label: uint8 (N, classes), 1 per tag
    classes: list[str]
    channels: int  # 1 or 3: every image is opened in this mode
    rows: Any = None
    column: str = ""
    pixels: float = 0.0  # mean pixels per image, from the headers :func:`probe` read (0: not yet)
    split: str = ""  # the Hugging Face split ``rows`` is, as errors name a row

    def __post_init__(self) -> None:
        if len(self.items) != len(self.labels):
            raise DataError(f"{len(self.items)} images but {len(self.labels)} labels.")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, mask: torch.Tensor) -> Samples:
        """The samples where ``mask`` is true, in their order."""
        keep = torch.nonzero(mask).flatten().tolist()
        return Samples([self.items[i] for i in keep], self.labels[mask], self.classes,
                       self.channels, self.rows, self.column, self.pixels, self.split)

    def select(self, keep: list[int]) -> Samples:
        """Only classes ``keep``, relabelled ``0..len(keep)-1`` in that order."""
        mask, labels = relabel(self.labels, len(self.classes), keep)
        out = self.subset(mask)
        out.labels, out.classes = labels, [self.classes[i] for i in keep]
        return out

    def name(self, i: int) -> str:
        """Sample ``i`` as errors and logs name it."""
        item = self.items[i]
        if isinstance(item, Path):
            return str(item)
        return f"split '{self.split}' row {item}" if self.split else f"row {item}"

    def raw(self, i: int) -> Path | bytes | Image.Image:
        """What :func:`open_image` reads for sample ``i`` (a path, encoded bytes, or a PIL
        image of an in-memory one)."""
        item = self.items[i]
        if isinstance(item, Path):
            return item
        if isinstance(self.rows, torch.Tensor):
            array = self.rows[item].permute(1, 2, 0).squeeze(-1).numpy()
            return Image.fromarray(array)
        return encoded(self.rows[int(item)][self.column], self.name(i))

    def open(self, i: int, need: int = 0) -> Image.Image:
        """Sample ``i`` decoded in this split's channel mode (see :func:`open_image`)."""
        raw = self.raw(i)
        if isinstance(raw, Image.Image):
            return raw.convert("L" if self.channels == 1 else "RGB")
        return open_image(raw, self.channels, need, self.name(i), DATA_FIX)


def relabel(labels: torch.Tensor, num_classes: int, keep: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, new labels)`` keeping classes ``keep``, renumbered in that order. Multi-label:
    every image, with those tags alone (an image with none of them is an image without tags,
    a negative for every kept tag)."""
    if labels.ndim == 2:
        return torch.ones(len(labels), dtype=torch.bool), labels[:, keep]
    table = torch.full((num_classes,), -1, dtype=torch.long)
    table[torch.tensor(keep)] = torch.arange(len(keep))
    new = table[labels]
    return new >= 0, new[new >= 0]


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (multi-label: images tagged with it), int64 (num_classes,)."""
    if labels.ndim == 2:
        return labels.cpu().long().sum(0)
    return torch.bincount(labels.cpu(), minlength=num_classes)


def strata(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, int]:
    """``(stratum per image, number of strata)`` for stratified draws (limits, hold-outs,
    folds): a single label is its own stratum. A multi-label image is stratified by its
    rarest tag, an image without tags by a stratum of its own (``num_classes``): every tag
    keeps its share of images in each part (an approximation of iterative stratification,
    Sechidis et al. 2011, exact for the rarest tags, which are the ones a split can lose)."""
    if labels.ndim == 1:
        return labels.cpu(), num_classes
    tags = labels.cpu().bool()
    count = tags.sum(0).double()
    cost = torch.where(tags, count, torch.inf)
    rarest = cost.argmin(1)
    return torch.where(tags.any(1), rarest, num_classes), num_classes + 1


def encoded(cell: dict | None, name: str) -> Path | bytes:
    """What :func:`open_image` reads from a Hugging Face ``Image(decode=False)`` cell."""
    if cell is None:
        raise DataError(f"{name}: the image is missing (None); remove the row, or set "
                        f"data.skip_bad_images=true.")
    if cell.get("bytes"):
        return cell["bytes"]
    if cell.get("path"):
        return Path(cell["path"])
    raise DataError(f"{name}: the image cell holds neither bytes nor a path; remove the row, "
                    f"or set data.skip_bad_images=true.")


def header(read: Callable[[], Path | bytes | Image.Image]) -> tuple[str, int]:
    """(mode, pixels) from the header of the image ``read()`` returns, without decoding it;
    ("RGB", 0) for a missing or unreadable one (decoding reports it, or skips it)."""
    try:
        raw = read()
        if isinstance(raw, Image.Image):
            return raw.mode, raw.width * raw.height
        with Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw) as image:
            mode = image.mode
            if mode == "P":  # a palette of greys (a GIF, say) is grey
                palette = image.getpalette() or []
                grey = all(palette[i] == palette[i + 1] == palette[i + 2]
                           for i in range(0, len(palette) - 2, 3))
                mode = "L" if grey else "RGB"
            return mode, image.width * image.height
    except Exception:  # decoding reports it properly, naming the file (or skipping it)
        return "RGB", 0


def probe(items: Samples, seed: int = 0) -> tuple[int, float]:
    """``(channels, mean pixels per image)`` from up to ``PROBE`` headers drawn with ``seed``:
    one channel when every probed image is grey, else three."""
    n = len(items)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:PROBE].tolist()
    headers = [header(lambda i=i: items.raw(i)) for i in order]
    grey = all(mode in GREY_MODES for mode, _ in headers)
    pixels = sum(p for _, p in headers) / max(1, len(headers))
    return (1 if grey else 3), pixels


class _Resized(Dataset):
    """Item i: sample i resized (shorter side) and center-cropped to ``size``, uint8."""

    def __init__(self, samples: Samples, size: int, interpolation: str, skip_bad: bool) -> None:
        self.samples, self.size, self.skip_bad = samples, size, skip_bad
        self.interpolation = interpolation

    @cached_property
    def transform(self) -> Callable:
        """Built at the first image not already at the size (it imports torchvision)."""
        return eval_transform(self.size, 1.0, self.interpolation)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        image = or_skip(lambda: self.samples.open(i, need=self.size), self.skip_bad)
        if image is None:
            return torch.zeros(self.samples.channels, self.size, self.size, dtype=torch.uint8), \
                False
        if image.size == (self.size, self.size):  # resize and crop would return it as it is
            return pil_to_uint8(image), True
        return self.transform(image), True


def preload(samples: Samples, size: int, interpolation: str = "bilinear", workers: int = 0,
            skip_bad: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every sample in ``workers`` processes, each resized (shorter side) to ``size`` and
    center-cropped: ``(uint8 images (N', C, size, size), labels (N',), names of bad images)``.
    Only one batch of full-size images is ever in memory."""

    out = torch.empty(len(samples), samples.channels, size, size, dtype=torch.uint8)
    ok = torch.empty(len(samples), dtype=torch.bool)
    # A worker's batch costs ~10 ms to hand over whatever its size: batches of ~16 MB decoded
    # (Fashion-MNIST's 60,000 PNGs in 2 workers: 11.3 s in batches of 64, 4.2 s of 512), and at
    # least 4 per worker, or one worker would decode most of a small split.
    by_bytes = max(16, PRELOAD_BATCH_BYTES // (samples.channels * size * size))
    batch = max(1, min(4096, by_bytes, math.ceil(len(samples) / (4 * max(1, workers)))))
    loader = DataLoader(_Resized(samples, size, interpolation, skip_bad), batch_size=batch,
                        **loader_options(workers, persistent=False))
    start = 0
    for images, good in from_workers(loader):
        out[start:start + len(images)], ok[start:start + len(images)] = images, good
        start += len(images)
    bad = [samples.name(i) for i in torch.nonzero(~ok).flatten().tolist()]
    return out[ok], samples.labels[ok], bad
