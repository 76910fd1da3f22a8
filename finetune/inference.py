"""Use an exported model: ``finetune.load(run_dir)`` and ``Predictor.predict(images)``.

Preprocessing is exactly training's: images become uint8 tensors in the model's channel mode
(grey or RGB), then go through the same batched resize and normalization
(:class:`~finetune.data.loader.BatchTransform`) with the size and mean/std from ``model.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.data.loader import BatchTransform
from finetune.data.sources import IMAGE_SUFFIXES
from finetune.export import load_model


@dataclass
class Predictor:
    """An exported model with its preprocessing and class names."""

    model: nn.Module
    transform: BatchTransform
    class_names: list[str]
    meta: dict
    # "bf16": run under bf16 autocast on the model's device, as a bf16 run was evaluated.
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_uint8(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image (any mode) or a uint8 tensor (C, H, W) -> uint8 (C, H, W) with the
        model's channel count. Grey <-> RGB conversion of tensors happens in the transform."""
        if isinstance(image, Image.Image):
            if image.mode.startswith("I"):  # 16- or 32-bit integer grey: to 8 bits, scaled
                pixels = torch.from_numpy(np.asarray(image).astype(np.int64))
                scale = 257 if int(pixels.max()) <= 65_535 else 16_843_009
                image = Image.fromarray((pixels / scale).round().to(torch.uint8).numpy())
            mode = "L" if self.meta["in_chans"] == 1 else "RGB"
            image = torch.from_numpy(np.asarray(image.convert(mode)).copy())
            return image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"expected a uint8 tensor (C, H, W), got {image.dtype} "
                             f"{tuple(image.shape)}")
        return image

    @torch.inference_mode()
    def logits(self, images: torch.Tensor | list[Image.Image | torch.Tensor],
               batch_size: int = 256) -> torch.Tensor:
        """Logits (N, num_classes) of a uint8 batch (N, C, H, W) or a list of images, which
        may differ in size (each is then resized on its own); the model runs on batches of
        ``batch_size``."""
        if isinstance(images, torch.Tensor):
            batches = [self.transform(images[i:i + batch_size].to(self.device))
                       for i in range(0, len(images), batch_size)]
        else:
            x = [self.transform(self.to_uint8(im)[None].to(self.device)) for im in images]
            batches = [torch.cat(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            return torch.cat([self.model(b) for b in batches]).float()

    def predict(self, images: list[Image.Image | torch.Tensor], top_k: int = 5
                ) -> list[list[tuple[str, float]]]:
        """For each image, the ``top_k`` (class name, probability) pairs, most likely first."""
        probs = self.logits(images).float().softmax(dim=1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [[(self.class_names[i], float(p)) for p, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)]


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
