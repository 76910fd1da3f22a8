"""Exponential moving average of a model's weights, updated after every optimizer step.

``ema = decay * ema + (1 - decay) * weights`` for parameters; buffers (batch-norm statistics)
are copied, as timm's ModelEmaV3 does. The average lives beside the model on its device, in
float32, and is a checkpointable object (``state_dict``/``load_state_dict``) so that a resumed
run continues the same average.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from finetune.models.interface import unwrap


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        model = unwrap(model)
        ema = list(self.module.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - self.decay)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
