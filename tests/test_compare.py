"""finetune compare / report: statistics against hand-computed values, the report's tables and
figures from synthetic runs, planning and its refusals, and one real comparison end to end."""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.cli import main as cli_main
from finetune.compare import (
    check_budget,
    count_parameters,
    default_targets,
    label_runs,
    plan_comparison,
    summarize,
)
from finetune.config import ConfigError, load_config, to_yaml
from finetune.export import save_model
from finetune.models import create_model
from finetune.report import build_report
from finetune.runs import find_runs, read_run
from finetune.stats import mean_ci, paired_difference, t_quantile

# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("df, t", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                   (9, 2.2622), (30, 2.0423), (120, 1.9799)])
def test_t_quantile_matches_tables(df, t):
    assert t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)


def test_t_quantile_other_confidence():
    assert t_quantile(0.99, 2) == pytest.approx(9.9248, abs=1e-4)
    assert t_quantile(0.90, 5) == pytest.approx(2.0150, abs=1e-4)


def test_mean_ci_by_hand():
    # mean 0.82, sample sd 0.02, half width t(0.975, 2) * 0.02 / sqrt(3)
    e = mean_ci([0.80, 0.82, 0.84])
    assert e.mean == pytest.approx(0.82)
    assert e.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert e.format() == "82.00 ± 4.97"
    single = mean_ci([0.5])
    assert single.half_width is None and single.format() == "50.00"


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 0.80, 1: 0.82, 2: 0.84, 7: 0.10}
    b = {0: 0.85, 1: 0.86, 2: 0.90}
    d = paired_difference(a, b)  # differences 0.05, 0.04, 0.06: mean 0.05, sd 0.01
    assert d.n == 3 and d.mean == pytest.approx(0.05)
    assert d.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    # Unpaired, the same numbers' intervals overlap; paired, the difference excludes 0.
    assert d.mean - d.half_width > 0
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


# --- synthetic runs --------------------------------------------------------------------------

FINAL = {"A": [0.80, 0.82, 0.84], "B": [0.85, 0.86, 0.90]}


