"""llama.cpp's K-quants (Q2_K ... Q6_K) and its K-quant file types (Q4_K_M, ...). References: gguf-py's
dequantizers (every byte layout), hand-built blocks against ggml's formulas, llama.cpp's own blocks of a
fixed input (tests/data/llama_cpp_kquants.safetensors, made by tests/data/make_llama_cpp_kquants.py), the
per-tensor types llama-quantize chooses (hand-listed), and, where llama-cpp-python is installed,
llama-quantize's files byte for byte."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_checkpoint, run_cli
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.torch import load_file

from quantkit.exporters import gguf_kquants as KP
from quantkit.exporters.gguf import export_gguf
from quantkit.formats import ggml_mixes as gguf_mixes
from quantkit.formats import kquants as K
from quantkit.run.pipeline import CalibrateConfig, calibrate

DATA = Path(__file__).parent / "data" / "llama_cpp_kquants.safetensors"


def _weights() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    w = torch.randn(12, 768, generator=generator) * torch.logspace(-3, 1, 12)[:, None]
    w[0, :256] = 0.0              # an all-zero super-block
    w[1, 16:48] = 0.0             # zero sub-blocks
    w[2] = w[2].abs()             # all positive: min 0
    return w


@pytest.mark.parametrize("name", list(K.K_FORMATS))
def test_blocks_read_back_in_gguf_py(name):
    blocks = K.quantize_reference(_weights(), name)
    data = KP.pack(blocks)
    assert data.shape == (12, 3 * K.K_FORMATS[name].type_size)
    theirs = dequantize(data, GGMLQuantizationType[name]).reshape(12, 768)
    assert torch.equal(torch.from_numpy(theirs.copy()), blocks.dequantize())
    again = KP.unpack(data, name, 768)
    for field in ("q", "sc", "m"):
        assert (getattr(again, field) is None) == (getattr(blocks, field) is None)
        if getattr(blocks, field) is not None:
            assert torch.equal(getattr(again, field), getattr(blocks, field)), field
    assert np.array_equal(KP.pack(again), data)


@pytest.mark.parametrize("name", list(K.K_FORMATS))
def test_hand_built_blocks_mean_ggmls_formula(name):
    """Fields chosen by hand -> bytes -> gguf-py: value = d * sc_j * q - dmin * m_j (Q3_K: (sc - 32)(q - 4),
    Q6_K: sc (q - 32)), sub-block j = element // sub."""
    fmt = K.K_FORMATS[name]
    per = 256 // fmt.sub
    q = (torch.arange(256) * 7 % fmt.levels).reshape(1, 256)
    sc_range = {"Q2_K": 16, "Q3_K": 64, "Q4_K": 64, "Q5_K": 64, "Q6_K": 256}[name]
    sc = (torch.arange(per) * 5 + 3) % sc_range - (128 if name == "Q6_K" else 0)
    m = (torch.arange(per) * 3 + 1) % sc_range if fmt.has_min else None
    d, dmin = torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[0.25]], dtype=torch.float16)
    blocks = K.KBlocks(fmt, q, sc.reshape(1, 1, per), None if m is None else m.reshape(1, 1, per), d,
                       dmin if fmt.has_min else None)
    theirs = torch.from_numpy(dequantize(KP.pack(blocks), GGMLQuantizationType[name]).reshape(256).copy()).double()
    j = torch.arange(256) // fmt.sub
    scale = sc[j].double() - (32 if name == "Q3_K" else 0)
    expected = 0.5 * scale * (q[0].double() - fmt.offset)
    if fmt.has_min:
        expected = expected - 0.25 * m[j].double()
    assert torch.equal(theirs, expected)


@pytest.mark.parametrize("name", list(K.K_FORMATS))
def test_reference_quantizer_is_llama_cpps(name):
    """Bit-identical to ggml's quantize_row_*_ref on the recorded input (zero blocks, constant and one-signed
    sub-blocks, outliers, tiny values)."""
    recorded = load_file(DATA)
    ours = torch.from_numpy(KP.pack(K.quantize_reference(recorded["input"], name)))
    assert torch.equal(ours, recorded[name])


