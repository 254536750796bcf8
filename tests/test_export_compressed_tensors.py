"""compressed-tensors export, proven in its consumer: transformers with the compressed-tensors package.

References are independent of the exporter: compressed-tensors' own unpacking and decompression for
the tensor layout, quantkit's own model (`load_quantized`) for logits, and the package's pydantic
config model for `quantization_config`.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.formats import primitives
from quantkit.model.checkpoint import Checkpoint
from quantkit.check.evaluate import compare, eval_windows
from quantkit.exporters.compressed_tensors import export_compressed_tensors
from quantkit.native.manifest import Manifest
from quantkit.native.loader import load_quantized
from quantkit.run.pipeline import CalibrateConfig, calibrate

from conftest import assert_one_line_error, run_cli, tiny_text
from test_export_gguf import trained_bpe_llama

compressed_tensors = pytest.importorskip("compressed_tensors")

FAST = dict(num_samples=4, seq_len=32)

# scheme options -> (format, whether the consumer computes exactly what quantkit computes).
# alpha is fixed only to skip the per-block SmoothQuant alpha search, which the export does not depend on.
CASES = {
    "w4a16-g32-asym": (dict(scheme="w4a16", group_size=32), "pack-quantized", True),
    "w4a16-g32-sym": (dict(scheme="w4a16", group_size=32, symmetric=True), "pack-quantized", True),
    "w8a16": (dict(scheme="w8a16"), "pack-quantized", True),
    "smq_q8i8f16_0": (dict(scheme="smq_q8i8f16_0", alpha=0.5), "int-quantized", True),
    "smq_q8i8f16_1": (dict(scheme="smq_q8i8f16_1", alpha=0.5), "int-quantized", True),
    "smq_q8i8f16_2": (dict(scheme="smq_q8i8f16_2", alpha=0.5), "int-quantized", True),
    # dynamic per-token: compressed-tensors' CPU reference uses absmax/127.5, quantkit (and vLLM) absmax/127;
    # exact against quantkit computing the consumer's definition (`consumer_per_token`)
    "w8a8_dynamic": (dict(scheme="w8a8_dynamic", alpha=0.5), "int-quantized", False),
    "w4a8-g32": (dict(scheme="w4a8", group_size=32, alpha=0.5), "int-quantized", False),
}


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """Trained briefly on the tiny text with a byte-level BPE tokenizer: its predictions inside words have
    real margins, so top-1 agreement means something (a random model's near-uniform logits flip on any noise)."""
    return trained_bpe_llama(tmp_path_factory)


@pytest.fixture(scope="module")
def windows(trained_llama):
    """6 windows x 64 tokens of held-out text: 378 predicted tokens."""
    return eval_windows(Checkpoint(trained_llama).tokenizer(), tiny_text(3000, seed=7), 64, 6)


def consumer_per_token(x, bits):
    """compressed-tensors' CPU definition of dynamic symmetric per-token codes (calculate_qparams):
    scale = absmax / ((qmax - qmin) / 2) = absmax / 127.5, codes = clamp(round(x / scale), -128, 127)."""
    qmin, qmax = primitives.signed_range(bits)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=primitives.MIN_ACTIVATION_SCALE)
    return torch.round(xf / scale).clamp(qmin, qmax).to(torch.int8), scale


_quantkit_fake_quantize = primitives.fake_quantize_activation


def consumer_fake_quantize(x, spec, scale=None, zero=None, global_scale=None):
    """quantkit's QuantLinear activation path with the consumer's per-token scale."""
    if not spec.dynamic:
        return _quantkit_fake_quantize(x, spec, scale, zero, global_scale)
    codes, token_scale = consumer_per_token(x, spec.bits)
    return (codes.float() * token_scale).to(x.dtype)


def quantize(source, out, **options):
    calibrate(CalibrateConfig(model=str(source), out=out, overwrite=True, **FAST, **options))
    return out


def load_export(path, dequantize=False):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()


def assert_matches(model, reference, windows):
    """The issue's acceptance test: top-1 agreement >= 99% and perplexity within 0.5%."""
    result = compare(model, reference, windows)
    assert result.top1_agreement >= 0.99, result
    assert abs(result.perplexity / result.reference_perplexity - 1) < 0.005, result


@torch.no_grad()
def max_logit_difference(model, reference, windows):
    return float((model(windows).logits - reference(windows).logits).abs().max())


