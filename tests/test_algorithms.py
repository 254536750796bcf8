"""AWQ, GPTQ and HQQ against round-to-nearest, and the properties each one promises."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.algorithms.gptq import gptq_quantize
from quantkit.algorithms.hqq import hqq_group_error, hqq_quantize
from quantkit.formats import primitives
from quantkit.algorithms.registry import get_algorithm
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.model.architectures import architecture_for
from quantkit.run.block import BlockJob, BlockQuantizer
from quantkit.calibrate.hooks import capture_block_inputs, run_block
from quantkit.errors import QuantkitError
from quantkit.run.pipeline import CalibrateConfig, calibrate
from quantkit.run.recipe import LayerAssignment, make_scheme
from quantkit.formats.schemes import WeightSpec

SPECS = [WeightSpec(4, "group", True, 32), WeightSpec(3, "group", False, 48), WeightSpec(4, "channel", True)]


def _correlated_inputs(seed=0, tokens=2048, features=160):
    """Inputs with a few outlier channels and correlated features, as LLM activations have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * 0.3
    x = torch.randn(tokens, features, generator=generator) @ mixing + torch.randn(tokens, features, generator=generator)
    x[:, :4] *= 20
    return x


def _output_error(x, weight, approximation):
    return ((x @ (weight - approximation).t()) ** 2).mean().item()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(spec, act_order):
    """Plain GPTQ and act-order GPTQ (static groups, the default) both beat RTN clearly."""
    x = _correlated_inputs()
    weight = torch.randn(96, 160, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = 2.0 / x.shape[0] * x.t() @ x
    gptq, _ = gptq_quantize(weight, hessian, spec, act_order=act_order)
    rtn = quantize_rtn(weight, spec)
    assert _output_error(x, weight, gptq.dequantize()) < 0.8 * _output_error(x, weight, rtn.dequantize())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_gptq_with_identity_hessian_equals_rtn(spec):
    weight = torch.randn(32, 160, generator=torch.Generator().manual_seed(2))
    gptq, _ = gptq_quantize(weight, torch.eye(160), spec)
    rtn = quantize_rtn(weight, spec)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scale, rtn.scale)
    assert (gptq.zero is None and rtn.zero is None) or torch.equal(gptq.zero, rtn.zero)


