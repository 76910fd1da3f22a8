"""``finetune cv``: k-fold cross-validation of a recipe.

The training images (after ``data.classes`` and ``data.train_limit``) fall into ``folds``
stratified, seeded folds (:func:`finetune.data.sources.fold_ids`); fold k's run trains on the
others and holds fold k out as its validation split (``data.folds``/``data.fold``). Each fold is
an ordinary run folder, trained through ``launcher`` like ``finetune compare``'s runs, so a
stopped cross-validation continues where it stopped when run again. The report gives every
metric as the mean and 95 % Student-t interval over the folds; ``oof.jsonl`` holds every
training image's out-of-fold probabilities, from the fold whose model never saw it.

    <out>/fold<k>/   fold k's run folder
    <out>/oof.jsonl  one line per training image: index (in the training split, after classes
                     and limits), fold, label, predicted, probs (per class), image (its file or
                     row, where it has one)
    <out>/cv.json, cv.md   per-fold metrics and their means with intervals
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.compare import parse_launcher, train_runs
from finetune.config import MAX_FOLDS, Config, load_config, split_options
from finetune.errors import ConfigError, DataError
from finetune.files import atomic_write_text
from finetune.runs import CONFIG, Run, check_same_run
from finetune.stats import mean_ci

log = logging.getLogger(__name__)

OOF = "oof.jsonl"
USAGE = ("usage: finetune cv recipe=NAME [folds=5] [output_dir=DIR] "
         "[launcher=\"accelerate launch ...\"] [key=value ...]")
# Set per fold by cv itself.
_SET_BY_CV = ("data.folds", "data.fold", "data.val_split", "output_dir", "resume", "overwrite")


@dataclass
class CvPlan:
    recipe: str
    folds: int
    out: Path
    launcher: list[str]
    configs: list[Config]  # fold k's, checked
    jobs: list[tuple[str, Path, list[str]]]  # (what, run folder, arguments) per fold


def parse_folds(value: str) -> int:
    try:
        folds = int(value)
    except ValueError:
        folds = 0
    if not 2 <= folds <= MAX_FOLDS:
        raise ConfigError(f"folds={value}: cross-validation needs 2 to {MAX_FOLDS} folds (one "
                          f"fold holds nothing out), e.g. folds=5.")
    return folds


def plan_cv(args: list[str]) -> CvPlan:
    """Parse the command's arguments and check every fold's config before any training."""
    from finetune.assemble import check_model

    options, rest = split_options(args, ("recipe", "folds", "output_dir", "launcher"))
    if not options.get("recipe"):
        raise ConfigError(USAGE)
    set_here = [a for a in rest if a.partition("=")[0] in _SET_BY_CV]
    if set_here:
        raise ConfigError(f"{set_here[0]}: finetune cv sets it for every fold (the held-out "
                          f"fold is the validation split); use folds=K and output_dir=DIR.")
    recipe, folds = options["recipe"], parse_folds(options.get("folds", "5"))
    out = Path(options.get("output_dir") or Path("runs") / "cv" / Path(recipe).stem)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file, not a folder; pass another "
                          f"output_dir=DIR.")
    launcher = parse_launcher(options["launcher"]) if "launcher" in options else [sys.executable]
    launcher = [*launcher, str(Path(__file__).with_name("run.py"))]
    plan = CvPlan(recipe, folds, out, launcher, [], [])
    for fold in range(folds):
        folder = out / f"fold{fold}"
        run_args = [f"recipe={recipe}", *rest, "data.val_split=0", f"data.folds={folds}",
                    f"data.fold={fold}", f"output_dir={folder}"]
        cfg = load_config(run_args)
        if fold == 0:
            if load_config([f"recipe={recipe}", *rest]).data.val_split:
                log.info("the recipe's data.val_split is replaced by the held-out fold")
            check_model(cfg)  # the same model for every fold; resolves data.image_size
            if cfg.data.train_limit and cfg.data.train_limit < 2 * folds:
                raise ConfigError(f"folds={folds} of data.train_limit={cfg.data.train_limit} "
                                  f"images leaves folds of under two images; lower folds.")
        cfg.data.image_size = plan.configs[0].data.image_size if fold else cfg.data.image_size
        if (folder / CONFIG).is_file():  # a fold started earlier must be this fold
            check_same_run(folder, cfg)
        plan.configs.append(cfg)
        plan.jobs.append((f"[fold {fold + 1}/{folds}]", folder, run_args))
    check_fold_data(plan.configs[0])
    return plan


def check_fold_data(cfg: Config) -> None:
    """Every fold's split drawn before any training: a fold that leaves a class without
    training images, or settings the data's labels cannot go with, stop the command now,
    not when that fold's turn comes."""
    from finetune.config import check_multilabel, check_single_label
    from finetune.data import fold_split, is_multilabel, load_data

    train, _, _ = load_data(cfg.data)
    (check_multilabel if is_multilabel(train) else check_single_label)(cfg)
    d = cfg.data
    for fold in range(d.folds):
        fold_split(train, d.folds, fold, d.split_seed, allow_empty=d.allow_empty_classes)


