"""Features of a frozen backbone, computed once and cached (the linear probe, kNN, LP-FT and the
backbone sweep read them).

Every process computes the features of its shard of a split (the evaluation loader's), and
the shards are gathered once. The result is stored as safetensors under a name derived from
a key that covers everything that changes the features: the architecture and a digest of its
weights, the data (a digest of the decoded images, or the files' names, sizes and times), the
limits and classes, the transform (size, channels, mean/std, crop, interpolation, augmented
views) and the precision. A file whose key differs, or whose content does not match the
digest stored with it, is recomputed, never trusted.

    <cache>/<split>-<key digest>.safetensors    {"x": float32 (N, D), "y": int64 (N,)}
                                                metadata: the key (JSON) and the content digest
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, pad_across_processes
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from finetune.data import ImageData
from finetune.data.hub import StreamedSplit
from finetune.data.loader import BatchTransform, Data, eval_batches
from finetune.data.samples import Samples
from finetune.errors import ConfigError, TrainingError
from finetune.files import atomic_write
from finetune.models.interface import classifier_name, unwrap

log = logging.getLogger(__name__)
VERSION = 1  # of the cache format and of what the key covers


@dataclass
class Features:
    """One split's features (float32, on the CPU), its labels, and how they were had."""

    x: torch.Tensor
    y: torch.Tensor
    seconds: float  # computing and caching them, or reading them from the cache
    reused: bool  # read from the cache


