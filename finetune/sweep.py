"""``finetune sweep``: rank pretrained backbones on the user's own data by how well their
frozen features classify it (a linear probe over seeds, weighted kNN), beside what each costs
(feature extraction speed, parameters).

Every model runs in this process, one after the other: its data and weights loaded once, the
features of its training and test splits extracted once into ``<out>/features`` (the cache of
``finetune.features``: a later call, or a linear/kNN training run pointed at it, reuses them),
kNN and one probe per seed fitted on them. Each model's row is written as soon as it is done,
so a sweep that stops is continued by the same command: finished models are kept, the rest
computed. A model whose weights cannot be had, or that fails otherwise, gets a row saying why,
and the sweep goes on; arguments that describe no valid sweep fail before anything runs.

    <out>/models/<name>.json        one model's row (its numbers, or why it has none)
    <out>/features/                 the cached features
    <out>/report.md, report.html    the ranked table and accuracy_vs_cost.png
    <out>/summary.json              the rows, ranked
    <out>/best-<method>/            --train-best METHOD: the winner, trained by finetune train
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from matplotlib.ticker import LogFormatter

from finetune.assemble import check_model, set_up
from finetune.compare import parse_seeds
from finetune.config import PROBES, SCHEMA_KEYS, Config, flat_config, load_config, split_options
from finetune.data import multilabel_data
from finetune.errors import (
    ConfigError,
    FinetuneError,
    OutputError,
    WeightsError,
    did_you_mean,
    first_line,
    one_line,
)
from finetune.export import WEIGHTS, meta_beside, read_meta
from finetune.files import atomic_write_text
from finetune.methods import feature_timings, fit_head, knn_record, split_features
from finetune.models import list_models
from finetune.models.backbones import check_backbone_name, list_backbones, source_of
from finetune.plots import colour, plt, save_figure
from finetune.report import Block, pct, to_html, to_markdown
from finetune.runs import CONFIG
from finetune.speed import joined_processes
from finetune.stats import Estimate, mean_ci
from finetune.train import main as train_main

log = logging.getLogger(__name__)

USAGE = ("usage: finetune sweep models=NAME,timm:PATTERN,RUN_DIR,... [seeds=3] "
         "[output_dir=DIR] [MODEL:key=value ...] [key=value ...] [--train-best METHOD]")
OPTIONS = ("models", "seeds", "output_dir")
MODELS, FEATURES, FIGURE = "models", "features", "accuracy_vs_cost.png"
OK, NO_WEIGHTS, FAILED = "ok", "no weights", "failed"  # a row's status
# Keys the sweep sets itself for every model.
OWN_KEYS = {"model.name": "models=", "model.pretrained": "models= (always pretrained)",
            "finetune.method": "--train-best METHOD (the sweep fits probes and kNN)"}
_RUN_ONLY = ("output_dir", "overwrite", "resume", "description")  # not a row's settings


@dataclass
class Candidate:
    """One model of the sweep."""

    name: str  # as the table shows it and MODEL:key=value names it
    entry: str  # the models= entry it came from (a pattern's overrides apply to all it matches)
    args: list[str]  # its load_config arguments
    missing: str | None = None  # local weights that do not exist: why it cannot run
    settings: dict = field(default_factory=dict)  # its flat config: a kept row must match


@dataclass
class Sweep:
    """What one call measures, and where."""

    candidates: list[Candidate]
    seeds: list[int]
    out: Path
    command: str


# --- the arguments ---------------------------------------------------------------------------

def plan_sweep(args: list[str], train_best: str | None = None, command: str = "") -> Sweep:
    """Parse the arguments and validate every model's config (with ``--train-best``'s method
    too) before anything runs."""
    options, rest = split_options(args, OPTIONS)
    entries = [e.strip() for e in options.get("models", "").split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"models= names no model; {USAGE}")
    seeds = parse_seeds(options["seeds"]) if "seeds" in options else [0, 1, 2]
    common, own = split_overrides(rest)
    found: dict[str, Candidate] = {}
    for entry in entries:
        for c in expand(entry):
            found.setdefault(c.name, c)  # a model named twice (a pattern and by name) runs once
    addressable = set(found) | set(entries)
    unknown = sorted(set(own) - addressable)
    if unknown:
        raise ConfigError(f"overrides for {', '.join(unknown)}, which is not among the swept "
                          f"models ({', '.join(found)}); write MODEL:key=value with MODEL an "
                          f"entry of models= or a model it expands to.")
    probed: set[str] = set()  # data configs found single-label
    for c in found.values():
        c.args = [*common, "model.pretrained=true", "finetune.method=linear", *c.args,
                  *(own.get(c.entry, []) if c.entry != c.name else []), *own.get(c.name, [])]
        cfg = load_config(c.args)
        c.settings = settings(cfg)
        if train_best:
            _check_method(c, train_best)
        _single_label(cfg, probed)
    out = Path(options.get("output_dir") or Path("runs") / "sweeps"
               / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out} is a file; pass a folder for the sweep.")
    return Sweep(list(found.values()), seeds, out, command)


def _single_label(cfg: Config, probed: set[str]) -> None:
    """Refuse tagged data (each model's own data overrides; a data config probed once)."""
    key = repr(cfg.data)
    if key in probed:
        return
    probed.add(key)
    if multilabel_data(cfg.data):
        raise ConfigError("finetune sweep ranks backbones by linear probes and kNN, which read "
                          "one label per image, and this data is multi-label (tags); compare "
                          "backbones trained on it with `finetune compare` instead.")


def split_overrides(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``(key=value for every model, {model: its own key=value})``: ``MODEL:key=value`` is
    split at the last ':' before the key (model names have ':' of their own)."""
    common, own = [], {}
    for arg in args:
        key, _, value = arg.partition("=")
        name, _, sub = key.rpartition(":")
        if sub not in SCHEMA_KEYS:
            raise ConfigError(f"unknown config key '{sub}' in {arg}."
                              f"{did_you_mean(sub, SCHEMA_KEYS)} {USAGE}")
        if sub in OWN_KEYS:
            raise ConfigError(f"{arg}: the sweep sets {sub} itself; use {OWN_KEYS[sub]}.")
        if name:
            own.setdefault(name, []).append(f"{sub}={value}")
        else:
            common.append(arg)
    return common, own


def expand(entry: str) -> list[Candidate]:
    """The models one ``models=`` entry names: a built-in name, a timm:/tv: name or glob, or
    local weights (a finetune run folder or weights file)."""
    if entry in list_models():
        return [Candidate(entry, entry, [f"model.name={entry}"])]
    if source_of(entry) != "own":
        if not any(ch in entry for ch in "*?["):
            try:
                check_backbone_name(entry)
            except ValueError as e:
                raise ConfigError(f"models: {e}") from None
            return [Candidate(entry, entry, [f"model.name={entry}"])]
        return [Candidate(n, entry, [f"model.name={n}"]) for n in matching(entry)]
    path = Path(entry).expanduser()
    if path.exists() or "/" in entry or path.suffix in (".safetensors", ".pth", ".bin", ".pt"):
        return [local_weights(entry)]
    raise ConfigError(f"models: unknown model '{entry}'.{did_you_mean(entry, list_models())} "
                      f"Valid: {', '.join(list_models())}, timm:NAME or tv:NAME (globs too, e.g. "
                      f"'timm:convnext*'; see `finetune models`), or a run folder / weights file.")


def matching(pattern: str) -> list[str]:
    """The models with pretrained weights a timm:/tv: glob matches: one per architecture
    (its default weights), or per pretrained tag when the pattern has a '.'."""
    rows = list_backbones(pattern)
    with_weights = [name for name, weights in rows if weights and weights !=
                    "no pretrained weights"]
    if source_of(pattern) == "timm" and "." not in pattern:
        with_weights = list(dict.fromkeys(n.partition(".")[0] for n in with_weights))
    if not with_weights:
        wider = "timm:convnext*" if source_of(pattern) == "timm" else "tv:resnet*"
        raise ConfigError(f"models: '{pattern}' matches no model with pretrained weights"
                          f"{f' ({len(rows)} without)' if rows else ''}; try a wider pattern, "
                          f"e.g. '{wider}' (list them with `finetune models '{pattern}'`).")
    skipped = len({n.partition(".")[0] for n, _ in rows}) - len(
        {n.partition(".")[0] for n in with_weights})
    if skipped:
        log.info("models: '%s' also matches %d architectures without pretrained weights, left "
                 "out", pattern, skipped)
    return with_weights


def local_weights(entry: str) -> Candidate:
    """A finetune export (run folder, or the model.safetensors in one): its architecture from
    its model.json. Weights that do not exist make a row that says so."""
    path = Path(entry).expanduser()
    if not path.exists():
        return Candidate(entry, entry, [f"model.weights={entry}"],
                         missing=f"weights '{entry}' do not exist; check the path.")
    meta = meta_beside(path)
    if not meta:
        raise ConfigError(f"models: {entry} is no finetune export (no model.json beside the "
                          f"weights), so its architecture is unknown; name the architecture "
                          f"and give it these weights: models=ARCH ARCH:model.weights={entry} "
                          f"(ARCH e.g. resnet18 or timm:convnext_atto).")
    return Candidate(entry, entry, [f"model.name={meta['architecture']}",
                                    f"model.weights={entry}"])


def _check_method(c: Candidate, method: str) -> None:
    """``--train-best``'s method refused now, not after the sweep, where it cannot run (peft
    missing, LoRA targets that match nothing); a model that cannot run at all is left to its
    row."""
    try:
        check_model(load_config([*c.args, f"finetune.method={method}"]))
    except ConfigError:
        try:
            check_model(load_config(c.args))
        except ConfigError:
            return
        raise


def settings(cfg: Config) -> dict:
    """The config's keys that decide a row, as JSON reads them back, and the size and time of
    a local weights file (retrained in place, its row is measured again)."""
    flat = {k: v for k, v in flat_config(cfg).items() if k not in _RUN_ONLY}
    weights = Path(cfg.model.weights or "").expanduser()
    weights = weights / WEIGHTS if weights.is_dir() else weights
    if cfg.model.weights and weights.is_file():
        st = weights.stat()
        flat["weights_file"] = [st.st_size, st.st_mtime_ns]
    return json.loads(json.dumps(flat))


def safe_name(name: str) -> str:
    """A file name for a model: its name's letters and a digest of it (names differing only
    in the characters replaced stay apart)."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-80:] + "-" + digest


