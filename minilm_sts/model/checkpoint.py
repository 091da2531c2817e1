"""What a checkpoint written by `fit` holds, read as plain tensors and values with no Lightning involved: its
check, the SentenceEncoder inside it (state-dict keys of every earlier version upgraded), and its run record."""

from __future__ import annotations

from pathlib import Path

import torch

from minilm_sts.errors import MissingInputError, UserInputError
from minilm_sts.model.bert import BertConfig, BertModel
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.model.tokenization import tokenizer_from_files

TOKENIZER_CHECKPOINT_KEY = "minilm_sts_tokenizer_files"
# Lightning keeps a callback's state under its class name: the RunRecord callback's (minilm_sts.training).
RUN_RECORD_STATE_KEY = "RunRecord"
# Checkpoints written before the run record and the random stream were callbacks hold them under these keys.
LEGACY_RECORD_KEY, LEGACY_RESUME_KEY = "minilm_sts_run", "minilm_sts_resume"

# The SentenceEncoder's weights in the state dict, and the prefixes earlier versions wrote instead: `embedder.`
# for the SentenceEncoder (up to the move into subpackages), `encoder.` for the bare BERT (up to commit 3722055).
ENCODER_PREFIX = "sentence_encoder."
LEGACY_PREFIXES = {"embedder.": ENCODER_PREFIX, "encoder.": ENCODER_PREFIX + "bert."}


def upgrade_state_dict(state: dict) -> dict:
    """A checkpoint's state dict under today's keys, also when an earlier version wrote it."""
    def upgraded(key: str) -> str:
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(old):
                return new + key.removeprefix(old)
        return key

    return {upgraded(key): value for key, value in state.items()}


def encoder_state_dict(state: dict) -> dict:
    """The SentenceEncoder's own state dict, out of a checkpoint's."""
    return {key.removeprefix(ENCODER_PREFIX): value for key, value in upgrade_state_dict(state).items()
            if key.startswith(ENCODER_PREFIX)}


def check_checkpoint(path: Path) -> dict:
    """The checkpoint's contents; fails with a plain message on a missing or damaged file or a checkpoint of
    some other model."""
    if not path.is_file():
        raise MissingInputError(f"{path}: no such checkpoint file")
    try:
        # mmap: the check reads the archive's structure and plain values; tensors are read when used.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or non-checkpoint files
        raise UserInputError(f"{path}: not a readable checkpoint, perhaps truncated or corrupt ({err})") from err
    if "encoder_config" not in checkpoint.get("hyper_parameters", {}):
        raise UserInputError(f"{path}: this checkpoint was not written by minilm_sts (SentenceEncoderTraining)")
    return checkpoint


def encoder_from_checkpoint(checkpoint: dict) -> SentenceEncoder:
    """The SentenceEncoder a SentenceEncoderTraining checkpoint holds: its architecture, weights and tokenizer (or,
    in a checkpoint without tokenizer files, the tokenizer of the model it was trained from)."""
    h = checkpoint["hyper_parameters"]
    files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY)
    encoder = SentenceEncoder(BertModel(BertConfig.from_dict(h["encoder_config"])),
                              tokenizer_from_files(files) if files else None,
                              h["max_seq_length"], h.get("compile", False), h["pretrained"])  # compile came later
    encoder.load_state_dict(encoder_state_dict(checkpoint["state_dict"]), strict=True)
    return encoder


def empty_run_record() -> dict:
    """The record of a run before anything is recorded (and of a checkpoint that holds none)."""
    return {"datasets": {}, "log": [], "evaluation": {}}


def read_run_record(checkpoint: dict) -> dict:
    """The run record a checkpoint holds (written by RunRecord, or by an older minilm_sts), or an empty one."""
    state = checkpoint.get("callbacks", {}).get(RUN_RECORD_STATE_KEY)
    if state is not None:
        return state["record"]
    legacy = checkpoint.get(LEGACY_RECORD_KEY)
    return empty_run_record() if legacy is None else _upgraded(legacy)


def _upgraded(legacy: dict) -> dict:
    """An older record in today's form: it kept the (one) validation set's latest metrics only in the last log
    row, and the test's under "test"."""
    record = {key: value for key, value in legacy.items() if key != "test"}
    record["evaluation"] = {}
    if legacy.get("log"):
        last = legacy["log"][-1]
        record["evaluation"]["val"] = {"val": {key: value for key, value in last.items()
                                               if key not in ("epoch", "step", "training_loss")}}
    if legacy.get("test"):
        record["evaluation"]["test"] = {"test": legacy["test"]}
    return record
