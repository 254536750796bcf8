"""FP8 (OCP e4m3) grids: fp8_dynamic, fp8_static, w8a16_fp8. References: hand-written e4m3 values
(ties, subnormals, saturation), torch's own float8_e4m3fn cast, the float model, transformers +
compressed-tensors loading the export, and the pipeline's own RTN for the GPTQ floor."""
import pytest
import torch
from conftest import assert_one_line_error, calibrate_and_reload, run_cli
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.cuda import reference
from quantkit.exporters.compressed_tensors import export_compressed_tensors
from quantkit.exporters.gguf import export_gguf
from quantkit.formats import primitives
from quantkit.formats.schemes import SCHEMES
from quantkit.run.pipeline import CalibrateConfig, calibrate

FP8 = SCHEMES["w8a16_fp8"].weight


def test_e4m3_codes_round_ties_to_even_and_saturate():
    # scale 1 (per tensor, absmax 448): 1.0625 is halfway between 1 and 1.125 -> 1 (even mantissa);
    # 1.1875 halfway between 1.125 and 1.25 -> 1.25; 2^-10 halfway between 0 and the smallest subnormal
    # 2^-9 -> 0; 3 * 2^-10 between 2^-9 and 2^-8 -> 2^-8 (even); 240 + 8 = 248 halfway 240/256 -> 256
    w = torch.tensor([[448.0, -448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 248.0, -0.0]])
    quant = quantize_rtn(w, FP8)
    assert quant.scale.item() == 1.0 and quant.codes.dtype == torch.float8_e4m3fn
    assert quant.codes.float().tolist() == [[448.0, -448.0, 1.0, 1.25, 0.0, 2.0**-8, 256.0, 0.0]]
    # values beyond the grid saturate at +-448 (no NaN, unlike a plain cast)
    codes = primitives.quantize(torch.tensor([[900.0, -1e6]]), torch.ones(1, 1), None, 2, FP8.element)
    assert codes.float().tolist() == [[448.0, -448.0]]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_native_cast_rounding_equals_rounding_on_the_grid(name):
    """The fast path (torch's cast after saturating; fp4's piecewise rounding) against rounding computed
    from the grid values alone, on random values of every magnitude, every midpoint between grid values,
    and beyond max."""
    from quantkit.formats.numbers import element_format

    element = element_format(name)
    grid = element.values().double()
    midpoints = (grid[1:] + grid[:-1]) / 2
    torch.manual_seed(2)
    x = torch.cat([grid, midpoints, midpoints * (1 + 1e-6), midpoints * (1 - 1e-6),
                   torch.randn(20000, dtype=torch.float64) * torch.logspace(-12, 6, 20000, dtype=torch.float64),
                   torch.tensor([1e9, -1e9], dtype=torch.float64)]).float()
    assert torch.equal(element.round(x), element.round_on_grid(x))


def test_per_channel_codes_match_torch_float8_cast():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    quant = quantize_rtn(w, FP8)
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0           # fp32 scales, one per output channel
    assert torch.equal(quant.scale, scale)
    assert torch.equal(quant.codes.float(), (w / scale).to(torch.float8_e4m3fn).float())
    torch.testing.assert_close(quant.dequantize(), quant.codes.float() * scale, rtol=0, atol=0)


def test_fp8_scaled_mm_reference_is_the_dequantized_product():
    torch.manual_seed(1)
    x, w = torch.randn(5, 32), torch.randn(7, 32)
    a, a_scale = primitives.quantize_activation_per_token(x, FP8.element)
    quant = quantize_rtn(w, FP8)
    y = reference.fp8_scaled_mm(a, quant.codes, a_scale.reshape(-1), quant.scale.reshape(-1), None, torch.float64)
    expected = (a.double() * a_scale.double()) @ (quant.codes.double() * quant.scale.double()).T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(scheme="fp8_dynamic"), dict(scheme="fp8_static"),
                                     dict(scheme="w8a16_fp8"), dict(scheme="w8a16_fp8", algorithm="gptq"),
                                     dict(scheme="fp8_dynamic", algorithm="gptq"),
                                     dict(scheme="w8a16_fp8", algorithm="awq")])
def test_fp8_schemes_reload_exactly(llama_dir, tmp_path, options):
    result, reloaded = calibrate_and_reload(llama_dir, tmp_path / "out", **options)
    layer = reloaded.model.layers[0].mlp.down_proj
    assert layer.weight_codes.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32


def test_gptq_on_the_fp8_grid_beats_rtn(llama_dir, tmp_path):
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    sqnr = {}
    for algorithm in ("rtn", "gptq"):
        _, reloaded = calibrate_and_reload(llama_dir, tmp_path / algorithm, scheme="w8a16_fp8", algorithm=algorithm)
        with torch.no_grad():
            sqnr[algorithm] = primitives.sqnr_db(reference_model(tokens).logits, reloaded(tokens).logits)
    assert sqnr["gptq"] > sqnr["rtn"] + 3, sqnr      # measured 33.2 vs 23.7 dB


