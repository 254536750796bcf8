"""GGUF export, proven in its consumer: transformers' GGUF loader (gguf-py's reader and dequantizer).

References are independent of the exporter: gguf-py's quantizer for every block byte, quantkit's own
dequantized model (`load_quantized`) for logits, the source tokenizer for token ids, and a file
written deliberately without the rotary q/k permutation for the negative case.
"""
import io
import json
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_checkpoint, run_cli, tiny_text
from gguf import GGMLQuantizationType, GGUFReader

import quantkit.exporters.gguf as gguf_export
from quantkit.check.evaluate import compare, eval_windows
from quantkit.errors import QuantkitError
from quantkit.exporters import gguf_blocks
from quantkit.exporters.gguf import export_gguf, rotary_row_permutation
from quantkit.formats import ggml_blocks
from quantkit.model.checkpoint import Checkpoint
from quantkit.native.loader import load_quantized
from quantkit.run.pipeline import CalibrateConfig, calibrate

VOCAB = 320
FAST = dict(num_samples=4, seq_len=32)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------------------------------- fixtures


def save_byte_level_bpe(directory, vocab_size=VOCAB):
    """A GPT-2 style tokenizer (ByteLevel pre-tokenizer and decoder, BPE merges) trained on the tiny text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 3, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([tiny_text(2000, seed=5)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def train(directory, tokenizer, steps=60, seed=0):
    """A few AdamW steps on the tiny text: predictions with real margins, so top-1 agreement and the
    rotary permutation are meaningful (a random model's near-uniform logits are not)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(tokenizer(tiny_text(6000, seed=1))["input_ids"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,))
        batch = torch.stack([ids[s:s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return directory


def trained_bpe_llama(tmp_path_factory):
    """The tiny Llama with the byte-level BPE tokenizer, trained once per test session (both export test
    modules use it; it is kept under the session's base temp directory)."""
    directory = tmp_path_factory.getbasetemp() / "trained_bpe_llama"
    if not (directory / "model.safetensors").is_file():
        make_checkpoint(directory, "llama", vocab_size=VOCAB, outlier_channels=0)
        train(directory, save_byte_level_bpe(directory))
    return directory


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    return trained_bpe_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def windows(llama_bpe):
    """6 windows x 64 tokens of held-out text: 378 predicted tokens."""
    return eval_windows(Checkpoint(llama_bpe).tokenizer(), tiny_text(3000, seed=7), 64, 6)


def quantize(source, out, **options):
    calibrate(CalibrateConfig(model=str(source), out=out, overwrite=True, **FAST, **options))
    return out


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def tensors_by_name(path):
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def field(reader, key):
    return reader.fields[key].contents()


def assert_matches(model, reference, windows):
    """The issue's acceptance test: top-1 agreement >= 99% and perplexity within 0.5%."""
    result = compare(model, reference, windows)
    assert result.top1_agreement >= 0.99, result
    assert abs(result.perplexity / result.reference_perplexity - 1) < 0.005, result
    return result


@torch.no_grad()
def max_logit_difference(model, reference, windows):
    return float((model(windows).logits - reference(windows).logits).abs().max())


def gguf_weight(path, name, rows, cols):
    """The dequantized weight gguf-py reads from the file, [rows, cols] float32."""
    tensor = tensors_by_name(path)[name]
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols).copy())


# --------------------------------------------------------------------------------- block formats


@pytest.mark.parametrize("fmt", sorted(ggml_blocks.FORMATS))
def test_block_quantizer_is_bit_identical_to_gguf_py(fmt):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 256, generator=generator) * torch.logspace(-5, 2, 48)[:, None]
    weight[0, :32] = 1.0                         # constant block (d = 0 for Q4_1/Q5_1)
    weight[1, :32] = 0.0                         # all-zero block
    weight[2, :16], weight[2, 16:32] = -3.0, 3.0   # magnitude tie: the first element's sign wins
    weight[3, :32] = torch.round(weight[3, :32] * 4) / 4 + 0.5   # values on round-half boundaries
    expected = gguf.quants.quantize(weight.numpy(), GGMLQuantizationType[fmt])
    blocks = ggml_blocks.quantize_blocks(weight, fmt)
    packed = gguf_blocks.pack(blocks)
    assert packed.dtype == np.uint8 and np.array_equal(packed, expected)
    unpacked = gguf_blocks.unpack(packed, fmt, 256)
    assert torch.equal(unpacked.q, blocks.q) and torch.equal(unpacked.d, blocks.d)
    reference = gguf.quants.dequantize(expected, GGMLQuantizationType[fmt])
    assert np.array_equal(blocks.dequantize().numpy(), reference)


@pytest.mark.parametrize("bits,symmetric,fmt", [(4, True, "Q4_0"), (3, True, "Q4_0"), (5, True, "Q5_0"),
                                                (8, True, "Q8_0"), (4, False, "Q4_1"), (5, False, "Q5_1")])
def test_carried_codes_dequantize_to_quantkit_weights(bits, symmetric, fmt):
    from quantkit.algorithms.rtn import quantize_rtn
    from quantkit.formats.schemes import WeightSpec

    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    quant = quantize_rtn(weight, WeightSpec(bits, "group", symmetric, 32))
    assert gguf_blocks.carrier_format(bits, symmetric) == fmt
    per_block = quant.scale.float()           # group 32 = one scale per block
    zero = None if quant.zero is None else quant.zero
    blocks = gguf_blocks.carry_codes(quant.codes, per_block, zero, fmt)
    read_back = gguf.quants.dequantize(gguf_blocks.pack(blocks), GGMLQuantizationType[fmt])
    expected = quant.dequantize().numpy()
    if symmetric:   # x = d * (q - offset) with d = scale: every product is exact in fp32
        assert np.array_equal(read_back, expected)
    else:           # only the f16 block minimum m = -scale * (zero + offset) rounds: |error| <= 2^-11 * |m|
        bound = 2.0**-11 * np.abs(blocks.m.float().numpy()).repeat(32, axis=1) + 1e-7
        assert np.all(np.abs(read_back - expected) <= bound)


def test_rotary_permutation_matches_llama_cpp_definition():
    heads, head_dim = 3, 8
    weight = torch.arange(heads * head_dim * 5).reshape(heads * head_dim, 5)
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    expected = weight.reshape(heads, 2, head_dim // 2, 5).swapaxes(1, 2).reshape(weight.shape)
    assert torch.equal(weight[rotary_row_permutation(heads * head_dim, heads)], expected)


# ----------------------------------------------------------------------------- float checkpoints


@pytest.mark.parametrize("fmt", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_float_checkpoint_matches_gguf_py_quantizer(llama_bpe, tmp_path, fmt):
    from safetensors.torch import load_file

    out = export_gguf(llama_bpe, tmp_path / "model.gguf", ggml_type=fmt).out
    tensors = tensors_by_name(out)
    state = load_file(llama_bpe / "model.safetensors")
    config = Checkpoint(llama_bpe).config
    for block in range(config.num_hidden_layers):
        for linear, gguf_name in zip(LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                               "ffn_down")):
            weight = state[f"model.layers.{block}.{linear}.weight"]
            if linear.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if "q_proj" in linear else config.num_key_value_heads
                weight = weight[rotary_row_permutation(weight.shape[0], heads)]
            tensor = tensors[f"blk.{block}.{gguf_name}.weight"]
            assert tensor.tensor_type == GGMLQuantizationType[fmt]
            expected = gguf.quants.quantize(weight.float().numpy(), GGMLQuantizationType[fmt])
            assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape).view(expected.dtype), expected)


