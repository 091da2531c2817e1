"""The model card (README.md) of an exported model, in the form sentence-transformers writes, filled only
from what the run recorded: nothing is stated that the run did not do."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import SimpleNamespace

from minilm_sts.data.pair_data_module import GUARD_NAME, GUARD_SOURCE
from minilm_sts.hardware import describe_machine, machine
from minilm_sts.serving.merge_picture import MERGE_PICTURE
from minilm_sts.training.losses import LOSSES, loss_of_set

# Each loss as sentence-transformers' equivalent class and the parameters its cards list beside ours.
ST_LOSSES = {
    "cosine_mse": ("CosineSimilarityLoss", {"loss_fct": "torch.nn.modules.loss.MSELoss",
                                            "cos_score_transformation": "torch.nn.modules.linear.Identity"}),
    "cosent": ("CoSENTLoss", {"similarity_fct": "pairwise_cos_sim"}),
    "angle": ("AnglELoss", {"similarity_fct": "pairwise_angle_sim"}),
    "mnrl": ("MultipleNegativesRankingLoss", {"similarity_fct": "cos_sim"}),
    "gist": ("GISTEmbedLoss", {"guide": "the base model (minilm_sts `pretrained`)"}),
}
# Options of ours (or of only some sentence-transformers versions) that the card names only when a run sets them,
# so a card of a run without them reads as it did before they existed.
SHOWN_WHEN_SET = ("mask_known_duplicates", "gather_across_devices", "mini_batch_size")
DEFAULT_MONITOR = {"key": "val/spearman_cosine", "mode": "max"}
CORRELATION_TEXT = ("Pearson and Spearman correlation of cosine similarity with the gold label "
                    "(as sentence-transformers' EmbeddingSimilarityEvaluator)")
BINARY_TEXT = ("on a set whose labels are all 0 or 1, cosine as a duplicate detector (as its "
               "BinaryClassificationEvaluator): the best accuracy and the best F1 with their cosine thresholds, the "
               "precision, recall and Matthews correlation at the F1 threshold, and average precision")
RETRIEVAL_TEXT = ("on a set scored as duplicate retrieval, each duplicate pair's first sentence as a query against "
                  "every distinct sentence of the set (as its InformationRetrievalEvaluator): MRR@10, NDCG@10, "
                  "MAP@100, recall at 1, 10 and 100, and accuracy at 1 and 10")


def render_model_card(hparams: Mapping, run: dict | None = None) -> str:
    """Markdown for a model from its hyperparameters (a checkpoint's `hyper_parameters`, the arguments of the
    SentenceEncoderTraining that trained it, `encoder_config` among them) and the record of the run that trained
    it (`RunRecord`; none for a base model). Checkpoints from before the loss option trained with cosine_mse."""
    h, run = SimpleNamespace(**{"loss": "cosine_mse", "loss_params": None, **hparams}), run or {}
    train = _combined(run.get("datasets", {}).get("train"))
    sections = [
        _front_matter(h, run, train),
        f"# {_title(h, train)}\n\n{_summary(h, train)}",
        _details(h, train),
        _usage(),
        _evaluation(run),
        _merge(run),
        _training(h, run, train),
        _versions(run),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def render_deployment(parity) -> str:
    """The card's section on the folder's ONNX files, from export's parity rows (`BackendParity`, PyTorch's
    first): what the graph holds, how to load each file, and how close each backend comes to PyTorch."""
    rows = [_row(["Backend", "File", "Size (MB)", "Max abs diff vs PyTorch", "Min cosine vs PyTorch",
                  "STS-B test spearman_cosine"]), _row(["---"] * 6)]
    rows += [_row([p.backend, f"`{p.file}`", f"{p.size_bytes / 1e6:.1f}", f"{p.max_abs_diff:.2e}",
                   f"{p.min_cosine:.4f}", f"{p.stsb_test_spearman:.4f}"]) for p in parity]
    loads = "\n".join(f'model = SentenceTransformer("path/to/this/folder", backend="onnx", '
                      f'model_kwargs={{"file_name": "{p.file}"}})' for p in parity[1:])
    return (
        "## Deployment\n\n"
        "`onnx/` holds this model's transformer as ONNX graphs, in the layout sentence-transformers' ONNX backend "
        "loads: inputs `input_ids`, `attention_mask` and `token_type_ids` (batch and sequence axes dynamic), output "
        "`last_hidden_state`. Mean pooling and normalisation are not in the graph: they stay in the `1_Pooling` and "
        "`2_Normalize` modules. The int8 file, if present, is ONNX Runtime's dynamic quantization (int8 weights per "
        "channel, the word embeddings included; activations quantized per batch at run time).\n\n"
        "```python\nimport minilm_sts\n\n"
        f'model = minilm_sts.load("path/to/this/folder", backend="onnx", file_name="{parity[-1].file}")\n```\n\n'
        f"```python\nfrom sentence_transformers import SentenceTransformer\n\n{loads}\n```\n\n"
        "### Parity\n\nMeasured at export on the sentences of both columns of the packaged STS-B test split "
        f"(normalised embeddings, compared with this folder's PyTorch weights), on {describe_machine(machine())}:"
        "\n\n" + "\n".join(rows) + "\n"
    )


def loss_description(name: str, given: dict) -> tuple[str, dict]:
    """A loss as sentence-transformers' class name and the parameters it ran with (defaults filled in): mnrl
    with `symmetric` is MultipleNegativesSymmetricRankingLoss, and a loss with a `mini_batch_size` (GradCache) is
    its Cached class."""
    defaults = {key: p.default for key, p in LOSSES[name].parameters().items() if key not in SHOWN_WHEN_SET}
    parameters = {**defaults, **given}
    class_name, extra = ST_LOSSES[name]
    if parameters.pop("symmetric", False):
        class_name = "MultipleNegativesSymmetricRankingLoss"
    if parameters.get("mini_batch_size"):
        class_name = f"Cached{class_name}"
    return class_name, {**parameters, **extra}


def _front_matter(h, run, train) -> str:
    losses = [loss_of_set(h.loss, h.loss_params, name) for name in ([None] if isinstance(h.loss, str) else h.loss)]
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", "minilm_sts",
            *dict.fromkeys(f"loss:{loss_description(*loss)[0]}" for loss in losses)]
    if train:
        tags.append(f"dataset_size:{train['size']}")
    lines = ["---", "tags:", *(f"- {tag}" for tag in tags), f"base_model: {h.pretrained}",
             "pipeline_tag: sentence-similarity", "library_name: sentence-transformers"]
    names = _metric_names(_final_metrics(run))
    if names:
        lines += ["metrics:", *(f"- {name}" for name in names)]
    return "\n".join(lines + ["---"])


def _combined(datasets: list[dict] | None) -> dict | None:
    """Size and sources of all training sets together, for the summary lines."""
    if not datasets:
        return None
    return {"size": sum(d["size"] for d in datasets), "source": ", ".join(d["source"] for d in datasets)}


def _title(h, train) -> str:
    return f"{h.pretrained} fine-tuned with minilm_sts" if train else h.pretrained


def _summary(h, train) -> str:
    dims = h.encoder_config["hidden_size"]
    source = f" on {train['size']:,} sentence pairs ({train['source']})" if train else ""
    return (f"This is a sentence embedding model{' finetuned from ' + h.pretrained if train else ''}{source}. "
            f"It maps sentences and paragraphs to a {dims}-dimensional dense vector space and can be used for "
            "semantic textual similarity, semantic search, paraphrase mining, text classification and clustering.")


def _details(h, train) -> str:
    dims = h.encoder_config["hidden_size"]
    architecture = (
        "SentenceTransformer(\n"
        f"  (0): Transformer({{'max_seq_length': {h.max_seq_length}, 'do_lower_case': False}}) "
        "with Transformer model: BertModel\n"
        f"  (1): Pooling({{'word_embedding_dimension': {dims}, 'pooling_mode_mean_tokens': True}})\n"
        "  (2): Normalize()\n)"
    )
    rows = [("Model Type", "Sentence Transformer"), ("Base model", h.pretrained),
            ("Maximum Sequence Length", f"{h.max_seq_length} tokens"), ("Output Dimensionality", f"{dims} dimensions"),
            ("Similarity Function", "Cosine Similarity")]
    if train:
        rows.append(("Training Dataset", f"{train['size']:,} pairs from {train['source']}"))
    listing = "\n".join(f"- **{name}:** {value}" for name, value in rows)
    return (f"## Model Details\n\n### Model Description\n{listing}\n\n"
            f"### Full Model Architecture\n\n```\n{architecture}\n```")


def _usage() -> str:
    sentences = '["The weather is lovely today.", "It\'s so sunny outside!", "He drove to the stadium."]'
    return (
        "## Usage\n\n### minilm_sts\n\n```python\nimport minilm_sts\n\n"
        'model = minilm_sts.load("path/to/this/folder")\n'
        f"embeddings = model.encode({sentences})\n"
        "print(model.similarity(embeddings, embeddings))\n```\n\n"
        "### Sentence Transformers\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        'model = SentenceTransformer("path/to/this/folder")\n'
        f"embeddings = model.encode({sentences})\n"
        "print(model.similarity(embeddings, embeddings))\n```"
    )


def _final_metrics(run) -> list[tuple[str, dict]]:
    """(column title, metrics) for each set of the last validation and, if one ran, of the test."""
    found = []
    for stage, title in (("val", "validation"), ("test", "test")):
        sets = run.get("evaluation", {}).get(stage, {})
        found += [(title if len(sets) == 1 else f"{title}: {name}", metrics) for name, metrics in sets.items()]
    return found


def _metric_names(final: list[tuple[str, dict]]) -> list[str]:
    return list(dict.fromkeys(name for _, metrics in final for name in metrics))


def _primary(run) -> tuple[str, str]:
    """The metric (by its name in the log rows) and mode that checkpoint selection used, when it monitored one
    of the monitored set's metrics (`val/<metric>`); Spearman otherwise."""
    monitor = run.get("monitor", DEFAULT_MONITOR)
    stage, _, metric = monitor["key"].partition("/")
    if stage == "val" and metric and "/" not in metric and all(metric in row for row in run.get("log", [])):
        return metric, monitor["mode"]
    return DEFAULT_MONITOR["key"].partition("/")[2], DEFAULT_MONITOR["mode"]