@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "w8a16_fp8"])
def test_compressed_tensors_float_quantized_loads_in_transformers(llama_dir, tmp_path, scheme):
    from test_export_compressed_tensors import load_export

    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "q", scheme=scheme, num_samples=8, seq_len=32))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert result.format == "float-quantized"
    model = load_export(result.out)
    ours = load_quantized(tmp_path / "q", dtype=torch.float32)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs, mine = model(tokens).logits, ours(tokens).logits
        assert torch.allclose(theirs, mine, rtol=0, atol=1e-5)
        if scheme != "w8a16_fp8":   # the runtime really quantizes activations: without them the logits move
            for module in ours.modules():
                if hasattr(module, "activation_spec"):
                    module.activation_spec = None
            assert not torch.allclose(theirs, ours(tokens).logits, rtol=0, atol=1e-5)


def test_gguf_requantizes_fp8_with_a_reason(llama_dir, tmp_path):
    from conftest import make_checkpoint
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB)
    save_byte_level_bpe(source)
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "q", scheme="w8a16_fp8", num_samples=4, seq_len=32))
    result = export_gguf(tmp_path / "q", tmp_path / "fp8.gguf")
    assert {t.status for t in result.linears if t.source != "lm_head"} == {"requantized"}
    assert all("fp8_e4m3 codes have no GGUF block type" in t.reason for t in result.linears if t.source != "lm_head")


def test_fp8_misuse_is_one_line(llama_dir, tmp_path):
    assert_one_line_error(run_cli("calibrate", llama_dir, "--scheme", "w8a16_fp8", "--bits", "4", "--out", tmp_path / "a"),
                          "fp8_e4m3 is 8-bit and symmetric")
    assert_one_line_error(run_cli("calibrate", llama_dir, "--scheme", "w8a16_fp8", "--algo", "hqq", "--seq-len", "32",
                                  "--out", tmp_path / "b"), "HQQ optimises an integer grid")


def test_recipe_mixes_fp8_and_integer_layers(llama_dir, tmp_path):
    """fp8 for the MLP, int4 for attention, in one model: reload exact, and a mixed-precision
    compressed-tensors export (float-quantized + pack-quantized groups) that transformers loads."""
    from test_export_compressed_tensors import load_export

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {scheme: w4a16, algorithm: gptq, group_size: 32, symmetric: true}\n"
                      "rules:\n  - match: 're:.*\\.mlp\\..*'\n    scheme: fp8_dynamic\n")
    result, reloaded = calibrate_and_reload(llama_dir, tmp_path / "q", recipe=recipe)
    schemes = {name.rsplit(".", 2)[-2]: entry.scheme.name for name, entry in result.manifest.layers.items()}
    assert schemes["mlp"] == "fp8_dynamic" and schemes["self_attn"] == "w4a16"
    exported = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert exported.format == "mixed-precision"
    assert {g["format"] for g in exported.groups.values()} == {"float-quantized", "pack-quantized"}
    model = load_export(exported.out)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, reloaded(tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("m, n, k, per_tensor", [(5, 32, 64, False), (7, 20, 70, False), (3, 24, 48, True)])
def test_torch_scaled_mm_wrapper_equals_the_reference(m, n, k, per_tensor):
    """The GPU backend's fp8 GEMM (torch._scaled_mm, here through torch's CPU fallback) computes what the
    reference computes, unaligned K and N included (zero-padded to 16)."""
    from quantkit.cuda import scaled_mm

    generator = torch.Generator().manual_seed(m)
    a = (torch.randn(m, k, generator=generator) * 30).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, generator=generator) * 30).to(torch.float8_e4m3fn)
    a_scale = torch.rand(1 if per_tensor else m, generator=generator) + 0.1
    w_scale = torch.rand(1 if per_tensor else n, generator=generator) + 0.1
    bias = torch.randn(n, generator=generator)
    expected = reference.fp8_scaled_mm(a, b, a_scale, w_scale, bias, torch.float64)
    got = scaled_mm.fp8_scaled_mm(a, b, a_scale, w_scale, bias, torch.float32)
    assert got.shape == (m, n)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 tensor cores (Ada/Hopper or newer)")
def test_torch_scaled_mm_on_the_gpu_within_bf16_rounding():
    from quantkit.cuda import scaled_mm

    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(33, 4096, generator=generator) * 30).to(torch.float8_e4m3fn)
    b = (torch.randn(4096 + 8, 4096, generator=generator) * 30).to(torch.float8_e4m3fn)
    a_scale, w_scale = torch.rand(33) + 0.1, torch.rand(4104) + 0.1
    expected = reference.fp8_scaled_mm(a, b, a_scale, w_scale, None, torch.float64)
    got = scaled_mm.fp8_scaled_mm(a.cuda(), b.cuda(), a_scale.cuda(), w_scale.cuda(), None, torch.float32).cpu()
    torch.testing.assert_close(got.double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())
