"""The trials of ``finetune tune``: each an ordinary training in its own process (through the
search's launcher, one per device slot), watched through its ``metrics.jsonl``: every new
epoch's validation metric is reported to its Optuna trial, and a trial the pruner stops gets
SIGTERM (a training saves a checkpoint and ends). Trials that were running when a search was
killed are taken up again first (``resume=auto``: from their newest checkpoint, if any)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune import children
from finetune.checkpoint import CHECKPOINTS
from finetune.config import load_config
from finetune.errors import ConfigError, FinetuneError, TrainingError
from finetune.runs import CONFIG, METRICS, finished_run, lock_run, read_metrics

MAX_FAILURES = 3  # failed trials in a row that stop the search: the recipe itself is broken
POLL_SECONDS = 1.0


@dataclass
class Running:
    trial: object  # optuna.Trial
    child: object  # subprocess.Popen
    folder: Path
    slot: int
    baseline: bool
    epochs: int  # planned: no pruning at the last one (the trial has finished by then)
    reported: set = field(default_factory=set)  # epochs reported to the trial
    pruned_at: int | None = None


def trial_folder(out: Path, number: int) -> Path:
    return out / f"trial{number:04d}"


def suggest(trial, spec) -> dict:
    """The trial's point of the space (an enqueued trial's fixed values come back as they
    were queued)."""
    params = {}
    for dim in spec.dims:
        if dim.kind == "choice":
            params[dim.key] = trial.suggest_categorical(dim.key, list(dim.choices))
        elif dim.kind == "int":
            params[dim.key] = trial.suggest_int(dim.key, dim.low, dim.high)
        elif dim.kind in ("uniform", "loguniform"):
            params[dim.key] = trial.suggest_float(dim.key, dim.low, dim.high,
                                                  log=dim.kind == "loguniform")
        else:
            raise ValueError(f"unknown kind {dim.kind!r}; valid: choice, int, uniform, "
                             f"loguniform")
    return params


def launch(spec, trial, slot: int, frozen=None) -> Running:
    """Start the trial's training; a trial taken up again (``frozen``: as the killed search
    left it) resumes its run folder."""
    import os

    resumed = frozen is not None
    folder = trial_folder(spec.out, trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    if resumed:  # the killed search's child may still be saving its checkpoint
        wait_unlocked(folder)
    params = suggest(trial, spec)  # a resumed trial's stored values, drawn where missing
    epochs = load_config(spec.trial_args(params, folder)).train.epochs
    trial.set_user_attr("run", folder.name)
    resume = ["resume=auto"] if (folder / CONFIG).is_file() else []
    env = dict(os.environ)
    if spec.devices[slot] is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.devices[slot]
    child = children.start([*spec.launcher, *spec.trial_args(params, folder), *resume],
                           folder / "train.log", env)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in params.items())
    baseline = bool(trial.user_attrs.get("baseline"))
    what = " (the recipe's own settings)" if baseline else ""
    print(f"trial {trial.number}{what}"
          f"{' resumed' if resumed else ''}: {shown} -> {folder}", flush=True)
    return Running(trial, child, folder, slot, baseline, epochs,
                   set(frozen.intermediate_values) if resumed else set())


def wait_unlocked(folder: Path, seconds: float = 600) -> None:
    """Wait until no process holds the run folder's lock."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with lock_run(folder):
                return
        except ConfigError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def drop_checkpoints(folder: Path) -> None:
    """A pruned trial is never resumed: its checkpoints (a model and optimizer state each)
    would only fill the disk. Its metrics, log and config stay."""
    shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)


def settled(spec, study, optuna, frozen) -> bool:
    """Tell the study about a trial the killed search left RUNNING that had ended already
    (pruned, or finished before its result was told); whether it was."""
    folder = trial_folder(spec.out, frozen.number)
    if frozen.user_attrs.get("pruned_at") is not None:
        study.tell(frozen.number, state=optuna.trial.TrialState.PRUNED)
        drop_checkpoints(folder)
    elif (run := finished_run(folder)) is not None:
        study.tell(frozen.number, final_value(run, spec.metric))
    else:
        return False
    print(f"trial {frozen.number}: ended before the search was stopped, told", flush=True)
    return True


