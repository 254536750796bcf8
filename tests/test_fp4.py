"""MXFP4, NVFP4 and FP8 block grids. References: hand-written values (MX power-of-two scales, NVFP4's
two-level scales, fp4 nibbles and bytes), compressed-tensors' own scale functions on the same weights,
transformers + compressed-tensors loading the exports, gguf-py's MXFP4 reader, and our RTN as the floor
GPTQ must beat."""
import json

import pytest
import torch
from conftest import assert_one_line_error, calibrate_and_reload, run_cli
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.algorithms.gptq import gptq_quantize
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.errors import QuantkitError
from quantkit.exporters.compressed_tensors import export_compressed_tensors
from quantkit.formats import packing, primitives
from quantkit.formats.numbers import element_format
from quantkit.formats.schemes import SCHEMES, ActivationSpec, WeightSpec
from quantkit.run.pipeline import CalibrateConfig, calibrate

MXFP4 = SCHEMES["mxfp4a16"].weight
NVFP4 = SCHEMES["nvfp4a16"].weight
FP8_BLOCK = SCHEMES["fp8_block"].weight
FP4 = element_format("fp4_e2m1")


def test_mx_scales_are_powers_of_two_from_the_rounded_block_max():
    # absmax 6 = 1.5 * 2^2 -> 2^(2-2) = 1; 7 = 1.75 * 2^2 rounds up -> 2; 6.9 = 1.725 * 2^2 -> 1 (6.9
    # saturates to 6); 3.4 = 1.7 * 2 -> 0.5; 0.75 = 1.5 * 2^-1 -> 2^-3; an all-zero block -> 2^-127
    absmax = torch.tensor([6.0, 7.0, 6.9, 3.4, 0.75, 0.0])
    assert primitives.mx_scale(absmax, FP4).tolist() == [1.0, 2.0, 1.0, 0.5, 0.125, 2.0**-127]
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([6.9, -2.6, 0.2, 1.25])          # block 1: scale 1
    w[0, 32:35] = torch.tensor([7.0, -1.0, 5.0])              # block 2: scale 2
    quant = quantize_rtn(w, MXFP4)
    assert quant.scale.tolist() == [[1.0, 2.0]] and quant.codes.dtype == torch.float8_e4m3fn
    # 6.9 -> 6 (saturated), -2.6 -> -3, 0.2 -> 0, 1.25 -> 1 (tie to even); 3.5 -> 4 (tie), -0.5, 2.5 -> 2 (tie)
    assert quant.codes[0, :4].float().tolist() == [6.0, -3.0, 0.0, 1.0]
    assert quant.codes[0, 32:35].float().tolist() == [4.0, -0.5, 2.0]
    assert quant.dequantize()[0, 32:35].tolist() == [8.0, -1.0, 4.0]


def test_nvfp4_two_level_scales_by_hand():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 12.0, -3.0          # group 1: absmax 12 = the tensor's
    w[0, 16], w[0, 17] = 1.0, 0.3          # group 2: absmax 1
    quant = quantize_rtn(w, NVFP4)
    # G = 448 * 6 / 12 = 224; group 1: 12 / 6 * 224 = 448 (fp8 max) -> step 2; group 2: 224 / 6 = 37.33 -> fp8 36
    assert quant.global_scale.tolist() == [224.0]
    assert quant.scale.tolist() == [[448.0, 36.0]]
    step = 36.0 / 224.0
    # 12 / 2 = 6, -3 / 2 = -1.5; 1 / step = 6.22 -> 6 (saturated); 0.3 / step = 1.87 -> 2
    assert quant.codes[0, [0, 1, 16, 17]].float().tolist() == [6.0, -1.5, 6.0, 2.0]
    torch.testing.assert_close(quant.dequantize()[0, [16, 17]], torch.tensor([6 * step, 2 * step]), rtol=0, atol=0)


def test_scales_equal_compressed_tensors_own_functions():
    """The same weights through compressed-tensors' generate_mx_scales / generate_gparam / fp8 rounding."""
    from compressed_tensors.quantization.utils.helpers import generate_gparam
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]
    mx = quantize_rtn(w, MXFP4)
    absmax = w.abs().reshape(48, 8, 32).amax(dim=-1)
    assert torch.equal(mx.scale, torch.exp2(generate_mx_scales(absmax) - 127))
    nv = quantize_rtn(w, NVFP4)
    gparam = generate_gparam(w.min(), w.max())
    assert torch.equal(nv.global_scale, gparam)
    local = (w.abs().reshape(48, 16, 16).amax(dim=-1) / 6.0 * gparam).to(torch.float8_e4m3fn).float()
    assert torch.equal(nv.scale, local)


