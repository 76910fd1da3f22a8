"""Data sources: IDX files (Fashion-MNIST's own format, found in ``data.root`` or the Debian
package's folder) as whole uint8 tensors (:class:`ImageData`); an ImageFolder tree
(``root/<class>/*.jpg``, optionally split as ``root/train``/``root/test``) as files read one at a
time (:class:`~finetune.data.samples.Samples`). Hugging Face datasets: :mod:`finetune.data.hub`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.data.idx import DataError, read_idx
from finetune.data.samples import Samples, class_counts, probe, relabel, strata

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Fashion-MNIST is looked for when data.root is not given (Debian: dataset-fashion-mnist).
DEFAULT_IDX_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Image files an ImageFolder tree may hold (PIL reads them all).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class ImageData:
    """One split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) (or
    multi-label: uint8 (N, classes))."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    # Bad images left out when the split was decoded up front (data.skip_bad_images): no
    # epoch draws them, and each epoch reports them skipped, as a streamed epoch would.
    dropped: int = 0

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels; "
                            f"the image and label files must come from the same split.")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageData:
        return ImageData(self.images.to(device), self.labels.to(device), self.classes,
                         self.dropped)

    def select(self, keep: list[int]) -> ImageData:
        """Only the samples of classes ``keep``, relabelled ``0..len(keep)-1`` in that order."""
        mask, labels = relabel(self.labels, len(self.classes), keep)
        return ImageData(self.images[mask], labels, [self.classes[i] for i in keep])

    def subset(self, mask: torch.Tensor) -> ImageData:
        """The samples where ``mask`` is true, in their order."""
        return ImageData(self.images[mask], self.labels[mask], self.classes)

    def as_samples(self) -> Samples:
        """The same images read one at a time (the streaming path forced on resident data)."""
        return Samples(list(range(len(self))), self.labels.cpu(), self.classes,
                       self.images.shape[1], rows=self.images.cpu())


# --- IDX -------------------------------------------------------------------------------------

def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_idx_dir(root: Path) -> Path | None:
    """The folder under ``root`` holding the four IDX files (flat or torchvision layout)."""
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        if all(_find_file(folder, stem) for pair in IDX_FILES.values() for stem in pair):
            return folder
    return None


def load_idx(folder: Path) -> tuple[ImageData, ImageData]:
    classes_file = folder / "classes.txt"
    classes = (classes_file.read_text().split("\n") if classes_file.is_file()
               else FASHION_MNIST_CLASSES)
    classes = [c for c in classes if c.strip()]
    splits = []
    for split, (image_stem, label_stem) in IDX_FILES.items():
        images = read_idx(_find_file(folder, image_stem))
        labels = read_idx(_find_file(folder, label_stem))
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{folder}: {split} images must be 3-D (N, H, W) and labels 1-D, got "
                            f"shapes {images.shape} and {labels.shape}.")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} split has {len(images)} images but "
                            f"{len(labels)} labels; the files do not belong together.")
        if images.dtype != np.uint8:
            raise DataError(f"{folder}: {split} images are {images.dtype}, not unsigned bytes "
                            f"(IDX type 0x08); convert them to 0-255 uint8.")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{folder}: {split} labels are {labels.dtype}, not integers; "
                            f"write them as uint8 (IDX type 0x08).")
        if len(labels) and labels.max() >= len(classes):
            raise DataError(f"{folder}: label {labels.max()} but only {len(classes)} class names; "
                            f"add a classes.txt with one name per line.")
        if len(labels) and labels.min() < 0:
            raise DataError(f"{folder}: {split} labels include {labels.min()}; labels are class "
                            f"indices 0..{len(classes) - 1}.")
        splits.append(ImageData(torch.from_numpy(images.copy()).unsqueeze(1),
                                torch.from_numpy(labels.astype(np.int64)), classes))
    return splits[0], splits[1]


# --- ImageFolder -----------------------------------------------------------------------------