def test_gptq_act_order_groups_follow_the_sweep():
    x = _correlated_inputs(3)
    weight = torch.randn(16, 160, generator=torch.Generator().manual_seed(4))
    spec = WeightSpec(4, "group", True, 32)
    dynamic, results = gptq_quantize(weight, 2.0 / x.shape[0] * x.t() @ x, spec, act_order=True, static_groups=False)
    static, _ = gptq_quantize(weight, 2.0 / x.shape[0] * x.t() @ x, spec, act_order=True, static_groups=True)
    perm = results["perm"].long()
    assert dynamic.g_idx is not None and static.g_idx is None
    assert torch.equal(dynamic.g_idx[perm].long(), torch.arange(160) // 32)  # groups are runs of the sweep order


def test_gptq_survives_a_singular_hessian():
    x = _correlated_inputs(5, tokens=64)  # 64 tokens, 160 channels: H has rank <= 64
    x[:, 10:20] = 0.0  # dead input channels
    weight = torch.randn(8, 160, generator=torch.Generator().manual_seed(6))
    quant, results = gptq_quantize(weight, 2.0 / x.shape[0] * x.t() @ x, WeightSpec(4, "group", True, 32), damp=0.0)
    assert results["damp"].item() > 0.0  # damping was raised after the Cholesky failure
    assert torch.equal(quant.dequantize()[:, 10:20], torch.zeros(8, 10))


@pytest.mark.parametrize("spec", [WeightSpec(4, "group", False, 64), WeightSpec(3, "group", False, 48),
                                  WeightSpec(2, "group", False, 16)], ids=lambda s: s.describe())
def test_hqq_never_increases_its_objective_and_beats_rtn(spec):
    weight = torch.randn(64, 160, generator=torch.Generator().manual_seed(7)) * 0.02
    weight[:, 5] *= 10  # an outlier column, where the min/max grid wastes levels
    quant, results = hqq_quantize(weight, spec)
    assert results["error_final"] <= results["error_init"]
    groups = primitives.to_groups(weight, spec.group_size)
    valid = (torch.arange(groups.shape[1] * spec.group_size) < 160).reshape(groups.shape[1], -1).float()
    rtn = quantize_rtn(weight, spec)
    per_group = lambda q: hqq_group_error(groups, q.scale[..., None], q.zero[..., None], spec.bits, valid)  # noqa: E731
    assert bool((per_group(quant) <= per_group(rtn) + 1e-9).all())  # never worse than its start, per group
    x = _correlated_inputs(8)
    assert _output_error(x, weight, quant.dequantize()) < _output_error(x, weight, rtn.dequantize())
    assert not quant.integer_zero  # HQQ's zero points are floats


def test_hqq_refuses_symmetric_grids():
    with pytest.raises(QuantkitError, match="asymmetric"):
        get_algorithm("hqq").validate(WeightSpec(4, "group", True, 64))


def _block_zero(checkpoint, samples=8, seq_len=32):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    arch = architecture_for(model.config)
    tokens = torch.randint(4, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    block = model.get_submodule(f"{arch.blocks}.0")
    with torch.no_grad():
        inputs, _ = capture_block_inputs(model, model.get_submodule(arch.blocks), tokens.split(4))
    return model, arch, block, inputs


def test_awq_scaling_preserves_the_float_block(llama_dir):
    model, arch, block, inputs = _block_zero(llama_dir)
    with torch.no_grad():
        before = [run_block(block, call) for call in inputs]
    assignment = LayerAssignment(make_scheme("w4a16", bits=3, group_size=32), "awq", "test", {"clip": False})
    job = BlockJob(index=0, prefix="model.layers.0", block=block, assigned={n: assignment for n in arch.linears},
                   inputs=inputs, arch=arch, model_config=model.config, compute_dtype=torch.float32,
                   storage_dtype=torch.float32, smooth=False, alpha=None)
    quantizer = BlockQuantizer(job)
    with torch.no_grad():
        stats = quantizer.observe(list(job.assigned))
        from quantkit.run.block import BlockResult
        result = BlockResult(outputs=None, entries={})
        quantizer.transform(stats, result)
        after = [run_block(block, call) for call in inputs]
    scales = [v for k, v in result.search_results.items() if k.endswith("awq_scales")]
    assert len(scales) == 4 and max(float((s.log().abs()).max()) for s in scales) > 0.1  # real rescaling
    for a, b in zip(before, after):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _kl_to_float(reference, model, tokens):
    with torch.no_grad():
        p = torch.log_softmax(reference(tokens).logits, -1)
        q = torch.log_softmax(model(tokens).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("wide"), "llama", seed=5, intermediate_size=192, num_hidden_layers=2)


@pytest.mark.parametrize("algorithm, grid", [
    ("awq", dict(bits=3, group_size=32, symmetric=False)),
    ("gptq", dict(bits=3, group_size=32, symmetric=True)),
    ("hqq", dict(bits=3, group_size=32, symmetric=False)),
])
def test_each_algorithm_beats_rtn_and_reloads_exactly(algorithm, grid, wide_llama, text_file, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(wide_llama).eval()
    tokens = torch.randint(4, 64, (4, 64), generator=torch.Generator().manual_seed(9))
    options = dict(num_samples=16, seq_len=64, batch_size=8, dataset=str(text_file), keep_model=True,
                   scheme="w4a16", **grid)
    rtn = calibrate(CalibrateConfig(model=str(wide_llama), algorithm="rtn", out=tmp_path / "rtn", **options))
    result = calibrate(CalibrateConfig(model=str(wide_llama), algorithm=algorithm, out=tmp_path / algorithm, **options))
    assert _kl_to_float(reference, result.model, tokens) < _kl_to_float(reference, rtn.model, tokens)
    reloaded = load_quantized(tmp_path / algorithm)
    with torch.no_grad():
        assert torch.equal(result.model(tokens).logits, reloaded(tokens).logits)
    assert {e.algorithm for e in result.manifest.layers.values()} == {algorithm}


def test_gptq_act_order_reloads_exactly(llama_dir, tmp_path):
    result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm="gptq", group_size=16,
                                       options={"act_order": True, "static_groups": False}, num_samples=8,
                                       seq_len=32, out=tmp_path / "o",
                                       keep_model=True))
    entry = result.manifest.layers["model.layers.0.mlp.down_proj"]
    assert "g_idx" in entry.tensors
    tokens = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(result.model(tokens).logits, load_quantized(tmp_path / "o")(tokens).logits)


def test_gptq_one_pass_takes_later_hessians_from_the_float_block(llama_dir, tmp_path):
    """true_sequential=false: the first stage (q, k, v) sees the same inputs either way, so its codes
    agree; o_proj's Hessian comes from the float attention instead of the quantized one, so its codes
    differ. The stored codes are the packed weights of the output file."""
    from safetensors.torch import load_file

    def codes(options, out):
        result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm="gptq", group_size=16,
                                           options=options, num_samples=8, seq_len=32, out=tmp_path / out))
        tensors = load_file(tmp_path / out / "model.safetensors")
        return lambda name: tensors[result.manifest.layers[f"model.layers.0.{name}"].tensors["codes"]]

    sequential, one_pass = codes({}, "seq"), codes({"true_sequential": False}, "one")
    assert torch.equal(sequential("self_attn.q_proj"), one_pass("self_attn.q_proj"))
    assert not torch.equal(sequential("self_attn.o_proj"), one_pass("self_attn.o_proj"))


