"""LoRA (``finetune.method=lora``) through the peft library: low-rank adapters beside frozen
weights, the classifier trained whole.

Adapters are injected in place (peft's ``inject_adapter_in_model``): the model stays the
model, its parameter names keep their prefixes (``layer1.0.conv1.lora_A.default.weight``), so
the stages of ``finetune.optim`` still group them. Exports merge the adapters into plain
weights (:func:`merged`); :func:`save_adapter` writes the adapter in peft's own format beside.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from types import ModuleType

from safetensors.torch import save_file
from torch import nn

from finetune.config import FinetuneConfig
from finetune.errors import ConfigError
from finetune.files import atomic_write, atomic_write_text
from finetune.models.interface import classifier_name, unwrap

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what peft's LoRA can merge


def _peft() -> ModuleType:
    """The peft library, an optional extra."""
    try:
        import peft
    except ImportError:
        raise ConfigError("finetune.method=lora needs the peft library: "
                          "pip install 'finetune[peft]'") from None
    return peft


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """The layers an adapter can be merged into: linear layers and ungrouped convolutions,
    not the classifier (it trains whole) nor the linears that ``nn.MultiheadAttention`` reads
    by their weights (an adapter there would be bypassed)."""
    head = classifier_name(model)
    inside_attention = {f"{name}.{child}" for name, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for child, _ in
                        m.named_children()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ADAPTABLE) and getattr(m, "groups", 1) == 1
            and name != head and name not in inside_attention}


def _first_conv(model: nn.Module) -> str | None:
    """The convolution the input meets: the model's ``pretrained_cfg["first_conv"]``, else its
    first convolution."""
    name = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if isinstance(name, str) and name:
        return name
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def default_targets(model: nn.Module) -> list[str]:
    """The modules that get adapters when ``finetune.lora_targets`` is unset, by the module
    types present:

    - a transformer (attention modules: timm's with a ``qkv`` linear, or torch's
      ``nn.MultiheadAttention``): its linear layers, i.e. a ViT's attention ``qkv`` and
      ``proj`` and MLP ``fc1``/``fc2``; its patch embedding stays as it is;
    - any other model (ResNet, ConvNeXt, EfficientNet, VGG, AlexNet): its linear layers and
      ungrouped convolutions but the first one (the input convolution, with one input channel
      a k x k filter whose fan-in barely exceeds the rank: an adapter saves nothing there).

    Never the classifier (it trains whole), nor depthwise/grouped convolutions (peft cannot
    merge their adapters for export, and they hold few weights).
    """
    model = unwrap(model)
    attention = any(isinstance(m, nn.MultiheadAttention)
                    or isinstance(getattr(m, "qkv", None), nn.Linear) for m in model.modules())
    kinds = (nn.Linear,) if attention else ADAPTABLE
    first = _first_conv(model)
    return [name for name, m in _adaptable(model).items()
            if isinstance(m, kinds) and name != first]


def _matches(target: str, name: str) -> bool:
    """peft's rule for a name (``qkv`` is every ``*.qkv``), else a regular expression that
    matches the whole module name."""
    return name == target or name.endswith(f".{target}") or re.fullmatch(target, name) is not None


def resolve_targets(model: nn.Module, fcfg: FinetuneConfig) -> list[str]:
    """The module names that get adapters: those ``finetune.lora_targets`` matches among the
    adaptable layers, else :func:`default_targets`. A one-line ConfigError when peft is missing
    or nothing matches (the model may be on the meta device: only names are read)."""
    _peft()
    model = unwrap(model)
    if fcfg.lora_targets is None:
        found = default_targets(model)
    else:
        layers = _adaptable(model)
        try:
            found = [n for n in layers if any(_matches(t, n) for t in fcfg.lora_targets)]
        except re.error as e:
            raise ConfigError(f"finetune.lora_targets: {e.pattern!r} is not a regular "
                              f"expression ({e.msg}).") from None
        if not found:
            some = list(layers)
            some = some[:3] + some[-2:] if len(some) > 5 else some
            raise ConfigError(f"finetune.lora_targets={list(fcfg.lora_targets)} matches no "
                              f"linear or ungrouped convolution layer of "
                              f"{type(model).__name__} (the classifier trains whole); "
                              f"its layers are e.g. {', '.join(some) or 'none'}: give names, "
                              f"their last parts (conv1, qkv) or regular expressions.")
    if not found:
        raise ConfigError(f"{type(model).__name__} has no layer LoRA can adapt by default; set "
                          f"finetune.lora_targets, or choose another finetune.method.")
    return found


def apply_lora(model: nn.Module, fcfg: FinetuneConfig) -> nn.Module:
    """Inject LoRA adapters (rank ``finetune.lora_rank``, ``lora_alpha``, ``lora_dropout``)
    into ``model`` in place and return it: every base parameter frozen, the adapters and the
    whole classifier trainable."""
    peft = _peft()
    model = unwrap(model)
    targets = resolve_targets(model, fcfg)
    config = peft.LoraConfig(r=fcfg.lora_rank, lora_alpha=fcfg.lora_alpha,
                             lora_dropout=fcfg.lora_dropout, target_modules=targets)
    peft.inject_adapter_in_model(config, model)  # freezes all but the adapters
    model.get_submodule(classifier_name(model)).requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %d modules: %s of %s parameters train (%.2f %%)", fcfg.lora_rank,
             len(_lora_layers(model)), f"{trains:,}", f"{total:,}", 100 * trains / total)
    return model


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def lora_summary(model: nn.Module) -> dict | None:
    """``{"rank", "alpha", "modules"}`` of the adapters in ``model``; None without any."""
    config = getattr(unwrap(model), "peft_config", {}).get("default")
    if config is None:
        return None
    return {"rank": config.r, "alpha": config.lora_alpha,
            "modules": len(_lora_layers(unwrap(model)))}


def merged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its adapters merged into plain weights and each LoRA layer
    replaced by its base layer: the state dict of the plain model, for export. ``model``
    itself keeps its adapters, unmerged.

    The loop of peft's ``merge_and_unload``: ``inject_adapter_in_model`` keeps no tuner object
    to call it on; the merging is each layer's own ``merge()``.
    """
    plain = copy.deepcopy(unwrap(model))
    for name in _lora_layers(plain):  # outermost first; adapters hold no LoRA layers
        layer = plain.get_submodule(name)
        if hasattr(layer, "unload_and_optionally_merge_module"):
            base = layer.unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                            adapter_names=None)
        else:
            layer.merge()
            base = layer.get_base_layer()
        plain.set_submodule(name, base, strict=True)
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    return plain


