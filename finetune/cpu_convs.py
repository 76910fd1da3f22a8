"""A CPU training speed-up, applied as a module swap: a convolution whose input map is smaller
than its kernel computed as one matrix product (``train.small_map_matmul``).

On small images the last stages of a ResNet see tiny maps: at 28 px ResNet-18's layer3 is 2x2
and layer4 1x1, where most of a 3x3 kernel's taps only ever see the zero padding. A convolution
is a matrix product with a matrix made of the kernel's taps (zero where no tap joins an output
pixel to an input pixel); for such maps that matrix is small, and the product skips the
padding's work and oneDNN's slow small-map (and bf16) kernels: ResNet-18 at 28 px trains 1.6x
(fp32) and 2.3x (bf16) as fast on a 2-core CPU (BENCHMARKS.md).

The swap belongs to the trainer, never to the model: :class:`SmallMapConv2d` is an
``nn.Conv2d`` sharing the swapped layer's parameters (same state dict), and computes torch's
convolution in evaluation mode, off the CPU and on every map that is not small. Model
definitions, exports and loaded models hold plain ``nn.Conv2d`` layers.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _selection(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int]
               ) -> tuple[Tensor, tuple[int, int]]:
    """For a convolution over a ``size`` map: a 0/1 matrix (output pixel x input pixel, tap)
    saying which kernel tap joins each pair of pixels, and the output size. Built once per
    shape (the layers of one stage share it)."""
    out = _output(size, kernel, stride, padding, dilation)
    taps, valid = [], []
    for n, k, s, p, d, o in zip(size, kernel, stride, padding, dilation, out, strict=True):
        # Output o reads input i through tap (i - o * s + p) / d, where that is a whole tap.
        offset = torch.arange(n)[None, :] - torch.arange(o)[:, None] * s + p
        taps.append(offset.div(d, rounding_mode="floor"))
        valid.append((offset % d == 0) & (offset >= 0) & (offset < k * d))
    (ty, tx), (vy, vx) = taps, valid  # (out, in) along each axis
    joined = vy[:, None, :, None] & vx[None, :, None, :]
    index = torch.where(joined, ty[:, None, :, None] * kernel[1] + tx[None, :, None, :],
                        kernel[0] * kernel[1]).flatten()
    return (index[:, None] == torch.arange(kernel[0] * kernel[1])).float(), (out[0], out[1])


def is_small(conv: nn.Conv2d, shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether ``conv`` over an input of ``shape`` (N, C, H, W) is computed as a matrix
    product: a map smaller than the kernel, a plain (ungrouped, zero-padded) convolution with
    an output."""
    kh, kw = conv.kernel_size
    if (len(shape) != 4 or shape[-2] * shape[-1] >= kh * kw or conv.groups != 1
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        return False
    return min(_output(tuple(shape[-2:]), conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation)) >= 1


def _output(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
            padding: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)]


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, while training on the CPU, computes a map smaller than its kernel
    as one matrix product (the convolution's numbers, its gradients by autograd)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or not is_small(self, x.shape):
            return super().forward(x)
        select, (oh, ow) = _selection(tuple(x.shape[-2:]), self.kernel_size, self.stride,
                                      self.padding, self.dilation)
        # The matrix as a product with the 0/1 selection of taps (its gradient is one more
        # product, where gathering the taps would scatter-add them back one by one), laid
        # out (output channel, output pixel) x (input pixel, input channel): channels_last
        # weights and inputs are then read in place.
        kh, kw = self.kernel_size
        taps = self.weight.permute(0, 2, 3, 1).reshape(self.out_channels, kh * kw, -1)
        matrix = torch.matmul(select.to(self.weight.dtype), taps)
        y = F.linear(x.permute(0, 2, 3, 1).flatten(1),
                     matrix.view(self.out_channels * oh * ow, -1))
        y = y.unflatten(1, (self.out_channels, oh, ow))
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)


def conv_calls(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, nn.Conv2d, tuple]]:
    """Every call of an ``nn.Conv2d`` (or subclass) of ``model`` on one batch of ``shape``
    (zeros, evaluation mode, no gradients), in call order: its name, the layer and the shape
    of its input."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    calls: list[tuple[str, nn.Conv2d, tuple]] = []

    def hook(module: nn.Module, args: tuple) -> None:
        calls.append((names[module], module, tuple(args[0].shape)))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    was_training = model.training
    p = next(model.parameters(), torch.zeros(()))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape[1:], device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def swap_small_map_convs(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    """Replace every plain ``nn.Conv2d`` of ``model`` that sees a map smaller than its kernel
    on a batch of ``shape`` by a :class:`SmallMapConv2d` holding the same parameters; call it
    before the optimizer and Accelerate see the model. Returns the swapped layers' names."""
    small = list(dict.fromkeys(  # a layer called twice is swapped once
        name for name, conv, seen in conv_calls(model, shape)
        if type(conv) is nn.Conv2d and is_small(conv, seen)))
    for name in small:
        model.set_submodule(name, _small_map_twin(model.get_submodule(name)))
    return small


def _small_map_twin(conv: nn.Conv2d) -> SmallMapConv2d:
    twin = SmallMapConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                          conv.padding_mode, device="meta")
    twin.weight, twin.bias = conv.weight, conv.bias  # the same Parameters: nothing copied
    return twin.train(conv.training)
