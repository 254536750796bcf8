"""llama2.c's int8 export (``export --format llama2c``): a reader written here from the format's description
(llama2.c export.py ``version2_export`` / runq.c ``read_checkpoint``) must give back quantkit's weights."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from test_export_gguf import trained_bpe_llama

import quantkit
from quantkit.model.checkpoint import Checkpoint
from quantkit.native.loader import load_quantized
from quantkit.run.pipeline import CalibrateConfig, calibrate

FAST = dict(num_samples=4, seq_len=32)
ORDER = (("self_attn.q_proj", "wq"), ("self_attn.k_proj", "wk"), ("self_attn.v_proj", "wv"),
         ("self_attn.o_proj", "wo"), ("mlp.gate_proj", "w1"), ("mlp.down_proj", "w2"), ("mlp.up_proj", "w3"))


def read_llama2c(path):
    """The file as llama2.c describes it: header (magic "ak42", version 2, dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, vocab_size, max_seq_len as int32, uint8 shared flag, int32 group size, 256 bytes in all), fp32
    norms, then each Q8 tensor's int8 values followed by its fp32 group scales. Returns (header, tensors) with
    the Q8 tensors dequantized (w = q * s)."""
    data = path.read_bytes()
    magic, version, *params = struct.unpack_from("<Ii7i", data, 0)
    shared, group = struct.unpack_from("<Bi", data, 36)
    header = dict(zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"), params),
                  magic=magic, version=version, shared=shared, group=group)
    dim, hidden, layers = header["dim"], header["hidden_dim"], header["n_layers"]
    kv_dim = dim * header["n_kv_heads"] // header["n_heads"]
    offset, tensors = 256, {}

    def floats(count):
        nonlocal offset
        values = np.frombuffer(data, dtype="<f4", count=count, offset=offset)
        offset += 4 * count
        return torch.from_numpy(values.copy())

    for name in ("attention_norm", "ffn_norm"):
        for layer in range(layers):
            tensors[f"layers.{layer}.{name}"] = floats(dim)
    tensors["norm"] = floats(dim)

    def q8(rows, cols):
        nonlocal offset
        codes = np.frombuffer(data, dtype=np.int8, count=rows * cols, offset=offset)
        offset += rows * cols
        scales = floats(rows * cols // group)
        return (torch.from_numpy(codes.astype(np.float32)).reshape(-1, group) * scales[:, None]).reshape(rows, cols)

    tensors["tok_embeddings"] = q8(header["vocab_size"], dim)
    shapes = {"wq": (dim, dim), "wk": (kv_dim, dim), "wv": (kv_dim, dim), "wo": (dim, dim),
              "w1": (hidden, dim), "w2": (dim, hidden), "w3": (hidden, dim)}
    for _, short in ORDER:
        for layer in range(layers):
            tensors[f"layers.{layer}.{short}"] = q8(*shapes[short])
    if not shared:
        tensors["output"] = q8(header["vocab_size"], dim)
    assert offset == len(data), (offset, len(data))
    return header, tensors


def read_tokenizer(path, vocab_size):
    """runq.c's tokenizer.bin: uint32 max length, then per id float32 score, int32 length, bytes."""
    data = path.read_bytes()
    (max_length,), offset, pieces, scores = struct.unpack_from("<I", data, 0), 4, [], []
    for _ in range(vocab_size):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8: offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    return max_length, pieces, scores


