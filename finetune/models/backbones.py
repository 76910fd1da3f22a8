"""Backbones by name: ``timm:NAME`` (any ``timm.list_models()`` name, with or without a
pretrained tag) and ``tv:NAME`` (torchvision's ``get_model`` names), beside the lecture's own
models.

Everything downstream reads a model through what it declares (``pretrained_cfg``,
``group_matcher``, ``get_classifier``; see ``finetune.models.interface``). timm's models declare
all of it themselves; torchvision's are given it here, by family: the first convolution and the
final layer found in the module tree, and stages from the family's layout (each ResNet
``layerN``, each block of ``features``, each encoder layer of a ViT, ...).
"""

from __future__ import annotations

import re
import types
from typing import Any

import torch
from torch import nn

from finetune.errors import did_you_mean

TIMM, TV = "timm:", "tv:"


def source_of(name: str) -> str:
    """``timm``, ``tv`` or ``own`` (the lecture's registered models)."""
    return "timm" if name.startswith(TIMM) else "tv" if name.startswith(TV) else "own"


def check_backbone_name(name: str) -> None:
    """Refuse an unknown ``timm:``/``tv:`` name (or pretrained tag), with a did-you-mean."""
    if source_of(name) == "timm":
        import timm

        arch, _, tag = name[len(TIMM):].partition(".")
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model '{arch}'.{did_you_mean(arch, timm.list_models())}"
                             f" List them with `finetune models 'timm:PATTERN'`.")
        if tag and f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
            tags = timm.list_pretrained(f"{arch}.*")
            raise ValueError(f"timm has no pretrained tag '{tag}' for {arch}; its tags: "
                             f"{', '.join(t.partition('.')[2] for t in tags) or 'none'}.")
    else:
        arch = name[len(TV):]
        names = tv_models()
        if arch not in names:
            raise ValueError(f"unknown torchvision model '{arch}'.{did_you_mean(arch, names)} "
                             f"Valid: {', '.join(names)}.")


def tv_models() -> list[str]:
    """torchvision's image classification models (``get_model`` names)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def timm_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``NAME`` or ``NAME.TAG`` (the default tag's without one)."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an architecture timm knows with a tag it does not
        return {}
    return cfg.to_dict() if cfg is not None else {}


def create_timm(arch: str, *, num_classes: int, in_chans: int, image_size: int,
                drop_path_rate: float | None = None, state_dict: dict | None = None,
                weights_cfg: dict | None = None) -> nn.Module:
    """``timm.create_model`` with the run's classes, channels and (for models whose input size
    is fixed, such as ViTs) image size. With ``state_dict`` these weights are loaded the way
    timm loads its own: the model's checkpoint filter (e.g. position embeddings resized to the
    image size), the first conv adapted to ``in_chans`` (summed RGB filters for one), the
    classifier dropped when ``weights_cfg["num_classes"]`` differs from ``num_classes``."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if timm_cfg(arch).get("fixed_input_size"):
        kwargs["img_size"] = image_size
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    overlay = None
    if state_dict is not None:
        overlay = {"state_dict": state_dict, **(weights_cfg or {})}
    model = timm.create_model(arch, pretrained=state_dict is not None,
                              pretrained_cfg_overlay=overlay, **kwargs)
    model.pretrained_cfg.pop("state_dict", None)  # the weights, not a description of them
    return model


def create_tv(arch: str, *, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """torchvision's ``get_model(arch)`` with ``num_classes`` outputs and ``in_chans`` input
    channels (a new first conv), declaring its stages, classifier and ``pretrained_cfg``."""
    import torchvision

    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    if arch in ("googlenet", "inception_v3"):  # auxiliary heads return tuples in training
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(arch, weights=None, **kwargs)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    finals = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    first, head = convs[0], finals[-1]
    if in_chans != 3:
        _replace_conv(model, first, in_chans)
    model.pretrained_cfg = {**tv_weights_cfg(arch), "first_conv": first, "classifier": head}
    model.stage_matcher = _tv_matcher(model, head)
    # Declared on the instance, as bound methods (a deep copy rebinds them to the copy):
    # torchvision's classes have no such methods.
    model.group_matcher = types.MethodType(_group_matcher, model)
    model.get_classifier = types.MethodType(_get_classifier, model)
    return model


def _group_matcher(self: nn.Module, coarse: bool = False) -> dict[str, Any]:
    return self.stage_matcher


def _get_classifier(self: nn.Module) -> nn.Module:
    return self.get_submodule(self.pretrained_cfg["classifier"])


def tv_weights_cfg(arch: str, tag: str = "DEFAULT") -> dict[str, Any]:
    """timm-style pretrained config of torchvision's weights ``tag`` for ``arch``."""
    from torchvision.models import get_model_weights

    return tv_cfg(get_model_weights(arch)[tag])


def tv_cfg(weights: Any) -> dict[str, Any]:
    """timm-style pretrained config of a torchvision weights enum member: its enum, classes
    and the preprocessing of its ``transforms()``."""
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return {"tv_weights": type(weights).__name__, "tag": weights.name, "hf_hub_id": "",
            "num_classes": len(weights.meta["categories"]), "input_size": (3, crop, crop),
            "interpolation": t.interpolation.value, "crop_pct": crop / resize,
            "mean": tuple(t.mean), "std": tuple(t.std)}


def _replace_conv(model: nn.Module, name: str, in_chans: int) -> None:
    conv = model.get_submodule(name)
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    model.set_submodule(name, new, strict=True)


_TV_FAMILIES: dict[str, dict[str, Any]] = {
    "ResNet": {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"},
    "RegNet": {"stem": r"^stem", "blocks": r"^trunk_output\.block(\d+)"},
    "VisionTransformer": {"stem": r"^conv_proj|^class_token|^encoder\.pos_embedding",
                          "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)", None),
                                     (r"^encoder\.ln", (99999,))]},
    # transitionN follows denseblockN: one stage
    "DenseNet": {"stem": r"^features\.(?:conv0|norm0)",
                 "blocks": [(r"^features\.(?:denseblock|transition)(\d+)", None),
                            (r"^features\.norm5", (99999,))]},
}


