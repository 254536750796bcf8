"""Tiny random checkpoints built from transformers configs (nothing is downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton reads this once, when first imported, and test modules collected before test_kernels
    # (compressed-tensors, transformers integrations) may import it: without a GPU its kernels run
    # in the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum songs about "
         "numbers rivers mountains and bright stars above old towns near green fields").split()



def run_cli(*args):
    """Invoke the quantkit CLI in-process with the arguments as strings; returns click's Result."""
    from click.testing import CliRunner

    from quantkit.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    """Exit 1 and exactly one error line, the last output line (the estimate printed before work may
    precede it), naming the problem; never a traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], result.output
    assert all(line.startswith("estimated peak memory") for line in lines[:-1]), result.output
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.output

# One run per scheme kind and algorithm: a new model family is checked against all of them.
EVERY_SCHEME_AND_ALGORITHM = [dict(scheme="w8a8_dynamic"), dict(scheme="smq_q8i8f16_2"),
                              dict(scheme="w4a16", algorithm="gptq"),
                              dict(scheme="w4a16", algorithm="awq", group_size=32),
                              dict(scheme="w4a16", algorithm="hqq", group_size=32)]


def calibrate_and_reload(checkpoint: Path, out: Path, **options):
    """Calibrate a tiny checkpoint (kept in memory) and reload its output; returns (result, reloaded),
    after checking the reloaded logits equal the in-memory model's bit for bit."""
    from quantkit import load_quantized
    from quantkit.run.pipeline import CalibrateConfig, calibrate

    result = calibrate(CalibrateConfig(model=str(checkpoint), out=out, num_samples=4, seq_len=32, batch_size=4,
                                       keep_model=True, **options))
    reloaded = load_quantized(out)
    ids = torch.randint(0, reloaded.config.get_text_config().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, reloaded(ids).logits)
    return result, reloaded


def tiny_text(num_words: int = 4000, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (num_words,), generator=generator).tolist()
    lines = [" ".join(WORDS[i] for i in ids[k:k + 12]) for k in range(0, num_words, 12)]
    return "\n\n".join(lines)


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


def tiny_multimodal_gemma3(**text_overrides):
    """Gemma3ForConditionalGeneration: the tiny Gemma 3 text tower plus a one-layer SigLIP vision tower."""
    from transformers import Gemma3Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = tiny_config("gemma3", **{"tie_word_embeddings": True, **text_overrides})
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                          mm_tokens_per_image=4, tie_word_embeddings=True)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config


def tiny_config(architecture: str, **overrides):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if architecture == "phi3":
        common["pad_token_id"] = 0   # Phi3Config's default pad id (32000) is outside a tiny vocabulary
    common.update(overrides)
    # Mixture of experts: small experts, top-2 routing (many experts, few per token, as in Qwen3-MoE).
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    moe_defaults = {"qwen3_moe": moe, "qwen2_moe": dict(moe, shared_expert_intermediate_size=48, norm_topk_prob=False),
                    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)}
    # Gemma: small heads (query scale 1/sqrt(head_dim) as llama.cpp computes it), a sliding window
    # shorter than the calibration samples and both layer types, so per-layer masks matter.
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"])
    moe_defaults.update(gemma2=gemma, gemma3=gemma)
    common = {**common, **moe_defaults.get(architecture, {}), **overrides}
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
                    "qwen3": Qwen3Config, "phi3": Phi3Config, "qwen3_moe": Qwen3MoeConfig,
                    "qwen2_moe": Qwen2MoeConfig, "mixtral": MixtralConfig, "gemma2": Gemma2Config,
                    "gemma3": Gemma3TextConfig}[architecture]
    config = config_class(**common)
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                             "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                             "qwen2_moe": "Qwen2MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                             "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[architecture]]
    return config


def make_checkpoint(directory: Path, architecture: str = "llama", seed: int = 0, dtype=torch.float32,
                    outlier_channels: int = 2, **overrides) -> Path:
    """A random model saved as an HF checkpoint, with a few large-magnitude hidden channels (the
    activation outliers SmoothQuant exists for)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_multimodal_gemma3(**overrides) if architecture == "gemma3_multimodal" else \
        tiny_config(architecture, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") and outlier_channels:
                param[:outlier_channels] = 20.0
            if name.endswith("bias"):
                param.normal_(0, 0.05)
    model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mistral"), "mistral", seed=1, sliding_window=None)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gemma2"), "gemma2", seed=8)


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3", seed=9)


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", seed=4)


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe", seed=5, shared_expert_intermediate_size=64)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", seed=6, sliding_window=None)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> Path:
    # head_dim 32 != hidden / heads (16), as in real Qwen3 models: GGUF must carry key/value lengths
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=3, head_dim=32)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(tiny_text())
    return path
