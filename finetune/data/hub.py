"""Hugging Face datasets (``datasets`` is imported only here, only when used): any image
classification dataset from the hub or its cache, a ``save_to_disk`` folder, parquet files or
a builder such as ``imagefolder`` over a local folder.

Rows are read one at a time with their images still encoded (``Image(decode=False)``), so that
images of any size and mode are decoded, like files, by :func:`finetune.data.images.open_image`
in the loader's workers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.config import DataConfig
from finetune.data.idx import DataError
from finetune.data.images import DATA_FIX, open_image
from finetune.data.samples import GREY_MODES, Samples, encoded, header, probe
from finetune.data.sources import holdout_mask
from finetune.data.workers import or_skip
from finetune.errors import one_line

log = logging.getLogger(__name__)
TEST_SPLITS = ("test", "validation", "val", "valid")
# A streamed local split carries each row's number in this column, so that errors name it.
ROW = "__finetune_row__"


def _saved(root: Path | None) -> bool:
    """Whether ``data.root`` is a folder written by ``save_to_disk``."""
    return root is not None and any((root / f).is_file() for f in
                                    ("dataset_dict.json", "state.json"))


def _empty_saved_split(root: Path) -> str | None:
    """The first split of a ``save_to_disk`` folder saved without rows, which ``datasets``
    cannot load (an IndexError deep inside it)."""
    states = ([root / "state.json"] if (root / "state.json").is_file()
              else sorted(root.glob("*/state.json")))
    for state in states:
        try:
            if not json.loads(state.read_text()).get("_data_files", True):
                return "train" if state.parent == root else state.parent.name
        except (OSError, ValueError, AttributeError):
            return None  # load_from_disk says what is wrong
    return None


def _builder(cfg: DataConfig, root: Path | None) -> tuple[str, str | None, dict]:
    """``load_dataset``'s path, config name and file arguments for ``data.root`` (parquet
    files, or a folder for the ``data.hf_name`` builder) or ``data.hf_name`` on the hub."""
    if root is None:
        return cfg.hf_name, cfg.hf_config, {}
    if root.suffix == ".parquet":
        return "parquet", None, {"data_files": str(root)}
    if any(root.rglob("*.parquet")):
        return "parquet", None, {"data_dir": str(root)}
    return cfg.hf_name, cfg.hf_config, {"data_dir": str(root)}


def local_dataset(root: Path) -> bool:
    """A folder or file ``datasets`` reads without a builder name: ``save_to_disk`` output or
    parquet files."""
    return (_saved(root) or root.suffix == ".parquet"
            or root.is_dir() and any(root.rglob("*.parquet")))


def open_dataset(cfg: DataConfig, all_splits: bool = True) -> tuple[Any, str]:
    """``(DatasetDict, description)`` for ``data.root`` (a ``save_to_disk`` folder, parquet
    files, or a folder for the ``data.hf_name`` builder) or ``data.hf_name`` on the hub."""
    import datasets

    root = Path(cfg.root).expanduser() if cfg.root else None
    try:
        if root is not None and not root.exists():
            raise DataError(f"data.root={cfg.root} does not exist.")
        if all_splits and _saved(root) and (empty := _empty_saved_split(root)) is not None:
            raise DataError(f"data.root={cfg.root}: split '{empty}' has no rows (it was saved "
                            f"empty); add rows to it, or save the dataset without it.")
        if _saved(root):
            ds, where = datasets.load_from_disk(str(root)), f"hf-disk:{root}"
        else:
            path, config, files = _builder(cfg, root)
            ds = datasets.load_dataset(path, config, **files)
            where = (f"hf:{cfg.hf_name}" if root is None else f"hf-parquet:{root}"
                     if path == "parquet" else f"hf:{cfg.hf_name}:{root}")
    except DataError:
        raise
    except Exception as e:
        what = f"data.root={cfg.root}" if root is not None else f"'{cfg.hf_name}'"
        raise DataError(f"could not load Hugging Face dataset {what} (not cached, and the hub "
                        f"is unreachable or refused, or not a dataset: "
                        f"{one_line(e)}).") from None
    if isinstance(ds, datasets.Dataset):  # one split saved on its own
        ds = datasets.DatasetDict({"train": ds})
    return ds, where


def _split(ds: Any, spec: str, where: str) -> Any:
    """A split by name or slice (``train``, ``train[:10%]``, ``test[100:200]``)."""
    from datasets import ReadInstruction

    try:
        instruction = ReadInstruction.from_spec(spec)
        parts = instruction.to_absolute({name: len(split) for name, split in ds.items()})
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(f"{where}: split '{spec}' is not one of {list(ds)} (or a slice of one, "
                        f"e.g. train[:10%]): {one_line(e)}") from None
    if len(parts) != 1:
        raise DataError(f"{where}: split '{spec}' names {len(parts)} splits; name one.")
    part = parts[0]
    if part.to <= part.from_:
        raise DataError(f"{where}: split '{spec}' selects no rows ('{part.splitname}' has "
                        f"{len(ds[part.splitname])}); choose a slice that holds some.")
    return ds[part.splitname].select(range(part.from_, part.to))


def image_column(features: dict, cfg: DataConfig, where: str,
                 option: str = "data.image_column=NAME") -> str:
    """``data.image_column``, else the first Image feature; ``option`` names the setting."""
    import datasets

    image = cfg.image_column or next((k for k, f in features.items()
                                      if isinstance(f, datasets.Image)), None)
    if image in features and not isinstance(features[image], datasets.Image):
        raise DataError(f"{where}: column {image!r} is {type(features[image]).__name__}, not "
                        f"an Image feature (file paths or bytes are cast to one with "
                        f"dataset.cast_column({image!r}, datasets.Image())).")
    if image is None or image not in features:
        described = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items()
                              if k != ROW)
        raise DataError(f"{where}: no image column{f' {image!r}' if image else ''}; columns: "
                        f"{described}. Set {option} (an Image feature).")
    return image


def image_split(cfg: DataConfig, spec: str) -> tuple[Any, str]:
    """``(rows, where)``: split ``spec`` (a name or a slice) of a Hugging Face dataset with its
    image column alone, still encoded (a row read is ``{"bytes", "path"}``); no labels needed
    (``finetune predict --split``)."""
    import datasets

    ds, where = open_dataset(cfg, all_splits=False)  # an empty other split does not matter
    rows = _split(ds, spec, where)
    image = image_column(rows.features, cfg, where, "--image-column NAME")
    return rows.cast_column(image, datasets.Image(decode=False)).select_columns([image]), where


def columns(features: dict, cfg: DataConfig, where: str) -> tuple[str, str]:
    """``(image column, label column)``: ``data.image_column``/``data.label_column``, else the
    first Image feature and the first ClassLabel (or a ``label``/``labels`` column)."""
    import datasets

    def kind(f: Any) -> str:
        return type(f).__name__

    image = image_column(features, cfg, where)
    tags = (k for k, f in features.items()  # a multi-label column, to be refused by name
            if isinstance(getattr(f, "feature", None), datasets.ClassLabel))
    label = cfg.label_column or next(
        (k for k, f in features.items() if isinstance(f, datasets.ClassLabel)),
        next((k for k in ("label", "labels") if k in features), next(tags, None)))
    described = ", ".join(f"{k} ({kind(f)})" for k, f in features.items() if k != ROW)
    if label is None or label not in features:
        raise DataError(f"{where}: no label column{f' {label!r}' if label else ''}; columns: "
                        f"{described}. Set data.label_column=NAME.")
    return image, label


def same_classes(names: list[str], classes: list[str], where: str, spec: str) -> None:
    """A test split must name the training split's classes in the same order: its labels are
    scored as indices into the training split's names."""
    if names != classes:
        raise DataError(f"{where}: the test split '{spec}' has classes {names[:10]}, which "
                        f"differ from the training split's {classes[:10]} (or their order); "
                        f"choose splits whose ClassLabel names match.")


