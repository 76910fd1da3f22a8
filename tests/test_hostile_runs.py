"""Output paths refused before the data loads: names too long for the file system, a file
where the trackers' folder must be. Each a one-line error, exit 2, no traceback."""

import pytest

from finetune.cli import main


def _refused(capsys, args: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "train / " not in err  # refused before the data loaded ("N train / M test images")
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_an_output_name_too_long_for_the_file_system(tiny_args, tmp_path, capsys):
    name = "r" * 253  # fits alone (255), not with a replacing run's ".NAME.new" beside it
    line = _refused(capsys, tiny_args + [f"output_dir={tmp_path / name}"],
                    "is 253 bytes; this file system allows 255", "shorter output_dir=PATH")
    assert not (tmp_path / name).exists()
    assert line.startswith("error: output_dir: the name 'rrrr")


def test_a_file_where_the_trackers_folder_goes(tiny_args, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trackers").write_text("not a folder")
    _refused(capsys, tiny_args + ["train.log_with=[tensorboard]"],
             f"{run / 'trackers'} is a file", "train.log_with=tensorboard", "move the file away")
    assert (run / "trackers").read_text() == "not a folder"
