"""ONNX export and the onnx backend: the files sentence-transformers' backends look for, parity with PyTorch on the
real weights (checked at export and written in the card), load(backend="onnx") and predict --backend onnx,
refusals in one line, an export without the extra unchanged, and a real client: sentence-transformers' own ONNX
backend, in an environment of its own (scripts/st_onnx_client.py), loads the folder and gives our embeddings."""

import json
import sys

import numpy as np
import onnxruntime
import pytest
import torch

import minilm_sts
from minilm_sts.cli.commands import main
from minilm_sts.data.pairs import read_pairs
from minilm_sts.serving import onnx_export
from minilm_sts.serving.export import export_with_card
from minilm_sts.serving.onnx_encoder import OnnxEncoder
from minilm_sts.serving.onnx_export import FP32_FILE, quantization_arch

from helpers import ROOT

INT8_FILE = f"onnx/model_qint8_{quantization_arch()}.onnx"
SENTENCES = read_pairs("builtin:stsb/dev").sentences_a[:96]
TINY_SENTENCES = ["a man is playing the guitar", "a dog runs", "children eat food in the street with a ball"]


@pytest.fixture(scope="module")
def real_export(real_model_dir, tmp_path_factory):
    """The base model exported with both ONNX files, as the command line does it."""
    out = tmp_path_factory.mktemp("onnx") / "model"
    main(["export", str(real_model_dir), str(out), "--onnx-int8"])
    return out


@pytest.fixture(scope="module")
def tiny_export(tiny_model_dir, tmp_path_factory):
    return export_with_card(tiny_model_dir, tmp_path_factory.mktemp("tiny-onnx") / "model", onnx=True)


