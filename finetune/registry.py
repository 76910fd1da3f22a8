"""Model registry: builders registered by name (duplicates raise), created by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(fn: ModelBuilder) -> ModelBuilder:
    """Decorator: register ``fn`` under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model '{name}' is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """Build a registered model with randomly initialised weights."""
    if name in _MODELS:
        return _MODELS[name](num_classes=num_classes, in_chans=in_chans)
    else:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'.{hint} Registered: {', '.join(list_models())}")
