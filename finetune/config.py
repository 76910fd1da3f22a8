"""Typed run configuration: recipe YAML + dotted ``key=value`` overrides, validated up front.

A run is described by one :class:`Config`. ``load_config(["recipe=resnet18_fmnist",
"train.epochs=2"])`` reads ``recipes/resnet18_fmnist.yaml``, applies the overrides and checks
every key, type and value before any data or weights are touched.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.errors import ConfigError, did_you_mean

__all__ = ["Config", "ConfigError", "DataConfig", "FinetuneConfig", "ModelConfig", "TrainConfig",
           "load_config"]


@dataclass
class ModelConfig:
    # A registered model (`finetune models`), timm:NAME[.TAG] (any timm model) or tv:NAME
    # (torchvision's get_model names).
    name: str = "resnet18"
    # Start from pretrained weights (ImageNet unless `weights` says otherwise).
    pretrained: bool = False
    # Where pretrained weights come from: a local .safetensors/.pth file or a folder with
    # model.safetensors (+ config.json), "torchvision[:TAG]" or "timm[:NAME.TAG]" (the Hugging
    # Face hub or its cache). None: timm's for a timm:NAME model, else torchvision's.
    weights: str | None = None
    # Input channels of the network; None: as many as the data has.
    in_chans: int | None = None
    # Batch norm: torch's nn.BatchNorm2d, or finetune's from-scratch one (same state dict).
    norm: str = "torch"
    # default: the architecture's own init; xavier: Xavier-uniform (the lecture's);
    # zero_residual: the own, with the last batch norm of every residual block scaled to 0, so
    # that each block starts as the identity (Goyal et al. 2017; torchvision's
    # zero_init_residual, timm's zero_init_last, which timm's ResNets do by default).
    init: str = "default"
    # Stochastic depth of timm's models (e.g. 0.1); None: the model's default.
    drop_path_rate: float | None = None
    # Recompute activations in the backward pass (timm's set_grad_checkpointing): less memory.
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    # auto: data.root if given (IDX files or an ImageFolder tree), else a local copy of
    # Fashion-MNIST, else the Hugging Face hub.
    source: str = "auto"
    # IDX files, an ImageFolder tree, or (data.source=hf) a Hugging Face save_to_disk folder,
    # parquet files, or a folder for the data.hf_name builder (e.g. hf_name=imagefolder).
    root: str | None = None
    hf_name: str = "zalando-datasets/fashion_mnist"
    hf_config: str | None = None
    # Hugging Face split names or slices (train[:10%]); test_split None: test, validation, val
    # or valid, else a seeded tenth of each class of the training split.
    train_split: str = "train"
    test_split: str | None = None
    # None: the first Image feature / the first ClassLabel (or a column named label, labels).
    image_column: str | None = None
    label_column: str | None = None
    # Side of the square images the model sees. None: the input size of the pretrained
    # weights (model.pretrained=true; e.g. 224), else 28 (Fashion-MNIST's own).
    image_size: int | None = None
    # Use only N training / test images (None: all): the same fraction of every class, drawn
    # with data.split_seed.
    train_limit: int | None = None
    eval_limit: int | None = None
    # Seeds the limits, data.val_split and a hold-out test split; independent of train.seed,
    # so that runs with different seeds compare on the same images.
    split_seed: int = 0
    # Keep only these classes (names or 0-based indices), relabelled 0..k-1 in this order; e.g.
    # [1,5,7,8,9] to pretrain on half of Fashion-MNIST and [0,2,3,4,6] to transfer to the rest.
    # Applied before the limits. None: all classes.
    classes: list[str] | None = None
    # auto: the pretrained weights' mean/std, else statistics of the training images.
    normalize: str = "auto"
    # On-device augmentation of training batches.
    hflip: bool = False
    crop_pad: int = 0
    # Probability of erasing a random rectangle of each training image (random erasing).
    random_erasing: float = 0.0
    # Where the images live during training. device: decoded once (resized, center-cropped) and
    # resident on the device, batches indexed and augmented there; host: resident in host memory,
    # batches gathered by workers; stream: decoded and transformed per batch by workers from the
    # files or rows (RandomResizedCrop etc.). auto: stream when the full-size images decode to
    # more than 1 GB, else device (host when that does not fit); the log says which and why.
    placement: str = "auto"
    # DataLoader worker processes (host and stream placements, and decoding up front).
    workers: int = 2
    # Streaming path: RandomResizedCrop's area fraction and aspect-ratio range, an automatic
    # augmentation policy, and the evaluation crop (shorter side resized to
    # image_size / crop_pct, center crop). crop_pct and interpolation None: the pretrained
    # weights' own, else 0.875 and bilinear.
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    auto_augment: str = "none"
    crop_pct: float | None = None
    interpolation: str | None = None
    # false: a corrupt image stops the run naming it; true: it is skipped, logged and counted
    # (bad_images in metrics.jsonl).
    skip_bad_images: bool = False
    # Hugging Face datasets bigger than the disk: iterated, never held (every process reads its
    # every world_size-th row, shuffled in a seeded buffer of shuffle_buffer rows); needs a
    # test_split and the split sizes (the dataset card's, or data.train_limit/eval_limit).
    streaming: bool = False
    shuffle_buffer: int = 1000  # rows (encoded images) held per worker: memory
    # Mixup / CutMix: Beta(alpha, alpha) mixing of each training batch with itself reversed
    # (0: off). With both on, each batch takes one of the two at random (mix_switch: CutMix's
    # probability).
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_switch: float = 0.5
    # Fraction of the training images held out (a seeded, per-class draw) as a validation split,
    # evaluated every epoch; early stopping watches it, never the test set.
    val_split: float = 0.0
    # k-fold cross-validation (`finetune cv` sets these): the training images, after
    # data.classes and data.train_limit, fall into data.folds stratified folds drawn with
    # data.split_seed, and fold data.fold is held out as the validation split (0: off).
    folds: int = 0
    fold: int = 0
    # shuffle: each epoch a seeded permutation of the training images; balanced: as many
    # draws, with replacement, each class equally likely (seeded by train.seed and the epoch:
    # the same on every process and after a resume). Not with data.streaming.
    sampler: str = "shuffle"
    # An epoch draws round(epoch_repeats x the training images) (like timm's --epoch-repeats):
    # 0.8 trains on a fresh seeded 80 % each epoch (any image can be drawn, unlike with
    # data.train_limit), 2 on two permutations back to back. The schedule, evaluations and
    # checkpoints follow the epochs. Not with data.streaming.
    epoch_repeats: float = 1.0
    # A class left without training images (a class of one image that the test split takes,
    # or one that data.train_limit or data.val_split empties) stops the run naming it; true:
    # a warning, and the model never sees that class (nor does data.sampler=balanced or
    # train.class_weights=balanced: its test scores then measure an untrained class).
    allow_empty_classes: bool = False
    # single: one class per image (softmax); multilabel: any number of tags per image (a
    # sigmoid per class, finetune.data.tags); auto: multilabel when the labels are lists (a
    # Hugging Face Sequence(ClassLabel) column, a folder with a labels.csv), else single.
    task: str = "auto"


@dataclass
class TrainConfig:
    epochs: int = 10
    # Global batch size: split evenly across processes, so a recipe means the same on 1 or 8 GPUs.
    batch_size: int = 128
    eval_batch_size: int = 512
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    # schedule=step: the rate is multiplied by step_gamma at the start of each listed epoch.
    step_epochs: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    # Weights of the classes in the training loss: none, balanced (n / (k * count of the class),
    # scikit-learn's), or one number per class [w0,w1,...].
    class_weights: Any = "none"
    # Multi-label: the weight of each tag's positives in its binary cross-entropy (none: 1,
    # balanced: its negatives / positives among the training images, as BCEWithLogitsLoss's
    # pos_weight; a tag no image has gets 1).
    pos_weight: str = "none"
    # Clip the global gradient norm to this value before each step (0: off).
    clip_grad_norm: float = 0.0
    # Gradient accumulation: each step's batch (batch_size, still the global batch per step)
    # is processed in this many slices, for memory; the update is the same.
    accumulate: int = 1
    # Exponential moving average of the weights, updated every step (0: off; e.g. 0.999). The
    # average is evaluated every epoch (ema_test_acc) and exported to <output_dir>/ema/.
    ema_decay: float = 0.0
    # Recompute the batch norms' running statistics over training images (no gradients) after
    # every epoch, before evaluating and exporting (finetune.precise_bn): with few steps per
    # epoch the running averages lag the weights. false: the averages kept while training.
    precise_bn: bool = True
    # How many training images (all processes together) the recomputation reads.
    precise_bn_images: int = 4096
    # Stop when the validation accuracy (data.val_split) has not improved for this many epochs,
    # and export the best epoch's weights (0: off).
    early_stopping: int = 0
    # auto: the launcher's --mixed_precision if it set one, else on a GPU bf16 where it computes
    # it natively, on a CPU the faster of fp32 and bf16 for this model and batch, timed
    # (finetune.precision; cached per machine), else fp32.
    mixed_precision: str = "auto"
    channels_last: bool = True
    # On a CPU, while training: convolutions whose input map is smaller than their kernel (a
    # ResNet's last stages at 28-32 px) as one matrix product each (finetune.cpu_convs), a swap
    # of the trainer's; evaluation, exports and loaded models keep plain convolutions.
    small_map_matmul: bool = True
    # torch.compile the model (in place: the state dict keeps its keys). Compilation happens
    # before the first epoch and is timed apart from training (compile_time in metrics.jsonl).
    compile: bool = False
    # torch.compile mode; reduce-overhead adds CUDA graphs (one launch per step), which pays
    # where the host cannot launch kernels as fast as the GPU runs them (small images).
    compile_mode: str = "default"
    # Checkpoints (Accelerate state + loop position) in <output_dir>/checkpoints: at the end of
    # every epoch, and every N steps as well when checkpoint_every=N > 0; the newest
    # keep_checkpoints are kept.
    checkpoint: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    # Progress-bar refresh interval in steps; reading the loss syncs the device, so not every step.
    log_every: int = 25
    # Experiment trackers (Accelerate's): [tensorboard], [wandb], [mlflow], [aim], [comet_ml],
    # [clearml], [dvclive], [trackio], several at once; main process only. Files of the ones
    # that write locally go to <output_dir>/trackers. metrics.jsonl stays the record.
    log_with: list[str] = field(default_factory=list)
    # The trackers' project (experiment) name; None: the recipe's name, else "finetune".
    project: str | None = None


@dataclass
class FinetuneConfig:
    # How the model transfers (finetune.methods): full (train what finetune.freeze leaves
    # trainable), linear (a linear head fitted on cached features of the frozen backbone:
    # finetune.probe), knn (weighted k-nearest neighbours on cached features, no training), lp_ft
    # (the linear probe's head, then full fine-tuning from it: Kumar et al. 2022), lora
    # (low-rank adapters through the peft library, the classifier trains fully).
    method: str = "full"
    # Cached features (linear, knn, lp_ft): the folder that holds them; None: <output_dir>/
    # features. A folder shared by runs reuses features whose key (backbone and weights, data,
    # limits, classes, transform, size, precision, views) matches.
    cache_dir: str | None = None
    # Views per training image in the cache: 1 is the evaluation transform only; N > 1 adds
    # N - 1 augmented views (data.hflip, data.crop_pad, data.random_erasing).
    feature_views: int = 1
    # The linear probe (linear, lp_ft, the sweep): ridge (least squares onto one-hot targets,
    # solved exactly for every weight decay at once, then temperature-scaled on held-out
    # features: milliseconds), logistic (multinomial logistic regression, L-BFGS), or auto:
    # ridge, but logistic for lp_ft, whose fine-tuning starts from the head (a ridge head's
    # large weights on low-variance features ended 0.5-1.6 points lower, BENCHMARKS.md).
    probe: str = "auto"
    # The probe's weight decay (L2 on the head): the candidate that scores best on a held-out
    # fifth of the training features (or data.val_split) is refitted on all of them. None:
    # the probe's own candidates (ridge 1e-4..10, logistic 1e-6..0.1; finetune.probe).
    probe_weight_decay: list[float] | None = None
    # Weighted k-NN on L2-normalised features (DINOv2's protocol): k neighbours, each voting
    # exp(similarity / temperature).
    knn_k: int = 20
    knn_temperature: float = 0.07
    # LoRA (finetune.method=lora; pip install 'finetune[peft]'): rank, scaling alpha, dropout,
    # and the modules that get adapters (names or regular expressions, as peft takes them);
    # None: the family's own (attention and MLP linears of a ViT; convolutions and linears of
    # a CNN).
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    # What trains: none (everything), backbone (only the classifier: a linear probe), or
    # stages:N (the first N stages from the input frozen; ResNets: stem, layer1..layer4).
    freeze: str = "none"
    # Gradual unfreezing: at the start of each listed epoch the deepest frozen stage thaws.
    unfreeze_at: list[int] = field(default_factory=list)
    # Batch norm of the trainable stages: train, freeze_stats (running statistics fixed, scale
    # and shift train) or freeze (both fixed). Frozen stages' batch norms are always fixed.
    bn: str = "train"
    # Learning rate of the classifier relative to train.lr, and the factor per stage going back
    # from the head (layer-wise decay: 0.7 gives layer4 0.7x, layer3 0.49x, ...).
    head_lr_mult: float = 1.0
    layer_decay: float = 1.0


@dataclass
class Config:
    recipe: str | None = None
    description: str = ""
    # None: runs/<recipe>/<timestamp>.
    output_dir: str | None = None
    overwrite: bool = False
    # Continue a run in output_dir: auto (its latest checkpoint; a fresh start if it has none)
    # or the path of a checkpoint folder.
    resume: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


NORMS = ("torch", "scratch")  # model.norm: torch's batch norm, or finetune.models.batchnorm
# model.init: the architecture's own, the lecture's, or the own with every residual block's last
# batch norm scaled to zero (each block starts as the identity: Goyal et al. 2017)
INITS = ("default", "xavier", "zero_residual")
METHODS = ("full", "linear", "knn", "lp_ft", "lora")  # finetune.method
UNTRAINED = ("linear", "knn")  # the methods that fit on cached features, no training loop
PROBES = {  # finetune.probe: the linear probes of finetune/probe.py, described
    "ridge": "ridge classifier (least squares onto one-hot targets, its scores scaled by a "
             "temperature fitted on held-out features)",
    "logistic": "multinomial logistic regression (L-BFGS)"}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm": NORMS,
    "model.init": INITS,
    "data.source": ("auto", "hf", "idx", "imagefolder"),
    "data.normalize": ("auto", "imagenet", "dataset", "none"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("constant", "cosine", "onecycle", "step"),
    "finetune.bn": ("train", "freeze_stats", "freeze"),
    "finetune.method": METHODS,
    "finetune.probe": ("auto", *PROBES),
    "train.mixed_precision": ("auto", "fp32", "bf16", "fp16"),
    "data.placement": ("auto", "device", "host", "stream"),
    "data.sampler": ("shuffle", "balanced"),
    "data.task": ("auto", "single", "multilabel"),
    "train.pos_weight": ("none", "balanced"),
    "data.auto_augment": ("none", "trivial", "randaugment", "autoaugment", "colorjitter"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune",
                           "max-autotune-no-cudagraphs"),
}
POSITIVE = ("data.image_size", "data.train_limit", "data.eval_limit", "model.in_chans",
            "data.shuffle_buffer", "data.epoch_repeats",
            "train.epochs", "train.batch_size", "train.eval_batch_size", "train.log_every",
            "train.keep_checkpoints", "train.accumulate", "train.precise_bn_images",
            "finetune.head_lr_mult", "finetune.feature_views", "finetune.knn_k",
            "finetune.knn_temperature", "finetune.lora_rank", "finetune.lora_alpha",
            "finetune.layer_decay")
NON_NEGATIVE = ("data.crop_pad", "data.workers", "data.split_seed", "data.folds", "data.fold",
                "train.checkpoint_every", "train.seed", "train.lr",
                "train.momentum", "train.weight_decay", "train.warmup_epochs",
                "train.label_smoothing", "train.clip_grad_norm", "train.early_stopping",
                "data.mixup", "data.cutmix", "train.step_gamma")


MAX_IMAGE_SIZE = 4096
PROBABILITY = ("data.random_erasing", "data.mix_switch")
# 1 would leave nothing / never move / drop every block
FRACTION = ("data.val_split", "train.ema_decay", "model.drop_path_rate",
            "finetune.lora_dropout")


def _schema(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the schema and its type, ``{"recipe": "str | None", ...,
    "train.epochs": "int", ...}``."""
    out = {}
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            out.update(_schema(type(default), f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = str(f.type)
    return out


KEY_TYPES = _schema()
SCHEMA_KEYS = list(KEY_TYPES)
_SECTIONS = {k.split(".")[0] for k in SCHEMA_KEYS if "." in k}


def describe_keys(keys: list[str]) -> str:
    """One line per key: its type, default and, where it has them, its valid values."""
    defaults = flat_config(Config())
    width = max(len(k) for k in keys)
    lines = []
    for key in keys:
        valid = f"  [{'|'.join(CHOICES[key])}]" if key in CHOICES else ""
        lines.append(f"  {key:<{width}}  {KEY_TYPES[key]} = {show_value(defaults[key])}{valid}")
    return "\n".join(lines)


def _check_keys(keys: list[str], where: str) -> None:
    for key in keys:
        if key in SCHEMA_KEYS:
            continue
        section = key.split(".")[0]
        valid = [k for k in SCHEMA_KEYS if k.startswith(section + ".")] if section in _SECTIONS \
            else sorted({k.split(".")[0] for k in SCHEMA_KEYS})
        raise ConfigError(f"unknown config key '{key}' in {where}.{did_you_mean(key, SCHEMA_KEYS)} "
                          f"Valid keys: {', '.join(valid)}.")


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, DictConfig):
        out = []
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, DictConfig) and f"{prefix}{k}" in _SECTIONS:
                out += _flat_keys(child, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}")
        return out
    return []


