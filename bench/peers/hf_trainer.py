"""ResNet-18 from scratch on an ImageFolder with the Hugging Face ``Trainer``, the way the
transformers image-classification guide does it: ``load_dataset("imagefolder")``, a
``set_transform`` that turns PIL images into normalised tensors, ``DefaultDataCollator``,
``compute_metrics``, and (for SGD + one-cycle) ``Trainer(optimizers=(optimizer, scheduler))``.

    python bench/peers/hf_trainer.py --data DIR --out DIR --mean M --std S [--epochs 3 ...]

The model is transformers' own ``ResNetForImageClassification`` (the class of microsoft/resnet-18)
built from a ``ResNetConfig``: the HF row then measures transformers' model code under its
Trainer, not timm's network in a wrapper (TimmWrapperForImageClassification would be the timm
row's network again). With basic blocks [2, 2, 2, 2] and widths 64-512 it is torchvision's
ResNet-18 layer for layer (11,175,370 parameters with 1 channel and 10 classes); its init is
torchvision's (Kaiming-normal convolutions, BN 1/0).

The guide's ``evaluate.load("accuracy")`` fetches a metric script from the hub; accuracy is
computed with numpy instead. The dataset's Arrow cache goes to ``--out`` (a fresh one per run:
every run pays the first run's indexing, as finetune decodes its folder every run).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from datasets import load_dataset
from peerlib import decay_groups, emit, emit_versions, one_cycle, parser, probe_first_step, sgd
from torchvision.transforms import Compose, Normalize, ToTensor
from transformers import (
    DefaultDataCollator,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class EpochReport(TrainerCallback):
    """Training seconds per epoch (on_epoch_begin to on_epoch_end: the Trainer evaluates after
    on_epoch_end) and the test accuracy of the evaluation that follows."""

    def __init__(self, images_per_epoch: int):
        self.images, self.start, self.seconds = images_per_epoch, 0.0, 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        emit("epoch", epoch=round(state.epoch), epoch_time=self.seconds, images=self.images,
             test_acc=metrics["eval_accuracy"], test_images=metrics["eval_images"])


def image_folder(args):
    data = load_dataset("imagefolder", data_dir=args.data, cache_dir=f"{args.out}/hf-datasets")
    to_tensor = Compose([ToTensor(), Normalize([args.mean], [args.std])])

    def transforms(examples):
        examples["pixel_values"] = [to_tensor(img.convert("L")) for img in examples["image"]]
        del examples["image"]
        return examples

    data.set_transform(transforms)
    return data


def compute_metrics(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean()),
            "images": len(labels)}  # all of them: dataloader_drop_last applies here too


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    emit_versions("transformers", "datasets", "torch", "torchvision")
    probe_first_step()
    torch.manual_seed(args.seed)
    data = image_folder(args)
    model = ResNetForImageClassification(ResNetConfig(
        num_channels=1, layer_type="basic", depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512], num_labels=10))
    steps = len(data["train"]) // args.batch_size  # dataloader_drop_last: whole batches
    optimizer = sgd(decay_groups(model.parameters(), args.weight_decay), args)
    training_args = TrainingArguments(
        output_dir=f"{args.out}/hf-trainer", num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size, dataloader_drop_last=True,
        dataloader_num_workers=args.workers, label_smoothing_factor=args.smoothing,
        max_grad_norm=0.0,  # the Trainer clips at 1.0 by default; no other peer clips
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to="none",
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        bf16=args.precision == "bf16", seed=args.seed)
    trainer = Trainer(model=model, args=training_args, data_collator=DefaultDataCollator(),
                      train_dataset=data["train"], eval_dataset=data["test"],
                      compute_metrics=compute_metrics,
                      optimizers=(optimizer, one_cycle(optimizer, args, args.epochs * steps)),
                      callbacks=[EpochReport(steps * args.batch_size)])
    trainer.train()


if __name__ == "__main__":
    main()
