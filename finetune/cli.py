"""The ``finetune`` command: train, evaluate, and inspect recipes and models."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from finetune.config import list_recipes, load_config, to_yaml
from finetune.errors import ConfigError, DataError, FinetuneError

USAGE = """finetune COMMAND [ARGS]

commands:
  train recipe=NAME [key=value ...]   train, evaluate and export (also: accelerate launch
                                      finetune/run.py recipe=NAME ...)
  evaluate RUN_DIR [data.key=value]   rebuild an exported model: accuracy, per-class
                                      precision/recall, confusion matrix (JSON and PNG)
  predict MODEL IMAGE_OR_FOLDER... [--top-k K] [--json]
                                      top-k classes of images (MODEL: run folder or
                                      model.safetensors)
  compare recipe=A,B [seeds=3] [targets=0.8,0.9] [output_dir=DIR] [A:key=value] [key=value ...]
                                      train each recipe over paired seeds under one budget
                                      (data.train_limit=100,1000,... sweeps training-set
                                      sizes), then write a report (tables, plots, HTML)
  compare RUN_DIR... [output_dir=DIR] [targets=...]
                                      the same report from finished runs
  report RUN_DIR [output_dir=DIR]     the report of one run (plots, report.md/.html)
  lr-find recipe=NAME [start_lr=1e-7] [end_lr=10] [steps=100] [key=value ...]
                                      learning-rate range test: loss-vs-rate plot and a
                                      suggested train.lr
  export-onnx RUN_DIR [--out PATH]    write model.onnx (dynamic batch)
  show recipe=NAME [key=value ...]    print the resolved config
  recipes                             list recipes
  models                              list registered models with parameter counts
  show-model [recipe=NAME] [key=value ...]
                                      print each layer's output shape and parameters
"""


def _setup_logging() -> None:
    """finetune's own messages at INFO (dependencies stay at their defaults); only the main
    process talks, the others would repeat every line."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    log = logging.getLogger("finetune")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _models() -> None:
    import torch

    from finetune.models import create_model, list_models
    from finetune.models.pretrained import PRETRAINED

    print(f"{'model':<16} {'params (3x224x224, 1000 classes)':>34}  weights")
    for name in list_models():
        with torch.device("meta"):  # counts shapes only: no memory, no init time
            params = sum(p.numel() for p in create_model(name).parameters())
        weights = "ImageNet (torchvision)" if name in PRETRAINED else ""
        print(f"{name:<16} {params:>34,d}  {weights}")


def _show_model(args: list[str]) -> None:
    from finetune.models import create_model
    from finetune.models.summary import summarize

    cfg = load_config(args)
    in_chans, size, classes = cfg.model.in_chans or 1, cfg.data.image_size, 10
    model = create_model(cfg.model.name, num_classes=classes, in_chans=in_chans,
                         image_size=size, norm=cfg.model.norm, init=cfg.model.init)
    print(f"{cfg.model.name}: in_chans={in_chans} (model.in_chans), image_size={size} "
          f"(data.image_size), num_classes={classes}")
    print(summarize(model, (1, in_chans, size, size)))


def _predict(args: list[str]) -> None:
    import json

    from PIL import Image, UnidentifiedImageError

    from finetune.inference import image_files, load

    parser = argparse.ArgumentParser(prog="finetune predict")
    parser.add_argument("model", help="run folder or model.safetensors")
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(args)
    predictor = load(ns.model)
    files = image_files(ns.images)
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
    results = predictor.predict(images, top_k=ns.top_k)
    if ns.json:
        print(json.dumps([{"file": str(f), "top_k": [{"class": c, "probability": round(p, 6)}
                                                      for c, p in r]}
                          for f, r in zip(files, results, strict=True)], indent=2))
        return
    width = max(len(str(f)) for f in files)
    for f, r in zip(files, results, strict=True):
        print(f"{str(f):<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r))


def _export_onnx(args: list[str]) -> None:
    from finetune.export import export_onnx

    parser = argparse.ArgumentParser(prog="finetune export-onnx")
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="default: RUN_DIR/model.onnx")
    ns = parser.parse_args(args)
    print(f"wrote {export_onnx(ns.run_dir, ns.out)}")


