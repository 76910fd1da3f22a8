"""Data: choose a source from the config and return the train and test splits in memory."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.config import DataConfig
from finetune.data.idx import DataError
from finetune.data.sources import (
    DEFAULT_IDX_DIRS,
    ImageData,
    find_idx_dir,
    holdout_mask,
    load_hf,
    load_idx,
    load_imagefolder,
)

__all__ = ["DataError", "ImageData", "load_data", "validation_split"]
log = logging.getLogger(__name__)

_FIX = ("Fix: install the Debian package (apt-get install dataset-fashion-mnist), pass "
        "data.root=PATH (a folder with the four IDX files, .gz or raw, flat or in "
        "FashionMNIST/raw), or go online for the Hugging Face hub.")


def _load_from_root(cfg: DataConfig, root: Path) -> tuple[ImageData, ImageData, str]:
    if not root.is_dir():
        raise DataError(f"data.root={cfg.root} is not a folder.")
    idx_dir = find_idx_dir(root)
    if cfg.source in ("auto", "idx") and idx_dir is not None:
        return (*load_idx(idx_dir), f"idx:{idx_dir}")
    elif cfg.source == "idx":
        raise DataError(f"data.root={cfg.root}: no IDX files (train-images-idx3-ubyte[.gz], "
                        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
                        f"t10k-labels-idx1-ubyte[.gz]) in {root}, {root}/FashionMNIST/raw or "
                        f"{root}/raw.")
    else:  # auto without IDX files, or imagefolder
        return (*load_imagefolder(root, cfg.image_size), f"imagefolder:{root}")


def class_indices(wanted: list[str], classes: list[str]) -> list[int]:
    """Indices of ``data.classes`` entries, each a class name or a 0-based index."""
    out = []
    for entry in map(str, wanted):
        if entry in classes:
            index = classes.index(entry)
        elif entry.isdigit() and int(entry) < len(classes):
            index = int(entry)
        else:
            raise DataError(f"data.classes: '{entry}' is neither a class of this data nor an "
                            f"index below {len(classes)}. Classes: "
                            + ", ".join(f"{i}={c}" for i, c in enumerate(classes)))
        if index in out:
            raise DataError(f"data.classes names class {index} ({classes[index]}) twice.")
        out.append(index)
    if not out:
        raise DataError("data.classes is empty; list at least one class, or drop the key.")
    return out


def load_data(cfg: DataConfig) -> tuple[ImageData, ImageData, str]:
    """Return ``(train, test, source)`` for the data config, with limits applied."""
    if cfg.source == "hf":
        train, test = load_hf(cfg.hf_name)
        source = f"hf:{cfg.hf_name}"
    elif cfg.root:
        train, test, source = _load_from_root(cfg, Path(cfg.root).expanduser())
    elif cfg.source in ("auto", "idx"):
        local = next((d for d in map(find_idx_dir, DEFAULT_IDX_DIRS) if d), None)
        if local is not None:
            train, test = load_idx(local)
            source = f"idx:{local}"
        elif cfg.source == "idx":
            raise DataError(f"data.source=idx: no IDX files found in "
                            f"{', '.join(map(str, DEFAULT_IDX_DIRS))}. {_FIX}")
        else:
            log.info("no local Fashion-MNIST in %s; trying Hugging Face %s",
                     ", ".join(map(str, DEFAULT_IDX_DIRS)), cfg.hf_name)
            try:
                train, test = load_hf(cfg.hf_name)
            except DataError as e:
                raise DataError(f"no data found: looked in {', '.join(map(str, DEFAULT_IDX_DIRS))}"
                                f" (no IDX files) and {e} {_FIX}") from None
            source = f"hf:{cfg.hf_name}"
    else:
        raise DataError("data.source=imagefolder needs data.root=PATH.")
    if cfg.classes is not None:
        keep = class_indices(cfg.classes, train.classes)
        train, test = train.select(keep), test.select(keep)
    if len(train.classes) < 2 or len(set(train.classes)) != len(train.classes):
        raise DataError(f"{source}: classes {train.classes}: a classifier needs at least two "
                        f"classes with distinct names.")
    train, test = train.limit(cfg.train_limit), test.limit(cfg.eval_limit)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{source}: empty split ({len(train)} train, {len(test)} test images).")
    return train, test, source


def validation_split(data: ImageData, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """``(train, val)``: ``fraction`` of each class's images, drawn with ``seed``, held out.
    Both keep the original order of their images."""
    held = holdout_mask(data.labels, len(data.classes), fraction, seed)
    if not held.any() or held.all():
        raise DataError(f"data.val_split={fraction} of {len(data)} training images leaves "
                        f"{int(held.sum())} for validation and {int((~held).sum())} for "
                        f"training; both need some.")
    return data.subset(~held), data.subset(held)
