"""A run's own data read back for a finished model (``export-onnx --int8``, ``inspect``): the
splits named by its ``config.yaml`` (or ``data.*`` overrides), and the model's inputs for any
of their images, preprocessed exactly as ``finetune predict`` preprocesses them."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config import load_config
from finetune.data import load_data
from finetune.data.images import open_image
from finetune.data.sources import ImageData
from finetune.errors import ConfigError, DataError
from finetune.inference import Predictor
from finetune.runs import config_file


def run_data(run_dir: Path, overrides: list[str], predictor: Predictor, command: str,
             purpose: str) -> tuple:
    """(train, test, source) of the data the run in ``run_dir`` was trained on, read by index;
    ``command`` and ``purpose`` ("calibrate and measure") word the errors."""
    saved = config_file(run_dir)
    if saved is None and not any(o.startswith("data.") for o in overrides):
        raise ConfigError(f"{run_dir} has no config.yaml to say which data the model was trained "
                          f"on: pass data.root=... (data.* overrides) to {purpose}.")
    cfg = load_config(([f"recipe={saved}"] if saved else []) + overrides)
    if cfg.data.streaming:
        raise ConfigError(f"{command} reads the training and test images by index: a streamed "
                          f"dataset (data.streaming=true) cannot; pass data.streaming=false.")
    train, test, source = load_data(cfg.data)
    if test.classes != predictor.class_names:
        raise DataError(f"the run's data has the classes {test.classes}, the model "
                        f"{predictor.class_names}; point data.* at the data it was trained on.")
    return train, test, source


def model_inputs(predictor: Predictor, split, indices: list[int], batch: int = 256
                 ) -> torch.Tensor:
    """The model's inputs (N, C, S, S) on its device for images ``indices`` of ``split``."""
    chunks = []
    for start in range(0, len(indices), batch):
        part = indices[start:start + batch]
        if isinstance(split, ImageData):
            chunks.append(predictor.batch_inputs(split.images[part]))
        else:
            chunks += [predictor.views(split_image(split, i)).to(predictor.device)
                       for i in part]
    return torch.cat(chunks)


def split_image(split, i: int):
    """Image ``i`` of a split as PIL or uint8 (C, H, W), decoded as training decoded it."""
    raw = split.raw(i)
    return open_image(raw, split.channels, name=split.name(i)) if isinstance(raw, bytes) else raw