def recipe_dir() -> Path:
    """Folder holding the bundled recipes (the repository's ``recipes/``)."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if checkout.is_dir():
        return checkout
    # Installed from a wheel: recipes/ was packaged as the namespace package finetune.recipes.
    return Path(next(iter(importlib.import_module("finetune.recipes").__path__)))


def list_recipes() -> dict[str, str]:
    """Recipe name -> one-line description."""
    out = {}
    for path in sorted(recipe_dir().glob("*.yaml")):
        out[path.stem] = str(read_recipe(path).get("description", "")).strip()
    return out


def read_recipe(path: Path) -> DictConfig:
    """A recipe file's mapping of keys; a clear error for YAML that is not one (syntax errors,
    tabs, duplicate keys, a list at the top)."""
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = " ".join(str(e).split())[:300]
        raise ConfigError(f"recipe {path} is not valid YAML: {first}. Indent with spaces, "
                          f"give each key once.") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"recipe {path} must be a mapping of keys (model:, data:, train:, "
                          f"...), not a {type(loaded).__name__}.")
    for section in sorted(_SECTIONS & set(loaded.keys())):
        if not isinstance(loaded._get_node(section), DictConfig):
            value = show_value(OmegaConf.to_container(loaded)[section])
            raise ConfigError(f"recipe {path}: section '{section}' is {value}, not a mapping of "
                              f"keys; give it indented keys ({section}:, then e.g. "
                              f"'  {_example_key(section)}: ...') or leave the section out.")
    return loaded


def _example_key(section: str) -> str:
    return next(k for k in SCHEMA_KEYS if k.startswith(section + ".")).split(".", 1)[1]


def _recipe_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if path.is_dir():
            inside = sorted(p.name for p in path.glob("*.y*ml"))[:5]
            raise ConfigError(f"recipe={name} is a folder, not a recipe file; pass a .yaml "
                              f"file" + (f" in it ({', '.join(inside)})" if inside else "")
                              + ".")
        if not path.is_file():
            raise ConfigError(f"recipe file '{name}' does not exist.")
        return path
    path = recipe_dir() / f"{name}.yaml"
    if path.is_file():
        return path
    names = list(list_recipes())
    raise ConfigError(f"unknown recipe '{name}'.{did_you_mean(name, names)} Available: "
                      f"{', '.join(names)} "
                      f"(see `finetune recipes`), or pass a path to a .yaml file.")


def split_options(args: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``({name: value} for the command's own options among ``names``, the other arguments)``:
    how a command takes ``start_lr=1e-5`` beside config overrides like ``train.lr=0.1``."""
    options, rest = {}, []
    for arg in parse_overrides(args):
        key, _, value = arg.partition("=")
        if key in names:
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def parse_overrides(args: list[str]) -> list[str]:
    """Check that every argument looks like ``key=value``; return them unchanged."""
    for arg in args:
        key, eq, _ = arg.partition("=")
        if not eq or not key or key != key.strip():
            raise ConfigError(f"cannot parse argument '{arg}': expected key=value, "
                              f"e.g. train.epochs=3 (keys: see `finetune show`).")
    return args


