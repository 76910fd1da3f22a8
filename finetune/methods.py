"""``finetune.method``: the transfer methods that read cached features of the frozen backbone.

- ``linear``: a linear head fitted on the cached features (``finetune.probe``: ridge or logistic),
  exported with the backbone as an ordinary finetune model;
- ``knn``: weighted k-nearest neighbours on them, no training; the export keeps the training
  features (``knn.safetensors``) that ``predict`` and ``evaluate`` vote with;
- ``lp_ft``: the linear probe's head as the starting head of full fine-tuning (the training
  loop, ``finetune.train``), the probe's numbers recorded beside every epoch's.

``full`` is the training loop alone; ``lora`` is ``finetune.lora``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast

from finetune import tracking
from finetune.assemble import Parts, Training, evaluation_loader
from finetune.config import Config
from finetune.errors import ConfigError
from finetune.evaluation import score_log_probs
from finetune.export import save_knn
from finetune.features import (
    VERSION,
    Features,
    cached_features,
    data_digest,
    extract,
    weights_digest,
)
from finetune.files import atomic_write_text, make_folder
from finetune.models.interface import unwrap
from finetune.optim import enter_epoch
from finetune.precise_bn import refresh_bn
from finetune.probe import Probe, accuracy, fit_probe, knn_log_probs
from finetune.runs import export_run, start_run, write_metrics

log = logging.getLogger(__name__)
FEATURES = "features"  # <run>/features: the cache unless finetune.cache_dir names another
PROBE = "probe.json"  # lp_ft: the probe's numbers, read back when the run resumes


def feature_key(cfg: Config, parts: Parts, split: str, data, precision: str, weights: str,
                views: int) -> dict:
    """Everything that changes a split's features: the cache file's key."""
    d = cfg.data
    return {"version": VERSION, "split": split, "model": cfg.model.name, "norm": cfg.model.norm,
            "weights": weights, "data": parts.source, "images": data_digest(data),
            "count": len(data), "classes": list(data.classes),
            "limits": [d.train_limit, d.eval_limit, d.split_seed, d.val_split,
                       list(d.classes) if d.classes else None, d.folds, d.fold],
            "transform": {"image_size": d.image_size, "in_chans": parts.in_chans,
                          "mean": list(parts.mean), "std": list(parts.std),
                          "crop_pct": parts.crop_pct, "interpolation": parts.interpolation,
                          "resample": parts.resample},
            "views": views,
            "augment": [d.hflip, d.crop_pad, d.random_erasing, cfg.train.seed] if views > 1
            else None,
            "precision": precision}


def cache_folder(cfg: Config, out: Path) -> Path:
    """The cache folder, made if need be and checked writable before any feature is computed
    (``finetune.cache_dir``, else ``<run>/features``)."""
    if cfg.finetune.cache_dir:
        return make_folder(Path(cfg.finetune.cache_dir).expanduser(),
                           f"finetune.cache_dir={cfg.finetune.cache_dir}",
                           "pass another finetune.cache_dir=DIR.")
    return make_folder(out / FEATURES, f"the feature cache {out / FEATURES}",
                       "pass another output_dir=PATH or a finetune.cache_dir=DIR.")


def split_features(cfg: Config, parts: Parts, accelerator: Accelerator, precision: str,
                   out: Path) -> dict[str, Features]:
    """The train (with ``finetune.feature_views`` views per image), validation and test
    features of the frozen backbone, from the cache or computed once and cached."""
    views = cfg.finetune.feature_views
    if views > 1 and parts.placement == "stream":
        raise ConfigError("finetune.feature_views > 1 augments resident images on the device; "
                          "these images are streamed (data.placement): set "
                          "finetune.feature_views=1, or data.placement=device.")
    folder, weights = cache_folder(cfg, out), weights_digest(parts.model)
    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
    found = {}
    for split, data in (("train", parts.train_data), ("val", parts.val_data),
                        ("test", parts.test_data)):
        if data is None:
            continue
        n = views if split == "train" else 1
        key = feature_key(cfg, parts, split, data, precision, weights, n)
        loader = evaluation_loader(cfg, parts, data, accelerator)
        found[split] = cached_features(
            folder, split, key, accelerator,
            lambda d=data, ld=loader, n=n: extract(parts.model, d, parts.transform, ld,
                                                   accelerator, n, gen))
    return found


def probe_kind(cfg: Config) -> str:
    """finetune.probe, ``auto`` resolved: ridge, but logistic for LP-FT (its head starts
    fine-tuning: see the key's comment)."""
    if cfg.finetune.probe != "auto":
        return cfg.finetune.probe
    return "logistic" if cfg.finetune.method == "lp_ft" else "ridge"


def fit_head(cfg: Config, parts: Parts, feats: dict[str, Features], accelerator: Accelerator
             ) -> tuple[Probe, dict]:
    """The linear probe on the training features (its weight decay chosen on the validation
    features, or a held-out fifth), the same on every process; and its numbers on the test
    features (``test_*``) with the features' timings."""
    tr, k = feats["train"], len(parts.train_data.classes)
    val = (feats["val"].x, feats["val"].y) if "val" in feats else None
    # train.seed draws the held-out fifth: paired seeds of a comparison differ as runs do
    probe = fit_probe(tr.x, tr.y, k, cfg.finetune.probe_weight_decay, val,
                      seed=cfg.train.seed, views=cfg.finetune.feature_views,
                      kind=probe_kind(cfg))
    if accelerator.num_processes > 1:  # one head for every replica, bit for bit
        w, b = broadcast((probe.weight.to(accelerator.device), probe.bias.to(accelerator.device)))
        probe.weight, probe.bias = w.cpu(), b.cpu()
    test = feats["test"]
    record = score_log_probs(F.log_softmax(test.x @ probe.weight.T + probe.bias, dim=1),
                             test.y, parts.test_data)
    record.update(train_acc=accuracy(tr.x @ probe.weight.T + probe.bias, tr.y),
                  probe=probe.kind, probe_weight_decay=probe.weight_decay,
                  probe_temperature=probe.temperature, probe_fit_time=round(probe.seconds, 4),
                  probe_scores=probe.scores)
    if probe.val_acc is not None:
        record["probe_val_acc"] = probe.val_acc
    log.info("linear probe (%s): weight decay %g (held-out accuracy %s), fitted in %.3f s; "
             "test accuracy %.4f", probe.kind, probe.weight_decay,
             "n/a" if probe.val_acc is None else f"{probe.val_acc:.4f}", probe.seconds,
             record["test_acc"])
    return probe, {**record, **feature_timings(feats)}


def feature_timings(feats: dict[str, Features]) -> dict:
    """``feature_time``: seconds computing and caching the features, or reading them back;
    ``feature_images_per_sec``: of the ones computed."""
    computed = [f for f in feats.values() if not f.reused]
    seconds = sum(f.seconds for f in computed)
    return {"feature_time": round(sum(f.seconds for f in feats.values()), 4),
            "features_reused": not computed,
            "feature_images_per_sec": round(sum(len(f.y) for f in computed) / seconds, 1)
            if seconds else None}


@torch.no_grad()
def set_head(model: torch.nn.Module, probe: Probe) -> None:
    """The model's classifier becomes the probe's linear head."""
    head = unwrap(model).get_classifier()
    head.weight.copy_(probe.weight.to(head.weight))
    head.bias.copy_(probe.bias.to(head.bias))


def knn_record(cfg: Config, parts: Parts, feats: dict[str, Features]) -> dict:
    """kNN's numbers on the test features: top-1/top-5 and the rest of an evaluation."""
    f, tr, test = cfg.finetune, feats["train"], feats["test"]
    if f.knn_k > len(tr.y):
        log.warning("finetune.knn_k=%d exceeds the %d training features: every one of them "
                    "votes", f.knn_k, len(tr.y))
    start = time.perf_counter()
    log_probs = knn_log_probs(tr.x, tr.y, test.x, len(parts.train_data.classes), f.knn_k,
                              f.knn_temperature)
    record = score_log_probs(log_probs, test.y, parts.test_data)
    top5 = record.get("test_top5_acc")  # with more than 5 classes
    log.info("kNN (k=%d, temperature %g) over %d training features: test accuracy %.4f%s",
             f.knn_k, f.knn_temperature, len(tr.y), record["test_acc"],
             f", top-5 {top5:.4f}" if top5 is not None else "")
    return {**record, "knn_k": f.knn_k, "knn_temperature": f.knn_temperature,
            "knn_time": round(time.perf_counter() - start, 3), **feature_timings(feats)}


def run_cached(cfg: Config, parts: Parts, accelerator: Accelerator, precision: str,
               out: Path) -> dict:
    """A linear or kNN run: features, the head or the vote, one record, the export."""
    method = cfg.finetune.method
    start_run(out, cfg, accelerator)
    tracking.start_trackers(cfg, accelerator, out)
    start = time.perf_counter()
    feats = split_features(cfg, parts, accelerator, precision, out)
    if method == "linear":
        probe, record = fit_head(cfg, parts, feats, accelerator)
        set_head(parts.model, probe)
    elif method == "knn":
        record = knn_record(cfg, parts, feats)
    else:
        raise ConfigError(f"finetune.method={method} trains; valid here: linear, knn")
    seconds = time.perf_counter() - start  # features (or reading them) and the fit
    record = {"epoch": 1, "method": method, **record, "batch_loss": [],
              "mixed_precision": precision, "placement": parts.placement,
              "epoch_time": round(seconds, 3), "train_images": len(parts.train_data),
              "train_images_per_sec": round(len(parts.train_data) / seconds, 1)}
    if accelerator.is_main_process:
        write_metrics(out, [record])
        meta = parts.meta(cfg)
        if method == "knn":
            meta = {**meta, **write_knn(out, feats["train"], cfg, parts)}
        export_run(out, parts.model, {**meta, "method": method}, [record], None, cfg)
    tracking.log_epoch(accelerator, record, 1, lambda s: 0.0)
    accelerator.wait_for_everyone()
    return record


def write_knn(out: Path, train: Features, cfg: Config, parts: Parts) -> dict:
    """``knn.safetensors`` (the training features and labels) and the model.json fields that
    say how to vote; the exported classifier is zeroed (it never trained)."""
    save_knn(out, train.x, train.y)
    with torch.no_grad():
        head = unwrap(parts.model).get_classifier()
        head.weight.zero_()
        head.bias.zero_()
    return {"knn": {"k": cfg.finetune.knn_k, "temperature": cfg.finetune.knn_temperature,
                    "features": len(train.y)}}


def first_phase(cfg: Config, parts: Parts, t: Training, accelerator: Accelerator,
                precision: str, out: Path, start_epoch: int, partial: object) -> dict:
    """LP-FT's first phase (nothing for other methods): at a fresh start (epoch 1, no
    ``partial`` epoch restored), the probe's head set as the model's (and the weight
    average's; the numbers kept in ``<run>/probe.json``); on a resume, the numbers read back.
    Returns them as ``probe_*`` fields for every epoch's record.

    Batch norms that fine-tuning trains normalise with the batches' statistics, not the
    pretrained running averages: those are recomputed on the training images first, so that
    the probe is fitted on the features fine-tuning starts from."""
    if cfg.finetune.method != "lp_ft":
        return {}
    path = out / PROBE
    if start_epoch > 1 or partial is not None:  # resumed: the head came with the checkpoint
        if not path.is_file():
            raise ConfigError(f"{out} is resumed as an LP-FT run, but it has no {PROBE}: it "
                              f"was started with another finetune.method (resume it with "
                              f"that), or the file was deleted (restore it, or start over).")
        return json.loads(path.read_text(encoding="utf-8"))
    t.raw.train()
    enter_epoch(t.raw, parts.plan, 1, cfg.finetune.bn)
    refresh_bn(cfg.train, [t.raw], t.loader, parts.transform, 1, accelerator)
    feats = split_features(cfg, parts, accelerator, precision, out)
    probe, record = fit_head(cfg, parts, feats, accelerator)
    set_head(parts.model, probe)
    if t.ema is not None:
        t.ema.set(t.raw)
    fields = {"probe": record["probe"], "probe_test_acc": record["test_acc"],
              "probe_test_loss": record["test_loss"], "probe_train_acc": record["train_acc"],
              **{k: v for k, v in record.items() if k.startswith(("probe_", "feature"))}}
    fields.pop("probe_scores", None)
    if accelerator.is_main_process:
        atomic_write_text(path, json.dumps(fields) + "\n")
    accelerator.print(f"LP-FT: linear probe test accuracy {record['test_acc']:.4f}; full "
                      f"fine-tuning starts from its head")
    return fields