def _tv_matcher(model: nn.Module, head: str) -> dict[str, Any]:
    """Stages of a torchvision model: its family's layout; a ``features`` sequence cut at its
    max-pools (VGG, AlexNet, SqueezeNet) or child by child (EfficientNet, MobileNet, ConvNeXt,
    Swin); else each top-level child with parameters."""
    family = _TV_FAMILIES.get(type(model).__name__)
    if family is not None:
        return family
    matcher = _tv_layout(model, head)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential) and "features" in matcher:
        hidden = [n for n, m in classifier.named_children()
                  if f"classifier.{n}" != head and any(True for _ in m.parameters())]
        if hidden:  # VGG's, AlexNet's, MobileNetV3's hidden layers: a stage before the head
            matcher["classifier"] = rf"^classifier\.(?:{'|'.join(hidden)})\."
    return matcher


def _tv_layout(model: nn.Module, head: str) -> dict[str, Any]:
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        if any(isinstance(m, nn.MaxPool2d) for _, m in children):
            blocks, block = [], []
            for name, m in children:
                block.append(name)
                if isinstance(m, nn.MaxPool2d):
                    blocks.append(block)
                    block = []
            blocks += [block] if block else []
            return {"features": [(rf"^features\.(?:{'|'.join(b)})\.", (k,))
                                 for k, b in enumerate(blocks, 1)]}
        return {"features": r"^features\.(\d+)"}
    top = []  # each top-level child with parameters; a list of blocks (MaxViT, MNASNet) split
    for n, m in model.named_children():
        if head.startswith(n + ".") or n == head or not any(True for _ in m.parameters()):
            continue
        parts = [c for c, sub in m.named_children() if any(True for _ in sub.parameters())]
        nested = isinstance(m, nn.Sequential | nn.ModuleList) and len(parts) >= 3
        top += [f"{n}.{c}" for c in parts] if nested else [n]
    return {"block": [(rf"^{re.escape(n)}\.", (k,)) for k, n in enumerate(top)]}


def list_backbones(pattern: str) -> list[tuple[str, str]]:
    """``[(name, weights)]`` for a ``timm:`` or ``tv:`` glob pattern: timm's architectures and
    pretrained tags, or torchvision's models and their weights."""
    if source_of(pattern) == "timm":
        import timm

        glob = pattern[len(TIMM):] or "*"
        tags = timm.list_pretrained(glob if "." in glob else f"{glob}.*")
        archs = [] if "." in glob else timm.list_models(glob)  # a tag pattern: tags only
        rows = [(TIMM + a, "no pretrained weights") for a in archs
                if not any(t.startswith(a + ".") for t in tags)]
        return sorted(rows + [(TIMM + t, "hub: timm/" + t) for t in tags])
    elif source_of(pattern) == "tv":
        import fnmatch

        from torchvision.models import get_model_weights

        glob = pattern[len(TV):] or "*"
        return [(TV + a, ", ".join(w.name for w in get_model_weights(a)))
                for a in tv_models() if fnmatch.fnmatch(a, glob)]
    else:
        raise ValueError(f"pattern '{pattern}' names no backbone source; valid: "
                         f"'timm:PATTERN', 'tv:PATTERN' (e.g. 'timm:convnext*').")


def on_meta(build: Any) -> nn.Module:
    """``build()`` on the meta device (shapes only), or on the CPU for the few builders that
    compute with tensors (torchvision's RegNets)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        return build()