def _evaluation(run) -> str:
    final = _final_metrics(run)
    if not final:
        return ""
    primary, _ = _primary(run)
    rows = []
    for name in _metric_names(final):
        cells = [f"{metrics[name]:.4f}" if name in metrics else "-" for _, metrics in final]
        rows.append(_row([f"**{c}**" for c in [name, *cells]] if name == primary else [name, *cells]))
    header = _row(["Metric", *(title for title, _ in final)]) + "\n" + _row(["---"] * (len(final) + 1))
    kinds = [(CORRELATION_TEXT, "spearman_cosine"), (BINARY_TEXT, "cosine_ap"), (RETRIEVAL_TEXT, "cosine_mrr@10")]
    text = "; ".join(kind for kind, metric in kinds if any(metric in metrics for _, metrics in final))
    return (f"## Evaluation\n\n### Metrics\n\nComputed over each whole evaluation set: {text}.\n\n"
            + header + "\n" + "\n".join(rows) + _guard_line(run))


def _guard_line(run) -> str:
    """The forgetting guard's Spearman before the first step and at the last validation, when the run had both."""
    before = run.get("before_training", {}).get(GUARD_NAME)
    after = run.get("evaluation", {}).get("val", {}).get(GUARD_NAME)
    if not before or not after or not run.get("log"):
        return ""
    merged = f", merged with the base at α = {run['merge']['chosen']:g}" if run.get("merge") else ""
    return (f"\n\n**Forgetting guard:** STS-B dev (`{GUARD_SOURCE}`) spearman_cosine {before['spearman_cosine']:.4f} "
            f"before training → {after['spearman_cosine']:.4f} after (step {run['log'][-1]['step']}{merged}).")


