"""``finetune tune``: the search space parser, the checks made before any trial, and one
search followed through a SIGKILL, a resume, an extension and a pruned trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_fake_fmnist

from finetune.cli import main as cli_main
from finetune.config import flat_config, load_config
from finetune.errors import ConfigError
from finetune.search_space import Dimension, check_space, parse_dimension, split_space

optuna = pytest.importorskip("optuna")
BASE = ["recipe=resnet18_scratch_fmnist"]


@pytest.mark.parametrize("value,expected", [
    ("loguniform(1e-4,1e-1)", Dimension("k", "loguniform", 1e-4, 0.1)),
    (" uniform( 0 , 0.2 ) ", Dimension("k", "uniform", 0.0, 0.2)),
    ("int(2,8)", Dimension("k", "int", 2, 8)),
    ("choice(sgd,'adamw')", Dimension("k", "choice", choices=("sgd", "adamw"))),
    ("choice(1,0.5,true)", Dimension("k", "choice", choices=(1, 0.5, True))),
    ("choice([0.08, 1],[0.35,1.0])", Dimension("k", "choice", choices=("[0.08,1]", "[0.35,1.0]"))),
    ("choice('a,b',c,\"[d\")", Dimension("k", "choice", choices=("a,b", "c", "[d"))),
    ("choice(it's, b)", Dimension("k", "choice", choices=("it's", "b"))),
])
def test_each_form_parses(value, expected):
    assert parse_dimension("k", value) == expected


def test_plain_values_are_overrides_not_dimensions():
    dims, fixed = split_space(["train.lr=0.1", "data.classes=[1,2]", "description=run(a,b)",
                               "train.weight_decay=loguniform(1e-6,1e-3)"])
    assert fixed == ["train.lr=0.1", "data.classes=[1,2]", "description=run(a,b)"]
    assert [d.key for d in dims] == ["train.weight_decay"]


def test_distributions():
    d = optuna.distributions
    assert parse_dimension("k", "loguniform(1e-3,1)").distribution() == d.FloatDistribution(
        1e-3, 1, log=True)
    assert parse_dimension("k", "uniform(0,1)").distribution() == d.FloatDistribution(0, 1)
    assert parse_dimension("k", "int(1,4)").distribution() == d.IntDistribution(1, 4)
    assert parse_dimension("k", "choice(a,b)").distribution() == d.CategoricalDistribution(
        ("a", "b"))


@pytest.mark.parametrize("value,needle", [
    ("uniform(0.2,0.1)", "low bound must be below the high"),
    ("uniform(1,1)", "low bound must be below the high"),
    ("loguniform(0,1)", "log range needs bounds > 0"),
    ("loguniform(-1,1)", "log range needs bounds > 0"),
    ("int(1.5,4)", "'1.5' is not an integer"),
    ("uniform(a,1)", "'a' is not a number"),
    ("uniform(0,inf)", "must be finite"),
    ("uniform(0,1,2)", "takes two bounds, got 3"),
    ("choice(a)", "at least two values"),
    ("choice(a,b,'a')", "lists a twice"),
    ("log_uniform(1e-4,1)", "unknown search form 'log_uniform'"),
    ("loguniforn(1e-4,1)", "unknown search form"),
])
def test_bad_forms_are_one_line_errors(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        parse_dimension("train.lr", value)


@pytest.mark.parametrize("arg,needle", [
    ("train.lrr=loguniform(1e-3,1)", "unknown config key 'train.lrr' in the search space"),
    ("data.val_split=uniform(0.1,0.3)", "data.val_split cannot be searched"),
    ("data.split_seed=int(0,5)", "data.split_seed cannot be searched"),
    ("train.label_smoothing=uniform(0,1.5)", "1.5 does not make a valid config"),
    ("model.name=choice(resnet18,nosuchnet)", "nosuchnet does not make a valid config"),
])
def test_space_is_checked_against_the_config(arg, needle):
    dims, fixed = split_space([arg])
    with pytest.raises(ConfigError, match=needle):
        check_space(dims, [*BASE, *fixed])
    with pytest.raises(ConfigError, match="nothing to search"):
        check_space([], BASE)
    with pytest.raises(ConfigError, match="searched twice"):
        split_space(["train.lr=uniform(0,1)", "train.lr=uniform(0,2)"])
    with pytest.raises(ConfigError, match="train.lr is given a value and a range"):
        split_space(["train.lr=0.1", "train.lr=uniform(0,2)"])


def _tune_args(tmp_path, *extra):
    return ["tune", *BASE, "data.val_split=0.2", "train.lr=loguniform(0.001,0.1)",
            f"output_dir={tmp_path / 'tune'}", *extra]


@pytest.mark.parametrize("extra,needle", [
    (["data.val_split=0"], "set data.val_split"),
    (["metric=test_acc"], "metric=test_acc: the search reads a validation metric"),
    (["pruner=asha"], "pruner=asha; valid: median, hyperband, none"),
    (["n_trials=0"], "n_trials=0: expected an integer >= 1"),
    (["timeout=nan"], "timeout=nan: expected seconds > 0"),
    (["timeout=-5"], "timeout=-5"),
    (["parallel=0"], "parallel=0"),
    (["launcher=\"python"], "launcher="),
])
def test_bad_arguments_stop_before_any_trial(tmp_path, capsys, extra, needle):
    assert cli_main(_tune_args(tmp_path, *extra)) != 0
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "tune").exists()


def test_optuna_missing_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert cli_main(_tune_args(tmp_path)) != 0
    assert "pip install 'finetune[tune]'" in capsys.readouterr().err


def test_study_folder_refusals(tmp_path, capsys):
    from finetune.tune import open_study, plan_tune

    spec = plan_tune(_tune_args(tmp_path)[1:])
    open_study(spec, optuna)  # a new study, with the baseline queued
    args = _tune_args(tmp_path / "order", "train.epochs=2", "data.image_size=16")[1:]
    open_study(plan_tune(args), optuna)
    open_study(plan_tune(args[::-1]), optuna)  # the same search, its arguments in another order
    other = plan_tune(_tune_args(tmp_path, "train.weight_decay=uniform(0,0.001)")[1:])
    with pytest.raises(ConfigError, match="holds a search over another space"):
        open_study(other, optuna)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "study.db").write_bytes(b"not a database" * 100)
    spec.out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="cannot be read as an Optuna study"):
        open_study(spec, optuna)
    (tmp_path / "file").write_text("x")
    assert cli_main([*_tune_args(tmp_path)[:-1], f"output_dir={tmp_path / 'file'}"]) != 0
    assert "is a file, not a folder" in capsys.readouterr().err


def _records(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_search_killed_resumed_extended_and_pruned(tmp_path, capsys, monkeypatch):
    """One search: SIGKILL in trial 1, the same command finishes trial 1 from where it was;
    n_trials=3 adds one new trial without repeating any, which a pruner stops early; best.yaml
    is the best trial's config."""
    data = write_fake_fmnist(tmp_path / "fmnist", n_train=60)
    out = tmp_path / "tune"
    args = [*_tune_args(tmp_path)[:-1], f"data.root={data}", "data.image_size=16",
            "train.epochs=8", "train.batch_size=16", "train.keep_checkpoints=1",
            f"output_dir={out}"]
    child = subprocess.Popen([sys.executable, "-m", "finetune", *args, "n_trials=2"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ((out / "trial0001" / "metrics.jsonl").is_file()
               and _records(out / "trial0001")) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)  # the search dies mid-trial 1
    child.wait()
    assert len(_records(out / "trial0001")) < 8
    baseline = (out / "trial0000" / "metrics.jsonl").read_text()

    assert cli_main([*args, "n_trials=2"]) == 0
    printed = capsys.readouterr().out
    assert "trial 1 resumed" in printed and "trial 0 " not in printed  # trial 0 is not rerun
    assert _records(out / "trial0001") == list(range(1, 9))  # each epoch once
    study = optuna.load_study(study_name="finetune", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    # Extended to 3 trials, under a pruner that stops any trial but the baseline at once.
    monkeypatch.setattr("finetune.tune.make_pruner",
                        lambda spec, optuna: optuna.pruners.ThresholdPruner(lower=2.0))
    monkeypatch.setattr("finetune.trials.POLL_SECONDS", 0.1)
    assert cli_main([*args, "n_trials=3"]) == 0
    printed = capsys.readouterr().out
    assert "trial 2: pruned after epoch" in printed and "trial 1" not in printed.split("\n")[0]
    study = optuna.load_study(study_name="finetune", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert len(_records(out / "trial0002")) < 8  # pruning stopped its training
    assert not (out / "trial0002" / "checkpoints").exists()  # never resumed: not kept
    assert (out / "trial0001" / "checkpoints").is_dir()
    lrs = [t.params["train.lr"] for t in study.trials]
    assert lrs[0] == 0.1 and len(set(lrs)) == 3  # the recipe's own rate, then new points
    assert (out / "trial0000" / "metrics.jsonl").read_text() == baseline

    best = study.best_trial.number
    result = json.loads((out / "tune.json").read_text())
    assert result["best"]["number"] == best and result["pruning"]["pruned"] == 1
    mine = flat_config(load_config([f"recipe={out / 'best.yaml'}"]))
    trial = flat_config(load_config([f"recipe={out / f'trial{best:04d}' / 'config.yaml'}"]))
    differ = {k for k in mine if mine[k] != trial[k]}  # where and how it ran, nothing else
    assert "description" in differ and differ <= {"output_dir", "description", "resume"}, differ
    assert mine["output_dir"] is None and mine["resume"] is None
    assert {"history.png", "importances.png"} <= {p.name for p in out.iterdir()}


def test_pruners_step_by_epoch(tmp_path):
    from finetune.tune import make_pruner, plan_tune

    spec = plan_tune(_tune_args(tmp_path)[1:])
    median = make_pruner(spec, optuna)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert median._n_startup_trials == 5  # Optuna's defaults: 5 complete trials first
    spec = plan_tune([*_tune_args(tmp_path)[1:], "pruner=hyperband",
                      "train.epochs=int(2,12)"])
    assert make_pruner(spec, optuna)._max_resource == 12  # the most epochs a trial may run
    assert isinstance(make_pruner(plan_tune([*_tune_args(tmp_path)[1:], "pruner=none"]),
                                  optuna), optuna.pruners.NopPruner)


def test_the_saving_of_pruning_is_an_upper_bound_under_early_stopping():
    from finetune.tune_report import pruning_saving

    rows = [{"state": "COMPLETE", "epochs": 8, "planned_epochs": 8, "epoch_seconds": 80.0},
            {"state": "PRUNED", "epochs": 2, "planned_epochs": 8, "epoch_seconds": 20.0}]
    s = pruning_saving(rows)
    assert s["epoch_seconds_saved"] == 60.0 and s["saved_fraction"] == 0.375
    assert not s["upper_bound"]
    rows[1]["early_stopping"] = True
    assert pruning_saving(rows)["upper_bound"]


def test_a_choice_of_lists_makes_configs_and_holds_the_recipes_own_point(tmp_path):
    from finetune.tune import plan_tune

    spec = plan_tune(["recipe=resnet18_scratch_fmnist", "data.val_split=0.2",
                      "data.scale=choice([0.08,1],[0.35,1.0])", f"output_dir={tmp_path}"])
    assert spec.baseline == {"data.scale": "[0.08,1]"}  # the recipe's default, a point
    args = spec.trial_args({"data.scale": "[0.35,1.0]"}, tmp_path / "t")
    assert load_config(args).data.scale == [0.35, 1.0]
