"""``finetune compare``: train recipes over paired seeds under one budget, or collect finished
runs, and summarise them (means with confidence intervals, paired differences, time to
accuracy, a data-efficiency curve over training-set sizes).

Each run is a separate ``finetune train`` process (through ``launcher``, e.g. ``accelerate
launch --num_processes 8``) writing its own run folder, so a comparison that stops part way is
continued by running the same command again: finished runs are kept, the others resume.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import children
from finetune.config import Config, flat_config, load_config, show_value, split_options
from finetune.errors import ConfigError, TrainingError
from finetune.runs import CONFIG, Run, finished_run, read_run, time_to_accuracy
from finetune.stats import Estimate, mean_ci, paired_difference

log = logging.getLogger(__name__)

# What "the same budget" means: the same data (and amount of it), image size and epochs.
BUDGET_KEYS = ("train.epochs", "data.epoch_repeats", "data.source", "data.root", "data.hf_name",
               "data.hf_config", "data.train_split", "data.test_split", "data.streaming",
               "data.image_size", "data.train_limit", "data.eval_limit", "data.split_seed",
               "data.classes")
# Settings that decide the data order and augmentation draws of a seed: paired seeds share
# them only when these agree too.
PAIRING_KEYS = ("train.batch_size", "data.hflip", "data.crop_pad", "data.random_erasing",
                "data.scale", "data.ratio", "data.auto_augment")
# Settings that say how or where a run ran, not what it was.
_RUN_ONLY = ("output_dir", "overwrite", "resume", "description", "train.log_every",
             "train.checkpoint", "train.checkpoint_every", "train.keep_checkpoints",
             "data.placement", "data.workers")


def label_runs(runs: list[Run]) -> list[str]:
    """Give every run a label: runs differing only in seed or training-set size share one.

    The label is the recipe name, extended by the settings that tell apart groups of the same
    recipe. Returns the labels in order of first appearance.
    """
    def key(run: Run) -> tuple:
        flat = flat_config(run.config)
        return tuple(sorted((k, v) for k, v in flat.items() if k not in _RUN_ONLY
                            and k not in ("train.seed", "data.train_limit")))

    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    recipes = [members[0].config.recipe or "run" for members in groups.values()]
    for (settings, members), recipe in zip(groups.items(), recipes, strict=True):
        label = recipe
        if recipes.count(recipe) > 1:  # the same recipe with other settings: name them
            same = [dict(k) for k, r in zip(groups, recipes, strict=True) if r == recipe]
            mine = dict(settings)
            shown = [k for k in mine if _stands_out(mine[k], [g[k] for g in same])]
            if shown:  # (none: the settings most groups share, e.g. the baseline's)
                label += " (" + ", ".join(f"{k}={show_value(mine[k])}" for k in shown) + ")"
        for run in members:
            run.label = label
    return list(dict.fromkeys(run.label for run in runs))


def _stands_out(value: object, values: list) -> bool:
    """Whether a group's setting names it: it differs from the setting most groups share (or
    no value is most common, e.g. two groups that differ)."""
    counts = sorted((values.count(v) for v in set(values)), reverse=True)
    if len(counts) == 1:
        return False
    common = max(set(values), key=values.count)
    return counts[0] == counts[1] or value != common


def disagreements(flat: dict[str, dict], keys: tuple[str, ...]) -> dict[str, str]:
    """For each of ``keys`` on which the flat configs ``{name: flat_config}`` disagree:
    ``key -> "key: name=value, name=value"``."""
    return {k: f"{k}: " + ", ".join(f"{n}={show_value(f[k])}" for n, f in flat.items())
            for k in keys if len({f[k] for f in flat.values()}) > 1}


# A budget setting that did not decide a run's data (data.hf_name of a run on IDX files).
NOT_USED = "(not used)"
_HUB_ONLY = ("data.hf_name", "data.hf_config")
_HF_ONLY = ("data.train_split", "data.test_split", "data.streaming")


def _used_hub_name(run: Run) -> bool:
    """Whether data.hf_name (and hf_config) chose the run's data: the hub by name, or a local
    folder read by the named builder; not a save_to_disk folder or parquet files."""
    kind, _, where = str(run.meta.get("data", "")).partition(":")
    if kind == "hf-stream" and run.config.data.root:
        root = Path(run.config.data.root).expanduser()
        return not (root.suffix == ".parquet" or (root / "dataset_dict.json").is_file()
                    or (root / "state.json").is_file() or any(root.rglob("*.parquet")))
    return kind not in ("idx", "imagefolder", "hf-disk", "hf-parquet")


def budget_settings(run: Run) -> dict:
    """The run's flat config, its budget settings that did not affect its data (as the
    model.json ``data`` field records where the data came from) shown as :data:`NOT_USED`.
    Runs that did not record their data source keep every setting."""
    flat = flat_config(run.config)
    kind = str(run.meta.get("data", "")).partition(":")[0]
    if not kind:
        return flat
    unused = [*(_HF_ONLY if kind in ("idx", "imagefolder") else ()),
              *(() if _used_hub_name(run) else _HUB_ONLY)]
    return {**flat, **dict.fromkeys(unused, NOT_USED)}


def budget_differences(runs: list[Run]) -> list[str]:
    """``key: label=value, ...`` for each budget key on which runs of one size disagree."""
    out = []
    for size in sorted({r.size for r in runs}):
        flat = {r.label: budget_settings(r) for r in runs if r.size == size}
        out += disagreements(flat, BUDGET_KEYS).values()
    return out


# --- the summary: numbers for the tables -----------------------------------------------------

@dataclass
class RecipeSummary:
    label: str
    seeds: list[int]
    final: Estimate
    best: Estimate
    final_diff: Estimate | None  # against the baseline (the first label), paired by seed
    best_diff: Estimate | None
    # target accuracy -> (seeds that reached it, mean epoch, mean training seconds)
    reach: dict[float, tuple[int, float | None, float | None]]
    images_per_sec: float
    train_seconds: float
    params: int
    # The weight average's final test accuracy (train.ema_decay), when the runs kept one.
    ema_final: Estimate | None = None
    # The final epoch's other test metrics (test_top5_acc, test_balanced_acc, test_macro_f1,
    # test_ece), where every run has them.
    metrics: dict[str, Estimate] = field(default_factory=dict)


@dataclass
class Summary:
    labels: list[str]
    targets: dict[int, list[float]]  # training-set size -> the accuracies timed
    # training-set size -> one RecipeSummary per label that has runs of that size
    by_size: dict[int, list[RecipeSummary]] = field(default_factory=dict)
    budget_warnings: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.by_size)


OTHER_METRICS = ("test_top5_acc", "test_balanced_acc", "test_macro_f1", "test_ece",
                 "test_map", "test_f1_micro", "test_f1_macro")  # the last three: multi-label


def count_parameters(meta: dict) -> int:
    """Parameters of an exported model, from its model.json (no weights read)."""
    from finetune.models import count_parameters as count

    return count(meta["architecture"], num_classes=meta["num_classes"],
                 in_chans=meta["in_chans"], image_size=meta["image_size"],
                 norm=meta.get("norm", "torch"))


def default_targets(runs: list[Run]) -> list[float]:
    """Two accuracies every recipe reaches on average: the lowest mean final accuracy rounded
    down to a percent, and 5 points below it."""
    means = []
    for label in dict.fromkeys(r.label for r in runs):
        finals = [r.final_acc for r in runs if r.label == label]
        means.append(sum(finals) / len(finals))
    top = math.floor(min(means) * 100 + 1e-9) / 100
    return [round(top - 0.05, 2), top] if top >= 0.05 else [top]


def summarize(runs: list[Run], targets: list[float] | None = None) -> Summary:
    """Per training-set size and label: accuracy estimates, paired differences against the
    first label, time to the target accuracies, speed and size."""
    labels = list(dict.fromkeys(r.label for r in runs))
    summary = Summary(labels, {}, budget_warnings=budget_differences(runs))
    params = {}
    for size in sorted({r.size for r in runs}):
        # Unless given, what every recipe reaches on average at this size.
        summary.targets[size] = sorted(targets or default_targets(
            [r for r in runs if r.size == size]))
        rows = []
        baseline = None  # (final, best) by seed of the first label with runs of this size
        for label in labels:
            group = sorted((r for r in runs if r.label == label and r.size == size),
                           key=lambda r: r.seed)
            if not group:
                continue
            final = {r.seed: r.final_acc for r in group}
            best = {r.seed: r.best_acc for r in group}
            is_base = baseline is None
            if is_base:
                baseline = (final, best)
            reach = {}
            for target in summary.targets[size]:
                hits = [hit for r in group if (hit := time_to_accuracy(r.records, target))]
                reach[target] = (len(hits),
                                 sum(h[0] for h in hits) / len(hits) if hits else None,
                                 sum(h[1] for h in hits) / len(hits) if hits else None)
            if label not in params:
                params[label] = count_parameters(group[0].meta)
            rows.append(RecipeSummary(
                label=label, seeds=[r.seed for r in group],
                final=mean_ci(list(final.values())), best=mean_ci(list(best.values())),
                final_diff=None if is_base else paired_difference(baseline[0], final),
                best_diff=None if is_base else paired_difference(baseline[1], best),
                reach=reach,
                images_per_sec=sum(r.images_per_sec for r in group) / len(group),
                train_seconds=sum(r.train_seconds for r in group) / len(group),
                params=params[label],
                ema_final=(mean_ci([r.final["ema_test_acc"] for r in group])
                           if all("ema_test_acc" in r.final for r in group) else None),
                metrics={k: mean_ci([r.final[k] for r in group]) for k in OTHER_METRICS
                         if all(k in r.final for r in group)}))
        summary.by_size[size] = rows
    return summary


# --- running a comparison --------------------------------------------------------------------

@dataclass
class Plan:
    """What ``finetune compare recipe=A,B ...`` runs: one entry per (size, recipe, seed)."""

    recipes: list[str]
    seeds: list[int]
    sizes: list[int | None]  # data.train_limit values (None: the recipes' own)
    out: Path
    targets: list[float] | None
    launcher: list[str]
    # (recipe, seed, size, run folder, its full overrides: common, its own, seed, size, folder)
    runs: list[tuple[str, int, int | None, Path, list[str]]] = field(default_factory=list)


def float_list(key: str, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{key}={value}: expected comma-separated numbers, e.g. "
                          f"{key}=0.8,0.9") from None


def parse_seeds(value: str) -> list[int]:
    """``seeds=3`` -> 0,1,2; ``seeds=0,5,9`` -> those."""
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"seeds={value}: give a count (seeds=3) or a list (seeds=0,1,2)."
                          ) from None
    if len(seeds) == 1 and "," not in value:
        if seeds[0] < 1:
            raise ConfigError(f"seeds={value}: need at least one seed.")
        seeds = list(range(seeds[0]))
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"seeds={value}: seeds must be distinct and >= 0.")
    return seeds


def _split_overrides(rest: list[str]) -> tuple[list[int | None], list[str | None], list[str],
                                                dict[str, list[str]]]:
    """``(training-set sizes, methods, overrides for every recipe, {recipe: its own})``:
    ``data.train_limit=100,1000`` and ``finetune.method=linear,full`` list the sizes and
    methods compared (``[None]``: the recipes' own); ``RECIPE:key=value`` is that recipe's."""
    sizes: list[int | None] = [None]
    methods: list[str | None] = [None]
    common, own = [], {}
    for arg in rest:
        key, _, value = arg.partition("=")
        if key == "finetune.method" and "," in value:  # every recipe with each method
            methods = [v.strip() for v in value.split(",") if v.strip()]
            if len(set(methods)) != len(methods):
                raise ConfigError(f"{key}={value} lists a method twice.")
        elif key == "data.train_limit" and "," in value:
            try:
                sizes = [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"{key}={value}: expected comma-separated image counts, "
                                  f"e.g. {key}=100,1000,10000") from None
        elif ":" in key:  # RECIPE:key=value applies to that recipe only
            name, _, sub = key.partition(":")
            own.setdefault(name, []).append(f"{sub}={value}")
        elif key == "train.seed":
            raise ConfigError("train.seed is set by compare (seed k of every recipe); use "
                              "seeds=N or seeds=0,1,2.")
        else:
            common.append(arg)
    return sizes, methods, common, own


def plan_comparison(args: list[str]) -> Plan:
    """Parse ``recipe=A,B [seeds=N] [targets=...] [output_dir=DIR] [launcher="..."]
    [A:key=value ...] [key=value ...]`` and validate every run's config before any runs.
    ``data.train_limit=100,1000`` repeats the comparison per training-set size;
    ``finetune.method=linear,lp_ft,full`` compares every recipe with each method."""
    from finetune.assemble import check_model

    options, rest = split_options(args, ("recipe", "seeds", "targets", "output_dir", "launcher"))
    recipes = [r for r in options.get("recipe", "").split(",") if r]
    seeds = parse_seeds(options["seeds"]) if "seeds" in options else [0, 1, 2]
    targets = float_list("targets", options["targets"]) if "targets" in options else None
    out = Path(options["output_dir"]) if "output_dir" in options else None
    launcher = parse_launcher(options["launcher"]) if "launcher" in options else None
    sizes, methods, common, own = _split_overrides(rest)
    if len(recipes) < 1:
        raise ConfigError("usage: finetune compare recipe=A,B [seeds=3] [key=value ...] "
                          "or finetune compare RUN_DIR [RUN_DIR ...]")
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"recipe={','.join(recipes)} lists a recipe twice; to compare a "
                          f"recipe with itself under other settings, copy it to a new file.")
    unknown = sorted(set(own) - set(recipes))
    if unknown:
        raise ConfigError(f"overrides for {', '.join(unknown)}, which is not among the "
                          f"compared recipes ({', '.join(recipes)}); write RECIPE:key=value.")
    out = out or Path("runs") / "compare" / time.strftime("%Y%m%d-%H%M%S")
    run_py = str(Path(__file__).with_name("run.py"))
    plan = Plan(recipes, seeds, sizes, out, targets,
                [*(launcher or [sys.executable]), run_py])
    for size in sizes:
        configs = {}
        for recipe, method in ((r, m) for r in recipes for m in methods):
            name = Path(recipe).stem + (f"-{method}" if method else "")
            for seed in seeds:
                folder = out / (f"n{size}" if size is not None else "") / name / f"seed{seed}"
                run_args = [f"recipe={recipe}", *common, *own.get(recipe, []),
                            *([f"finetune.method={method}"] if method else []),
                            f"train.seed={seed}", f"output_dir={folder}"]
                if size is not None:
                    run_args.append(f"data.train_limit={size}")
                configs[name] = load_config(run_args)  # every config checked before any run
                check_model(configs[name])
                plan.runs.append((name, seed, size, folder, run_args))
        check_budget(configs)
    return plan


def check_budget(configs: dict[str, Config]) -> None:
    """Refuse recipes that would not get the same budget; warn where seeds cannot pair."""
    flat = {name: flat_config(cfg) for name, cfg in configs.items()}
    for keys, fatal in ((BUDGET_KEYS, True), (PAIRING_KEYS, False)):
        differ = disagreements(flat, keys)
        if not differ:
            continue
        detail = "; ".join(differ.values())
        if fatal:
            first = next(iter(differ))
            raise ConfigError(f"the recipes do not get the same budget ({detail}). Set it for "
                              f"all of them on the command line, e.g. "
                              f"{first}={show_value(next(iter(flat.values()))[first])}.")
        log.warning("seeds are paired, but the recipes draw batches or augmentations "
                    "differently (%s), so seed k does not give them the same draws", detail)


def run_comparison(plan: Plan) -> list[Run]:
    """Train every planned run not finished yet, one process each; return all runs."""
    total = len(plan.runs)
    jobs = [(f"[{i}/{total}] {recipe} seed {seed}" + (f" on {size} images" if size else ""),
             folder, run_args)
            for i, (recipe, seed, size, folder, run_args) in enumerate(plan.runs, start=1)]
    return train_runs(plan.launcher, jobs, "compare")


def train_runs(launcher: list[str], jobs: list[tuple[str, Path, list[str]]], command: str
               ) -> list[Run]:
    """Train each job ``(what, run folder, its arguments)`` through ``launcher``, one process
    at a time: a finished run is kept, a started one resumed (``resume=auto``). ``command``
    (compare, cv) words the error of a failed run."""
    runs = []
    for what, folder, run_args in jobs:
        run = finished_run(folder)
        if run is not None:
            print(f"{what}: finished earlier, kept ({folder})", flush=True)
            runs.append(run)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        resume = ["resume=auto"] if (folder / CONFIG).is_file() else []
        print(f"{what}: training -> {folder}", flush=True)
        start = time.perf_counter()
        code = children.run([*launcher, *run_args, *resume], folder / "train.log")
        if code != 0:
            tail = (folder / "train.log").read_text().splitlines()[-15:]
            raise TrainingError(f"{what} failed (exit {code}); its log {folder / 'train.log'} "
                                f"ends with:\n  " + "\n  ".join(tail) + f"\nFix it and run the "
                                f"same {command} command again: finished runs are kept.")
        run = read_run(folder)
        print(f"{what}: test accuracy {run.final_acc:.4f} (best {run.best_acc:.4f}), "
              f"{run.train_seconds:.1f} s of training, {time.perf_counter() - start:.0f} s "
              f"in all", flush=True)
        runs.append(run)
    return runs


def parse_launcher(value: str) -> list[str]:
    """``launcher="accelerate launch --num_processes 8"`` as arguments."""
    try:
        return shlex.split(value)
    except ValueError as e:
        raise ConfigError(f"launcher={value}: {e} (quote the launcher once, e.g. "
                          f"launcher=\"accelerate launch --num_processes 2\").") from None
