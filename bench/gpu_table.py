"""One markdown table of what ``bench/gpu_check.sh`` measured, from the JSON files in its folder.

    python bench/gpu_table.py OUT_DIR

A step that did not finish (its file is missing) is listed as such, not left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | list | None:
    if not path.exists():
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def _recipe_rows(name: str, summary: dict | None) -> list[str]:
    if summary is None:
        return [f"| `{name}` | did not finish | | |"]
    seeds = summary["seeds"]
    accs = ", ".join(f"{s['final_acc']:.4f}" for s in seeds)
    train = ", ".join(f"{s['train_seconds']:.1f}" for s in seeds)
    reached = "; ".join(
        f">= {float(t[len('median_seconds_to_'):]):.1%}: "
        + (f"{v:.1f} s" if v != float("inf") else "never")
        for t, v in summary.items() if t.startswith("median_seconds_to_"))
    return [f"| `{name}` (seeds {', '.join(str(s['seed']) for s in seeds)}) | final test acc "
            f"{accs} (median **{summary['median_final_acc']:.4f}**) | training s {train} "
            f"(median **{summary['median_train_seconds']:.1f}**) | median time to {reached} |"]


def _loop_rows(lines: list | None) -> list[str]:
    if not lines:
        return ["| ResNet-18 training images/s | did not finish | | |"]
    rows = []
    for r in lines:
        variants = [k for k in r if k not in ("model", "image_size", "batch_size", "steps",
                                              "device", "torch", "cpu", "plain_conv", "lecture")
                    and not k.endswith("_precision")]
        cells = ", ".join(f"{v} **{r[v]:,.0f}** ({r[v] / r['lecture']:.1f}x)" for v in variants)
        rows.append(f"| {r['model']} @ {r['image_size']} px, batch {r['batch_size']}: "
                    f"training img/s | lecture loop {r['lecture']:,.0f} | finetune {cells} | "
                    f"{r['device']} |")
    return rows


def _photo_rows(result: dict | None) -> list[str]:
    if result is None:
        return ["| photos | did not finish | | |"]
    rows = []
    for side in ("stream", "device", "reference"):
        if side in result:
            r = result[side]
            rows.append(f"| {result['images']} JPEGs, {result['model']} @ {result['image_size']} "
                        f"px, {result['precision']}, batch {result['batch_size']}: `{side}` | "
                        f"**{r['images_per_s']:,.0f}** training img/s | first step after "
                        f"{r['first_step_s']:.1f} s | peak RSS {r['peak_rss_with_workers_gb']} "
                        f"GB with {result['workers']} workers |")
    return rows


def main() -> None:
    out = Path(sys.argv[1])
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "?"
    print("Machine: " + " / ".join(machine.splitlines()) + "\n")
    print("| what | measured | | |\n| --- | --- | --- | --- |")
    rows = (_recipe_rows("resnet18_fast_fmnist", _load(out / "tta_fast.json"))
            + _loop_rows(_load(out / "loop_speed.jsonl"))
            + _photo_rows(_load(out / "photos.json"))
            + _recipe_rows("resnet18_long_fmnist", _load(out / "tta_long.json")))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