def _compare(args: list[str]) -> None:
    import shlex
    import time
    from pathlib import Path

    from finetune.compare import plan_comparison, run_comparison
    from finetune.report import build_report
    from finetune.runs import find_runs

    if any(a.startswith("recipe=") for a in args):
        plan = plan_comparison(args)
        runs = run_comparison(plan)
        command = "finetune compare " + " ".join(map(shlex.quote, args))
        report = build_report(runs, plan.out / "report", plan.targets, command)
    else:
        options = {k: v for k, _, v in (a.partition("=") for a in args if "=" in a)}
        unknown = sorted(set(options) - {"output_dir", "targets"})
        if unknown:
            raise ConfigError(f"finetune compare RUN_DIR...: unknown option(s) "
                              f"{', '.join(unknown)}; valid: output_dir=DIR, targets=0.8,0.9. "
                              f"To train recipes, start with recipe=A,B.")
        paths = [a for a in args if "=" not in a]
        out = Path(options.get("output_dir") or (Path(paths[0]) / "report" if len(paths) == 1
                   else Path("runs") / "reports" / time.strftime("%Y%m%d-%H%M%S")))
        from finetune.compare import float_list

        targets = float_list("targets", options["targets"]) if "targets" in options else None
        report = build_report(find_runs(paths), out, targets)
    print(f"wrote {report} and {report.with_suffix('.html')}")


def _report(args: list[str]) -> None:
    from pathlib import Path

    from finetune.report import build_report
    from finetune.runs import find_runs

    paths = [a for a in args if "=" not in a]
    options = dict(a.partition("=")[::2] for a in args if "=" in a)
    if len(paths) != 1 or set(options) - {"output_dir"}:
        raise ConfigError("usage: finetune report RUN_DIR [output_dir=DIR]")
    report = build_report(find_runs(paths), options.get("output_dir") or Path(paths[0]) / "report")
    print(f"wrote {report} and {report.with_suffix('.html')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="finetune", usage=USAGE)
    parser.add_argument("command", choices=["train", "evaluate", "predict", "compare", "report",
                                            "lr-find", "export-onnx", "show", "recipes",
                                            "models", "show-model"])
    parser.add_argument("args", nargs="*")
    if not argv:
        parser.print_usage()
        return 2
    ns = parser.parse_args(argv[:1])
    args = argv[1:]
    _setup_logging()
    try:
        if ns.command == "train":
            from finetune.train import main as train_main

            train_main(load_config(args))
        elif ns.command == "evaluate":
            if not args or "=" in args[0]:
                raise ConfigError("usage: finetune evaluate RUN_DIR [data.key=value ...]")
            from finetune.evaluation import evaluate_run

            evaluate_run(args[0], args[1:])
        elif ns.command == "predict":
            _predict(args)
        elif ns.command == "compare":
            _compare(args)
        elif ns.command == "report":
            _report(args)
        elif ns.command == "lr-find":
            from finetune.lr_find import main as lr_find_main

            lr_find_main(args)
        elif ns.command == "export-onnx":
            _export_onnx(args)
        elif ns.command == "show":
            print(to_yaml(load_config(args)), end="")
        elif ns.command == "recipes":
            for name, description in list_recipes().items():
                print(f"{name:<28} {description}")
        elif ns.command == "models":
            _models()
        elif ns.command == "show-model":
            _show_model(args)
        else:
            raise ConfigError(f"unknown command {ns.command}")
    except (FinetuneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        # Every output is written to a temporary name and renamed: nothing partial is left.
        print(f"error: could not write {e.filename or 'an output file'}: {e.strerror}. Free "
              f"space or write elsewhere (output_dir=PATH); no partially written file was kept.",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
