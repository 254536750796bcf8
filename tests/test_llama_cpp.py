"""Our GGUF files in llama.cpp itself (llama-cpp-python), family by family: llama.cpp's logits on the
same token ids agree with quantkit's reloaded model. Skipped where llama-cpp-python is not installed
(it builds llama.cpp from source; CI does not wait for that).

llama.cpp's CPU path rounds activations to 8 bits for its quantized dot products, so the agreement is
close, not exact: top-1 agreement and a small KL, against files written without llama's rotary
permutation or with Gemma's norms as w instead of 1 + w as the failing cases."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint

from quantkit import load_quantized
from quantkit.exporters.gguf import export_gguf
from quantkit.run.pipeline import CalibrateConfig, calibrate

pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import llama_cpp_logits, next_token_agreement  # noqa: E402

CASES = {
    "llama": dict(),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}, tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),
    "phi3": dict(),
    "gemma2": dict(head_dim=32, query_pre_attn_scalar=32, tie_word_embeddings=True),
    # not llama.cpp's default pattern (5 sliding, 1 full): the file's per-layer pattern must be honoured
    "gemma3": dict(head_dim=32, query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": dict(),
    "qwen2_moe": dict(shared_expert_intermediate_size=64),
    "mixtral": dict(sliding_window=None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_runs_our_gguf(case, tmp_path):
    top1, kl = _run(case, tmp_path)
    # measured: KL 7e-5 (gemma2) to 2.2e-3 (qwen3_moe: routing near-ties), top-1 94-100%; a defective
    # file (next test) gives KL 0.2-0.4
    assert top1 > 0.9 and kl < 1e-2, (top1, kl)


@pytest.mark.parametrize("case, defect", [("llama", "rotary_permutations"), ("gemma3", "norm offset")])
def test_a_defective_file_fails_the_comparison(case, defect, tmp_path, monkeypatch):
    """The same comparison catches a file without llama's rotary row permutation, or with Gemma's
    norms written as w instead of 1 + w: both load and run in llama.cpp."""
    import quantkit.exporters.gguf as gguf_export
    from quantkit.model import architectures

    if defect == "rotary_permutations":
        monkeypatch.setattr(gguf_export, "rotary_permutations", lambda source: {})
    else:
        entry = architectures.ARCHITECTURES["Gemma3ForCausalLM"]
        monkeypatch.setitem(architectures.ARCHITECTURES, "Gemma3ForCausalLM",
                            dataclasses.replace(entry, norm_offset=0.0))
    top1, kl = _run(case, tmp_path)
    assert kl > 5e-2, (top1, kl)


@pytest.mark.parametrize("case", ["llama", "qwen3_moe"])
def test_llama_cpp_runs_our_mxfp4_codes(case, tmp_path):
    """MXFP4 (GPTQ on the fp4 grid) carried into llama.cpp's MXFP4 blocks: its own MXFP4 dot products
    agree with our model as closely as the 8-bit files do."""
    top1, kl = _run(case, tmp_path, scheme="mxfp4a16", algorithm="gptq")
    assert top1 > 0.9 and kl < 1e-2, (top1, kl)


def _run(case, tmp_path, **calibration) -> tuple[float, float]:
    """Calibrate the family's tiny model (8 bits unless told), export GGUF, and compare llama.cpp with
    load_quantized."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    architecture = "llama" if case == "llama3" else case
    # initializer_range 0.2: sharp attention, so a wrong rotary layout shows in the logits
    overrides = dict(CASES[case], hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                     initializer_range=0.08)
    # (llama.cpp looks up Phi-3's special tokens when general.name, our directory name, says "phi3")
    source = make_checkpoint(tmp_path / f"tiny-{case.replace('phi3', 'p')}", architecture, seed=12, vocab_size=VOCAB,
                             outlier_channels=0, **overrides)
    save_byte_level_bpe(source)
    calibration = calibration or dict(scheme="w8a16", group_size=32, symmetric=True)
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "q", num_samples=4, seq_len=32, **calibration))
    result = export_gguf(tmp_path / "q", tmp_path / f"{case}.gguf")
    assert {status.split()[0] for status in result.summary()} <= {"exact", "float"}
    windows = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = torch.cat([load_quantized(tmp_path / "q", dtype=torch.float32)(w[None]).logits for w in windows])
    return next_token_agreement(ours, llama_cpp_logits(result.out, windows))