def _merge(run) -> str:
    """The merge with the base that the run chose (MergeWithBase): the rule, the whole curve as a table, and its
    picture, which export writes beside the card."""
    merge = run.get("merge")
    if not merge:
        return ""
    chosen, guard = merge["chosen"], merge["guard"]
    step = f" (step {run['log'][-1]['step']})" if run.get("log") else ""
    if guard is None:
        rule = f"the best `{merge['monitor']}` (the run validated on no STS-B dev set to guard against forgetting)"
    else:
        rule = (f"the best `{merge['monitor']}` among the α whose forgetting guard (`{guard}`) is at least the base "
                "model's (α = 0)")
    outcome = (" No merge with the fine-tuned weights kept the guard: this is the base model."
               if guard is not None and chosen == 0 else "")
    header = [_row(["α", merge["monitor"], *([f"{guard} (guard)", "guard kept"] if guard else []), ""]),
              _row(["---"] * (3 + 2 * bool(guard)))]
    base_guard = next(row["guard"] for row in merge["curve"] if row["alpha"] == 0)  # None without a guard
    rows = []
    for row in merge["curve"]:
        cells = [f"{row['alpha']:g}", f"{row['dev']:.4f}"]
        if guard:
            cells += [f"{row['guard']:.4f}", "yes" if row["guard"] >= base_guard else "no"]
        rows.append(_row([f"**{c}**" for c in cells] + ["**chosen**"] if row["alpha"] == chosen else cells + [""]))
    return (f"### Merging with the base\n\nThis model is θ(α) = (1 − α)·θ_base + α·θ_tuned at α = **{chosen:g}**: the "
            f"weights at the end of fine-tuning{step} merged with those of the base model `{merge['base']}` "
            f"(WiSE-FT). The run scored each α on the validation sets and kept {rule}.{outcome} The metrics above "
            "are this model's.\n\n" + "\n".join(header + rows)
            + f"\n\n![{merge['monitor']} and the guard against α]({MERGE_PICTURE})")


