"""Model zoo: importing a family module registers its builders."""

from __future__ import annotations

from torch import nn

from finetune.config import ModelConfig
from finetune.models import alexnet, resnet, vgg  # noqa: F401  (register their builders)
from finetune.models.backbones import source_of
from finetune.models.interface import stages, unwrap
from finetune.models.pretrained import (
    Fetched,
    LoadedWeights,
    WeightsError,
    fetch_state_dict,
    load_pretrained,
    load_timm,
)
from finetune.models.registry import count_parameters, create_model, list_models, register_model

__all__ = ["Fetched", "LoadedWeights", "WeightsError", "build_model", "count_parameters",
           "create_model", "fetch_state_dict", "list_models", "register_model",
           "set_grad_checkpointing", "stages", "unwrap"]


def build_model(cfg: ModelConfig, *, num_classes: int, in_chans: int, image_size: int,
                fetched: Fetched | None = None, class_names: list[str] | None = None,
                exported: dict | None = None) -> tuple[nn.Module, LoadedWeights | None]:
    """A model for the run: pretrained (and adapted) when asked, else randomly initialised.
    ``fetched`` is what ``fetch_state_dict`` returned, for callers that fetch early;
    ``class_names`` are the run's classes (a head trained on others is replaced);
    ``exported`` the model.json of the finetune export the weights come from, if any."""
    kwargs = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    loaded = None
    if not cfg.pretrained:
        model = create_model(cfg.name, norm=cfg.norm, init=cfg.init,
                             drop_path_rate=cfg.drop_path_rate, **kwargs)
    elif source_of(cfg.name) == "timm":
        model, loaded = load_timm(cfg.name, fetched or fetch_state_dict(cfg.name, cfg.weights),
                                  drop_path_rate=cfg.drop_path_rate, class_names=class_names,
                                  exported=exported, **kwargs)
    else:
        model = create_model(cfg.name, norm=cfg.norm, init=cfg.init,
                             drop_path_rate=cfg.drop_path_rate, **kwargs)
        loaded = load_pretrained(model, cfg.name,
                                 fetched or fetch_state_dict(cfg.name, cfg.weights),
                                 class_names, exported)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model)
    return model, loaded


def set_grad_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (timm's ``set_grad_checkpointing``): less
    memory for bigger models and batches, about a third more compute."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(f"model.grad_checkpointing=true needs a model with "
                         f"set_grad_checkpointing (timm's models have it); "
                         f"{type(model).__name__} has none.")
    model.set_grad_checkpointing(True)
