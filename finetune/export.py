"""Exported models: ``model.safetensors`` (weights) + ``model.json`` (how to rebuild and feed it).

Both files are written atomically; ``load_model`` needs nothing else to rebuild the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from finetune.config import MAX_IMAGE_SIZE, METHODS, NORMS
from finetune.data.images import INTERPOLATIONS
from finetune.errors import ExportError, first_line
from finetune.fields import (
    MAX_CHANS,
    MEAN_RANGE,
    STD_RANGE,
    boolean,
    check_fields,
    integer,
    mapping,
    number,
    numbers,
    one_of,
    read_json_object,
    text,
)
from finetune.files import atomic_write, atomic_write_text
from finetune.models import create_model, unwrap
from finetune.models.backbones import TIMM, source_of
from finetune.models.interface import classifier_name
from finetune.models.pretrained import load_safetensors
from finetune.probe import KNNHead
from finetune.version import __version__

WEIGHTS = "model.safetensors"
KNN = "knn.safetensors"  # a kNN run's training features (finetune.method=knn)
META = "model.json"
TIMM_CONFIG = "config.json"
REQUIRED_META = ("architecture", "num_classes", "in_chans", "image_size", "mean", "std",
                 "class_names")
DAMAGED = "the export is damaged: export the run again, or restore the file."


def model_meta(*, architecture: str, class_names: list[str], in_chans: int, image_size: int,
               norm: str, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float,
               interpolation: str, resample: str, recipe: str | None, pretrained: str | None,
               data: str, train_images: int, test_images: int,
               pretrained_cfg: dict | None = None, augment: dict | None = None,
               task: str = "single") -> dict:
    """``model.json``'s content: what rebuilds and feeds the model (``REQUIRED_META``; the
    evaluation transform is: shorter side to ``floor(image_size / crop_pct)`` with
    ``interpolation``, center crop, then ``(x / 255 - mean) / std``; ``resample`` says whether
    images were resized one at a time ("image") or, square, as float batches ("batch")), and
    where it came from: the weights and the backbone's own ``pretrained_cfg`` (timm's or
    torchvision's, e.g. the mean, std and crop its ImageNet weights were made with). ``task``:
    single (softmax) or multilabel (a sigmoid per class; training adds its ``thresholds``)."""
    return {"architecture": architecture, "task": task, "num_classes": len(class_names),
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
        # transformers' name for a sigmoid per class (timm reads past it)
        **({"problem_type": "multi_label_classification"}
           if meta.get("task") == "multilabel" else {}),
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
    meta = read_json_object(meta_file, ExportError, DAMAGED)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ExportError(f"{meta_file}: missing fields {missing}; {DAMAGED}")
    check_fields(meta_file, meta, META_CHECKS, ExportError, DAMAGED)
    if meta.get("task") == "multilabel" and "thresholds" not in meta:
        raise ExportError(f"{meta_file}: a multi-label model without 'thresholds' (one "
                          f"probability per class); {DAMAGED}")
    return meta


# --- what each field of model.json must be (checked in this order: mean and std against
# in_chans, class_names against num_classes, crop_pct against image_size) ----------------------

def _class_names(v: object, meta: dict) -> str | None:
    n = meta["num_classes"]
    ok = (isinstance(v, list) and len(v) == n and all(isinstance(c, str) for c in v)
          and len(set(v)) == n)
    return None if ok else f"a list of {n} distinct names, one per class (num_classes={n})"


def _crop_pct(v: object, meta: dict) -> str | None:
    """In (0, 1], and no evaluation resize (image_size / crop_pct) past twice the largest
    image size."""
    limit = 2 * MAX_IMAGE_SIZE
    if number(0, 1, lo_open=True)(v, meta) is None and meta["image_size"] / v <= limit:
        return None
    return f"a number in (0, 1] with image_size / crop_pct at most {limit}"


def _in_chans(meta: dict) -> int:
    return meta["in_chans"]


META_CHECKS = {
    "architecture": text("a model name"),
    "in_chans": integer(1, MAX_CHANS),
    "num_classes": integer(1),
    "image_size": integer(1, MAX_IMAGE_SIZE),
    "mean": numbers(*MEAN_RANGE, _in_chans, "input channel: in_chans"),
    "std": numbers(*STD_RANGE, _in_chans, "input channel: in_chans"),
    "class_names": _class_names,
    "norm": one_of(NORMS),
    "crop_pct": _crop_pct,
    "interpolation": one_of(tuple(INTERPOLATIONS)),
    "resize": integer(1),
    "resample": one_of(("image", "batch", "squash")),
    "augment": {"hflip": boolean, "crop_pad": integer(0, MAX_IMAGE_SIZE)},
    "recipe": text("a recipe", optional=True),
    "pretrained": text("the weights' source", optional=True),
    "pretrained_cfg": mapping,
    "data": text("the data's source"),
    "train_images": integer(0),
    "test_images": integer(0),
    "early_stopping": mapping,
    "ema_decay": number(0, 1),
    "method": one_of(METHODS),
    "lora": mapping,
    "knn": {"k": integer(1), "temperature": number(0, 1e6, lo_open=True), "features": integer(1)},
    "finetune_version": text("a version"),
    "task": one_of(("single", "multilabel")),
    "thresholds": numbers(0, 1, lambda meta: meta["num_classes"], "class: num_classes"),
    "thresholds_from": text("where the thresholds came from"),
}


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
    state = load_safetensors(weights, ExportError, DAMAGED)  # on the CPU: no "cpu:0" there
    misfit = _misfit(model, state, meta)
    if misfit:
        raise ExportError(f"{weights} does not match {META} ({meta['architecture']}): {misfit}; "
                          f"{DAMAGED}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # e.g. a dtype the parameter cannot take
        raise ExportError(f"{weights} does not match {META} "
                          f"({meta['architecture']}): {first_line(e)}") from None
    if meta.get("method") == "knn":  # the classifier votes with the training features
        head = knn_head(weights.parent, meta, model.get_classifier().in_features)
        model.set_submodule(classifier_name(model), head, strict=True)
    return model.to(device).eval(), meta


def save_knn(folder: Path, features: torch.Tensor, labels: torch.Tensor) -> None:
    """A kNN run's training features and labels, ``folder/knn.safetensors``, atomically."""
    tensors = {"features": features.contiguous(), "labels": labels.contiguous()}
    atomic_write(folder / KNN, lambda tmp: save_file(tensors, str(tmp)))


