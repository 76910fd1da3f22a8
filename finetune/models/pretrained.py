"""Pretrained weights: fetch a state dict, adapt input channels and classifier, load it.

Sources (``model.weights``):
- ``None`` / ``"torchvision"`` / ``"torchvision:TAG"``: torchvision's ImageNet weights
  (``TAG`` defaults to ``IMAGENET1K_V1``), from the torch hub cache or downloaded;
- ``"timm:NAME"``: ``model.safetensors`` of ``timm/NAME`` on the Hugging Face hub (or its cache);
- a path to a ``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (loaded with
  ``weights_only=True``: tensors only, never pickled code), in torchvision or timm key layout.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from finetune.errors import WeightsError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedSpec:
    """Where an architecture's ImageNet weights live and how its layers are named."""

    torchvision: str  # torchvision weights enum, e.g. "ResNet18_Weights"
    timm: str  # default timm hub name
    first_conv: str = "conv1"
    classifier: str = "fc"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


PRETRAINED: dict[str, PretrainedSpec] = {
    "resnet18": PretrainedSpec("ResNet18_Weights", "resnet18.a1_in1k"),
    "resnet34": PretrainedSpec("ResNet34_Weights", "resnet34.a1_in1k"),
    "resnet50": PretrainedSpec("ResNet50_Weights", "resnet50.a1_in1k"),
    "resnet101": PretrainedSpec("ResNet101_Weights", "resnet101.a1h_in1k"),
    "resnet152": PretrainedSpec("ResNet152_Weights", "resnet152.a1h_in1k"),
    # timm's VGG and AlexNet differ in layout from torchvision's: torchvision weights only.
    "alexnet": PretrainedSpec("AlexNet_Weights", "", "features.0", "classifier.6"),
    "vgg11": PretrainedSpec("VGG11_Weights", "", "features.0", "classifier.6"),
    "vgg11_bn": PretrainedSpec("VGG11_BN_Weights", "", "features.0", "classifier.6"),
}

_FIX = ("Fix: pass a local state dict with model.weights=PATH (.safetensors or .pth, torchvision "
        "or timm layout), or train from scratch with model.pretrained=false.")


@dataclass
class LoadedWeights:
    source: str  # human-readable origin, stored in model.json
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str]  # what was adapted


def get_spec(name: str) -> PretrainedSpec:
    if name in PRETRAINED:
        return PRETRAINED[name]
    else:
        raise WeightsError(f"no pretrained weights are known for model '{name}'; models with "
                           f"known weights: {', '.join(sorted(PRETRAINED))}. {_FIX}")


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


def _fetch_torchvision(name: str, spec: PretrainedSpec, tag: str) -> tuple[dict, str]:
    from torchvision.models import get_weight

    try:
        weights = get_weight(f"{spec.torchvision}.{tag}")
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights '{spec.torchvision}.{tag}' for {name}; "
                           f"try model.weights=torchvision:IMAGENET1K_V1.") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WeightsError(
            f"could not load ImageNet weights for {name} ({spec.torchvision}.{tag}): not in "
            f"the torch hub cache ({cached}) and the download from {weights.url} failed "
            f"({type(e).__name__}: {e}). {_FIX} To use these exact weights offline, copy "
            f"{Path(weights.url).name} to {cached.parent}/ or pass model.weights=PATH."
        ) from None
    return state_dict, f"torchvision:{spec.torchvision}.{tag}"


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
        return _fetch_torchvision(name, get_spec(name), arg or "IMAGENET1K_V1")
    elif kind == "timm" and not Path(source).exists():
        hub_name = arg or get_spec(name).timm
        if not hub_name:
            raise WeightsError(f"no default timm weights for {name} (timm's layout differs); "
                               f"use model.weights=torchvision or a local file.")
        return _fetch_timm(hub_name)
    else:
        path = Path(source).expanduser()
        return read_state_dict(path), str(path.resolve())


def _sidecar(weights: str | None) -> dict:
    """The model.json of a finetune export next to a weights file ({} if there is none)."""
    if not weights or not Path(weights).suffix:
        return {}
    meta = Path(weights).expanduser().with_name("model.json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


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
                    class_names: list[str] | None = None) -> LoadedWeights:
    """Load pretrained weights for architecture ``name`` into ``model``, adapting its first
    conv's input channels and replacing its classifier as needed.

    ``fetched`` is what ``fetch_state_dict(name, weights)`` returned, for callers that fetch
    early. Raises :class:`WeightsError` (never falls back to random init) when the weights
    cannot be fetched or do not fit the architecture. A finetune export trained on classes other
    than ``class_names`` gets a new classifier even when the class count matches.
    """
    spec = get_spec(name)
    state_dict, source = fetched or fetch_state_dict(name, weights)
    state_dict = dict(state_dict)  # adapted below; the caller's copy stays as it was
    sidecar = _sidecar(weights)
    new_classes = (class_names is not None and "class_names" in sidecar
                   and list(sidecar["class_names"]) != list(class_names))
    notes = adapt_state_dict(state_dict, model, spec.first_conv, spec.classifier, new_classes)

    target = model.state_dict()
    missing_body = [k for k in target if k not in state_dict
                    and not k.startswith(f"{spec.classifier}.")]
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

    in_chans = target[f"{spec.first_conv}.weight"].shape[1]
    mean, std = ((sidecar["mean"], sidecar["std"]) if "mean" in sidecar and "std" in sidecar
                 else (spec.mean, spec.std))
    for note in notes:
        log.info("adapted pretrained %s: %s", name, note)
    return LoadedWeights(source=source, mean=channel_stats(mean, in_chans),
                         std=channel_stats(std, in_chans), notes=notes)