def unpermute(weight, heads):
    """llama2.c's interleaved rotary rows back to Hugging Face's halves layout (the inverse of
    `w.view(heads, 2, d // heads // 2, cols).transpose(1, 2)`, written independently here)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    return trained_bpe_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def q8_out(llama_bpe, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama2c") / "q8"
    calibrate(CalibrateConfig(model=str(llama_bpe), out=out, scheme="q8_0", **FAST))
    return out


def quantkit_weights(out):
    model = load_quantized(out)
    config = model.config
    weights = {}
    for layer_index, layer in enumerate(model.model.layers):
        for linear, short in ORDER:
            module = layer.get_submodule(linear)
            weights[f"layers.{layer_index}.{short}"] = (module.dequantized_weight() if hasattr(module, "dequantized_weight")
                                                       else module.weight).float()
        weights[f"layers.{layer_index}.attention_norm"] = layer.input_layernorm.weight.float()
        weights[f"layers.{layer_index}.ffn_norm"] = layer.post_attention_layernorm.weight.float()
    weights["norm"] = model.model.norm.weight.float()
    weights["tok_embeddings"] = model.model.embed_tokens.weight.float()
    weights["output"] = model.lm_head.weight.float()
    return config, weights


def test_reader_gives_back_quantkit_weights_exactly(q8_out, tmp_path):
    """q8_0 (int8 symmetric, groups of 32): every block Linear's codes and scales are carried, so the file's
    weights equal load_quantized's bit for bit (q and k after undoing runq.c's rotary row order)."""
    out = tmp_path / "model.bin"
    result = run_cli("export", q8_out, "--format", "llama2c", "--out", out)
    assert result.exit_code == 0, result.output
    header, tensors = read_llama2c(out)
    config, weights = quantkit_weights(q8_out)
    assert header == dict(magic=0x616B3432, version=2, dim=config.hidden_size, hidden_dim=config.intermediate_size,
                          n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                          n_kv_heads=config.num_key_value_heads, vocab_size=config.vocab_size,
                          max_seq_len=config.max_position_embeddings, shared=0, group=32)
    heads = {"wq": config.num_attention_heads, "wk": config.num_key_value_heads}
    for name, weight in weights.items():
        if name in ("tok_embeddings", "output"):
            continue
        got = tensors[name]
        short = name.rsplit(".", 1)[-1]
        if short in heads:
            got = unpermute(got, heads[short])
        assert torch.equal(got, weight), name
    # the float embeddings and classifier are requantized as llama2.c does: |error| <= half a step per group
    for name in ("tok_embeddings", "output"):
        groups = weights[name].reshape(-1, 32)
        step = groups.abs().amax(dim=1, keepdim=True) / 127
        assert ((tensors[name].reshape(-1, 32) - groups).abs() <= step / 2 + 1e-7).all(), name
    assert "carried" in result.output and "requantized" in result.output


def test_rotary_rows_are_permuted(q8_out, tmp_path):
    """Without undoing the permutation q differs: the test above is not vacuous."""
    out = tmp_path / "model.bin"
    quantkit.export(q8_out, format="llama2c", out=out)
    _, tensors = read_llama2c(out)
    _, weights = quantkit_weights(q8_out)
    assert not torch.equal(tensors["layers.0.wq"], weights["layers.0.wq"])


def test_per_channel_int8_is_carried_with_repeated_scales(llama_bpe, tmp_path):
    """w8a16 (int8 symmetric per channel): the file's group size divides every row (gcd of 64 and 160 = 32),
    each row's one scale is repeated per group, and the weights are load_quantized's exactly."""
    out = tmp_path / "w8"
    calibrate(CalibrateConfig(model=str(llama_bpe), out=out, scheme="w8a16", **FAST))
    result = quantkit.export(out, format="llama2c", out=tmp_path / "w8.bin")
    assert result.group_size == 32
    assert [t.name for t in result.tensors if t.status == "requantized"] == ["tok_embeddings", "output"]
    header, tensors = read_llama2c(tmp_path / "w8.bin")
    config, weights = quantkit_weights(out)
    assert torch.equal(tensors["layers.1.w2"], weights["layers.1.w2"])
    assert torch.equal(unpermute(tensors["layers.0.wk"], config.num_key_value_heads), weights["layers.0.wk"])


def test_tied_classifier_is_shared(tmp_path):
    from conftest import make_checkpoint
    from test_export_gguf import save_byte_level_bpe

    source = make_checkpoint(tmp_path / "tied", "llama", vocab_size=320, outlier_channels=0, tie_word_embeddings=True)
    save_byte_level_bpe(source)
    result = quantkit.export(source, format="llama2c", out=tmp_path / "tied.bin")
    header, tensors = read_llama2c(tmp_path / "tied.bin")      # the reader checks every byte is accounted for
    assert result.shared_classifier and header["shared"] == 1 and "output" not in tensors


def test_other_grids_are_requantized_from_quantkit_weights(llama_bpe, tmp_path):
    """int4 groups of 64: each Linear is requantized from the weights the directory holds, exactly as
    llama2.c's quantize_q80 (s = max|w| / 127, q = round(w / s)) computed here would."""
    out = tmp_path / "w4"
    calibrate(CalibrateConfig(model=str(llama_bpe), out=out, scheme="w4a16", group_size=64, **FAST))
    result = quantkit.export(out, format="llama2c", out=tmp_path / "w4.bin")
    header, tensors = read_llama2c(tmp_path / "w4.bin")
    assert header["group"] == 32      # llama2.c's 64 halved to divide hidden_dim 160
    config, weights = quantkit_weights(out)
    for name in ("layers.0.wv", "layers.1.w2"):
        groups = weights[name].reshape(-1, 32)
        scale = groups.abs().amax(dim=1, keepdim=True) / 127.0
        expected = (torch.round(groups / scale) * scale).reshape(weights[name].shape)
        assert torch.equal(tensors[name], expected), name
    reasons = {t.reason for t in result.tensors if t.status == "requantized"}
    assert any("int4" in reason for reason in reasons), reasons


