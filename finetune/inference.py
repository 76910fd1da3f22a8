"""Use an exported model: ``finetune.load(run_dir)`` and ``Predictor.predict(images)``.

Preprocessing is exactly training's evaluation, from ``model.json``: an image file is opened as
training opened it (:func:`~finetune.data.images.open_image`, in the model's channel mode),
its shorter side resized to ``image_size / crop_pct`` with the recorded interpolation and
center-cropped (:func:`~finetune.data.images.eval_transform`); then the same batched
normalization (:class:`~finetune.data.loader.BatchTransform`) as training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from finetune.data.images import eval_resize, eval_transform, open_image, pil_to_uint8, to_mode
from finetune.data.loader import BatchTransform
from finetune.data.sources import IMAGE_SUFFIXES
from finetune.errors import ConfigError
from finetune.export import load_model
from finetune.multilabel import sigmoid_probs


@dataclass
class Predictor:
    """An exported model with its preprocessing and class names."""

    model: nn.Module
    transform: BatchTransform  # batched: to float, channels, normalization
    class_names: list[str]
    meta: dict
    # "bf16": run under bf16 autocast on the model's device, as a bf16 run was evaluated.
    precision: str = "fp32"

    @property
    def multilabel(self) -> bool:
        """A sigmoid per class (``model.json``'s task): an image may have any of the tags."""
        return self.meta.get("task") == "multilabel"

    @property
    def thresholds(self) -> torch.Tensor:
        """Multi-label: the probability over which each tag is predicted (``model.json``,
        checked when it was read)."""
        return torch.tensor(self.meta["thresholds"], dtype=torch.float64)

    @property
    def crop_pct(self) -> float:
        return float(self.meta.get("crop_pct", 1.0))

    @property
    def resample(self) -> str:
        """How training resized: "image" (each image, resized and cropped), "batch" (square
        images, float batches on the device) or "squash" (exports older than crop_pct: every
        image resized to a square as a float batch)."""
        return self.meta.get("resample", "squash" if "crop_pct" not in self.meta else "image")

    @property
    def need(self) -> int:
        """The shorter side a file is decoded to at least (JPEG draft decoding)."""
        return eval_resize(self.meta["image_size"], self.crop_pct)

    @property
    def image_transform(self):
        """One image (PIL, or uint8 (C, H, W)) -> uint8 (C, size, size): resize, center crop."""
        return eval_transform(self.meta["image_size"], self.crop_pct,
                              self.meta.get("interpolation", "bilinear"))

    @property
    def tta(self) -> tuple[bool, int]:
        """Test-time augmentation as the model was trained: ``(mirror, shift)``, from
        model.json's ``augment`` (older exports: mirror only)."""
        augment = self.meta.get("augment", {})
        return bool(augment.get("hflip", True)), int(augment.get("crop_pad", 0))

    def check_tta(self) -> None:
        """Refuse test-time augmentation where it has nothing to add: the views are those the
        model trained with (:attr:`tta`), and one trained with neither has none."""
        if self.tta == (False, 0):
            raise ConfigError("tta: this model trained without mirror images or shifts "
                              "(data.hflip=false, data.crop_pad=0), so test-time augmentation "
                              "has no views to add to the plain one; leave tta out.")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_uint8(self, image: str | Path | Image.Image | torch.Tensor) -> torch.Tensor:
        """An image file, a PIL image (any mode) or a uint8 tensor (C, H, W) -> uint8
        (C, size, size) as training's evaluation saw it. A tensor whose crop is the whole
        (square) image is left to the batched resize, as resident training data was."""
        batched = self.resample != "image"
        if isinstance(image, (str, Path)):
            image = open_image(image, self.meta["in_chans"], 0 if batched else self.need)
        if isinstance(image, Image.Image):
            image = to_mode(image, self.meta["in_chans"])
            return self._cropped(pil_to_uint8(image)) if batched else self.image_transform(image)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"expected a uint8 tensor (C, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        return self._cropped(image)

    def _cropped(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) as training cropped them before the batched resize (and
        normalization) of :attr:`transform`: resized and center-cropped one at a time, a
        center square, or (older exports) whole."""
        if self.resample == "image":
            return self.image_transform(images)
        if self.resample == "batch":
            h, w = images.shape[-2:]
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            return images[..., top:top + side, left:left + side]
        return images

    def views(self, image: str | Path | Image.Image | torch.Tensor, tta: bool = False
              ) -> torch.Tensor:
        """One image as the model's input views (V, C, S, S): the plain view, then with
        ``tta`` its test-time views (:attr:`tta`)."""
        if tta:
            self.check_tta()
        image = self.to_uint8(image)[None]
        return torch.cat(self.transform.views(image, *self.tta) if tta
                         else [self.transform(image)])

    def log_probs(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Log-probabilities (float32) of a batch given as normalized views on the model's
        device, in the precision the model was evaluated in: the views' average."""
        if self.multilabel:
            return self.tag_probs(views).log()
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            return predict_log_probs(self.model, views)

    def tag_probs(self, views: list[torch.Tensor]) -> torch.Tensor:
        """A multi-label model's probabilities (float32) of a batch of views: each tag's
        sigmoid, averaged over the views."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            return sigmoid_probs(self.model, views)

    def probabilities(self, images: torch.Tensor | list[str | Path | Image.Image | torch.Tensor],
                      tta: bool = False) -> torch.Tensor:
        """Probabilities (N, num_classes) of :meth:`logits`' images: a softmax over the
        classes, or (multi-label) each tag's sigmoid."""
        out = self.logits(images, tta=tta).float()
        if tta:  # already the log of the views' averaged probabilities
            return out.exp()
        return out.sigmoid() if self.multilabel else out.softmax(dim=1)

    def batch_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input (N, C, S, S) for a uint8 batch (N, C, H, W) of one size."""
        return self.transform(self._cropped(images.to(self.device)))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor | list[str | Path | Image.Image | torch.Tensor],
               batch_size: int = 256, tta: bool = False) -> torch.Tensor:
        """Logits (N, num_classes) of a uint8 batch (N, C, H, W) or a list of images (files,
        PIL images or tensors), which may differ in size (each is then resized and cropped on
        its own); the model runs on batches of ``batch_size``. ``tta``: log-probabilities of
        the test-time views (:attr:`tta`) averaged, instead."""
        if tta:
            self.check_tta()
        if isinstance(images, torch.Tensor):
            chunks = [self._cropped(images[i:i + batch_size]).to(self.device)
                      for i in range(0, len(images), batch_size)]
        else:  # one at a time: sizes may differ before the batched resize
            chunks = [self.to_uint8(im)[None].to(self.device) for im in images]
        views = [self.transform.views(c, *self.tta) if tta else [self.transform(c)]
                 for c in chunks]
        stacked = [torch.cat([v[k] for v in views]) for k in range(len(views[0]))]
        if tta:
            return torch.cat([self.log_probs([s[i:i + batch_size] for s in stacked])
                              for i in range(0, len(stacked[0]), batch_size)])
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            return torch.cat([self.model(stacked[0][i:i + batch_size])
                              for i in range(0, len(stacked[0]), batch_size)]).float()

    def predict(self, images: list[str | Path | Image.Image | torch.Tensor], top_k: int = 5,
                tta: bool = False) -> list[list[tuple[str, float]]]:
        """For each image, the ``top_k`` (class name, probability) pairs, most likely first;
        a multi-label model's: every tag over its threshold (``top_k`` does not apply).
        ``tta``: averaged over its test-time views (mirror image, shifts: :attr:`tta`)."""
        probs = self.probabilities(images, tta)
        if self.multilabel:
            return tags_over(probs, self.class_names, self.thresholds)
        return top_classes(probs, self.class_names, top_k)


def top_classes(probs: torch.Tensor, names: list[str], top_k: int
                ) -> list[list[tuple[str, float]]]:
    """For each row of ``probs`` (N, classes), its ``top_k`` (name, probability) pairs, most
    likely first."""
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[(names[i], float(p)) for p, i in zip(vs, ix, strict=True)]
            for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]


def single_label(predictor: Predictor, what: str) -> Predictor:
    """``predictor``, unless it is multi-label, which ``what`` (a command that reads one
    class per image from a softmax) refuses with one line."""
    refuse_tags(predictor.meta, what)
    return predictor


def refuse_tags(meta: dict, what: str) -> None:
    """:func:`single_label` on a ``model.json``, before anything is loaded or written."""
    if meta.get("task") == "multilabel":
        raise ConfigError(f"{what} reads one class per image (a softmax); this model is "
                          f"multi-label (a sigmoid per tag: model.json's task): finetune "
                          f"predict and finetune evaluate score its tags.")


def tags_over(probs: torch.Tensor, names: list[str], thresholds: torch.Tensor
              ) -> list[list[tuple[str, float]]]:
    """For each row of ``probs`` (N, classes), the (name, probability) pairs of the tags at or
    over their threshold, most likely first (an empty list: no tag)."""
    cuts = thresholds.tolist()
    return [over_thresholds(list(zip(names, row, strict=True)), cuts)
            for row in probs.float().cpu().tolist()]


def over_thresholds(pairs: list[tuple[str, float]], thresholds: list[float]
                    ) -> list[tuple[str, float]]:
    """The ``(tag, probability)`` pairs at or over their threshold, most likely first."""
    return sorted((pair for pair, cut in zip(pairs, thresholds, strict=True) if pair[1] >= cut),
                  key=lambda pair: -pair[1])


def probability_pairs(ranked: list[tuple[str, float]]) -> list[dict]:
    """``(class, probability)`` pairs as JSON objects, probabilities to 6 decimals."""
    return [{"class": c, "probability": round(p, 6)} for c, p in ranked]


def predict_log_probs(model: nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    """Log-probabilities (float32) of a batch given as one or more normalized views of it
    (test-time augmentation: :meth:`BatchTransform.views`): the views' probabilities
    averaged."""
    log_probs = torch.stack([F.log_softmax(model(v).float(), dim=1) for v in views])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(views))


def load(path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32"
         ) -> Predictor:
    """Load an exported model (a run folder or its ``model.safetensors``) for prediction."""
    model, meta = load_model(path, device=device)
    transform = BatchTransform(meta["image_size"], meta["in_chans"], meta["mean"], meta["std"])
    return Predictor(model, transform, list(meta["class_names"]), meta, precision)


def image_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into image files; keep files as given."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in "
                                f"{', '.join(map(str, paths))}")
    return files
