"""Write a trained SentenceEmbedder as a folder that sentence-transformers and transformers both load.

The layout is the most portable one sentence-transformers reads (3.x to 6.x, no trust_remote_code): legacy
module type names, legacy pooling keys, an empty 2_Normalize folder, and a plain BertModel checkpoint at
the root.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from minilm_sts.atomic import staged_folder

LEGACY_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def export_model(model, out_dir: str | Path, model_card: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` (a SentenceEmbedder) to `out_dir`. The folder appears complete or not at all."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or pass overwrite")
    with staged_folder(out_dir, replace=True) as staging:
        _write_folder(model, staging, model_card)
    return out_dir


def export_with_card(checkpoint: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Export a Lightning checkpoint with the model card of the run that wrote it."""
    import torch

    from minilm_sts.card import render_model_card
    from minilm_sts.module import load
    from minilm_sts.module_callbacks import read_run_record

    model = load(checkpoint)
    run = read_run_record(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True))
    return export_model(model, out_dir, render_model_card(model, run), overwrite=overwrite)


def _write_folder(model, folder: Path, model_card: str | None) -> None:
    import torch
    import transformers
    from transformers import BertConfig

    max_seq_length = model.hparams.max_seq_length
    config = BertConfig(**model.encoder.config.to_dict(), architectures=["BertModel"])
    config.save_pretrained(folder)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.encoder.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = model.tokenizer
    tokenizer.model_max_length = max_seq_length  # sentence-transformers >= 5.4 reads the length from here
    tokenizer.save_pretrained(folder)
    _write_json(folder / "modules.json", LEGACY_MODULES)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.encoder.config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    })
    (folder / "2_Normalize").mkdir()
    _write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "__version__": {"minilm_sts": _version(), "transformers": transformers.__version__, "pytorch": torch.__version__},
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })
    if model_card is not None:
        (folder / "README.md").write_text(model_card, encoding="utf-8")


def read_max_seq_length(folder: Path) -> int | None:
    """The max length a sentence-transformers folder was saved with, if it says."""
    config = Path(folder) / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length") if config.is_file() else None


def _write_json(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _version() -> str:
    from minilm_sts.version import __version__

    return __version__