def _no_missing(values: list, where: str, spec: str) -> None:
    """Refuse empty label cells: they would otherwise become a class named "None"."""
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
        raise DataError(f"{where}: split '{spec}' row {missing[0]}{more} has no label (None); "
                        f"drop the unlabelled rows, or choose labelled splits with "
                        f"data.train_split / data.test_split.")


def _list_valued(feature: Any) -> bool:
    """Whether a label column holds a list per image (``Sequence(ClassLabel)``: tags)."""
    return isinstance(feature, list) or type(feature).__name__ in ("Sequence", "List",
                                                                    "LargeList")


def _one_label_per_row(feature: Any, label: str, where: str) -> None:
    """Refuse a list-valued label column on a stream, which would otherwise train as one
    class per combination of tags (held, it is multi-label data: :func:`_tag_labels`)."""
    if _list_valued(feature):
        raise DataError(f"{where}: label column '{label}' holds a list of tags per image "
                        f"(multi-label data), which is read held, not streamed: its tags "
                        f"decide stratified splits up front; use data.streaming=false.")


def _ordered(names: set[str]) -> list[str]:
    """Class names of plain values: integers in numeric order, then names alphabetically."""
    return sorted(names, key=lambda v: (0, int(v), v) if v.isascii() and v.isdigit()
                  else (1, 0, v))


