"""``finetune predict --out`` beyond one process and beyond files: two real CPU processes under
torchrun (and a resume by them), and a Hugging Face split."""

import io
import json
from pathlib import Path

import pytest
from conftest import launch_two_cpu_processes, refused
from PIL import Image

import finetune
from finetune.cli import main as cli_main


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_predictions(a: list[dict], b: list[dict]) -> None:
    """Same images in the same order, same classes, probabilities equal to 1e-5 (a batch's
    composition may move a float's last bits)."""
    assert [r["file"] for r in a] == [r["file"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["error"] == y["error"]
        if x["top_k"] is None or y["top_k"] is None:
            assert x["top_k"] == y["top_k"]
            continue
        assert [t["class"] for t in x["top_k"]] == [t["class"] for t in y["top_k"]], x["file"]
        assert [t["probability"] for t in x["top_k"]] == pytest.approx(
            [t["probability"] for t in y["top_k"]], abs=1e-5)


@pytest.mark.slow
def test_two_processes_write_the_file_one_process_writes(trained, tmp_path):
    run, test = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(test.images[:27, 0].numpy()):  # 7 batches of 4: uneven rounds
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    (folder / "011.png").write_bytes(b"not a png")
    args = [str(run), str(folder), "--batch-size", "4", "--workers", "0", "--top-k", "2"]
    one = tmp_path / "one.jsonl"
    assert cli_main(["predict", *args, "--out", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    out = launch_two_cpu_processes("-m", "finetune", "predict", *args, "--out", str(two))
    assert out.count(f"wrote {two}: 27 images; 1 could not be read") == 1  # process 0 alone
    _same_predictions(_rows(two), _rows(one))
    assert _rows(two)[11]["error"] and _rows(two)[11]["top_k"] is None
    # a job killed after 10 rows (and inside the 11th), resumed by two processes
    cut = tmp_path / "cut.jsonl"
    lines = one.read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:10]) + lines[10][:15])
    (tmp_path / "cut.jsonl.settings.json").write_text(
        (tmp_path / "one.jsonl.settings.json").read_text())
    out = launch_two_cpu_processes("-m", "finetune", "predict", *args, "--out", str(cut),
                                   "--resume")
    assert "(10 from before, --resume)" in out
    _same_predictions(_rows(cut), _rows(one))


def _hub_dataset(test, root: Path, n: int) -> Path:
    """A save_to_disk dataset: PNG images in an Image column, no labels, one bad row."""
    import datasets

    cells = []
    for i, image in enumerate(test.images[:n, 0].numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).resize((40, 40)).save(buffer, format="PNG")
        cells.append({"bytes": b"not an image" if i == 3 else buffer.getvalue(), "path": None})
    features = datasets.Features({"id": datasets.Value("int32"), "picture": datasets.Image()})
    split = datasets.Dataset.from_dict({"id": list(range(n)), "picture": cells},
                                       features=features)
    datasets.DatasetDict({"test": split}).save_to_disk(str(root))
    return root


def test_a_hugging_face_split_is_predicted_row_by_row(trained, tmp_path, capsys):
    run, test = trained
    root = _hub_dataset(test, tmp_path / "hf", 9)
    out = tmp_path / "p.jsonl"
    assert cli_main(["predict", str(run), str(root), "--split", "test", "--out", str(out),
                     "--batch-size", "4", "--workers", "1", "--top-k", "3"]) == 0
    assert "9 images; 1 could not be read" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["file"] for r in rows] == [f"test[{i}]" for i in range(9)]
    assert "test[3]: cannot decode image" in rows[3]["error"] and rows[3]["top_k"] is None
    images = [Image.fromarray(im).resize((40, 40)) for im in test.images[:9, 0].numpy()]
    expected = finetune.predict(run, images, top_k=3)
    for i, r in enumerate(rows):
        if i != 3:
            assert [(t["class"], t["probability"]) for t in r["top_k"]] == [
                (c, pytest.approx(p, abs=1e-5)) for c, p in expected[i]]
    # the table, of a slice
    assert cli_main(["predict", str(run), str(root), "--split", "test[:2]", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in table] == ["test[:2][0]", "test[:2][1]"]
    assert table[1]["top_k"][0]["class"] == expected[1][0][0]


@pytest.mark.parametrize("argv,needle", [
    (["--split", "validation"], "split 'validation' is not one of ['test']"),
    (["--image-column", "picture"], "--image-column goes with --split"),
    (["--split", "test[5:2]"], "split 'test[5:2]' selects no rows ('test' has 4)"),
    (["--split", "test", "--image-column", "id"], "column 'id' is Value, not an Image feature"),
])
def test_bad_hugging_face_inputs_are_one_line(trained, tmp_path, capsys, argv, needle):
    run, test = trained
    root = _hub_dataset(test, tmp_path / "hf", 4)
    refused(capsys, ["predict", str(run), str(root), *argv, "--out", str(tmp_path / "p.csv")],
            needle)
    assert not (tmp_path / "p.csv").exists()


def test_a_folder_of_images_is_not_a_split(trained, tmp_path, capsys):
    run, test = trained
    (tmp_path / "images").mkdir()
    Image.fromarray(test.images[0, 0].numpy()).save(tmp_path / "images" / "a.png")
    refused(capsys, ["predict", str(run), str(tmp_path / "images"), "--split", "test"],
            "is not a Hugging Face dataset", "drop --split")
