"""Model zoo: importing a family module registers its builders."""

from __future__ import annotations

from torch import nn

from finetune.models import resnet  # noqa: F401  (registers resnet18 ... resnet152)
from finetune.models.pretrained import (
    LoadedWeights,
    WeightsError,
    fetch_state_dict,
    load_pretrained,
)
from finetune.registry import create_model, list_models, register_model

__all__ = ["LoadedWeights", "WeightsError", "build_model", "create_model", "fetch_state_dict",
           "list_models", "register_model"]


def build_model(name: str, *, num_classes: int, in_chans: int, pretrained: bool,
                weights: str | None, fetched: tuple[dict, str] | None = None
                ) -> tuple[nn.Module, LoadedWeights | None]:
    """A model for the run: pretrained (and adapted) when asked, else randomly initialised."""
    if pretrained:
        return load_pretrained(name, weights, num_classes, in_chans, fetched)
    return create_model(name, num_classes=num_classes, in_chans=in_chans), None
