"""The final norm's gain fitted to the float model's next-token distributions (`quantkit.run.final_norm`)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quantkit.model.head import OutputHead
from quantkit.native.manifest import Manifest
from quantkit.run import final_norm


def _head(norm: nn.Module, hidden: int = 16, vocab: int = 96, seed: int = 0) -> OutputHead:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=generator) + 0.5)
    lm_head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(vocab, hidden, generator=generator))
    return OutputHead(norm, lm_head)


def _kl(head: OutputHead, floats: torch.Tensor, quantized: torch.Tensor, weight: torch.Tensor) -> float:
    """KL(float || quantized) per token with the norm module's weight set to ``weight``: torch's kl_div, the
    head's log_probs on its own module (not the fit's substituted weight)."""
    with torch.no_grad():
        reference = head.log_probs(floats)
        source = head.norm.weight.clone()
        head.norm.weight.copy_(weight)
        changed = head.log_probs(quantized)
        head.norm.weight.copy_(source)
    return F.kl_div(changed, reference, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("norm, offset", [(LlamaRMSNorm(16), 0.0), (Gemma3RMSNorm(16), 1.0)])
def test_the_fit_takes_back_a_per_channel_scale(norm, offset):
    head = _head(norm)
    generator = torch.Generator().manual_seed(1)
    floats = torch.randn(1500, 16, generator=generator)
    quantized = floats * (1 + 0.3 * torch.randn(16, generator=generator)).abs() \
        + 0.01 * torch.randn(1500, 16, generator=generator)
    fit = final_norm.fit_final_norm(head, quantized, floats, offset, steps=200)
    before = _kl(head, floats, quantized, head.norm.weight)
    after = _kl(head, floats, quantized, fit.weight)
    assert fit.kept and after < 0.3 * before
    # the recorded KLs are the measured ones (1500 tokens < MEASURED_TOKENS: all of them)
    assert fit.kl_before == pytest.approx(before, rel=1e-4) and fit.kl_after == pytest.approx(after, rel=1e-4)


def test_identical_streams_keep_the_source_norm():
    head = _head(LlamaRMSNorm(16))
    floats = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    fit = final_norm.fit_final_norm(head, floats.clone(), floats, 0.0, steps=10)
    assert not fit.kept and fit.kl_before == pytest.approx(0.0, abs=1e-7)
    assert torch.equal(fit.weight, head.norm.weight)


def test_the_sample_takes_the_same_rows_of_every_stream():
    calls = [torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3) + 100 * i for i in range(3)]
    rows = final_norm.sample_tokens(30, 7, seed=0)
    assert len(rows) == 7 and rows == sorted(set(rows))
    flat = torch.cat([c.reshape(-1, 3) for c in calls])
    assert torch.equal(final_norm.gather_tokens(iter(calls), rows, 30), flat[rows])
    assert final_norm.sample_tokens(30, 30, seed=0) is None
    assert torch.equal(final_norm.gather_tokens(calls, None, 30), flat)


COMMON = ["--scheme", "w4a16", "--group-size", "32", "--num-samples", "8", "--seq-len", "32", "--batch-size", "4"]


def _norm_weights(out, source):
    ours = load_file(out / "model.safetensors")["model.norm.weight"]
    theirs = load_file(source / "model.safetensors")["model.norm.weight"]
    return ours, theirs


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    from test_export_gguf import trained_bpe_llama

    return trained_bpe_llama(tmp_path_factory)


def test_signround_fits_the_final_norm_and_the_exports_carry_it(llama_bpe, tmp_path):
    import gguf

    from quantkit.exporters.gguf import export_gguf

    result = run_cli("calibrate", llama_bpe, *COMMON, "--sym", "--algo", "signround", "--algo-option", "iters=4",
                     "--out", tmp_path / "sr", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)["final_norm"]
    assert record == Manifest.load(tmp_path / "sr").summary.final_norm
    assert record["kept"] and record["kl_after"] < record["kl_before"] and record["tokens"] == 8 * 32
    ours, theirs = _norm_weights(tmp_path / "sr", llama_bpe)
    assert not torch.equal(ours, theirs)
    exported = export_gguf(tmp_path / "sr", tmp_path / "sr.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(exported.out).tensors}
    assert torch.equal(torch.from_numpy(tensors["output_norm.weight"].data.copy()).float(), ours.float())
    from quantkit.exporters.compressed_tensors import export_compressed_tensors

    exported = export_compressed_tensors(tmp_path / "sr", tmp_path / "ct")
    assert torch.equal(load_file(exported.out / "model.safetensors")["model.norm.weight"], ours)


def test_off_by_flag_and_by_default_without_signround(llama_dir, tmp_path):
    for name, flags in [("off", ["--algo", "signround", "--algo-option", "iters=2", "--no-fit-final-norm"]),
                        ("gptq", ["--algo", "gptq"])]:
        result = run_cli("calibrate", llama_dir, *COMMON, *flags, "--out", tmp_path / name, "--json")
        assert result.exit_code == 0, result.output
        assert "final_norm" not in json.loads(result.output)
        assert Manifest.load(tmp_path / name).summary.final_norm is None
        assert torch.equal(*_norm_weights(tmp_path / name, llama_dir))


def test_asked_for_with_gptq_it_keeps_the_float_stream(llama_dir, tmp_path):
    result = run_cli("calibrate", llama_dir, *COMMON, "--algo", "gptq", "--fit-final-norm", "--out", tmp_path / "g",
                     "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)["final_norm"]
    assert record["kept"] == (record["kl_after"] < record["kl_before"])
    ours, theirs = _norm_weights(tmp_path / "g", llama_dir)
    assert torch.equal(ours, theirs) != record["kept"]


@pytest.mark.parametrize("family", ["gemma2_dir", "gemma3_dir"])   # Gemma 2: through the logit soft-capping too
def test_gemma_norms_fit_through_their_offset(family, tmp_path, request):
    source = request.getfixturevalue(family)
    result = run_cli("calibrate", source, *COMMON, "--algo", "signround", "--algo-option", "iters=2",
                     "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)["final_norm"]
    assert record["kept"] and record["kl_after"] < record["kl_before"]


def test_bad_combinations_are_one_line(llama_dir, tmp_path):
    assert_one_line_error(run_cli("calibrate", llama_dir, *COMMON, "--algo", "gptq", "--fit-final-norm",
                                  "--propagate", "float", "--out", tmp_path / "x"), "drop --propagate float")
    assert_one_line_error(run_cli("calibrate", llama_dir, "--scheme", "w4a16", "--seq-len", "32", "--fit-final-norm",
                                  "--out", tmp_path / "y"), "needs calibration data")