# --- measuring the models --------------------------------------------------------------------

def run_sweep(sweep: Sweep) -> list[dict]:
    """Every model's row: kept from an earlier call when it finished with these settings,
    else measured now (and written)."""
    with joined_processes() as state:
        rows = []
        total = len(sweep.candidates)
        for i, c in enumerate(sweep.candidates, start=1):
            path = sweep.out / MODELS / f"{safe_name(c.name)}.json"
            row = kept_row(path, c, sweep.seeds)
            if row is not None:
                print(f"[{i}/{total}] {c.name}: measured earlier, kept ({path})", flush=True)
                rows.append(row)
                continue
            print(f"[{i}/{total}] {c.name}: measuring", flush=True)
            row = measured(c, sweep, state)
            atomic_write_text(path, json.dumps(row, indent=2) + "\n")
            print(f"[{i}/{total}] {c.name}: {row_line(row)}", flush=True)
            rows.append(row)
    return rows


def kept_row(path: Path, c: Candidate, seeds: list[int]) -> dict | None:
    """The row in ``path`` if it finished with the same settings and seeds (a model that
    failed is tried again)."""
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("status") != OK:
        return None
    if row.get("settings") != c.settings or row.get("seeds") != seeds:
        log.info("%s: settings changed since %s was written; measuring again", c.name, path)
        return None
    return row