def _quant_fields(quant):
    return [quant.codes.float(), quant.scale, quant.zero, quant.g_idx, quant.super_scale, quant.super_min]


def _assert_same_quant(a, b):
    for x, y in zip(_quant_fields(a), _quant_fields(b)):
        assert (x is None and y is None) or torch.equal(x, y)


SHARED_GROUPS = {   # Linears reading one input, on grids fixed before the sweep (searched, static groups, rows)
    "K types with and without mins": (["q4_k", "q6_k", "q2_k"], {}),
    "K type beside llama.cpp's 32-value blocks": (["q4_k", "q5_0", "q3_k"], {"llama_cpp": True}),
    "Q4_K_M's attention: Q4_K's levels 0..15 beside Q5_0's -16..15": (["q4_k", "q5_0"], {"llama_cpp": True}),
    "llama.cpp's Q5_1 minimums beside Q4_K's": (["q5_1", "q4_k", "q4_1"], {"llama_cpp": True}),
    "static groups, symmetric and asymmetric, per channel": (
        [WeightSpec(4, "group", True, 64), WeightSpec(3, "group", False, 32), WeightSpec(8, "channel", True)], {}),
    "weighted symmetric groups": ([WeightSpec(4, "group", True, 64), WeightSpec(5, "group", True, 32)],
                                  {"weighted_grid": True}),
}


@pytest.mark.parametrize("grids,options", SHARED_GROUPS.values(), ids=SHARED_GROUPS.keys())
def test_linears_sharing_an_input_get_the_codes_of_separate_sweeps(grids, options):
    """One sweep over the stacked rows of q/k/v-like Linears gives each the codes, grids and rounded weights of its
    own sweep, bit for bit (rows are independent in GPTQ: H, damping, act order and U belong to the input)."""
    from quantkit.algorithms.gptq import _SETTINGS, can_share, gptq_quantize_shared, gptq_rounding
    from quantkit.formats.schemes import get_scheme

    specs = [get_scheme(g).weight if isinstance(g, str) else g for g in grids]
    x = _correlated_inputs(8, features=512)
    x[:, 7] = 0.0                                   # a dead input channel
    hessian = 2.0 / x.shape[0] * x.t() @ x
    generator = torch.Generator().manual_seed(9)
    weights = [torch.randn(rows, 512, generator=generator) * 0.05 for rows in (64, 32, 48)[:len(specs)]]
    assert can_share(specs, 512, dict(_SETTINGS, **options))
    shared = gptq_quantize_shared(weights, hessian, specs, keep_rounded=True, **options)
    for weight, spec, (quant, results, rounded) in zip(weights, specs, shared):
        alone, alone_results, alone_rounded = gptq_rounding(weight, hessian, spec, **options)
        _assert_same_quant(quant, alone)
        assert torch.equal(rounded, alone_rounded)
        assert results.keys() == alone_results.keys()
        assert all(torch.equal(results[k], alone_results[k]) for k in results)


