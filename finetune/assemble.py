"""Assembly: everything a run needs before its first step, from a config and an Accelerator.

``check_model`` refuses what the model cannot do (unknown name, an image size it cannot take,
freezing settings its stages do not allow) before any data or weights load; ``assemble`` loads
the data and the model (pretrained weights, normalization, frozen stages) and places both;
``prepare_training`` adds the optimizer, the schedule and Accelerate's wrapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from torch import nn

from finetune.config import (
    UNTRAINED,
    Config,
    DataConfig,
    check_multilabel,
    check_single_label,
)
from finetune.cpu_convs import swap_small_map_convs
from finetune.data import (
    ImageData,
    Samples,
    fold_split,
    is_multilabel,
    load_data,
    validation_split,
)
from finetune.data.hub import StreamedSplit, streamed_head
from finetune.data.images import (
    DEFAULT_CROP_PCT,
    eval_resize,
    eval_transform,
    train_need,
    train_transform,
)
from finetune.data.loader import (
    BatchTransform,
    Data,
    TrainLoader,
    match_channels,
    place,
    prepared_eval_loader,
)
from finetune.data.samples import preload
from finetune.data.sources import stratified_mask
from finetune.data.stream import StreamedBatches, TrainBatches, balanced_weights, epoch_draws
from finetune.errors import ConfigError, first_line
from finetune.export import meta_beside, model_meta
from finetune.lora import apply_lora, resolve_targets
from finetune.models import (
    Fetched,
    LoadedWeights,
    build_model,
    create_model,
    fetch_state_dict,
    set_grad_checkpointing,
    unwrap,
)
from finetune.models.backbones import check_backbone_name, on_meta
from finetune.models.pretrained import channel_stats, weights_input_size
from finetune.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_model_options,
    no_residual_blocks,
    residual_blocks,
)
from finetune.optim import (
    StagePlan,
    freeze_for_good,
    make_optimizer,
    make_scheduler,
    plan_stages,
    schedule_factor,
)
from finetune.precision import choose_precision
from finetune.speed import compile_model, make_accelerator, tune_backends
from finetune.step import StepOptions

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

log = logging.getLogger(__name__)


def check_model(cfg: Config) -> None:
    """The model the config names, built on the meta device (shapes only, instantly): its
    name, the image size (``None``: the weights' input size, set here) and the freezing
    settings are checked."""
    try:
        check_model_options(cfg.model.name, cfg.model.norm, cfg.model.drop_path_rate)
    except ValueError as e:
        raise ConfigError(f"model.name: {e} (see `finetune models`).") from None
    kind, _, arg = (cfg.model.weights or "").partition(":")
    if cfg.model.pretrained and kind == "timm" and arg and "/" not in arg:
        try:
            check_backbone_name(f"timm:{arg}")
        except ValueError as e:
            raise ConfigError(f"model.weights: {e}") from None
    if cfg.data.image_size is None:
        cfg.data.image_size = default_image_size(cfg)
    size, in_chans = cfg.data.image_size, cfg.model.in_chans or 1
    model = _meta_model(cfg, size, in_chans)
    if cfg.finetune.method == "lora":  # peft installed, finetune.lora_targets match
        resolve_targets(model, cfg.finetune)
    try:  # shapes only: a model that cannot take this size fails here, not after the data
        model.eval()(torch.zeros(2, in_chans, size, size, device=_device_of(model)))
    except NotImplementedError:
        pass  # an operation without a meta kernel: the first step will tell
    except (ValueError, TypeError, RuntimeError, AssertionError, IndexError) as e:
        raise ConfigError(f"model.name={cfg.model.name} cannot take data.image_size={size}: "
                          f"{_first_line(e)}") from None
    try:
        plan_stages(model, cfg.finetune)
    except (TypeError, AttributeError, AssertionError, NotImplementedError) as e:
        raise ConfigError(f"model.name={cfg.model.name}: finetune cannot read its stages "
                          f"(group_matcher): {_first_line(e)}. Choose another model.") from None


def _meta_model(cfg: Config, size: int, in_chans: int) -> nn.Module:
    """The model on the meta device, with gradient checkpointing if asked."""
    try:
        model = on_meta(lambda: create_model(
            cfg.model.name, num_classes=10, in_chans=in_chans, image_size=size,
            norm=cfg.model.norm, drop_path_rate=cfg.model.drop_path_rate))
    except (ValueError, AssertionError, IndexError) as e:
        raise ConfigError(f"model.name={cfg.model.name} cannot take data.image_size={size}: "
                          f"{_first_line(e)}") from None
    except TypeError as e:  # e.g. timm's VGG has no drop_path_rate
        raise ConfigError(f"model.name={cfg.model.name} does not take these model.* settings: "
                          f"{_first_line(e)}") from None
    if cfg.model.init == "zero_residual" and not residual_blocks(model):
        raise ConfigError(no_residual_blocks(model))
    if cfg.model.grad_checkpointing:
        try:
            set_grad_checkpointing(model)
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"model.name={cfg.model.name}: model.grad_checkpointing=true: "
                              f"{_first_line(e)}") from None
    return model


def _first_line(e: BaseException) -> str:
    return first_line(e) or type(e).__name__


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def default_image_size(cfg: Config) -> int:
    """``data.image_size`` when unset: the pretrained weights' input size, else 28."""
    size = (weights_input_size(cfg.model.name, cfg.model.weights) if cfg.model.pretrained
            else None)
    log.info("data.image_size=%d (%s)", size or 28,
             "the pretrained weights' input size" if size else "the default")
    return size or 28


def normalization(mode: str, loaded: LoadedWeights | None, train: Data, in_chans: int,
                  image_size: int, workers: int = 0, skip_bad: bool = False
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the model sees: the pretrained weights', the training images' (up to 10,000
    resident ones, or 256 streamed ones drawn across classes), or none. A bad image among
    those read stops the run unless ``skip_bad`` (data.skip_bad_images), as in training."""
    if mode == "none":
        return (0.0,) * in_chans, (1.0,) * in_chans
    elif mode in ("auto", "imagenet") and loaded is not None:
        return loaded.mean, loaded.std
    elif mode == "imagenet":
        return channel_stats(IMAGENET_MEAN, in_chans), channel_stats(IMAGENET_STD, in_chans)
    elif mode in ("auto", "dataset"):
        if isinstance(train, StreamedSplit):  # the first rows, decoded whole
            images = streamed_head(train, 256, image_size, skip_bad)
        elif isinstance(train, Samples):
            few = train.subset(stratified_mask(train.labels, len(train.classes),
                                               min(256, len(train)), 0))
            images = preload(few, image_size, workers=workers, skip_bad=skip_bad)[0]
        else:
            images = train.images[:10_000]
        sample = match_channels(images.float().div(255), in_chans)
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
    else:
        raise ConfigError(f"unknown data.normalize '{mode}'; valid: auto, imagenet, dataset, none")


@dataclass
class Parts:
    """A run's model (on its device, stages frozen, not yet wrapped), data and preprocessing."""

    model: nn.Module
    loaded: LoadedWeights | None
    plan: StagePlan
    transform: BatchTransform  # on the device: to float, (resident data) augment, normalize
    train_data: Data
    test_data: Data
    val_data: Data | None
    source: str
    placement: str  # "device" / "host": resident uint8 images; "stream": decoded per batch
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float  # evaluation: shorter side to image_size / crop_pct, center crop
    interpolation: str
    # "batch": square uint8 images resized on the device, batched (resident IDX data);
    # "image": each image resized and cropped on its own (decoded files and rows)
    resample: str

    def meta(self, cfg: Config, unreadable: int = 0) -> dict:
        """The exported model's ``model.json`` (``unreadable``: training images skipped as bad
        while streaming, not counted as trained on)."""
        return model_meta(architecture=cfg.model.name, class_names=self.train_data.classes,
                          in_chans=self.in_chans, image_size=cfg.data.image_size,
                          norm=cfg.model.norm, mean=self.mean, std=self.std,
                          crop_pct=self.crop_pct, interpolation=self.interpolation,
                          resample=self.resample, recipe=cfg.recipe,
                          pretrained=self.loaded.source if self.loaded else None,
                          data=self.source, train_images=len(self.train_data) - unreadable,
                          test_images=len(self.test_data),
                          pretrained_cfg=getattr(unwrap(self.model), "pretrained_cfg", {}),
                          augment={"hflip": cfg.data.hflip,
                                   "crop_pad": cfg.data.crop_pad if self.placement != "stream"
                                   else 0},
                          task="multilabel" if is_multilabel(self.train_data) else "single")


MAX_DRAWS = 2 ** 27  # an epoch's order of int64 indices: 1 GiB


def _load(cfg: Config, state: PartialState
          ) -> tuple[Fetched | None, Data, Data, Data | None, str]:
    """Pretrained weights (first: a run that cannot get them fails in seconds, not after the
    data), then the data; the main process fills any download cache first."""
    with state.main_process_first():
        fetched = (fetch_state_dict(cfg.model.name, cfg.model.weights)
                   if cfg.model.pretrained else None)
        train_data, test_data, source = load_data(cfg.data)
    if is_multilabel(train_data):  # data.task=auto found tags: what they cannot go with
        check_multilabel(cfg)
    else:
        check_single_label(cfg)
    val_data, d = None, cfg.data
    if d.folds:  # cross-validation: the held-out fold is the validation split
        train_data, val_data = fold_split(train_data, d.folds, d.fold, d.split_seed,
                                          allow_empty=d.allow_empty_classes)
    elif d.val_split:  # carved from the training images: early stopping never sees test
        train_data, val_data = validation_split(train_data, d.val_split, d.split_seed,
                                                allow_empty=d.allow_empty_classes)
    if len(train_data) < cfg.train.batch_size and cfg.finetune.method not in UNTRAINED:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the "
                          f"{len(train_data)} training images; lower train.batch_size or raise "
                          f"data.train_limit.")
    draws = epoch_draws(len(train_data), d.epoch_repeats)
    if draws > MAX_DRAWS:  # the epoch's order is held, by every streaming worker too
        raise ConfigError(f"data.epoch_repeats={d.epoch_repeats} draws {draws} of the "
                          f"{len(train_data)} training images an epoch, above {MAX_DRAWS}; "
                          f"lower it and raise train.epochs.")
    if draws < cfg.train.batch_size and cfg.finetune.method not in UNTRAINED:
        raise ConfigError(f"data.epoch_repeats={d.epoch_repeats} draws {draws} of the "
                          f"{len(train_data)} training images an epoch, fewer than "
                          f"train.batch_size={cfg.train.batch_size}; raise data.epoch_repeats.")
    return fetched, train_data, test_data, val_data, source


def preprocessing(dcfg: DataConfig, loaded: LoadedWeights | None, placement: str
                  ) -> tuple[float, str]:
    """``(crop_pct, interpolation)`` of evaluation: ``data.*`` when set, else the pretrained
    weights' own (torchvision's weights transforms, timm's pretrained config), else 0.875 and
    bilinear. Resident images are center squares (crop_pct 1): the batched augmentations on the
    device see all of that square."""
    weights = loaded.preprocessing if loaded is not None else {}
    interpolation = dcfg.interpolation or weights.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest", "lanczos"):
        interpolation = "bilinear"  # e.g. timm's "random": training-only
    if placement != "stream":
        crop_pct = 1.0
        if dcfg.crop_pct is not None:
            log.info("data.crop_pct=%g applies to streamed data; resident images are resized "
                     "by their shorter side and center-cropped to a square (crop_pct 1)",
                     dcfg.crop_pct)
    else:
        crop_pct = dcfg.crop_pct or weights.get("crop_pct", DEFAULT_CROP_PCT)
    for key, value in (("crop_pct", crop_pct), ("interpolation", interpolation)):
        if getattr(dcfg, key) == value and weights.get(key, value) != value:
            log.info("data.%s=%s overrides the pretrained weights' %s", key, value, weights[key])
    made_for = weights.get("input_size", (0, dcfg.image_size))[-1]
    if made_for != dcfg.image_size:
        log.info("data.image_size=%d overrides the pretrained weights' %d", dcfg.image_size,
                 made_for)
    return crop_pct, interpolation


def _resident(data: Data | None, cfg: Config, interpolation: str) -> Data | None:
    """A split read one image at a time, decoded whole (resized, center-cropped) in workers."""
    if not isinstance(data, Samples):
        return data
    images, labels, bad = preload(data, cfg.data.image_size, interpolation, cfg.data.workers,
                                  cfg.data.skip_bad_images)
    if bad:
        log.warning("skipped %d bad images of %d (data.skip_bad_images=true), e.g. %s",
                    len(bad), len(data), bad[0])
    return ImageData(images, labels, data.classes, len(bad))


def _placed(cfg: Config, splits: tuple[Data, Data, Data | None], placement: str, why: str,
            interpolation: str, device: torch.device) -> tuple[Data, Data, Data | None]:
    """The splits where ``placement`` puts them: streamed (read one image at a time), or
    decoded once and resident on the device or in host memory."""
    d = cfg.data
    if isinstance(splits[0], StreamedSplit):
        pass  # iterated as it is
    elif placement == "stream":  # resident images streamed (forced): read one at a time
        splits = tuple(s.as_samples() if isinstance(s, ImageData) else s for s in splits)
    else:
        splits = tuple(_resident(s, cfg, interpolation) for s in splits)
        if placement == "device":
            splits = tuple(s.to(device) if s is not None else None for s in splits)
    log.log(logging.WARNING if placement == "host" and d.placement == "auto" else logging.INFO,
            "data %s (%s)", "streamed from its files or rows" if placement == "stream" else
            f"resident on the {placement}", why)
    standard = (d.auto_augment, list(d.scale), list(d.ratio))
    if placement != "stream" and standard != ("none", [0.08, 1.0], [0.75, 1.3333333]):
        log.warning("data.auto_augment/scale/ratio shape streamed batches (RandomResizedCrop, "
                    "auto-augmentation); these resident images are augmented on the device "
                    "instead (data.hflip, data.crop_pad, data.random_erasing). Set "
                    "data.placement=stream for the standard transforms.")
    return splits


def assemble(cfg: Config, state: PartialState) -> Parts:
    """Load the data and the model (pretrained weights, frozen stages) and place both; shared
    by training and the learning-rate finder."""
    tcfg, dcfg = cfg.train, cfg.data
    if tcfg.batch_size % state.num_processes:
        raise ConfigError(f"train.batch_size={tcfg.batch_size} is the global batch and must "
                          f"divide evenly over {state.num_processes} processes.")
    fetched, train_data, test_data, val_data, source = _load(cfg, state)
    device = state.device
    placement, why = place(train_data, test_data, dcfg.placement, device, dcfg.image_size)
    channels = (train_data.images.shape[1] if isinstance(train_data, ImageData)
                else train_data.channels)
    in_chans = cfg.model.in_chans or channels
    model, loaded = build_model(cfg.model, num_classes=len(train_data.classes),
                                in_chans=in_chans, image_size=dcfg.image_size,
                                fetched=fetched, class_names=train_data.classes,
                                exported=meta_beside(cfg.model.weights))
    crop_pct, interpolation = preprocessing(dcfg, loaded, placement)
    resample = "batch" if isinstance(train_data, ImageData) and placement != "stream" else "image"
    if resample == "batch":
        interpolation = "bilinear"  # BatchTransform's, whatever the weights were made with
    train_data, test_data, val_data = _placed(cfg, (train_data, test_data, val_data),
                                              placement, why, interpolation, device)
    mean, std = normalization(dcfg.normalize, loaded, train_data, in_chans, dcfg.image_size,
                              dcfg.workers, dcfg.skip_bad_images)
    resident = placement != "stream"  # streamed batches are cropped and flipped in workers
    transform = BatchTransform(dcfg.image_size, in_chans, mean, std,
                               hflip=dcfg.hflip and resident,
                               crop_pad=dcfg.crop_pad if resident else 0,
                               erase=dcfg.random_erasing, channels_last=tcfg.channels_last)
    log.info("data %s: %d train / %d test images, %d classes; model %s (%s), %d parameters",
             source, len(train_data), len(test_data), len(train_data.classes), cfg.model.name,
             loaded.source if loaded else "random init",
             sum(p.numel() for p in model.parameters()))
    model.to(device, memory_format=transform.memory_format)
    if cfg.finetune.method == "lora":  # adapters beside frozen weights, before the stages
        apply_lora(model, cfg.finetune)
    plan = plan_stages(model, cfg.finetune)
    freeze_for_good(model, plan, cfg.finetune.bn)  # before DDP wraps the model
    log.info("stages %s (train.lr %g)", plan.describe(), tcfg.lr)
    if tcfg.small_map_matmul and device.type == "cpu":  # before the optimizer sees the layers
        swapped = swap_small_map_convs(model, (1, in_chans, dcfg.image_size, dcfg.image_size))
        if swapped:
            log.info("training computes %d convolutions over maps smaller than their kernel "
                     "as matrix products (train.small_map_matmul): %s", len(swapped),
                     ", ".join(swapped))
    return Parts(model, loaded, plan, transform, train_data, test_data, val_data, source,
                 placement, in_chans, mean, std, crop_pct, interpolation, resample)


def set_up(cfg: Config, state: PartialState) -> tuple[Parts, Accelerator, str]:
    """Seeded, the run's :func:`assemble`'d parts, then its Accelerator in the precision chosen
    for them (``finetune.precision``: on a CPU ``auto`` times this model on this process's
    batch in fp32 and bf16). Accelerate fixes the precision when the Accelerator is made:
    it is made once the model exists."""
    set_seed(cfg.train.seed)
    tune_backends(state.device)
    parts = assemble(cfg, state)
    tcfg, size = cfg.train, cfg.data.image_size
    shape = (tcfg.batch_size // state.num_processes // tcfg.accumulate, parts.in_chans, size,
             size)
    precision = choose_precision(tcfg.mixed_precision, state, parts.model, shape,
                                 parts.transform.memory_format, cfg.model.name)
    log.info("mixed precision %s, %s%s", precision,
             "channels_last" if tcfg.channels_last else "NCHW",
             ", torch.compile" if tcfg.compile else "")
    return parts, make_accelerator(precision, tcfg.accumulate), precision


def train_loader(cfg: Config, parts: Parts, accelerator: Accelerator) -> TrainLoader:
    """This process's training batches: indexed in resident data, or streamed from files with
    the standard training transforms (RandomResizedCrop, flip, auto-augmentation)."""
    tcfg, dcfg = cfg.train, cfg.data
    stream = None
    scale, ratio = tuple(dcfg.scale), tuple(dcfg.ratio)
    streamed = isinstance(parts.train_data, StreamedSplit) or parts.placement == "stream"
    # Resident batches are augmented on the device: no per-image pipeline (nor torchvision).
    transform = train_transform(dcfg.image_size, scale, ratio, parts.interpolation, dcfg.hflip,
                                dcfg.auto_augment) if streamed else None
    rank, world = accelerator.process_index, accelerator.num_processes
    weights = None
    if dcfg.sampler == "balanced":  # a stream is refused by check_model
        weights = balanced_weights(parts.train_data.labels, len(parts.train_data.classes))
    draws = epoch_draws(len(parts.train_data), dcfg.epoch_repeats)  # a stream has repeats 1
    if isinstance(parts.train_data, StreamedSplit):
        stream = StreamedBatches(parts.train_data, transform, dcfg.image_size,
                                 train_need(dcfg.image_size, scale), tcfg.batch_size, tcfg.seed,
                                 rank, world, dcfg.skip_bad_images,
                                 len(parts.train_data) // tcfg.batch_size, dcfg.shuffle_buffer)
    elif parts.placement == "stream":
        stream = TrainBatches(parts.train_data, transform, dcfg.image_size,
                              train_need(dcfg.image_size, scale), tcfg.batch_size, tcfg.seed,
                              rank, world, dcfg.skip_bad_images, weights, draws)
    return TrainLoader(parts.train_data, parts.placement, tcfg.batch_size, tcfg.seed,
                       accelerator.process_index, accelerator.num_processes, accelerator.device,
                       dcfg.workers, stream, weights, draws)


def evaluation_loader(cfg: Config, parts: Parts, data: Data, accelerator: Accelerator
                      ) -> Iterable:
    """An evaluation split's loader, prepared (sharded across processes)."""
    d = cfg.data
    return prepared_eval_loader(data, partial(eval_transform, d.image_size, parts.crop_pct,
                                              parts.interpolation),
                                eval_resize(d.image_size, parts.crop_pct), d.image_size,
                                cfg.train.eval_batch_size, d.workers, d.skip_bad_images,
                                accelerator)


@dataclass
class Training:
    """What the loop steps: the wrapped model and its optimizer, schedule and loaders."""

    model: nn.Module  # as Accelerate prepared it (DDP on several processes)
    raw: nn.Module  # the model itself, which checkpoints, the average and the export read
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    factor: Callable[[int], float]  # the schedule: step -> fraction of train.lr
    opts: StepOptions
    steps_per_epoch: int
    loader: TrainLoader
    eval_loader: Iterable
    val_loader: Iterable | None
    ema: ModelEmaV3 | None
    gen: torch.Generator  # augmentation draws, one stream per process


def prepare_training(cfg: Config, parts: Parts, accelerator: Accelerator) -> Training:
    """Optimizer and schedule over the model's stages, Accelerate's wrapping, the weight
    average (checkpoints save the schedule and the average themselves: nothing pickled)."""
    tcfg = cfg.train
    optimizer = make_optimizer(parts.model, tcfg, parts.plan)
    loader = train_loader(cfg, parts, accelerator)
    factor = schedule_factor(tcfg, loader.steps)
    scheduler = make_scheduler(optimizer, factor)
    model, optimizer = accelerator.prepare(parts.model, optimizer)
    eval_loader = evaluation_loader(cfg, parts, parts.test_data, accelerator)
    val_loader = (evaluation_loader(cfg, parts, parts.val_data, accelerator)
                  if parts.val_data is not None else None)
    raw = accelerator.unwrap_model(model)
    # timm's average: parameters averaged, buffers (batch-norm statistics) copied
    ema = None
    if tcfg.ema_decay:  # timm imported when used (it costs a start-up second)
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw, tcfg.ema_decay, exclude_buffers=True)
    gen = torch.Generator(device=accelerator.device).manual_seed(
        tcfg.seed * 7919 + accelerator.process_index)
    return Training(model, raw, optimizer, scheduler, factor,
                    StepOptions.from_config(cfg, len(parts.train_data.classes),
                                            getattr(parts.train_data, "labels", None),
                                            accelerator.device),
                    loader.steps, loader, eval_loader, val_loader, ema, gen)


def warm_up(cfg: Config, parts: Parts, t: Training, accelerator: Accelerator) -> float:
    """``torch.compile`` the model and run one step before the clock starts; the seconds.
    Training calls it after LP-FT's probe, whose feature pass swaps the classifier (which
    would recompile a compiled model)."""
    sample = t.loader.sample(cfg.train.batch_size // accelerator.num_processes)
    seconds = compile_model(t.model, t.optimizer, *sample, parts.transform, accelerator,
                            t.opts, cfg.train.compile_mode)
    accelerator.print(f"compiled the model in {seconds:.1f} s (not counted as training)")
    return seconds
