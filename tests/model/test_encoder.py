"""The plain-torch encoder against transformers' BertModel on a tiny random model, and its strict loading."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from safetensors.torch import load_file, save_file

from minilm_sts.model import cpu_kernels as encoder_module
from minilm_sts.model.bert import BertConfig, BertModel, PackedLayout, PaddedLayout, PaddingPlan
from minilm_sts.model.cpu_kernels import Dropout
from minilm_sts.model.pooling import mean_pool


def load_tiny(folder) -> BertModel:
    encoder = BertModel(BertConfig.from_folder(folder))
    encoder.load_safetensors(folder / "model.safetensors")
    return encoder.eval()


def test_matches_transformers_bert_with_padding(tiny_model_dir):
    import transformers

    tokenizer = transformers.BertTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(["a man is playing the guitar on the street", "dogs run", "a cat"], padding=True,
                      return_tensors="pt")
    reference = transformers.BertModel.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        ours = load_tiny(tiny_model_dir)(batch["input_ids"], PaddedLayout(batch["attention_mask"]))
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5)


def test_strict_loading_names_the_bad_key(tiny_model_dir, tmp_path):
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "extra.safetensors"))
    encoder = BertModel(BertConfig.from_folder(tiny_model_dir))
    with pytest.raises(RuntimeError, match="extra.weight"):
        encoder.load_safetensors(tmp_path / "extra.safetensors")
    del state["encoder.layer.0.attention.self.extra.weight"], state["encoder.layer.1.output.dense.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(RuntimeError, match="encoder.layer.1.output.dense.bias"):
        encoder.load_safetensors(tmp_path / "missing.safetensors")


def test_pooler_weights_are_kept_and_frozen(tiny_model_dir):
    encoder = load_tiny(tiny_model_dir)
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(encoder.state_dict()["pooler.dense.weight"], saved["pooler.dense.weight"])
    assert not encoder.pooler.dense.weight.requires_grad


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="gelu"):
        BertConfig.from_dict({"hidden_act": "gelu_new"})


def test_mean_pool_formula_and_padding_invariance(tiny_model_dir):
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert torch.allclose(mean_pool(hidden, mask), expected, atol=1e-6)
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 4, dtype=torch.long)), torch.zeros(2, 3))  # clamp, no NaN

    encoder = load_tiny(tiny_model_dir)
    ids = torch.tensor([[2, 40, 41, 3, 0, 0, 0]])
    padded = encoder.sentence_embeddings(ids, PaddedLayout((ids != 0).long()))
    alone = encoder.sentence_embeddings(ids[:, :4], PaddedLayout(torch.ones(1, 4, dtype=torch.long)))
    assert torch.allclose(padded, alone, atol=1e-5)


def test_packed_layout_matches_padded_in_train_mode_gradients(tiny_model_dir):
    """Same embeddings and the same gradients from packed and padded batches (dropout off)."""
    encoder = load_tiny(tiny_model_dir)
    lengths = torch.tensor([5, 2, 7, 3])
    ids = torch.randint(5, 60, (4, 7))
    mask = (torch.arange(7) < lengths[:, None]).long()
    padded = encoder.sentence_embeddings(ids * mask, PaddedLayout(mask))
    padded.square().sum().backward()
    padded_grads = [p.grad.clone() for p in encoder.parameters() if p.grad is not None]
    encoder.zero_grad()
    packed = encoder.sentence_embeddings(ids[mask.bool()], PackedLayout(lengths))
    packed.square().sum().backward()
    assert torch.allclose(packed, padded, atol=1e-5)
    for a, b in zip(padded_grads, (p.grad for p in encoder.parameters() if p.grad is not None)):
        assert torch.allclose(a, b, atol=1e-5)


def test_packed_groups_of_equal_length_skip_padding_and_match_padded(tiny_model_dir):
    """With groups of 2, the sorted lengths 2 3 | 5 5 | 5 5 | 6 7 give two ragged groups and two that need
    no padding or mask; all four must equal the padded batch."""
    encoder = load_tiny(tiny_model_dir).eval()
    lengths = torch.tensor([5, 5, 5, 5, 2, 7, 3, 6])
    ids = torch.randint(5, 60, (8, 7))
    mask = (torch.arange(7) < lengths[:, None]).long()
    layout = PackedLayout(lengths, group_size=2)
    assert [padding is None for *_, padding in layout.groups] == [False, True, True, False]
    packed = encoder.sentence_embeddings(ids[mask.bool()], layout)
    padded = encoder.sentence_embeddings(ids * mask, PaddedLayout(mask))
    assert torch.allclose(packed, padded, atol=1e-5)
    # What Lightning does to a batch's layout: a moved copy (to the same CPU here), the original untouched.
    moved = move_data_to_device({"layout": layout}, torch.device("cpu"))["layout"]
    assert isinstance(moved, PackedLayout) and moved is not layout and moved.groups == layout.groups
    assert torch.equal(encoder.sentence_embeddings(ids[mask.bool()], moved), packed)


def test_inference_linear_takes_onednn_and_matches_the_autograd_path(tiny_model_dir):
    """Gradient-free CPU forwards use oneDNN's product; embeddings equal the training path's to 1e-5."""
    assert encoder_module.ONEDNN_LINEAR  # the CPU torch this project pins is built with oneDNN
    encoder = load_tiny(tiny_model_dir).eval()
    lengths = torch.tensor([3, 6, 4])
    ids = torch.randint(5, 60, (int(lengths.sum()),))
    with torch.no_grad(), torch.profiler.profile() as profile:
        fast = encoder.sentence_embeddings(ids, PackedLayout(lengths))
    assert "mkldnn::_linear_pointwise" in {event.key for event in profile.key_averages()}
    default = encoder.sentence_embeddings(ids, PackedLayout(lengths))
    assert default.requires_grad and not fast.requires_grad
    assert torch.allclose(fast, default, atol=1e-5)
    linear = encoder_module.Linear(8, 5)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        assert torch.allclose(linear(x), F.linear(x, linear.weight, linear.bias), atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's cast wins over the fp32 fast path
            assert linear(x).dtype == torch.bfloat16


def test_a_padding_plan_keeps_each_sentence_in_its_row_rounds_the_width_up_and_moves_with_its_batch():
    ids, lengths = torch.tensor([7, 8, 9, 4, 5]), torch.tensor([3, 2])
    padded, mask = PaddingPlan(lengths, 4).pad(ids)
    assert padded.tolist() == [[7, 8, 9, 0], [4, 5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert PaddingPlan(lengths, 16).pad(ids)[0].shape == (2, 16)
    assert PaddingPlan(lengths).pad(ids)[0].shape == (2, 3)
    moved = PaddingPlan(lengths, 4).to("meta")  # as Lightning moves a batch; the host copy stays where it was
    assert moved.slots.is_meta and moved.attention_mask.is_meta


def test_cpu_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales_it():
    torch.manual_seed(0)
    dropout, x = Dropout(0.1), torch.randn(1000, 384, requires_grad=True)
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 384,000 draws: the standard error is 0.0005
    torch.testing.assert_close(out[kept], x[kept] / 0.9)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert abs((dropout(x.bfloat16()) != 0).float().mean().item() - 0.9) < 0.003
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))  # torch's own kernel at p = 1