def test_grids_chosen_during_the_sweep_get_a_sweep_each():
    """GPTQ's own min/max groups follow the sweep (static_groups=false, or no act order), float grids round to
    their own values, and different lazy-update blocks would change the float operations: none is stacked,
    and each still gets its own sweep's codes."""
    from quantkit.algorithms.gptq import _SETTINGS, can_share, gptq_quantize, gptq_quantize_shared
    from quantkit.formats.schemes import get_scheme

    int4 = WeightSpec(4, "group", True, 32)
    assert not can_share([int4, int4], 512, dict(_SETTINGS, static_groups=False))
    assert not can_share([int4, int4], 512, dict(_SETTINGS, act_order=False))
    assert not can_share([int4, WeightSpec(4, "group", True, 256)], 512, _SETTINGS)
    assert not can_share([int4, get_scheme("w8a16_fp8").weight], 512, _SETTINGS)
    int8 = WeightSpec(8, "group", True, 32)        # llama.cpp's Q8_0: no weighted search, so GPTQ's own groups
    assert not can_share([get_scheme("q5_0").weight, int8], 512, dict(_SETTINGS, act_order=False, llama_cpp=True))
    x = _correlated_inputs(10, features=512)
    hessian = 2.0 / x.shape[0] * x.t() @ x
    weights = [torch.randn(16, 512, generator=torch.Generator().manual_seed(s)) for s in (11, 12)]
    for (quant, _, rounded), weight in zip(gptq_quantize_shared(weights, hessian, [int4, int4], static_groups=False),
                                           weights):
        _assert_same_quant(quant, gptq_quantize(weight, hessian, int4, static_groups=False)[0])
        assert rounded is None


def test_the_pipeline_sweeps_q_k_v_together_with_the_codes_of_separate_sweeps(tmp_path, monkeypatch):
    """In a block, q/k/v (and gate/up) go through one GPTQ sweep each group (mixed K grids of a Q4_K_M plan
    here: attn_v on Q6_K beside q/k on Q4_K); the file equals the one written with every Linear swept alone."""
    from safetensors.torch import load_file

    from quantkit.algorithms import gptq
    from conftest import make_checkpoint

    source = make_checkpoint(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=2)
    calls = []
    original = gptq.gptq_quantize_shared

    def counted(weights, *args, **kwargs):
        calls.append(len(weights))
        return original(weights, *args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize_shared", counted)

    def run(out):
        calibrate(CalibrateConfig(model=str(source), scheme="q4_k_m", algorithm="gptq", num_samples=8, seq_len=32,
                                  out=tmp_path / out))
        return load_file(tmp_path / out / "model.safetensors")

    together = run("together")
    assert sorted(calls) == [2, 2, 3, 3]                 # per block: q/k/v and gate/up
    monkeypatch.setattr(BlockQuantizer, "shared_sweeps", lambda self, names, stats: {})
    alone = run("alone")
    assert together.keys() == alone.keys()
    assert all(torch.equal(together[name], alone[name]) for name in together)


def test_damped_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    from quantkit.algorithms.gptq import damped_inverse_cholesky

    x = torch.randn(96, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hessian = x.t() @ x
    upper, damp = damped_inverse_cholesky(hessian, 0.01)
    damped = hessian + damp * torch.diag(hessian).mean() * torch.eye(48, dtype=torch.float64)
    assert torch.equal(upper, upper.triu()) and bool((torch.diag(upper) > 0).all())
    assert torch.allclose(upper.t() @ upper, torch.linalg.inv(damped), rtol=1e-9, atol=1e-12)
    assert torch.allclose(upper, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-8, atol=1e-12)