def test_float_checkpoint_f32_round_trip_is_lossless(llama_bpe, tmp_path, windows):
    from transformers import AutoModelForCausalLM

    out = export_gguf(llama_bpe, tmp_path / "float.gguf").out
    reference = AutoModelForCausalLM.from_pretrained(llama_bpe, dtype=torch.float32).eval()
    assert max_logit_difference(load_gguf(out), reference, windows) == 0.0


# ------------------------------------------------------------------------------- quantkit outputs


def test_exact_q4_0_export_loads_with_matching_logits(llama_bpe, tmp_path, windows):
    from transformers import AutoTokenizer

    source = quantize(llama_bpe, tmp_path / "w4g32", scheme="w4a16", group_size=32, symmetric=True)
    result = export_gguf(source, tmp_path / "w4g32.gguf")
    assert result.summary() == {"exact Q4_0": 14, "float F32": 1} and result.file_type == "MOSTLY_Q4_0"

    reader = GGUFReader(result.out)
    config = Checkpoint(llama_bpe).config
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 2 and field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.attention.head_count") == 4 and field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == 16 and field(reader, "llama.feed_forward_length") == 160
    assert math.isclose(field(reader, "llama.rope.freq_base"), config.rope_parameters["rope_theta"])
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert field(reader, "general.quantization_version") == 2
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(field(reader, "tokenizer.ggml.tokens")) == VOCAB and field(reader, "tokenizer.ggml.merges")
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    report = json.loads(field(reader, "quantkit.export"))
    assert report["layers"]["blk.0.attn_q.weight"] == {"source": "model.layers.0.self_attn.q_proj", "type": "Q4_0",
                                                       "status": "exact", "reason": ""}
    tensors = tensors_by_name(result.out)
    assert tensors["blk.1.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q4_0
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [160, 64]          # ggml order: [cols, rows]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert tensors["output.weight"].tensor_type == GGMLQuantizationType.F32   # untied lm_head, fp32 source

    # The file dequantizes (gguf-py) to exactly quantkit's weights, q/k rows in llama.cpp's order.
    quantized = load_quantized(source, dtype=torch.float32)
    q_proj = quantized.model.layers[0].self_attn.q_proj.dequantized_weight()
    expected = q_proj[rotary_row_permutation(64, 4)]
    assert torch.equal(gguf_weight(result.out, "blk.0.attn_q.weight", 64, 64), expected)

    model = load_gguf(result.out)
    assert_matches(model, quantized, windows)
    assert max_logit_difference(model, quantized, windows) < 1e-4

    text = tiny_text(200, seed=11) + " 12345 Don't!"
    tokenizer = AutoTokenizer.from_pretrained(result.out.parent, gguf_file=result.out.name)
    assert tokenizer(text)["input_ids"] == Checkpoint(llama_bpe).tokenizer()(text)["input_ids"]


def test_file_without_rotary_permutation_fails_the_comparison(llama_bpe, tmp_path, windows, monkeypatch):
    source = quantize(llama_bpe, tmp_path / "w4g32", scheme="w4a16", group_size=32, symmetric=True)
    monkeypatch.setattr(gguf_export, "rotary_row_permutation", lambda rows, heads: torch.arange(rows))
    out = export_gguf(source, tmp_path / "unpermuted.gguf").out
    model = load_gguf(out)                       # it loads and runs ...
    result = compare(model, load_quantized(source, dtype=torch.float32), windows)
    assert math.isfinite(result.perplexity)
    # ... but only the logits reveal it: the acceptance test fails.
    assert result.top1_agreement < 0.99 or abs(result.perplexity / result.reference_perplexity - 1) > 0.005, result
    with pytest.raises(AssertionError):
        assert_matches(model, load_quantized(source, dtype=torch.float32), windows)


@pytest.mark.parametrize("group_size", [32, 64])
def test_asymmetric_codes_are_carried_as_q4_1(llama_bpe, tmp_path, windows, group_size):
    source = quantize(llama_bpe, tmp_path / "asym", scheme="w4a16", group_size=group_size, symmetric=False)
    result = export_gguf(source, tmp_path / "asym.gguf")
    assert result.summary() == {"carried Q4_1": 14, "float F32": 1}
    # The f16 block minimum is the only rounding: at most 15 * 2^-11 of a quantization step.
    assert all(0 <= t.min_error_in_scales <= 15 * 2.0**-11 for t in result.linears if t.status == "carried")
    quantized = load_quantized(source, dtype=torch.float32)
    layer = quantized.model.layers[1].mlp.down_proj
    blocks = gguf_blocks.unpack(np.asarray(tensors_by_name(result.out)["blk.1.ffn_down.weight"].data), "Q4_1", 160)
    assert torch.equal(blocks.q, layer.weight_codes.long() + 8)           # codes as they are
    # down_proj has 160 inputs: with group 64 its last group is ragged (32 columns) yet block-aligned
    scale = layer.weight_scale.float().repeat_interleave(group_size // 32, dim=1)[:, :160 // 32]
    assert torch.equal(blocks.d.float(), scale)                            # scales as they are
    assert_matches(load_gguf(result.out), quantized, windows)


def test_layers_not_on_a_block_grid_are_requantized(llama_bpe, tmp_path, windows):
    source = quantize(llama_bpe, tmp_path / "g16", scheme="w4a16", group_size=16, symmetric=True)
    result = export_gguf(source, tmp_path / "g16.gguf")
    assert result.summary() == {"requantized Q4_0": 14, "float F32": 1}
    assert all("group size 16" in t.reason for t in result.linears if t.status == "requantized")
    quantized = load_quantized(source, dtype=torch.float32)
    # Re-rounded from quantkit's dequantized weights exactly as gguf-py would.
    down = quantized.model.layers[0].mlp.down_proj.dequantized_weight()
    expected = gguf.quants.quantize(down.numpy(), GGMLQuantizationType.Q4_0)
    data = np.asarray(tensors_by_name(result.out)["blk.0.ffn_down.weight"].data)
    assert np.array_equal(data.reshape(expected.shape), expected)
    # transformers computes with the file's tensors: rebuild quantkit's model from them and compare.
    for block, layer in enumerate(quantized.model.layers):
        for linear, name in zip(LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                          "ffn_down")):
            module = layer.get_submodule(linear)
            weight = gguf_weight(result.out, f"blk.{block}.{name}.weight", module.out_features, module.in_features)
            if linear.endswith(("q_proj", "k_proj")):
                heads = 4 if "q_proj" in linear else 2
                weight = weight[torch.argsort(rotary_row_permutation(weight.shape[0], heads))]
            plain = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            plain.weight.data = weight
            layer.set_submodule(linear, plain)
    assert max_logit_difference(load_gguf(result.out), quantized, windows) < 1e-4

    requested = export_gguf(source, tmp_path / "g16-q8.gguf", ggml_type="Q8_0")
    assert requested.summary() == {"requantized Q8_0": 14, "float F32": 1}


def test_w8a8_weights_are_exact_and_the_activation_grid_is_reported_dropped(llama_bpe, tmp_path, windows):
    source = quantize(llama_bpe, tmp_path / "w8a8", scheme="w8a8_dynamic", alpha=0.5)
    result = export_gguf(source, tmp_path / "w8a8.gguf")
    assert result.summary() == {"exact Q8_0": 14, "float F32": 1}
    assert all("activation grid" in t.reason for t in result.linears if t.status == "exact")
    assert any("activation quantization" in note for note in result.notes)
    quantized = load_quantized(source, dtype=torch.float32)
    for module in quantized.modules():
        if hasattr(module, "activation_spec"):
            module.activation_spec = None      # what GGUF can express: the same weights, float activations
    assert max_logit_difference(load_gguf(result.out), quantized, windows) < 1e-4


def test_qwen2_with_biases_and_tied_embeddings(tmp_path):
    source_dir = make_checkpoint(tmp_path / "qwen2", "qwen2", seed=2, vocab_size=VOCAB, tie_word_embeddings=True)
    save_byte_level_bpe(source_dir)
    source = quantize(source_dir, tmp_path / "q", scheme="w4a16", group_size=32, symmetric=True)
    result = export_gguf(source, tmp_path / "qwen2.gguf")
    tensors = tensors_by_name(result.out)
    assert "output.weight" not in tensors and tensors["blk.0.attn_q.bias"].tensor_type == GGMLQuantizationType.F32
    assert result.summary() == {"exact Q4_0": 14}
    reader = GGUFReader(result.out)
    assert field(reader, "general.architecture") == "qwen2"
    quantized = load_quantized(source, dtype=torch.float32)
    model = load_gguf(result.out)
    assert model.config.tie_word_embeddings
    ids = eval_windows(Checkpoint(source_dir).tokenizer(), tiny_text(3000, seed=7), 64, 4)
    assert max_logit_difference(model, quantized, ids) < 1e-4


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    """Llama 3.2: rope_freqs carries the llama3 scaling (checked against transformers' own llama3
    frequencies) and the tied lm_head is left to token_embd; the weights, put under the source
    config's rope, give load_quantized's logits."""
    from transformers import AutoModelForCausalLM

    source_dir = make_checkpoint(tmp_path / "llama3", "llama", seed=5, vocab_size=VOCAB, tie_word_embeddings=True,
                                 rope_parameters=dict(LLAMA3_ROPE), head_dim=32)
    save_byte_level_bpe(source_dir)
    source = quantize(source_dir, tmp_path / "q", scheme="w4a16", group_size=32, symmetric=True)
    result = export_gguf(source, tmp_path / "llama3.gguf")
    tensors = tensors_by_name(result.out)
    assert "output.weight" not in tensors
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data, dtype=np.float32))
    quantized = load_quantized(source, dtype=torch.float32)
    head_dim, theta = 32, LLAMA3_ROPE["rope_theta"]
    unscaled = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled = quantized.model.rotary_emb.inv_freq.double()      # transformers' llama3 frequencies
    assert factors.shape == (head_dim // 2,) and not torch.allclose(factors, torch.ones_like(factors))
    torch.testing.assert_close(unscaled / factors.double(), scaled, rtol=1e-6, atol=0)
    # transformers' GGUF reader does not read rope_freqs: its weights go into the source config's model
    weights = load_gguf(result.out).state_dict()
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32).eval()
    model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()}, strict=False)
    model.tie_weights()
    ids = eval_windows(Checkpoint(source_dir).tokenizer(), tiny_text(3000, seed=7), 64, 4)
    assert max_logit_difference(model, quantized, ids) < 1e-4


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    source = make_checkpoint(tmp_path / "spm", "llama", vocab_size=VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_text(3000, seed=3).split("\n\n")), model_writer=model, vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (source / "tokenizer.model").write_bytes(model.getvalue())
    result = export_gguf(source, tmp_path / "spm.gguf", ggml_type="F16")
    assert result.tokenizer == "llama"
    reader = GGUFReader(result.out)
    assert len(field(reader, "tokenizer.ggml.scores")) == VOCAB and field(reader, "tokenizer.ggml.add_space_prefix")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(result.out.parent, gguf_file=result.out.name)
    text = tiny_text(100, seed=4).replace("\n\n", " ")
    assert tokenizer(text)["input_ids"] == [processor.bos_id()] + processor.encode(text)


