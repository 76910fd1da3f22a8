"""What each fine-tuning strategy changes against the plain recipe: accuracy and time.

Every strategy is the plain recipe plus its overrides, trained over the same paired seeds as
separate `finetune train` processes (finished runs are kept, so the script continues where it
stopped), then summarised by finetune's comparison report (paired differences against the
plain recipe, which comes first).

    python bench/strategies.py --weights runs/source-fmnist/model.safetensors \
        --out runs/strategies -- 'data.classes=[0,2,3,4,6]' data.train_limit=1000

The arguments after ``--`` apply to every run. Without network, ``--weights`` is a model the
toolkit pretrained itself (e.g. on other classes, see docs/compare-fmnist); with network, leave
it out for ImageNet weights.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from finetune.compare import Plan, run_comparison
from finetune.config import load_config
from finetune.report import build_report

RECIPE = "resnet18_pretrained_cpu_fmnist"
# name -> overrides on top of the recipe (and the common arguments)
STRATEGIES: dict[str, list[str]] = {
    "plain": [],
    "linear-probe": ["finetune.freeze=backbone"],
    "freeze-stem-layer1-layer2": ["finetune.freeze=stages:3"],
    "gradual-unfreezing": ["finetune.freeze=backbone", "finetune.unfreeze_at=[2,3,4,5,6]"],
    "bn-frozen-stats": ["finetune.bn=freeze_stats"],
    "discriminative-lr": ["finetune.head_lr_mult=10", "finetune.layer_decay=0.7"],
    "adamw": ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.05"],
    "warmup-cosine": ["train.schedule=cosine", "train.warmup_epochs=1"],
    "step-schedule": ["train.schedule=step", "train.step_epochs=[7,10]"],
    "no-label-smoothing": ["train.label_smoothing=0"],
    "mixup": ["data.mixup=0.2"],
    "cutmix": ["data.cutmix=1.0"],
    "ema": ["train.ema_decay=0.99"],
    "early-stopping": ["data.val_split=0.1", "train.early_stopping=3"],
    "clip-grad-norm": ["train.clip_grad_norm=1.0"],
    "accumulate-4": ["train.accumulate=4"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None, help="model.weights of the plain recipe")
    parser.add_argument("--out", type=Path, default=Path("runs/strategies"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated strategy names")
    parser.add_argument("--targets", default="0.60,0.65", help="accuracies to time")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="another strategy, e.g. 'lr-find=train.lr=0.0215' (space-separated)")
    parser.add_argument("common", nargs="*", help="overrides for every run")
    ns = parser.parse_args()
    strategies = dict(STRATEGIES)
    for extra in ns.extra:
        name, _, overrides = extra.partition("=")
        strategies[name] = overrides.split()
    if ns.only:
        strategies = {k: strategies[k] for k in ["plain", *ns.only.split(",")]}
    seeds = [int(s) for s in ns.seeds.split(",")]
    common = [*ns.common, *([f"model.weights={ns.weights}"] if ns.weights else [])]
    plan = Plan([RECIPE], seeds, [None], ns.out, None,
                [sys.executable, str(Path(__file__).parents[1] / "finetune" / "run.py")])
    for i, (name, overrides) in enumerate(strategies.items()):
        for seed in seeds:
            folder = ns.out / f"{i:02d}-{name}" / f"seed{seed}"
            args = [f"recipe={RECIPE}", *common, *overrides, f"train.seed={seed}",
                    f"output_dir={folder}", "train.checkpoint=false"]
            load_config(args)  # every config checked before the first run
            plan.runs.append((f"{RECIPE} [{name}]", seed, None, folder, args))
    runs = run_comparison(plan)
    report = build_report(runs, ns.out / "report", [float(t) for t in ns.targets.split(",")],
                          command="python " + shlex.join(sys.argv))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
