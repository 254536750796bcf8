"""Qwen3 (dense): Llama's layout plus per-head q/k RMSNorms and a head_dim that is not hidden / heads.
The whole product on a tiny random Qwen3: every algorithm, exact reload, GGUF read back by
transformers' own GGUF loader, compressed-tensors loaded by transformers."""
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

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


@pytest.fixture(scope="module")
def qwen3_bpe(tmp_path_factory):
    # head_dim 128 as in every released Qwen3 (transformers' GGUF reader takes Qwen3's head_dim from the
    # config default, not from the file's key_length; llama.cpp reads key_length)
    directory = make_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", "qwen3", seed=3, vocab_size=VOCAB,
                                head_dim=128, outlier_channels=0)
    save_byte_level_bpe(directory)
    return directory


@pytest.fixture(scope="module")
def windows(qwen3_bpe):
    return eval_windows(Checkpoint(qwen3_bpe).tokenizer(), tiny_text(3000, seed=7), 64, 4)


def _quantize(source, out, **options):
    calibrate(CalibrateConfig(model=str(source), out=out, num_samples=4, seq_len=32, batch_size=4, **options))
    return out


@pytest.mark.parametrize("options", [dict(scheme="smq_q8i8f16_2"), dict(scheme="w4a16", algorithm="gptq"),
                                     dict(scheme="w4a16", algorithm="awq", group_size=32),
                                     dict(scheme="w4a16", algorithm="hqq", group_size=32)])
def test_every_algorithm_reloads_exactly(qwen3_dir, tmp_path, options):
    _, reloaded = calibrate_and_reload(qwen3_dir, tmp_path / "out", **options)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
    assert reloaded.model.layers[0].self_attn.q_norm.weight.shape == (32,)


def test_gguf_is_read_back_by_transformers(qwen3_bpe, windows, tmp_path):
    source = _quantize(qwen3_bpe, tmp_path / "q", scheme="w4a16", group_size=32, symmetric=True)
    result = export_gguf(source, tmp_path / "qwen3.gguf")
    assert result.summary() == {"exact Q4_0": 14, "float F32": 1}
    reader = GGUFReader(result.out)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["qwen3.attention.key_length"].contents() == 128   # != hidden / heads = 16
    tensors = tensors_by_name(result.out)
    assert tensors["blk.1.attn_q_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert tensors["blk.1.attn_k_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert max_logit_difference(load_gguf(result.out), load_quantized(source, dtype=torch.float32), windows) < 1e-4


def test_compressed_tensors_loads_in_transformers(qwen3_bpe, windows, tmp_path, monkeypatch):
    source = _quantize(qwen3_bpe, tmp_path / "q", scheme="w8a8_dynamic")
    result = export_compressed_tensors(source, tmp_path / "ct")
    model = load_export(result.out)
    reference = load_quantized(source, dtype=torch.float32)
    # the file is exact; only the runtime's dynamic activation scale differs: compute it the consumer's way
    monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert max_logit_difference(model, reference, windows) < 1e-4


def test_cli_calibrate_resume_eval_validate(qwen3_dir, text_file, tmp_path):
    import json

    from quantkit.errors import RunInterrupted
    from quantkit.run.pipeline import Progress

    from conftest import run_cli

    class KillAfterFirstBlock(Progress):
        def block_done(self, index, layers):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(model=str(qwen3_dir), scheme="smq_q8i8f16_2", out=out, num_samples=4, seq_len=32,
                                  batch_size=4), KillAfterFirstBlock())
    result = run_cli("calibrate", qwen3_dir, "--scheme", "smq_q8i8f16_2", "--num-samples", "4", "--seq-len", "32",
                     "--batch-size", "4", "--out", out, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    result = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--max-windows", "2", "--json")
    assert result.exit_code == 0, result.output
    assert [row["label"] for row in json.loads(result.output)["rows"]] == ["reference", "quantized"]
    result = run_cli("validate", out, "--backend", "reference", "--num-samples", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"]