def _tag_labels(split: Any, label: str, classes: list[str] | None, where: str, spec: str
                ) -> tuple[torch.Tensor, list[str]]:
    """Multi-hot labels and tag names of a list-valued column: a ``Sequence(ClassLabel)``'s
    own names, else the distinct values of the training split (integers in numeric order,
    then strings alphabetically)."""
    from finetune.data.tags import multi_hot

    feature = split.features[label]
    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
    values = split[label]
    _no_missing(values, where, spec)
    names = getattr(inner, "names", None)
    if names is not None:  # ClassLabel: integers, checked against the names
        names = list(names)
        if classes is not None:
            same_classes(names, classes, where, spec)
        values = [[names[v] if 0 <= v < len(names) else f"#{v}" for v in tags] for tags in values]
    else:
        values = [[str(v) for v in tags] for tags in values]
        names = classes if classes is not None else _ordered({v for tags in values for v in tags})
    if not names:
        raise DataError(f"{where}: split '{spec}': no image has a tag in column '{label}'.")
    return multi_hot(values, names, f"{where} split '{spec}'"), list(names)


def _labels(split: Any, label: str, classes: list[str] | None, where: str, spec: str
            ) -> tuple[torch.Tensor, list[str]]:
    """Integer labels and class names: a ClassLabel's own names, else the sorted distinct
    values (strings or integers) of the training split."""
    import datasets

    feature = split.features[label]
    if _list_valued(feature):
        return _tag_labels(split, label, classes, where, spec)
    values = split[label]
    _no_missing(values, where, spec)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if classes is not None:
            same_classes(names, classes, where, spec)
        labels = torch.tensor(values, dtype=torch.int64)
        outside = torch.nonzero((labels < 0) | (labels >= len(names))).flatten()
        if len(outside):
            # Hugging Face marks unlabelled rows -1 (e.g. a competition's test split).
            raise DataError(f"{where}: split '{spec}' has rows without a label "
                            f"({int(labels[outside[0]])}) or outside the {len(names)} classes, "
                            f"the first row {int(outside[0])}; choose labelled splits with "
                            f"data.train_split / data.test_split (e.g. validation).")
        return labels, names
    if classes is None:
        classes = _ordered({str(v) for v in values})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} of the test split are not among the "
                        f"training split's classes {classes[:20]}.")
    return torch.tensor([index[str(v)] for v in values], dtype=torch.int64), classes


def tagged_hub(cfg: DataConfig) -> bool:
    """Whether the dataset's label column holds lists of tags (nothing decoded)."""
    ds, where = open_dataset(cfg)
    features = _split(ds, cfg.train_split, where).features
    return _list_valued(features[columns(features, cfg, where)[1]])