def final_value(run, metric: str) -> float:
    value = run.final.get(metric)
    if value is None:
        raise TrainingError(f"{run.path / METRICS}: no {metric} in the exported epoch's record "
                            f"(val_top5_acc needs more than 5 classes); choose another metric=.")
    return value


def report_epochs(r: Running, metric: str, prune: bool = True) -> None:
    """Report the trial's new epochs; with ``prune``, SIGTERM it once the pruner says so
    (never the baseline: it is what the best trial is measured against)."""
    try:
        records = read_metrics(r.folder) if (r.folder / METRICS).is_file() else []
    except (OSError, ValueError, FinetuneError):  # a record half written: read it next time
        return
    for record in records:
        epoch = record.get("epoch")
        if epoch in r.reported or metric not in record or r.pruned_at is not None:
            continue
        r.trial.report(record[metric], epoch)
        r.reported.add(epoch)
        if prune and not r.baseline and epoch < r.epochs and r.trial.should_prune():
            r.pruned_at = epoch
            r.trial.set_user_attr("pruned_at", epoch)  # told PRUNED if the search is killed
            if r.child.poll() is None:
                r.child.send_signal(children.signal.SIGTERM)


def finish(r: Running, code: int, study, optuna, metric: str) -> bool:
    """Tell the study how the trial ended; whether it failed."""
    states = optuna.trial.TrialState
    number = r.trial.number
    run = finished_run(r.folder) if code == 0 else None
    if r.pruned_at is not None and run is None:
        study.tell(r.trial, state=states.PRUNED)
        drop_checkpoints(r.folder)
        print(f"trial {number}: pruned after epoch {r.pruned_at}", flush=True)
        return False
    if run is not None:  # (also one that ended before the pruner's SIGTERM reached it)
        value = final_value(run, metric)
        study.tell(r.trial, value)
        print(f"trial {number}: {metric} {value:.4f} after {len(run.records)} epochs",
              flush=True)
        return False
    study.tell(r.trial, state=states.FAIL)
    tail = (r.folder / "train.log").read_text(errors="replace").splitlines()[-8:]
    print(f"trial {number} failed (exit {code}); {r.folder / 'train.log'} ends with:\n  "
          + "\n  ".join(tail), flush=True)
    return True


def run_trials(spec, study, optuna) -> None:
    """Run trials, one per device slot at a time, until ``n_trials`` have finished (complete
    or pruned) or ``timeout`` has passed; interrupted, the running trials are stopped and
    stay RUNNING in the study, to be taken up by the next run of the command."""
    states = optuna.trial.TrialState
    # Trials a killed search left running: told if they had ended, else taken up first.
    waiting = [t for t in study.get_trials(deepcopy=False, states=(states.RUNNING,))
               if not settled(spec, study, optuna, t)]
    start, failures, running = time.monotonic(), 0, []

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))

    try:
        while True:
            for slot in sorted(set(range(len(spec.devices))) - {r.slot for r in running}):
                more = finished() + len(running) < spec.n_trials and not (
                    spec.timeout and time.monotonic() - start > spec.timeout)
                if waiting:
                    frozen = waiting.pop(0)
                    running.append(launch(spec, optuna.trial.Trial(study, frozen._trial_id),
                                          slot, frozen))
                elif more:
                    running.append(launch(spec, study.ask(), slot))
            if not running:
                return
            time.sleep(POLL_SECONDS)
            for r in list(running):
                report_epochs(r, spec.metric)
                code = r.child.poll()
                if code is None:
                    continue
                running.remove(r)
                report_epochs(r, spec.metric, prune=False)  # the epochs written before it ended
                failures = failures + 1 if finish(r, code, study, optuna, spec.metric) else 0
                if failures >= MAX_FAILURES:
                    raise TrainingError(f"{failures} trials in a row failed (see their "
                                        f"train.log); fix the recipe or the space and run the "
                                        f"same command again.")
    finally:
        for r in running:  # interrupted: they stay RUNNING, taken up next time
            children.stop(r.child)
