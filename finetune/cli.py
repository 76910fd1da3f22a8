"""The ``finetune`` command (also ``python -m finetune``): train, evaluate, compare, and
inspect recipes and models. ``finetune COMMAND --help`` lists each command's arguments and the
config keys it takes."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.config import (
    METHODS,
    SCHEMA_KEYS,
    UNTRAINED,
    describe_keys,
    list_recipes,
    load_config,
    split_options,
)
from finetune.errors import ConfigError, FinetuneError
from finetune.files import output_error
from finetune.stopping import Interrupted, Terminated, terminate_as_interrupt

OVERRIDES = "key=value"  # how config overrides appear in usage lines


class _Stderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a line is logged (a notebook or a test
    may have replaced it since the handler was made)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def _setup_logging() -> None:
    """finetune's own messages at INFO (dependencies stay at their defaults); only the main
    process talks, the others would repeat every line."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    log = logging.getLogger("finetune")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Except one line from every process: its rank, the world size, backend and device.
    logging.getLogger("finetune.process").setLevel(logging.INFO)


# --- the commands ----------------------------------------------------------------------------

def _train(ns: argparse.Namespace) -> None:
    from finetune.train import main as train_main

    cfg = load_config(ns.args)
    ns.untrained = cfg.finetune.method in UNTRAINED  # an interruption keeps no checkpoint
    train_main(cfg)


def _evaluate(ns: argparse.Namespace) -> None:
    from finetune.evaluation import evaluate_run

    if "=" in ns.run_dir:
        raise ConfigError("usage: finetune evaluate RUN_DIR [--tta] [output_dir=PATH] "
                          "[data.key=value ...]")
    evaluate_run(ns.run_dir, ns.args, tta=ns.tta)


def _prediction_inputs(ns: argparse.Namespace, predictor) -> tuple:
    """(images, their names): files and folders, or with --split a Hugging Face split."""
    from finetune.inference import image_files

    if ns.split is None:
        if ns.image_column is not None:
            raise ConfigError("--image-column goes with --split (a Hugging Face dataset).")
        files = image_files(ns.images)
        return files, [str(f) for f in files]
    from finetune.batch_predict import HubImages
    from finetune.config import DataConfig
    from finetune.data.hub import image_split, local_dataset

    if len(ns.images) != 1:
        raise ConfigError(f"--split {ns.split} reads one Hugging Face dataset (a save_to_disk "
                          f"folder, parquet files or hf:NAME), got {len(ns.images)} arguments.")
    source = ns.images[0]
    if not source.startswith("hf:") and not local_dataset(Path(source)):
        raise ConfigError(f"{source} is not a Hugging Face dataset (a save_to_disk folder or "
                          f"parquet files; hf:NAME for the hub): for a folder of images, drop "
                          f"--split.")
    cfg = (DataConfig(root=None, hf_name=source[3:], image_column=ns.image_column)
           if source.startswith("hf:") else DataConfig(root=source, image_column=ns.image_column))
    rows, _ = image_split(cfg, ns.split)
    images = HubImages(rows, ns.split, predictor.meta["in_chans"])
    return images, [images.name(i) for i in range(len(images))]


def _predict_to_file(ns: argparse.Namespace) -> None:
    """predict --out: streamed, resumable, on every process the launcher started."""
    from finetune.batch_predict import predict_to_file
    from finetune.inference import load
    from finetune.speed import joined_processes

    with joined_processes() as state:
        predictor = load(ns.model, device=state.device)
        images, names = _prediction_inputs(ns, predictor)
        done = predict_to_file(predictor, images, names, ns.out, top_k=ns.top_k, tta=ns.tta,
                               batch_size=ns.batch_size, workers=ns.workers, resume=ns.resume,
                               state=state, weights=Path(ns.model))
    if state.is_main_process:
        print(f"wrote {ns.out}: {done['already'] + done['written']} images"
              + (f" ({done['already']} from before, --resume)" if done["already"] else "")
              + (f"; {done['unreadable']} could not be read (see their error column)"
                 if done["unreadable"] else ""))