def load_hub(cfg: DataConfig, seed: int = 0) -> tuple[Samples, Samples, str]:
    """Train and test splits of a Hugging Face image-classification dataset, read row by row
    (the image column alone, still encoded). Without a test split, a tenth of each class of the
    training split is held out (drawn with ``seed``)."""
    import datasets

    ds, where = open_dataset(cfg)
    train = _split(ds, cfg.train_split, where)
    test_spec = cfg.test_split or next((s for s in TEST_SPLITS if s in ds), None)
    image, label = columns(train.features, cfg, where)
    train = train.cast_column(image, datasets.Image(decode=False))
    train_labels, classes = _labels(train, label, None, where, cfg.train_split)
    train = train.select_columns([image])  # a row read is then its image alone
    if test_spec is None:
        held = holdout_mask(train_labels, len(classes), 0.1, seed, at_least_one=True)
        log.info("%s has no test split (splits: %s): holding out %d of %d training rows, a "
                 "seeded tenth of each class", where, list(ds), int(held.sum()), len(train))
        rows = list(range(len(train)))
        train_s = Samples(rows, train_labels, classes, 3, train, image, split=cfg.train_split)
        tr, te = train_s.subset(~held), train_s.subset(held)
        test_spec = "held-out"
    else:
        test = _split(ds, test_spec, where)
        if columns(test.features, cfg, where) != (image, label):
            raise DataError(f"{where}: split '{test_spec}' names its image and label columns "
                            f"{columns(test.features, cfg, where)}, the training split "
                            f"{(image, label)}; set data.image_column / data.label_column.")
        test = test.cast_column(image, datasets.Image(decode=False))
        test_labels, _ = _labels(test, label, classes, where, test_spec)
        test = test.select_columns([image])
        tr = Samples(list(range(len(train))), train_labels, classes, 3, train, image,
                     split=cfg.train_split)
        te = Samples(list(range(len(test))), test_labels, classes, 3, test, image,
                     split=test_spec)
    tr.channels, tr.pixels = probe(tr, seed)
    te.channels, te.pixels = tr.channels, tr.pixels
    splits = (cfg.train_split, test_spec)
    return tr, te, where + (f" ({'/'.join(splits)})" if splits != ("train", "test") else "")


@dataclass
class StreamedSplit:
    """A split iterated, never held (``data.streaming=true``): a Hugging Face IterableDataset
    whose ``column`` holds undecoded images, with ``length`` rows (known up front: the steps of
    an epoch must be)."""

    rows: Any
    column: str
    label: str
    classes: list[str]
    channels: int
    length: int
    # Cut to a limit by IterableDataset.take: DataLoader workers would each take a share of
    # their own shards, so such a split is evaluated in the process itself.
    taken: bool = False
    spec: str = ""  # the split's name or slice, as errors name it
    # Every row's class where it can be read without the images (a local dataset), else
    # None (a hub stream): what the held path's check of classes without training images needs.
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def name(self, row: dict, where: str) -> str:
        """A row as errors name it: its number in the split where known (a local dataset's
        rows carry it), else its place ``where`` (e.g. a batch's third row)."""
        if ROW in row:
            return f"split '{self.spec}' row {row[ROW]}"
        return f"split '{self.spec}', {where}"

    def number(self, row: dict) -> int:
        """The row's number in the split, -1 where it is not known (a hub stream)."""
        return row.get(ROW, -1)

    def open(self, row: dict, need: int, name: str):
        """The row's image decoded in this split's channel mode; errors say ``name``."""
        return open_image(encoded(row[self.column], name), self.channels, need, name, DATA_FIX)

    def label_of(self, row: dict, name: str = "") -> int:
        """The row's class index, checked as the held path checks its labels."""
        value, n = row[self.label], len(self.classes)
        name = name or self.name(row, "a row read")
        if value is None:
            raise DataError(f"{name} has no label (None); drop the unlabelled rows, or choose "
                            f"labelled splits with data.train_split / data.test_split.")
        if not isinstance(value, int) or not 0 <= value < n:
            unlabelled = " (a row without a label)" if value == -1 else ""
            raise DataError(f"{name}: label {value}{unlabelled} is not one of the {n} classes "
                            f"0..{n - 1}; fix the row, or choose labelled splits with "
                            f"data.train_split / data.test_split.")
        return value

    def node(self, rank: int, world_size: int) -> Any:
        """This process's rows: every ``world_size``-th example (equal shares, +-1)."""
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self.rows, rank, world_size, strategy="examples")