def test_fp4_nibbles_and_bytes():
    codes = torch.tensor([[0.5, -6.0, 0.0, 1.5, -0.5, 3.0, 4.0]]).to(torch.float8_e4m3fn)
    packed = packing.pack_fp4(codes)
    # patterns: 0.5 -> 0b0001, -6 -> 0b1111, 0 -> 0, 1.5 -> 0b0011, -0.5 -> 0b1001, 3 -> 0b0101, 4 -> 0b0110
    assert packed.tolist() == [[0xF1, 0x30, 0x59, 0x06]]
    assert torch.equal(packing.unpack_fp4(packed, 7).float(), codes.float())
    every = torch.tensor([FP4.grid]).to(torch.float8_e4m3fn)
    assert torch.equal(packing.unpack_fp4(packing.pack_fp4(every), len(FP4.grid)).float(), every.float())


def test_fp8_blocks_have_one_scale_per_tile_and_ragged_edges():
    torch.manual_seed(1)
    w = torch.randn(200, 300)
    quant = quantize_rtn(w, FP8_BLOCK)
    assert quant.scale.shape == (2, 3)
    for (r, c) in [(0, 0), (1, 2), (0, 2), (1, 0)]:
        tile = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
        assert quant.scale[r, c].item() == (tile.abs().max() / 448.0).item()
    expected = (w / quant.scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300])
    assert torch.equal(quant.codes.float(), expected.to(torch.float8_e4m3fn).float())


def test_group_activation_grids_by_hand():
    x = torch.zeros(2, 64)
    x[0, 0], x[0, 40] = 7.0, 0.75           # MX: group 1 scale 2 (7 -> 3.5 -> 4 -> 8); group 2 scale 2^-3
    x[1, 5] = -3.4
    mx = ActivationSpec(4, "group", True, "fp4_e2m1", group_size=32, scale_format="e8m0")
    out = primitives.fake_quantize_activation(x, mx)
    assert out[0, 0].item() == 8.0 and out[0, 40].item() == 0.75 and out[1, 5].item() == -3.0
    fp8 = SCHEMES["fp8_block"].activation
    y = torch.randn(3, 200)
    scales = y[:, :128].abs().amax(dim=1, keepdim=True) / 448.0
    expected = (y[:, :128] / scales).to(torch.float8_e4m3fn).float() * scales
    assert torch.equal(primitives.fake_quantize_activation(y, fp8)[:, :128], expected)
    nv = SCHEMES["nvfp4"].activation
    glob = primitives.activation_global_scale(torch.tensor(-12.0), torch.tensor(3.0), nv)
    assert glob.tolist() == [224.0]
    z = torch.zeros(1, 16)
    z[0, 0], z[0, 1] = 1.0, 0.3
    step = 36.0 / 224.0                      # as the weight case: fp8(224 / 6) = 36
    torch.testing.assert_close(primitives.fake_quantize_activation(z, nv, global_scale=glob)[0, :2],
                               torch.tensor([6 * step, 2 * step]), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [MXFP4, NVFP4, FP8_BLOCK], ids=["mxfp4", "nvfp4", "fp8_block"])
def test_gptq_beats_rtn_on_float_grids(spec):
    torch.manual_seed(2)
    w = torch.randn(96, 256)
    x = torch.randn(2048, 256) * torch.linspace(0.1, 3, 256)
    hessian = 2 * x.T @ x / x.shape[0]
    rtn = quantize_rtn(w, spec)
    gptq, _ = gptq_quantize(w, hessian, spec)
    error = {name: (x @ (w - q.dequantize()).T).pow(2).mean().item() for name, q in (("rtn", rtn), ("gptq", gptq))}
    assert error["gptq"] < 0.95 * error["rtn"], error
    assert torch.equal(gptq.scale, rtn.scale)          # static groups: the grid is RTN's, the codes differ


@pytest.mark.parametrize("options", [dict(scheme="mxfp4a16"), dict(scheme="mxfp4", algorithm="gptq"),
                                     dict(scheme="nvfp4a16", algorithm="gptq"), dict(scheme="nvfp4"),
                                     dict(scheme="nvfp4a16", algorithm="awq"), dict(scheme="fp8_block"),
                                     dict(scheme="fp8_block", algorithm="gptq")])
