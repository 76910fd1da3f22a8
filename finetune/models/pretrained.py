"""Pretrained weights: fetch a state dict, adapt input channels and classifier, load it.

Sources (``model.weights``):
- ``None``: timm's default weights for a ``timm:`` model, else torchvision's;
- ``"torchvision"`` / ``"torchvision:TAG"``: torchvision's ImageNet weights (``TAG``:
  ``IMAGENET1K_V1`` for the lecture's models, ``DEFAULT`` for ``tv:`` models), from the torch
  hub cache or downloaded;
- ``"timm"`` / ``"timm:NAME[.TAG]"``: timm's weights on the Hugging Face hub (its cache first;
  ``HF_HUB_OFFLINE=1`` is respected);
- a path to a ``.safetensors`` file, a ``.pth``/``.pt``/``.bin`` state dict (loaded with
  ``weights_only=True``: tensors only, never pickled code), or a folder holding
  ``model.safetensors`` (+ ``config.json``) as timm and finetune save them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from torch import nn

from finetune.config import MAX_IMAGE_SIZE
from finetune.data.images import INTERPOLATIONS
from finetune.errors import ExportError, FinetuneError, WeightsError, first_line, one_line
from finetune.fields import (
    MAX_CHANS,
    MEAN_RANGE,
    STD_RANGE,
    check_fields,
    integer,
    is_int,
    number,
    numbers,
    one_of,
    read_json_object,
)
from finetune.models.backbones import (
    TIMM,
    TV,
    create_timm,
    source_of,
    timm_cfg,
    tv_cfg,
    tv_weights_cfg,
)
from finetune.models.interface import classifier_name
from finetune.models.registry import IMAGENET_MEAN, IMAGENET_STD, get_pretrained_cfg, list_models

log = logging.getLogger(__name__)

_FIX = ("Fix: pass a local state dict with model.weights=PATH (.safetensors or .pth, torchvision "
        "or timm layout), or train from scratch with model.pretrained=false.")


@dataclass
class LoadedWeights:
    source: str  # human-readable origin, stored in model.json
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str]  # what was adapted
    # The evaluation crop and interpolation the weights were made with ({}: not known).
    preprocessing: dict = field(default_factory=dict)


def weights_cfg(name: str) -> dict:
    """The registered ``pretrained_cfg`` of ``name``, refusing a model without ImageNet weights."""
    cfg = get_pretrained_cfg(name)
    if source_of(name) == "timm":
        raise WeightsError(f"torchvision's weights do not fit timm's {name}: use timm's "
                           f"(model.weights unset, or timm:NAME.TAG), or torchvision's model "
                           f"as tv:NAME.")
    if not cfg.get("tv_weights"):
        known = [n for n in list_models() if get_pretrained_cfg(n)["tv_weights"]]
        raise WeightsError(f"no pretrained weights are known for model '{name}'; models with "
                           f"known weights: {', '.join(known)}. {_FIX}")
    return cfg


def channel_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean or std for ``in_chans`` channels: averaged for 1, cycled for more."""
    if in_chans == len(values):
        return tuple(values)
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP, torch.compile and some trainers wrap the model; their checkpoints carry the prefix.
    for prefix in ("module.", "_orig_mod.", "model."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors file or a ``weights_only`` torch checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist. {_FIX}")
    if path.suffix == ".safetensors":
        state_dict = load_safetensors(path)
    else:
        state_dict = _load_torch_file(path)
        # Training checkpoints often nest the weights.
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise WeightsError(f"'{path}' does not hold a state dict (a mapping of names to tensors).")
    if path.suffix != ".safetensors":  # load_safetensors checked its values
        check_values(path, state_dict)
    return _strip_prefixes(state_dict)


# --- weights files, opened defensively: a damaged or mislabelled file says what it holds -------

_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # how torch.save's files start (zip, legacy pickle)
_TORCH_KINDS = {"zip": "a zip archive", "pickle": "a pickle"}


def _head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(9)


def _kind(head: bytes) -> str:
    """What a weights file holds, from its first bytes: "empty", "zip", "pickle",
    "safetensors" (an 8-byte header length, then the JSON header) or "other"."""
    if not head:
        return "empty"
    if head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP):
        return "zip"
    if head.startswith(_PICKLE) and len(head) > 1 and 2 <= head[1] <= 5:  # pickle protocol
        return "pickle"
    return "other"


