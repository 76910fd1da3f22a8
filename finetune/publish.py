"""``finetune push RUN_DIR REPO_ID``: publish an export folder as a Hugging Face Hub model
repository (its model card, weights, model.json, timm's config.json, metrics and figures; never
its checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.card import CARD, PUBLISHED, write_model_card
from finetune.config import load_config
from finetune.errors import ExportError, one_line
from finetune.export import read_meta
from finetune.runs import EMA, config_file, read_metrics


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or value.upper() in ("1", "ON", "YES", "TRUE")


def push(run_dir: str | Path, repo_id: str, private: bool = False,
         revision: str | None = None) -> str:
    """Upload the export in ``run_dir`` to ``repo_id`` (created if needed); the commit's URL.
    The token comes from the usual places (``HF_TOKEN``, ``hf auth login``)."""
    import huggingface_hub

    run_dir = Path(run_dir)
    _, meta = read_meta(run_dir)  # an export is there, or a one-line ExportError
    if hub_offline():
        raise ExportError("HF_HUB_OFFLINE is set: publishing needs the Hugging Face hub. Unset "
                          "HF_HUB_OFFLINE (and check the network) to push.")
    token = huggingface_hub.get_token()
    if token is None:
        raise ExportError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a "
                          "token with write access, then push again.")
    from huggingface_hub import CommitOperationAdd

    card = _card_for(run_dir, meta).replace("REPO_ID", repo_id)
    files = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run_dir / name))
             for name in PUBLISHED if name != CARD and (run_dir / name).is_file()]
    files.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode()))
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, files, revision=revision,
                                 commit_message=f"finetune: {meta['architecture']} "
                                                f"({meta.get('recipe') or 'run'})")
    except Exception as e:  # network, permissions, a bad repo id: one line
        raise ExportError(f"could not publish {run_dir} to {repo_id}: {one_line(e)}") from None
    return str(getattr(info, "commit_url", info))


def _card_for(run_dir: Path, meta: dict) -> str:
    """The export's model card; written from the run's config and the exported epoch's
    metrics when an older export has none."""
    card = run_dir / CARD
    if not card.is_file():
        ema = run_dir.name == EMA
        records = read_metrics(run_dir.parent if ema else run_dir)
        best = meta.get("early_stopping", {}).get("best_epoch")
        record = records[best - 1] if best else records[-1]
        if ema:  # the average's own numbers
            record = {"epoch": record["epoch"],
                      **{k.replace("ema_test_", "test_"): v for k, v in record.items()
                         if k.startswith("ema_test_")}}
        saved = config_file(run_dir)
        write_model_card(run_dir, meta, record, load_config([f"recipe={saved}"] if saved
                                                            else []))
    return card.read_text()