def load_config(args: list[str]) -> Config:
    """Build a validated :class:`Config` from ``recipe=NAME`` and ``key=value`` arguments."""
    for arg in args:  # a path from the shell that is not UTF-8 cannot be written to YAML/JSON
        try:
            arg.encode()
        except UnicodeEncodeError:
            shown = arg.encode(errors="surrogateescape").decode(errors="backslashreplace")
            raise ConfigError(f"{shown}: not valid UTF-8 (the config and exports are written "
                              f"as UTF-8); rename the file or folder, e.g. with convmv -f "
                              f"latin1 -t utf8 --notest.") from None
    options, rest = split_options(list(args), ("recipe",))
    recipe = options.get("recipe")

    layers = [OmegaConf.structured(Config)]
    if recipe:
        path = _recipe_path(recipe)
        recipe_cfg = read_recipe(path)
        _check_keys(_flat_keys(recipe_cfg), f"recipe {path}")
        # A saved run's config.yaml names its recipe; a recipe file is named by its stem.
        recipe_cfg.recipe = recipe_cfg.get("recipe") or Path(recipe).stem
        layers.append(recipe_cfg)
    _check_keys([a.partition("=")[0] for a in rest], "the command line")
    try:
        layers.append(OmegaConf.from_dotlist(rest))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"invalid value for '{key}': {e.msg if hasattr(e, 'msg') else e}"
                          .splitlines()[0]) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values the schema's types allow but a run cannot use. What depends on the model
    (its name, the image sizes it takes, its stages) is checked by
    :func:`finetune.assemble.check_model`, so that reading a config needs no model zoo."""
    def get(key: str) -> Any:
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name)

    for key, choices in CHOICES.items():
        if get(key) not in choices:
            # YAML 1.1 reads no/off/yes/on as booleans, which reach a str field as 'False'/'True'.
            hint = " (no/off/yes/on are read as booleans)" if get(key) in ("False", "True") else ""
            raise ConfigError(f"invalid value {get(key)!r} for '{key}'{hint}."
                              f"{did_you_mean(str(get(key)), choices)} "
                              f"Valid values: {', '.join(choices)}.")
    for key in POSITIVE:
        value = get(key)
        if value is not None and value <= 0:
            kind = "a positive integer" if isinstance(value, int) else "positive"
            raise ConfigError(f"'{key}' must be {kind}, got {value}.")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {get(key)}.")
    for key in (k for k, t in KEY_TYPES.items() if t.startswith("float")):
        if get(key) is not None and not math.isfinite(get(key)):
            raise ConfigError(f"'{key}' must be a finite number, got {get(key)}.")
    if (cfg.data.image_size or 0) > MAX_IMAGE_SIZE:
        raise ConfigError(f"'data.image_size' is at most {MAX_IMAGE_SIZE}, got "
                          f"{cfg.data.image_size} (a batch would need more memory than any "
                          f"device has).")
    for key in PROBABILITY:
        if not 0 <= get(key) <= 1:
            raise ConfigError(f"'{key}' is a probability in [0, 1], got {get(key)}.")
    for key in FRACTION:
        if get(key) is not None and not 0 <= get(key) < 1:
            raise ConfigError(f"'{key}' must be in [0, 1), got {get(key)}.")
    if cfg.train.early_stopping and not (cfg.data.val_split or cfg.data.folds):
        raise ConfigError("train.early_stopping needs a validation split: set data.val_split "
                          "(e.g. 0.1); it never watches the test set.")
    _check_folds(cfg.data)
    if cfg.train.batch_size % cfg.train.accumulate:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must divide into "
                          f"train.accumulate={cfg.train.accumulate} equal slices.")
    if cfg.train.schedule == "step" and not cfg.train.step_epochs:
        raise ConfigError("train.schedule=step needs train.step_epochs=[E1,E2,...], the epochs "
                          "at whose start the rate drops by train.step_gamma.")
    if cfg.train.label_smoothing >= 1:
        raise ConfigError(f"'train.label_smoothing' must be < 1, got {cfg.train.label_smoothing}.")
    _check_transforms(cfg.data)
    _check_balance(cfg)
    _check_method(cfg)
    _check_source(cfg)
    if cfg.model.weights and not cfg.model.pretrained:
        raise ConfigError(f"model.weights={cfg.model.weights} is set but model.pretrained=false; "
                          "set model.pretrained=true to load it, or drop model.weights.")
    if cfg.model.init != "default" and cfg.model.pretrained:
        raise ConfigError(f"model.init={cfg.model.init} initialises random weights, and "
                          f"model.pretrained=true loads others over them; drop model.init.")


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio")


def _check_balance(cfg: Config) -> None:
    """train.class_weights, data.sampler and train.log_with."""
    weights = cfg.train.class_weights
    if isinstance(weights, list | tuple):
        if not weights or not all(isinstance(w, int | float) and not isinstance(w, bool)
                                  and w >= 0 and math.isfinite(w) for w in weights) \
                or not sum(weights) > 0:
            raise ConfigError(f"'train.class_weights' as a list needs one number >= 0 per "
                              f"class, not all 0, got {list(weights)}.")
    elif weights not in ("none", "balanced"):
        raise ConfigError(f"invalid value {weights!r} for 'train.class_weights'. Valid values: "
                          f"none, balanced, or [w0,w1,...] (one per class).")
    if weights == "balanced" and cfg.data.streaming:
        raise ConfigError("train.class_weights=balanced counts the training labels, which a "
                          "stream (data.streaming=true) does not know up front; give the "
                          "weights as a list [w0,w1,...].")
    if cfg.data.sampler == "balanced" and cfg.data.streaming:
        raise ConfigError("data.sampler=balanced draws from every training image by its class: "
                          "it needs random access, not data.streaming=true.")
    if cfg.data.epoch_repeats > 1000:  # the epoch's order is held: 8 bytes a draw
        raise ConfigError(f"data.epoch_repeats={cfg.data.epoch_repeats}: at most 1000 passes "
                          f"an epoch; raise train.epochs for longer training.")
    if cfg.data.epoch_repeats != 1 and cfg.data.streaming:
        raise ConfigError(f"data.epoch_repeats={cfg.data.epoch_repeats} draws each epoch from "
                          f"every training image: it needs random access, not "
                          f"data.streaming=true (set data.train_limit to shorten an epoch).")
    unknown = [t for t in cfg.train.log_with if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker(s) {unknown} in train.log_with; valid: "
                          f"{', '.join(TRACKERS)}.")
    if len(set(cfg.train.log_with)) < len(cfg.train.log_with):
        raise ConfigError(f"train.log_with={cfg.train.log_with} names a tracker twice.")
    project = cfg.train.project
    if project is not None and (not project.strip() or "/" in project or "\\" in project
                                or project.startswith(".")):
        raise ConfigError(f"train.project={project!r} must be a plain name (no path): the "
                          f"trackers' files stay in <output_dir>/trackers.")


def _check_method(cfg: Config) -> None:
    """finetune.method and the keys that only some methods take."""
    f = cfg.finetune
    decays = f.probe_weight_decay
    if decays is not None and (not decays or not all(
            isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in decays)):
        raise ConfigError(f"'finetune.probe_weight_decay' is a list of weight decays >= 0 (the "
                          f"candidates the probe chooses from), got {list(decays)}.")
    if f.method == "lora":
        odd = [f"finetune.{k}={show_value(getattr(f, k))}" for k, default in
               (("freeze", "none"), ("unfreeze_at", []), ("layer_decay", 1.0))
               if getattr(f, k) != default]
        if odd:
            raise ConfigError(f"finetune.method=lora trains low-rank adapters beside frozen "
                              f"weights, so {', '.join(odd)} means nothing with it; drop "
                              f"{'it' if len(odd) == 1 else 'them'} (finetune.lora_targets "
                              f"chooses what adapts).")
    elif f.lora_targets is not None:
        raise ConfigError(f"finetune.lora_targets is set but finetune.method={f.method}; set "
                          f"finetune.method=lora, or drop finetune.lora_targets.")
    if f.method in UNTRAINED and (f.freeze != "none" or f.unfreeze_at):
        raise ConfigError(f"finetune.method={f.method} never trains the backbone, so "
                          f"finetune.freeze/unfreeze_at mean nothing with it; drop them.")
    if f.method in UNTRAINED and cfg.data.epoch_repeats != 1:
        raise ConfigError(f"finetune.method={f.method} fits on cached features without "
                          f"training epochs, so data.epoch_repeats means nothing with it; drop it.")
    if f.method in UNTRAINED and (cfg.train.ema_decay or cfg.train.early_stopping):
        raise ConfigError(f"finetune.method={f.method} fits on cached features without "
                          f"training steps, so train.ema_decay and train.early_stopping (which "
                          f"follow the steps and epochs) mean nothing with it; drop them.")
    if f.method in ("linear", "knn", "lp_ft") and cfg.data.streaming and f.feature_views > 1:
        raise ConfigError("finetune.feature_views > 1 augments resident images; a stream "
                          "(data.streaming=true) is cached with its evaluation transform only: "
                          "set finetune.feature_views=1.")


def _check_source(cfg: Config) -> None:
    """What the data's source and declared task need."""
    if cfg.data.task == "multilabel":
        check_multilabel(cfg)
    elif cfg.data.task == "single":
        check_single_label(cfg)
    if cfg.data.source == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.source=imagefolder needs data.root=PATH "
                          "(a folder with one subfolder of images per class).")


