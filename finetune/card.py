"""The model card: every export folder is a Hugging Face Hub model repository, ``README.md``
(YAML metadata + how it was trained, its results, how to load it) beside
``model.safetensors``, ``model.json`` and, for timm-loadable models, ``config.json``;
``finetune push`` publishes it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config import PROBES, Config, flat_config, load_config, show_value, to_yaml
from finetune.errors import ConfigError
from finetune.files import atomic_write_text
from finetune.metrics import per_class

CARD = "README.md"
SCORES = ("acc", "top5_acc", "balanced_acc", "macro_f1", "ece")  # test_* keys of a record
MULTILABEL_SCORES = ("map", "f1_micro", "f1_macro", "acc")
# A score's metric type on the Hub, and its config (how it averages)
METRIC_TYPES = {"acc": ("accuracy", None), "top5_acc": ("top-5 accuracy", None),
                "balanced_acc": ("balanced accuracy", None), "macro_f1": ("f1", "macro"),
                "ece": ("expected calibration error", None),
                "map": ("mean average precision", "macro"), "f1_micro": ("f1", "micro"),
                "f1_macro": ("f1", "macro")}
# What a Hub repository of a run holds (not its checkpoints).
PUBLISHED = ["README.md", "model.safetensors", "model.json", "config.json", "config.yaml",
             "metrics.jsonl", "evaluation.json", "confusion.png", "reliability.png",
             "pr_curves.png",
             "model.onnx", "model.int8.onnx", "adapter/adapter_config.json",
             "adapter/adapter_model.safetensors", "knn.safetensors"]


def overrides(cfg: Config) -> list[str]:
    """The run's settings that differ from its recipe's (``key=value``)."""
    try:
        base = flat_config(load_config([f"recipe={cfg.recipe}"] if cfg.recipe else []))
    except ConfigError:  # the recipe file is gone: every setting is shown in the config
        return []
    return [f"{k}={str(v).lower() if isinstance(v, bool) else show_value(v)}"
            for k, v in flat_config(cfg).items()
            if k not in ("recipe", "description", "output_dir", "overwrite", "resume")
            and base.get(k) != v and not (k == "data.image_size" and base.get(k) is None)]


def _metadata(meta: dict, scores: dict, cfg: Config, name: str, timm: bool) -> dict:
    from huggingface_hub import EvalResult, ModelCardData

    cfg_p = meta.get("pretrained_cfg") or {}
    source = meta.get("pretrained") or ""
    base = None
    if source.startswith("timm:"):
        base = source.removeprefix("timm:")
        base = base if "/" in base else f"timm/{base}"
    dataset = cfg.data.hf_name if cfg.data.source == "hf" else None
    multilabel = meta.get("task") == "multilabel"
    types = {**METRIC_TYPES, "acc": ("exact match", None)} if multilabel else METRIC_TYPES
    results = [EvalResult(task_type="image-classification", dataset_type=dataset or "custom",
                          dataset_name=dataset or meta["data"], dataset_split="test",
                          metric_type=types[k][0], metric_name=k, metric_value=round(v, 6),
                          metric_config=types[k][1])
               for k, v in scores.items()]
    return ModelCardData(
        model_name=name, library_name="timm" if timm else "pytorch",
        **_license(cfg_p.get("license") if meta.get("pretrained") else None),
        base_model=base,
        datasets=[dataset] if dataset else None,
        tags=["image-classification", *(["multi-label-classification"] if multilabel else []),
              "finetune", *(["timm"] if timm else [])],
        pipeline_tag="image-classification", eval_results=results,
        metrics=["accuracy", "f1"]).to_dict()


# License identifiers the Hub accepts as they are (a subset of its list); any other license
# string of the weights (e.g. timm's "dinov3-license") becomes "other" with its name.
HUB_LICENSES = {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0",
                "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0",
                "gpl-3.0", "lgpl-3.0", "agpl-3.0", "openrail", "bigscience-openrail-m",
                "creativeml-openrail-m", "llama2", "llama3", "gemma", "unknown", "other"}


def _license(weights_license: str | None) -> dict:
    """The card's license: the weights' when the model started from them (a from-scratch
    model's is its owner's to choose: other)."""
    if not weights_license:
        return {"license": "other"}
    if weights_license.lower() in HUB_LICENSES:
        return {"license": weights_license.lower()}
    return {"license": "other", "license_name": weights_license}


def model_card(meta: dict, record: dict, cfg: Config, name: str, timm: bool) -> str:
    """The README.md of an export: ``meta`` its model.json, ``record`` the epoch exported (its
    metrics.jsonl line), ``timm``: whether timm's ``config.json`` is beside it."""
    from huggingface_hub import ModelCard, ModelCardData

    keys = MULTILABEL_SCORES if meta.get("task") == "multilabel" else SCORES
    scores = {k: record[f"test_{k}"] for k in keys if f"test_{k}" in record}
    data = ModelCardData(**_metadata(meta, scores, cfg, name, timm))
    tuned = overrides(cfg)
    trained = (f"`finetune train recipe={cfg.recipe}" + "".join(f" {o}" for o in tuned) + "`"
               if cfg.recipe else "`finetune train` with the configuration below")
    score_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in scores.items())
    body = f"""
# {data.model_name}

`{meta["architecture"]}` trained with finetune on {meta["data"]}
({meta["train_images"]} training images, {meta["num_classes"]} classes, {meta["in_chans"]}
channel(s), {meta["image_size"]} px), starting from {meta.get("pretrained") or "random init"}.
{_method_note(meta, record)}
## Training

{trained}

The full configuration (`config.yaml`):

```yaml
{to_yaml(cfg).strip()}
```

## Results

On the test split ({record["test_total"]} images), epoch {record["epoch"]}:

| metric | value |
| --- | --- |
{score_rows}
{_per_class_table(record, meta["class_names"])}{_usage(meta, timm)}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def _method_note(meta: dict, record: dict) -> str:
    """How the model transferred (finetune.method), when not by plain fine-tuning."""
    method, lora = meta.get("method"), meta.get("lora")
    if isinstance(lora, dict):
        return (f"\nLoRA rank {lora['rank']} (alpha {lora['alpha']:g}) on {lora['modules']} "
                f"modules, the classifier trained whole; `model.safetensors` holds the adapters "
                f"merged into plain weights, `adapter/` the adapter in peft's format "
                f"(`peft.PeftModel.from_pretrained(base_model, \"adapter\")`).\n")
    if method == "linear":
        kind = PROBES.get(record.get("probe"), "linear head")
        return (f"\nA linear probe: the pretrained backbone unchanged, the classifier a {kind} "
                f"fitted on its features (weight decay {record.get('probe_weight_decay', '?')}, "
                f"the candidate that scored best on held-out features).\n")
    if method == "knn":
        knn = meta.get("knn", {})
        return (f"\nk-nearest neighbours: the pretrained backbone unchanged; a prediction is "
                f"the vote of the {knn.get('k')} training images with the most similar "
                f"features (weights exp(cosine / {knn.get('temperature')})), stored in "
                f"`knn.safetensors`. `finetune predict` and `finetune evaluate` vote with them; "
                f"`model.safetensors` alone is the backbone with a zeroed classifier.\n")
    if "probe_test_acc" in record:
        return (f"\nLP-FT: a linear probe on the frozen backbone's features first (test "
                f"accuracy {record['probe_test_acc']:.4f}), then full fine-tuning from its "
                f"head.\n")
    return ""


def _per_class_table(record: dict, class_names: list[str]) -> str:
    if "per_class" in record:  # multi-label
        return _tag_table(record, class_names)
    if "confusion" not in record:  # the weight average's card: no confusion matrix kept
        return ""
    rows = "\n".join(f"| {r['class']} | {r['recall']:.4f} | {r['precision']:.4f} | "
                     f"{r['f1']:.4f} | {r['support']} |"
                     for r in per_class(record["confusion"], class_names))
    return f"""
