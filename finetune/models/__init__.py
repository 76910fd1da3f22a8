"""Model zoo: importing a family module registers its builders."""

from __future__ import annotations

from torch import nn

from finetune.config import ModelConfig
from finetune.models import alexnet, resnet, vgg  # noqa: F401  (register their builders)
from finetune.models.interface import stages, unwrap
from finetune.models.pretrained import (
    LoadedWeights,
    WeightsError,
    fetch_state_dict,
    load_pretrained,
)
from finetune.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["LoadedWeights", "WeightsError", "build_model", "count_parameters", "create_model",
           "fetch_state_dict", "list_models", "register_model", "stages", "unwrap"]


def build_model(cfg: ModelConfig, *, num_classes: int, in_chans: int, image_size: int,
                fetched: tuple[dict, str] | None = None, class_names: list[str] | None = None,
                exported: dict | None = None) -> tuple[nn.Module, LoadedWeights | None]:
    """A model for the run: pretrained (and adapted) when asked, else randomly initialised.
    ``class_names`` are the run's classes (a head trained on others is replaced);
    ``exported`` the model.json of the finetune export the weights come from, if any."""
    model = create_model(cfg.name, num_classes=num_classes, in_chans=in_chans,
                         image_size=image_size, norm=cfg.norm, init=cfg.init)
    if cfg.pretrained:
        return model, load_pretrained(model, cfg.name, cfg.weights, fetched, class_names,
                                      exported)
    return model, None
