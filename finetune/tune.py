"""``finetune tune``: hyperparameter search with Optuna (the ``tune`` extra).

    finetune tune recipe=NAME 'train.lr=loguniform(1e-3,1)' 'train.label_smoothing=uniform(0,0.2)'
        [n_trials=20] [timeout=SECONDS] [pruner=median|hyperband|none] [metric=val_acc|val_map]
        [seed=0] [parallel=1] [output_dir=DIR] [launcher="accelerate launch ..."] [key=value ...]

Every trial is an ordinary run folder (``DIR/trialNNNN``) trained in its own process through
``launcher``, as ``finetune compare`` trains; its epochs are reported to the study from its
``metrics.jsonl`` as they are written, and a trial the pruner stops gets SIGTERM. Trials are
scored on the validation split (``metric``, a ``val_*`` key: by default ``val_acc``, on
multi-label data ``val_map``), never on the test split. The
study lives in ``DIR/study.db`` (SQLite): the same command after a kill resumes it, taking up
the trials that were running (from their checkpoints where they have them) and running trials
until ``n_trials`` have finished (completed or pruned). Trial 0 is the recipe's own settings,
never pruned: the baseline the best trial is measured against. At the end the best trial is
written as a recipe (``DIR/best.yaml``), its test accuracy (and the baseline's) measured once,
and the report written (:mod:`finetune.tune_report`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune.compare import parse_launcher
from finetune.config import flat_config, load_config, split_options
from finetune.data import multilabel_data
from finetune.errors import ConfigError
from finetune.search_space import Dimension, as_override, check_space, split_space

log = logging.getLogger(__name__)

STUDY = "study.db"
OPTIONS = ("recipe", "n_trials", "timeout", "pruner", "metric", "seed", "parallel",
           "output_dir", "launcher")
PRUNERS = ("median", "hyperband", "none")
# What a run records of its validation split each epoch (finetune.evaluation).
METRICS = ("val_acc", "val_loss", "val_top5_acc", "val_balanced_acc", "val_macro_f1", "val_ece",
           "val_map", "val_f1_micro", "val_f1_macro")  # the last three: multi-label data
USAGE = ("usage: finetune tune recipe=NAME KEY=loguniform(a,b)|uniform(a,b)|int(a,b)|"
         "choice(a,b,...) [n_trials=20] [timeout=S] [pruner=median|hyperband|none] "
         "[metric=val_acc|val_map] [seed=0] [parallel=1] [output_dir=DIR] [key=value ...]")


@dataclass
class TuneSpec:
    recipe: str
    dims: list[Dimension]
    fixed: list[str]  # plain overrides, for every trial
    out: Path
    launcher: list[str]
    n_trials: int = 20
    timeout: float | None = None  # seconds of this command; no trial starts after it
    pruner: str = "median"
    metric: str = "val_acc"
    seed: int = 0
    devices: list[str | None] = field(default_factory=lambda: [None])  # one trial each
    epochs: int = 10  # the most epochs a trial runs (Hyperband's max resource)
    baseline: dict = field(default_factory=dict)  # the recipe's own point of the space

    @property
    def direction(self) -> str:
        return "minimize" if self.metric.endswith(("loss", "ece")) else "maximize"

    def signature(self) -> dict:
        """What makes two searches the same search: stored in the study, checked on resume."""
        return {"recipe": self.recipe, "fixed": sorted(self.fixed), "metric": self.metric,
                "space": {d.key: d.describe() for d in self.dims}}

    def trial_args(self, params: dict, folder: Path) -> list[str]:
        return [f"recipe={self.recipe}", *self.fixed,
                *(as_override(k, v) for k, v in params.items()), f"output_dir={folder}"]


def import_optuna():
    """Optuna, or a one-line error naming the extra."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("finetune tune needs Optuna: pip install 'finetune[tune]' (optuna, "
                          "and scikit-learn for the parameter importances).") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _count(name: str, text: str, low: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise ConfigError(f"{name}={text}: expected an integer >= {low}.")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"timeout={text}: expected seconds > 0 (no trial starts after them; "
                          f"running trials finish).")
    return value


