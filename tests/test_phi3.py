"""Phi-3: fused qkv_proj and gate_up_proj (one Linear, several logical outputs). The whole product on a
tiny random Phi-3: smoothing keeps the float function, every scheme and algorithm reloads exactly, the
GGUF file (llama.cpp's phi3: fused attn_qkv and ffn_up) is read back by transformers, compressed-tensors
loads in transformers."""
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.check.evaluate import eval_windows
from quantkit.exporters.compressed_tensors import export_compressed_tensors
from quantkit.exporters.gguf import export_gguf
from quantkit.formats import primitives
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.qlinear import QuantLinear
from quantkit.run.pipeline import CalibrateConfig, calibrate

from conftest import calibrate_and_reload, make_checkpoint, tiny_text
from test_export_compressed_tensors import consumer_fake_quantize, load_export
from test_export_gguf import VOCAB, load_gguf, max_logit_difference, save_byte_level_bpe, tensors_by_name
from test_smoothquant import _smooth_all_blocks


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("phi3") / "model", "phi3", seed=4)


@pytest.fixture(scope="module")
def phi3_bpe(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("phi3bpe") / "model", "phi3", seed=4, vocab_size=VOCAB,
                                outlier_channels=0)
    save_byte_level_bpe(directory)
    return directory


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_the_fused_linears_preserves_logits(phi3_dir, alpha):
    model = AutoModelForCausalLM.from_pretrained(phi3_dir, dtype=torch.float64).eval()
    inputs = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(inputs).logits
    arch = _smooth_all_blocks(model, alpha, inputs)
    assert [g.consumers for g in arch.smooth] == [("self_attn.qkv_proj",), ("mlp.gate_up_proj",)]
    with torch.no_grad():
        after = model(inputs).logits
    assert torch.allclose(before, after, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [dict(scheme="smq_q8i8f16_2"), dict(scheme="w8a8_dynamic"),
                                     dict(scheme="w4a16", algorithm="gptq", group_size=32),
                                     dict(scheme="w4a16", algorithm="awq", group_size=32),
                                     dict(scheme="w4a16", algorithm="hqq", group_size=32)])
def test_every_scheme_and_algorithm_reloads_exactly(phi3_dir, tmp_path, options):
    _, reloaded = calibrate_and_reload(phi3_dir, tmp_path / "out", **options)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 8      # 4 Linears x 2 blocks
    assert reloaded.model.layers[0].self_attn.qkv_proj.out_features == 128       # q 64 + k 32 + v 32


def test_gguf_is_read_back_by_transformers(phi3_bpe, tmp_path):
    source = tmp_path / "q"
    calibrate(CalibrateConfig(model=str(phi3_bpe), out=source, scheme="w4a16", group_size=32, symmetric=True,
                              num_samples=4, seq_len=32, batch_size=4))
    result = export_gguf(source, tmp_path / "phi3.gguf")
    assert result.summary() == {"exact Q4_0": 8, "float F32": 1}
    assert GGUFReader(result.out).fields["general.architecture"].contents() == "phi3"
    tensors = tensors_by_name(result.out)
    assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (64, 128)     # gguf lists [columns, rows]
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, 320)       # gate and up rows, fused
    windows = eval_windows(Checkpoint(phi3_bpe).tokenizer(), tiny_text(3000, seed=7), 64, 4)
    assert max_logit_difference(load_gguf(result.out), load_quantized(source, dtype=torch.float32), windows) < 1e-4


def test_compressed_tensors_loads_in_transformers(phi3_bpe, tmp_path, monkeypatch):
    source = tmp_path / "q"
    calibrate(CalibrateConfig(model=str(phi3_bpe), out=source, scheme="w8a8_dynamic", num_samples=4, seq_len=32,
                              batch_size=4))
    model = load_export(export_compressed_tensors(source, tmp_path / "ct").out)
    reference = load_quantized(source, dtype=torch.float32)
    windows = eval_windows(Checkpoint(phi3_bpe).tokenizer(), tiny_text(3000, seed=7), 64, 4)
    monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert max_logit_difference(model, reference, windows) < 1e-4
