"""Data sources, each returning whole splits as uint8 tensors.

- IDX files (Fashion-MNIST's own format), found in ``data.root`` or the Debian package's folder;
- a Hugging Face dataset (``datasets`` is imported only here, only when used);
- an ImageFolder tree: ``root/<class>/*.png``, optionally split as ``root/train``/``root/test``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finetune.data.idx import DataError, read_idx

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Where Fashion-MNIST is looked for when data.root is not given (Debian: dataset-fashion-mnist).
DEFAULT_IDX_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# What torchvision.io.decode_image reads.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}


@dataclass
class ImageData:
    """One split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels; "
                            f"the image and label files must come from the same split.")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageData:
        return ImageData(self.images.to(device), self.labels.to(device), self.classes)

    def select(self, keep: list[int]) -> ImageData:
        """Only the samples of classes ``keep``, relabelled ``0..len(keep)-1`` in that order."""
        relabel = torch.full((len(self.classes),), -1, dtype=torch.long)
        relabel[torch.tensor(keep)] = torch.arange(len(keep))
        new = relabel[self.labels]
        mask = new >= 0
        return ImageData(self.images[mask], new[mask], [self.classes[i] for i in keep])

    def subset(self, mask: torch.Tensor) -> ImageData:
        """The samples where ``mask`` is true, in their order."""
        return ImageData(self.images[mask], self.labels[mask], self.classes)

    def limit(self, n: int | None) -> ImageData:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return ImageData(self.images[:n], self.labels[:n], self.classes)


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


# --- Hugging Face ----------------------------------------------------------------------------

def _hf_split(ds, name: str) -> ImageData:
    import datasets

    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)),
                     None)
    if image_col is None or label_col is None:
        raise DataError(f"Hugging Face dataset {name} needs an Image and a ClassLabel column; "
                        f"it has {dict(ds.features)}.")
    images = [np.asarray(im) for im in ds[image_col]]
    if len({im.shape for im in images}) > 1:
        raise DataError(f"Hugging Face dataset {name}: images differ in size or mode; "
                        f"save them as an ImageFolder tree and use data.root=PATH.")
    array = np.stack(images) if images else np.zeros((0, 1, 1), np.uint8)
    array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
    return ImageData(torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8)),
                     torch.tensor(ds[label_col], dtype=torch.int64),
                     list(ds.features[label_col].names))


def load_hf(name: str) -> tuple[ImageData, ImageData]:
    """Train and test splits of a Hugging Face image-classification dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"could not load Hugging Face dataset '{name}' (not cached, and the hub "
                        f"is unreachable or refused: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    test_split = next((s for s in ("test", "validation", "val") if s in ds), None)
    if "train" not in ds or test_split is None:
        raise DataError(f"Hugging Face dataset '{name}' has splits {list(ds)}; "
                        f"need 'train' and 'test' (or 'validation').")
    return _hf_split(ds["train"], name), _hf_split(ds[test_split], name)


# --- ImageFolder -----------------------------------------------------------------------------

def _read_image(path: Path, mode) -> torch.Tensor:
    """uint8 (C, H, W): 16-bit images scaled to 8 bits, an animation's first frame."""
    from torchvision.io import decode_image

    try:
        image = decode_image(str(path), mode=mode)
        image = image[0] if image.ndim == 4 else image  # an animated GIF: its first frame
        return to_uint8(image)
    except Exception as e:
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}); the file is corrupt "
                        f"or not a PNG, JPEG, GIF or WebP image. Remove or replace it.") from None


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """8-bit pixels: 16-bit ones (PNG) scaled by 255/65535, rounded."""
    if image.dtype == torch.uint16:
        return image.to(torch.float32).div_(257).round_().to(torch.uint8)
    return image


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
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


def _load_tree(root: Path, image_size: int, classes: list[str] | None = None) -> ImageData:
    from torchvision.io import ImageReadMode

    found, samples = _scan_folder(root)
    if classes is not None and found != classes:
        raise DataError(f"{root}: class folders {found} differ from the training split's "
                        f"{classes}; both splits need the same class folders.")
    decoded = [_read_image(p, ImageReadMode.UNCHANGED) for p, _ in samples]
    # One channel when every image is grey, else RGB for all (alpha dropped).
    mode = ImageReadMode.GRAY if all(t.shape[0] in (1, 2) for t in decoded) else ImageReadMode.RGB
    images = []
    for (path, _), tensor in zip(samples, decoded, strict=True):
        if tensor.shape[0] != (1 if mode == ImageReadMode.GRAY else 3):
            tensor = _read_image(path, mode)
        if tuple(tensor.shape[1:]) != (image_size, image_size):
            # Decoded once at load time: stacking needs one size, and every later step is
            # on batches.
            tensor = F.interpolate(tensor[None].float(), size=(image_size, image_size),
                                   mode="bilinear", antialias=True, align_corners=False)[0]
            tensor = tensor.round().clamp(0, 255).to(torch.uint8)
        images.append(tensor)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return ImageData(torch.stack(images), labels, found)


def load_imagefolder(root: Path, image_size: int, test_split: float = 0.1, seed: int = 0
                     ) -> tuple[ImageData, ImageData]:
    """Load ``root/train`` + ``root/test`` (or ``val``), or split one tree per class."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = _load_tree(root / "train", image_size)
        return train, _load_tree(test_dir, image_size, train.classes)
    data = _load_tree(root, image_size)
    # A fixed per-class hold-out, independent of the training seed, so runs compare fairly.
    test_mask = holdout_mask(data.labels, len(data.classes), test_split, seed, at_least_one=True)
    log.info("%s has no train/test folders: holding out %d of %d images per class for testing",
             root, int(test_mask.sum()), len(data))
    return data.subset(~test_mask), data.subset(test_mask)


def holdout_mask(labels: torch.Tensor, num_classes: int, fraction: float, seed: int,
                 at_least_one: bool = False) -> torch.Tensor:
    """A boolean mask holding out ``fraction`` of each class's samples (at least one per class
    with ``at_least_one``), drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    labels = labels.cpu()
    for k in range(num_classes):
        members = torch.nonzero(labels == k).flatten()
        take = round(fraction * len(members))
        take = max(1, take) if at_least_one else take
        held[members[torch.randperm(len(members), generator=gen)[:take]]] = True
    return held