def _saved_whole(model: nn.Module) -> list[str]:
    """The modules the adapter carries whole (peft's ``modules_to_save``): the classifier, and
    the batch norms, whose running statistics move while the adapters train."""
    norms = [n for n, m in model.named_modules() if "running_mean" in m._buffers]
    return [classifier_name(model), *norms]


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """The adapter in peft's format: ``folder/adapter_config.json`` and
    ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, folder)``
    loads onto the plain model (the pretrained weights with a new head of the same classes)
    to give ``model``'s outputs; the classifier and batch norms travel whole."""
    peft = _peft()
    model = unwrap(model)
    whole = _saved_whole(model)
    config = copy.deepcopy(model.peft_config["default"])
    config.modules_to_save, config.inference_mode = whole, True
    # As PeftModel.save_pretrained: the adapter's weights without the adapter's name, under
    # the PeftModel's "base_model.model." prefix, the whole modules by their plain names.
    state = peft.get_peft_model_state_dict(model, adapter_name="default")
    for name in whole:
        state.update({f"{name}.{k}": v for k, v in
                      model.get_submodule(name).state_dict().items()})
    state = {f"base_model.model.{k}": v.detach().to("cpu").contiguous()
             for k, v in state.items()}
    folder = Path(folder)
    atomic_write(folder / peft.utils.SAFETENSORS_WEIGHTS_NAME,
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    # The content of peft's config.save_pretrained, written atomically as every finetune file.
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    atomic_write_text(folder / peft.utils.CONFIG_NAME,
                      json.dumps(fields, indent=2, sort_keys=True))