@pytest.mark.parametrize("name", list(K.K_FORMATS))
def test_importance_weighted_quantizer_is_llama_cpps(name):
    """Bit-identical to ggml's quantize_*_K with an importance matrix (llama-quantize --imatrix) on the
    recorded input and importance vector (some columns of importance 0)."""
    recorded = load_file(DATA)
    ours = torch.from_numpy(KP.pack(K.quantize_weighted(recorded["input"], name, recorded["importance"])))
    assert torch.equal(ours, recorded[f"{name}.imatrix"])


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_weighted_search_of_the_32_value_types_is_llama_cpps(name):
    """llama-quantize --imatrix searches the 32-value fallback types too (quantize_q4_0 ... with the matrix):
    bit-identical on the recorded input and importance."""
    from quantkit.exporters import gguf_blocks
    from quantkit.formats.ggml_blocks import quantize_weighted_blocks

    recorded = load_file(DATA)
    ours = torch.from_numpy(gguf_blocks.pack(quantize_weighted_blocks(recorded["input"], name, recorded["importance"])))
    assert torch.equal(ours, recorded[f"{name}.imatrix"])


def test_searches_in_row_chunks_equal_one_pass(monkeypatch):
    """The sub-block searches run over at most SEARCH_ROWS sub-blocks at a time (their temporaries bounded on
    large tensors): with chunks of 7 sub-blocks every K type and the weighted 32-value types give the same
    bytes as in one pass, on the recorded input (zero blocks, importance 0 in some columns included)."""
    from quantkit.exporters import gguf_blocks
    from quantkit.formats.ggml_blocks import quantize_weighted_blocks

    recorded = load_file(DATA)
    x, importance = recorded["input"], recorded["importance"]

    def files():
        return ([KP.pack(K.quantize_weighted(x, name, importance)) for name in K.K_FORMATS]
                + [KP.pack(K.quantize_reference(x, name)) for name in K.K_FORMATS]
                + [gguf_blocks.pack(quantize_weighted_blocks(x, name, importance)) for name in ("Q4_0", "Q5_0", "Q4_1")])

    one_pass = files()
    assert x.shape[0] * x.shape[1] // 16 > 7 * 4          # several chunks for every type
    monkeypatch.setattr(K, "SEARCH_ROWS", 7)
    for expected, chunked in zip(one_pass, files(), strict=True):
        assert np.array_equal(expected, chunked)


def test_importance_lowers_the_weighted_error():
    """What the importance is for: on columns it marks as important the error falls, against the plain
    search on the same weights."""
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(64, 512, generator=generator)
    importance = torch.ones(512)
    importance[::4] = 50.0
    for name in K.K_FORMATS:
        plain = (K.quantize_reference(w, name).dequantize() - w) ** 2
        weighted = (K.quantize_weighted(w, name, importance).dequantize() - w) ** 2
        assert (weighted * importance).sum() < (plain * importance).sum(), name


def test_reference_quantizer_error_falls_with_bits():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(4))
    errors = [((K.quantize_reference(w, name).dequantize() - w) ** 2).mean().item() for name in K.K_FORMATS]
    # measured: Q2_K 0.089 ... Q6_K 3.2e-4 (ratio 3.6e-3) on unit Gaussians
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 * errors[0], errors


SHAPE = gguf_mixes.ModelShape(n_layers=8, n_gqa=1, n_expert=0, is_70b=False, tied=False)


def _types(mix, name, row_length=1024, model=SHAPE):
    return [gguf_mixes.tensor_type(mix, name.format(i=i), row_length, model)[0] for i in range(model.n_layers)]