def test_tokenizer_pieces_decode_every_token(q8_out, llama_bpe, tmp_path):
    quantkit.export(q8_out, format="llama2c", out=tmp_path / "m.bin")
    tokenizer = Checkpoint(llama_bpe).tokenizer()
    max_length, pieces, scores = read_tokenizer(tmp_path / "m.tokenizer.bin", tokenizer.vocab_size)
    assert max_length == max(len(p) for p in pieces)
    ids = tokenizer("the quick brown fox jumps over seven wizards")["input_ids"]
    assert b"".join(pieces[i] for i in ids).decode() == tokenizer.decode(ids)
    # every token whose text is whole UTF-8 (single bytes >= 0x80 decode to U+FFFD alone)
    texts = {i: tokenizer.decode([i]) for i in range(3, tokenizer.vocab_size)}
    whole = {i: text for i, text in texts.items() if "\ufffd" not in text}
    assert len(whole) > 150 and all(pieces[i] == text.encode() for i, text in whole.items())
    assert all(len(pieces[i]) == 1 for i in set(texts) - set(whole))      # the raw byte itself


def test_overwrite_replaces_only_quantkit_files(q8_out, tmp_path):
    out = tmp_path / "model.bin"
    quantkit.export(q8_out, format="llama2c", out=out)
    assert_one_line_error(run_cli("export", q8_out, "--format", "llama2c", "--out", out), "already exists")
    assert run_cli("export", q8_out, "--format", "llama2c", "--out", out, "--overwrite").exit_code == 0
    (tmp_path / "mine.tokenizer.bin").write_bytes(b"their tokenizer")
    assert_one_line_error(run_cli("export", q8_out, "--format", "llama2c", "--out", tmp_path / "mine.bin",
                                  "--overwrite"), "quantkit did not write")
    assert not (tmp_path / "mine.bin").exists()
    foreign = tmp_path / "theirs.bin"
    foreign.write_bytes(b"not ours")
    assert_one_line_error(run_cli("export", q8_out, "--format", "llama2c", "--out", foreign, "--overwrite"),
                          "quantkit did not write")
    assert foreign.read_bytes() == b"not ours"


def test_unsupported_inputs_are_one_line(qwen2_dir, llama_dir, tmp_path):
    assert_one_line_error(run_cli("export", qwen2_dir, "--format", "llama2c", "--out", tmp_path / "x.bin"),
                          "llama2.c runs Llama-family models")
    # conftest's word-level tokenizer: neither byte-level BPE nor SentencePiece; nothing is written
    assert_one_line_error(run_cli("export", llama_dir, "--format", "llama2c", "--out", tmp_path / "y.bin"),
                          "cannot be written to llama2.c's tokenizer.bin")
    assert list(tmp_path.iterdir()) == []