def test_the_graph_has_the_transformer_inputs_and_output_with_dynamic_axes(tiny_export):
    session = onnxruntime.InferenceSession(str(tiny_export / FP32_FILE), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(isinstance(axis, str) for shape in inputs.values() for axis in shape)  # batch and sequence
    (output,) = session.get_outputs()
    assert output.name == "last_hidden_state" and output.shape[2] == 32 and isinstance(output.shape[1], str)
    assert not (tiny_export / INT8_FILE).exists()


def test_the_onnx_backend_encodes_as_pytorch_does(tiny_export):
    torch_model, onnx_model = minilm_sts.load(tiny_export), minilm_sts.load(tiny_export, backend="onnx")
    assert isinstance(onnx_model, OnnxEncoder)
    for batch_size in (1, 2, 32):
        got = onnx_model.encode(TINY_SENTENCES, batch_size=batch_size)
        assert (got - torch_model.encode(TINY_SENTENCES)).abs().max() <= 1e-5, batch_size
    raw = onnx_model.encode(TINY_SENTENCES, normalize=False)
    assert (raw - torch_model.encode(TINY_SENTENCES, normalize=False)).abs().max() <= 1e-5
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    similarity = onnx_model.similarity(got[:1], got)
    assert similarity.shape == (1, 3) and similarity[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert onnx_model.encode([]).shape == (0, 32)


def test_the_card_states_the_parity_of_each_file(tiny_export):
    card = (tiny_export / "README.md").read_text()
    assert "## Deployment" in card and "Mean pooling and normalisation are not in the graph" in card
    assert f"| onnx | `{FP32_FILE}` |" in card and "| pytorch | `model.safetensors` |" in card


@pytest.mark.slow
@pytest.mark.parity
def test_real_weights_export_within_tolerance_and_int8_close(real_export):
    """Targets: fp32 within 1e-4 of PyTorch; int8 STS-B test Spearman within 0.005 of fp32, at most 30% of the
    fp32 file. (What sentence-transformers' own backend gives is test_onnx_client.py's.)"""
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            (real_export / "README.md").read_text().splitlines() if line.startswith("| onnx") or
            line.startswith("| pytorch")}
    fp32_diff, int8_spearman = float(rows["onnx"][3]), float(rows["onnx int8"][5].strip(" |"))
    assert fp32_diff <= 1e-4 and abs(int8_spearman - float(rows["pytorch"][5].strip(" |"))) <= 0.005
    assert (real_export / INT8_FILE).stat().st_size <= 0.3 * (real_export / FP32_FILE).stat().st_size
    torch_model = minilm_sts.load(real_export)
    expected = torch_model.encode(SENTENCES)
    assert (minilm_sts.load(real_export, backend="onnx").encode(SENTENCES) - expected).abs().max() <= 1e-4
    int8 = minilm_sts.load(real_export, backend="onnx", file_name=INT8_FILE).encode(SENTENCES)
    cosine = torch.nn.functional.cosine_similarity(int8, expected)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.95


@pytest.mark.slow
@pytest.mark.parity
def test_sentence_transformers_onnx_backend_gives_our_embeddings(real_export, tmp_path, monkeypatch):
    """sentence-transformers 5.7 with optimum-onnx and transformers 4.57 (the versions pip gives its onnx extra)
    loads both files by `model_kwargs={"file_name": ...}`: fp32 within 1e-4 of our PyTorch embeddings, int8 at a
    mean cosine of 0.99 or more (its worst sentence is lower: about 0.96 on STS-B test, docs/benchmarks.md)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import st_onnx_client

    sentences = read_pairs("builtin:stsb/test").sentences_a
    client = st_onnx_client.encode(real_export, [FP32_FILE, INT8_FILE], sentences, tmp_path)
    assert client["versions"]["sentence-transformers"] == "5.7.0" and client["versions"]["transformers"] == "4.57.6"
    expected = minilm_sts.load(real_export).encode(sentences)
    assert np.abs(client["embeddings"][FP32_FILE] - expected.numpy()).max() <= 1e-4
    int8 = torch.from_numpy(client["embeddings"][INT8_FILE])
    cosine = torch.nn.functional.cosine_similarity(int8, expected)
    assert cosine.mean() >= 0.99 and cosine.min() >= 0.95


@pytest.mark.slow
def test_predict_with_the_onnx_backend(real_export, tmp_path):
    source = tmp_path / "sentences.txt"
    source.write_text("\n".join(SENTENCES[:10]) + "\n")
    main(["predict", str(real_export), str(source), "-o", str(tmp_path / "onnx.npy"), "--backend", "onnx"])
    main(["predict", str(real_export), str(source), "-o", str(tmp_path / "torch.npy")])
    assert np.abs(np.load(tmp_path / "onnx.npy") - np.load(tmp_path / "torch.npy")).max() <= 1e-4


def test_an_export_off_by_more_than_the_tolerance_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "FP32_TOLERANCE", 0.0)  # any rounding at all is now too much
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tiny_model_dir), str(tmp_path / "out"), "--onnx"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("error: the exported onnx/model.onnx differs from PyTorch")
    assert "\n" not in error and not (tmp_path / "out").exists()


def block_imports(monkeypatch, *names):
    """Make `import name` fail, as it does where the onnx extra is not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_the_extra_onnx_is_one_error_line_and_the_pytorch_export_is_unchanged(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    main(["export", str(tiny_model_dir), str(tmp_path / "with-extra")])
    block_imports(monkeypatch, "onnx", "onnxruntime", "onnxscript")
    main(["export", str(tiny_model_dir), str(tmp_path / "without")])
    files = sorted(p.relative_to(tmp_path / "without") for p in (tmp_path / "without").rglob("*"))
    assert files == sorted(p.relative_to(tmp_path / "with-extra") for p in (tmp_path / "with-extra").rglob("*"))
    for name in files:
        if (tmp_path / "without" / name).is_file():
            assert (tmp_path / "without" / name).read_bytes() == (tmp_path / "with-extra" / name).read_bytes(), name
    capsys.readouterr()
    for command in (["export", str(tiny_model_dir), str(tmp_path / "onnx"), "--onnx"],
                    ["predict", str(tmp_path / "without"), "x.txt", "-o", "x.npy", "--backend", "onnx"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        error = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "\n" not in error
        assert error.startswith("error: the ONNX export and backend need onnx") and "minilm-sts[onnx]" in error
    assert not (tmp_path / "onnx").exists()


def test_bad_backend_requests_are_refused_clearly(tiny_export, tmp_path):
    with pytest.raises(ValueError, match="backend 'tensorrt' is not one of torch, onnx"):
        minilm_sts.load(tiny_export, backend="tensorrt")
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        minilm_sts.load(tiny_export, backend="onnx", file_name="model_qint8_arm64.onnx")
    with pytest.raises(ValueError, match="runs on the CPU"):
        minilm_sts.load(tiny_export, map_location="cuda", backend="onnx")
    assert json.loads((tiny_export / "sentence_bert_config.json").read_text())["max_seq_length"] == \
        minilm_sts.load(tiny_export, backend="onnx").max_seq_length
