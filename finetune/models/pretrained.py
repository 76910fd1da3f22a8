"""Pretrained weights: fetch a state dict, adapt input channels and classifier, load it.

Sources (``model.weights``):
- ``None`` / ``"torchvision"`` / ``"torchvision:TAG"``: torchvision's ImageNet weights
  (``TAG`` defaults to ``IMAGENET1K_V1``), from the torch hub cache or downloaded;
- ``"timm:NAME"``: ``model.safetensors`` of ``timm/NAME`` on the Hugging Face hub (or its cache);
- a path to a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (loaded with
  ``weights_only=True``: tensors only, never pickled code), in torchvision or timm key layout.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune.errors import WeightsError
from finetune.models.interface import classifier_name
from finetune.models.registry import get_pretrained_cfg, list_models

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
    if not cfg["tv_weights"]:
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


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight ``(out, c, kh, kw)`` to ``in_chans`` input channels.

    One channel: sum over the input channels, so a grey image x gives the response the RGB
    filters give to (x, x, x). Other counts: cycle the filters and rescale so that the summed
    response keeps its magnitude (the convention timm uses).
    """
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // src)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (src / in_chans)


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
        from safetensors.torch import load_file

        try:
            state_dict = load_file(path)
        except Exception as e:
            raise WeightsError(f"cannot read safetensors file '{path}': {e}") from None
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise WeightsError(
                f"refused to load '{path}': it holds pickled Python objects, not only tensors "
                f"(only weights_only=True loading is allowed). Save a plain state dict with "
                f"torch.save(model.state_dict(), PATH) or use .safetensors."
            ) from None
        except Exception as e:
            raise WeightsError(f"cannot read '{path}' as a torch checkpoint: {e}") from None
        # Training checkpoints often nest the weights.
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise WeightsError(f"'{path}' does not hold a state dict (a mapping of names to tensors).")
    return _strip_prefixes(state_dict)


def _fetch_torchvision(name: str, enum: str, tag: str) -> tuple[dict, str]:
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
    return state_dict, f"torchvision:{enum}.{tag}"


def _fetch_timm(hub_name: str) -> tuple[dict, str]:
    from huggingface_hub import hf_hub_download

    repo = hub_name if "/" in hub_name else f"timm/{hub_name}"
    try:
        path = hf_hub_download(repo, "model.safetensors", local_files_only=True)
    except Exception:
        log.info("timm weights %s not cached; trying the Hugging Face hub", repo)
        try:
            path = hf_hub_download(repo, "model.safetensors")
        except Exception as e:
            raise WeightsError(
                f"could not load timm weights '{repo}': not in the Hugging Face cache and the "
                f"hub download failed ({type(e).__name__}: {str(e).splitlines()[0]}). {_FIX}"
            ) from None
    return read_state_dict(path), f"timm:{repo}"


def fetch_state_dict(name: str, weights: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(state_dict, source)`` for ``model.weights`` (see the module docstring)."""
    source = weights or "torchvision"
    kind, _, arg = source.partition(":")
    if kind == "torchvision" and not Path(source).exists():
        return _fetch_torchvision(name, weights_cfg(name)["tv_weights"], arg or "IMAGENET1K_V1")
    elif kind == "timm" and not Path(source).exists():
        hub_name = arg or weights_cfg(name)["hf_hub_id"]
        if not hub_name:
            raise WeightsError(f"no default timm weights for {name} (timm's layout differs); "
                               f"use model.weights=torchvision or a local file.")
        return _fetch_timm(hub_name)
    else:
        path = Path(source).expanduser()
        return read_state_dict(path), str(path.resolve())


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
            state_dict[conv_key] = adapt_input_conv(state_dict[conv_key], want)
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


def load_pretrained(model: nn.Module, name: str, weights: str | None,
                    fetched: tuple[dict[str, torch.Tensor], str] | None = None,
                    class_names: list[str] | None = None, exported: dict | None = None
                    ) -> LoadedWeights:
    """Load pretrained weights for architecture ``name`` into ``model``, adapting its first
    conv's input channels and replacing its classifier as needed.

    ``fetched`` is what ``fetch_state_dict(name, weights)`` returned, for callers that fetch
    early. Raises :class:`WeightsError` (never falls back to random init) when the weights
    cannot be fetched or do not fit the architecture. ``exported`` is the ``model.json`` of a
    finetune export the weights come from: trained on classes other than ``class_names``, it
    gets a new classifier even when the class count matches; its mean/std come along.
    """
    cfg = model.pretrained_cfg
    first_conv, classifier = cfg["first_conv"], classifier_name(model)
    state_dict, source = fetched or fetch_state_dict(name, weights)
    state_dict = dict(state_dict)  # adapted below; the caller's copy stays as it was
    sidecar = exported or {}
    new_classes = (class_names is not None and "class_names" in sidecar
                   and list(sidecar["class_names"]) != list(class_names))
    notes = adapt_state_dict(state_dict, model, first_conv, classifier, new_classes)

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
        raise WeightsError(f"weights from {source} do not fit {name}: "
                           f"{'; '.join(problems)} keys. Are they for another architecture? "
                           f"{_FIX}")
    model.load_state_dict(state_dict, strict=False)

    in_chans = target[f"{first_conv}.weight"].shape[1]
    mean, std = ((sidecar["mean"], sidecar["std"]) if "mean" in sidecar and "std" in sidecar
                 else (cfg["mean"], cfg["std"]))
    for note in notes:
        log.info("adapted pretrained %s: %s", name, note)
    return LoadedWeights(source=source, mean=channel_stats(mean, in_chans),
                         std=channel_stats(std, in_chans), notes=notes,
                         preprocessing=weights_preprocessing(source, sidecar))


def weights_preprocessing(source: str, exported: dict) -> dict:
    """``crop_pct`` and ``interpolation`` the weights were evaluated with: torchvision's weights
    transforms, timm's pretrained config of the tag, or a finetune export's ``model.json``."""
    kind, _, name = source.partition(":")
    if kind == "torchvision":
        from torchvision.models import get_weight

        t = get_weight(name).transforms()
        return {"crop_pct": t.crop_size[0] / t.resize_size[0],
                "interpolation": t.interpolation.value}
    if kind == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name.removeprefix("timm/"))
        return {"crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation} if cfg else {}
    return {k: exported[k] for k in ("crop_pct", "interpolation") if k in exported}
