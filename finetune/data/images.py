"""One image at a time: opened in the dataset's channel mode, then torchvision.transforms.v2's
standard fine-tuning pipelines (training: RandomResizedCrop + flip + optional auto-augment;
evaluation: resize the shorter side to ``image_size / crop_pct`` and center-crop).

A JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale whose shorter side still covers what
the pipeline needs (``PIL.Image.draft``: the scaling happens in the DCT, so a 12-megapixel photo
trained at 128 px decodes 16-64x fewer pixels). Training, evaluation, ``finetune predict`` and
``finetune evaluate`` all open files through :func:`open_image`, so they see the same pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from finetune.data.idx import DataError
from finetune.errors import one_line

if TYPE_CHECKING:
    from torchvision.transforms import v2

# torchvision's InterpolationMode values. torchvision is imported only where a pipeline is built:
# its import takes 1.4 s (it loads torch._dynamo), which every process of a run would pay.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
AUTO_AUGMENT = ("none", "trivial", "randaugment", "autoaugment", "colorjitter")
DEFAULT_CROP_PCT = 0.875  # timm's and torchvision's ImageNet evaluation crop
# What a bad image's error offers: training and evaluation can skip it, predict cannot.
SKIP_HINT = ", or set data.skip_bad_images=true"
DATA_FIX = f"Remove or replace it{SKIP_HINT}."
FILE_FIX = "Remove it, or pass other files."


def _float_pixels(pixels: np.ndarray, name: str, fix: str) -> np.ndarray:
    """A float ('F') image's pixels in 0..255: values taken as 0..255 when any exceeds 1,
    else as 0..1; clipped. NaN or infinite pixels have no grey level: an error."""
    if not np.isfinite(pixels).all():
        raise DataError(f"{name}: {int((~np.isfinite(pixels)).sum())} pixels are NaN or "
                        f"infinite (a 32-bit float image). {fix}")
    return pixels if pixels.max(initial=0) > 1 else pixels * 255.0


def to_mode(image: Image.Image, channels: int, name: str = "image",
            fix: str = FILE_FIX) -> Image.Image:
    """``image`` in 8-bit grey (``channels=1``) or RGB: 16- and 32-bit integer grey scaled to
    8 bits (PIL's own conversion would clip them), float grey from 0..255 or 0..1, palette and
    alpha images flattened."""
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            pixels = _float_pixels(pixels, name, fix)
        else:
            pixels = pixels / (257.0 if pixels.max(initial=0) <= 65_535 else 16_843_009.0)
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def open_image(source: str | Path | bytes, channels: int, need: int = 0,
               name: str | None = None, fix: str = FILE_FIX) -> Image.Image:
    """Decode an image file (a path, or its bytes) in ``channels`` mode; the first frame of an
    animation. ``need``: the shortest side the caller needs (0: full size), for JPEG draft
    decoding. Raises :class:`DataError` naming the file (or ``name``) when it cannot be
    decoded, ending with ``fix`` (training's offers data.skip_bad_images, predict's not)."""
    name = name or ("image bytes" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if need and image.format == "JPEG":
                image.draft(image.mode, (need, need))  # keeps both sides >= need
            return to_mode(image, channels, name, fix)  # convert() decodes: can close after
    except DataError:
        raise  # a ValueError, but already the whole story (NaN pixels)
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e} Downscale the image first.") from None
    except (OSError, ValueError, SyntaxError) as e:
        # PIL's "cannot identify" names the source: for bytes, an object's address
        why = ("no image format PIL reads" if isinstance(e, UnidentifiedImageError)
               else one_line(e))
        raise DataError(f"{name}: cannot decode image ({why}); the file is corrupt or not an "
                        f"image PIL reads. {fix}") from None


def eval_resize(image_size: int, crop_pct: float) -> int:
    """The shorter side images are resized to before the center crop (timm's rule)."""
    return math.floor(image_size / crop_pct)


def train_need(image_size: int, scale: tuple[float, float]) -> int:
    """The shorter side a training image must keep so that the smallest RandomResizedCrop
    (``scale[0]`` of the area) is still at least ``image_size`` pixels: no draft upsampling."""
    return math.ceil(image_size / math.sqrt(scale[0]))


def eval_transform(image_size: int, crop_pct: float, interpolation: str) -> v2.Compose:
    """PIL image -> uint8 (C, image_size, image_size): shorter side to
    ``image_size / crop_pct``, center crop."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([v2.Resize(eval_resize(image_size, crop_pct),
                                 interpolation=InterpolationMode(interpolation), antialias=True),
                       v2.CenterCrop(image_size), v2.PILToTensor()])


def train_transform(image_size: int, scale: tuple[float, float], ratio: tuple[float, float],
                    interpolation: str, hflip: bool, auto_augment: str) -> v2.Compose:
    """PIL image -> uint8 (C, image_size, image_size): RandomResizedCrop, flip, optional
    auto-augmentation. Random erasing and normalization follow on the device, batched."""
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(interpolation)
    ops: list = [v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=mode,
                                      antialias=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if auto_augment == "trivial":
        ops.append(v2.TrivialAugmentWide(interpolation=mode))
    elif auto_augment == "randaugment":
        ops.append(v2.RandAugment(interpolation=mode))
    elif auto_augment == "autoaugment":
        ops.append(v2.AutoAugment(interpolation=mode))
    elif auto_augment == "colorjitter":
        ops.append(v2.ColorJitter(0.4, 0.4, 0.4))  # timm's default strength
    elif auto_augment != "none":
        raise ValueError(f"unknown data.auto_augment '{auto_augment}'; valid: "
                         f"{', '.join(AUTO_AUGMENT)}")
    ops.append(v2.PILToTensor())
    return v2.Compose(ops)


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An 8-bit PIL image (L or RGB) -> uint8 (C, H, W)."""
    array = torch.from_numpy(np.asarray(image).copy())
    return array[None] if array.ndim == 2 else array.permute(2, 0, 1)