def write_run(folder: Path, args: list[str], accs: list[float], fmnist_dir: Path,
              images: int = 96, with_weights: bool = False) -> Path:
    """A finished run folder with the given per-epoch test accuracies (1 s per epoch, 4 steps
    of 24 images per epoch, 10 classes), as `finetune train` writes it."""
    cfg = load_config([*args, f"data.root={fmnist_dir}", "data.image_size=16",
                       f"train.epochs={len(accs)}", "train.batch_size=24",
                       f"output_dir={folder}"])
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    records = []
    for epoch, acc in enumerate(accs, start=1):
        correct = round(acc * 100)
        confusion = [[0] * 10 for _ in range(10)]
        for i in range(100):  # 100 test samples, 10 per class; `correct` of them right
            confusion[i % 10][i % 10 if i < correct else (i + 1) % 10] += 1
        records.append({"epoch": epoch, "train_loss": 2.0 / epoch, "train_acc": acc - 0.01,
                        "batch_loss": [2.0 / epoch] * 4, "test_acc": acc, "test_loss": 1.0,
                        "test_correct": correct, "test_total": 100, "confusion": confusion,
                        "mixed_precision": "fp32", "epoch_time": 1.0,
                        "train_images_per_sec": 96.0 if epoch > 1 else 48.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"architecture": "resnet18", "num_classes": 10, "in_chans": 1, "image_size": 16,
            "norm": "torch", "mean": [0.2], "std": [0.3], "class_names":
            [f"class{k}" for k in range(10)], "recipe": cfg.recipe, "train_images": images}
    if with_weights:
        torch.manual_seed(0)
        save_model(create_model("resnet18", num_classes=10, in_chans=1, image_size=16),
                   meta, folder)
    else:
        (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def two_recipes(tmp_path, fmnist_dir):
    """Recipes A (scratch) and B (same, other lr), 3 seeds each, final accuracies FINAL."""
    runs = []
    for label, lr in (("A", 0.1), ("B", 0.05)):
        for seed, final in enumerate(FINAL[label]):
            accs = [final - 0.10, final - 0.03, final]
            runs.append(write_run(tmp_path / "runs" / label / f"seed{seed}",
                                  ["recipe=resnet18_cpu_fmnist", f"train.lr={lr}",
                                   f"train.seed={seed}"], accs, fmnist_dir,
                                  with_weights=(label, seed) == ("B", 2)))
    return runs


def test_summary_numbers_by_hand(two_recipes):
    runs = [read_run(p) for p in two_recipes]
    labels = label_runs(runs)
    assert labels == ["resnet18_cpu_fmnist (train.lr=0.1)", "resnet18_cpu_fmnist (train.lr=0.05)"]
    s = summarize(runs, targets=[0.75, 0.85])
    a, b = s.by_size[96]
    assert a.final.mean == pytest.approx(0.82)
    assert a.final.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert b.final.mean == pytest.approx(0.87)
    assert b.final_diff.mean == pytest.approx(0.05) and a.final_diff is None
    assert b.final_diff.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert b.best_diff.mean == pytest.approx(0.05)  # the last epoch is the best here
    # A reaches 0.75 at epoch 2 for seeds 0 (0.77), 1 (0.79), 2 (0.81): 2 epochs, 2 s.
    assert a.reach[0.75] == (3, 2.0, 2.0)
    # A reaches 0.85 never; B: seed 0 at epoch 3 (0.85), seed 1 (0.83 < .85) at 3, seed 2 at 2.
    assert a.reach[0.85] == (0, None, None)
    assert b.reach[0.85] == (3, pytest.approx(8 / 3), pytest.approx(8 / 3))
    # 48 + 96 + 96 images per second-long epoch: 240 images in 3 s.
    assert a.images_per_sec == pytest.approx(80.0) and a.train_seconds == 3.0
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=16)
    assert a.params == sum(p.numel() for p in model.parameters()) == 11_175_370
    assert default_targets(runs) == [0.77, 0.82]


def test_report_tables_and_figures(two_recipes, tmp_path):
    report = build_report(find_runs([tmp_path / "runs"]), tmp_path / "report",
                          targets=[0.75, 0.85], command="finetune compare ...")
    md = report.read_text()
    # A's row: 82.00 ± 4.97; B's: 87.00 ± 6.57 and the paired difference 5.00 ± 2.48.
    assert "| 82.00 ± 4.97 |" in md
    b_half = 100 * 4.302653 * math.sqrt(((0.85 - .87) ** 2 + (.86 - .87) ** 2 + (.9 - .87) ** 2)
                                        / 2) / math.sqrt(3)
    assert f"| 87.00 ± {b_half:.2f} | " in md
    assert "| 5.00 ± 2.48 |" in md
    assert "| 3/3 |" in md and "| 0/3 |" in md
    figures = re.findall(r"\]\((\w+\.png)\)", md)
    assert set(figures) == {"loss.png", "accuracy.png", "accuracy_vs_time.png",
                            "per_class.png", "confusion.png", "predictions.png"}
    for name in figures:
        with Image.open(tmp_path / "report" / name) as im:
            im.verify()  # a complete, readable PNG
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
            # Not a blank canvas: the figure has drawn content in several shades.
            assert len(im.convert("L").getcolors(maxcolors=1 << 16) or range(999)) > 20
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(figures)
    assert not re.search(r"src=['\"](?!data:)", html)  # self-contained: nothing fetched
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["by_size"]["96"][1]["final_diff"]["mean"] == pytest.approx(0.05)
    best = max(find_runs([tmp_path / "runs"]), key=lambda r: r.final_acc).path
    assert f"`finetune inspect {best}` writes it to {best / 'inspect' / 'report.html'}" in md
    (best / "inspect").mkdir()  # once inspected, the report links its page
    (best / "inspect" / "report.html").write_text("<html></html>")
    build_report(find_runs([tmp_path / "runs"]), tmp_path / "report")
    link = os.path.relpath(best / "inspect" / "report.html", tmp_path / "report")
    assert f"<a href='{link}'>" in (tmp_path / "report" / "report.html").read_text()


def test_sweep_report_has_a_data_efficiency_curve(tmp_path, fmnist_dir):
    for size, acc in ((24, 0.5), (96, 0.8)):
        for seed in (0, 1):
            write_run(tmp_path / f"n{size}" / f"seed{seed}",
                      ["recipe=resnet18_cpu_fmnist", f"train.seed={seed}"],
                      [acc + 0.01 * seed], fmnist_dir, images=size, with_weights=True)
    runs = find_runs([tmp_path])
    s = summarize(runs)
    assert s.sizes == [24, 96]
    assert s.by_size[24][0].final.mean == pytest.approx(0.505)
    report = build_report(runs, tmp_path / "report")
    md = report.read_text()
    assert "## Accuracy on 24 training images" in md and "## Accuracy on 96 training images" in md
    with Image.open(tmp_path / "report" / "data_efficiency.png") as im:
        im.verify()


def test_unfinished_run_is_refused_with_the_fix(tmp_path, fmnist_dir):
    run = write_run(tmp_path / "run", ["recipe=resnet18_cpu_fmnist"], [0.5, 0.6], fmnist_dir)
    cfg = (run / "config.yaml").read_text().replace("epochs: 2", "epochs: 5")
    (run / "config.yaml").write_text(cfg)
    with pytest.raises(ConfigError, match=r"not finished \(2 of 5 epochs.*resume=auto"):
        read_run(run)


def test_single_run_report_cli(tmp_path, fmnist_dir, capsys):
    run = write_run(tmp_path / "run", ["recipe=resnet18_cpu_fmnist"], [0.5, 0.7], fmnist_dir,
                    with_weights=True)
    assert cli_main(["report", str(run)]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "# Run report: resnet18_cpu_fmnist" in md and "Δ" not in md
    assert "| 70.00 | 70.00 |" in md
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_parameter_count_from_metadata():
    meta = {"architecture": "resnet18", "num_classes": 5, "in_chans": 1, "image_size": 28}
    model = create_model("resnet18", num_classes=5, in_chans=1, image_size=28)
    assert count_parameters(meta) == sum(p.numel() for p in model.parameters())


# --- planning --------------------------------------------------------------------------------


def test_plan_expands_sizes_seeds_and_per_recipe_overrides(tmp_path, fmnist_dir):
    plan = plan_comparison(["recipe=resnet18_cpu_fmnist,resnet18_pretrained_cpu_fmnist",
                            "seeds=2", "data.train_limit=50,90", f"data.root={fmnist_dir}",
                            "resnet18_pretrained_cpu_fmnist:model.weights=/w.safetensors",
                            f"output_dir={tmp_path}"])
    assert plan.sizes == [50, 90] and plan.seeds == [0, 1] and len(plan.runs) == 8
    recipe, seed, size, folder, args = plan.runs[-1]
    assert (recipe, seed, size) == ("resnet18_pretrained_cpu_fmnist", 1, 90)
    assert folder == tmp_path / "n90" / "resnet18_pretrained_cpu_fmnist" / "seed1"
    assert "model.weights=/w.safetensors" in args and "train.seed=1" in args
    assert not any("model.weights" in a for a in plan.runs[0][4])
    assert plan_comparison(["recipe=resnet18_cpu_fmnist", "seeds=0,4"]).seeds == [0, 4]


@pytest.mark.parametrize("args, message", [
    (["recipe=resnet18_cpu_fmnist,resnet18_scratch_fmnist"], r"same budget \(train\.epochs"),
    (["recipe=resnet18_cpu_fmnist", "other:train.lr=1"], "not among the compared recipes"),
    (["recipe=resnet18_cpu_fmnist", "train.seed=3"], "seeds=N"),
    (["recipe=resnet18_cpu_fmnist", "seeds=0"], "at least one seed"),
    (["recipe=resnet18_cpu_fmnist", "seeds=1,1"], "distinct"),
    (["recipe=resnet18_cpu_fmnist,resnet18_cpu_fmnist"], "twice"),
    (["recipe=resnet18_cpu_fmnist", "targets=high"], "comma-separated numbers"),
    (["recipe=resnet18_cpu_fmnist", "train.epoch=3"], "Did you mean 'train.epochs'"),
    (["recipe=resnet18_cpu_fmnist", "data.train_limit=100,1e3"], "comma-separated image counts"),
    (["recipe=resnet18_cpu_fmnist", "data.train_limit=100,0"], "'data.train_limit' must be a"),
])
def test_plan_refusals(args, message):
    with pytest.raises(ConfigError, match=message):
        plan_comparison(args)


def test_budget_check_warns_when_seeds_cannot_pair(caplog):
    a = load_config(["recipe=resnet18_cpu_fmnist"])
    b = load_config(["recipe=resnet18_cpu_fmnist", "train.batch_size=128"])
    check_budget({"a": a, "b": b})
    assert "train.batch_size: a=256, b=128" in caplog.text


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, fmnist_dir, capsys):
    """Two recipes x two seeds as real `finetune train` processes, then the report; running
    the command again keeps the finished runs."""
    args = ["compare", "recipe=resnet18_cpu_fmnist,resnet18_scratch_fmnist", "seeds=2",
            f"data.root={fmnist_dir}", "data.image_size=16", "train.epochs=2",
            "train.batch_size=16", "train.mixed_precision=fp32", "train.checkpoint=false",
            "data.hflip=false",  # the recipes differ there; the paired batches below must not
            "resnet18_scratch_fmnist:train.lr=0.05", f"output_dir={tmp_path / 'cmp'}"]
    assert cli_main(args) == 0, capsys.readouterr()
    runs = find_runs([tmp_path / "cmp"])
    assert len(runs) == 4 and {r.seed for r in runs} == {0, 1}
    for r in runs:
        assert r.train_images == 96 and len(r.records) == 2
    # Paired seeds: both recipes build the same ResNet-18 from seed k and draw the same first
    # batch (and flips), so the loss of that batch (before any update) is the same for both;
    # another seed draws another batch.
    first = {(r.config.recipe, r.seed): r.records[0]["batch_loss"][0] for r in runs}
    assert first["resnet18_cpu_fmnist", 0] == first["resnet18_scratch_fmnist", 0]
    assert first["resnet18_cpu_fmnist", 1] == first["resnet18_scratch_fmnist", 1]
    assert first["resnet18_cpu_fmnist", 0] != first["resnet18_cpu_fmnist", 1]
    md = (tmp_path / "cmp" / "report" / "report.md").read_text()
    assert "# Comparison: resnet18_cpu_fmnist vs resnet18_scratch_fmnist" in md
    assert "| train.lr | 0.1 | 0.05 |" in md
    capsys.readouterr()
    assert cli_main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, kept") == 4


def test_collected_runs_with_other_budgets_are_flagged(tmp_path, fmnist_dir):
    write_run(tmp_path / "a", ["recipe=resnet18_cpu_fmnist"], [0.5, 0.6], fmnist_dir,
              with_weights=True)
    write_run(tmp_path / "b", ["recipe=resnet18_scratch_fmnist"], [0.5, 0.6, 0.7], fmnist_dir)
    md = build_report(find_runs([tmp_path / "a", tmp_path / "b"]), tmp_path / "r").read_text()
    assert ("did not get the same budget** — train.epochs: resnet18_cpu_fmnist=2, "
            "resnet18_scratch_fmnist=3") in md
    assert "No image grid: the best run's model" in md  # b, the best, exported no weights


def test_failed_run_stops_the_comparison_with_its_log(tmp_path, capsys):
    code = cli_main(["compare", "recipe=resnet18_cpu_fmnist", "seeds=1",
                     f"data.root={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'cmp'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet18_cpu_fmnist seed 0 failed (exit 2)" in err
    assert "is not a folder" in err and "finished runs are kept" in err


def test_labels_name_only_what_sets_a_group_apart(tmp_path, fmnist_dir):
    settings = {"plain": [], "fast": ["train.lr=0.5"], "mirrored": ["data.hflip=true"]}
    for name, extra in settings.items():
        write_run(tmp_path / name, ["recipe=resnet18_cpu_fmnist", *extra], [0.5], fmnist_dir)
    runs = [read_run(tmp_path / name) for name in settings]
    assert label_runs(runs) == ["resnet18_cpu_fmnist", "resnet18_cpu_fmnist (train.lr=0.5)",
                                "resnet18_cpu_fmnist (data.hflip=True)"]
