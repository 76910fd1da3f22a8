"""finetune: transfer learning for image classification, trained with Accelerate.

Using a trained model::

    import finetune
    predictor = finetune.load("runs/resnet18_fmnist/20261129-120000")
    finetune.predict(predictor, [PIL.Image.open("shoe.png")])  # [[("Sneaker", 0.97), ...]]
"""

from __future__ import annotations

from finetune.version import __version__

__all__ = ["__version__", "load", "predict"]


def load(path, device="cpu"):
    """An exported model (run folder or model.safetensors) with preprocessing and class names:
    a :class:`finetune.inference.Predictor`."""
    from finetune.inference import load as _load

    return _load(path, device)


def predict(model, images, top_k: int = 5):
    """Top-k ``(class name, probability)`` per image (PIL images or uint8 CHW tensors);
    ``model`` is a Predictor from :func:`load` or a path to load one from."""
    from finetune.inference import Predictor

    predictor = model if isinstance(model, Predictor) else load(model)
    return predictor.predict(list(images), top_k=top_k)