def _training(h, run, train) -> str:
    if not train:
        return ""
    parts = ["## Training Details"]
    for heading, split in (("Training Dataset", "train"), ("Evaluation Dataset", "val")):
        datasets = run.get("datasets", {}).get(split) or []
        parts += [f"### {heading}{'s' if len(datasets) > 1 else ''}"] if datasets else []
        parts += [f"#### {d['source']}\n\n{_dataset_block(d, h)}" for d in datasets]
    hardware = _hardware(run)
    parts += ["### Training Hardware", hardware] if hardware else []
    parts += ["### Training Hyperparameters", _hyperparameters(h, run)]
    if run.get("log"):
        parts += ["### Training Logs", _log_table(run)]
    return "\n\n".join(parts)


def _dataset_block(d: dict, h) -> str:
    a, b, label = d["columns"]
    stats = [
        _row(["", f"{a}", f"{b}", f"{label}"]), _row(["---"] * 4),
        _row(["type", "string", "string", "float"]),
        _row(["details", _token_stats(d["tokens"][a]), _token_stats(d["tokens"][b]), _label_stats(d["label"][label])]),
    ]
    samples = [_row([a, b, label]), _row(["---"] * 3), *(_row([x, y, f"{z:g}"]) for x, y, z in d["samples"])]
    loss = _set_loss(h, d)
    left_out = (f" ({d['left_out']:,} rows labelled 0 left out: {loss[0]} uses positive pairs only)"
                if d.get("left_out") else "")
    negatives = d.get("negative_columns") or []
    rows = f"rows ({d['format']})" if negatives else "pairs"
    block = (f"- Source: `{d['source']}`\n- Size: {d['size']:,} {rows}{left_out}\n"
             f"- Columns: `{a}`, `{b}`{''.join(f', `{n}`' for n in negatives)} and `{label}`\n"
             f"- Approximate statistics based on the first {d['stats_rows']} samples "
             "(tokens include [CLS] and [SEP]):\n\n"
             + "\n".join(stats) + "\n\n- Samples:\n\n" + "\n".join(samples))
    if loss is None:
        return block
    class_name, parameters = loss_description(*loss)
    return (block + f"\n\n- Loss: `{class_name}` (minilm_sts `{loss[0]}`) with these parameters:\n\n"
            f"```json\n{json.dumps(parameters, indent=4)}\n```")