def _streamed(cfg: DataConfig, spec: str, where: str, limit: int | None
              ) -> tuple[Any, int, bool, Any]:
    """``(IterableDataset, rows, taken, held)`` of split ``spec``, its first ``limit`` rows when
    given: a local dataset's split as shards (``held``: the split itself, whose columns can be
    read without its images), or the hub's split streamed (its row count from the dataset
    card, or the limit; ``held`` None)."""
    import datasets

    root = Path(cfg.root).expanduser() if cfg.root else None
    try:
        if _saved(root):
            ds, _ = open_dataset(cfg)
            split = _split(ds, spec, where)
            split = split.select(range(min(limit or len(split), len(split))))
            split = split.add_column(ROW, np.arange(len(split)))  # errors name the row
            shards = max(1, min(len(split), 64))
            return split.to_iterable_dataset(num_shards=shards), len(split), False, split
        path, config, files = _builder(cfg, root)
        rows = datasets.load_dataset(path, config, split=spec, streaming=True, **files)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not stream split '{spec}' of {where}: {one_line(e)}") from None
    info = rows.info.splits.get(spec.split("[")[0]) if rows.info.splits else None
    known = info.num_examples if info is not None and "[" not in spec else None
    if limit is not None and (not known or limit < known):
        return rows.take(limit), limit, True, None  # fewer rows: evaluation says so
    if not known:
        raise DataError(f"{where}: the number of rows of split '{spec}' is not known up front "
                        f"(the epoch's steps must be); set data.train_limit / data.eval_limit, "
                        f"or use data.streaming=false.")
    return rows, known, False, None


def _class_column(held: Any, label: str, classes: int) -> torch.Tensor | None:
    """The valid class indices of a local split's label column (read alone, no image decoded);
    None for a hub stream. Rows without a valid label are refused when they are read."""
    if held is None:
        return None
    values = held[label]
    return torch.tensor([v for v in values if isinstance(v, int) and 0 <= v < classes],
                        dtype=torch.int64)


def load_hub_streaming(cfg: DataConfig) -> tuple[StreamedSplit, StreamedSplit, str]:
    """Train and test splits iterated without being held (``data.streaming=true``)."""
    import datasets

    where = f"hf-stream:{cfg.root or cfg.hf_name}"
    if cfg.test_split is None:
        raise DataError(f"{where}: data.streaming=true needs data.test_split=NAME (a held-out "
                        f"split cannot be drawn from a stream).")
    out = []
    for spec, limit in ((cfg.train_split, cfg.train_limit), (cfg.test_split, cfg.eval_limit)):
        rows, length, taken, held = _streamed(cfg, spec, where, limit)
        features = rows.features
        if features is None:
            raise DataError(f"{where}: split '{spec}' does not declare its features; name "
                            f"them in the dataset card or use data.streaming=false.")
        image, label = columns(features, cfg, where)
        _one_label_per_row(features[label], label, where)
        if not isinstance(features[label], datasets.ClassLabel):
            raise DataError(f"{where}: streaming needs a ClassLabel label column (the class "
                            f"names must be known before the first row); '{label}' is "
                            f"{type(features[label]).__name__}.")
        rows = rows.cast_column(image, datasets.Image(decode=False))
        names = list(features[label].names)
        out.append(StreamedSplit(rows, image, label, names, 3, length, taken, spec,
                                 _class_column(held, label, len(names))))
    train, test = out
    same_classes(test.classes, train.classes, where, test.spec)
    # The channel mode from the first rows' headers: grey when every one is.
    grey = all(header(lambda row=row: encoded(row[train.column], ""))[0] in GREY_MODES
               for row in train.rows.take(64))
    train.channels = test.channels = 1 if grey else 3
    return train, test, where


def streamed_head(split: StreamedSplit, n: int, image_size: int, skip_bad: bool = False
                  ) -> torch.Tensor:
    """The first ``n`` rows' images (shorter side resized, center square), uint8, bad ones
    left out with ``skip_bad`` (else the first stops the run): what the data's mean/std are
    measured on."""
    from finetune.data.images import eval_transform

    transform = eval_transform(image_size, 1.0, "bilinear")
    images = [or_skip(lambda row=row, i=i: split.open(
        row, image_size, split.name(row, f"its row {i + 1}")), skip_bad)
              for i, row in enumerate(split.rows.take(n))]
    return torch.stack([transform(image) for image in images if image is not None])