def trial_devices(parallel: int) -> list[str | None]:
    """The GPU each parallel trial gets (CUDA_VISIBLE_DEVICES), or None each on a CPU."""
    import torch

    gpus = torch.cuda.device_count()
    if parallel == 1 or gpus == 0:
        if parallel > 1:
            log.warning("parallel=%d without a GPU: the trials share this machine's %d cores",
                        parallel, os.cpu_count() or 1)
        return [None] * parallel
    if parallel > gpus:
        raise ConfigError(f"parallel={parallel}: {gpus} GPU(s) visible, one trial per GPU; "
                          f"pass parallel={gpus} or less.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    return ids[:parallel]


def plan_tune(args: list[str]) -> TuneSpec:
    """Parse and check the command's arguments; every bound of the space and the model are
    checked before any trial runs."""
    options, rest = split_options(args, OPTIONS)
    if not options.get("recipe"):
        raise ConfigError(USAGE)
    dims, fixed = split_space(rest)
    base = [f"recipe={options['recipe']}", *fixed]
    check_space(dims, base)
    cfg = load_config(base)
    if not cfg.data.val_split:
        raise ConfigError("finetune tune scores every trial on a validation split, never on the "
                          "test split: set data.val_split (e.g. data.val_split=0.1).")
    metric = options.get("metric") or ("val_map" if multilabel_data(cfg.data) else "val_acc")
    if metric not in METRICS:
        raise ConfigError(f"metric={metric}: the search reads a validation metric, one of "
                          f"{', '.join(METRICS)} (never the test split's).")
    pruner = options.get("pruner", "median")
    if pruner not in PRUNERS:
        raise ConfigError(f"pruner={pruner}; valid: {', '.join(PRUNERS)}.")
    flat = flat_config(cfg)
    epochs = max([cfg.train.epochs, *(c for d in dims if d.key == "train.epochs"
                                      for c in d.corners())])
    out = Path(options.get("output_dir") or Path("runs") / "tune" / Path(options["recipe"]).stem)
    launcher = parse_launcher(options["launcher"]) if "launcher" in options else [sys.executable]
    spec = TuneSpec(
        options["recipe"], dims, fixed, out,
        [*launcher, str(Path(__file__).with_name("run.py"))],
        n_trials=_count("n_trials", options.get("n_trials", "20")),
        timeout=_timeout(options["timeout"]) if "timeout" in options else None,
        pruner=pruner, metric=metric, seed=_count("seed", options.get("seed", "0"), 0),
        devices=trial_devices(_count("parallel", options.get("parallel", "1"))),
        epochs=int(epochs),
        baseline={d.key: d.param(flat[d.key]) for d in dims})
    outside = [f"{d.key}={flat[d.key]}" for d in dims if not d.contains(flat[d.key])]
    if outside:
        log.warning("the recipe's own %s lies outside the search space: no baseline trial",
                    ", ".join(outside))
        spec.baseline = {}
    return spec


def make_pruner(spec: TuneSpec, optuna):
    """Optuna's pruner, stepping by epoch."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner()
    elif spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs)
    elif spec.pruner == "none":
        return optuna.pruners.NopPruner()
    else:
        raise ValueError(f"unknown pruner {spec.pruner!r}; valid: {', '.join(PRUNERS)}")


def _study_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output_dir={out} is a file, not a folder; pass another "
                          f"output_dir=DIR.") from None
    except OSError as e:
        raise ConfigError(f"output_dir={out} cannot be made ({e.strerror}); pass another "
                          f"output_dir=DIR.") from None


def open_study(spec: TuneSpec, optuna):
    """The study in ``out/study.db``: created (with the baseline trial queued), or resumed when
    it is the same search; its sampler seeded by the seed and the trials it holds, so that a
    resumed search draws new points, not the ones it drew before."""
    _study_folder(spec.out)
    path = (spec.out / STUDY).resolve()
    try:
        study = optuna.create_study(storage=f"sqlite:///{path}", study_name="finetune",
                                    load_if_exists=True, direction=spec.direction,
                                    pruner=make_pruner(spec, optuna))
        saved = study.user_attrs.get("finetune")
    except Exception as e:  # sqlalchemy's errors, Optuna's: the file is not a study
        raise ConfigError(f"{path} cannot be read as an Optuna study ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); move it away, or pass another "
                          f"output_dir=DIR.") from None
    mine = json.loads(json.dumps(spec.signature()))  # the space a dict: order is no matter
    if saved is not None:  # studies saved before the overrides were sorted
        saved = {**saved, "fixed": sorted(saved.get("fixed", []))}
    if saved is None and study.trials:
        raise ConfigError(f"{path} holds a study that finetune tune did not start; pass "
                          f"another output_dir=DIR.")
    if saved is None:
        study.set_user_attr("finetune", mine)
    elif saved != mine:
        differ = ", ".join(f"{k}: {saved.get(k)} (now {mine[k]})" for k in mine
                           if saved.get(k) != mine[k])
        raise ConfigError(f"{spec.out} holds a search over another space or recipe ({differ}); "
                          f"run the same search to resume it, or pass another output_dir=DIR.")
    study.sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.trials),
                                               constant_liar=len(spec.devices) > 1)
    if not study.trials and spec.baseline:
        study.enqueue_trial(spec.baseline, user_attrs={"baseline": True})
    return study


def main(args: list[str], command: str) -> dict:
    from finetune.runs import lock_run
    from finetune.trials import run_trials
    from finetune.tune_report import write_report

    optuna = import_optuna()
    spec = plan_tune(args)
    _study_folder(spec.out)
    with lock_run(spec.out):  # one search at a time in a folder
        study = open_study(spec, optuna)
        run_trials(spec, study, optuna)
        return write_report(spec, study, optuna, command)