def check_multilabel(cfg: Config) -> None:
    """What multi-label training (data.task=multilabel, or auto on list-valued labels) does
    not take: each refused with the reason."""
    if cfg.data.streaming:
        raise ConfigError("multi-label data is read held, not streamed: its tags decide "
                          "stratified splits and pos_weight up front; use data.streaming=false.")
    if cfg.data.sampler == "balanced":
        raise ConfigError("data.sampler=balanced draws images by their one class; a multi-label "
                          "image has several: use data.sampler=shuffle (and train.pos_weight="
                          "balanced for rare tags).")
    if cfg.train.class_weights != "none":
        raise ConfigError("train.class_weights weighs a softmax's classes; multi-label training "
                          "has a sigmoid per tag: use train.pos_weight=balanced instead.")
    if cfg.finetune.method in ("linear", "knn", "lp_ft"):
        raise ConfigError(f"finetune.method={cfg.finetune.method} fits a softmax probe (or votes "
                          f"a class) on cached features, one class per image; multi-label data "
                          f"needs a head trained with a sigmoid per tag: use finetune.method="
                          f"full or lora.")


def check_single_label(cfg: Config) -> None:
    """What single-label training (one class per image) does not take."""
    if cfg.train.pos_weight != "none":
        raise ConfigError(f"train.pos_weight={cfg.train.pos_weight} weighs the positives of a "
                          f"sigmoid per tag (multi-label data); this data has one class per "
                          f"image: use train.class_weights=balanced, or drop train.pos_weight.")


