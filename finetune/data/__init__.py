"""Data: choose a source from the config and return its train and test splits, with the
classes kept and the limits applied (the same stratified, seeded draw for every source).

A split is either :class:`ImageData` (uint8 images in memory: IDX files) or :class:`Samples`
(read one image at a time: folders, Hugging Face rows); ``finetune.data.loader.place`` decides
later whether a :class:`Samples` split is decoded up front or streamed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from finetune.config import DataConfig
from finetune.data.idx import DataError
from finetune.data.samples import Samples, class_counts
from finetune.data.sources import (
    DEFAULT_IDX_DIRS,
    ImageData,
    find_idx_dir,
    fold_ids,
    holdout_mask,
    load_idx,
    load_imagefolder,
    stratified_mask,
)
from finetune.data.tags import as_task, is_multilabel, load_tagged_folder, tagged_folder

__all__ = ["DataError", "ImageData", "Samples", "fold_split", "is_multilabel", "load_data",
           "multilabel_data", "validation_split"]
Split = ImageData | Samples
log = logging.getLogger(__name__)

_FIX = ("Fix: install the Debian package (apt-get install dataset-fashion-mnist), pass "
        "data.root=PATH (a folder with the four IDX files, .gz or raw, flat or in "
        "FashionMNIST/raw), or go online for the Hugging Face hub.")


def _load_from_root(cfg: DataConfig, root: Path) -> tuple[Split, Split, str]:
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
    elif _tagged_root(cfg, root):
        return (*load_tagged_folder(root, seed=cfg.split_seed), f"tagged:{root}")
    else:  # auto without IDX files, or imagefolder
        return (*load_imagefolder(root, seed=cfg.split_seed), f"imagefolder:{root}")


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


def _load_hub(cfg: DataConfig) -> tuple[Split, Split, str]:
    from finetune.data.hub import load_hub  # imports datasets: only when used

    return load_hub(cfg, cfg.split_seed)


def load_data(cfg: DataConfig) -> tuple[Split, Split, str]:
    """Return ``(train, test, source)`` for the data config, with limits applied."""
    if cfg.streaming:
        return _load_streaming(cfg)
    if cfg.source == "hf":
        train, test, source = _load_hub(cfg)
    elif cfg.root:
        train, test, source = _load_from_root(cfg, Path(cfg.root).expanduser())
    elif cfg.source in ("auto", "idx"):
        local = _local_idx()
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
                train, test, source = _load_hub(cfg)
            except DataError as e:
                raise DataError(f"no data found: looked in {', '.join(map(str, DEFAULT_IDX_DIRS))}"
                                f" (no IDX files) and {e} {_FIX}") from None
    else:
        raise DataError("data.source=imagefolder needs data.root=PATH.")
    train, test = as_task(train, test, cfg.task, source)
    if cfg.classes is not None:
        keep = class_indices(cfg.classes, train.classes)
        train, test = train.select(keep), test.select(keep)
    if len(train.classes) < 2 or len(set(train.classes)) != len(train.classes):
        raise DataError(f"{source}: classes {train.classes}: a classifier needs at least two "
                        f"classes with distinct names.")
    return (*_limited(train, test, source, cfg), source)


def multilabel_data(cfg: DataConfig) -> bool:
    """Whether ``data.task`` makes the data multi-label, read from the config, a folder's
    labels.csv or a dataset's features (no image decoded): what commands that plan several
    runs (tune, sweep) decide by before the first run."""
    if cfg.task != "auto":
        return cfg.task == "multilabel"
    root = Path(cfg.root).expanduser() if cfg.root else None
    if cfg.streaming:  # a stream refuses list-valued labels (hub._one_label_per_row)
        return False
    from finetune.data.hub import tagged_hub  # imports datasets only when it is called

    if cfg.source == "hf":
        return tagged_hub(cfg)
    if root is not None:
        return root.is_dir() and _tagged_root(cfg, root)
    if cfg.source == "auto" and _local_idx() is None:  # load_data's fallback to the hub
        try:
            return tagged_hub(cfg)
        except DataError:  # the first run says why the data cannot be read
            return False
    return False


def _tagged_root(cfg: DataConfig, root: Path) -> bool:
    """Whether :func:`load_data` reads the folder ``root`` as tags (a labels.csv: multi-label),
    not as IDX files or class folders."""
    return cfg.source != "imagefolder" and find_idx_dir(root) is None and tagged_folder(root)


def _local_idx() -> Path | None:
    """The first of the default folders that holds Fashion-MNIST's IDX files."""
    return next((d for d in map(find_idx_dir, DEFAULT_IDX_DIRS) if d), None)


