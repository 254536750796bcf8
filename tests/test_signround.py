"""SignRound (block-wise learned rounding): bounds, zero-iteration identity with its initial algorithm, a lower
block error than the initialisation, recipes, resume, and both exports reading its codes back exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import assert_one_line_error, calibrate_and_reload, make_checkpoint, run_cli
from safetensors.torch import load_file

from quantkit.algorithms.rtn import quantize_rtn
from quantkit.algorithms.signround import OFFSET_BOUND, LearnedGrid, SignRound
from quantkit.formats.schemes import WeightSpec, get_scheme
from quantkit.native.loader import load_quantized
from quantkit.native.manifest import Manifest
from quantkit.run.pipeline import CalibrateConfig, calibrate

FAST = dict(dataset="dummy", num_samples=8, seq_len=32, batch_size=4)


def _run(source, out, **options):
    return calibrate(CalibrateConfig(model=str(source), out=out, overwrite=True, **FAST, **options))


def _codes(directory):
    """Every quantized tensor the output holds (codes, scales, zeros), by name."""
    return {name: tensor for name, tensor in load_file(directory / "model.safetensors").items()
            if name.rsplit(".", 1)[1].startswith("weight_")}


def _assert_same_codes(a, b):
    first, second = _codes(a), _codes(b)
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_offsets_and_factors_stay_in_bounds():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    spec = WeightSpec(4, "group", False, 32)
    grid = LearnedGrid(quantize_rtn(weight, spec), weight, learn_range=True)
    with torch.no_grad():
        grid.offsets.normal_(0, 3)
        grid.factor_lo.fill_(-2.0)
        grid.factor_hi.fill_(7.0)
    grid.clamp_()
    assert grid.offsets.abs().max() <= OFFSET_BOUND and grid.offsets.abs().max() == OFFSET_BOUND
    assert float(grid.factor_lo.detach().min()) == 0.5 and float(grid.factor_hi.detach().max()) == 1.0
    quant = grid.quant_tensor()   # a valid QuantTensor (its own checks: codes on the grid, shapes)
    assert quant.codes.dtype == torch.int8 and quant.integer_zero


def _reference_weight(grid, weight, spec):
    """The learned weight written out op by op under autograd (the module docstring's formula): the
    straight-through rounding, the range factors, the clamp to the element range and the zero point."""
    element, group = spec.element, spec.group_size
    expand = lambda p: p.repeat_interleave(group, dim=1)[:, : weight.shape[1]]   # noqa: E731
    qmin, qmax = float(element.min), float(element.max)
    step0 = grid.init.scale.float()
    ste = lambda x: x + (torch.round(x) - x).detach()                             # noqa: E731
    fp16 = lambda s: s + (s.detach().half().float() - s).detach()                  # noqa: E731
    if spec.symmetric:
        scale, zero = fp16(step0 * grid.factor_hi), None
    else:
        zero0 = grid.init.zero.float()
        lo, hi = (qmin - zero0) * step0 * grid.factor_lo, (qmax - zero0) * step0 * grid.factor_hi
        scale = fp16((hi - lo) / (qmax - qmin))
        zero = (qmin - ste(lo / scale)).clamp(qmin, qmax)
    code = ste(grid.rounded_from / expand(scale) + grid.offsets)
    if zero is None:
        return code.clamp(qmin, qmax) * expand(scale)
    return ((code + expand(zero)).clamp(qmin, qmax) - expand(zero)) * expand(scale)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 64), (3, False, 64), (4, True, 128), (2, False, 32)])
def test_the_fused_rounding_equals_autograd_on_the_written_out_formula(bits, symmetric, group):
    """`LearnedGrid.weight` computes the rounding and its straight-through gradients in one function: its values
    equal the formula's under autograd exactly, its gradients to float rounding (the group sums add in another
    order), on whole and ragged (576 = 4.5 x 128: the last group padded to full width) groups, with offsets and
    range factors away from their start."""
    generator = torch.Generator().manual_seed(bits * group)
    weight = torch.randn(24, 576, generator=generator) * 0.05
    spec = WeightSpec(bits, "group", symmetric, group)
    grids = [LearnedGrid(quantize_rtn(weight, spec), weight, learn_range=True) for _ in range(2)]
    assert grids[0].grouped and grids[0].padding == (64 if group == 128 else 0)
    offsets = torch.rand(weight.shape, generator=generator) - 0.5
    factors = [0.5 + 0.5 * torch.rand(p.shape, generator=generator) for p in grids[0].factors()]
    upstream = torch.randn(weight.shape, generator=generator)
    values, grads = [], []
    for grid, compute in zip(grids, (lambda g: g.weight(), lambda g: _reference_weight(g, weight, spec))):
        with torch.no_grad():
            grid.offsets.copy_(offsets)
            for param, value in zip(grid.factors(), factors):
                param.copy_(value)
        value = compute(grid)
        (value * upstream).sum().backward()
        values.append(value.detach())
        grads.append([param.grad for param in grid.parameters()])
    assert torch.equal(values[0], values[1])
    assert all(g.abs().sum() > 0 for g in grads[1])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False)])
def test_a_code_moves_at_most_one_step_from_nearest(bits, symmetric):
    """With the grid fixed, offsets in [-0.5, 0.5] reach only the two grid points around w / s."""
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(bits))
    spec = WeightSpec(bits, "group", symmetric, 32)
    nearest = quantize_rtn(weight, spec)
    grid = LearnedGrid(nearest, weight, learn_range=False)
    with torch.no_grad():
        grid.offsets.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    grid.clamp_()
    moved = grid.quant_tensor()
    assert torch.equal(moved.scale, nearest.scale)
    assert (moved.codes.int() - nearest.codes.int()).abs().max() == 1
    exact = (weight / nearest.scale.repeat_interleave(32, dim=1) + grid.offsets)
    exact = exact if symmetric else exact.round() + nearest.zero.repeat_interleave(32, dim=1)
    assert torch.equal(moved.codes.float(), exact.round().clamp(nearest.spec.element.min, nearest.spec.element.max))


def test_the_rounded_weight_is_kept_where_nearest_rounding_gives_the_initial_codes():
    """GPTQ's error-compensated columns round to its codes: kept as they are. A least-squares scale stored after
    its levels were chosen (llama.cpp's search) does not always: those weights move just inside their code's cell."""
    from quantkit.algorithms.gptq import gptq_rounding
    from quantkit.formats import weighted_search

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 128, generator=generator)
    x = torch.randn(512, 128, generator=generator)
    spec = WeightSpec(4, "group", True, 64)
    quant, _, rounded = gptq_rounding(weight, 2 * x.T @ x / 512, spec)
    grid = LearnedGrid(quant, rounded, learn_range=False)
    assert grid.replaced == 0 and torch.equal(grid.rounded_from, rounded) and not torch.equal(rounded, weight)
    searched = weighted_search.weighted_symmetric(weight, spec, x.pow(2).mean(0))
    grid = LearnedGrid(searched, weight, learn_range=True)
    assert grid.replaced > 0 and torch.equal(grid.quant_tensor().codes, searched.codes)
    moved = grid.rounded_from != weight
    assert int(moved.sum()) == grid.replaced   # only those, and each stays within its cell's half step
    step = searched.scale.repeat_interleave(64, dim=1)
    assert ((grid.rounded_from / step - searched.codes.float()).abs()[moved] <= 0.45 + 1e-5).all()


def test_default_init_is_imatrix_where_it_searches_the_grid_else_rtn():
    from quantkit.algorithms.signround import default_init

    assert default_init(WeightSpec(4, "group", True, 64)) == "imatrix"
    assert default_init(WeightSpec(4, "group", False, 64)) == "imatrix"       # the search with a zero point
    assert default_init(WeightSpec(3, "group", False, 64)) == "imatrix"
    assert default_init(WeightSpec(2, "group", False, 64)) == "imatrix"
    assert default_init(WeightSpec(2, "channel", False)) == "imatrix"
    assert default_init(WeightSpec(2, "group", True, 64)) == "imatrix"
    assert default_init(get_scheme("q4_k").weight) == "imatrix"
    assert default_init(get_scheme("q8_0").weight) == "rtn"
    assert default_init(get_scheme("q5_1").weight) == "imatrix"   # llama.cpp's search: a float16 minimum


@pytest.mark.parametrize("auto_is,options", [
    ("imatrix", dict(symmetric=True)), ("imatrix", dict(symmetric=False, bits=3)),
    ("imatrix", dict(symmetric=False, bits=2)),
])
def test_zero_iterations_of_the_default_init_equal_what_it_resolves_to(llama_dir, tmp_path, auto_is, options):
    _run(llama_dir, tmp_path / "init", scheme="w4a16", group_size=32, algorithm=auto_is, **options)
    _run(llama_dir, tmp_path / "sr", scheme="w4a16", group_size=32, algorithm="signround", options=dict(iters=0),
         **options)
    _assert_same_codes(tmp_path / "init", tmp_path / "sr")


@pytest.mark.parametrize("init,options", [
    ("gptq", dict(scheme="w4a16", group_size=32)),
    ("rtn", dict(scheme="w4a16", group_size=32, symmetric=False, bits=3)),
    ("awq", dict(scheme="w4a16", group_size=32)),
    ("imatrix", dict(scheme="w4a16", group_size=32, symmetric=True)),
])
def test_zero_iterations_equal_the_initial_algorithm(llama_dir, tmp_path, init, options):
    start = dict(samples=8) if init == "awq" else {}        # AWQ's search on SignRound's 8 samples
    _run(llama_dir, tmp_path / "init", algorithm=init, options=start, **options)
    _run(llama_dir, tmp_path / "sr", algorithm="signround", options=dict(init=init, iters=0), **options)
    _assert_same_codes(tmp_path / "init", tmp_path / "sr")
    assert {e.algorithm for e in Manifest.load(tmp_path / "sr").layers.values()} == {"signround"}


def test_zero_iterations_equal_gptq_on_a_k_grid(tmp_path):
    """K-quant super-blocks (256-wide rows): the learned offsets start on GPTQ's codes on the weighted K grid."""
    source = make_checkpoint(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                             num_key_value_heads=1, num_hidden_layers=1)
    _run(source, tmp_path / "gptq", scheme="q4_k", algorithm="gptq")
    _run(source, tmp_path / "sr", scheme="q4_k", algorithm="signround", options=dict(init="gptq", iters=0))
    _assert_same_codes(tmp_path / "gptq", tmp_path / "sr")
    result = _run(source, tmp_path / "sr8", scheme="q4_k", algorithm="signround",
                  options=dict(init="gptq", iters=20, lr=0.005))
    for entry in result.manifest.layers.values():
        assert entry.metrics["block_loss_after"] < entry.metrics["block_loss_before"]
    quantized = load_quantized(tmp_path / "sr8", dtype=torch.float32)
    layer = quantized.model.layers[0].mlp.down_proj
    assert layer.weight_super_scale is not None     # still the K grid: d, dmin, sub-block scales as searched
    initial = load_quantized(tmp_path / "gptq", dtype=torch.float32).model.layers[0].mlp.down_proj
    assert torch.equal(layer.weight_scale, initial.weight_scale)
    assert torch.equal(layer.weight_super_scale, initial.weight_super_scale)


def test_awq_init_searches_on_eight_samples_unless_told():
    spec = WeightSpec(2, "group", False, 64)
    assert SignRound().initial({"init": "awq"}, spec) == ("awq", {"samples": 8})
    assert SignRound().initial({"init": "awq", "samples": 16, "iters": 5}, spec) == ("awq", {"samples": 16})
    assert SignRound().initial({}, spec) == ("imatrix", {})
    assert SignRound().initial({"init": "gptq"}, spec)[1] == {}


@pytest.mark.parametrize("propagate", ["quantized", "float"])
def test_codes_worse_over_the_whole_set_give_back_the_initial_ones(llama_dir, tmp_path, monkeypatch, propagate):
    """The trainer keeps its best state on single calls and leaves the whole-set check to the pass that
    propagates the block (`Refined.loss_after` None): codes that make the block worse (each code mirrored on
    the grid) are replaced by the initial ones there, bit for bit, and the block's loss is reported unchanged."""
    refine_block = SignRound.refine_block

    def spoiled(self, context):
        refined = refine_block(self, context)
        start = refined.initial or refined.weights
        worse = {name: dataclasses.replace(q, codes=-1 - q.codes) for name, q in start.items()}
        return dataclasses.replace(refined, weights=worse, loss_after=None, best_iteration=3, initial=start)

    options = dict(scheme="w4a16", group_size=32, symmetric=False, bits=3, propagate=propagate)
    _run(llama_dir, tmp_path / "init", algorithm="rtn", **options)
    monkeypatch.setattr(SignRound, "refine_block", spoiled)
    result = _run(llama_dir, tmp_path / "sr", algorithm="signround", options=dict(init="rtn", iters=4), **options)
    _assert_same_codes(tmp_path / "init", tmp_path / "sr")
    for entry in result.manifest.layers.values():
        assert entry.metrics["block_loss_after"] == entry.metrics["block_loss_before"] > 0
    steps = load_file(tmp_path / "sr" / "search_results.safetensors")["model.layers.1.signround.steps"]
    assert steps[1] == 0


@pytest.mark.parametrize("init,options", [("imatrix", {}), ("gptq", {"llama_cpp": True})])
def test_on_llama_cpps_searched_minimums(llama_dir, tmp_path, init, options):
    """Q5_1 from llama.cpp's search (a float16 minimum per block, held as a fractional zero point): zero steps keep
    the initial codes bit for bit; 20 steps lower every block's error and move codes, while every block's d and m
    stay as searched (the learned offsets live on that grid; block 0, whose inputs both runs share)."""
    _run(llama_dir, tmp_path / "init", scheme="q5_1", algorithm=init, options=options)
    _run(llama_dir, tmp_path / "sr0", scheme="q5_1", algorithm="signround", options=dict(init=init, iters=0, **options))
    _assert_same_codes(tmp_path / "init", tmp_path / "sr0")
    result = _run(llama_dir, tmp_path / "sr", scheme="q5_1", algorithm="signround",
                  options=dict(init=init, iters=20, lr=0.005, **options))
    for entry in result.manifest.layers.values():
        assert entry.metrics["block_loss_after"] < entry.metrics["block_loss_before"]
    initial, learned = (load_quantized(tmp_path / d, dtype=torch.float32) for d in ("init", "sr"))
    moved = 0
    for name, module in initial.named_modules():
        if hasattr(module, "quant_tensor") and name.startswith("model.layers.0."):
            before, after = module.quant_tensor(), learned.get_submodule(name).quant_tensor()
            assert not before.integer_zero
            assert torch.equal(before.scale, after.scale) and torch.equal(before.zero, after.zero)
            moved += int((before.codes != after.codes).sum())
    assert moved > 0


@pytest.mark.parametrize("init", ["gptq", "rtn"])
def test_optimisation_lowers_every_blocks_error(llama_dir, tmp_path, init):
    result = _run(llama_dir, tmp_path / "sr", scheme="w4a16", group_size=32, algorithm="signround",
                  options=dict(init=init, iters=20, lr=0.005))
    blocks = {}
    for name, entry in result.manifest.layers.items():
        blocks.setdefault(".".join(name.split(".")[:3]), set()).add(
            (entry.metrics["block_loss_before"], entry.metrics["block_loss_after"]))
    assert len(blocks) == 2
    for losses in blocks.values():
        (before, after), = losses        # one figure per block, shared by its Linears
        assert after < before
    results = load_file(tmp_path / "sr" / "search_results.safetensors")
    steps = results["model.layers.0.signround.steps"]
    assert steps[0] == 20 and steps[1] > 0


# Every mapped family: the dense ones, the mixtures of experts, Phi-3's fused Linears, Gemma 3's text tower
FAMILIES = ["llama_dir", "mistral_dir", "qwen2_dir", "gemma2_dir", "gemma3_dir", "qwen3_dir", "qwen3_moe_dir",
            "qwen2_moe_dir", "mixtral_dir", "phi3", "gemma3_multimodal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mapped_family_lowers_each_blocks_error_and_reloads_exactly(family, tmp_path, request):
    """2-bit asymmetric groups from AWQ's start (`init=awq`), as a user would run it on each family (AWQ's
    scales are the start that touches the most of each family's mapping: its norm and v -> o groups)."""
    if family == "phi3":
        source = make_checkpoint(tmp_path / "m", "phi3", seed=4)
    elif family == "gemma3_multimodal":
        source = make_checkpoint(tmp_path / "m", "gemma3_multimodal", seed=11, head_dim=256,
                                 query_pre_attn_scalar=256, layer_types=["sliding_attention", "sliding_attention"])
    else:
        source = request.getfixturevalue(family)
    result, _ = calibrate_and_reload(source, tmp_path / "out", scheme="w4a16", algorithm="signround", bits=2,
                                     symmetric=False, group_size=32, options=dict(init="awq", iters=20, lr=0.005))
    blocks: dict[str, set] = {}
    for name, entry in result.manifest.layers.items():
        assert entry.algorithm == "signround", name
        block = name[:name.index(".layers.") + len(".layers.") + 2]
        blocks.setdefault(block, set()).add((entry.metrics["block_loss_before"], entry.metrics["block_loss_after"]))
    assert len(blocks) == 2
    for block, losses in blocks.items():
        (before, after), = losses
        assert after < before, (block, before, after)
    results = load_file(tmp_path / "out" / "search_results.safetensors")
    assert any(key.endswith(".awq_scales") for key in results)          # the codes started from AWQ's


def test_a_recipe_mixes_signround_with_other_algorithms(llama_dir, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(yaml.safe_dump({
        "default": {"scheme": "w4a16", "algorithm": "gptq", "group_size": 32},
        "rules": [{"match": "*.mlp.*", "scheme": "w4a16", "group_size": 32, "algorithm": "signround",
                   "options": {"iters": 10}}],
    }))
    result = _run(llama_dir, tmp_path / "out", recipe=recipe)
    algorithms = {name.rsplit(".", 1)[1]: entry.algorithm for name, entry in result.manifest.layers.items()}
    assert algorithms["down_proj"] == "signround" and algorithms["q_proj"] == "gptq"
    reference = _run(llama_dir, tmp_path / "gptq", scheme="w4a16", group_size=32, algorithm="gptq")
    attention = {n: t for n, t in _codes(tmp_path / "out").items() if "self_attn" in n and ".0." in n}
    plain = _codes(tmp_path / "gptq")
    for name, tensor in attention.items():   # block 0's attention is GPTQ's, before any refinement
        assert torch.equal(tensor, plain[name]), name
    assert reference.manifest is not None


def test_resume_after_kill_is_bit_identical(llama_dir, tmp_path):
    """The float stream (the targets) is committed with each block, so a resumed run refines the same way."""
    from test_pipeline import _files, _KillAfter

    from quantkit.errors import RunInterrupted

    options = dict(model=str(llama_dir), scheme="w4a16", group_size=32, algorithm="signround",
                   options=dict(iters=6), **FAST)
    calibrate(CalibrateConfig(out=tmp_path / "straight", **options))
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(out=tmp_path / "resumed", **options), progress=_KillAfter(0))
    assert (tmp_path / ".resumed.partial" / "activations-float-rank0.safetensors").is_file()
    calibrate(CalibrateConfig(out=tmp_path / "resumed", resume=True, **options))
    assert _files(tmp_path / "straight") == _files(tmp_path / "resumed")


@pytest.fixture(scope="module")
def llama_bpe(tmp_path_factory):
    from test_export_gguf import trained_bpe_llama

    return trained_bpe_llama(tmp_path_factory)


def test_exports_read_back_the_refined_codes(llama_bpe, tmp_path):
    """The codes are ordinary codes on the grid: gguf-py and compressed-tensors' decompressor give back
    quantkit's own dequantized weights."""
    import gguf
    from test_export_gguf import gguf_weight

    from quantkit.exporters.gguf import export_gguf

    _run(llama_bpe, tmp_path / "sr", scheme="w4a16", group_size=32, symmetric=True, algorithm="signround",
         options=dict(iters=8))
    quantized = load_quantized(tmp_path / "sr", dtype=torch.float32)
    down = quantized.model.layers[1].mlp.down_proj.dequantized_weight()
    result = export_gguf(tmp_path / "sr", tmp_path / "sr.gguf")
    assert result.file_type == "MOSTLY_Q4_0"
    assert torch.equal(gguf_weight(result.out, "blk.1.ffn_down.weight", 64, 160), down)
    assert gguf.GGUFReader(result.out).tensors

    compressed_tensors = pytest.importorskip("compressed_tensors")
    import json

    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from quantkit.exporters.compressed_tensors import export_compressed_tensors

    exported = export_compressed_tensors(tmp_path / "sr", tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((exported.out / "config.json").read_text())[
        "quantization_config"])
    tensors = load_file(exported.out / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj."
    state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    decompressed = PackedQuantizationCompressor.decompress(state, config.config_groups["group_0"])["weight"]
    assert torch.equal(decompressed.float(), down)
    assert compressed_tensors is not None


def test_bad_options_and_grids_are_one_line(llama_dir, tmp_path):
    out = ["--out", str(tmp_path / "x"), "--num-samples", "2", "--seq-len", "16"]
    assert_one_line_error(run_cli("calibrate", str(llama_dir), "--scheme", "w4a16", "--algo", "signround",
                                  "--algo-option", "init=gpt", *out), "did you mean gptq?")
    assert_one_line_error(run_cli("calibrate", str(llama_dir), "--scheme", "w4a16", "--algo", "signround",
                                  "--algo-option", "init=foo", *out), "init='foo': not one of auto, rtn, gptq")
    assert_one_line_error(run_cli("calibrate", str(llama_dir), "--scheme", "w4a16", "--algo", "signround",
                                  "--algo-option", "iters=-1", *out), "must be at least 0")
    assert_one_line_error(run_cli("calibrate", str(llama_dir), "--scheme", "nvfp4a16", "--algo", "signround", *out),
                          "signround learns offsets on integer grids")
    assert get_scheme("w4a16").weight.element.kind == "int"


def test_cli_reports_each_blocks_loss(llama_dir, tmp_path):
    import json

    common = ["calibrate", str(llama_dir), "--scheme", "w4a16", "--group-size", "32", "--algo", "signround",
              "--algo-option", "iters=4", "--dataset", "dummy", "--num-samples", "4", "--seq-len", "16",
              "--batch-size", "2"]
    shown = run_cli(*common, "--out", str(tmp_path / "a"))
    assert shown.exit_code == 0, shown.output
    assert "block 0: signround block loss" in shown.output and "block 1: signround block loss" in shown.output
    assert "signround block loss after / before" in shown.output
    listed = run_cli(*common, "--out", str(tmp_path / "b"), "--json")
    losses = json.loads(listed.output)["block_loss"]
    manifest = Manifest.load(tmp_path / "b")
    entry = manifest.layers["model.layers.1.mlp.down_proj"]
    assert losses["model.layers.1"] == {"before": entry.metrics["block_loss_before"],
                                        "after": entry.metrics["block_loss_after"]}


def _cxx_compiler() -> bool:
    import shutil
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not _cxx_compiler(), reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_steps_lower_every_blocks_error_and_restore_inductors_settings(llama_dir, tmp_path):
    import torch._inductor.config as inductor_config
    before_setting = inductor_config.emulate_precision_casts
    result = _run(llama_dir, tmp_path / "sr", scheme="w4a16", group_size=32, algorithm="signround",
                  options=dict(init="rtn", iters=12, lr=0.01, compile=True))
    assert inductor_config.emulate_precision_casts == before_setting
    losses = {(e.metrics["block_loss_before"], e.metrics["block_loss_after"]) for e in result.manifest.layers.values()}
    assert len(losses) == 2 and all(after < before for before, after in losses)
    reloaded = load_quantized(tmp_path / "sr")
    assert reloaded.config.architectures == ["LlamaForCausalLM"]


def test_a_compiler_failure_is_one_line(llama_dir, tmp_path, monkeypatch):
    import torch._inductor.exc as inductor_errors

    def failing_compile(function, **kwargs):
        def compiled(*args):
            raise inductor_errors.InductorError(RuntimeError("no working C++ compiler found"), None)
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    assert_one_line_error(run_cli("calibrate", str(llama_dir), "--scheme", "w4a16", "--algo", "signround",
                                  "--algo-option", "compile=true", "--algo-option", "iters=2", "--out",
                                  str(tmp_path / "x"), "--num-samples", "2", "--seq-len", "16"),
                          "torch.compile failed on model.layers.0")