def measured(c: Candidate, sweep: Sweep, state: PartialState) -> dict:
    """The model's row, or a row saying why it has none."""
    start = time.perf_counter()
    base = {"name": c.name, "args": c.args, "settings": c.settings, "seeds": sweep.seeds}
    try:
        if c.missing:
            raise WeightsError(c.missing)
        row = measure(load_config(c.args), sweep.seeds, sweep.out, state)
    except OutputError:
        raise  # the sweep's own folder cannot be written: nothing after would be kept either
    except Exception as e:  # one model's failure is its row's, not the sweep's
        status = NO_WEIGHTS if isinstance(e, WeightsError) else FAILED
        row = {"status": status, "reason": first_line(e) if isinstance(e, FinetuneError)
               else one_line(e)}
        if not isinstance(e, FinetuneError):  # unexpected: the traceback kept for a bug report
            row["traceback"] = traceback.format_exc()
    finally:
        gc.collect()  # the model, its data and features go before the next model loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {**base, **row, "seconds": round(time.perf_counter() - start, 3)}


def measure(cfg: Config, seeds: list[int], out: Path, state: PartialState) -> dict:
    """One model: features (cached), kNN, a probe per seed (the seed draws the held-out fifth
    that chooses its weight decay), and what they cost."""
    check_model(cfg)  # a model that cannot take the image size fails before the data loads
    # Accelerate fixes the mixed precision with the first Accelerator of a process; each model
    # gets its own (finetune.precision chooses per model). The process group stays.
    AcceleratorState._reset_state()
    parts, accelerator, precision = set_up(cfg, state)
    feats = split_features(cfg, parts, accelerator, precision, out)
    knn = knn_record(cfg, parts, feats)
    probes = [fit_head(replace(cfg, train=replace(cfg.train, seed=s)), parts, feats,
                       accelerator)[1] for s in seeds]
    accs = [p["test_acc"] for p in probes]
    acc = mean_ci(accs)
    timings = feature_timings(feats)
    top5 = [p["test_top5_acc"] for p in probes if "test_top5_acc" in p]
    return {"status": OK, "reason": None, "architecture": cfg.model.name,
            "weights": parts.loaded.source if parts.loaded else None,
            "image_size": cfg.data.image_size, "precision": precision, "data": parts.source,
            "classes": list(parts.train_data.classes), "train_images": len(feats["train"].y),
            "test_images": len(feats["test"].y), "feature_dim": int(feats["train"].x.shape[1]),
            "parameters": sum(p.numel() for p in parts.model.parameters()),
            "probe_acc": acc.mean, "probe_ci": acc.half_width, "probe_accs": accs,
            "probe_top5_acc": sum(top5) / len(top5) if top5 else None,
            "probe": probes[0]["probe"],
            "probe_weight_decays": [p["probe_weight_decay"] for p in probes],
            "probe_fit_seconds": round(sum(p["probe_fit_time"] for p in probes) / len(probes), 4),
            "knn_acc": knn["test_acc"], "knn_top5_acc": knn.get("test_top5_acc"),
            "knn_seconds": knn["knn_time"], "extract_seconds": timings["feature_time"],
            "extract_images_per_sec": timings["feature_images_per_sec"],
            "features_reused": timings["features_reused"]}


