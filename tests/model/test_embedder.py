"""SentenceEncoder: encode (order, normalisation, threads, autocast), the compiled path, the saved folder, and
that it runs where Lightning cannot be imported."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minilm_sts.model.sentence_encoder as sentence_encoder
from minilm_sts.errors import UserInputError
from minilm_sts.model.sentence_encoder import SentenceEncoder

SENTENCES = ["a dog", "a man is playing the guitar on the street with a child", "cats", "the woman eats food"]


def test_encode_returns_input_order_and_unit_norm(tiny_model_dir):
    model = SentenceEncoder.from_pretrained(tiny_model_dir)
    together = model.encode(SENTENCES, batch_size=2)
    one_by_one = torch.cat([model.encode([s]) for s in SENTENCES])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(4), atol=1e-6)
    assert not torch.allclose(model.encode(SENTENCES, normalize=False).norm(dim=1), torch.ones(4))
    with pytest.raises(TypeError, match="list of sentences"):
        model.encode("a dog")


@pytest.mark.slow
def test_compiled_padded_path_matches_the_packed_path_and_reuses_its_graphs(tiny_model_dir):
    """`compile=True` gives the packed path's embeddings and gradients, and batches of new widths and sizes
    reuse the compiled code: a static graph, then one dynamic in width, then one dynamic in batch size."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = SentenceEncoder.from_pretrained(tiny_model_dir).eval()  # eval: no dropout, gradients still on
    compiled = SentenceEncoder.from_pretrained(tiny_model_dir, compile=True).eval()
    generator = torch.Generator().manual_seed(0)
    for index, (batch, longest) in enumerate([(6, 5), (6, 17), (4, 40), (6, 30), (3, 12)]):
        lengths = torch.randint(2, longest + 1, (batch,), generator=generator)
        lengths[0] = longest
        ids = torch.randint(5, 40, (int(lengths.sum()),), generator=generator)
        warns_once = pytest.warns(UserWarning, match="meant for GPUs") if index == 0 else contextlib.nullcontext()
        with warns_once:  # the CPU warning comes with the first compilation
            got = compiled(ids, lengths)
        expected = eager(ids, lengths)
        assert torch.allclose(got, expected, atol=1e-5)
        expected.square().sum().backward()
        got.square().sum().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None and not name.endswith("key.bias"):  # key-bias gradients are exactly 0 in theory
                assert torch.allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6 * a.grad.abs().max()), name
        eager.zero_grad()
        compiled.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
    with torch.no_grad():  # validation and encode compile a gradient-free graph of their own
        assert torch.allclose(compiled(ids, lengths), eager(ids, lengths), atol=1e-5)


def test_encode_runs_batches_side_by_side_on_cpu_threads_with_the_same_result(tiny_model_dir, monkeypatch):
    pools = []

    class RecordingPool(sentence_encoder.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self._max_workers)

    monkeypatch.setattr(sentence_encoder, "ThreadPoolExecutor", RecordingPool)
    model = SentenceEncoder.from_pretrained(tiny_model_dir)
    sentences = [" ".join(["dog", "runs", "on", "the", "street"][: 1 + i % 5]) + f" {i}" for i in range(30)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        side_by_side = model.encode(sentences, batch_size=4)
        assert pools == [2] and torch.get_num_threads() == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's autocast reaches the worker threads
            in_bf16 = model.encode(sentences, batch_size=4)
        assert pools == [2, 2]
        torch.set_num_threads(1)
        one_at_a_time = model.encode(sentences, batch_size=4)
        assert pools == [2, 2]  # one thread: no pool
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(side_by_side, one_at_a_time, atol=1e-6)
    assert not torch.allclose(in_bf16, side_by_side, atol=1e-4) and torch.allclose(in_bf16, side_by_side, atol=0.05)


def test_saved_folder_loads_back_with_its_max_length_and_the_same_embeddings(tiny_model_dir, tmp_path):
    model = SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=5)
    assert model.tokenize(SENTENCES)["lengths"].max() == 5
    (tmp_path / "saved").mkdir()
    model.save(tmp_path / "saved")
    loaded = SentenceEncoder.from_pretrained(tmp_path / "saved")
    assert loaded.max_seq_length == 5
    assert torch.allclose(loaded.encode(SENTENCES), model.encode(SENTENCES), atol=1e-6)
    assert SentenceEncoder.from_pretrained(tiny_model_dir).max_seq_length == 128  # a folder that does not say


def test_similarity_is_the_cosine_matrix():
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [6.0, 8.0], [-1.0, 0.0]])
    expected = torch.tensor([[0.8, 1.0, -0.6], [0.0, 0.6, -1.0]])
    assert torch.allclose(SentenceEncoder.similarity(a, b), expected, atol=1e-6)


def test_max_length_beyond_the_position_embeddings_is_refused(tiny_model_dir):
    with pytest.raises(UserInputError, match="max_seq_length 129 exceeds the model's 128 position embeddings"):
        SentenceEncoder.from_pretrained(tiny_model_dir, max_seq_length=129)


WITHOUT_LIGHTNING = """
import importlib.abc, sys, types

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(name + " is not installed here")

sys.meta_path.insert(0, Refuse())
package = types.ModuleType("minilm_sts")  # the package without its __init__, which imports the training side
package.__path__ = [{package!r}]
sys.modules["minilm_sts"] = package
from minilm_sts.model.sentence_encoder import SentenceEncoder

print(tuple(SentenceEncoder.from_pretrained({model!r}).encode(["a dog", "a cat"]).shape))
"""


def test_encoder_runs_where_lightning_cannot_be_imported(tiny_model_dir):
    package = str(Path(sentence_encoder.__file__).parents[1])
    script = WITHOUT_LIGHTNING.format(package=package, model=str(tiny_model_dir))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(2, 32)"
