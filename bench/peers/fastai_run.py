"""ResNet-18 from scratch on an ImageFolder with fastai, as its vision tutorial does it:
``ImageDataLoaders.from_folder`` (grey images: ``img_cls=PILImageBW``), ``vision_learner``
(``n_in=1``, ``pretrained=False``) and ``fit_one_cycle``:

    python bench/peers/fastai_run.py --data DIR --out DIR --mean M --std S [--epochs 3 ...]

Made the same work as the other peers:
- the network: vision_learner's default head (concat pooling, BatchNorm, dropout, Linear 1024-512,
  BatchNorm, dropout, Linear 512-10) is replaced through its documented ``custom_head`` by
  ResNet-18's own (average pooling, Linear 512-10), so the body from torchvision's resnet18 plus
  this head is ResNet-18, 11,175,370 parameters. Its init is torchvision's: ``init=None`` keeps
  torch's default for the head's Linear (vision_learner would apply Kaiming-normal), and the
  1-channel first convolution that fastai makes (torch's default init) is re-initialised as
  torchvision does (Kaiming-normal, fan-out).
- the optimizer: fastai's own SGD has no Nesterov momentum and decouples weight decay, so
  ``opt_func`` builds torch's SGD (nesterov, L2 decay on conv/linear weights only) inside
  fastai's ``OptimWrapper``, as fastai's optimizer docs show for PyTorch optimizers.
- the schedule: ``fit_one_cycle(pct_start=0.25, div=25, div_final=1e4, moms=(0.9,)*3)`` is
  torch's OneCycleLR without momentum cycling (fastai also steps it per batch).
- the loss: ``CrossEntropyLossFlat(label_smoothing=...)``; normalisation with the given
  mean/std (vision_learner adds ImageNet statistics only for pretrained models).
- bf16 (--precision bf16): ``learn.to_bf16()`` on a GPU; on a CPU a callback that autocasts to
  bf16 where fastai's MixedPrecision would (it hard-codes ``autocast('cuda')``).
"""

from __future__ import annotations

import time
from functools import partial

import torch
from fastai.vision.all import (
    Callback,
    CrossEntropyLossFlat,
    ImageDataLoaders,
    MixedPrecision,
    Normalize,
    OptimWrapper,
    PILImageBW,
    Recorder,
    accuracy,
    set_seed,
    vision_learner,
)
from peerlib import decay_groups, emit, emit_versions, parser, probe_first_step, sgd
from torch import nn
from torchvision.models import resnet18


class EpochReport(Callback):
    """Training seconds per epoch (before_train to after_train) and the accuracy metric of the
    validation that follows (read after the Recorder has accumulated it)."""
    order = Recorder.order + 1

    def before_train(self):
        self.start = time.perf_counter()

    def after_train(self):
        self.seconds = time.perf_counter() - self.start

    def after_validate(self):
        train = self.learn.dls.train
        emit("epoch", epoch=self.learn.epoch + 1, epoch_time=self.seconds,
             images=len(train) * train.bs, test_acc=float(self.learn.metrics[0].value))


class CpuBf16(Callback):
    """bf16 autocast on a CPU: fastai's to_bf16 (MixedPrecision) autocasts on CUDA only. Entered
    and left where MixedPrecision does (before_batch, after_loss); bf16 needs no loss scaling."""
    order = MixedPrecision.order

    def before_batch(self):
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self.autocast.__enter__()

    def after_loss(self):
        self.autocast.__exit__(None, None, None)


def torch_sgd(param_groups, lr, args):
    """fastai's opt_func(params, lr): torch's SGD over decay groups, in OptimWrapper."""
    groups = decay_groups((p for group in param_groups for p in group), args.weight_decay)
    return OptimWrapper(opt=sgd(groups, args))


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    emit_versions("fastai", "torch", "torchvision")
    probe_first_step()
    set_seed(args.seed)
    dls = ImageDataLoaders.from_folder(
        args.data, train="train", valid="test", img_cls=PILImageBW, bs=args.batch_size,
        val_bs=args.eval_batch_size, num_workers=args.workers,
        batch_tfms=Normalize.from_stats([args.mean], [args.std]))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, dls.c))
    learn = vision_learner(dls, resnet18, n_in=1, pretrained=False, custom_head=head,
                           loss_func=CrossEntropyLossFlat(label_smoothing=args.smoothing),
                           opt_func=partial(torch_sgd, args=args), metrics=accuracy,
                           init=None, path=args.out, cbs=EpochReport())
    conv1 = learn.model[0][0]  # the body's first convolution, made by fastai for n_in=1
    nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
    if args.precision == "bf16" and torch.cuda.is_available():
        learn.to_bf16()
    elif args.precision == "bf16":
        learn.add_cb(CpuBf16())
    learn.fit_one_cycle(args.epochs, lr_max=args.lr, div=25.0, div_final=1e4, pct_start=0.25,
                        moms=(args.momentum,) * 3)


if __name__ == "__main__":
    main()