# ------------------------------------------------------------------------------------------ the CLI


run = run_cli


def test_cli_json_and_overwrite(llama_bpe, tmp_path):
    source = quantize(llama_bpe, tmp_path / "w4g32", scheme="w4a16", group_size=32, symmetric=True)
    out = tmp_path / "exports" / "model.gguf"
    result = run("export", source, "--format", "gguf", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["summary"] == {"exact Q4_0": 14, "float F32": 1} and summary["format"] == "gguf"
    assert summary["layers"]["model.layers.0.mlp.up_proj"]["status"] == "exact"
    before = out.read_bytes()
    assert_one_line_error(run("export", source, "--format", "gguf", "--out", out), "--overwrite")
    assert out.read_bytes() == before
    result = run("export", source, "--format", "gguf", "--type", "q8_0", "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]      # no temporary left behind


def test_cli_bad_inputs_are_one_line(llama_dir, llama_bpe, tmp_path):
    out = tmp_path / "x.gguf"
    assert_one_line_error(run("export", tmp_path / "missing", "--format", "gguf", "--out", out), "not found")
    # the conftest tokenizer is WordLevel: no GGUF tokenizer type describes it
    assert_one_line_error(run("export", llama_dir, "--format", "gguf", "--out", out), "WordLevel")
    assert_one_line_error(run("export", llama_bpe, "--format", "gguf", "--type", "Q4_0", "--out", llama_bpe / "x.gguf"),
                          "overlaps the input")
    assert_one_line_error(run("export", llama_bpe, "--format", "compressed-tensors", "--type", "Q4_0", "--out", out),
                          "--type")
    assert not out.exists() and list(tmp_path.glob(".*partial*")) == []


def test_cli_refuses_unsupported_models_before_writing(llama_bpe, tmp_path):
    import shutil

    for change, fragment in ((lambda c: c.update(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
                             (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                  "factor": 4.0,
                                                                  "original_max_position_embeddings": 64}),
                              "rope scaling 'yarn'")):
        copy = tmp_path / "copy"
        shutil.copytree(llama_bpe, copy, dirs_exist_ok=True)
        config = json.loads((copy / "config.json").read_text())
        change(config)
        (copy / "config.json").write_text(json.dumps(config))
        out = tmp_path / "refused.gguf"
        assert_one_line_error(run("export", copy, "--format", "gguf", "--out", out), fragment)
        assert not out.exists()


def test_cli_corrupt_weights_are_one_line(llama_bpe, tmp_path):
    import shutil

    source = quantize(llama_bpe, tmp_path / "w4g32", scheme="w4a16", group_size=32, symmetric=True)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "corrupt.gguf"
    assert_one_line_error(run("export", corrupt, "--format", "gguf", "--out", out), "corrupt")
    (corrupt / "quant_manifest.json").write_text("{not json")
    assert_one_line_error(run("export", corrupt, "--format", "gguf", "--out", out), "manifest")
    assert not out.exists()


# ------------------------------------------------------------------------------ --target-size (issue 15)


def test_target_size_chooses_types_under_the_file_size(llama_bpe, tmp_path):
    """A float checkpoint under a file size: the file is within it, gguf-py reads every block Linear back as
    llama.cpp's quantization of the float weight in its chosen type, and the choice mixes types."""
    from quantkit.exporters import gguf_budget

    smallest = export_gguf(llama_bpe, tmp_path / "q4.gguf", ggml_type="Q4_0").size_bytes
    largest = export_gguf(llama_bpe, tmp_path / "q8.gguf", ggml_type="Q8_0").size_bytes
    target = (smallest + largest) // 2
    result = export_gguf(llama_bpe, tmp_path / "t.gguf", ggml_type="Q8_0", target_size=target)
    assert result.size_bytes == (tmp_path / "t.gguf").stat().st_size <= target
    chosen = [t for t in result.linears if t.reason.startswith("--target-size")]
    assert len(chosen) == 14 and len({t.ggml_type for t in chosen}) > 1
    source = Checkpoint(llama_bpe)
    for record in chosen[:4]:
        weight = source.tensors([record.source + ".weight"])[record.source + ".weight"].float()
        if record.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue                       # rows permuted for llama.cpp's rotary layout
        ours = gguf_budget.requantize(weight, record.ggml_type, None).dequantize().float()
        assert torch.equal(gguf_weight(result.out, record.name, *ours.shape), ours)


def test_target_size_bad_inputs(llama_bpe, tmp_path):
    with pytest.raises(QuantkitError, match="below the smallest file these candidates allow"):
        export_gguf(llama_bpe, tmp_path / "t.gguf", ggml_type="Q8_0", target_size=1000)
    out = quantize(llama_bpe, tmp_path / "q", scheme="w4a16", algorithm="rtn")
    with pytest.raises(QuantkitError, match="already chosen"):
        export_gguf(out, tmp_path / "c.gguf", target_size=10**6)
    result = run_cli("export", llama_bpe, "--format", "gguf", "--out", tmp_path / "x.gguf", "--target-size", "1MB",
                     "--candidates", "Q4_0,Q9_K")
    assert result.exit_code == 1 and "unknown GGUF candidate type 'Q9_K'" in result.output


def test_target_size_with_a_dataset_chooses_by_measured_sensitivities(llama_bpe, tmp_path):
    """--dataset: each block Linear's type is chosen by its block sensitivity measured on calibration data (the
    measure of calibrate --target-bits). The choice is, within the solver's size units, the brute-force optimum of
    the summed sensitivities under the bytes the file leaves the Linears, and the file stays within the target."""
    import itertools
    import re

    from quantkit import api
    from quantkit.exporters import gguf_budget
    from quantkit.formats import knapsack
    from quantkit.run.pipeline import measure_sensitivities

    types = ("Q4_0", "Q8_0")
    smallest = export_gguf(llama_bpe, tmp_path / "q4.gguf", ggml_type="Q4_0").size_bytes
    largest = export_gguf(llama_bpe, tmp_path / "q8.gguf", ggml_type="Q4_0", target_size=10**9,
                          candidates=("Q8_0",)).size_bytes
    target = (smallest + largest) // 2
    data = dict(dataset="dummy", num_samples=4, seq_len=16)
    result = api.export(llama_bpe, format="gguf", out=tmp_path / "t.gguf", type="Q4_0", target_size=str(target),
                        candidates=",".join(types), **data)
    assert result.size_bytes == (tmp_path / "t.gguf").stat().st_size <= target
    assert any("block sensitivities measured on calibration data" in note for note in result.notes)
    chosen = {t.source: t for t in result.linears if t.reason.startswith("--target-size")}
    assert len(chosen) == 14 and {t.ggml_type for t in chosen.values()} == set(types)

    layers = measure_sensitivities(CalibrateConfig(model=str(llama_bpe), scheme="w4a16", target_bits=32.0,
                                                   candidates="q4_0,q8_0", **data))
    names = sorted(chosen)
    costs = {n: [gguf_budget.aligned(gguf_budget.type_bytes(t, chosen[n].shape)) for t in types] for n in names}
    losses = {n: layers[n].loss("block") for n in names}
    note = next(note for note in result.notes if note.startswith("--target-size"))
    budget = int(re.search(r"chosen under (\d+) bytes", note).group(1))   # target - header - the other tensors
    assert budget <= target - (smallest - sum(costs[n][0] for n in names))
    picked = [types.index(chosen[n].ggml_type) for n in names]
    assert sum(costs[n][k] for n, k in zip(names, picked)) <= budget
    strict = budget - len(names) * knapsack.unit_for(budget, len(names))
    best = min(sum(losses[n][k] for n, k in zip(names, combo))
               for combo in itertools.product(range(2), repeat=len(names))
               if sum(costs[n][k] for n, k in zip(names, combo)) <= strict)
    assert sum(losses[n][k] for n, k in zip(names, picked)) <= best

    cli = run_cli("export", llama_bpe, "--format", "gguf", "--out", tmp_path / "c.gguf", "--target-size", str(target),
                  "--type", "Q4_0", "--candidates", "Q4_0,Q8_0", "--dataset", "dummy", "--num-samples", "4",
                  "--seq-len", "16", "--json")
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["size_bytes"] <= target
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", tmp_path / "d.gguf", "--dataset",
                                  "dummy"), "give --target-size")