Per class (accuracy is the class's recall):

| class | accuracy | precision | F1 | images |
| --- | --- | --- | --- | --- |
{rows}
"""


def _tag_table(record: dict, class_names: list[str]) -> str:
    """Multi-label: each tag's average precision, and F1, precision and recall at 0.5."""
    def ap(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = "\n".join(f"| {name} | {ap(r['ap'])} | {r['f1']:.4f} | {r['precision']:.4f} | "
                     f"{r['recall']:.4f} | {r['support']} |"
                     for name, r in zip(class_names, record["per_class"], strict=True))
    return f"""
Multi-label: `acc` is the exact match ratio (every tag right); per tag its average precision
and, at a probability of 0.5, F1, precision and recall (`finetune evaluate` scores the tuned
thresholds of `model.json`):

| tag | AP | F1 | precision | recall | images |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def _usage(meta: dict, timm: bool) -> str:
    with_timm = """
With timm alone (this folder has timm's `config.json`):

```python
import timm
model = timm.create_model("hf-hub:REPO_ID", pretrained=True).eval()
```
""" if timm else ""
    return f"""
## Use it

```python
import finetune
predictor = finetune.load("PATH_TO_THIS_FOLDER")
print(predictor.predict(["image.png"]))
```

Preprocessing (in `model.json`): shorter side to {meta.get("resize", meta["image_size"])} px
({meta.get("interpolation", "bilinear")}), center crop {meta["image_size"]} px, then
`(x / 255 - mean) / std` with mean {meta["mean"]} and std {meta["std"]}.
{with_timm}"""


def write_model_card(folder: Path, meta: dict, record: dict, cfg: Config) -> None:
    """``folder/README.md`` for the export in ``folder`` (a run, or its ``ema`` folder)."""
    name = folder.name if folder.name != "ema" else f"{folder.parent.name}-ema"
    atomic_write_text(folder / CARD, model_card(meta, record, cfg, name,
                                                (folder / "config.json").is_file()))