# --- the table and the report ----------------------------------------------------------------

def ranked(rows: list[dict]) -> list[dict]:
    """Measured models by probe accuracy, then kNN accuracy; then the others, in order."""
    done = sorted((r for r in rows if r["status"] == OK),
                  key=lambda r: (-r["probe_acc"], -r["knn_acc"]))
    return done + [r for r in rows if r["status"] != OK]


def row_line(row: dict) -> str:
    if row["status"] != OK:
        return f"{row['status']}: {row['reason']}"
    return (f"linear probe {probe_cell(row)} %, kNN {pct(row['knn_acc'])} %, "
            f"{row['seconds']:.1f} s")


def probe_cell(row: dict) -> str:
    return Estimate(row["probe_acc"], row["probe_ci"], len(row["probe_accs"])).format()


def per_1000(row: dict) -> float | None:
    """Feature-extraction seconds per 1000 images (None: the features came from the cache)."""
    speed = row.get("extract_images_per_sec")
    return 1000 / speed if speed else None


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The ranked table: one line per model, those without numbers last."""
    done = [r for r in rows if r["status"] == OK]
    top5 = any(r["knn_top5_acc"] is not None for r in done)
    arch = any(r["architecture"] != r["name"] for r in done)  # local weights, named by path
    header = ["#", "model", *(["architecture"] if arch else []), "status",
              "linear probe acc % (95 % CI)", "kNN top-1 %", *(["kNN top-5 %"] if top5 else []),
              "feature dim", "parameters", "image size", "extraction img/s", "probe fit s"]
    body = []
    for i, r in enumerate(rows, start=1):
        if r["status"] != OK:
            body.append(["–", r["name"], *(["–"] if arch else []), r["status"]]
                        + ["–"] * (len(header) - 3 - arch))
            continue
        speed = r["extract_images_per_sec"]
        body.append([str(i), r["name"], *([r["architecture"]] if arch else []), OK,
                     probe_cell(r), pct(r["knn_acc"]), *([pct(r["knn_top5_acc"])] if top5
                                                          else []),
                     str(r["feature_dim"]), f"{r['parameters']:,d}", str(r["image_size"]),
                     "cached" if speed is None else f"{speed:,.0f}",
                     f"{r['probe_fit_seconds']:.3f}"])
    return header, body


def text_table(rows: list[dict]) -> str:
    """The ranked table, columns aligned for a terminal; a model without numbers gets its
    name and its status with the reason, which runs on past the columns."""
    header, body = table(rows)
    ok = [header] + [line for line, r in zip(body, rows, strict=True) if r["status"] == OK]
    widths = [max(len(line[k]) for line in ok) for k in range(len(header))]
    widths[1] = max(len(line[1]) for line in [header, *body])
    left = (1, header.index("status") - 1, header.index("status"))  # names and the status
    lines = ["  ".join(cell.ljust(w) if k in left else cell.rjust(w)
                       for k, (cell, w) in enumerate(zip(line, widths, strict=True)))
             for line in ok]
    lines += [f"{line[0]:>{widths[0]}}  {line[1]:<{widths[1]}}  {r['status']}: {r['reason']}"
              for line, r in zip(body, rows, strict=True) if r["status"] != OK]
    return "\n".join(lines)


def plot_cost(rows: list[dict], path: Path) -> Path:
    """Probe accuracy (mean ± 95 % CI) against extraction seconds per 1000 images and
    against parameters, one labelled point per model."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    costs = ((per_1000, "feature extraction s per 1000 images"),
             (lambda r: r["parameters"] / 1e6, "parameters, millions (log scale)"))
    for ax, (cost, label) in zip(axes, costs, strict=True):
        for i, r in enumerate(rows):
            x = cost(r)
            if x is None:  # features read from the cache: not timed
                continue
            y, err = 100 * r["probe_acc"], 100 * (r["probe_ci"] or 0)
            ax.errorbar(x, y, yerr=err, fmt="o", color=colour(i), capsize=3)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
        ax.grid(alpha=0.3)
    axes[0].set_xlim(left=0)
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_formatter(LogFormatter())  # 3, 10, 30 rather than 3×10^0
    axes[1].xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                   minor_thresholds=(2, 0.5)))
    axes[0].set_ylabel("linear-probe test accuracy %")
    fig.suptitle("Accuracy against cost (up and to the left is better)")
    return save_figure(fig, path)


