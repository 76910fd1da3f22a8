"""ResNet-18 from scratch on an ImageFolder with a plain LightningModule, as Lightning's docs
build one: torchvision ``ImageFolder`` + ``DataLoader``, ``training_step`` /
``validation_step``, ``configure_optimizers`` returning the optimizer and a per-step scheduler
(``"interval": "step"``), and ``Trainer(max_epochs=..., accelerator="auto")`` validating every
epoch:

    python bench/peers/lightning_run.py --data DIR --out DIR --mean M --std S [--epochs 3 ...]

The network is torchvision's ``resnet18(num_classes=10)`` with its first convolution replaced
by a 1-channel one, initialised as torchvision initialises it (Kaiming-normal, fan-out).
Checkpointing and the logger are off (the other peers save nothing either); Lightning's default
sanity check (two validation batches before training) is kept.
"""

from __future__ import annotations

import time

import lightning as L
from peerlib import decay_groups, emit, emit_versions, one_cycle, parser, probe_first_step, sgd
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet18


def resnet18_1ch() -> nn.Module:
    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class Classifier(L.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = resnet18_1ch()
        self.loss = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        self.correct, self.seen = 0, 0

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self(x), y)

    def on_validation_epoch_start(self):
        self.correct, self.seen = 0, 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.correct += int((self(x).argmax(1) == y).sum())
        self.seen += len(y)

    def configure_optimizers(self):
        optimizer = sgd(decay_groups(self.model.parameters(), self.args.weight_decay), self.args)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": one_cycle(optimizer, self.args, total),
                                 "interval": "step"}}


class EpochReport(L.Callback):
    """Training seconds per epoch: from on_train_epoch_start to the end of its last training
    batch (Lightning validates inside the training epoch, before on_train_epoch_end, and starts
    the validation loader's workers before any validation hook)."""

    def __init__(self, images_per_epoch: int):
        self.images, self.start, self.seconds = images_per_epoch, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds = time.perf_counter() - self.start

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            emit("epoch", epoch=trainer.current_epoch + 1, epoch_time=self.seconds,
                 images=self.images, test_acc=pl_module.correct / pl_module.seen)


def grey(path: str) -> Image.Image:
    """ImageFolder's loader, opening in mode L instead of converting to RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("L")


def loaders(args) -> tuple[DataLoader, DataLoader]:
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize([args.mean], [args.std])])
    train = datasets.ImageFolder(f"{args.data}/train", transform=to_tensor, loader=grey)
    test = datasets.ImageFolder(f"{args.data}/test", transform=to_tensor, loader=grey)
    return (DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                       num_workers=args.workers),
            DataLoader(test, batch_size=args.eval_batch_size, num_workers=args.workers))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    emit_versions("lightning", "torch", "torchvision")
    probe_first_step()
    L.seed_everything(args.seed)
    train, test = loaders(args)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="auto", devices=1,
                        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                        enable_checkpointing=False, logger=False, default_root_dir=args.out,
                        callbacks=[EpochReport(len(train) * args.batch_size)])
    trainer.fit(Classifier(args), train, test)


if __name__ == "__main__":
    main()
