"""What a model says about itself, in timm's terms, and the few functions that read it.

A model declares (timm's models do all of this already):
- ``pretrained_cfg``: a dict with ``first_conv`` (a module name), ``mean``, ``std``,
  ``interpolation``, ``crop_pct`` and where its pretrained weights live;
- ``group_matcher(coarse)``: regular expressions grouping parameter names into stages, from the
  input to the output (``{"stem": r"^conv1|^bn1", "layer": r"^layer(\\d+)"}``); parameters that
  no expression matches (the classifier) form the last group;
- ``get_classifier()``: the final layer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself under ``torch.compile``'s wrapper (whose keys carry ``_orig_mod.``)."""
    return getattr(model, "_orig_mod", model)


def classifier_name(model: nn.Module) -> str:
    """The module name of the model's final layer (timm's ``get_classifier()`` returns the
    module itself)."""
    model = unwrap(model)
    head = model.get_classifier()
    if isinstance(head, tuple):  # timm's distilled models: (head, head_dist); both in "head"
        head = head[0]
    return next(name for name, m in model.named_modules() if m is head)


def stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(stage name, [parameter names]), ...]`` from the input to the classifier, grouped by
    the model's coarse ``group_matcher``. A stage is named by its matcher key followed by what
    the expression captured (``layer`` + ``3``); the classifier's stage is ``head``."""
    model = unwrap(model)
    if not hasattr(model, "group_matcher") or not hasattr(model, "get_classifier"):
        raise TypeError(f"{type(model).__name__} declares no group_matcher/get_classifier; a "
                        f"model must say what its stages and classifier are (see "
                        f"finetune/models/interface.py).")
    matcher = model.group_matcher(coarse=True)
    head = classifier_name(model) + "."
    out = []
    for names in group_parameters(model, matcher):
        name = "head" if names[0].startswith(head) else _stage_name(matcher, names[0])
        out.append((name, names))
    return out


_MATCH_PREV_GROUP = 99999.0  # timm's MATCH_PREV_GROUP: an ordinal that joins the group before


def group_parameters(model: nn.Module, matcher: Any) -> list[list[str]]:
    """Parameter names grouped as ``timm.models.group_parameters(model, matcher)`` groups
    them, in its order. A twin of timm's: importing timm costs every process 2.3 s (it loads
    all of its models and torchvision), and a run of a built-in model needs nothing else of
    it. tests/test_backbones.py checks the two agree on every built-in and several timm models.
    A capture that matched nothing is left out of the ordinal, where timm's raises TypeError."""
    if isinstance(matcher, dict):
        specs = _specs(matcher)

        def ordinals(name: str) -> tuple[float, ...]:
            found = _match(specs, name)
            if found is None:
                return (float("inf"),)  # unmatched (the classifier): the last group
            return tuple(float(v) for v in (found[1], *found[2]))
    else:
        def ordinals(name: str) -> tuple[float, ...]:
            found = matcher(name)
            return tuple(found) if isinstance(found, Iterable) else (found,)

    by_key: dict[tuple[float, ...], list[str]] = defaultdict(list)
    for name, _ in model.named_parameters():
        by_key[ordinals(name)].append(name)
    groups: list[list[str]] = []
    for key in sorted(by_key):
        if not groups or key[-1] != _MATCH_PREV_GROUP:
            groups.append([])
        groups[-1].extend(by_key[key])
    return groups


Spec = tuple[str, int, re.Pattern, tuple | None]  # key, ordinal, expression, suffix


def _specs(matcher: dict[str, Any]) -> list[Spec]:
    """A dict matcher's ``(key, ordinal, expression, suffix)``s in order: a key holds one
    expression, or a list of ``(expression, suffix)``; a None key still takes an ordinal."""
    out = []
    for ordinal, (key, spec) in enumerate(matcher.items()):
        if spec is not None:
            pairs = spec if isinstance(spec, list | tuple) else [(spec, None)]
            out += [(key, ordinal, re.compile(pattern), suffix) for pattern, suffix in pairs]
    return out


def _match(specs: list[Spec], param: str) -> tuple[str, int, list] | None:
    """The first spec matching ``param``: its key, ordinal, and the numbers it captured followed
    by its suffix (captures that matched nothing left out); None when none matches."""
    for key, ordinal, pattern, suffix in specs:
        found = pattern.match(param)
        if found:
            return key, ordinal, [v for v in (*found.groups(), *(suffix or ())) if v is not None]
    return None


def _stage_name(matcher: dict[str, Any], param: str) -> str:
    found = _match(_specs(matcher), param)
    return "head" if found is None else found[0] + "".join(str(int(v)) for v in found[2])


class FeaturesClassifier(nn.Module):
    """Base of the VGGs and AlexNets: ``features`` (convolutions, blocks ending in max-pools),
    then ``classifier`` (hidden linear layers, the final one last). Its stages: each block of
    ``features``, the hidden classifier layers, the head."""

    # features and classifier: nn.Sequential, set by the subclass (not annotated: TorchScript
    # would read class annotations as attribute types, and cannot resolve these).

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        blocks, block = [], []
        for name, m in self.features.named_children():
            block.append(name)
            if isinstance(m, nn.MaxPool2d):
                blocks.append(block)
                block = []
        if block:
            blocks.append(block)
        hidden = [name for name, m in list(self.classifier.named_children())[:-1]
                  if any(True for _ in m.parameters())]
        return {"features": [(rf"^features\.(?:{'|'.join(b)})\.", (k + 1,))
                             for k, b in enumerate(blocks)],
                "classifier": rf"^classifier\.(?:{'|'.join(hidden)})\." if hidden else None}

    def get_classifier(self) -> nn.Module:
        return self.classifier[-1]
