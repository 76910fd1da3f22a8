"""What ``finetune tune`` ends with: the trials table, the best trial as a recipe file
(``best.yaml``, run by ``finetune train recipe=DIR/best.yaml``), the test accuracy of the best
trial and of the baseline (the recipe's own settings) measured once, at the end, the time the
pruner saved, and Optuna's optimisation-history and parameter-importance plots:
``tune.json``, ``tune.md`` and their PNGs in the search's folder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

from finetune.config import load_config, to_yaml
from finetune.files import atomic_write_text
from finetune.report import to_markdown
from finetune.runs import CONFIG, METRICS, read_metrics
from finetune.trials import trial_folder

log = logging.getLogger(__name__)

BEST = "best.yaml"


def trial_rows(spec, study, optuna) -> list[dict]:
    """One row per trial: its state, point, value, epochs run of those planned, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        folder = trial_folder(spec.out, t.number)
        records = read_metrics(folder) if (folder / METRICS).is_file() else []
        train = (load_config([f"recipe={folder / CONFIG}"]).train
                 if (folder / CONFIG).is_file() else None)
        per_epoch = [r.get("epoch_time", 0) + r.get("eval_time", 0) for r in records]
        rows.append({"number": t.number, "state": t.state.name, "params": t.params,
                     "value": t.value, "baseline": bool(t.user_attrs.get("baseline")),
                     "epochs": len(records), "planned_epochs": train and train.epochs,
                     "early_stopping": bool(train and train.early_stopping),
                     "epoch_seconds": round(sum(per_epoch), 1),
                     "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
                     "run": str(folder)})
    return rows


def pruning_saving(rows: list[dict]) -> dict:
    """The time pruning saved against running every finished trial to its end: each pruned
    trial's missing epochs at its own mean seconds per epoch (training and evaluation). With
    early stopping a pruned trial might have stopped before its last epoch: then the figure
    is an upper bound (``upper_bound``)."""
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["epochs"]]
    saved = sum((r["planned_epochs"] - r["epochs"]) * r["epoch_seconds"] / r["epochs"]
                for r in pruned if r["planned_epochs"])
    spent = sum(r["epoch_seconds"] for r in rows if r["state"] in ("COMPLETE", "PRUNED"))
    return {"pruned": len([r for r in rows if r["state"] == "PRUNED"]),
            "epoch_seconds_spent": round(spent, 1), "epoch_seconds_saved": round(saved, 1),
            "saved_fraction": round(saved / (spent + saved), 4) if spent + saved else 0.0,
            "upper_bound": any(r.get("early_stopping") for r in pruned)}


def write_best(spec, best: dict) -> Path:
    """The best trial's config as a recipe: its run's config.yaml but for where it ran."""
    cfg = load_config([f"recipe={Path(best['run']) / CONFIG}"])
    cfg.output_dir, cfg.resume, cfg.overwrite = None, None, False
    cfg.description = (f"best of finetune tune in {spec.out}: trial {best['number']}, "
                       f"{spec.metric} {best['value']:.4f}")
    atomic_write_text(spec.out / BEST, to_yaml(cfg))
    return spec.out / BEST


def test_once(run: str) -> dict:
    """The test split's numbers of a trial's exported model (``finetune evaluate``; its
    printout kept out of the search's)."""
    from finetune.evaluation import evaluate_run

    with contextlib.redirect_stdout(io.StringIO()):
        result = evaluate_run(run, [])
    return {k: result[k] for k in ("test_acc", "test_loss", "test_macro_f1") if k in result}


