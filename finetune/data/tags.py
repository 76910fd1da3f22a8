"""Multi-label data: an image folder whose ``labels.csv`` gives each file its tags, list-valued
Hugging Face label columns, and ``data.task``.

A tagged folder is ``root/labels.csv`` beside the images (a seeded tenth held out for testing),
or ``root/train`` and ``root/test`` (or ``val``), each with its own ``labels.csv``. A row is a
file (relative to the CSV's folder) and its tags, separated by spaces or commas, in one field
or several: ``beach.jpg,dog sunset``. An empty tag set is a valid image without any tag
(every sigmoid's target 0). A folder tree where one image sits in several class folders is
not read as multi-label: copies of a file cannot be told from two images that look alike, and
a CSV says which image has which tags without copying it.

Multi-label labels are uint8 ``(N, classes)`` multi-hot tensors; everything that draws a
stratified subset stratifies them by :func:`~finetune.data.samples.strata`.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import torch

from finetune.data.idx import DataError
from finetune.data.samples import Samples

LABELS_CSV = "labels.csv"
TASKS = ("auto", "single", "multilabel")
TAG_SEPARATORS = re.compile(r"[\s,]+")


def tagged_folder(root: Path) -> bool:
    """Whether ``root`` is a tagged folder (a ``labels.csv`` in it or in ``root/train``)."""
    return (root / LABELS_CSV).is_file() or (root / "train" / LABELS_CSV).is_file()


HEADERS = ("file", "filename", "image", "path")  # a first cell that makes row 1 a header


def read_tags(csv_file: Path) -> list[tuple[Path, list[str]]]:
    """``(file, tags)`` per row of a ``labels.csv``; a first row whose first cell is one of
    :data:`HEADERS` (any case) is a header."""
    rows = []
    try:
        with csv_file.open(newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or (number == 1 and row[0].strip().lower() in HEADERS):
                    continue
                name, tags = row[0].strip(), TAG_SEPARATORS.split(" ".join(row[1:]).strip())
                rows.append((name, [t for t in tags if t], number))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_file}: not a UTF-8 CSV of file,tags rows ({e}).") from None
    return _checked(csv_file, rows)


def _checked(csv_file: Path, rows: list) -> list[tuple[Path, list[str]]]:
    """The rows, each naming an existing file under the CSV's folder, each file once (a
    symbolic link counts as the file it points to)."""
    if not rows:
        raise DataError(f"{csv_file}: no rows; write one row per image: file,tags (tags "
                        f"separated by spaces); a header row starts with one of "
                        f"{', '.join(HEADERS)}.")
    seen, out = {}, []
    for name, tags, number in rows:
        relative = Path(os.path.normpath(name))
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise DataError(f"{csv_file} row {number}: {name!r} is outside {csv_file.parent}; "
                            f"name files relative to the CSV's folder, inside it.")
        path = csv_file.parent / relative
        if not path.is_file():
            raise DataError(f"{csv_file} row {number}: {name!r} is not a file in "
                            f"{csv_file.parent}; fix the name, or remove the row.")
        if (real := path.resolve()) in seen:
            raise DataError(f"{csv_file} rows {seen[real]} and {number} both name the file "
                            f"{name!r}; give each image one row with all its tags.")
        seen[real] = number
        out.append((path, tags))
    return out


def multi_hot(tag_lists: list[list], classes: list, where: str,
              names: list | None = None) -> torch.Tensor:
    """uint8 ``(N, len(classes))``: 1 where an image has the tag. A tag outside ``classes``
    is an error naming it and its image (``names[row]``, else the row number)."""
    index = {c: i for i, c in enumerate(classes)}
    out = torch.zeros(len(tag_lists), len(classes), dtype=torch.uint8)
    for row, tags in enumerate(tag_lists):
        for tag in tags:
            if tag not in index:
                image = names[row] if names is not None else f"row {row}"
                raise DataError(f"{where}: {image} has the tag {tag!r}, which is not among "
                                f"the classes {list(classes)[:20]}; fix the tag, or train on "
                                f"data that has it.")
            out[row, index[tag]] = 1
    return out


def _split(folder: Path, classes: list[str] | None) -> Samples:
    rows = read_tags(folder / LABELS_CSV)
    if classes is None:
        classes = sorted({t for _, tags in rows for t in tags})
        if not classes:
            raise DataError(f"{folder / LABELS_CSV}: no image has a tag; tag the images.")
    labels = multi_hot([tags for _, tags in rows], classes, str(folder / LABELS_CSV),
                       [path.relative_to(folder) for path, _ in rows])
    return Samples([path for path, _ in rows], labels, classes, 3)


def load_tagged_folder(root: Path, test_split: float = 0.1, seed: int = 0
                       ) -> tuple[Samples, Samples]:
    """Train and test splits of a tagged folder (see the module's docstring); the tags of the
    training split are the classes, in sorted order."""
    from finetune.data.samples import probe
    from finetune.data.sources import holdout_mask

    test_dir = next((root / d for d in ("test", "val") if (root / d / LABELS_CSV).is_file()),
                    None)
    if (root / "train" / LABELS_CSV).is_file() and test_dir is not None:
        train = _split(root / "train", None)
        test = _split(test_dir, train.classes)
        _disjoint(train, test, root)
    elif not (root / LABELS_CSV).is_file():
        raise DataError(f"{root}: train/{LABELS_CSV} but no test/{LABELS_CSV} or "
                        f"val/{LABELS_CSV}; add one, or put a single {LABELS_CSV} in {root} "
                        f"(a tenth is then held out for testing).")
    else:
        data = _split(root, None)
        held = holdout_mask(data.labels, len(data.classes), test_split, seed, at_least_one=True)
        train, test = data.subset(~held), data.subset(held)
    train.channels, train.pixels = probe(train, seed)
    test.channels, test.pixels = train.channels, train.pixels
    return train, test


def _disjoint(train: Samples, test: Samples, root: Path) -> None:
    both = {p.resolve() for p in train.items} & {p.resolve() for p in test.items}
    if both:
        raise DataError(f"{root}: {len(both)} file(s) are in both the training and the test "
                        f"labels.csv, e.g. {min(both)}; test images must not be trained on.")


def as_task(train, test, task: str, source: str):
    """The splits for ``data.task``: ``auto`` keeps what the data is, ``multilabel`` turns
    single labels into one tag each, ``single`` refuses multi-label data."""
    if task not in TASKS:
        raise DataError(f"data.task={task}: valid tasks are {', '.join(TASKS)}.")
    if task == "single" and train.labels.ndim == 2:
        raise DataError(f"{source}: data.task=single, but the data gives images several tags "
                        f"(multi-label); set data.task=multilabel (or auto).")
    if task == "multilabel" and train.labels.ndim == 1:
        k = len(train.classes)
        for split in (train, test):
            split.labels = torch.nn.functional.one_hot(split.labels, k).to(torch.uint8)
    return train, test


def is_multilabel(data) -> bool:
    """Whether a split's labels are multi-hot rows."""
    labels = getattr(data, "labels", None)
    return labels is not None and labels.ndim == 2
