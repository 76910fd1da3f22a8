"""Model registry: builders registered by name with their pretrained config (duplicates
raise), created by name.

As in timm, each family file declares its models' ``pretrained_cfg`` beside their builders:
where the weights live, the preprocessing they expect, and the names of the first convolution
and the classifier. ``create_model`` sets it on the model it builds, so everything downstream
(the pretrained adapter, stages, export) reads it from the model, timm's or ours alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from finetune.config import INITS, NORMS
from finetune.errors import did_you_mean
from finetune.models.backbones import (
    TIMM,
    TV,
    check_backbone_name,
    create_timm,
    create_tv,
    on_meta,
    source_of,
    timm_cfg,
    tv_weights_cfg,
)

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}
_CFGS: dict[str, dict[str, Any]] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_cfg(first_conv: str, tv_weights: str = "", hf_hub_id: str = "",
             **kwargs: Any) -> dict[str, Any]:
    """A timm-style ``pretrained_cfg`` (the classifier is the model's ``get_classifier``):
    ``tv_weights`` names torchvision's weights enum (e.g. ``ResNet18_Weights``), ``hf_hub_id``
    the default timm weights on the hub; empty when there are none. Input size, interpolation,
    ``crop_pct``, mean and std are those the weights were trained with."""
    return {"tv_weights": tv_weights, "hf_hub_id": hf_hub_id, "num_classes": 1000,
            "input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875,
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": first_conv, **kwargs}


def register_model(pretrained_cfg: dict[str, Any]) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register a builder under its function name with its ``pretrained_cfg``, which
    every model it builds carries (called by name or directly, as timm's builders do)."""

    def register(fn: ModelBuilder) -> ModelBuilder:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")

        @functools.wraps(fn)
        def build(**kwargs: Any) -> nn.Module:
            model = fn(**kwargs)
            model.pretrained_cfg = dict(pretrained_cfg)
            return model

        _MODELS[name], _CFGS[name] = build, dict(pretrained_cfg)
        return build

    return register


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_pretrained_cfg(name: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of model ``name`` (a copy): registered, timm's (of the name's
    tag, or the default one) or that of torchvision's default weights."""
    check_model_name(name)
    source = source_of(name)
    if source == "timm":
        return timm_cfg(name[len(TIMM):])
    elif source == "tv":
        return tv_weights_cfg(name[len(TV):])
    return dict(_CFGS[name])


def check_model_name(name: str) -> None:
    """Refuse a name that is neither registered nor a ``timm:``/``tv:`` model."""
    if source_of(name) != "own":
        check_backbone_name(name)
    elif name not in _MODELS:
        raise ValueError(f"unknown model '{name}'.{did_you_mean(name, list_models())} "
                         f"Registered: {', '.join(list_models())}; or any timm or torchvision "
                         f"model as timm:NAME or tv:NAME")


def check_model_options(name: str, norm: str, drop_path_rate: float | None) -> None:
    """Refuse a name that is unknown, and options its model does not have."""
    check_model_name(name)
    if source_of(name) != "own" and norm != "torch":
        raise ValueError(f"model.norm={norm} (finetune's own batch norm) applies to the "
                         f"lecture's models, not to {name}")
    if source_of(name) != "timm" and drop_path_rate is not None:
        raise ValueError(f"model.drop_path_rate applies to timm's models, not to {name}")


def norm_layer(norm: str) -> type[nn.Module]:
    """The 2-D batch norm class for ``model.norm``: torch's, or the from-scratch one."""
    if norm == "torch":
        return nn.BatchNorm2d
    elif norm == "scratch":
        from finetune.models.batchnorm import BatchNorm2d

        return BatchNorm2d
    else:
        raise ValueError(f"unknown norm '{norm}'; valid: {', '.join(NORMS)}")


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``model.init=zero_residual`` zeroes: those with a ``zero_init_last``
    (finetune's ResNets, timm's) and torchvision's ResNet blocks."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return [m for m in model.modules()
            if hasattr(m, "zero_init_last") or isinstance(m, BasicBlock | Bottleneck)]


def no_residual_blocks(model: nn.Module) -> str:
    return (f"model.init=zero_residual needs residual blocks (finetune's, timm's or "
            f"torchvision's ResNets); {type(model).__name__} has none: use model.init=default.")


def init_weights(model: nn.Module, init: str) -> None:
    """``xavier``: Xavier-uniform weights and zero biases for every conv and linear layer (the
    lecture's init); ``zero_residual``: every residual block (:func:`residual_blocks`) zeroes
    the scale of its last norm; ``default``: leave what the builder did."""
    if init == "default":
        return
    elif init == "zero_residual":
        blocks = residual_blocks(model)
        if not blocks:
            raise ValueError(no_residual_blocks(model))
        for block in blocks:
            if hasattr(block, "zero_init_last"):
                block.zero_init_last()
            else:  # torchvision's blocks: the norm before the addition
                nn.init.zeros_(getattr(block, "bn3", block.bn2).weight)
    elif init == "xavier":
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    else:
        raise ValueError(f"unknown init '{init}'; valid: {', '.join(INITS)}")


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3,
                 image_size: int = 224, norm: str = "torch", init: str = "default",
                 drop_path_rate: float | None = None) -> nn.Module:
    """Build a model with randomly initialised weights and its ``pretrained_cfg``: a
    registered one, ``timm:NAME`` or ``tv:NAME``. ``drop_path_rate`` (stochastic depth) is for
    timm's models, ``norm`` for the lecture's."""
    check_model_options(name, norm, drop_path_rate)
    source = source_of(name)
    if source == "timm":
        model = create_timm(name[len(TIMM):], num_classes=num_classes, in_chans=in_chans,
                            image_size=image_size, drop_path_rate=drop_path_rate)
    elif source == "tv":
        model = create_tv(name[len(TV):], num_classes=num_classes, in_chans=in_chans,
                          image_size=image_size)
    else:
        model = _MODELS[name](num_classes=num_classes, in_chans=in_chans,
                              image_size=image_size, norm_layer=norm_layer(norm))
    init_weights(model, init)
    return model


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameters of model ``name`` built with ``kwargs``, counted on the meta device (shapes
    only: no memory, no init time)."""
    return sum(p.numel() for p in on_meta(lambda: create_model(name, **kwargs)).parameters())
