"""Exported models: ``model.safetensors`` (weights) + ``model.json`` (how to rebuild and feed it).

Both files are written atomically; ``load_model`` needs nothing else to rebuild the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.errors import ExportError, first_line
from finetune.files import atomic_write, atomic_write_text
from finetune.models import create_model, unwrap
from finetune.models.backbones import TIMM, source_of
from finetune.models.interface import classifier_name
from finetune.version import __version__

WEIGHTS = "model.safetensors"
META = "model.json"
TIMM_CONFIG = "config.json"
REQUIRED_META = ("architecture", "num_classes", "in_chans", "image_size", "mean", "std",
                 "class_names")


def model_meta(*, architecture: str, class_names: list[str], in_chans: int, image_size: int,
               norm: str, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float,
               interpolation: str, resample: str, recipe: str | None, pretrained: str | None,
               data: str, train_images: int, test_images: int,
               pretrained_cfg: dict | None = None, augment: dict | None = None) -> dict:
    """``model.json``'s content: what rebuilds and feeds the model (``REQUIRED_META``; the
    evaluation transform is: shorter side to ``floor(image_size / crop_pct)`` with
    ``interpolation``, center crop, then ``(x / 255 - mean) / std``; ``resample`` says whether
    images were resized one at a time ("image") or, square, as float batches ("batch")), and
    where it came from: the weights and the backbone's own ``pretrained_cfg`` (timm's or
    torchvision's, e.g. the mean, std and crop its ImageNet weights were made with)."""
    return {"architecture": architecture, "num_classes": len(class_names),
            "in_chans": in_chans, "image_size": image_size, "norm": norm, "mean": list(mean),
            "std": list(std), "crop_pct": crop_pct, "interpolation": interpolation,
            "resize": math.floor(image_size / crop_pct), "resample": resample,
            "class_names": list(class_names),
            "recipe": recipe, "pretrained": pretrained,
            "pretrained_cfg": _json_safe(pretrained_cfg or {}),
            # what training flipped and translated: the views of test-time augmentation
            "augment": augment or {"hflip": False, "crop_pad": 0}, "data": data,
            "train_images": train_images, "test_images": test_images,
            "finetune_version": __version__}


def _json_safe(cfg: dict) -> dict:
    plain = (str, int, float, bool, type(None))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
            if isinstance(v, plain) or (isinstance(v, tuple | list)
                                        and all(isinstance(x, plain) for x in v))}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's state dict as one safetensors file, written atomically."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def save_model(model: nn.Module, meta: dict, out_dir: str | Path) -> None:
    """Write ``out_dir/model.safetensors`` and ``out_dir/model.json``, and timm's
    ``config.json`` for a model whose ``pretrained_cfg`` says timm loads it unchanged."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}")
    out_dir = Path(out_dir)
    model = unwrap(model)
    save_weights(model, out_dir / WEIGHTS)
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2) + "\n")
    if (source_of(meta["architecture"]) == "timm"
            or getattr(model, "pretrained_cfg", {}).get("timm_compatible")):
        atomic_write_text(out_dir / TIMM_CONFIG,
                          json.dumps(timm_config(meta, model), indent=2) + "\n")


def timm_config(meta: dict, model: nn.Module) -> dict:
    """A timm ``config.json``: ``timm.create_model("local-dir:RUN_DIR", pretrained=True)``
    then rebuilds the model, channels, head and preprocessing included."""
    size = meta["image_size"]
    arch = meta["architecture"].removeprefix(TIMM).partition(".")[0]
    model_args = {"in_chans": meta["in_chans"]}
    if model.pretrained_cfg.get("fixed_input_size"):  # e.g. a ViT's position embeddings
        model_args["img_size"] = size
    return {
        "architecture": arch,
        "num_classes": meta["num_classes"],
        "num_features": getattr(model, "num_features", None) or model.get_classifier().in_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [meta["in_chans"], size, size],
            "interpolation": meta.get("interpolation", "bilinear"),
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
            "crop_pct": meta.get("crop_pct", 1.0),
            "crop_mode": "center",
            "num_classes": meta["num_classes"],
            "first_conv": model.pretrained_cfg["first_conv"],
            "classifier": classifier_name(model),
        },
        "label_names": list(meta["class_names"]),
    }


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """``(weights_file, metadata)`` for a run folder or a ``model.safetensors`` path."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    meta_file = weights.with_name(META)
    if not weights.is_file() or not meta_file.is_file():
        raise ExportError(f"{path}: no exported model here (need {WEIGHTS} and "
                          f"{META} side by side, as a finished `finetune train` writes).")
    return weights, _read_json(meta_file)


