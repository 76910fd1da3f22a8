"""Output paths refused before the data loads: names too long for the file system, a file
where the trackers' folder must be. Each a one-line error, exit 2, no traceback."""

import logging

import pytest
from conftest import refused


@pytest.fixture(autouse=True)
def _info(caplog):
    caplog.set_level(logging.INFO, logger="finetune")


def _refused(capsys, caplog, args: list[str], *needles: str) -> str:
    capsys.readouterr()
    line = refused(capsys, ["train", *args], *needles)
    assert "train / " not in caplog.text  # before the data loaded ("N train / M test images")
    return line


def test_an_output_name_too_long_for_the_file_system(tiny_args, tmp_path, capsys, caplog):
    name = "r" * 253  # fits alone (255), not with a replacing run's ".NAME.new" beside it
    line = _refused(capsys, caplog, tiny_args + [f"output_dir={tmp_path / name}"],
                    "is 253 bytes; this file system allows 255", "shorter output_dir=PATH")
    assert not (tmp_path / name).exists()
    assert line.startswith("error: output_dir: the name 'rrrr")


def test_a_file_where_the_trackers_folder_goes(tiny_args, tmp_path, capsys, caplog):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trackers").write_text("not a folder")
    _refused(capsys, caplog, tiny_args + ["train.log_with=[tensorboard]"],
             f"{run / 'trackers'} is a file", "train.log_with=tensorboard", "move the file away")
    assert (run / "trackers").read_text() == "not a folder"


@pytest.mark.parametrize("name", ["x" * 300, "y" * 256 + "/run"])
def test_an_output_name_too_long_to_look_up(tiny_args, tmp_path, capsys, caplog, name):
    _refused(capsys, caplog, tiny_args + [f"output_dir={tmp_path / name}"],
             "bytes; this file system allows 255")


@pytest.mark.parametrize("key", ["output_dir", "data.root"])
def test_a_path_that_is_not_utf8(tiny_args, tmp_path, capsys, caplog, key):
    import os

    bad = os.fsdecode(str(tmp_path).encode() + b"/r_\xff")
    args = [a for a in tiny_args if not a.startswith(f"{key}=")] + [f"{key}={bad}"]
    _refused(capsys, caplog, args, "r_\\xff: not valid UTF-8")


@pytest.mark.parametrize("extra", [["train.batch_size=1"],
                                   ["train.batch_size=16", "train.accumulate=16"]])
def test_batch_norm_slices_of_one_image(tiny_args, capsys, caplog, extra):
    line = refused(capsys, ["train", *tiny_args, *extra], "gives batch-norm slices of 1 image",
                   "needs at least 2")
    assert "Raise train.batch_size" in line


@pytest.mark.parametrize("extra, warned", [([], True), (["finetune.freeze=backbone"], False),
                                           (["finetune.bn=freeze"], False)])
def test_few_steps_warn_only_where_batch_norms_train(tiny_args, caplog, extra, warned):
    from finetune.config import load_config
    from finetune.train import main as train_main

    train_main(load_config(tiny_args + ["train.epochs=1", *extra]))
    assert ("running statistics lag the weights" in caplog.text) == warned, caplog.text


def test_ctrl_c_outside_training_names_no_checkpoint(monkeypatch, capsys, tmp_path):
    import finetune.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.evaluation, "evaluate_run", interrupted)
    from finetune.cli import main

    assert main(["evaluate", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted (SIGINT) no file was left half-written."]
