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

import torch
from torch import nn

from finetune.config import INITS, NORMS
from finetune.errors import did_you_mean

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
    """The registered ``pretrained_cfg`` of model ``name`` (a copy)."""
    check_model_name(name)
    return dict(_CFGS[name])


def check_model_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'.{did_you_mean(name, list_models())} "
                         f"Registered: {', '.join(list_models())}")


def norm_layer(norm: str) -> type[nn.Module]:
    """The 2-D batch norm class for ``model.norm``: torch's, or the from-scratch one."""
    if norm == "torch":
        return nn.BatchNorm2d
    elif norm == "scratch":
        from finetune.models.batchnorm import BatchNorm2d

        return BatchNorm2d
    else:
        raise ValueError(f"unknown norm '{norm}'; valid: {', '.join(NORMS)}")


def init_weights(model: nn.Module, init: str) -> None:
    """``xavier``: Xavier-uniform weights and zero biases for every conv and linear layer (the
    lecture's init); ``default``: leave what the builder did."""
    if init == "default":
        return
    elif init == "xavier":
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    else:
        raise ValueError(f"unknown init '{init}'; valid: {', '.join(INITS)}")


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3,
                 image_size: int = 224, norm: str = "torch", init: str = "default"
                 ) -> nn.Module:
    """Build a registered model with randomly initialised weights and its ``pretrained_cfg``."""
    check_model_name(name)
    model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                          norm_layer=norm_layer(norm))
    init_weights(model, init)
    return model


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameters of model ``name`` built with ``kwargs``, counted on the meta device (shapes
    only: no memory, no init time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kwargs).parameters())