@contextlib.contextmanager
def headless(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its classifier replaced by an identity: its output is the features the
    classifier reads (timm's pre-logits)."""
    model = unwrap(model)
    if isinstance(model.get_classifier(), tuple):  # timm's distilled models: two heads
        raise ConfigError(f"{type(model).__name__} has two classifiers (a distilled model): "
                          f"finetune.method=linear, knn and lp_ft fit one head on the features; "
                          f"use finetune.method=full or lora with it.")
    name = classifier_name(model)
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"{type(model).__name__}'s classifier ({name}) is a "
                          f"{type(head).__name__}, not a linear layer: finetune.method=linear, "
                          f"knn and lp_ft read the features a linear classifier takes; use "
                          f"finetune.method=full or lora with this model.")
    model.set_submodule(name, nn.Identity(), strict=True)
    try:
        yield model
    finally:
        model.set_submodule(name, head, strict=True)


@torch.no_grad()  # not inference_mode: the probe fits on these tensors with autograd
def extract(model: nn.Module, data: Data, transform: BatchTransform, loader,
            accelerator: Accelerator, views: int = 1, gen: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every image of ``data`` (bad ones skipped with
    ``data.skip_bad_images`` are left out), on every process: held data in the split's order
    (the same on any number of processes), a stream in the order its shards were read.

    ``loader`` is the split's prepared evaluation loader. ``views`` > 1 adds ``views - 1``
    augmented views of each image (``transform``'s training augmentation, drawn from ``gen``),
    rows ``view * N + i`` of the result."""
    raw = unwrap(accelerator.unwrap_model(model)).eval()
    dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    feats, labels, order = [], [], []
    seen = 0
    with headless(raw), accelerator.autocast():
        for idx, images, y, decoded in eval_batches(data, loader, dev):
            if idx is None:  # a stream: this process reads every world-th row
                idx = (torch.arange(seen, seen + len(y), device=dev)) * world + rank
                seen += len(y)
            keep = decoded.bool() if decoded is not None else torch.ones_like(y, dtype=torch.bool)
            for v in range(views):
                x = transform(images) if v == 0 else transform(images, train=True, gen=gen)
                feats.append(raw(x).float().flatten(1)[keep])
                labels.append(y[keep])
                order.append(idx[keep] + v * _rows(data, world))
    if not feats:  # this process read no rows (a stream's shard can be empty)
        dim = raw.get_classifier().in_features
        feats, labels = [torch.zeros(0, dim, device=dev)], [torch.zeros(0, dtype=torch.long,
                                                                        device=dev)]
        order = [torch.zeros(0, dtype=torch.long, device=dev)]
    x, y, _ = _gather(accelerator, torch.cat(feats), torch.cat(labels), torch.cat(order))
    if not len(y):
        raise TrainingError("every image of a split was skipped as bad "
                            "(data.skip_bad_images); check the data.")
    return x.cpu(), y.cpu()


def _rows(data: Data, world: int) -> int:
    """An upper bound of the row numbers of a split, as view offsets."""
    return len(data) + world


def _gather(accelerator: Accelerator, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every process's rows, once each (the evaluation sampler repeats a few to even the
    batches), sorted by their row number."""
    if accelerator.num_processes > 1:
        y, order = y.to(x.device), order.to(x.device)
        x, y, order = (pad_across_processes(t, dim=0, pad_index=-1) for t in (x, y, order))
        x, y, order = accelerator.gather((x, y, order))
        real = order >= 0
        x, y, order = x[real], y[real], order[real]
    order, perm = order.sort(stable=True)
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = order[1:] != order[:-1]
    return x[perm][first], y[perm][first], order[first]


# --- the cache -------------------------------------------------------------------------------

def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of tensors' names, shapes, types and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A digest of the backbone's weights and buffers (the classifier left out)."""
    model = unwrap(model)
    head = classifier_name(model) + "."
    return tensor_digest({k: v for k, v in model.state_dict().items() if not k.startswith(head)})


def data_digest(data: Data) -> str:
    """What identifies a split's images: a digest of the decoded pixels and labels (held
    data), of the files' names, sizes and modification times or the dataset's fingerprint and
    rows (read lazily), or of a stream's description."""
    if isinstance(data, ImageData):
        return tensor_digest({"images": data.images, "labels": data.labels})
    h = hashlib.blake2b(digest_size=20)
    if isinstance(data, Samples):
        h.update(tensor_digest({"labels": data.labels}).encode())
        if isinstance(data.rows, torch.Tensor):  # held images read one at a time
            h.update(tensor_digest({"rows": data.rows}).encode())
        else:  # a Hugging Face dataset's own fingerprint of its content
            h.update(str(getattr(data.rows, "_fingerprint", None)).encode())
        for item in data.items:
            if isinstance(item, Path):
                try:
                    st = item.stat()
                    h.update(f"{item}:{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:  # gone since it was listed: reading it will say so
                    h.update(f"{item}:missing;".encode())
            else:
                h.update(f"{item};".encode())
    elif isinstance(data, StreamedSplit):
        h.update(json.dumps([data.spec, data.length, data.column, data.label, data.classes,
                             str(getattr(data.rows, "_fingerprint", None))]).encode())
    else:
        raise TypeError(f"cannot identify data of type {type(data).__name__}")
    return h.hexdigest()


def cache_file(folder: Path, split: str, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    return Path(folder) / f"{split}-{hashlib.sha256(text.encode()).hexdigest()[:20]}.safetensors"


def read_cached(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached features at ``path`` if its key and content digest hold, else None (said in
    the log: why it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("cached features %s cannot be read (%s); computing them again", path,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    if meta.get("key") != json.dumps(key, sort_keys=True) or set(tensors) != {"x", "y"}:
        log.warning("cached features %s were made for other settings; computing them again",
                    path)
        return None
    if meta.get("digest") != tensor_digest(tensors):
        log.warning("cached features %s do not match their digest (a damaged file); computing "
                    "them again", path)
        return None
    return tensors["x"], tensors["y"]


def write_cached(path: Path, key: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write atomically: a full disk leaves no half-written file (an OutputError)."""
    tensors = {"x": x.contiguous(), "y": y.contiguous()}
    meta = {"key": json.dumps(key, sort_keys=True), "digest": tensor_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def cached_features(folder: Path, split: str, key: dict, accelerator: Accelerator,
                    compute) -> Features:
    """The features of ``split`` from the cache in ``folder``, or ``compute()``d (on every
    process, which gather them) and written there by the main process."""
    path = cache_file(folder, split, key)
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is in the way of the cached features of {split} (a folder, "
                          f"not a file); remove it, or pass another finetune.cache_dir=DIR.")
    start = time.perf_counter()
    found = read_cached(path, key) if accelerator.is_main_process else None
    valid = [found is not None]
    if accelerator.num_processes > 1:
        broadcast_object_list(valid)
        if valid[0] and found is None:
            found = read_cached(path, key)
            if found is None:
                raise ConfigError(f"process {accelerator.process_index} cannot read the cached "
                                  f"features {path} that the main process reads: the cache "
                                  f"folder (finetune.cache_dir) must be shared by every "
                                  f"process.")
    if valid[0] and found is not None:
        seconds = time.perf_counter() - start
        log.info("features of %s read from %s in %.2f s (%d images)", split, path, seconds,
                 len(found[1]))
        return Features(found[0], found[1], seconds, True)
    start = time.perf_counter()
    x, y = compute()
    if accelerator.is_main_process:
        write_cached(path, key, x, y)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    log.info("features of %s computed in %.1f s (%d images, %.0f img/s) and cached in %s",
             split, seconds, len(y), len(y) / max(seconds, 1e-9), path)
    return Features(x, y, seconds, False)
