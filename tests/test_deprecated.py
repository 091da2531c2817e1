"""The flat layout's import paths and names keep working until 0.3, each with a DeprecationWarning that names the
new place, and give the very objects of the new layout."""

import importlib
import sys

import pytest

import minilm_sts
from minilm_sts._deprecated import OLD_MODULES
from minilm_sts.evaluation.retrieval import DuplicateRetrieval
from minilm_sts.model.checkpoint import encoder_state_dict
from minilm_sts.model.sentence_encoder import SentenceEncoder
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining


def old_import(module: str, name: str):
    sys.modules.pop(f"minilm_sts.{module}", None)
    with pytest.warns(DeprecationWarning, match=r"goes in minilm_sts 0\.3"):
        return getattr(importlib.import_module(f"minilm_sts.{module}"), name)


@pytest.mark.parametrize("module, name, new", [
    ("embedder", "SentenceEncoder", SentenceEncoder),
    ("module", "SentenceEmbedder", SentenceEncoderTraining),
    ("module", "embedder_state_dict", encoder_state_dict),
    ("evaluation", "DuplicateRetrieval", DuplicateRetrieval),
])
def test_an_old_import_path_gives_the_new_object_with_a_warning(module, name, new):
    assert old_import(module, name) is new


@pytest.mark.parametrize("module", sorted(OLD_MODULES))
def test_every_old_module_still_imports(module):
    places = [importlib.import_module(f"minilm_sts.{place}") for place in OLD_MODULES[module]]
    public = next(name for place in places for name in vars(place) if not name.startswith("_")
                  and getattr(getattr(place, name), "__module__", None) == place.__name__)
    assert old_import(module, public) is getattr(next(p for p in places if hasattr(p, public)), public)


def test_the_old_class_name_and_attribute(tiny_model_dir):
    with pytest.warns(DeprecationWarning, match="SentenceEncoderTraining"):
        assert minilm_sts.SentenceEmbedder is SentenceEncoderTraining
    model = SentenceEncoderTraining(pretrained=str(tiny_model_dir))
    with pytest.warns(DeprecationWarning, match=r"\.sentence_encoder"):
        assert model.embedder is model.sentence_encoder


def test_a_name_the_old_module_never_had_is_an_attribute_error():
    with pytest.raises(AttributeError):
        old_import("embedder", "no_such_name")


def test_jsonargparse_finds_no_short_path_through_an_old_package():
    """jsonargparse probes a package for its submodules' classes: the old `cli` answers only its own names."""
    import minilm_sts.cli

    assert not hasattr(minilm_sts.cli, "WandbRunLogger")