def _limited(train: Split, test: Split, source: str, cfg: DataConfig) -> tuple[Split, Split]:
    """The splits cut to ``data.train_limit``/``eval_limit``; every class keeps training
    images (checked before and after the limit), else an error or a warning."""
    allow = cfg.allow_empty_classes
    empty = empty_classes(train, allow, f"{source}: ", test=test)
    limited = limit(train, cfg.train_limit, cfg.split_seed)
    if not empty and len(limited) < len(train):
        empty_classes(limited, allow, f"{source}: ", f" after data.train_limit={cfg.train_limit}")
    train, test = limited, limit(test, cfg.eval_limit, cfg.split_seed)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{source}: empty split ({len(train)} train, {len(test)} test images).")
    return train, test


def _load_streaming(cfg: DataConfig):
    """``data.streaming=true``: Hugging Face splits iterated, never held; limits take the first
    rows (a stream has no labels to stratify by until it is read)."""
    from finetune.data.hub import load_hub_streaming  # imports datasets: only when used

    if cfg.source not in ("auto", "hf"):
        raise DataError(f"data.streaming=true reads Hugging Face datasets; data.source="
                        f"{cfg.source} is read from files: drop data.streaming.")
    if cfg.classes is not None:
        raise DataError("data.classes cannot select classes of a stream; use "
                        "data.streaming=false.")
    train, test, source = load_hub_streaming(cfg)
    if train.labels is not None and test.labels is not None:  # a local dataset's
        empty_classes(train, cfg.allow_empty_classes, f"{source}: ", test=test)
    return train, test, source


def limit(data: Split, n: int | None, seed: int) -> Split:
    """``n`` samples, the same fraction of every class, drawn with ``seed`` (all when ``n`` is
    None or not below the size): a limit on a class-sorted source still sees every class."""
    if n is None or n >= len(data):
        return data
    return data.subset(stratified_mask(data.labels, len(data.classes), n, seed))


def validation_split(data: Split, fraction: float, seed: int, allow_empty: bool = False
                     ) -> tuple[Split, Split]:
    """``(train, val)``: ``fraction`` of each class's images, drawn with ``seed``, held out.
    Both keep the original order of their images. ``allow_empty``: a class left without
    training images is a warning, not an error (``data.allow_empty_classes``)."""
    held = holdout_mask(data.labels, len(data.classes), fraction, seed)
    return _held_out(data, held, allow_empty, f"data.val_split={fraction}",
                     f" after data.val_split={fraction}")


def fold_split(data: Split, folds: int, fold: int, seed: int, allow_empty: bool = False
               ) -> tuple[Split, Split]:
    """``(train, val)`` of k-fold cross-validation: fold ``fold`` of ``folds`` stratified,
    seeded folds (:func:`fold_ids`) held out, the others trained on; both keep the images'
    order."""
    held = fold_ids(data.labels, len(data.classes), folds, seed) == fold
    return _held_out(data, held, allow_empty, f"data.folds={folds} (fold {fold})",
                     f" outside fold {fold} of data.folds={folds}")


def _held_out(data: Split, held: torch.Tensor, allow_empty: bool, what: str, after: str
              ) -> tuple[Split, Split]:
    """``(train, held out)`` by the mask ``held``; both need images, and every class training
    images (else an error, or with ``allow_empty`` a warning)."""
    if not held.any() or held.all():
        raise DataError(f"{what} of {len(data)} training images leaves {int(held.sum())} held "
                        f"out and {int((~held).sum())} for training; both need some.")
    train = data.subset(~held)
    empty_classes(train, allow_empty, "", after)
    return train, data.subset(held)


def empty_classes(train: Split, allow: bool, prefix: str, after: str = "",
                  test: Split | None = None) -> int:
    """How many classes have no training images: an error, or with ``allow`` a warning (the
    model would never see them, balanced sampling never draw them, balanced class weights
    give them 0). ``after`` says what emptied them; ``test``: the test split, whose share of
    them the message gives."""
    counts = class_counts(train.labels, len(train.classes)).tolist()
    empty = [k for k, n in enumerate(counts) if n == 0]
    if not empty:
        return 0
    if test is not None:
        held = class_counts(test.labels, len(train.classes)).tolist()
        after = " (" + ", ".join(f"{held[k]} in the test split" for k in empty[:5]) + ")"
    many = len(empty) > 1
    what = (f"{prefix}class{'es' if many else ''} "
            f"{', '.join(repr(train.classes[k]) for k in empty[:5])}"
            f"{f' and {len(empty) - 5} more' if len(empty) > 5 else ''} "
            f"{'have' if many else 'has'} no training images{after}")
    if allow:
        log.warning("%s; training without %s (data.allow_empty_classes=true)", what,
                    "them" if many else "it")
        return len(empty)
    raise DataError(f"{what}; add training images, or set data.allow_empty_classes=true to "
                    f"train without {'them' if many else 'it'}.")
