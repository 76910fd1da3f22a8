"""Issue 28, as a hostile user tries them: reports and comparisons of every kind of run (IDX,
image folder, streamed folder, Hugging Face held and streamed), a comparison of runs on
different data, and `finetune evaluate` beside a training that holds the folder, on a read-only
folder, with output_dir=PATH, and with --tta before the overrides."""

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_fake_fmnist, write_photos
from test_photos import _hf_dataset

from finetune import runs as run_folders
from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.train import main as train_main

KINDS = ("idx", "folder", "folder_stream", "hub", "hub_stream")


def _args(root, out, *extra):
    return ["recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=12", "train.lr=0.01",
            "train.checkpoint=false", "data.workers=0", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished run of each kind (a second or so each on a CPU)."""
    tmp = tmp_path_factory.mktemp("hostile_reports")
    fmnist = write_fake_fmnist(tmp / "fmnist")
    photos = write_photos(tmp / "photos", per_class=12)
    hub = _hf_dataset(tmp / "hf")
    args = {"idx": _args(fmnist, tmp / "idx"),
            "folder": _args(photos, tmp / "folder"),
            "folder_stream": _args(photos, tmp / "folder_stream", "data.placement=stream"),
            "hub": _args(hub, tmp / "hub", "data.source=hf"),
            "hub_stream": _args(hub, tmp / "hub_stream", "data.source=hf",
                                "data.streaming=true", "data.test_split=test")}
    for kind in KINDS:
        train_main(load_config(args[kind]))
    return {kind: tmp / kind for kind in KINDS}


def _one_error(err: str) -> str:
    """The single `error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def _clean(err: str) -> None:
    assert "Traceback" not in err and "error:" not in err, err[-3000:]


CLASSES = {"idx": "Sneaker", "folder": "class3", "folder_stream": "class3", "hub": "k3",
           "hub_stream": "k3"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_report_of_every_kind_of_run(runs, kind, tmp_path, capsys):
    """Was: AttributeError: 'Samples' object has no attribute 'images' (all but IDX)."""
    out = tmp_path / "report"
    assert cli_main(["report", str(runs[kind]), f"output_dir={out}"]) == 0
    _clean(capsys.readouterr().err)
    md = (out / "report.md").read_text()
    assert "No image grid" not in md and "(predictions.png)" in md
    for name in ("predictions.png", "confusion.png", "per_class.png", "report.html"):
        assert (out / name).stat().st_size > 1000
    # The report names the classes it was measured on.
    assert re.search(rf"Classes \(10\): [^\n]*\b{CLASSES[kind]}\b", md), md[:2000]


@pytest.mark.parametrize("a, b", [("idx", "folder"), ("folder_stream", "hub_stream"),
                                  ("hub", "folder")])
def test_a_comparison_of_runs_of_other_kinds(runs, a, b, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(runs[a]), str(runs[b]), f"output_dir={out}"]) == 0
    _clean(capsys.readouterr().err)
    md = (out / "report.md").read_text()
    assert "No image grid" not in md and (out / "predictions.png").is_file()


def _budget(md: str) -> str:
    return next(line for line in md.splitlines() if line.startswith("Budget:"))


def test_a_comparison_on_other_data_claims_only_what_is_shared(runs, tmp_path, capsys):
    """Was: "Budget: ...; `train.epochs=1`, `data.source=auto`, `data.root=<idx's>`, ...":
    a shared data.root the folder run never used."""
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(runs["idx"]), str(runs["folder"]),
                     f"output_dir={out}"]) == 0
    md = (out / "report.md").read_text()
    budget = _budget(md)
    assert "`train.epochs=1`" in budget and "`data.image_size=16`" in budget
    assert "data.root=" not in budget.split("not shared")[0], budget
    assert re.search(r"not shared: [^\n]*`data.root`", budget), budget
    # What differs is listed, with each run's value.
    table = md.split("What differs")[1]
    assert re.search(r"\| data.root \| [^|]*fmnist \| [^|]*photos \|", table), table[:1500]


def test_a_comparison_on_the_same_data_states_the_shared_budget(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(runs["folder"]), str(runs["folder_stream"]),
                     f"output_dir={out}"]) == 0
    budget = _budget((out / "report.md").read_text())
    assert f"`data.root={runs['folder'].parent / 'photos'}`" in budget and "not shared" \
        not in budget, budget


# --- finetune evaluate -----------------------------------------------------------------------

EVALUATION_FILES = ("evaluation.json", "confusion.png", "reliability.png")


def test_evaluate_is_refused_while_a_training_holds_the_folder(runs, capsys):
    """Was: exit 0, its files written into a folder an `overwrite=true` run was replacing."""
    run = runs["idx"]
    for name in EVALUATION_FILES:
        (run / name).unlink(missing_ok=True)
    fd = run_folders._lock(run)  # what a training (run_folder) holds while it runs
    try:
        assert cli_main(["evaluate", str(run)]) == 2
    finally:
        os.close(fd)
    line = _one_error(capsys.readouterr().err)
    assert str(run) in line and f"pid {os.getpid()}" in line and "once it has ended" in line
    assert not any((run / name).exists() for name in EVALUATION_FILES)
    # And a training that would replace the run is refused while an evaluation holds it.
    with run_folders.lock_run(run):
        assert cli_main(["train", *load_args(run), "overwrite=true"]) == 2
    assert "in use" in _one_error(capsys.readouterr().err)
    assert cli_main(["evaluate", str(run)]) == 0  # free again
    assert all((run / name).is_file() for name in EVALUATION_FILES)


def load_args(run: Path) -> list[str]:
    return [f"recipe={run / 'config.yaml'}", f"output_dir={run}"]


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made unwritable (for root too: the immutable flag), or the test skipped."""
    os.chmod(folder, 0o555)
    flagged = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)],
                                                    capture_output=True).returncode == 0
    try:
        try:
            (folder / ".probe").touch()
        except OSError:
            pass
        else:
            (folder / ".probe").unlink()
            pytest.skip("cannot make a folder read-only here")
        yield folder
    finally:
        if flagged:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        os.chmod(folder, 0o755)