def test_dataset_sensitivities_follow_the_quantizer_the_file_is_written_with(llama_bpe, tmp_path, monkeypatch):
    """With --imatrix a tensor the matrix covers is written by llama.cpp's weighted search with its vector, so its
    sensitivities are measured on that search with that vector; the tensors it does not cover, and every tensor
    without --imatrix, on the reference rounding the file holds."""
    from quantkit import api
    from quantkit.exporters.gguf_imatrix import ImportanceMatrix, write_imatrix
    from quantkit.run import allocate

    hidden = json.loads((llama_bpe / "config.json").read_text())["hidden_size"]
    sums = torch.rand(1, hidden) * 64
    imatrix = tmp_path / "m.imatrix.gguf"
    write_imatrix(imatrix, ImportanceMatrix({"blk.0.attn_q.weight": sums}, {"blk.0.attn_q.weight": torch.tensor([64.0])}))
    seen = {}
    layer_errors = allocate.layer_errors

    def recording(name, *args, importance=None, **kwargs):
        seen[name] = importance
        return layer_errors(name, *args, importance=importance, **kwargs)
    monkeypatch.setattr(allocate, "layer_errors", recording)
    common = dict(format="gguf", type="Q4_0", target_size="1GB", candidates="Q4_0,Q4_1,Q8_0", dataset="dummy",
                  num_samples=4, seq_len=16)
    weighted = api.export(llama_bpe, out=tmp_path / "a.gguf", imatrix=imatrix, **common)
    searched = {name: vector for name, vector in seen.items() if vector is not None}
    assert list(searched) == ["model.layers.0.self_attn.q_proj"] and len(seen) == 14
    assert torch.allclose(searched["model.layers.0.self_attn.q_proj"], sums[0] / 64)
    assert any("calibration data (importance-weighted search)" in note for note in weighted.notes)
    seen.clear()
    plain = api.export(llama_bpe, out=tmp_path / "b.gguf", **common)
    assert len(seen) == 14 and all(vector is None for vector in seen.values())
    assert any("calibration data (reference rounding)" in note for note in plain.notes)


