"""Batch normalization written out, matching ``torch.nn.BatchNorm1d/2d`` (and their state dict).

Training: normalize with the batch's mean and biased variance, per feature (vectors) or per
channel over N, H, W (images); update the running statistics with the *unbiased* variance, as
torch does. Evaluation: normalize with the running statistics.
"""

from __future__ import annotations

import torch
from torch import nn


def batch_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
               running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
               momentum: float, training: bool, ndim: int = 4) -> torch.Tensor:
    """Normalize ``x`` of ``ndim`` dimensions, (N, C) or (N, C, H, W), per C; updates running
    stats in place."""
    dims = [0] if ndim == 2 else [0, 2, 3]
    shape = [1, -1] if ndim == 2 else [1, -1, 1, 1]
    if training:
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        update_running_stats(x, mean, var, running_mean, running_var, momentum)
    else:
        mean, var = running_mean, running_var
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return gamma.view(shape) * x_hat + beta.view(shape)


# torch.fx.wrap: FX records these calls as they are instead of tracing their insides (which
# branch on the input's size and raise), so the models stay symbolically traceable.
@torch.fx.wrap
def update_running_stats(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         running_mean: torch.Tensor, running_var: torch.Tensor,
                         momentum: float) -> None:
    """Running mean and *unbiased* variance, as torch keeps them."""
    with torch.no_grad():
        n = x.numel() // x.size(1)
        running_mean.lerp_(mean, momentum)  # (1 - m) * running + m * batch
        running_var.lerp_(var * n / max(n - 1, 1), momentum)


@torch.fx.wrap
def check_input(x: torch.Tensor, ndim: int, name: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} expects {ndim}-D input, got {x.dim()}-D")


class _BatchNorm(nn.Module):
    ndim = 0  # the input's dimensions: 2 (N, C) or 4 (N, C, H, W)
    __constants__ = ["ndim"]  # TorchScript reads it from the class

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.name = type(self).__name__
        # torch's names, so checkpoints move between this and nn.BatchNorm unchanged.
        self.weight = nn.Parameter(torch.ones(num_features))  # gamma
        self.bias = nn.Parameter(torch.zeros(num_features))  # beta
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.ndim, self.name)
        if self.training:
            self.num_batches_tracked.add_(1)
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          self.eps, self.momentum, self.training, self.ndim)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch norm for vectors (N, C): statistics per feature over the batch."""

    ndim = 2


class BatchNorm2d(_BatchNorm):
    """Batch norm for images (N, C, H, W): statistics per channel over N, H and W."""

    ndim = 4