def exported_meta(folder: str | Path) -> dict:
    """The ``model.json`` of the export in ``folder``, or {} when nothing was exported there."""
    meta_file = Path(folder) / META
    return _read_json(meta_file) if meta_file.is_file() else {}


def _read_json(meta_file: Path) -> dict:
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_file} is not JSON ({e}); the export is damaged: export the "
                          f"run again, or restore the file.") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{meta_file} holds no JSON object; the export is damaged.")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ExportError(f"{meta_file}: missing fields {missing}.")
    if not isinstance(meta["class_names"], list) or \
            len(meta["class_names"]) != meta["num_classes"]:
        raise ExportError(f"{meta_file}: {len(meta['class_names'])} class_names for "
                          f"num_classes={meta['num_classes']}; the export is damaged.")
    return meta


def meta_beside(weights: str | Path | None) -> dict:
    """The ``model.json`` of a finetune export beside a weights file or in a weights folder,
    or {} (other weights)."""
    path = Path(weights).expanduser() if weights else None
    if path is None or not path.exists():
        return {}
    return exported_meta(path if path.is_dir() else path.parent)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild an exported model in eval mode; returns ``(model, metadata)``."""
    weights, meta = read_meta(path)
    try:
        model = create_model(meta["architecture"], num_classes=meta["num_classes"],
                             in_chans=meta["in_chans"], image_size=meta["image_size"],
                             norm=meta.get("norm", "torch"))
    except (ValueError, TypeError) as e:
        raise ExportError(f"{weights.with_name(META)} describes a model this finetune cannot "
                          f"build: {e}") from None
    try:
        model.load_state_dict(load_file(weights))  # on the CPU: safetensors reads no "cpu:0"
    except RuntimeError as e:
        raise ExportError(f"{weights} does not match {META} "
                          f"({meta['architecture']}): {first_line(e)}") from None
    return model.to(device).eval(), meta


def export_onnx(path: str | Path, out: str | Path | None = None, opset: int = 18) -> Path:
    """Write ``model.onnx`` (input ``input`` (batch, C, H, W) already normalized, output
    ``logits``) with a dynamic batch dimension and the preprocessing in its metadata
    (``image_size``, ``crop_pct``, ``resize``, ``interpolation``, ``mean``, ``std``); returns
    its path."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install "
                          "'finetune[onnx]' (or pip install onnx onnxscript).") from None
    model, meta = load_model(path)
    weights, _ = read_meta(path)
    out = Path(out) if out else weights.with_name("model.onnx")
    size = meta["image_size"]
    example = torch.zeros(2, meta["in_chans"], size, size)
    batch = torch.export.Dim("batch", min=1, max=65_536)

    def write(tmp: Path) -> None:
        import onnx

        torch.onnx.export(model, (example,), str(tmp), input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: batch},),
                          opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)
        # The preprocessing the input needs travels inside the file, as model.json has it.
        graph = onnx.load(str(tmp))
        for key in ("image_size", "crop_pct", "resize", "interpolation", "mean", "std",
                    "in_chans", "class_names"):
            if key in meta:
                graph.metadata_props.add(key=key, value=json.dumps(meta[key]))
        onnx.save(graph, str(tmp))

    atomic_write(out, write)
    return out