# ------------------------------------------------------------------- --algo: calibrated codes in one command


def _block_tensors(path):
    return {name: tensor for name, tensor in tensors_by_name(path).items()
            if name.startswith("blk.") and "norm" not in name}


@pytest.mark.parametrize("propagate", ["quantized", "float"])
def test_algo_writes_a_calibration_runs_codes_on_the_types_chosen(llama_bpe, tmp_path, propagate):
    """export FLOAT --type Q4_K_M --dataset D --algo gptq [--propagate P]: the file's block Linears hold, byte for
    byte, what the two-step route writes (calibrate --scheme q4_k_m --algo gptq [--propagate P], each Linear on
    the type llama-quantize gives it, then export); not llama.cpp's rounding of the float weights; every other
    tensor as the plain export writes it; and nothing is left beside the file."""
    from quantkit import api

    data = dict(dataset="dummy", num_samples=4, seq_len=16, propagate=propagate)
    result = api.export(llama_bpe, format="gguf", out=tmp_path / "one.gguf", type="Q4_K_M", algo="gptq", **data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gguf"]
    blocks = [t for t in result.linears if t.source.startswith("model.layers.")]
    assert len(blocks) == 14 and {t.status for t in blocks} == {"calibrated"}
    assert all(t.reason.endswith("codes by gptq") for t in blocks)

    calibrate(CalibrateConfig(model=str(llama_bpe), scheme="q4_k_m", algorithm="gptq", out=tmp_path / "two", **data))
    export_gguf(tmp_path / "two", tmp_path / "two.gguf")
    export_gguf(llama_bpe, tmp_path / "plain.gguf", ggml_type="Q4_K_M")
    one, two, plain = (_block_tensors(tmp_path / f"{n}.gguf") for n in ("one", "two", "plain"))
    assert len(one) == 14 and one.keys() == two.keys() == plain.keys()
    assert len({t.tensor_type for t in one.values()}) > 1                  # the mix's types (and fallbacks)
    for name, tensor in one.items():
        assert tensor.tensor_type == two[name].tensor_type == plain[name].tensor_type
        assert np.array_equal(tensor.data, two[name].data), name
    assert sum(not np.array_equal(one[n].data, plain[n].data) for n in one) >= 12   # GPTQ moved codes
    rest = {n: t for n, t in tensors_by_name(tmp_path / "one.gguf").items() if n not in one}
    for name, tensor in tensors_by_name(tmp_path / "plain.gguf").items():
        if name not in one:
            assert np.array_equal(rest[name].data, tensor.data), name


def test_algo_gptq_on_q5_1_keeps_llama_cpps_float_minimums(llama_bpe, tmp_path):
    """--type Q5_1 --algo gptq: each block Linear's codes are GPTQ's on llama.cpp's weighted Q5_1 grid, whose
    float16 minimum is no integer zero point (stored as a fractional one): the file equals the two-step route's
    (calibrate --scheme q5_1 --algo gptq --algo-option llama_cpp=true, then export) byte for byte, and gguf-py
    reads every block back to the native model's values."""
    from quantkit import api

    data = dict(dataset="dummy", num_samples=4, seq_len=16)
    result = api.export(llama_bpe, format="gguf", out=tmp_path / "one.gguf", type="Q5_1", algo="gptq", **data)
    blocks = [t for t in result.linears if t.source.startswith("model.layers.")]
    assert len(blocks) == 14 and {(t.status, t.ggml_type) for t in blocks} == {("calibrated", "Q5_1")}
    calibrate(CalibrateConfig(model=str(llama_bpe), scheme="q5_1", algorithm="gptq", options={"llama_cpp": True},
                              out=tmp_path / "two", **data))
    export_gguf(tmp_path / "two", tmp_path / "two.gguf")
    one, two = _block_tensors(tmp_path / "one.gguf"), _block_tensors(tmp_path / "two.gguf")
    assert one.keys() == two.keys() and all(np.array_equal(one[n].data, two[n].data) for n in one)
    model = load_quantized(tmp_path / "two")
    fractional = 0
    for record in blocks:
        if record.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue                       # rows permuted for llama.cpp's rotary layout
        layer = model.get_submodule(record.source)
        fractional += not layer.quant_tensor().integer_zero
        ours = layer.dequantized_weight().float()
        assert torch.allclose(gguf_weight(result.out, record.name, *ours.shape), ours, rtol=0, atol=1e-6), record.name
    assert fractional >= 8


def test_algo_under_a_target_size_keeps_the_choice_and_the_size(llama_bpe, tmp_path):
    """--target-size with --algo: the same types as without it, every chosen Linear calibrated on its type, and
    the file within the target; gguf-py reads each block back to the calibrated codes' values."""
    from quantkit import api

    smallest = export_gguf(llama_bpe, tmp_path / "q4.gguf", ggml_type="Q4_0").size_bytes
    largest = export_gguf(llama_bpe, tmp_path / "q8.gguf", ggml_type="Q4_0", target_size=10**9,
                          candidates=("Q8_0",)).size_bytes
    target = (smallest + largest) // 2
    common = dict(format="gguf", type="Q4_0", target_size=str(target), candidates="Q4_0,Q8_0", dataset="dummy",
                  num_samples=4, seq_len=16)
    def block_types(result):
        return {t.source: t.ggml_type for t in result.linears if t.source.startswith("model.layers.")}
    chosen = block_types(api.export(llama_bpe, out=tmp_path / "a.gguf", **common))
    result = api.export(llama_bpe, out=tmp_path / "b.gguf", algo="gptq", algo_options={"damp": 0.02}, **common)
    assert result.size_bytes == (tmp_path / "b.gguf").stat().st_size <= target
    assert block_types(result) == chosen and set(chosen.values()) == {"Q4_0", "Q8_0"}
    assert all(t.status == "calibrated" and t.reason.startswith("--target-size") for t in result.linears
               if t.source in chosen)
    recipe = tmp_path / "recipe.yaml"
    rules = [{"match": sorted(n for n, t in chosen.items() if t == ggml_type), "scheme": ggml_type.lower(),
              "algorithm": "gptq", "options": {"damp": 0.02, "llama_cpp": True}} for ggml_type in ("Q4_0", "Q8_0")]
    import yaml
    recipe.write_text(yaml.safe_dump({"rules": rules, "smooth": False}))
    calibrate(CalibrateConfig(model=str(llama_bpe), recipe=recipe, out=tmp_path / "two", dataset="dummy",
                              num_samples=4, seq_len=16))
    model = load_quantized(tmp_path / "two")
    for record in [t for t in result.linears if t.source in chosen][:6]:
        if record.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue                       # rows permuted for llama.cpp's rotary layout
        ours = model.get_submodule(record.source).dequantized_weight().float()
        assert torch.equal(gguf_weight(result.out, record.name, *ours.shape), ours), record.name


def test_algo_says_which_types_its_algorithm_cannot_search(llama_bpe, tmp_path):
    """--algo imatrix on Q8_0 (llama.cpp's search has no Q8_0 form): those Linears are rounded (rtn, as the
    calibrate plans of llama.cpp's file types do), the note says so, and the codes are llama.cpp's own Q8_0."""
    from quantkit import api

    result = api.export(llama_bpe, format="gguf", out=tmp_path / "a.gguf", type="Q8_0", algo="imatrix",
                        dataset="dummy", num_samples=2, seq_len=16)
    assert "--algo imatrix does not search every chosen type: 14 x Q8_0 by rtn" in result.notes
    export_gguf(llama_bpe, tmp_path / "plain.gguf", ggml_type="Q8_0")
    ours, plain = _block_tensors(tmp_path / "a.gguf"), _block_tensors(tmp_path / "plain.gguf")
    assert all(np.array_equal(ours[n].data, plain[n].data) for n in plain)


def test_algo_bad_inputs(llama_bpe, tmp_path):
    out = tmp_path / "x.gguf"
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--algo", "gptq"), "give --dataset")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--algo", "gtpq", "--dataset", "dummy"), "gptq")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--dataset", "dummy",
                                  "--algo", "gptq", "--num-samples", "2", "--seq-len", "8"), "give --type")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--algo-option", "damp=0.1"), "give --algo")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--propagate", "float"), "give --algo")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--algo", "gptq", "--algo-option", "nonsense=1", "--dataset", "dummy"), "nonsense")
    assert_one_line_error(run_cli("export", llama_bpe, "--format", "gguf", "--out", out, "--type", "Q4_0",
                                  "--algo", "gptq", "--dataset", str(tmp_path / "missing.txt"), "--seq-len", "16"),
                          "missing.txt")
    calibrated = quantize(llama_bpe, tmp_path / "q", scheme="w4a16", algorithm="rtn")
    assert_one_line_error(run_cli("export", calibrated, "--format", "gguf", "--out", out, "--algo", "gptq",
                                  "--dataset", "dummy"), "already calibrated")
    assert_one_line_error(run_cli("export", calibrated, "--format", "compressed-tensors", "--out", tmp_path / "ct",
                                  "--algo", "gptq", "--dataset", "dummy"), "--format gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