def test_fp4_and_block_schemes_reload_exactly(llama_dir, tmp_path, options):
    result, reloaded = calibrate_and_reload(llama_dir, tmp_path / "out", **options)
    layer = reloaded.model.layers[0].mlp.down_proj
    scheme = SCHEMES[options["scheme"]]
    assert layer.weight_spec == scheme.weight
    expected_dtype = {"e8m0": torch.float8_e8m0fnu, "fp8_e4m3": torch.float8_e4m3fn, "fp32": torch.float32}
    assert layer.weight_scale.dtype == expected_dtype[scheme.weight.scale_format]
    assert (layer.weight_global_scale is not None) == (scheme.weight.second_scale is not None)
    if scheme.activation is not None and scheme.activation.second_scale is not None:
        assert layer.input_global_scale is not None and layer.input_global_scale.item() > 0


def test_gptq_on_fp4_grids_beats_rtn_end_to_end(llama_dir, tmp_path):
    reference_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    for scheme in ("nvfp4a16", "mxfp4a16"):
        sqnr = {}
        for algorithm in ("rtn", "gptq"):
            _, reloaded = calibrate_and_reload(llama_dir, tmp_path / f"{scheme}-{algorithm}", scheme=scheme,
                                               algorithm=algorithm)
            with torch.no_grad():
                sqnr[algorithm] = primitives.sqnr_db(reference_model(tokens).logits, reloaded(tokens).logits)
        assert sqnr["gptq"] > sqnr["rtn"] + 1, (scheme, sqnr)


@pytest.mark.parametrize("scheme, expected_format", [("nvfp4a16", "nvfp4-pack-quantized"),
                                                     ("mxfp4a16", "mxfp4-pack-quantized")])
def test_compressed_tensors_fp4_weights_load_in_transformers(llama_dir, tmp_path, scheme, expected_format):
    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "q", scheme=scheme, algorithm="gptq",
                              num_samples=8, seq_len=32))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert result.format == expected_format
    assert_export_matches(result.out, load_quantized(tmp_path / "q", dtype=torch.float32))


@pytest.mark.parametrize("scheme, expected_format", [("nvfp4", "nvfp4-pack-quantized"),
                                                     ("mxfp4", "mxfp4-pack-quantized")])