def test_rope_theta_mismatch_is_reported(tmp_path):
    from conftest import make_checkpoint, save_tokenizer  # noqa: F401 - the fixture helpers
    from test_export_gguf import save_byte_level_bpe

    source = make_checkpoint(tmp_path / "theta", "llama", vocab_size=320, rope_theta=100000.0, outlier_channels=0,
                             rms_norm_eps=float(torch.tensor(1e-5, dtype=torch.float32)))
    save_byte_level_bpe(source)
    result = quantkit.export(source, format="llama2c", out=tmp_path / "t.bin")
    assert any("RoPE theta is 100000" in note for note in result.notes), result.notes
    assert not any("epsilon" in note for note in result.notes), result.notes      # 1e-5 as float32 is runq.c's
    assert all(t.status == "requantized" for t in result.tensors)


def _runq_source():
    """llama2.c's runq.c, where QUANTKIT_LLAMA2C_SRC names a directory holding it (optional)."""
    import os
    import shutil
    from pathlib import Path

    directory = os.environ.get("QUANTKIT_LLAMA2C_SRC")
    source = Path(directory) / "runq.c" if directory else None
    if source is None or not source.is_file() or shutil.which("gcc") is None:
        pytest.skip("set QUANTKIT_LLAMA2C_SRC to a directory with llama2.c's runq.c (and have gcc) to run runq.c")
    return source


def test_runq_generates_what_load_quantized_generates(tmp_path):
    """runq.c, built from llama2.c's source, runs the exported file: its greedy ids from BOS equal quantkit's
    model's (a trained tiny Llama with runq.c's constants: RoPE theta 10000, RMSNorm epsilon 1e-5)."""
    import subprocess

    from conftest import make_checkpoint
    from test_export_gguf import VOCAB, save_byte_level_bpe, train

    source = _runq_source()
    binary = tmp_path / "runq"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), "-lm"], check=True)
    # 16 ids beyond the tokenizer's: the exported tokenizer.bin pads them (runq.c refuses empty pieces)
    model_dir = make_checkpoint(tmp_path / "tiny", "llama", vocab_size=VOCAB + 16, outlier_channels=0,
                                rms_norm_eps=1e-5)
    tokenizer = save_byte_level_bpe(model_dir)
    train(model_dir, tokenizer, steps=120)
    out = tmp_path / "q8"
    calibrate(CalibrateConfig(model=str(model_dir), out=out, scheme="q8_0", **FAST))
    quantkit.export(out, format="llama2c", out=tmp_path / "model.bin")
    ids_tokenizer = tmp_path / "ids.bin"
    with open(ids_tokenizer, "wb") as handle:          # piece of id i = " i": runq.c prints the ids
        handle.write(struct.pack("<I", 4))
        for i in range(VOCAB + 16):
            handle.write(struct.pack("<fi", 0.0, len(f" {i}")) + f" {i}".encode())
    steps = 24
    printed = subprocess.run([str(binary), str(tmp_path / "model.bin"), "-z", str(ids_tokenizer), "-t", "0",
                              "-n", str(steps)], capture_output=True, text=True, check=True).stdout
    runq_ids = [int(token) for token in printed.split()]
    model, ids = load_quantized(out).eval(), torch.tensor([[1]])
    with torch.no_grad():
        while ids.shape[1] <= len(runq_ids):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert len(runq_ids) >= steps - 1
    assert runq_ids == ids[0, 1:].tolist()
    text = subprocess.run([str(binary), str(tmp_path / "model.bin"), "-z", str(tmp_path / "model.tokenizer.bin"),
                           "-t", "0", "-n", str(steps)], capture_output=True, text=True, check=True).stdout
    decoded = tokenizer.decode(runq_ids)
    assert text.rstrip("\n") == (decoded[1:] if decoded.startswith(" ") else decoded)   # runq.c: no space after BOS