def fold_members(cfg: Config):
    """``(training split, fold of each image)`` as every fold's run draws them."""
    from finetune.data import load_data
    from finetune.data.sources import fold_ids

    train, _, _ = load_data(cfg.data)
    d = cfg.data
    return train, fold_ids(train.labels, len(train.classes), d.folds, d.split_seed)


def out_of_fold(plan: CvPlan, runs: list[Run]) -> list[dict]:
    """Every training image's probabilities from the fold model that held it out, scored as
    ``finetune inspect`` scores (the run's precision, ``predict``'s preprocessing)."""
    import torch

    from finetune.data.sources import ImageData
    from finetune.inference import load
    from finetune.mistakes import recorded_precision, score

    train, ids = fold_members(plan.configs[0])
    rows: list[dict | None] = [None] * len(train)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the folds were trained
    for fold, run in enumerate(runs):
        predictor = load(run.path, device, precision=recorded_precision(run.path))
        if predictor.class_names != list(train.classes):
            raise DataError(f"{run.path}: the model's classes {predictor.class_names[:10]} are "
                            f"not the data's {list(train.classes)[:10]}; was the data changed?")
        held = torch.nonzero(ids == fold).flatten().tolist()
        scores = score(predictor, train.subset(ids == fold))
        probs = scores.log_probs.exp()
        for j, i in enumerate(held):
            row = {"index": i, "fold": fold, **_labelled(predictor, scores.labels[j], probs[j]),
                   "probs": [float(f"{p:.6g}") for p in probs[j].tolist()]}
            if not isinstance(train, ImageData):
                row["image"] = train.name(i)
            rows[i] = row
    return rows  # every image is in exactly one fold: no None left


def _labelled(predictor, label, probs) -> dict:
    """An out-of-fold row's truth and prediction: the class and the most likely one, or
    (multi-label) the tags and those over their thresholds."""
    if predictor.multilabel:
        return {"labels": label.nonzero().flatten().tolist(),
                "predicted": (probs >= predictor.thresholds).nonzero().flatten().tolist()}
    return {"label": int(label), "predicted": int(probs.argmax())}