def test_evaluate_on_a_read_only_folder_prints_and_writes_where_asked(runs, tmp_path, capsys):
    """Was: metrics computed, never printed; output_dir=PATH accepted and ignored."""
    run = tmp_path / "ro"
    shutil.copytree(runs["idx"], run, ignore=shutil.ignore_patterns(*EVALUATION_FILES))
    elsewhere = tmp_path / "elsewhere"
    with read_only(run):
        assert cli_main(["evaluate", str(run)]) == 2
        out, err = capsys.readouterr()
        assert re.search(r"test accuracy \d\.\d{4} \(\d+/53\)", out), out
        assert "macro F1" in out and "Ankle boot" in out  # the per-class table too
        line = _one_error(err)
        assert str(run) in line and "output_dir=PATH" in line, line
        assert cli_main(["evaluate", str(run), f"output_dir={elsewhere}"]) == 0
        out, err = capsys.readouterr()
        _clean(err)
        assert re.search(r"test accuracy \d\.\d{4} \(\d+/53\)", out), out
        assert f"wrote {elsewhere / 'evaluation.json'}" in out
        assert all((elsewhere / name).is_file() for name in EVALUATION_FILES)
        assert not any((run / name).exists() for name in EVALUATION_FILES)


@pytest.mark.parametrize("order", ["flag_first", "flag_last"])
def test_evaluate_takes_tta_before_or_after_the_overrides(runs, order, capsys):
    """Was: `finetune evaluate RUN --tta key=value`: unrecognized arguments."""
    run, override = str(runs["idx"]), "data.eval_limit=20"
    argv = (["evaluate", run, "--tta", override] if order == "flag_first"
            else ["evaluate", run, override, "--tta"])
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    _clean(err)
    assert re.search(r"test accuracy \d\.\d{4} \(\d+/20\)", out), out
    assert "with TTA" in out
