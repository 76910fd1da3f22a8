"""Model registry: builders registered by name (duplicates raise), created by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}
NORMS = ("torch", "scratch")
INITS = ("default", "xavier")


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Decorator: register ``fn`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


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
    """Build a registered model with randomly initialised weights."""
    if name in _MODELS:
        model = _MODELS[name](num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                              norm_layer=norm_layer(norm))
        init_weights(model, init)
        return model
    else:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'.{hint} Registered: {', '.join(list_models())}")
