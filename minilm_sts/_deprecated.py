"""The import paths and names of the flat layout (up to the move into subpackages), kept working until 0.3 with a
DeprecationWarning that names the new place: `from minilm_sts.embedder import SentenceEncoder`,
`minilm_sts.SentenceEmbedder`, `from minilm_sts.evaluation import DuplicateRetrieval` and the like.

One table says where each old module's names live now. An old module that became a package (`evaluation`,
`cli`) forwards its old names through the package's `__getattr__`; the others are served by a finder on
`sys.meta_path`, which only sees names that no real module answers."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

REMOVED_IN = "0.3"
OLD_MODULES = {
    "batching": ("data.batching",),
    "callbacks": ("cli.callbacks", "training.callbacks.checkpoints"),
    "card": ("serving.model_card",),
    "cli": ("cli.commands", "cli.lightning_cli"),
    "compat": ("_compat",),
    "datamodule": ("data.pair_data_module", "data.pair_datasets"),
    "embedder": ("model.sentence_encoder", "model.tokenization"),
    "encoder": ("model.bert", "model.cpu_kernels"),
    "evaluation": ("evaluation.pair_scores", "evaluation.binary", "evaluation.retrieval"),
    "export": ("serving.export",),
    "host_memory": ("training.host_memory",),
    "loading": ("serving.loading", "model.checkpoint"),
    "losses": ("training.losses",),
    "module": ("training.sentence_encoder_training", "model.checkpoint"),
    "module_callbacks": ("training.callbacks.evaluation", "training.callbacks.run_record", "training.callbacks.resume",
                         "training.callbacks.checkpoints", "training.callbacks.mixed_precision", "model.checkpoint"),
    "pairs": ("data.pairs",),
    "plots": ("cli.plots",),
    "predict": ("serving.predict",),
    "pretrained": ("model.pretrained",),
    "run_folder": ("training.run_folder",),
    "similarity": ("model.pooling", "evaluation.correlations"),
    "sources": ("data.sources", "errors"),
    "stackexchange": ("data.stackexchange", "errors"),
    "tokenized": ("data.token_cache", "model.tokenization"),
    "tracking": ("cli.tracking",),
}
# An old module that is a package now answers only the names it defined itself: tools such as jsonargparse probe
# a package for shorter paths to its submodules' classes, and must not find them there.
OWN_NAMES = {
    "cli": {"DEFAULT_RECIPE", "OWN_RECIPE_OPTIONS", "SUBCOMMANDS", "TRAINER_DEFAULTS", "USER_ERROR_EXIT", "MiniLMCLI",
            "checkpoint_filename", "closing_summary", "export_command", "given", "newest_last_checkpoint",
            "not_a_cloud_tip", "quiet_known_noise", "run_command", "settle_training_length", "uses_embedded_recipe"},
}
RENAMED = {"SentenceEmbedder": "SentenceEncoderTraining", "embedder_state_dict": "encoder_state_dict"}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and goes in minilm_sts {REMOVED_IN}: use {new}", DeprecationWarning,
                  stacklevel=3)


def _lookup(old_module: str, name: str):
    """`name` of the old module `old_module`, from wherever it lives now (None when it never was there)."""
    for place in OLD_MODULES[old_module]:
        module = importlib.import_module(f"minilm_sts.{place}")
        new_name = RENAMED.get(name, name)
        if hasattr(module, new_name):
            return module, new_name
    return None


def module_getattr(old_module: str):
    """A module `__getattr__` that serves `old_module`'s names of the flat layout, with a warning."""
    def __getattr__(name: str):
        owned = OWN_NAMES.get(old_module)
        found = (None if name.startswith("__") or (owned is not None and name not in owned)
                 else _lookup(old_module, name))
        if found is None:
            raise AttributeError(f"module 'minilm_sts.{old_module}' has no attribute {name!r}")
        module, new_name = found
        _warn(f"minilm_sts.{old_module}.{name}", f"{module.__name__}.{new_name}")
        return getattr(module, new_name)

    return __getattr__


def package_getattr(name: str):
    """`minilm_sts.SentenceEmbedder`, the LightningModule's name of the flat layout."""
    if name in RENAMED:
        import minilm_sts

        _warn(f"minilm_sts.{name}", f"minilm_sts.{RENAMED[name]}")
        return getattr(minilm_sts, RENAMED[name])
    raise AttributeError(f"module 'minilm_sts' has no attribute {name!r}")


class _FlatLayoutFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `minilm_sts.<old module>` as a module whose names are served by `module_getattr`."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package == "minilm_sts" and old in OLD_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = module_getattr(spec.name.partition(".")[2])
        return module

    def exec_module(self, module) -> None:
        places = ", ".join(f"minilm_sts.{place}" for place in OLD_MODULES[module.__name__.partition(".")[2]])
        warnings.warn(f"{module.__name__} is deprecated and goes in minilm_sts {REMOVED_IN}: import from {places}",
                      DeprecationWarning, stacklevel=2)


def install() -> None:
    """Put the finder last on sys.meta_path (once): real modules always answer first."""
    if not any(isinstance(finder, _FlatLayoutFinder) for finder in sys.meta_path):
        sys.meta_path.append(_FlatLayoutFinder())