def fold_row(fold: int, run: Run) -> dict:
    """Fold ``fold``'s numbers: its exported model's record (every val_/test_ metric)."""
    final = run.final
    metrics = {k: v for k, v in final.items() if k.startswith(("val_", "test_"))
               and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
    return {"fold": fold, "run": str(run.path), "epochs": final["epoch"],
            "train_images": run.train_images, "train_seconds": round(run.train_seconds, 1),
            **metrics}


def summarize(rows: list[dict], oof: list[dict]) -> dict:
    """Every metric all folds have: mean and 95 % interval half-width over the folds; and the
    pooled out-of-fold accuracy."""
    keys = sorted((k for k in rows[0] if k.startswith(("val_", "test_"))
                   and not k.endswith(("_correct", "_total", "_images"))
                   and all(k in r for r in rows)), key=lambda k: (not k.startswith("val_"), k))
    means = {}
    for key in keys:
        estimate = mean_ci([r[key] for r in rows])
        means[key] = {"mean": estimate.mean, "ci95": estimate.half_width}
    correct = sum(r.get("label", r.get("labels")) == r["predicted"] for r in oof)
    out = {"metrics": means, "oof_accuracy": correct / len(oof), "oof_images": len(oof)}
    if "labels" in oof[0]:  # multi-label: the accuracy is the exact match; and the pooled mAP
        import torch

        from finetune.multilabel_metrics import average_precision, mean_average_precision

        probs = torch.tensor([r["probs"] for r in oof])
        targets = torch.zeros_like(probs)
        for n, r in enumerate(oof):
            targets[n, r["labels"]] = 1
        out["oof_map"] = mean_average_precision(average_precision(probs, targets))
    return out


def _shown(key: str, value: float, half: float | None = None) -> str:
    """A metric as the report shows it: rates in percent, losses as they are."""
    scale, digits = (1, 4) if key.endswith("loss") else (100, 2)
    text = f"{value * scale:.{digits}f}"
    return text if half is None else f"{text} ± {half * scale:.{digits}f}"


def markdown(result: dict) -> str:
    from finetune.report import to_markdown

    rows, means, k = result["folds"], result["summary"]["metrics"], len(result["folds"])
    metric_rows = [[key, _shown(key, m["mean"], m["ci95"]),
                    *(_shown(key, r[key]) for r in rows)] for key, m in means.items()]
    fold_rows = [[str(r["fold"]), str(r["train_images"]), str(r["val_images"]),
                  str(r["epochs"]), f"{r['train_seconds']:.1f}"] for r in rows]
    s = result["summary"]
    blocks = [
        ("h", 1, f"Cross-validation: {result['recipe']}, {k} folds"),
        ("code", result["command"]),
        ("p", f"{s['oof_images']} training images in {k} stratified folds (data.split_seed="
              f"{result['split_seed']}); fold k's model trained on the other folds and was "
              f"validated on fold k (val_*). Every fold's model is also scored on the same test "
              f"split (test_*). Rates in percent; ± is the half-width of the 95 % Student-t "
              f"interval of the mean over the {k} folds."),
        ("table", ["metric", "mean ± 95 %", *(f"fold {r['fold']}" for r in rows)], metric_rows),
        ("p", f"Out-of-fold accuracy, pooled over the {s['oof_images']} images: "
              f"{s['oof_accuracy'] * 100:.2f} % ({OOF}: every image's probabilities from the "
              f"model that did not train on it)."),
        ("table", ["fold", "train images", "val images", "epochs", "training s"], fold_rows)]
    return to_markdown(blocks)


def run_cv(plan: CvPlan, command: str) -> dict:
    """Train the folds not finished yet, score every image out of fold, write the report."""
    runs = train_runs(plan.launcher, plan.jobs, "cv")
    oof = out_of_fold(plan, runs)
    rows = [fold_row(k, run) for k, run in enumerate(runs)]
    for row in rows:
        row["val_images"] = sum(r["fold"] == row["fold"] for r in oof)
    cfg = plan.configs[0]
    result = {"command": command, "recipe": cfg.recipe, "folds": rows,
              "split_seed": cfg.data.split_seed, "classes": list(runs[0].meta["class_names"]),
              "summary": summarize(rows, oof)}
    atomic_write_text(plan.out / OOF, "".join(json.dumps(r) + "\n" for r in oof))
    atomic_write_text(plan.out / "cv.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(plan.out / "cv.md", markdown(result))
    return result


def main(args: list[str], command: str) -> dict:
    plan = plan_cv(args)
    result = run_cv(plan, command)
    for key in ("val_map", "val_acc", "val_loss", "test_map", "test_acc"):
        if key in result["summary"]["metrics"]:
            m = result["summary"]["metrics"][key]
            print(f"{key}: {_shown(key, m['mean'], m['ci95'])} over {plan.folds} folds")
    print(f"wrote {plan.out / 'cv.md'}, cv.json and {OOF}")
    return result