def knn_head(folder: Path, meta: dict, width: int) -> KNNHead:
    """The classifier of an exported kNN run: model.json's ``knn`` and knn.safetensors, whose
    features must be ``width`` wide (what the backbone gives)."""
    path = folder / KNN
    if not isinstance(meta.get("knn"), dict) or not path.is_file():
        raise ExportError(f"{folder}: model.json says method knn, but its 'knn' settings or "
                          f"{KNN} (the training features it votes with) are missing; "
                          f"{DAMAGED}")
    try:
        state = load_file(path)
    except SafetensorError as e:
        raise ExportError(f"{path}: not a readable safetensors file ({first_line(e)}); "
                          f"{DAMAGED}") from None
    x, y = state.get("features"), state.get("labels")
    if (x is None or y is None or x.ndim != 2 or x.shape[1] != width or y.ndim != 1
            or len(x) != len(y) or not len(y)
            or not x.is_floating_point() or not bool(x.isfinite().all())
            or y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= meta["num_classes"]):
        raise ExportError(f"{path} must hold 'features' (N, {width}: the backbone's width) and "
                          f"integer 'labels' (N,) in "
                          f"0..{meta['num_classes'] - 1} (finite features); {DAMAGED}")
    return KNNHead(x, y, meta["num_classes"], meta["knn"]["k"], meta["knn"]["temperature"])


def _misfit(model: nn.Module, state: dict[str, torch.Tensor], meta: dict) -> str | None:
    """How the weights differ from the model model.json describes, naming the field: the
    tensors (its architecture), the first conv's input channels (in_chans), the classifier's
    outputs (num_classes), or another shape; None when they fit."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        parts = [f"{len(missing)} of its tensors are not in the weights (e.g. {missing[0]})"
                 ] if missing else []
        parts += [f"{len(unexpected)} in the weights are not among its tensors (e.g. "
                  f"{unexpected[0]})"] if unexpected else []
        return f"'architecture' does not fit the weights: {', '.join(parts)}"
    wrong = [k for k in target if state[k].shape != target[k].shape]
    if not wrong:
        return None
    key = wrong[0]
    field = ("in_chans" if key.startswith(f"{model.pretrained_cfg.get('first_conv')}.") else
             "num_classes" if key.startswith(f"{classifier_name(model)}.") else "architecture")
    return (f"'{field}'={meta[field]} gives {key} the shape {tuple(target[key].shape)}, the "
            f"weights hold {tuple(state[key].shape)}")


def export_onnx(path: str | Path, out: str | Path | None = None, opset: int = 18) -> Path:
    """Write ``model.onnx`` (input ``input`` (batch, C, H, W) already normalized, output
    ``logits``) with a dynamic batch dimension and the preprocessing in its metadata
    (``image_size``, ``crop_pct``, ``resize``, ``interpolation``, ``mean``, ``std``; and
    ``task``, with a multi-label model's ``thresholds``); returns its path."""
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
        # task and thresholds: a multi-label model's logits go through a sigmoid each
        for key in ("image_size", "crop_pct", "resize", "interpolation", "mean", "std",
                    "in_chans", "class_names", "task", "thresholds"):
            if key in meta:
                graph.metadata_props.add(key=key, value=json.dumps(meta[key]))
        onnx.save(graph, str(tmp))

    atomic_write(out, write)
    return out
