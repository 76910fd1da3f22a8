"""finetune: transfer learning for image classification, trained with Accelerate."""

__version__ = "0.1.0"