def _predict(ns: argparse.Namespace) -> None:
    import json

    from finetune.inference import load

    if ns.out is not None:
        _predict_to_file(ns)
        return
    if ns.resume:
        raise ConfigError("--resume continues a predictions file: pass it with --out FILE.")
    predictor = load(ns.model)
    images, files = _prediction_inputs(ns, predictor)
    # Opened as training's evaluation opened its files (a bad one is a one-line DataError).
    results = predictor.predict([images[i] for i in range(len(files))], top_k=ns.top_k,
                                tta=ns.tta)
    if ns.json:
        key = "labels" if predictor.multilabel else "top_k"  # tags over their thresholds
        print(json.dumps([{"file": str(f), key: [{"class": c, "probability": round(p, 6)}
                                                 for c, p in r]}
                          for f, r in zip(files, results, strict=True)], indent=2))
        return
    width = max(len(str(f)) for f in files)
    for f, r in zip(files, results, strict=True):
        print(f"{str(f):<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r))


def _serving_device(name: str | None) -> str:
    """--device checked: a device torch knows, and one this machine has."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device torch knows; use cpu, cuda or "
                          f"cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU; use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: serve runs on cpu, cuda or mps.")
    return str(device)


def _serve(ns: argparse.Namespace) -> None:
    from importlib.util import find_spec

    for module in ("fastapi", "uvicorn", "multipart"):  # the extra, checked first
        if find_spec(module) is None:
            raise ConfigError(f"finetune serve needs {module}: pip install 'finetune[serve]'.")
    from finetune.serve_limits import Limits
    from finetune.serving import Settings, serve

    device = _serving_device(ns.device)
    limits = Limits(max_request_bytes=int(ns.max_request_mb * 2**20), max_pixels=ns.max_pixels,
                    max_images=ns.max_images)
    serve(Settings(ns.model, device, ns.max_batch_size, ns.batch_wait_ms, limits),
          ns.host, ns.port, ns.workers)


def _inspect(ns: argparse.Namespace) -> None:
    from finetune.mistakes import Options, inspect_run

    options = Options(ns.top, ns.pairs, ns.examples, ns.cams, ns.layer)
    report = inspect_run(ns.run_dir, ns.out, options, ns.args)
    print(f"wrote {report} and {report.with_suffix('.html')}")


def _push(ns: argparse.Namespace) -> None:
    from finetune.publish import push

    url = push(ns.run_dir, ns.repo_id, private=ns.private, revision=ns.revision)
    print(f"published {ns.run_dir} to https://huggingface.co/{ns.repo_id}: {url}")


def _compare(ns: argparse.Namespace) -> None:
    import time

    from finetune.compare import float_list, plan_comparison, run_comparison
    from finetune.report import build_report
    from finetune.runs import find_runs

    if any(a.startswith("recipe=") for a in ns.args):
        plan = plan_comparison(ns.args)
        runs = run_comparison(plan)
        command = _command_line(ns)
        report = build_report(runs, plan.out / "report", plan.targets, command)
    else:
        paths = [a for a in ns.args if "=" not in a]
        options, unknown = split_options([a for a in ns.args if "=" in a],
                                         ("output_dir", "targets"))
        if unknown:
            raise ConfigError(f"finetune compare RUN_DIR...: unknown option(s) "
                              f"{', '.join(sorted(unknown))}; valid: output_dir=DIR, "
                              f"targets=0.8,0.9. To train recipes, start with recipe=A,B.")
        out = Path(options.get("output_dir") or (Path(paths[0]) / "report" if len(paths) == 1
                   else Path("runs") / "reports" / time.strftime("%Y%m%d-%H%M%S")))
        targets = float_list("targets", options["targets"]) if "targets" in options else None
        report = build_report(find_runs(paths), out, targets)
    print(f"wrote {report} and {report.with_suffix('.html')}")


def _command_line(ns: argparse.Namespace) -> str:
    """The command as typed (shell-quoted), for the reports that repeat it."""
    import shlex

    return f"finetune {ns.command} " + " ".join(map(shlex.quote, ns.args))


def _cv(ns: argparse.Namespace) -> None:
    from finetune.cv import main as cv_main

    cv_main(ns.args, _command_line(ns))


def _tune(ns: argparse.Namespace) -> None:
    from finetune.tune import main as tune_main

    tune_main(ns.args, _command_line(ns))


def _sweep(ns: argparse.Namespace) -> None:

    from finetune.sweep import main as sweep_main

    command = _command_line(ns) + (
        f" --train-best {ns.train_best}" if ns.train_best else "")
    sweep_main(ns.args, ns.train_best, command)


def _report(ns: argparse.Namespace) -> None:
    from finetune.report import build_report
    from finetune.runs import find_runs

    options, unknown = split_options(ns.args, ("output_dir",))
    if unknown or "=" in ns.run_dir:
        raise ConfigError("usage: finetune report RUN_DIR [output_dir=DIR]"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    out = options.get("output_dir") or Path(ns.run_dir) / "report"
    report = build_report(find_runs([ns.run_dir]), out)
    print(f"wrote {report} and {report.with_suffix('.html')}")


def _lr_find(ns: argparse.Namespace) -> None:
    from finetune.lr_find import main as lr_find_main

    lr_find_main(ns.args)


def _export_onnx(ns: argparse.Namespace) -> None:
    from finetune.export import export_onnx

    if ns.args and not ns.int8:
        raise ConfigError(f"export-onnx takes data.* overrides only with --int8 (the data it "
                          f"calibrates and measures on); got {' '.join(ns.args)}.")
    if ns.int8:  # refused before the fp32 file is written
        from finetune.export import read_meta
        from finetune.inference import refuse_tags

        refuse_tags(read_meta(ns.run_dir)[1], "--int8 (its accuracy check)")
    fp32 = export_onnx(ns.run_dir, ns.out)
    print(f"wrote {fp32}")
    if ns.int8:
        from finetune.int8 import export_int8

        run = Path(ns.run_dir)
        report = export_int8(run.parent if run.is_file() else run, fp32,
                             calibration=ns.calibration_images, overrides=ns.args)
        for kind in ("fp32", "int8"):
            r = report[kind]
            print(f"{r['file']}: test accuracy {r['test_acc']:.4f} on {report['test_images']} "
                  f"images, {r['latency_ms_batch1']:.2f} ms at batch 1, "
                  f"{r['latency_ms_batch64']:.1f} ms at batch 64, {r['size_mb']:.1f} MB")
        print(f"int8 calibrated on {report['calibration_images']} training images; the "
              f"numbers are in model.json (onnx) and the model card")


def _show(ns: argparse.Namespace) -> None:
    from finetune.assemble import check_model
    from finetune.config import to_yaml

    cfg = load_config(ns.args)
    check_model(cfg)
    print(to_yaml(cfg), end="")


def _recipes(ns: argparse.Namespace) -> None:
    for name, description in list_recipes().items():
        print(f"{name:<28} {description}")


def _models(ns: argparse.Namespace) -> None:
    from finetune.models import count_parameters, list_models
    from finetune.models.backbones import list_backbones
    from finetune.models.registry import get_pretrained_cfg

    if ns.pattern:
        try:
            rows = list_backbones(ns.pattern)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not rows:
            raise ConfigError(f"no model matches '{ns.pattern}'; try a wider pattern, e.g. "
                              f"'timm:convnext*' or 'tv:*'.")
        width = max(len(name) for name, _ in rows)
        for name, weights in rows:
            print(f"{name:<{width}}  {weights}")
        return
    print(f"{'model':<16} {'params (3x224x224, 1000 classes)':>34}  weights")
    for name in list_models():
        weights = "ImageNet (torchvision)" if get_pretrained_cfg(name)["tv_weights"] else ""
        print(f"{name:<16} {count_parameters(name):>34,d}  {weights}")
    print("\nand any timm or torchvision model: model.name=timm:NAME[.TAG] or tv:NAME; list "
          "them with `finetune models 'timm:convnext*'` or `finetune models 'tv:*'`.")


def _show_model(ns: argparse.Namespace) -> None:
    from finetune.assemble import check_model
    from finetune.models import create_model
    from finetune.models.summary import summarize

    cfg = load_config(ns.args)
    check_model(cfg)
    in_chans, size, classes = cfg.model.in_chans or 1, cfg.data.image_size, 10
    model = create_model(cfg.model.name, num_classes=classes, in_chans=in_chans,
                         image_size=size, norm=cfg.model.norm, init=cfg.model.init)
    print(f"{cfg.model.name}: in_chans={in_chans} (model.in_chans), image_size={size} "
          f"(data.image_size), num_classes={classes}")
    print(summarize(model, (1, in_chans, size, size)))


# --- the parser: one sub-command each, with its arguments and config keys --------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {value}")
    return value


def _milliseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < 60_000:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 to 60000 ms, got {text}")
    return value


def _megabytes(text: str) -> float:
    value = float(text)
    if not 0 < value <= 2**20:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be more than 0 MB and at most 1 TB, got {text}")
    return value


def _keys(*prefixes: str) -> str:
    keys = [k for k in SCHEMA_KEYS if not prefixes or k.startswith(prefixes)]
    return "config keys (key=value):\n" + describe_keys(keys)


def _overrides(p: argparse.ArgumentParser, what: str = "recipe=NAME and config overrides"
               ) -> None:
    p.add_argument("args", nargs="*", metavar=OVERRIDES, help=what)


def _add(sub: argparse._SubParsersAction, name: str, run: Callable, summary: str,
         description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description or summary, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)
    return p


SWEEP_HELP = ("finetune sweep models='timm:resnet*,timm:convnext_atto,resnet18,RUN_DIR' "
              "[seeds=3] [output_dir=DIR] [MODEL:key=value ...] [key=value ...] "
              "[--train-best METHOD]\n\n"
              "  models=     built-in names (`finetune models`), timm:NAME / tv:NAME, globs\n"
              "              (timm:PATTERN: one per architecture with pretrained weights;\n"
              "              a '.' in it: per pretrained tag), and local weights: a finetune\n"
              "              run folder or its model.safetensors (architecture from model.json)\n"
              "  seeds=      probes per model (N, or a list 0,5,9): each seed draws the\n"
              "              held-out fifth that chooses the weight decay; default 3\n"
              "  output_dir= default runs/sweeps/<timestamp>; running the same command again\n"
              "              keeps finished models and cached features (DIR/features)\n"
              "  MODEL:key=value  for one model (or every model a pattern entry matches), e.g.\n"
              "              timm:convnext_atto:data.image_size=32 resnet18:model.weights=RUN\n"
              "  key=value   for every model (data.*, recipe=NAME, finetune.knn_k, ...)\n"
              "A model whose weights cannot be had, or that fails, is listed with its reason.\n"
              "Writes DIR/report.md, report.html, summary.json and models/*.json.")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "sweep", _sweep, "rank pretrained backbones on your data: linear-probe and "
             "kNN accuracy of their frozen features, against what they cost", SWEEP_HELP,
             _keys())
    p.add_argument("--train-best", metavar="METHOD", choices=METHODS, default=None,
                   help=f"then train the best model with finetune.method=METHOD "
                        f"({'|'.join(METHODS)}) into DIR/best-METHOD")
    _overrides(p, "models=, seeds=, output_dir=, [MODEL:]key=value")


TUNE_HELP = (
    "finetune tune recipe=NAME 'KEY=FORM(...)' ... [n_trials=20] [timeout=S] "
    "[pruner=median|hyperband|none] [metric=val_acc] [seed=0] [parallel=1] [output_dir=DIR] "
    "[launcher=\"...\"] [key=value ...]\n\n"
    "  KEY=FORM     a searched config key: loguniform(a,b), uniform(a,b), int(a,b) or\n"
    "               choice(a,b,...), e.g. 'train.lr=loguniform(1e-3,1)' (quote the parentheses)\n"
    "  n_trials=    trials the study holds finished (complete or pruned); default 20\n"
    "  timeout=     seconds of this command after which no trial starts (running ones end)\n"
    "  metric=      a val_* metric (needs data.val_split); the test split is never searched\n"
    "  parallel=    trials at once, one per GPU (CUDA_VISIBLE_DEVICES)\n"
    "  output_dir=  default runs/tune/<recipe>; study.db there: the same command resumes\n"
    "Trial 0 is the recipe's own settings. Writes DIR/best.yaml, tune.md, tune.json, plots.")


def _add_search(sub: argparse._SubParsersAction) -> None:
    """cv and tune: many trainings of one recipe."""
    _overrides(_add(sub, "cv", _cv, "k-fold cross-validation: a run per fold, every metric "
                    "as mean ± 95 %% interval, out-of-fold probabilities (oof.jsonl)",
                    "finetune cv recipe=NAME [folds=5] [output_dir=DIR] "
                    "[launcher=\"accelerate launch ...\"] [key=value ...]\n  Running the same "
                    "command again keeps finished folds and resumes the others.", _keys()),
               "recipe=, folds=, output_dir=, launcher=, config overrides")
    _overrides(_add(sub, "tune", _tune, "hyperparameter search with Optuna (the [tune] "
                    "extra): pruned on the validation split, resumable, the best trial as a "
                    "recipe", TUNE_HELP, _keys()),
               "recipe=, KEY=FORM(...), n_trials=, timeout=, pruner=, metric=, seed=, "
               "parallel=, output_dir=, launcher=, config overrides")


def _add_deployment(sub: argparse._SubParsersAction) -> None:
    """The commands that put an export to work: predict and export-onnx."""
    p = _add(sub, "predict", _predict, "top-k classes of images")
    p.add_argument("model", help="run folder or model.safetensors")
    p.add_argument("images", nargs="+", help="image files or folders; with --split a Hugging "
                   "Face dataset: a save_to_disk folder, parquet files, or hf:NAME")
    p.add_argument("--split", default=None, help="predict this split (or slice, e.g. "
                   "test[:1000]) of a Hugging Face dataset; rows are named SPLIT[i]")
    p.add_argument("--image-column", default=None,
                   help="with --split: the image column (default: the first Image feature)")
    p.add_argument("--top-k", type=_positive, default=3)
    p.add_argument("--tta", action="store_true",
                   help="average each image's probabilities over the views the model "
                   "trained with: its mirror image (data.hflip), shifts (data.crop_pad)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", type=Path, default=None,
                   help="write the predictions to FILE (.csv or .jsonl) as they come: any "
                        "number of images, streamed through DataLoader workers")
    p.add_argument("--resume", action="store_true",
                   help="continue --out FILE left by a killed job, after its complete rows")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per model call")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    p = _add(sub, "export-onnx", _export_onnx, "write model.onnx (dynamic batch)")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: RUN_DIR/model.onnx")
    p.add_argument("--int8", action="store_true",
                   help="also model.int8.onnx: ONNX Runtime static quantization calibrated on "
                        "training images, both files measured (accuracy, latency)")
    p.add_argument("--calibration-images", type=_positive, default=512,
                   help="training images that calibrate the int8 activation ranges")
    _overrides(p, "with --int8: data.* overrides (default: the run's own data)")


def _add_after_training(sub: argparse._SubParsersAction) -> None:
    """serve and inspect."""
    p = _add(sub, "serve", _serve, "an HTTP API and a web page for a model: POST /predict, "
             "GET /metadata, /health, /openapi.json, and / (drop images on it)")
    p.add_argument("model", help="run folder or model.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--workers", type=_positive, default=1,
                   help="server processes, each with its own copy of the model")
    p.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    p.add_argument("--max-batch-size", type=_positive, default=32,
                   help="images of concurrent requests run in one model call; 1 turns "
                        "dynamic batching off")
    p.add_argument("--batch-wait-ms", type=_milliseconds, default=5.0,
                   help="how long a request waits for others to share its model call")
    p.add_argument("--max-request-mb", type=_megabytes, default=20.0,
                   help="largest request body")
    p.add_argument("--max-pixels", type=_positive, default=40_000_000,
                   help="largest image (width x height), checked before decoding")
    p.add_argument("--max-images", type=_positive, default=64, help="images per request")
    p = _add(sub, "inspect", _inspect, "what a model gets wrong on its test set: top losses, "
             "most confused pairs, Grad-CAM heatmaps (RUN/inspect/report.html)")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--out", default=None, help="report folder (default: RUN/inspect)")
    p.add_argument("--top", type=_positive, default=16, help="top losses shown")
    p.add_argument("--pairs", type=_positive, default=6, help="confused class pairs")
    p.add_argument("--examples", type=_positive, default=4, help="images per confused pair")
    p.add_argument("--cams", type=int, default=4,
                   help="Grad-CAM over this many correct and this many wrong images (0: none)")
    p.add_argument("--layer", default=None, help="Grad-CAM's layer (default: the last feature "
                   "map of at least 3x3 positions)")
    _overrides(p, "data.* overrides (default: the run's own test data)")


def _add_inspection(sub: argparse._SubParsersAction) -> None:
    """The commands that show configs, recipes and models; nothing runs."""
    _overrides(_add(sub, "show", _show, "print the resolved config, nothing run",
                    epilog=_keys()))
    _add(sub, "recipes", _recipes, "list recipes")
    p = _add(sub, "models", _models, "list the built-in models, or timm's and torchvision's "
             "matching a pattern",
             epilog="examples:\n  finetune models\n  finetune models 'timm:convnext*'\n"
                    "  finetune models 'timm:vit_small*dinov2*'\n"
                    "  finetune models 'tv:efficientnet*'")
    p.add_argument("pattern", nargs="?", help="timm:GLOB or tv:GLOB (quote it for the shell)")
    _overrides(_add(sub, "show-model", _show_model, "each layer's output shape and parameters",
                    epilog=_keys("recipe", "model.", "data.image_size")))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=" ".join(__doc__.split()))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _overrides(_add(sub, "train", _train, "train, evaluate every epoch and export",
                    "Train a recipe (recipe=NAME or a .yaml path) with key=value overrides. "
                    "The same as `accelerate launch -m finetune.run recipe=NAME ...`.",
                    _keys()))
    p = _add(sub, "evaluate", _evaluate, "rebuild an exported model and measure it: top-1/top-5 "
             "and balanced accuracy, macro F1, calibration (ECE), per-class precision/recall/F1;"
             " evaluation.json, confusion.png, reliability.png",
             epilog=_keys("data."))
    p.add_argument("run_dir", help="a run folder (or its ema/ folder)")
    p.add_argument("--tta", action="store_true",
                   help="also with test-time augmentation (the mirror images and shifts the "
                   "model trained with), beside the plain")
    _overrides(p, "output_dir=PATH (default RUN_DIR), data.* overrides (other test data)")
    _add_deployment(sub)
    _add_after_training(sub)
    p = _add(sub, "push", _push, "publish an export folder as a Hugging Face Hub model "
             "repository (model card, weights, configs, metrics)")
    p.add_argument("run_dir", help="a run folder (or its ema/ folder)")
    p.add_argument("repo_id", help="user/name or org/name on the hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="a branch to push to (created if needed)")
    _overrides(_add(sub, "compare", _compare, "train recipes over paired seeds under one "
                    "budget and report, or report finished runs",
                    "finetune compare recipe=A,B [seeds=3|0,5,9] [targets=0.8,0.9] "
                    "[output_dir=DIR] [launcher=\"accelerate launch ...\"] [A:key=value] "
                    "[key=value ...]\n  data.train_limit=100,1000 sweeps training-set sizes.\n"
                    "finetune compare RUN_DIR... [output_dir=DIR] [targets=...]: the same "
                    "report from finished runs.", _keys()),
               "recipe=A,B, seeds=, targets=, output_dir=, launcher=, [RECIPE:]key=value; "
               "or run folders")
    _add_sweep(sub)
    _add_search(sub)
    p = _add(sub, "report", _report, "the report of one finished run (plots, report.md/.html)")
    p.add_argument("run_dir")
    _overrides(p, "output_dir=DIR (default RUN_DIR/report)")
    _overrides(_add(sub, "lr-find", _lr_find, "learning-rate range test: loss against rate, "
                    "a plot and a suggested train.lr",
                    "finetune lr-find recipe=NAME [start_lr=1e-7] [end_lr=10] [steps=100] "
                    "[output_dir=DIR] [key=value ...]", _keys()),
               "recipe=NAME, start_lr=, end_lr=, steps=, config overrides")
    _add_inspection(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``, taking a command's key=value overrides before or after its flags
    (``evaluate RUN --tta data.root=X`` as ``evaluate RUN data.root=X --tta``): argparse ends
    the positionals at the first flag, and parse_intermixed_args refuses sub-commands."""
    ns, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(ns, "args") or any(a.startswith("-") for a in extra)):
        parser.parse_args(argv)  # argparse's own usage error: unrecognized arguments
    if extra:
        ns.args = [*ns.args, *extra]
    return ns


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        ns = parse(build_parser(), argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    _setup_logging()
    try:
        with terminate_as_interrupt():
            ns.run(ns)
    except Interrupted as e:  # stopped by a signal after saving where it was
        print(str(e), file=sys.stderr)
        return e.status
    except KeyboardInterrupt as e:  # outside a training loop, or a third signal inside one
        name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        if getattr(ns, "untrained", False):  # linear/knn: no steps, no checkpoints
            kept = ("before the run finished; no file was left half-written, and the features "
                    "already cached are read again by the next run")
        elif ns.command == "predict" and getattr(ns, "out", None) is not None:
            kept = (f"before every image was predicted; {ns.out} keeps the rows written so far: "
                    f"the same command with --resume continues it")
        elif ns.command in ("train", "compare"):
            kept = ("before the next step could be saved; a run's folder keeps its last "
                    "complete checkpoint (resume=auto)")
        else:
            kept = "no file was left half-written"
        print(f"interrupted ({name}) {kept}.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (FinetuneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # outside finetune's writers (which raise OutputError themselves)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            print(f"error: {output_error(Path(e.filename or 'an output file'), e)}",
                  file=sys.stderr)
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR):
            print(f"error: {e.filename or 'a file'}: {e.strerror}; check the path and its "
                  f"permissions.", file=sys.stderr)
        else:
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