def rewrite(directory, edit):
    """Test-side surgery on a quantkit output: edit(manifest, tensors) mutates both, which are saved back."""
    manifest = Manifest.load(directory)
    tensors = load_file(directory / "model.safetensors")
    edit(manifest, tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    manifest.save(directory)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_matching_logits(trained_llama, windows, tmp_path, case, monkeypatch):
    from compressed_tensors.quantization import QuantizationConfig

    options, expected_format, exact = CASES[case]
    source = quantize(trained_llama, tmp_path / "q", **options)
    result = export_compressed_tensors(source, tmp_path / "ct")
    config = json.loads((result.out / "config.json").read_text())["quantization_config"]
    assert config["format"] == expected_format and config["quant_method"] == "compressed-tensors"
    assert config["ignore"] == ["lm_head"] and config["config_groups"]["group_0"]["targets"] == ["Linear"]
    QuantizationConfig.model_validate(config)       # the package's own schema accepts it
    # transformers 5.24 + compressed-tensors 0.20 cannot load *any* asymmetric pack-quantized checkpoint on
    # the default (compressed) path (a zero-point shape mismatch, also for files the package writes itself):
    # those load with dequantize=True, the package's decompressor run at load time.
    asymmetric_packed = expected_format == "pack-quantized" and not config["config_groups"]["group_0"]["weights"][
        "symmetric"]
    model = load_export(result.out, dequantize=asymmetric_packed)
    reference = load_quantized(source, dtype=torch.float32)
    assert_matches(model, reference, windows)
    if not exact:   # the file is exact; only the runtime's dynamic scale differs: compute it the consumer's way
        monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert max_logit_difference(model, reference, windows) < 1e-4


@pytest.mark.parametrize("options", [dict(scheme="w4a16", group_size=32), dict(scheme="w4a16", group_size=32,
                                                                                 symmetric=True, bits=3)])
def test_packed_tensors_decompress_to_quantkit_weights(trained_llama, tmp_path, options):
    """compressed-tensors' own decompressor turns the exported tensors back into quantkit's weights."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    source = quantize(trained_llama, tmp_path / "q", **options)
    result = export_compressed_tensors(source, tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((result.out / "config.json").read_text())[
        "quantization_config"])
    scheme = config.config_groups["group_0"]
    tensors = load_file(result.out / "model.safetensors")
    quantized = load_quantized(source, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj"
    layer = quantized.get_submodule(name)
    state = {key.removeprefix(name + "."): value for key, value in tensors.items() if key.startswith(name + ".")}
    assert state["weight_packed"].dtype == torch.int32 and state["weight_packed"].shape == (64, 160 * options.get(
        "bits", 4) // 32)
    assert torch.equal(unpack_from_int32(state["weight_packed"], options.get("bits", 4), (64, 160)),
                       layer.weight_codes)
    assert torch.equal(state["weight_shape"], torch.tensor([64, 160]))
    if layer.weight_zero is not None:
        zero = unpack_from_int32(state["weight_zero_point"], 4, (64, 5), packed_dim=0)
        assert torch.equal(zero.float(), layer.weight_zero)
    decompressed = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    assert torch.equal(decompressed.float(), layer.dequantized_weight())


def test_static_activation_tensors(trained_llama, tmp_path):
    source = quantize(trained_llama, tmp_path / "q", scheme="smq_q8i8f16_2", alpha=0.5)
    result = export_compressed_tensors(source, tmp_path / "ct")
    tensors = load_file(result.out / "model.safetensors")
    layer = load_quantized(source, dtype=torch.float32).model.layers[0].self_attn.q_proj
    prefix = "model.layers.0.self_attn.q_proj."
    assert torch.equal(tensors[prefix + "weight"], layer.weight_codes)
    assert tensors[prefix + "weight_scale"].shape == (64, 1)
    assert torch.equal(tensors[prefix + "weight_zero_point"].float(), layer.weight_zero)
    assert torch.equal(tensors[prefix + "input_scale"], layer.input_scale)
    assert tensors[prefix + "input_zero_point"].dtype == torch.int8
    assert torch.equal(tensors[prefix + "input_zero_point"].float(), layer.input_zero)
    assert any("symmetric weights only" in note for note in result.notes)


def test_mixed_schemes_get_one_config_group_each(trained_llama, windows, tmp_path, monkeypatch):
    attention = quantize(trained_llama, tmp_path / "w8a8", scheme="w8a8_dynamic", smooth=False)
    mlp = quantize(trained_llama, tmp_path / "w4", scheme="w4a16", group_size=32, symmetric=True)
    mlp_manifest, mlp_tensors = Manifest.load(mlp), load_file(mlp / "model.safetensors")

    def take_mlp_layers(manifest, tensors):
        for name in [n for n in manifest.layers if ".mlp." in n]:
            for tensor in manifest.layers[name].tensors.values():
                del tensors[tensor]
            manifest.layers[name] = mlp_manifest.layers[name]
            tensors.update({t: mlp_tensors[t] for t in manifest.layers[name].tensors.values()})

    rewrite(attention, take_mlp_layers)
    result = export_compressed_tensors(attention, tmp_path / "ct")
    config = json.loads((result.out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    groups = config["config_groups"]
    assert {g["format"] for g in groups.values()} == {"int-quantized", "pack-quantized"}
    packed = next(g for g in groups.values() if g["format"] == "pack-quantized")
    assert sorted(packed["targets"]) == sorted(n for n in Manifest.load(attention).layers if ".mlp." in n)
    model = load_export(result.out)
    assert model.model.layers[1].mlp.down_proj.quantization_scheme.weights.num_bits == 4
    assert model.model.layers[1].self_attn.o_proj.quantization_scheme.input_activations.dynamic
    reference = load_quantized(attention, dtype=torch.float32)
    assert_matches(model, reference, windows)
    monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert max_logit_difference(model, reference, windows) < 1e-4


def test_unquantized_layers_are_ignored(trained_llama, windows, tmp_path):
    source = quantize(trained_llama, tmp_path / "q", scheme="w4a16", group_size=32, symmetric=True)
    kept = "model.layers.0.mlp.down_proj"

    def unquantize(manifest, tensors):
        entry = manifest.layers.pop(kept)
        for tensor in entry.tensors.values():
            del tensors[tensor]
        tensors[kept + ".weight"] = load_file(trained_llama / "model.safetensors")[kept + ".weight"]

    rewrite(source, unquantize)
    result = export_compressed_tensors(source, tmp_path / "ct")
    assert result.ignore == [kept, "lm_head"]
    model = load_export(result.out)
    assert model.get_submodule(kept).weight.dtype == torch.float32
    assert max_logit_difference(model, load_quantized(source, dtype=torch.float32), windows) < 1e-4


# ------------------------------------------------------------------------------------------ refusals


run = run_cli


def _with_g_idx(manifest, tensors):
    name = "model.layers.0.mlp.up_proj"
    manifest.layers[name].tensors["g_idx"] = name + ".weight_g_idx"
    tensors[name + ".weight_g_idx"] = (torch.arange(64).flip(0) // 32).to(torch.int32)


def _with_fractional_zero(manifest, tensors):
    name = "model.layers.1.self_attn.v_proj"
    manifest.layers[name].integer_zero = False
    tensors[name + ".weight_zero"] = tensors[name + ".weight_zero"].float() + 0.25


@pytest.mark.parametrize("options,edit,fragment", [
    (dict(scheme="w4a16", group_size=32), _with_g_idx, "layer model.layers.0.mlp.up_proj: act-order g_idx"),
    (dict(scheme="w4a16", group_size=32), _with_fractional_zero,
     "layer model.layers.1.self_attn.v_proj: fractional zero points"),
    (dict(scheme="w4a16", group_size=48), None, "not a multiple of group size 48"),
])
def test_inexpressible_layers_are_refused_before_writing(trained_llama, tmp_path, options, edit, fragment):
    source = quantize(trained_llama, tmp_path / "q", **options)
    if edit is not None:
        rewrite(source, edit)
    out = tmp_path / "ct"
    assert_one_line_error(run("export", source, "--format", "compressed-tensors", "--out", out), fragment)
    assert not out.exists() and list(tmp_path.glob(".ct*")) == []


def test_cli_json_and_bad_inputs(trained_llama, tmp_path):
    source = quantize(trained_llama, tmp_path / "q", scheme="w8a8_dynamic", alpha=0.5)
    out = tmp_path / "ct"
    result = run("export", source, "--format", "compressed-tensors", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["quantization_format"] == "int-quantized" and summary["groups"]["group_0"]["layers"] == 14
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert_one_line_error(run("export", source, "--format", "compressed-tensors", "--out", out), "--overwrite")
    assert_one_line_error(run("export", trained_llama, "--format", "compressed-tensors", "--out", tmp_path / "x"),
                          "quant_manifest.json")
    assert_one_line_error(run("export", tmp_path / "missing", "--format", "compressed-tensors", "--out",
                              tmp_path / "x"), "not found")
    assert not (tmp_path / "x").exists()
