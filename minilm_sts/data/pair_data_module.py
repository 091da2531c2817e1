"""LightningDataModule for labelled sentence pairs: tokenized once, cached, padded per batch.

Over 300 lines because a LightningDataModule's hooks (setup, the loaders, the card's description, resume
state) share its sources and datasets; the datasets themselves and the batch plan live in pair_datasets.py and
batching.py."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Iterable, Literal, Mapping, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minilm_sts._compat import epoch_batches_trained
from minilm_sts.data.batching import PairBatches
from minilm_sts.data.pair_datasets import ConcatPairs, PairDataset, ResumableLoader
from minilm_sts.data.pairs import PairTable, ReadOptions, iter_pair_chunks, read_pairs, read_sentences
from minilm_sts.data.sources import FileSource, builtin_path, parse_source
from minilm_sts.data.token_cache import Share, TokenizedPairs, load_tokenized
from minilm_sts.errors import PairDataError
from minilm_sts.evaluation.retrieval import DuplicateRetrieval
from minilm_sts.model.bert import PackedLayout


def source_name(source: str) -> str:
    """A short name for a data source, used in metric keys: `val/<name>/spearman_cosine`."""
    return parse_source(source).name


def named_sources(paths: Union[str, list[str], dict[str, str], None]) -> dict[str, str]:
    if paths is None:
        return {}
    if isinstance(paths, str):
        return {source_name(paths): paths}
    if isinstance(paths, dict):
        return dict(paths)
    named = {source_name(p): p for p in paths}
    if len(named) != len(paths):
        raise PairDataError(f"data sources {paths} share a name; give them as a mapping name: path")
    return named


SPLITS = ("train", "val", "test")
GUARD_NAME, GUARD_SOURCE = "stsb", "builtin:stsb/dev"  # the forgetting guard: `val/stsb/...`
CARD_STATS_ROWS = 1000  # sentence-transformers <= 5.4 describe a dataset by its first 1000 rows
CARD_SAMPLE_ROWS = 3


def summary_stats(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "mean": round(float(values.mean()), 2), "max": float(values.max())}


class PairDataModule(L.LightningDataModule):
    """Sentence pairs with a similarity label in [0, 1] (after dividing by `label_scale`).

    Args:
        train_path, val_path, test_path: a `.csv`, `.tsv`, `.jsonl` or `.parquet` file, `builtin:stsb/SPLIT`
            for the packaged STS Benchmark, or `hf:NAME[:CONFIG]:SPLIT` for a Hugging Face dataset. Each may
            also be a list of sources, or a mapping name: source. Several training sets take turns batch by
            batch; several validation sets are each logged as `val/<name>/...`.
        sentence_columns: the two text columns, or more: anchor, positive and negatives; by default
            `sentence_0, sentence_1` or `sentence1, sentence2`, else `anchor, positive` and `negative` or
            `negative_1 .. negative_k` (an n-tuple set, which only a loss with in-batch negatives trains on).
        label_column: by default `label` or `score`; an n-tuple set without one has every row labelled 1.
        label_scale: labels are divided by this (5.0 for raw STS-B scores 0-5).
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes.
        seed: seeds the training shuffle; by default the seed given to `seed_everything` (42 if none was).
        multi_dataset_sampler: with several training sets, `round_robin` or `proportional`.
        monitor_val: the validation set whose scores are also logged as `val/spearman_cosine` etc., the keys
            checkpoint selection uses (default: the first).
        drop_invalid: leave out rows with an empty sentence or a bad label instead of stopping (counted and
            reported). Off by default: bad input is an error.
        forgetting_guard: when training on anything but STS-B, also validate on the packaged STS-B dev set
            (`val/stsb/...`, read with its own labels in [0, 1], never monitored unless `monitor_val` names it),
            once before the first step too, so a run shows whether training cost general similarity. Not added
            when a training or validation set already is a packaged STS-B split.
        num_proc: processes that tokenize a source that is not in the token cache yet, chunk by chunk (by
            default the CPUs this process may use, shared among the run's processes on the machine; a source of
            one chunk is tokenized in this process). Under distributed training every process tokenizes its
            share of the chunks, and all of them then read the whole cache.
        retrieval: evaluation sets also scored as duplicate retrieval (`val/<set>/cosine_mrr@10`, `cosine_ap`
            ...; see `DuplicateRetrieval`): a list of set names, or a mapping set name: corpus file (a `.txt` file
            with one sentence per line, or a table's `sentence` or `text` column) whose sentences join the set's
            own as distractors. A pair labelled 1 (after `label_scale`) is a duplicate, and its first sentence a
            query. The whole corpus is embedded at every evaluation.
        retrieval_max_corpus: the most corpus sentences a retrieval set may have (a larger one stops the run
            before training, as embedding it at every validation would take longer than the training itself
            at any usual `val_check_interval`); raise it to score a larger corpus anyway.
    """

    def __init__(
        self,
        train_path: Union[str, list[str], dict[str, str], None] = None,
        val_path: Union[str, list[str], dict[str, str], None] = None,
        test_path: Union[str, list[str], dict[str, str], None] = None,
        sentence_columns: Optional[list[str]] = None,
        label_column: Optional[str] = None,
        label_scale: float = 1.0,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: Optional[int] = None,
        multi_dataset_sampler: Literal["round_robin", "proportional"] = "round_robin",
        monitor_val: Optional[str] = None,
        drop_invalid: bool = False,
        forgetting_guard: bool = True,
        retrieval: Union[list[str], dict[str, Optional[str]], None] = None,
        num_proc: Optional[int] = None,
        retrieval_max_corpus: int = 1_000_000,
    ):
        super().__init__()
        if batch_size < 1:
            raise PairDataError(f"batch_size must be at least 1 pair, got {batch_size}")
        if num_proc is not None and num_proc < 1:
            raise PairDataError(f"num_proc must be at least 1 process, got {num_proc}")
        self.save_hyperparameters()
        if seed is None:  # Lightning's seed_everything records its seed here, for worker processes too
            self.hparams.seed = int(os.environ.get("PL_GLOBAL_SEED", 42))
        self.tokenizer = None
        self.max_seq_length: Optional[int] = None
        self.in_batch_negatives: frozenset[str] = frozenset()  # training sets whose loss wants them, from the model
        self.losses: dict[str, str] = {}  # each training set's loss name, from the model, for messages
        self.batch_layout: Callable = PackedLayout  # from the model too
        self.sources = {split: named_sources(getattr(self.hparams, f"{split}_path")) for split in SPLITS}
        self.guard = GUARD_NAME if forgetting_guard and _guard_applies(self.sources) else None
        if self.guard:
            if self.guard in self.sources["val"]:
                raise PairDataError(f"a validation set is named {self.guard!r}, the name of the forgetting guard "
                                    f"({GUARD_SOURCE}); rename it or set forgetting_guard false")
            self.sources["val"][self.guard] = GUARD_SOURCE  # last: the first set stays the monitored one
        if monitor_val is not None and monitor_val not in self.sources["val"]:
            raise PairDataError(f"monitor_val {monitor_val!r} is not a validation set; "
                                f"they are {list(self.sources['val'])}")
        self.retrieval_corpora = _retrieval_corpora(retrieval, self.sources)
        self._retrieval_tasks: dict[tuple[str, str], DuplicateRetrieval] = {}
        self.datasets: dict[str, dict[str, PairDataset]] = {}
        self._train_batches: Optional[PairBatches] = None
        self._batches_state: Optional[dict] = None  # from a checkpoint, for the next train loader

    def tokenize_with(self, tokenizer, max_seq_length: int, in_batch_negatives: Iterable[str] = (),
                      batch_layout: Callable = PackedLayout, losses: Optional[Mapping[str, str]] = None) -> None:
        """Tokenize as the model that this data feeds: its tokenizer and max length (the model owns them, and
        checkpoints carry them), the training sets whose loss takes the batch's other rows as negatives (they
        are reduced to their positive pairs, label > 0, batched without a repeated sentence, and their batches
        carry each sentence's duplicate cluster; by default no set is), the encoder's `batch_layout`, which the
        loaders make for each batch, and each training set's loss name (`losses`, for messages only).
        SentenceEncoderTraining calls this as a trainer takes both; set up by hand, call it before `setup`."""
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length
        self.in_batch_negatives = frozenset(in_batch_negatives)
        self.batch_layout = batch_layout
        self.losses = dict(losses or {})

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise PairDataError("PairDataModule has no tokenizer: call data.tokenize_with(model.tokenizer, "
                                "model.max_seq_length) before data.setup(), or fit it with a SentenceEncoderTraining, "
                                "which does")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
        if "train" in wanted and "train" not in self.datasets:
            if self.in_batch_negatives and self.hparams.batch_size < 2:
                raise PairDataError("a loss with in-batch negatives takes the other rows of a batch as negatives: "
                                    f"batch_size must be at least 2, got {self.hparams.batch_size}")
        for split in wanted:
            if split not in self.datasets:
                if not self.sources[split]:
                    raise PairDataError(f"no {split} data: set --data.{split}_path")
                self.datasets[split] = {name: self._load(split, name) for name in self.sources[split]}
                if split != "train":  # a training set of the same name is not evaluated
                    for name in self.retrieval_corpora.keys() & self.sources[split].keys():
                        self._retrieval_tasks[split, name] = self._retrieval_task(split, name)

    def _read_options(self, split: str, name: str) -> ReadOptions:
        """The user's column, label and drop options apply to the user's sets; the guard set is packaged, with
        its own columns and labels already in [0, 1]."""
        if split == "val" and name == self.guard:
            return ReadOptions()
        h = self.hparams
        return ReadOptions(sentence_columns=h.sentence_columns, label_column=h.label_column, label_scale=h.label_scale,
                           drop_invalid=h.drop_invalid)

    def _load(self, split: str, name: str) -> PairDataset:
        source = self.sources[split][name]
        pairs = load_tokenized(source, self.tokenizer, self.max_seq_length, self._read_options(split, name),
                               num_proc=self.hparams.num_proc, share=self._share())
        if split != "train":
            _check_evaluation_set(source, pairs)
        elif pairs.columns > 2 and not self._in_batch_negatives(name):
            loss = f"its loss {self.losses[name]!r}" if name in self.losses else "its loss"
            raise PairDataError(f"{source}: training set {name!r} holds an anchor, a positive and "
                                f"{pairs.columns - 2} negative(s) per row, which only a loss with in-batch negatives "
                                f"(such as mnrl) trains on, and {loss} has none; train it with --model.loss mnrl")
        rank_zero_info(f"{split}: {len(pairs):,} {_row_kind(pairs.columns)} from {source}; {pairs.at_max_length} "
                       f"sentence(s) reached {self.max_seq_length} tokens and were truncated; {pairs.dropped} invalid "
                       "row(s) dropped")
        if split != "train" or not self._in_batch_negatives(name):
            return PairDataset(pairs)
        return _positive_pairs(source, pairs)

    def _share(self) -> Share:
        """This process's part in tokenizing a source under distributed training (the whole, alone)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return Share()
        return Share(trainer.global_rank, trainer.world_size, trainer.local_rank, trainer.strategy.barrier)

    def _read_table(self, split: str, name: str, head: bool = False) -> PairTable:
        """A set's texts, read again from its source (the token cache keeps only tokens and labels): all of
        them, or with `head` only its first chunk (however large the source, a bounded read)."""
        source, options = self.sources[split][name], self._read_options(split, name)
        with warnings.catch_warnings():  # rows dropped under drop_invalid were reported when the data loaded
            warnings.simplefilter("ignore")
            return next(iter_pair_chunks(source, options)) if head else read_pairs(source, options)

    def _in_batch_negatives(self, train_set: str) -> bool:
        return train_set in self.in_batch_negatives

    def _retrieval_task(self, split: str, name: str) -> DuplicateRetrieval:
        """Read from the texts, not the token cache: sentences that differ only in case are distinct documents,
        as in sentence-transformers' InformationRetrievalEvaluator."""
        source, corpus_source = self.sources[split][name], self.retrieval_corpora[name]
        table = self._read_table(split, name)
        corpus = read_sentences(corpus_source) if corpus_source else ()
        try:
            task = DuplicateRetrieval.from_pairs(table.sentences_a, table.sentences_b, table.labels, corpus)
        except ValueError as err:
            raise PairDataError(f"{source}: cannot score it as duplicate retrieval: {err}") from None
        limit = self.hparams.retrieval_max_corpus
        if len(task.corpus) > limit:
            raise PairDataError(f"{source}: scored as duplicate retrieval, its corpus of {len(task.corpus):,} "
                                "sentences would be embedded at every validation, above retrieval_max_corpus="
                                f"{limit:,}; raise --data.retrieval_max_corpus to score it anyway")
        rank_zero_info(f"{split}: {name} also scored as duplicate retrieval: {len(task.queries):,} queries, "
                       f"{len(task.corpus):,} corpus sentences")
        return task

    def retrieval_task(self, split: str, name: str) -> Optional[DuplicateRetrieval]:
        """The duplicate-retrieval task of an evaluation set, if `retrieval` names it."""
        return self._retrieval_tasks.get((split, name))

    def eval_names(self, split: str) -> list[str]:
        """Names of the split's datasets in dataloader order, the monitored validation set first."""
        names = list(self.sources[split])
        if split == "val" and self.hparams.monitor_val:
            names.remove(self.hparams.monitor_val)
            names.insert(0, self.hparams.monitor_val)
        return names

    def describe(self, split: str) -> list[dict]:
        """What a model card says about each dataset of a split: size, columns, tokens per sentence (special
        tokens included, after truncation) and label statistics over the first 1000 pairs, and the first rows.
        Columns and rows come from reading the source again: the token cache keeps only tokens and labels."""
        return [self._describe(split, name, dataset) for name, dataset in self.datasets[split].items()]

    def _describe(self, split: str, name: str, dataset: PairDataset) -> dict:
        """`columns` are sentence A's, B's and the label's (`label` for an n-tuple set without one, whose rows are
        all 1.0); `tokens` has every sentence column, negatives included, which `negative_columns` name."""
        source, pairs = self.sources[split][name], dataset.pairs
        table = self._read_table(split, name, head=True)
        rows = min(len(pairs), CARD_STATS_ROWS)
        lengths = np.diff(pairs.offsets[: pairs.columns * rows + 1]).reshape(rows, pairs.columns)
        sentence_columns, label = table.columns[: table.width], table.label_column or "label"
        samples = zip(table.sentences_a[:CARD_SAMPLE_ROWS], table.sentences_b[:CARD_SAMPLE_ROWS], table.labels)
        return {
            "name": name,
            "source": source,
            "size": len(dataset),
            "stats_rows": rows,
            "format": _set_format(sentence_columns),
            "columns": [*sentence_columns[:2], label],
            "negative_columns": list(sentence_columns[2:]),
            "tokens": {column: summary_stats(lengths[:, c]) for c, column in enumerate(sentence_columns)},
            "label": {label: summary_stats(pairs.labels[:rows])},
            "samples": [list(row) for row in samples],
            "at_max_length": pairs.at_max_length,
            "dropped": pairs.dropped,
            "left_out": len(pairs) - len(dataset),
        }

    def train_dataloader(self) -> DataLoader:
        parts = self.datasets["train"]
        h, trainer = self.hparams, self.trainer
        sentence_ids = [p.sentence_ids() if self._in_batch_negatives(name) else None for name, p in parts.items()]
        for part, ids in zip(parts.values(), sentence_ids):
            if ids is not None:
                part.mark_duplicates(ids)  # one cluster id per sentence in each batch, for masking known duplicates
        batches = PairBatches([len(p) for p in parts.values()], h.batch_size, h.seed, h.multi_dataset_sampler,
                              self._batches_trained, rank=trainer.global_rank, world=trainer.world_size,
                              sentence_ids=sentence_ids)
        if self._batches_state is not None:
            batches.load_state_dict(self._batches_state)
            self._batches_state = None
        self._train_batches = batches
        return self._loader(ResumableLoader, ConcatPairs(parts), batch_sampler=batches)

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        return self._eval_loaders("test")

    def _eval_loaders(self, split: str) -> Union[DataLoader, list[DataLoader]]:
        loaders = [self._loader(DataLoader, self.datasets[split][name], batch_size=self.hparams.batch_size,
                                sampler=self._eval_sampler(self.datasets[split][name]))
                   for name in self.eval_names(split)]
        return loaders[0] if len(loaders) == 1 else loaders

    def _eval_sampler(self, dataset: PairDataset) -> Optional[DistributedSampler]:
        """Under distributed training each process scores a shard. DistributedSampler pads the shards with
        repeated pairs; every batch carries its pair indices, so the evaluation (PairScores) drops those repeats
        after gathering."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)

    def _loader(self, loader_class: type, dataset: Dataset, **kwargs) -> DataLoader:
        # Each loader gets its own generator: creating an iterator then never draws from the global RNG, so
        # dropout sees the same random stream with or without validation runs and across a resume.
        workers = self.hparams.num_workers
        collate = functools.partial(dataset.collate, batch_layout=self.batch_layout)
        return loader_class(dataset, collate_fn=collate, num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=self._on_cuda(), generator=torch.Generator().manual_seed(self.hparams.seed),
                            **kwargs)

    def _on_cuda(self) -> bool:
        """Whether batches go to a GPU: then they are pinned, so that copying them there does not block."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def state_dict(self) -> dict:
        return {"train_batches": self._train_batches.state_dict()} if self._train_batches else {}

    def load_state_dict(self, state: dict) -> None:
        self._batches_state = state.get("train_batches")

    def _batches_trained(self) -> int:
        return epoch_batches_trained(self.trainer)


def _positive_pairs(source: str, pairs: TokenizedPairs) -> PairDataset:
    """The pairs labelled above 0, for a loss that takes every row as a positive pair (a graded label > 0 counts
    as positive); the rows labelled 0 are counted in the log and the model card."""
    positive = np.flatnonzero(pairs.labels > 0)
    if len(positive) < 2:
        raise PairDataError(f"{source}: a loss with in-batch negatives trains on pairs labelled above 0, and this "
                            f"set has {len(positive)}; it needs at least 2")
    rank_zero_info(f"train: {len(pairs) - len(positive):,} rows labelled 0 left out of {source}: a loss with in-batch "
                   "negatives uses positive pairs only")
    return PairDataset(pairs, positive)


def _retrieval_corpora(retrieval: Union[list[str], dict[str, Optional[str]], None],
                       sources: dict[str, dict[str, str]]) -> dict[str, Optional[str]]:
    """`retrieval` as {set name: corpus file or None}, every name checked against the evaluation sets."""
    corpora = dict(retrieval) if isinstance(retrieval, dict) else dict.fromkeys(retrieval or ())
    known = [*sources["val"], *sources["test"]]
    unknown = [name for name in corpora if name not in known]
    if unknown:
        raise PairDataError(f"retrieval names {unknown}, which are not evaluation sets; they are {known}")
    return corpora


def _guard_applies(sources: dict[str, dict[str, str]]) -> bool:
    """The guard watches what training on other data may cost: it needs training and the user's own validation
    sets (the first stays monitored), and it is redundant when STS-B is already trained or validated on."""
    known = [*sources["train"].values(), *sources["val"].values()]
    return bool(sources["train"] and sources["val"]) and not any(_is_packaged_stsb(source) for source in known)


def _is_packaged_stsb(source: str) -> bool:
    parsed = parse_source(source)
    return isinstance(parsed, FileSource) and parsed.path.parent == builtin_path("stsb/dev").parent


def _row_kind(columns: int) -> str:
    return "pairs" if columns == 2 else f"rows of an anchor, a positive and {columns - 2} negative(s)"


def _set_format(sentence_columns: tuple[str, ...]) -> str:
    """What a model card calls a set: labelled pairs, or n-tuples with k negatives."""
    negatives = sentence_columns[2:]
    if not negatives:
        return "pairs"
    return (f"n-tuple with {len(negatives)} negative(s): {', '.join(sentence_columns[:2])} and "
            f"{', '.join(negatives)}")


def _check_evaluation_set(source: str, pairs: TokenizedPairs) -> None:
    """An evaluation set is scored pair by pair, cosine against label: Pearson and Spearman need at least two
    rows and two distinct labels."""
    if pairs.columns != 2:
        raise PairDataError(f"{source}: an evaluation set is scored pair by pair (cosine against label), and this "
                            f"set has {pairs.columns} sentence columns; give it as sentence_0, sentence_1, label")
    if len(pairs) < 2:
        raise PairDataError(f"{source}: an evaluation set needs at least 2 pairs, got {len(pairs)}")
    if np.all(pairs.labels == pairs.labels[0]):
        raise PairDataError(
            f"{source}: every label equals {float(pairs.labels[0]):g}, so the correlation of cosine with label is "
            "undefined; an evaluation set needs at least two distinct labels"
        )