def test_file_types_choose_what_llama_quantize_chooses():
    """llama-quantize's rules for an 8-layer dense model (use_more_bits: layers 0, 3, 6, 7)."""
    assert _types("Q4_K_M", "blk.{i}.attn_v.weight") == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert _types("Q4_K_M", "blk.{i}.ffn_down.weight") == _types("Q4_K_M", "blk.{i}.attn_v.weight")
    assert set(_types("Q4_K_M", "blk.{i}.attn_q.weight") + _types("Q4_K_M", "blk.{i}.ffn_up.weight")) == {"Q4_K"}
    assert _types("Q4_K_S", "blk.{i}.attn_v.weight") == ["Q5_K"] * 4 + ["Q4_K"] * 4
    assert _types("Q4_K_S", "blk.{i}.ffn_down.weight") == ["Q5_K"] + ["Q4_K"] * 7
    assert _types("Q3_K_M", "blk.{i}.attn_v.weight") == ["Q5_K"] * 2 + ["Q4_K"] * 6
    assert _types("Q3_K_M", "blk.{i}.ffn_down.weight") == ["Q4_K"] * 8          # 8 // 16 = 0 layers get Q5_K
    assert set(_types("Q3_K_M", "blk.{i}.attn_output.weight")) == {"Q4_K"}
    assert set(_types("Q3_K_L", "blk.{i}.attn_output.weight") + _types("Q3_K_L", "blk.{i}.ffn_down.weight")) == {"Q5_K"}
    assert set(_types("Q2_K", "blk.{i}.attn_v.weight")) == {"Q3_K"}
    gqa4 = gguf_mixes.ModelShape(8, 4, 0, False, False)
    assert set(_types("Q2_K", "blk.{i}.attn_v.weight", model=gqa4)) == {"Q4_K"}
    moe8 = gguf_mixes.ModelShape(8, 1, 8, False, False)
    assert set(_types("Q4_K_M", "blk.{i}.attn_v.weight", model=moe8) + _types("Q4_K_M", "blk.{i}.attn_k.weight", model=moe8)) == {"Q8_0"}
    assert gguf_mixes.tensor_type("Q5_K_S", "output.weight", 1024, SHAPE)[0] == "Q6_K"
    assert gguf_mixes.tensor_type("Q5_K_S", "output.weight", 576, SHAPE)[0] == "Q8_0"
    assert gguf_mixes.tensor_type("Q4_K_M", "token_embd.weight", 1024, SHAPE)[0] == "Q4_K"
    tied = gguf_mixes.ModelShape(8, 1, 0, False, True)
    assert gguf_mixes.tensor_type("Q4_K_M", "token_embd.weight", 1024, tied)[0] == "Q6_K"
    # SmolLM2's 576-wide rows: every K type falls back to its 32-block type, as llama-quantize does
    assert [gguf_mixes.tensor_type(mix, "blk.1.attn_q.weight", 576, SHAPE)[0]
            for mix in ("Q2_K", "Q3_K_S", "Q4_K_S", "Q5_K_S", "Q6_K")] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert gguf_mixes.tensor_type("Q4_K_M", "blk.1.attn_q.weight", 100, SHAPE)[0] == "F16"
    assert gguf_mixes.file_type("Q4_K") == "Q4_K_M" and gguf_mixes.file_type("Q4_0") is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float16 llama (every value exact in the F16 file llama.cpp quantizes from), 8 layers, rows of 256
    and 512, 4 query heads per kv head."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    directory = tmp_path_factory.mktemp("kq") / "model"
    make_checkpoint(directory, "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=1, num_hidden_layers=8, dtype=torch.float16)
    save_byte_level_bpe(directory)
    return directory


def test_export_float_checkpoint_as_q4_k_m(tiny, tmp_path):
    result = export_gguf(tiny, tmp_path / "q4km.gguf", ggml_type="Q4_K_M")
    assert result.file_type == "MOSTLY_Q4_K_M"
    types = {t.name: t.ggml_type for t in result.tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                                      "Q6_K", "Q6_K"]
    reader = {t.name: t for t in GGUFReader(result.out).tensors}
    source = load_file(tiny / "model.safetensors")
    down = reader["blk.2.ffn_down.weight"]
    assert down.tensor_type == GGMLQuantizationType.Q4_K
    values = torch.from_numpy(dequantize(np.asarray(down.data), down.tensor_type).reshape(256, 512).copy())
    expected = K.quantize_reference(source["model.layers.2.mlp.down_proj.weight"].float(), "Q4_K").dequantize()
    assert torch.equal(values, expected)
    assert all(t.weight_sqnr_db > 15 for t in result.linears)


def test_gptq_codes_survive_the_file_types_fallbacks(tmp_path):
    """Rows of 320 take Q5_0 under Q4_K_M (llama.cpp's fallback): int4 g32 GPTQ codes are carried into it
    exactly (q = c + 16), while the Q6_K promotions requantize with the file type's reason."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    from quantkit import load_quantized

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB, hidden_size=320, intermediate_size=640,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    save_byte_level_bpe(source)
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "q", scheme="w4a16", algorithm="gptq", group_size=32,
                              symmetric=True, num_samples=4, seq_len=32))
    result = export_gguf(tmp_path / "q", tmp_path / "q.gguf", ggml_type="Q4_K_M")
    by_name = {t.name: t for t in result.linears}
    assert (by_name["blk.1.ffn_up.weight"].ggml_type, by_name["blk.1.ffn_up.weight"].status) == ("Q5_0", "exact")
    promoted = by_name["blk.0.ffn_down.weight"]
    assert promoted.ggml_type == "Q8_0" and promoted.status == "exact"        # Q6_K falls back to Q8_0: carried too
    model = load_quantized(tmp_path / "q", dtype=torch.float32)
    tensor = next(t for t in GGUFReader(result.out).tensors if t.name == "blk.1.ffn_up.weight")
    values = torch.from_numpy(dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(640, 320).copy())
    assert torch.equal(values, model.model.layers[1].mlp.up_proj.dequantized_weight())


def test_unknown_file_type_is_one_line(tiny, tmp_path):
    assert_one_line_error(run_cli("export", tiny, "--format", "gguf", "--type", "Q4_K_X", "--out", tmp_path / "x.gguf"),
                          "unknown GGUF type 'Q4_K_X'; did you mean Q4_K_S, Q4_K_M")


# --------------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.parametrize("mix", list(gguf_mixes.BASE_TYPES))
def test_files_equal_llama_quantizes_byte_for_byte(mix, tiny, tmp_path):
    """Our export of the float model under each file type against llama-quantize's of our F16 export of it:
    every tensor's type and bytes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    export_gguf(tiny, tmp_path / "f16.gguf", ggml_type="F16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(), str(tmp_path / "lc.gguf").encode(),
                                          params) == 0
    export_gguf(tiny, tmp_path / "ours.gguf", ggml_type=mix)
    theirs = {t.name: t for t in GGUFReader(tmp_path / "lc.gguf").tensors}
    ours = {t.name: t for t in GGUFReader(tmp_path / "ours.gguf").tensors}
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert ours[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(ours[name].data), np.asarray(tensor.data)), name


GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _model_with_the_files_weights(source, gguf_path):
    """The float llama with every quantized tensor replaced by the file's own values (gguf-py's
    dequantization, llama.cpp's rotary row order undone): what llama.cpp should compute."""
    from transformers import AutoModelForCausalLM

    from quantkit.exporters.gguf import rotary_row_permutation

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = model.config
    state = model.state_dict()
    for tensor in GGUFReader(gguf_path).tensors:
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in GGUF_TO_HF:
            name = f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"
        else:
            continue
        rows, cols = state[name].shape
        values = torch.from_numpy(dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(rows, cols).copy())
        if parts[-2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if parts[-2] == "attn_q" else config.num_key_value_heads
            values = values[torch.argsort(rotary_row_permutation(rows, heads))]
        state[name] = values.float()
    model.load_state_dict(state)
    return model


def test_llama_cpp_runs_a_q4_k_m_file(tmp_path):
    """llama.cpp loads and runs our Q4_K_M file and computes what its weights mean: against the float
    model carrying the file's dequantized weights (llama.cpp rounds activations to 8 bits for its
    K-quant dot products, so close, not exact; the float model itself is 0.49 top-1 away on this sharp
    random model)."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_export_gguf import VOCAB, save_byte_level_bpe

    from benchmarks.common import llama_cpp_logits, next_token_agreement

    source = make_checkpoint(tmp_path / "m", "llama", seed=12, vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.08, outlier_channels=0)
    save_byte_level_bpe(source)
    result = export_gguf(source, tmp_path / "q4km.gguf", ggml_type="Q4_K_M")
    windows = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    model = _model_with_the_files_weights(source, result.out)
    with torch.no_grad():
        ours = torch.cat([model(w[None]).logits for w in windows])
    top1, kl = next_token_agreement(ours, llama_cpp_logits(result.out, windows))
    assert top1 > 0.9 and kl < 1e-2, (top1, kl)


def _imatrix_for(gguf_path, generator_seed=0):
    """An importance matrix for every linear weight of a GGUF file (random sums, 1000 tokens)."""
    from quantkit.exporters.gguf_imatrix import ImportanceMatrix

    generator = torch.Generator().manual_seed(generator_seed)
    names = [(t.name, int(t.shape[0])) for t in GGUFReader(gguf_path).tensors
             if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name]
    sums = {name: torch.rand(1, n, generator=generator) ** 4 * 1000 for name, n in names}
    return ImportanceMatrix(sums, {name: torch.tensor([1000.0]) for name, _ in names}, ["calibration.txt"], 4, 256)


def test_imatrix_files_round_trip_in_llama_cpps_format(tmp_path):
    from quantkit.exporters.gguf_imatrix import (
        ImportanceMatrix,
        read_imatrix,
        write_imatrix,
    )

    matrix = ImportanceMatrix({"blk.0.ffn_down_exps.weight": torch.rand(3, 512)},
                              {"blk.0.ffn_down_exps.weight": torch.tensor([10.0, 0.0, 4.0])}, ["a.txt", "b.txt"], 7, 512)
    write_imatrix(tmp_path / "m.imatrix.gguf", matrix)
    reader = GGUFReader(tmp_path / "m.imatrix.gguf")
    assert reader.fields["general.type"].contents() == "imatrix" and "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["a.txt", "b.txt"]
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_down_exps.weight.in_sum2"].tensor_type == GGMLQuantizationType.F32
    assert list(tensors["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 3]      # ggml order: ne0 = 1, ne1 = 3
    again = read_imatrix(tmp_path / "m.imatrix.gguf")
    assert torch.equal(again.sums["blk.0.ffn_down_exps.weight"], matrix.sums["blk.0.ffn_down_exps.weight"])
    assert (again.chunk_count, again.chunk_size) == (7, 512)
    # llama-quantize's normalisation: sums / count, and 1 for an expert that saw no token
    assert torch.equal(again.importance("blk.0.ffn_down_exps.weight", 2), matrix.sums["blk.0.ffn_down_exps.weight"][2] / 4)
    assert torch.equal(again.importance("blk.0.ffn_down_exps.weight", 1), torch.ones(512))


def test_export_with_an_imatrix_uses_llama_cpps_weighted_search(tiny, tmp_path):
    from quantkit.exporters.gguf_imatrix import write_imatrix

    plain = export_gguf(tiny, tmp_path / "plain.gguf", ggml_type="Q4_K_M")
    matrix = _imatrix_for(plain.out)
    write_imatrix(tmp_path / "m.imatrix.gguf", matrix)
    weighted = export_gguf(tiny, tmp_path / "weighted.gguf", ggml_type="Q4_K_M", imatrix=tmp_path / "m.imatrix.gguf")
    source = load_file(tiny / "model.safetensors")
    tensor = next(t for t in GGUFReader(weighted.out).tensors if t.name == "blk.2.ffn_up.weight")
    expected = K.quantize_weighted(source["model.layers.2.mlp.up_proj.weight"].float(), "Q4_K",
                                   matrix.sums["blk.2.ffn_up.weight"][0] / 1000.0)
    assert np.array_equal(np.asarray(tensor.data), KP.pack(expected))
    plain_tensor = next(t for t in GGUFReader(plain.out).tensors if t.name == "blk.2.ffn_up.weight")
    assert not np.array_equal(np.asarray(tensor.data), np.asarray(plain_tensor.data))


def test_imatrix_misuse_is_one_line(tiny, tmp_path):
    from quantkit.exporters.gguf_imatrix import ImportanceMatrix, write_imatrix

    plain = export_gguf(tiny, tmp_path / "f16.gguf", ggml_type="F16")
    assert_one_line_error(run_cli("export", tiny, "--format", "gguf", "--type", "Q4_K_M", "--imatrix", plain.out,
                                  "--out", tmp_path / "a.gguf"), "is a GGUF file but not an importance matrix")
    assert_one_line_error(run_cli("export", tiny, "--format", "gguf", "--type", "Q4_K_M", "--imatrix",
                                  tmp_path / "none.gguf", "--out", tmp_path / "b.gguf"), "imatrix file not found")
    wrong = ImportanceMatrix({"blk.0.ffn_up.weight": torch.ones(1, 100)}, {"blk.0.ffn_up.weight": torch.ones(1)})
    write_imatrix(tmp_path / "wrong.imatrix.gguf", wrong)
    assert_one_line_error(run_cli("export", tiny, "--format", "gguf", "--type", "Q4_K_M", "--imatrix",
                                  tmp_path / "wrong.imatrix.gguf", "--out", tmp_path / "c.gguf"),
                          "computed for another model")
    assert not (tmp_path / "c.gguf").exists()