def test_compressed_tensors_fp4_activations_mean_what_ours_do(llama_dir, tmp_path, scheme, expected_format):
    """W4A4: the weights as in the weight-only test; the activation grid through compressed-tensors' own
    dynamic-scale and fake-quantize functions, with the config's args and the exported global scale, in
    float32, equals each of our layers' input quantization exactly; and transformers runs the compressed
    model (bfloat16, as FP4 decompresses) closer to ours than our model without its activation grid is."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import (
        compute_dynamic_scales_and_zp,
    )
    from safetensors.torch import load_file

    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "q", scheme=scheme, num_samples=8, seq_len=32))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert result.format == expected_format
    ours = load_quantized(tmp_path / "q", dtype=torch.float32)
    config = json.loads((result.out / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**config["config_groups"]["group_0"]["input_activations"])
    tensors = load_file(result.out / "model.safetensors")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7)) * 4
    for name, module in ours.named_modules():
        if hasattr(module, "weight_codes"):
            glob = tensors.get(f"{name}.input_global_scale")
            assert (glob is None) == (scheme == "mxfp4")
            scale, zero = compute_dynamic_scales_and_zp(x, args, module, global_scale=glob)
            theirs = fake_quantize(x, scale, zero, args, global_scale=glob)
            assert torch.equal(theirs, module.quantize_input(x)), name
    assert_export_matches(result.out, ours)     # dequantized: the activation grid dropped on both sides
    assert_runtime_matches(result.out, tmp_path / "q")


def test_compressed_tensors_fp8_block_runs_in_transformers(tmp_path):
    """FP8 blocks with per-token-group activations (128 channels: the model's dims are multiples of 128, as
    compressed-tensors' and vLLM's group kernels need)."""
    from conftest import make_checkpoint

    source = make_checkpoint(tmp_path / "m", "llama", hidden_size=128, intermediate_size=384)
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "q", scheme="fp8_block", algorithm="gptq",
                              num_samples=8, seq_len=32))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert result.format == "float-quantized"
    config = json.loads((result.out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert config["weights"]["block_structure"] == [128, 128] and config["input_activations"]["group_size"] == 128
    assert_runtime_matches(result.out, tmp_path / "q")


def test_fp8_block_activation_groups_that_do_not_divide_are_refused(llama_dir, tmp_path):
    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "q", scheme="fp8_block", num_samples=4,
                              seq_len=32))
    with pytest.raises(QuantkitError, match="input dim 64 is not a multiple of the activation group size 128"):
        export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def assert_runtime_matches(export_dir, native_dir, min_sqnr_db: float | None = None):
    """compressed-tensors' own forward (weights decompressed, activations quantized as the config says)
    against ours. FP4 weights decompress to bfloat16 on the CPU, where compressed-tensors also rounds the
    effective scales to bfloat16, so FP4 models run in bfloat16 on both sides and must only be closer to
    ours than our model without its activation grid (fp32 otherwise, where they must agree to 1e-5)."""
    from test_export_compressed_tensors import load_export

    config = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    fp4 = any("fp4" in (group.get("format") or config["format"]) for group in config["config_groups"].values())
    dtype = torch.bfloat16 if fp4 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=dtype).eval() if fp4 else load_export(export_dir)
    ours = load_quantized(native_dir, dtype=dtype)
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs, mine = model(tokens).logits.float(), ours(tokens).logits.float()
        for module in ours.modules():
            if getattr(module, "activation_spec", None) is not None:
                module.activation_spec = None
        unquantized = ours(tokens).logits.float()
    difference, activation_effect = (theirs - mine).abs().max().item(), (unquantized - mine).abs().max().item()
    if min_sqnr_db is not None:       # a model mixing grids: bfloat16 agreement only
        assert primitives.sqnr_db(mine, theirs) > min_sqnr_db
        return
    # measured: MXFP4 and FP8 blocks 0 (identical), NVFP4 0.08 against an activation effect of 0.18
    assert difference < (activation_effect if fp4 else 1e-5), (difference, activation_effect)
    assert activation_effect > 1e-3


def assert_export_matches(export_dir, ours):
    """transformers + compressed-tensors decompress FP4 layers to bfloat16 on the CPU (CT's
    ``unpack_fp4_from_uint8`` dtype): their weights must be ours rounded to bfloat16, exactly (MXFP4's
    code * 2^E is exact in bfloat16, so there they are ours), and with our weights rounded the same way
    the logits, activation quantization included, must agree."""
    from test_export_compressed_tensors import load_export

    model = load_export(export_dir, dequantize=True)
    ours_grids = {}
    for param in model.parameters():       # model.float() is refused for quantized models
        param.data = param.data.float()
    theirs_by_name = dict(model.named_modules())
    for name, module in ours.named_modules():
        if hasattr(module, "weight_codes"):
            weight = module.dequantized_weight()
            if module.weight_spec.format == "fp4_e2m1":
                weight = weight.to(torch.bfloat16).float()
                module._cached_weight = ((torch.float32, weight.device), weight)
            assert torch.equal(theirs_by_name[name].weight, weight), name
    for module in ours.modules():           # dequantized models carry no activation grid
        if getattr(module, "activation_spec", None) is not None:
            ours_grids[module] = module.activation_spec
            module.activation_spec = None
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs, mine = model(tokens).logits, ours(tokens).logits
    for module, spec in ours_grids.items():
        module.activation_spec = spec
    assert torch.allclose(theirs, mine, rtol=0, atol=1e-4), (theirs - mine).abs().max()


def test_recipe_mixes_nvfp4_fp8_and_int4(llama_dir, tmp_path):
    """NVFP4 by default, int4 attention, fp8 W8A8 down projections: one model, one mixed-precision export
    that transformers runs (compressed, in bfloat16: its dequantize-on-load path refuses mixed formats)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {scheme: nvfp4a16, algorithm: gptq}\n"
                      "rules:\n  - match: 're:.*\\.self_attn\\..*'\n    scheme: w4a16\n    group_size: 32\n    symmetric: true\n"
                      "  - match: 're:.*\\.down_proj'\n    scheme: fp8_dynamic\n")
    result, reloaded = calibrate_and_reload(llama_dir, tmp_path / "q", recipe=recipe)
    exported = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    assert exported.format == "mixed-precision"
    assert {g["format"] for g in exported.groups.values()} == {"nvfp4-pack-quantized", "float-quantized",
                                                               "pack-quantized"}
    assert_runtime_matches(exported.out, tmp_path / "q", min_sqnr_db=30)   # measured 33.5 dB in bfloat16


