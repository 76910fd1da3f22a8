"""A layer-by-layer table of a model: output shape and parameters, as the lecture prints."""

from __future__ import annotations

import torch
from torch import nn


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Run one zero batch of ``input_shape`` through ``model`` and tabulate every leaf layer."""
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod, args, out, name=name):
                params = sum(p.numel() for p in mod.parameters())
                rows.append((name, type(mod).__name__, str(tuple(out.shape)), params))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    width = max(len(r[0]) for r in rows)
    lines = [f"{'layer':<{width}}  {'type':<16} {'output shape':<22} {'params':>12}"]
    lines += [f"{n:<{width}}  {t:<16} {s:<22} {p:>12,d}" for n, t, s, p in rows]
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"total: {total:,d} parameters, input {tuple(input_shape)}")
    return "\n".join(lines)