MAX_FOLDS = 100  # more folds than this is leave-few-out, a run per handful of images


def _check_folds(d: DataConfig) -> None:
    """data.folds and data.fold: which fold of k is the validation split."""
    if not d.folds:
        if d.fold:
            raise ConfigError(f"data.fold={d.fold} needs data.folds=K (the number of folds).")
        return
    if not 2 <= d.folds <= MAX_FOLDS:
        raise ConfigError(f"data.folds={d.folds}: cross-validation needs 2 to {MAX_FOLDS} "
                          f"folds (1 fold holds nothing out); e.g. folds=5.")
    if d.fold >= d.folds:
        raise ConfigError(f"data.fold={d.fold} is not a fold of data.folds={d.folds} "
                          f"(0..{d.folds - 1}).")
    if d.val_split:
        raise ConfigError(f"data.folds={d.folds} holds out fold data.fold as the validation "
                          f"split, so data.val_split={d.val_split} would hold out a second "
                          f"one; drop data.val_split.")
    if d.streaming:
        raise ConfigError("data.folds cannot split a stream (data.streaming=true) into folds; "
                          "use data.streaming=false.")


def _check_transforms(d: DataConfig) -> None:
    """The streaming path's settings."""
    if d.streaming and d.val_split:
        raise ConfigError("data.streaming=true cannot hold out data.val_split (a stream is not "
                          "held); drop data.val_split, or use data.streaming=false.")
    if d.streaming and d.placement not in ("auto", "stream"):
        raise ConfigError(f"data.streaming=true streams batches, so data.placement="
                          f"{d.placement} cannot hold them; set data.placement=stream (or auto), "
                          f"or use data.streaming=false.")
    if d.interpolation not in (None, "bilinear", "bicubic", "nearest", "lanczos"):
        raise ConfigError(f"invalid value {d.interpolation!r} for 'data.interpolation'. "
                          f"Valid values: bilinear, bicubic, nearest, lanczos.")
    if d.crop_pct is not None and not 0 < d.crop_pct <= 1:
        raise ConfigError(f"'data.crop_pct' must be in (0, 1], got {d.crop_pct}.")
    for key, low, high in (("scale", 0, 1), ("ratio", 0, math.inf)):
        pair = getattr(d, key)
        if len(pair) != 2 or not low < pair[0] <= pair[1] <= high:
            raise ConfigError(f"'data.{key}' is a range [min, max] with {low} < min <= max"
                              f"{' <= 1' if high == 1 else ''}, got {list(pair)}.")


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys, ``{"recipe": .., "train.epochs": .., ...}``; lists become
    tuples, so that values can be compared and hashed."""
    out = {}
    for section, value in asdict(cfg).items():
        items = ({f"{section}.{k}": v for k, v in value.items()} if isinstance(value, dict)
                 else {section: value})
        out.update({k: tuple(v) if isinstance(v, list) else v for k, v in items.items()})
    return out


def show_value(value: Any) -> str:
    """A config value as it is written on the command line (``[0,2,3]`` for a list)."""
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple | list) else str(value)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