def load_safetensors(path: Path, error: type[FinetuneError] = WeightsError,
                     fix: str | None = None) -> dict[str, torch.Tensor]:
    """safetensors' ``load_file``; a file it refuses is ``error``: one line saying what the
    file holds, then ``fix`` (None: model.weights' advice, and to rename torch.save's files)."""
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except SafetensorError as e:
        if fix is None:
            rename = "; rename it to .pth" if _kind(_head(path)) in _TORCH_KINDS else ""
            fix = f"{rename}. {_FIX}"
        else:
            fix = f"; {fix}"
        raise error(f"{path}: not a readable safetensors file "
                    f"({_safetensors_problem(path, e)}){fix}") from None
    check_values(path, state, error, fix)
    return state


def check_values(path: Path, state: dict, error: type[FinetuneError] = WeightsError,
                 fix: str | None = None) -> None:
    """Weights are finite floating-point numbers (a step counter may be an integer): an
    integer or non-finite tensor is ``error`` naming the file and the tensor."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or name.endswith("num_batches_tracked"):
            continue
        if not (tensor.is_floating_point() or tensor.is_complex()):
            problem = f"holds {name} as {str(tensor.dtype).removeprefix('torch.')}, not " \
                      f"floating-point weights"
        elif not bool(torch.isfinite(tensor).all()):
            problem = f"holds non-finite values (NaN or inf) in {name}"
        else:
            continue
        raise error(f"{path} {problem}; " + (fix or f"these are not usable weights. {_FIX}"))


def _safetensors_problem(path: Path, e: SafetensorError) -> str:
    """Why safetensors refused ``path``: empty, torch.save's format, or cut short (its header
    or its tensors need more bytes than the file has); else the library's own words."""
    size, head = path.stat().st_size, _head(path)
    kind = _kind(head)
    if kind in _TORCH_KINDS:
        return f"it is {_TORCH_KINDS[kind]} as torch.save writes"
    if kind == "empty" or size < 8:
        return "it is empty" if kind == "empty" else f"it is truncated: {size} bytes"
    if kind == "other":
        return f"no safetensors header: it starts with bytes {head[:8].hex(' ')}"
    length = struct.unpack("<Q", head[:8])[0]
    if length > size - 8:
        return f"it is truncated: its header alone needs {length + 8} bytes, the file has {size}"
    with path.open("rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not JSON naming tensors"
    if 8 + length + end > size:
        return f"it is truncated: its tensors need {8 + length + end} bytes, the file has {size}"
    return first_line(e)


def _load_torch_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file that holds what torch.save writes (a zip
    archive or a pickle); anything else, or pickled code, is a one-line :class:`WeightsError`."""
    head = _head(path)
    kind = _kind(head)
    if kind == "empty":
        raise WeightsError(f"{path}: not a torch checkpoint (it is empty). {_FIX}")
    if kind == "safetensors":
        raise WeightsError(f"{path}: not a torch checkpoint (it is a safetensors file; rename it "
                           f"to .safetensors).")
    if kind == "other":
        raise WeightsError(f"{path}: not a torch checkpoint (torch.save writes a zip archive or "
                           f"a pickle; it starts with bytes {head[:8].hex(' ')}). {_FIX}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"refused to load '{path}': it holds pickled Python objects, not only tensors "
            f"(only weights_only=True loading is allowed). Save a plain state dict with "
            f"torch.save(model.state_dict(), PATH) or use .safetensors."
        ) from None
    except Exception as e:  # torch's zip reader and unpickler raise many kinds
        said = (first_line(e) or type(e).__name__).partition(". ")[0]
        raise WeightsError(f"{path}: not a readable torch checkpoint (a damaged or truncated "
                           f"{_TORCH_KINDS[kind].removeprefix('a ')}: torch.load says {said}). "
                           f"{_FIX}") from None


@dataclass
class Fetched:
    """Pretrained weights and what is known about them."""

    state_dict: dict[str, torch.Tensor]
    source: str  # human-readable origin, stored in model.json
    # The weights' own pretrained config as far as known (mean, std, crop_pct, interpolation,
    # input_size, num_classes): torchvision's weights transforms, timm's config of the tag, or
    # the config.json (timm) / model.json (finetune) beside a local file; {} for a bare file.
    cfg: dict = field(default_factory=dict)


def _fetch_torchvision(name: str, enum: str, tag: str) -> Fetched:
    from torchvision.models import get_weight

    try:
        weights = get_weight(f"{enum}.{tag}")
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights '{enum}.{tag}' for {name}; "
                           f"try model.weights=torchvision:IMAGENET1K_V1.") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"could not load ImageNet weights for {name} ({enum}.{tag}): not in "
            f"the torch hub cache ({cached}) and the download from {weights.url} failed "
            f"({type(e).__name__}: {e}). {_FIX} To use these exact weights offline, copy "
            f"{Path(weights.url).name} to {cached.parent}/ or pass model.weights=PATH."
        ) from None
    return Fetched(state_dict, f"torchvision:{enum}.{weights.name}", tv_cfg(weights))


def _fetch_timm(hub_name: str) -> Fetched:
    """timm's weights ``hub_name`` (``NAME.TAG`` or ``owner/repo``) from the Hugging Face cache,
    else the hub (``HF_HUB_OFFLINE=1`` forbids that), else its URL through the torch hub."""
    from huggingface_hub import hf_hub_download

    bare = hub_name.removeprefix("timm/")
    cfg = timm_cfg(bare) if "/" not in bare else {}
    if cfg and not cfg.get("hf_hub_id") and cfg.get("url"):  # older weights: a URL only
        return _fetch_url(cfg["url"], bare, cfg)
    repo = cfg.get("hf_hub_id") or (hub_name if "/" in hub_name else f"timm/{hub_name}")
    filename = cfg.get("hf_hub_filename") or "model.safetensors"
    try:
        path = hf_hub_download(repo, filename, local_files_only=True)
    except Exception:
        log.info("timm weights %s not cached; trying the Hugging Face hub", repo)
        try:
            path = hf_hub_download(repo, filename)
        except Exception as e:
            raise WeightsError(
                f"could not load timm weights '{repo}': not in the Hugging Face cache and the "
                f"hub download failed ({one_line(e)}). {_FIX}"
            ) from None
    return Fetched(read_state_dict(path), f"timm:{repo}", _weights_cfg(cfg))


def _fetch_url(url: str, name: str, cfg: dict) -> Fetched:
    try:
        state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu",
                                                        weights_only=True, progress=False)
    except Exception as e:
        raise WeightsError(f"could not load timm weights {name} from {url} (not in the torch "
                           f"hub cache, download failed: {type(e).__name__}: {e}). {_FIX}"
                           ) from None
    return Fetched(_strip_prefixes(state_dict), f"timm:{name}", _weights_cfg(cfg))


def _weights_cfg(cfg: dict) -> dict:
    keys = ("mean", "std", "crop_pct", "interpolation", "input_size", "num_classes")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def _input_chans(cfg: dict) -> int | None:
    size = cfg.get("input_size")
    return size[0] if isinstance(size, list) and size and is_int(size[0]) else None


def _input_size(v: Any, _: dict) -> str | None:
    ok = (isinstance(v, list) and len(v) == 3 and all(is_int(x) for x in v)
          and 1 <= v[0] <= MAX_CHANS and all(1 <= x <= MAX_IMAGE_SIZE for x in v[1:]))
    return None if ok else (f"[channels, height, width]: channels from 1 to {MAX_CHANS}, sides "
                            f"from 1 to {MAX_IMAGE_SIZE}")


# --- timm's config.json beside weights, checked field by field (finetune.fields) -------------

# What finetune reads of timm's config.json (the weights' preprocessing), and what it must be.
TIMM_CONFIG_CHECKS = {
    "num_classes": integer(1),
    "pretrained_cfg": {
        "input_size": _input_size,
        "mean": numbers(*MEAN_RANGE, _input_chans, "channel: input_size[0]"),
        "std": numbers(*STD_RANGE, _input_chans, "channel: input_size[0]"),
        "crop_pct": number(0, 1, lo_open=True),
        "interpolation": one_of(tuple(INTERPOLATIONS)),
        "num_classes": integer(1),
    },
}


def read_timm_config(config: Path) -> dict:
    """The weights' preprocessing from timm's ``config.json`` beside them (its
    ``pretrained_cfg``, and ``num_classes``), every field read checked."""
    fix = "fix or remove it."
    data = read_json_object(config, WeightsError, fix)
    check_fields(config, data, TIMM_CONFIG_CHECKS, WeightsError, fix)
    return _weights_cfg({**data.get("pretrained_cfg", {}),
                         **({"num_classes": data["num_classes"]} if "num_classes" in data
                            else {})})


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_local(path: Path) -> Fetched:
    """A weights file, or a folder with ``model.safetensors`` (or ``pytorch_model.bin``) as
    timm and finetune save them; a ``config.json`` (timm) beside says how they were made."""
    if path.is_dir():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
        if not found:
            raise WeightsError(f"weights folder '{path}' holds none of {', '.join(WEIGHT_FILES)}."
                               f" {_FIX}")
        path = found[0]
    config = path.with_name("config.json")
    cfg = read_timm_config(config) if config.is_file() else {}
    return Fetched(read_state_dict(path), str(path.resolve()), cfg)


def default_weights(name: str) -> str:
    """``model.weights`` when unset: timm's own for a timm model, else torchvision's."""
    return "timm" if source_of(name) == "timm" else "torchvision"


def fetch_state_dict(name: str, weights: str | None) -> Fetched:
    """The weights ``model.weights`` names for model ``name`` (see the module docstring)."""
    source = weights or default_weights(name)
    kind, _, arg = source.partition(":")
    path = Path(source).expanduser()
    if kind == "torchvision" and not path.exists():
        if source_of(name) == "tv":
            return _fetch_torchvision(name, tv_weights_cfg(name[len(TV):])["tv_weights"],
                                      arg or "DEFAULT")
        return _fetch_torchvision(name, weights_cfg(name)["tv_weights"], arg or "IMAGENET1K_V1")
    elif kind == "timm" and not path.exists():
        if arg:
            return _fetch_timm(arg)
        if source_of(name) == "timm":
            return _fetch_timm(name[len(TIMM):])
        hub_name = weights_cfg(name)["hf_hub_id"]
        if not hub_name:
            raise WeightsError(f"no default timm weights for {name} (timm's layout differs); "
                               f"use model.weights=torchvision or a local file.")
        return _fetch_timm(hub_name)
    else:
        if not path.exists():
            raise WeightsError(f"weights file '{path}' does not exist. {_FIX}")
        return _read_local(path)


def weights_input_size(name: str, weights: str | None) -> int | None:
    """The input size the pretrained weights were made for, from their config (nothing is
    downloaded); None when unknown."""
    source = weights or default_weights(name)
    kind, _, arg = source.partition(":")
    path = Path(source).expanduser()
    if path.exists():
        return _local_input_size(path if path.is_dir() else path.parent)
    if kind == "timm":
        size = timm_cfg(arg.removeprefix("timm/") if arg else name.removeprefix(TIMM)).get(
            "input_size")
    elif kind == "torchvision" and arg and source_of(name) == "tv":
        from torchvision.models import get_model_weights

        try:
            size = tv_cfg(get_model_weights(name[len(TV):])[arg])["input_size"]
        except KeyError:
            size = None  # an unknown tag: fetching says so
    else:
        size = get_pretrained_cfg(name).get("input_size")
    return int(size[-1]) if size else None


def _local_input_size(folder: Path) -> int | None:
    """The input size a finetune export (model.json's ``image_size``) or timm's config.json
    in ``folder`` records, checked: it sizes the data before the weights load. (Of model.json
    only this field is read here; finetune.export reads and checks the whole file when the
    weights load, and models/ cannot import it.)"""
    meta_file = folder / "model.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        meta = None  # absent, or damaged: finetune.export says how when it reads the file
    if isinstance(meta, dict) and "image_size" in meta:
        check_fields(meta_file, meta, {"image_size": integer(1, MAX_IMAGE_SIZE)}, ExportError,
                     "the export is damaged: export the run again, or restore the file.")
        return meta["image_size"]
    config = folder / "config.json"
    size = read_timm_config(config).get("input_size") if config.is_file() else None
    return size[-1] if size else None


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, first_conv: str,
                     classifier: str, new_classes: bool = False) -> list[str]:
    """Fit ``state_dict`` to ``model`` in place: input channels and classifier. Returns notes.

    The classifier is replaced when its shape differs, or when ``new_classes`` says the weights
    were trained on other classes (a head of the same size would otherwise be kept)."""
    notes = []
    target = model.state_dict()
    conv_key = f"{first_conv}.weight"
    if conv_key in state_dict and conv_key in target:
        have, want = state_dict[conv_key].shape[1], target[conv_key].shape[1]
        if have != want:
            from timm.models import adapt_input_conv  # imported when used: a start-up second

            # timm's: one channel sums the RGB filters (a grey image x responds as (x, x, x));
            # others cycle the filters, rescaled to keep the summed response's magnitude
            state_dict[conv_key] = adapt_input_conv(want, state_dict[conv_key], base_chans=have)
            how = "summed RGB filters" if want == 1 else "cycled and rescaled filters"
            notes.append(f"{first_conv}: {have} -> {want} input channels ({how})")
    head = [k for k in state_dict if k.startswith(f"{classifier}.")]
    if not head:
        notes.append(f"{classifier}: not in the weights, new classifier randomly initialised")
    elif new_classes or any(k in target and state_dict[k].shape != target[k].shape
                            for k in head):
        n_old = state_dict[f"{classifier}.weight"].shape[0]
        n_new = target[f"{classifier}.weight"].shape[0]
        for k in head:
            del state_dict[k]
        why = ", the weights' classes differ" if new_classes else ""
        notes.append(f"{classifier}: classifier replaced, {n_old} -> {n_new} classes{why} "
                     f"(new layer randomly initialised)")
    return notes


def load_pretrained(model: nn.Module, name: str, fetched: Fetched,
                    class_names: list[str] | None = None, exported: dict | None = None
                    ) -> LoadedWeights:
    """Load pretrained weights for architecture ``name`` (not a timm model: see
    :func:`load_timm`) into ``model``, adapting its first conv's input channels and replacing
    its classifier as needed.

    Raises :class:`WeightsError` (never falls back to random init) when the weights do not fit
    the architecture. ``exported`` is the ``model.json`` of a finetune export the weights come
    from: trained on classes other than ``class_names``, it gets a new classifier even when the
    class count matches; its mean/std come along.
    """
    cfg = model.pretrained_cfg
    first_conv, classifier = cfg["first_conv"], classifier_name(model)
    state_dict = dict(fetched.state_dict)  # adapted below; the caller's copy stays as it was
    sidecar = exported or {}
    aux = [k for k in state_dict if k.startswith(("aux1.", "aux2.", "AuxLogits."))
           and k not in model.state_dict()]
    for k in aux:  # GoogLeNet's / Inception's auxiliary heads: training-only, not built here
        del state_dict[k]
    notes = adapt_state_dict(state_dict, model, first_conv, classifier,
                             _new_classes(sidecar, class_names))
    notes += _resize_position_embedding(state_dict, model)
    target = model.state_dict()
    missing_body = [k for k in target if k not in state_dict
                    and not k.startswith(f"{classifier}.")]
    unexpected = [k for k in state_dict if k not in target]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if wrong or unexpected or missing_body:
        problems = []
        if missing_body:
            problems.append(f"{len(missing_body)} missing (e.g. {missing_body[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            problems.append(f"{len(wrong)} with other shapes (e.g. {wrong[0]})")
        _misfit(fetched.source, name, "; ".join(problems) + " keys")
    model.load_state_dict(state_dict, strict=False)
    in_chans = target[f"{first_conv}.weight"].shape[1]
    return _loaded(name, fetched, sidecar, notes, in_chans)


def load_timm(name: str, fetched: Fetched, *, num_classes: int, in_chans: int, image_size: int,
              drop_path_rate: float | None = None, class_names: list[str] | None = None,
              exported: dict | None = None) -> tuple[nn.Module, LoadedWeights]:
    """Build timm model ``name`` (``timm:ARCH[.TAG]``) and load ``fetched`` into it the way
    timm loads its own weights (its checkpoint filter, input conv, classifier); as
    :func:`load_pretrained` otherwise."""
    arch = name[len(TIMM):]
    cfg = timm_cfg(arch)
    first = cfg.get("first_conv") or ""
    first = first if isinstance(first, str) else first[0]
    head = cfg.get("classifier") or ""
    head = head if isinstance(head, str) else head[0]
    state_dict = dict(fetched.state_dict)
    src_classes = (state_dict[f"{head}.weight"].shape[0] if f"{head}.weight" in state_dict
                   else 0)
    sidecar = exported or {}
    src_chans = _source_channels(fetched, sidecar, cfg, state_dict.get(f"{first}.weight"))
    size = (cfg.get("input_size") or (3, image_size, image_size))[1:]
    reported = _TimmKeys()
    timm_log = logging.getLogger("timm.models._builder")
    level = timm_log.level
    timm_log.addHandler(reported)
    timm_log.setLevel(logging.INFO)  # "Missing keys" is an info message
    try:
        model = create_timm(arch, num_classes=num_classes, in_chans=in_chans,
                            image_size=image_size, drop_path_rate=drop_path_rate,
                            state_dict=state_dict,
                            weights_cfg={"num_classes": src_classes,
                                         "input_size": (src_chans, *size)})
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        _misfit(fetched.source, name, f"{type(e).__name__}: {first_line(e)[:300]}")
    finally:
        timm_log.removeHandler(reported)
        timm_log.setLevel(level)
    missing = [k for k in reported.keys["Missing"] if not k.startswith(f"{head}")]
    if missing or reported.keys["Unexpected"]:
        problems = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + (
            [f"{len(reported.keys['Unexpected'])} unexpected (e.g. "
             f"{reported.keys['Unexpected'][0]})"] if reported.keys["Unexpected"] else [])
        _misfit(fetched.source, name, "; ".join(problems) + " keys")
    notes = []
    if src_chans != in_chans:
        how = "summed RGB filters" if in_chans == 1 else "cycled and rescaled filters"
        notes.append(f"{first}: {src_chans} -> {in_chans} input channels ({how}, as timm "
                     f"adapts them)")
    new_classes = _new_classes(sidecar, class_names)
    if new_classes and src_classes == num_classes:
        model.reset_classifier(num_classes)
    if new_classes or src_classes != num_classes:
        why = ", the weights' classes differ" if new_classes else ""
        notes.append(f"{head}: classifier replaced, {src_classes} -> {num_classes} classes{why} "
                     f"(new layer randomly initialised)")
    return model, _loaded(name, fetched, sidecar, notes, in_chans)


class _TimmKeys(logging.Handler):
    """The keys timm's loader reports missing or unexpected: it loads non-strictly once it
    has dropped a classifier, and only logs what did not fit.

    Kept (not ``load_state_dict(strict=False)``'s result): the load happens inside
    ``timm.create_model``, whose ``load_pretrained`` returns nothing (timm 1.0.31) and only
    logs those keys; loading outside it would mean copying its checkpoint filters."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keys: dict[str, list[str]] = {"Missing": [], "Unexpected": []}

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"(Missing|Unexpected) keys \((.*?)\) (?:discovered|found)",
                         record.getMessage())
        if found:
            self.keys[found.group(1)] += [k for k in found.group(2).split(", ") if k]


def _source_channels(fetched: Fetched, sidecar: dict, cfg: dict,
                     stem: torch.Tensor | None) -> int:
    """The input channels the weights were made for: a finetune export's or the weights'
    config; else the stem's when it reads 1 or 3 channels; else timm's default (3). (A
    space-to-depth stem, e.g. TResNet's, reads 48 from 3 channels.)"""
    if "in_chans" in sidecar:
        return int(sidecar["in_chans"])
    if "input_size" in fetched.cfg:
        return int(fetched.cfg["input_size"][0])
    if stem is not None and stem.ndim == 4 and stem.shape[1] in (1, 3):
        return int(stem.shape[1])
    return int((cfg.get("input_size") or (3,))[0])


def _new_classes(sidecar: dict, class_names: list[str] | None) -> bool:
    return (class_names is not None and "class_names" in sidecar
            and list(sidecar["class_names"]) != list(class_names))


def _misfit(source: str, name: str, problems: str) -> NoReturn:
    hint = ""
    if source.startswith("timm:") and source_of(name) != "timm":
        hint = (f" timm's weights fit timm's architecture: model.name=timm:"
                f"{source.removeprefix('timm:').removeprefix('timm/')}.")
    raise WeightsError(f"weights from {source} do not fit {name}: {problems}. Are they for "
                       f"another architecture?{hint} {_FIX}")


def _resize_position_embedding(state_dict: dict[str, torch.Tensor], model: nn.Module
                               ) -> list[str]:
    """torchvision ViT weights at another image size: position embeddings interpolated, as
    torchvision does it."""
    key = "encoder.pos_embedding"
    target = model.state_dict().get(key)
    if target is None or key not in state_dict or state_dict[key].shape == target.shape:
        return []
    from torchvision.models.vision_transformer import interpolate_embeddings

    before = tuple(state_dict[key].shape)
    state_dict.update(interpolate_embeddings(model.image_size, model.patch_size,
                                             {key: state_dict[key]}))
    return [f"{key}: {before} -> {tuple(target.shape)} (interpolated to the image size)"]


def _loaded(name: str, fetched: Fetched, sidecar: dict, notes: list[str], in_chans: int
            ) -> LoadedWeights:
    """What the run keeps of the weights: the preprocessing they were made with (a finetune
    export's model.json first, then the weights' own config, then the model's pretrained
    config)."""
    known = {**_weights_cfg(get_pretrained_cfg(name)), **fetched.cfg,
             **{k: sidecar[k] for k in ("mean", "std", "crop_pct", "interpolation")
                if k in sidecar}}
    if "image_size" in sidecar:
        known["input_size"] = (sidecar.get("in_chans", in_chans), sidecar["image_size"],
                               sidecar["image_size"])
    mean, std = known.get("mean", IMAGENET_MEAN), known.get("std", IMAGENET_STD)
    for note in notes:
        log.info("adapted pretrained %s: %s", name, note)
    return LoadedWeights(source=fetched.source, mean=channel_stats(tuple(mean), in_chans),
                         std=channel_stats(tuple(std), in_chans), notes=notes,
                         preprocessing={k: known[k] for k in ("crop_pct", "interpolation",
                                                              "input_size") if k in known})