def report_blocks(rows: list[dict], sweep: Sweep) -> list[Block]:
    """The report: how it was measured, the ranked table, the failures, the figure."""
    done = [r for r in rows if r["status"] == OK]
    blocks: list[Block] = [("h", 1, f"Backbone sweep: {len(rows)} models"),
                           ("p", "Reproduce with:"), ("code", sweep.command)]
    if done:
        d = done[0]
        probe = d.get("probe", "logistic")  # rows written before there was a choice
        chosen = ("on the validation split (data.val_split), the same for every seed"
                  if d["settings"]["data.val_split"] else "on a held-out fifth drawn by the seed")
        blocks.append(("p", f"Data `{d['data']}`: {d['train_images']:,d} training and "
                       f"{d['test_images']:,d} test images, {len(d['classes'])} classes "
                       f"({', '.join(d['classes'][:20])}). Each backbone frozen, its features "
                       f"extracted once; a linear probe ({PROBES[probe]}, weight decay "
                       f"chosen {chosen}) and weighted kNN "
                       f"(k={d['settings']['finetune.knn_k']}) measured on the test images. "
                       f"Probe accuracy: mean ± 95 % Student-t interval over seeds "
                       f"{', '.join(map(str, sweep.seeds))}. Extraction time: 'cached' where "
                       f"the features were read from the cache."))
    header, body = table(rows)
    blocks += [("h", 2, "Ranking"), ("table", header, body)]
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        blocks += [("h", 2, "Models without numbers"),
                   ("table", ["model", "status", "reason"],
                    [[r["name"], r["status"], r["reason"]] for r in failed])]
    if done:
        plot_cost(done, sweep.out / FIGURE)
        blocks += [("h", 2, "Accuracy against cost"),
                   ("img", FIGURE, "Linear-probe test accuracy (mean ± 95 % CI over seeds) "
                    "against feature-extraction time and parameters, one point per model.")]
    blocks.append(("p", f"Features cached in `{sweep.out / FEATURES}`; each model's numbers in "
                   f"`{sweep.out / MODELS}`."))
    return blocks


