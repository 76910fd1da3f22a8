"""Grad-CAM (Selvaraju et al., 2017): where in an image the evidence for a class lies.

The activations A (N, C, h, w) of one layer and the gradient of a class's logit with respect
to them give each channel a weight (the gradient's spatial mean); the heatmap is
ReLU(sum_c weight_c * A_c), upsampled to the input's size and scaled to [0, 1] per image.

Written on torch's forward hooks rather than the ``grad-cam`` package: that package needs
opencv-python (~60 MB) for its resizing and overlays, and hooks are all it does here. They work
on any model (finetune's own, timm's, torchvision's) without changing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import ConfigError

MIN_SIDE = 3  # a 1x1 or 2x2 map cannot say where in the image the evidence is


def module_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(module name, output shape) of every call of a module that returns a tensor, in the
    order the calls finished, on input ``x``."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str):
        def hook(module, inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                seen.append((name, tuple(output.shape)))
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return seen


def target_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The layer Grad-CAM reads: the last module holding a convolution whose output is a
    feature map (N, C, h, w) of at least :data:`MIN_SIDE` x :data:`MIN_SIDE` positions (the
    last stage of a CNN at its input size; at 28 px an earlier one, where the last is 1x1).
    Refused for models that turn their maps into tokens (vision transformers): there the last
    map is the patch embedding, which says little about the decision."""
    convolutional = {name for name, m in model.named_modules()
                     if any(isinstance(sub, nn.Conv2d) for sub in m.modules())}
    outputs = module_outputs(model, x)
    for k in range(len(outputs) - 1, -1, -1):
        name, shape = outputs[k]
        if len(shape) == 4 and name in convolutional and min(shape[-2:]) >= MIN_SIDE:
            if any(len(later) == 3 for _, later in outputs[k + 1:]):
                raise ConfigError(f"this model turns its feature maps into tokens after {name} "
                                  f"(a vision transformer?): Grad-CAM there says little; pass "
                                  f"--layer NAME to choose a layer anyway, or --cams 0")
            return name
    maps = [f"{n} {s[1:]}" for n, s in outputs if len(s) == 4 and n in convolutional]
    raise ConfigError(f"no convolutional feature map of at least {MIN_SIDE}x{MIN_SIDE} "
                      f"positions in this model at {tuple(x.shape[-2:])} px for Grad-CAM"
                      + (f" (the last: {', '.join(maps[-3:])})" if maps else "")
                      + "; pass --layer NAME, or --cams 0")


def grad_cam(model: nn.Module, layer: str, x: torch.Tensor, classes: torch.Tensor
             ) -> torch.Tensor:
    """Heatmaps (N, H, W) in [0, 1], the input's size, of class ``classes[i]`` for image
    ``x[i]``, from the activations of ``model``'s module ``layer``."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise _not_a_map(model, x, layer, "no such module") from None
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, i, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            logits = model(x.detach().float().requires_grad_(True))
            score = logits.float().gather(1, classes.to(logits.device)[:, None]).sum()
            (grads,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    if not isinstance(store.get("a"), torch.Tensor) or store["a"].ndim != 4:
        shape = tuple(getattr(store.get("a"), "shape", ()))
        raise _not_a_map(model, x, layer, f"its output {shape or 'is not a tensor'} is not a "
                                          f"feature map (N, C, h, w)")
    acts = store["a"].detach().float()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _not_a_map(model: nn.Module, x: torch.Tensor, layer: str, why: str) -> ConfigError:
    names = list(dict.fromkeys(n for n, s in module_outputs(model, x) if len(s) == 4))
    return ConfigError(f"--layer {layer}: {why}; the last modules with feature maps: "
                       f"{', '.join(names[-8:])}")