def test_gguf_carries_mxfp4_exactly_and_requantizes_nvfp4(tmp_path):
    import numpy as np
    from conftest import make_checkpoint
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from test_export_gguf import VOCAB, save_byte_level_bpe

    from quantkit.exporters.gguf import export_gguf

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB)
    save_byte_level_bpe(source)
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "mx", scheme="mxfp4a16", algorithm="gptq",
                              num_samples=4, seq_len=32))
    result = export_gguf(tmp_path / "mx", tmp_path / "mx.gguf")
    carried = [t for t in result.linears if t.source != "lm_head"]
    assert {(t.ggml_type, t.status) for t in carried} == {("MXFP4", "exact")}
    ours = load_quantized(tmp_path / "mx", dtype=torch.float32)
    reader = GGUFReader(tmp_path / "mx.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    values = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(64, 160)
    assert torch.equal(torch.from_numpy(values.copy()), ours.model.layers[0].mlp.down_proj.dequantized_weight())
    calibrate(CalibrateConfig(model=str(source), out=tmp_path / "nv", scheme="nvfp4a16", num_samples=4, seq_len=32))
    nv = export_gguf(tmp_path / "nv", tmp_path / "nv.gguf")
    assert {t.status for t in nv.linears if t.source != "lm_head"} == {"requantized"}
    assert all("fp4_e2m1 codes with fp8_e4m3 scales" in t.reason for t in nv.linears if t.source != "lm_head")


def test_float_grid_misuse_is_one_line(llama_dir, tmp_path):
    assert_one_line_error(run_cli("calibrate", llama_dir, "--scheme", "nvfp4a16", "--asym", "--out", tmp_path / "a"),
                          "fp4_e2m1 is 4-bit and symmetric")
    assert_one_line_error(run_cli("calibrate", llama_dir, "--scheme", "mxfp4a16", "--algo", "hqq", "--seq-len", "32",
                                  "--out", tmp_path / "b"), "HQQ optimises an integer grid")
    with pytest.raises(QuantkitError, match="no weight grid has fp4_e2m1 codes with e8m0 scales per channel"):
        WeightSpec(4, "channel", True, scale_format="e8m0", format="fp4_e2m1")


def test_group_scaled_mm_is_the_dequantized_product():
    from quantkit.cuda import reference

    generator = torch.Generator().manual_seed(8)
    grid = FP4.values()
    a = grid[torch.randint(0, len(grid), (5, 40), generator=generator)]
    b = grid[torch.randint(0, len(grid), (7, 40), generator=generator)]
    a_scale, w_scale = torch.rand(5, 3, generator=generator), torch.rand(7, 3, generator=generator)
    y = reference.group_scaled_mm(a, a_scale, b.to(torch.float8_e4m3fn), w_scale, 16, None, torch.float64)
    columns = torch.arange(40) // 16
    expected = (a.double() * a_scale.double()[:, columns]) @ (b.double() * w_scale.double()[:, columns]).T
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4a16", "fp8_block"])
def test_validate_covers_microscaled_grids(llama_dir, tmp_path, scheme):
    """validate runs every layer through the block-scaled GEMM reference (codes multiplied per group,
    then scaled) and compares it with the model's dequantize-then-multiply layers."""
    from quantkit.check.validate import ValidateConfig, validate

    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "q", scheme=scheme, num_samples=4, seq_len=32))
    report = validate(ValidateConfig(tmp_path / "q", backend="reference", device="cpu", num_samples=2, seq_len=32))
    assert report.passed, report.failures
    assert all(layer.kernel_sqnr_db > 80 and layer.kernel_max_rel_error < 1e-4 for layer in report.layers.values())


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_nvfp4_layers_vllm_fuses_share_one_global_scale(llama_dir, tmp_path, algorithm):
    """vLLM runs q/k/v and gate/up as one GEMM with one weight_global_scale (the largest of the shards',
    which would rescale the others wrongly): they share the smallest of their own, as llm-compressor does;
    o_proj and down_proj keep theirs."""
    from transformers import AutoModelForCausalLM

    result, reloaded = calibrate_and_reload(llama_dir, tmp_path / "q", scheme="nvfp4a16", algorithm=algorithm)
    source = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    for index in range(2):
        attention, mlp = reloaded.model.layers[index].self_attn, reloaded.model.layers[index].mlp
        float_attention, float_mlp = source.model.layers[index].self_attn, source.model.layers[index].mlp
        for fused, originals in (((attention.q_proj, attention.k_proj, attention.v_proj),
                                  (float_attention.q_proj, float_attention.k_proj, float_attention.v_proj)),
                                 ((mlp.gate_proj, mlp.up_proj), (float_mlp.gate_proj, float_mlp.up_proj))):
            expected = 448.0 * 6.0 / max(float(m.weight.abs().max()) for m in originals)
            for module in fused:
                assert module.weight_global_scale.item() == pytest.approx(expected, rel=1e-6)
        own = 448.0 * 6.0 / float(float_mlp.down_proj.weight.abs().max())
        assert mlp.down_proj.weight_global_scale.item() == pytest.approx(own, rel=1e-6)