def _set_loss(h, d: dict) -> tuple[str, dict] | None:
    """The loss a dataset's block names: the run's one loss, or under one loss per training set the set's own
    (none for an evaluation set)."""
    if isinstance(h.loss, str):
        return h.loss, dict(h.loss_params or {})
    name = d.get("name")
    return loss_of_set(h.loss, h.loss_params, name) if name in h.loss else None


def _hardware(run) -> str:
    """The precision the run trained in (after any choice by hardware) and the machine it ran on."""
    precision, found = run.get("trainer", {}).get("precision"), run.get("machine")
    lines = [f"- Precision: `{precision}`"] if precision else []
    lines += [f"- Machine: {describe_machine(found)}"] if found else []
    return "\n".join(lines)


def _token_stats(s: dict) -> str:
    return f"min: {s['min']:g} tokens<br>mean: {s['mean']:.2f} tokens<br>max: {s['max']:g} tokens"


def _label_stats(s: dict) -> str:
    return f"min: {s['min']:.2f}<br>mean: {s['mean']:.2f}<br>max: {s['max']:.2f}"


def _hyperparameters(h, run) -> str:
    everything = {**_plain(vars(h)), **_plain(run.get("data", {})), **run.get("trainer", {})}
    everything.pop("encoder_config", None)
    listing = lambda items: "\n".join(f"- `{k}`: {v}" for k, v in items.items())  # noqa: E731
    defaults = run.get("defaults")  # in the run record since the move into subpackages
    if defaults is None:
        changed = "(not recorded by the minilm_sts that trained this model)"
    else:
        changed = listing({k: v for k, v in everything.items() if k in defaults and defaults[k] != v}) or "(none)"
    return (f"#### Non-Default Hyperparameters\n\n{changed}\n\n"
            "#### All Hyperparameters\n<details><summary>Click to expand</summary>\n\n"
            f"{listing(everything)}\n\n</details>")


def _plain(values) -> dict:
    return {k: v for k, v in dict(values).items() if not k.startswith("_")}


def _log_table(run) -> str:
    """A row per validation: the correlations and, if checkpoints were selected on another metric, that one;
    the best row by that metric in bold. (The evaluation section lists every metric of the last one.)"""
    log, (primary, mode) = run["log"], _primary(run)
    metrics = list(dict.fromkeys(["pearson_cosine", "spearman_cosine", primary]))
    pick = max if mode == "max" else min
    best = pick(range(len(log)), key=lambda i: log[i][primary])
    rows = []
    for i, r in enumerate(log):
        loss = f"{r['training_loss']:.4f}" if r.get("training_loss") is not None else "-"
        cells = [f"{r['epoch']:.4f}", str(r["step"]), loss, *(f"{r[name]:.4f}" for name in metrics)]
        rows.append(_row([f"**{c}**" for c in cells] if i == best else cells))
    header = _row(["Epoch", "Step", "Training Loss", *metrics]) + "\n" + _row(["---"] * (3 + len(metrics)))
    return header + "\n" + "\n".join(rows) + f"\n\n* The bold row is the best validation {primary}."


def _versions(run) -> str:
    versions = run.get("versions")
    if not versions:
        return ""
    return "### Framework Versions\n\n" + "\n".join(f"- {name}: {version}" for name, version in versions.items())


def _row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