def plots(study, optuna, out: Path, seed: int) -> list[str]:
    """Optuna's matplotlib optimisation history and (fANOVA, seeded) parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    made = []
    drawings = [("history.png", lambda: vis.plot_optimization_history(study))]
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        drawings.append(("importances.png",
                         lambda: vis.plot_param_importances(study, evaluator=evaluator)))
    for name, draw in drawings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning: the plots work as documented
            try:
                axes = draw()
            except (ImportError, ValueError, RuntimeError) as e:
                log.warning("no %s: %s", name, e)
                continue
        axes.figure.tight_layout()
        axes.figure.savefig(out / name, dpi=110)
        plt.close(axes.figure)
        made.append(name)
    return made


def _value(row: dict) -> str:
    return "" if row["value"] is None else f"{row['value']:.4f}"


def _point(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def markdown(result: dict, spec) -> str:
    rows, s = result["trials"], result["pruning"]
    table = [[str(r["number"]) + (" (recipe)" if r["baseline"] else ""), r["state"].lower(),
              _point(r["params"]), _value(r), f"{r['epochs']}/{r['planned_epochs'] or '?'}",
              "" if r["seconds"] is None else f"{r['seconds']:.0f}"] for r in rows]
    blocks = [("h", 1, f"Hyperparameter search: {spec.recipe}"), ("code", result["command"]),
              ("p", f"{len(rows)} trials, TPE sampler (seed {spec.seed}), {spec.pruner} pruner "
                    f"on {spec.metric} of the validation split after every epoch. The search "
                    f"reads only the validation split; the test split is measured once, at "
                    f"the end, for the best trial and the recipe's own settings (every run "
                    f"also logs test accuracy per epoch in its metrics.jsonl, which the search "
                    f"never reads)."),
              ("table", ["trial", "state", "point", spec.metric, "epochs", "s"], table),
              ("p", f"Pruned: {s['pruned']} of {len(rows)} trials. Pruning saved "
                    f"{'at most' if s['upper_bound'] else 'about'} "
                    f"{s['epoch_seconds_saved']:.0f} s of training and evaluation against "
                    f"running every trial to its end ({s['saved_fraction'] * 100:.0f} %; "
                    f"{s['epoch_seconds_spent']:.0f} s spent"
                    + ("; with early stopping a pruned trial might have stopped sooner)."
                       if s["upper_bound"] else ")."))]
    best = result.get("best")
    if best:
        lines = [f"Best: trial {best['number']} ({_point(best['params'])}), {spec.metric} "
                 f"{best['value']:.4f}, test accuracy {best['test']['test_acc'] * 100:.2f} %"]
        base = result.get("baseline")
        if base and base.get("test"):
            lines.append(f"the recipe's own settings (trial {base['number']}): {spec.metric} "
                         f"{_value(base)}, test accuracy {base['test']['test_acc'] * 100:.2f} %")
        blocks += [("p", "; ".join(lines) + f". `finetune train recipe={spec.out / BEST}` "
                                            f"trains the best trial's config.")]
    captions = {"history.png": f"{spec.metric} of every trial, and the best so far "
                               f"(Optuna's optimisation history)",
                "importances.png": "how much each searched key decided the metric (fANOVA "
                                   "importances over the complete trials)"}
    blocks += [("img", name, captions[name]) for name in result["plots"]]
    return to_markdown(blocks)


def write_report(spec, study, optuna, command: str) -> dict:
    rows = trial_rows(spec, study, optuna)
    result = {"command": command, "signature": spec.signature(), "trials": rows,
              "pruning": pruning_saving(rows), "plots": []}
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if complete:
        best = next(r for r in rows if r["number"] == study.best_trial.number)
        best["test"] = test_once(best["run"])
        result["best"], result["best_recipe"] = best, str(write_best(spec, best))
        base = next((r for r in complete if r["baseline"]), None)
        if base:
            base["test"] = best["test"] if base is best else test_once(base["run"])
            result["baseline"] = base
    result["plots"] = plots(study, optuna, spec.out, spec.seed) if complete else []
    atomic_write_text(spec.out / "tune.json", json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(spec.out / "tune.md", markdown(result, spec))
    _print_summary(result, spec)
    return result


def _print_summary(result: dict, spec) -> None:
    s = result["pruning"]
    print(f"{len(result['trials'])} trials, {s['pruned']} pruned (about "
          f"{s['epoch_seconds_saved']:.0f} s saved)")
    if "best" in result:
        best = result["best"]
        print(f"best: trial {best['number']} ({_point(best['params'])}): {spec.metric} "
              f"{best['value']:.4f}, test accuracy {best['test']['test_acc']:.4f}")
        if "baseline" in result:
            print(f"the recipe's own settings: {spec.metric} {_value(result['baseline'])}, "
                  f"test accuracy {result['baseline']['test']['test_acc']:.4f}")
        print(f"wrote {result['best_recipe']} (finetune train recipe={result['best_recipe']})")
    print(f"wrote {spec.out / 'tune.md'} and tune.json")