def _utf8(root: Path, name: str) -> str:
    """A class folder's name, which model.json and the card write: refused unless UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise DataError(f"{os.fsencode(root).decode('utf-8', 'backslashreplace')}/{shown}: "
                        f"the class folder's name is not valid UTF-8, and class names are "
                        f"written to model.json; rename it (convmv -f latin1 -t utf8 --notest "
                        f"renames Latin-1 names).") from None
    return name


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(_utf8(root, p.name) for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; an ImageFolder tree has one subfolder of "
                        f"images per class (root/cat/1.png, root/dog/2.png, ...).")
    samples = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise DataError(f"{root / cls}: class folder '{cls}' holds no images; add images or "
                            f"remove the folder.")
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{path}: not an image file (suffix {path.suffix or 'none'}); "
                                f"ImageFolder accepts {', '.join(sorted(IMAGE_SUFFIXES))}.")
            samples.append((path, label))
    return classes, samples


def _tree(root: Path, classes: list[str] | None = None) -> Samples:
    found, samples = _scan_folder(root)
    if classes is not None and found != classes:
        raise DataError(f"{root}: class folders {found} differ from the training split's "
                        f"{classes}; both splits need the same class folders.")
    return Samples([p for p, _ in samples],
                   torch.tensor([label for _, label in samples], dtype=torch.int64), found, 3)


def load_imagefolder(root: Path, test_split: float = 0.1, seed: int = 0
                     ) -> tuple[Samples, Samples]:
    """``root/train`` + ``root/test`` (or ``val``), or one tree split per class with ``seed``;
    nothing is decoded (the channel mode comes from a sample of headers)."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = _tree(root / "train")
        test = _tree(test_dir, train.classes)
    else:
        data = _tree(root)
        # A fixed per-class hold-out, independent of the training seed: runs compare fairly.
        test_mask = holdout_mask(data.labels, len(data.classes), test_split, seed,
                                 at_least_one=True)
        log.info("%s has no train/test folders: holding out %d of %d images for testing (a "
                 "seeded tenth of each class)", root, int(test_mask.sum()), len(data))
        train, test = data.subset(~test_mask), data.subset(test_mask)
    train.channels, train.pixels = probe(train, seed)
    test.channels, test.pixels = train.channels, train.pixels
    return train, test


def holdout_mask(labels: torch.Tensor, num_classes: int, fraction: float, seed: int,
                 at_least_one: bool = False) -> torch.Tensor:
    """A boolean mask holding out ``fraction`` of each class's samples (at least one per class
    with ``at_least_one``), drawn with ``seed``."""
    labels, num_classes = strata(labels, num_classes)
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    labels = labels.cpu()
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        take = round(fraction * len(members))
        take = max(1, take) if at_least_one else take
        held[members[torch.randperm(len(members), generator=gen)[:take]]] = True
    return held


def fold_ids(labels: torch.Tensor, num_classes: int, folds: int, seed: int) -> torch.Tensor:
    """Each sample's fold (0..folds-1): every class dealt round-robin in a seeded order, each
    class starting where the last one stopped, so that folds differ by at most one sample
    overall and per class."""
    labels, num_classes = strata(labels, num_classes)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(len(labels), dtype=torch.long)
    labels, start = labels.cpu(), 0
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        order = members[torch.randperm(len(members), generator=gen)]
        ids[order] = (start + torch.arange(len(order))) % folds
        start = (start + len(order)) % folds
    return ids


def stratified_mask(labels: torch.Tensor, num_classes: int, n: int, seed: int) -> torch.Tensor:
    """A mask keeping ``n`` samples, the same fraction of every class (largest remainders
    round), drawn with ``seed``: a limit on a class-sorted source keeps every class."""
    labels, num_classes = strata(labels, num_classes)
    counts = class_counts(labels, num_classes).double()
    share = counts * n / counts.sum()
    take = share.floor().long()
    extra = n - int(take.sum())
    take[torch.argsort(share - take, descending=True, stable=True)[:extra]] += 1
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for k in range(num_classes):
        members = torch.nonzero(labels.cpu() == k).flatten()
        keep[members[torch.randperm(len(members), generator=gen)[:int(take[k])]]] = True
    return keep
