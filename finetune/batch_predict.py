"""``finetune predict MODEL IMAGES... --out FILE``: prediction at scale.

The images (files and folders, any number) are decoded and preprocessed by DataLoader workers,
one image at a time exactly as :meth:`Predictor.logits` does, and the model runs on batches.
Each batch's rows are appended to ``FILE`` (``.csv`` or ``.jsonl``, in the images' order) and
flushed before the next: memory stays flat in the number of images, and a job that is killed
leaves a file whose complete lines are a valid prefix. ``--resume`` checks that prefix against
the images and continues after it, so the finished file equals an uninterrupted run's. An
image that cannot be read gets a row with its ``error`` (and the job goes on). A row holds the
``--top-k`` classes and their probabilities, or for a multi-label model the labels (tags) over
their thresholds (``model.json``) and every tag's probability (``probability_<tag>``).

The images may also be a Hugging Face split (``--split``: :class:`HubImages`, rows named
``split[i]``). Under a launcher (``torchrun``, ``accelerate launch``) each of N processes takes
every N-th batch on its own device; after each round of N batches process 0 gathers their
rows and appends them in the images' order, so the file is the one a single process writes
and a killed job still leaves a valid prefix.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finetune.data.images import open_image
from finetune.data.tags import TAG_SEPARATORS
from finetune.errors import ConfigError, DataError, OutputError
from finetune.files import atomic_write_text, sha256_file, write_failure
from finetune.inference import Predictor, over_thresholds, probability_pairs, top_classes

log = logging.getLogger(__name__)
FORMATS = (".csv", ".jsonl")
# File names that are not UTF-8 (os.fsdecode's surrogates) are written back as their bytes.
ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


class HubImages:
    """The images of a Hugging Face split (``data.hub.image_split``), decoded one by one in the
    model's channel mode, as a sequence ``_Images`` reads like a list of files."""

    def __init__(self, rows, spec: str, channels: int) -> None:
        self.rows, self.spec, self.channels = rows, spec, channels
        self.column = rows.column_names[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        cell = self.rows[i][self.column]
        if cell is None or not cell.get("bytes"):
            raise DataError(f"{self.name(i)}: no image in this row; fill or drop it (--out "
                            f"FILE records it as an error and goes on)")
        return open_image(cell["bytes"], self.channels, name=self.name(i),
                          fix="Fix or drop the row.")

    def name(self, i: int) -> str:
        return f"{self.spec}[{i}]"


class _Images(Dataset):
    """Image ``indices[k]`` of ``images`` (files, or :class:`HubImages`) as the model's input
    views (V, C, H, W), or the reason it cannot be read."""

    def __init__(self, predictor: Predictor, images, indices: list[int], tta: bool) -> None:
        self.predictor, self.images, self.indices, self.tta = predictor, images, indices, tta

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.predictor.views(self.images[self.indices[k]], self.tta), None
        except (DataError, OSError, ValueError) as e:
            return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def _collate(items: list) -> list:
    return items  # a batch of (views or None, error): the unreadable stay in their place


@dataclass(frozen=True)
class Columns:
    """What a row holds: a single-label model's ``top_k`` classes (``width`` of them, fewer
    where the model has fewer classes), or a multi-label model's tags over their
    ``thresholds`` and every class's probability (``tags``: the class names)."""

    top_k: int
    width: int
    tags: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = ()

    @classmethod
    def of(cls, predictor: Predictor, top_k: int) -> Columns:
        if predictor.multilabel:
            return cls(top_k, len(predictor.class_names), tuple(predictor.class_names),
                       tuple(predictor.meta["thresholds"]))
        return cls(top_k, min(top_k, len(predictor.class_names)))

    def header(self) -> list[str]:
        if self.tags:
            return ["file", "labels", *(f"probability_{t}" for t in self.tags), "error"]
        return ["file", *(f"{kind}_{k}" for k in range(1, self.top_k + 1)
                          for kind in ("class", "probability")), "error"]

    def jsonl(self, f: str, p: list[tuple[str, float]] | None, e: str | None) -> str:
        if not self.tags:
            return json.dumps({"file": f, "top_k": None if p is None else probability_pairs(p),
                               "error": e})
        return json.dumps({"file": f, "labels": None if p is None else probability_pairs(
                               over_thresholds(p, self.thresholds)),
                           "probabilities": None if p is None else {c: round(v, 6)
                                                                    for c, v in p},
                           "error": e})

    def cells(self, p: list[tuple[str, float]] | None) -> list[str]:
        if self.tags:
            return ["", *[""] * self.width] if not p else [
                " ".join(c for c, _ in over_thresholds(p, self.thresholds)),
                *(f"{v:.6f}" for _, v in p)]
        cells = [x for c, v in p for x in (c, f"{v:.6f}")] if p else []
        return [*cells, *[""] * (2 * self.top_k - len(cells))]

    def check(self, row: dict) -> None:
        """A JSON line's classes are this command's (ValueError otherwise)."""
        held = row["probabilities"] if self.tags else row["top_k"]
        if held is not None and len(held) != self.width:
            raise ValueError(f"its rows do not hold this model's {self.width} classes"
                             if self.tags else
                             f"its rows do not hold --top-k {self.top_k}'s {self.width} classes")


def format_rows(files: list[str], probs: list[list[tuple[str, float]] | None],
                errors: list[str | None], suffix: str, columns: Columns) -> str:
    """Lines of the output for these images, in the format of ``suffix``."""
    if suffix == ".jsonl":
        return "".join(columns.jsonl(f, p, e) + "\n"
                       for f, p, e in zip(files, probs, errors, strict=True))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    for f, p, e in zip(files, probs, errors, strict=True):
        writer.writerow([f, *columns.cells(p), e or ""])
    return text.getvalue()


def _csv_text(rows: list[list[str]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def complete_csv(text: str, columns: Columns) -> tuple[list[str], str]:
    """The files of a CSV output's complete rows, and the text they fill (a killed job's cut
    last row left out). Raises ValueError when it is not this command's output."""
    head = _csv_text([columns.header()])
    if len(text) < len(head) and head.startswith(text):
        return [], ""  # nothing yet, or a cut header: it is written again
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if rows[0] != columns.header():
        raise ValueError("its header is not this model's tags" if columns.tags else
                         f"its header is not --top-k {columns.top_k}'s")
    while len(rows) > 1 and not text.startswith(_csv_text(rows)):
        rows.pop()  # a cut last row (quoted new lines in names included)
    return [r[0] for r in rows[1:]], _csv_text(rows)


def complete_jsonl(text: str, columns: Columns) -> tuple[list[str], str]:
    """As :func:`complete_csv` for JSON lines (which escape every new line in a name)."""
    lines = text.split("\n")[:-1]  # after the last new line: a cut row, or nothing
    rows = [json.loads(line) for line in lines]
    for row in rows:
        columns.check(row)
    return [r["file"] for r in rows], "".join(line + "\n" for line in lines)


def start_output(out: Path, files: list[str], resume: bool, columns: Columns,
                 settings: dict | None = None) -> int:
    """Checks ``out`` and returns how many images it already holds, its cut last row removed
    (0: a new file, with the CSV header written)."""
    suffix = out.suffix.lower()
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name a .csv or .jsonl file.")
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: write .csv or .jsonl (the format follows the suffix).")
    if out.exists() and not resume:
        raise ConfigError(f"--out {out} exists: pass --resume to continue it, or remove it.")
    spaced = [t for t in columns.tags if TAG_SEPARATORS.search(t)]
    if suffix == ".csv" and spaced:  # the labels cell separates tags as labels.csv does
        raise ConfigError(f"--out {out}: the model's tag {spaced[0]!r} holds a space or comma, "
                          f"which a CSV labels cell separates tags by; write .jsonl instead.")
    done, kept = [], ""
    if out.exists():
        text = out.read_bytes().decode(**ENCODING)
        read = complete_jsonl if suffix == ".jsonl" else complete_csv
        try:
            done, kept = read(text, columns)
        except (ValueError, KeyError, TypeError, IndexError, csv.Error) as e:
            raise ConfigError(f"--resume: {out} is not a predictions file of this command "
                              f"({e or type(e).__name__}); remove it to start over.") from None
        if done != files[:len(done)]:
            raise ConfigError(f"--resume: {out} holds predictions for other images than these "
                              f"(in this order); pass the same images, or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        check_settings(out, settings, resume)
    with open(out, "r+" if out.exists() else "w", newline="", **ENCODING) as f:
        f.truncate(len(kept.encode(**ENCODING)))  # validated first, then cut
        if suffix == ".csv" and not kept:
            f.seek(0)
            f.write(_csv_text([columns.header()]))
    return len(done)


def settings_file(out: Path) -> Path:
    """Beside ``out``: the model and options that wrote it, which ``--resume`` must match."""
    return out.with_name(out.name + ".settings.json")


def check_settings(out: Path, settings: dict, resume: bool) -> None:
    """On a new file, record ``settings``; on ``--resume``, refuse other ones."""
    path = settings_file(out)
    if not resume or not out.exists():
        atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {out} has no readable {path.name} beside it to say which "
                          f"model and options wrote it; remove {out} to start over.") from None
    differ = [k for k in settings if saved.get(k) != settings[k]]
    if differ:
        raise ConfigError(f"--resume: {out} was written with other {', '.join(differ)} "
                          f"({', '.join(f'{k}={saved.get(k)!r}' for k in differ)}); resume it "
                          f"with the same model and options, or remove it.")


def predict_to_file(predictor: Predictor, images, names: list[str], out: Path, *,
                    top_k: int = 3, tta: bool = False, batch_size: int = 64, workers: int = 2,
                    resume: bool = False, state: PartialState | None = None,
                    weights: Path | None = None) -> dict:
    """Write the top-k predictions of ``images`` (files, or :class:`HubImages`; a multi-label
    model: the tags over their thresholds and every tag's probability), rows named
    ``names``, to ``out``, on the processes of ``state``; returns counts (images written now,
    already there, unreadable). ``weights`` (a run folder or its weights file): their SHA-256
    is recorded beside ``out`` with ``tta``, which ``--resume`` checks."""
    if workers < 0:
        raise ConfigError(f"--workers {workers}: a number of DataLoader workers >= 0.")
    if tta:  # before any file is written, not as an error on every row
        predictor.check_tta()
    state = state or PartialState()
    try:
        columns = Columns.of(predictor, top_k)
        start = _shared_start(out, names, resume, columns, state, weights, tta)
        return _stream(predictor, images, names, out, start, columns, tta, batch_size, workers,
                       state)
    except OSError as e:  # a full disk, a read-only folder: one line
        reason = write_failure(e)
        if reason is None:
            raise
        raise OutputError(f"could not write {out}: {reason}. The rows written before stay: "
                          f"free space and run the same command with --resume.") from None


def _shared_start(out: Path, names: list[str], resume: bool, columns: Columns,
                  state: PartialState, weights: Path | None, tta: bool) -> int:
    """:func:`start_output` on process 0 (which alone hashes the weights), its answer (or
    refusal) shared with every process."""
    answer: list = [None]
    if state.is_main_process:
        try:
            settings = None if weights is None else {"model_sha256": sha256_file(
                weights / "model.safetensors" if weights.is_dir() else weights), "tta": tta}
            answer = [start_output(out, names, resume, columns, settings)]
        except (ConfigError, OSError) as e:  # every process stops with it, none waits
            answer = [e]
    if state.num_processes > 1:
        broadcast_object_list(answer)
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


def _stream(predictor: Predictor, images, names: list[str], out: Path, start: int,
            columns: Columns, tta: bool, batch_size: int, workers: int, state: PartialState
            ) -> dict:
    """Batch ``b`` of the images after ``start`` is predicted by process ``b % N``; round by
    round, process 0 appends the N batches' rows in order."""
    rank, world = state.process_index, state.num_processes
    batches = math.ceil((len(names) - start) / batch_size)
    mine = [j for b in range(rank, batches, world)
            for j in range(start + b * batch_size, min(start + (b + 1) * batch_size, len(names)))]
    loader = iter(DataLoader(_Images(predictor, images, mine, tta), batch_size=batch_size,
                             num_workers=workers, collate_fn=_collate))
    bad, suffix, main = 0, out.suffix.lower(), state.is_main_process
    with (open(out, "a", newline="", **ENCODING) if main else nullcontext()) as f, \
            tqdm(total=len(names), initial=start, unit="img", desc="predict",
                 disable=not main) as bar:
        for first in range(0, batches, world):
            part = ("", 0)
            if first + rank < batches:
                b = start + (first + rank) * batch_size
                part = _rows(predictor, next(loader), names[b:b + batch_size], suffix, columns)
            parts = gather_object([part]) if world > 1 else [part]
            bad += sum(n for _, n in parts)
            if main:
                f.write("".join(text for text, _ in parts))
                f.flush()  # a killed job leaves every finished round
                bar.update(min(world * batch_size, len(names) - start - first * batch_size))
        if main:
            os.fsync(f.fileno())
    if bad and main:
        log.warning("%d of %d images could not be read; their rows name the error", bad,
                    len(names) - start)
    return {"written": len(names) - start, "already": start, "unreadable": bad}


def _rows(predictor: Predictor, batch: list, names: list[str], suffix: str, columns: Columns
          ) -> tuple[str, int]:
    """One batch's output lines, and how many of its images could not be read."""
    probs = iter(_scored(predictor, [v for v, _ in batch if v is not None], columns))
    results = [None if v is None else next(probs) for v, _ in batch]
    errors = [e for _, e in batch]
    return (format_rows(names, results, errors, suffix, columns),
            sum(e is not None for e in errors))


@torch.inference_mode()
def _scored(predictor: Predictor, views: list[torch.Tensor], columns: Columns
            ) -> list[list[tuple[str, float]]]:
    """Each image's top-k ``(class, probability)``, or (multi-label) every class's."""
    if not views:
        return []
    views = list(torch.stack(views).to(predictor.device).unbind(1))  # V of (N, C, H, W)
    if columns.tags:
        probs = predictor.tag_probs(views).tolist()
        return [list(zip(columns.tags, row, strict=True)) for row in probs]
    return top_classes(predictor.log_probs(views).exp(), predictor.class_names, columns.top_k)