def write_report(rows: list[dict], sweep: Sweep) -> Path:
    """report.md, report.html (self-contained) and summary.json of the ranked rows."""
    blocks = report_blocks(rows, sweep)
    atomic_write_text(sweep.out / "report.md", to_markdown(blocks))
    atomic_write_text(sweep.out / "report.html", to_html(blocks, sweep.out, "Backbone sweep"))
    best = rows[0]["name"] if rows and rows[0]["status"] == OK else None
    summary = {"command": sweep.command, "seeds": sweep.seeds, "best": best,
               "models": [{k: v for k, v in r.items() if k not in ("settings", "traceback")}
                          for r in rows]}
    atomic_write_text(sweep.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return sweep.out / "report.md"


# --- the command -----------------------------------------------------------------------------

def train_best(best: dict, method: str, sweep: Sweep) -> Path:
    """Train the winner with ``method`` through ``finetune train``'s entry point into
    ``<out>/best-<method>``: kept when it finished there before with these settings, resumed
    when it stopped, replaced when it holds another model's run."""
    folder = sweep.out / f"best-{method}"
    args = [*best["args"], f"finetune.method={method}", f"output_dir={folder}"]
    if best["settings"].get("finetune.cache_dir") is None:  # the sweep's features, reused
        args.append(f"finetune.cache_dir={sweep.out / FEATURES}")
    cfg = load_config(args)
    check_model(cfg)  # the image size resolved, as the saved config has it
    old = saved_config(folder)
    same = old is not None and run_settings(old) == run_settings(cfg)
    if same and exported(folder):
        print(f"{best['name']} was trained with finetune.method={method} before: kept in "
              f"{folder}")
        return folder
    if old is not None:
        args.append("resume=auto" if same else "overwrite=true")
    print(f"training the best model, {best['name']}, with finetune.method={method} -> {folder}"
          + ("" if old is None else " (resumed)" if same else " (replacing another run)"),
          flush=True)
    AcceleratorState._reset_state()  # its own precision, as in measure()
    train_main(load_config(args))
    print(f"best model {best['name']} trained with finetune.method={method}: {folder}")
    return folder


def exported(folder: Path) -> bool:
    """Whether the run in ``folder`` finished: its model is exported (the last thing a run
    writes)."""
    try:
        read_meta(folder)
    except FinetuneError:
        return False
    return True


def saved_config(folder: Path) -> Config | None:
    """The config of the run started in ``folder``, if any (unreadable: none)."""
    try:
        return load_config([f"recipe={folder / CONFIG}"]) if (folder / CONFIG).is_file() else None
    except FinetuneError:
        return None


def run_settings(cfg: Config) -> dict:
    """What a run is, not how it was started (a saved config is read back as a recipe)."""
    return {k: v for k, v in settings(cfg).items() if k != "recipe"}


def main(args: list[str], train_best_method: str | None = None, command: str = "") -> Path:
    """Plan, measure every model, print the ranked table, write the report; train the best
    with ``train_best_method`` if given. Returns the report's path."""
    sweep = plan_sweep(args, train_best_method, command or "finetune sweep " + " ".join(args))
    print(f"sweep of {len(sweep.candidates)} models ({', '.join(c.name for c in sweep.candidates)}"
          f") -> {sweep.out}", flush=True)
    rows = ranked(run_sweep(sweep))
    print("\n" + text_table(rows) + "\n")
    report = write_report(rows, sweep)
    print(f"wrote {report}, {report.with_suffix('.html')} and {sweep.out / 'summary.json'}")
    if rows[0]["status"] != OK:
        raise FinetuneError(f"no model could be measured (the reasons are in the table and in "
                            f"{report}); fix them and run the same command again.")
    if train_best_method:
        train_best(rows[0], train_best_method, sweep)
    return report
