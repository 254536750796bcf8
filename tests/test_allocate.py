"""Automatic mixed precision (--target-bits / --target-size): the budgeted solver against brute force, the
size accounting against the written files, the written recipe rerunning to the same model, and bad input."""
import itertools
import json
import math
import random

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file

from quantkit.errors import QuantkitError
from quantkit.files import tensor_bytes
from quantkit.formats import knapsack
from quantkit.formats.schemes import get_scheme
from quantkit.native.manifest import Manifest
from quantkit.run import allocate, budget
from quantkit.run.pipeline import CalibrateConfig, calibrate


def _brute_force(losses, costs, budget_bytes):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[i] for c, i in zip(costs, choice))
        loss = sum(item[i] for item, i in zip(losses, choice))
        if cost <= budget_bytes and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    items, options = rng.randint(1, 5), rng.randint(1, 4)
    costs = [[rng.randint(1, 30) for _ in range(options)] for _ in range(items)]
    losses = [[rng.random() for _ in range(options)] for _ in range(items)]
    smallest, largest = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget_bytes = rng.randint(smallest, largest + 5)
    chosen = knapsack.solve(losses, costs, budget_bytes)
    assert sum(c[i] for c, i in zip(costs, chosen)) <= budget_bytes
    assert math.isclose(sum(item[i] for item, i in zip(losses, chosen)), _brute_force(losses, costs, budget_bytes))
    # coarser units: never over the budget, never better than the optimum
    coarse = knapsack.solve(losses, costs, budget_bytes, unit=3) if sum(-(-min(c) // 3) for c in costs) <= budget_bytes // 3 else None
    if coarse is not None:
        assert sum(c[i] for c, i in zip(costs, coarse)) <= budget_bytes
        assert sum(item[i] for item, i in zip(losses, coarse)) >= _brute_force(losses, costs, budget_bytes) - 1e-12


def test_solver_refuses_an_impossible_budget():
    with pytest.raises(QuantkitError, match="below the smallest allocation"):
        knapsack.solve([[1.0, 0.5], [1.0, 0.2]], [[4, 8], [4, 8]], 7)


@pytest.mark.parametrize("text, expected", [("80MB", 80 * 10**6), ("1.5GB", 1_500_000_000), ("800MiB", 800 * 2**20),
                                            ("123456", 123456), ("2 GiB", 2 * 2**30), ("64k", 64_000)])
def test_parse_size(text, expected):
    assert budget.parse_size(text) == expected


@pytest.mark.parametrize("text", ["big", "3.2 parsecs", "", "-5MB"])
def test_parse_size_refuses(text):
    with pytest.raises(QuantkitError, match="is not a size"):
        budget.parse_size(text)


def test_candidates_parse_and_suggest():
    labels = [c.label for c in budget.parse_candidates("int4-g64,int3-g128-sym,int8-ch,q4_k", "w4a16", None)]
    assert labels == ["int4-g64-asym", "int3-g128-sym", "int8-ch-asym", "q4_k"]
    defaults = [c.label for c in budget.parse_candidates(None, "w4a16", True)]
    assert len(defaults) == 30 and {"int2-g32-sym", "int3-g256-sym", "int3-ch-sym", "int8-ch-sym"} <= set(defaults)
    with pytest.raises(QuantkitError, match="did you mean"):
        budget.parse_candidates("int4-g64,int9-g64", "w4a16", None)
    with pytest.raises(QuantkitError, match="weight-only integer --scheme"):
        budget.parse_candidates(None, "w8a8_dynamic", None)


@pytest.mark.parametrize("scheme, bits, group, sym", [("w4a16", 4, 64, False), ("w4a16", 3, 128, True),
                                                      ("w4a16", 2, 32, False), ("w8a16", 8, -1, True),
                                                      ("q4_k", None, None, None), ("nvfp4a16", None, None, None)])
def test_stored_bytes_count_every_stored_tensor(scheme, bits, group, sym):
    """bits per weight of the accounting against the grid's definition: codes (int32 words hold whole rows of
    32 codes), fp16 scales per group, int8 zeros, fp8 scales and one fp32 global scale (NVFP4)."""
    from quantkit.algorithms.rtn import quantize_rtn
    from quantkit.run.recipe import make_scheme

    out, columns = 96, 512 if scheme == "q4_k" else 320
    spec = make_scheme(scheme, bits, group, sym).weight
    quant = quantize_rtn(torch.randn(out, columns), spec)
    if scheme == "q4_k":   # natively: 4-bit codes, fp16 sub-block scales and int8 mins per 32, fp16 d and dmin per 256
        expected = out * columns // 2 + out * columns // 32 * 3 + out * columns // 256 * 4
    elif scheme == "nvfp4a16":    # 4-bit codes, one fp8 scale per 16, one fp32 global scale
        expected = out * columns // 2 + out * columns // 16 + 4
    else:
        groups = 1 if group == -1 else -(-columns // group)
        expected = out * (-(-columns // 32) * bits * 4 if bits < 8 else columns) + out * groups * (2 + (0 if sym else 1))
    assert budget.stored_bytes(quant) == expected


@pytest.fixture(scope="module")
def allocated(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("alloc") / "out"
    result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm="gptq", dataset=str(text_file),
                                       num_samples=8, seq_len=64, target_bits=3.6, out=out))
    return result


def test_target_bits_met_exactly_in_the_written_files(allocated):
    manifest = allocated.manifest
    out = allocated.out
    sizes = tensor_bytes([out / f for f in manifest.weight_files])
    grid_bytes = sum(sizes[name] for entry in manifest.layers.values() for role, name in entry.tensors.items()
                     if role != "bias")
    weights = sum(math.prod(entry.shape) for entry in manifest.layers.values())
    assert 8 * grid_bytes / weights <= 3.6
    assert manifest.allocation.achieved.bits == pytest.approx(8 * grid_bytes / weights)
    assert manifest.allocation.achieved.grid_bytes == manifest.allocation.planned_bytes == grid_bytes
    # mixed: more than one grid, every layer's rule names the allocated recipe
    assert len(manifest.allocation.chosen) > 1
    assert all(entry.rule.startswith("recipe rule") for entry in manifest.layers.values())
    # the per-layer record: each layer's chosen candidate bytes equal its tensors in the file
    table = json.loads((out / "allocation.json").read_text())["layers"]
    for name, entry in manifest.layers.items():
        chosen = table[name]["chosen"]
        assert table[name]["candidates"][chosen]["bytes"] == sum(
            sizes[t] for role, t in entry.tensors.items() if role != "bias")


def test_written_recipe_reruns_to_the_same_model(allocated, llama_dir, text_file, tmp_path):
    rerun = calibrate(CalibrateConfig(model=str(llama_dir), recipe=allocated.out / "recipe.yaml",
                                      dataset=str(text_file), num_samples=8, seq_len=64, out=tmp_path / "rerun"))
    first = load_file(str(allocated.out / allocated.manifest.weight_files[0]))
    second = load_file(str(rerun.out / rerun.manifest.weight_files[0]))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_reuses_the_measured_sensitivities(allocated, llama_dir, text_file, tmp_path):
    """A run killed after block 0 resumes without a second sensitivity pass, to the very same files."""
    from test_pipeline import _files, _KillAfter

    from quantkit.errors import RunInterrupted

    options = dict(model=str(llama_dir), scheme="w4a16", algorithm="gptq", dataset=str(text_file), num_samples=8,
                   seq_len=64, target_bits=3.6, out=tmp_path / "resumed")
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(**options), progress=_KillAfter(0))
    assert (tmp_path / ".resumed.partial" / "sensitivity.json").is_file()
    resumed = calibrate(CalibrateConfig(resume=True, **options))
    assert "sensitivity" not in resumed.timings
    straight, again = _files(allocated.out), _files(tmp_path / "resumed")
    records = [json.loads(files.pop("allocation.json")) for files in (straight, again)]
    for record in records:
        del record["seconds"]     # a timing, like the manifest's
    assert straight == again and records[0] == records[1]


def test_sensitivities_order_the_grids(allocated):
    """On every layer the measured error falls with bits at a fixed group size, and the block gain is positive."""
    table = json.loads((allocated.out / "allocation.json").read_text())["layers"]
    for layer in table.values():
        errors = [layer["candidates"][f"int{b}-g32-asym"]["error"] for b in (2, 3, 4, 5, 6, 8)]
        assert errors == sorted(errors, reverse=True)
        assert len(layer["gains"]) == 2 and all(gain > 0 for _, gain in layer["gains"])


def test_target_size_counts_the_whole_output(llama_dir, text_file, tmp_path):
    source = sum(p.stat().st_size for p in llama_dir.glob("*.safetensors"))
    target = int(source * 0.3)
    result = calibrate(CalibrateConfig(model=str(llama_dir), algorithm="rtn", scheme="w4a16", dataset=str(text_file),
                                       num_samples=4, seq_len=32, target_size=str(target), out=tmp_path / "o",
                                       sensitivity="layer"))
    written = sum((result.out / f).stat().st_size for f in result.manifest.weight_files)
    assert written <= target
    assert result.manifest.allocation.achieved.weight_file_bytes == written
    assert written > 0.97 * target     # the header bound is tight enough to spend the budget


def test_moe_model_allocates(qwen3_moe_dir, text_file, tmp_path):
    """Experts get grids like any Linear; the prediction equals what the files hold, under a size target too."""
    result = calibrate(CalibrateConfig(model=str(qwen3_moe_dir), scheme="w4a16", algorithm="rtn", dataset=str(text_file),
                                       num_samples=4, seq_len=32, target_bits=4.5, candidates="int3-g32,int4-g32,int8-g32",
                                       out=tmp_path / "moe"))
    allocation = result.manifest.allocation
    assert allocation.achieved.grid_bytes == allocation.planned_bytes
    experts = {e.scheme.weight.bits for n, e in result.manifest.layers.items() if ".experts." in n}
    assert len(allocation.chosen) > 1 and experts
    source = sum(p.stat().st_size for p in qwen3_moe_dir.glob("*.safetensors"))
    sized = calibrate(CalibrateConfig(model=str(qwen3_moe_dir), scheme="w4a16", algorithm="rtn", dataset=str(text_file),
                                      num_samples=4, seq_len=32, target_size=str(int(source * 0.3)),
                                      candidates="int3-g32,int4-g32,int8-g32", out=tmp_path / "moe-size"))
    written = sized.manifest.allocation.achieved.weight_file_bytes
    assert 0.93 * source * 0.3 < written <= source * 0.3   # a tiny model: the header bounds weigh most


def test_hqq_zero_points_are_counted(llama_dir, text_file, tmp_path):
    """HQQ stores fractional zero points as float32: the accounting knows, so the run meets its target exactly."""
    result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm="hqq", dataset=str(text_file),
                                       num_samples=4, seq_len=32, target_bits=5.0,
                                       candidates="int3-g32,int4-g32,int4-g64,int8-g64", out=tmp_path / "hqq"))
    allocation = result.manifest.allocation      # int3-g32 alone: 3 + (16 + 32) / 32 = 4.5 bits with fp32 zeros
    assert allocation.achieved.grid_bytes == allocation.planned_bytes
    assert allocation.achieved.bits <= 5.0


@pytest.mark.parametrize("algorithm,options", [("imatrix", {}), ("gptq", {"llama_cpp": True})])
def test_llama_cpp_minimums_are_counted(llama_dir, text_file, tmp_path, algorithm, options):
    """llama.cpp's Q4_1/Q5_1 search (imatrix; gptq with llama_cpp) stores its float16 minimums as fractional zero
    points (float32): the accounting knows, so the prediction equals the files and the run meets its target."""
    result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm=algorithm, options=options,
                                       dataset=str(text_file), num_samples=4, seq_len=32, target_bits=6.0,
                                       candidates="int4-g32,int5-g32", out=tmp_path / algorithm))
    allocation = result.manifest.allocation      # int4-g32 5.5 bits with fp32 zeros (4.75 with int8), int5-g32 6.5
    assert not all(entry.integer_zero for entry in result.manifest.layers.values())
    assert allocation.achieved.grid_bytes == allocation.planned_bytes
    assert allocation.achieved.bits <= 6.0 and len(allocation.chosen) == 2


def test_solver_ties_prefer_the_cheaper_option_and_refuse_non_finite_losses():
    assert knapsack.solve([[1.0, 1.0, 1.0]], [[30, 10, 20]], 100) == [1]
    with pytest.raises(ValueError):
        knapsack.solve([[float("nan"), 1.0]], [[1, 2]], 10)


def test_cli_target_bits_json_and_table(llama_dir, text_file, tmp_path):
    common = ["calibrate", str(llama_dir), "--dataset", str(text_file), "--num-samples", "4", "--seq-len", "32",
              "--target-bits", "4.25", "--candidates", "int3-g64,int4-g64,int5-g64,int8-g64"]
    done = run_cli(*common, "--out", tmp_path / "a", "--json")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["allocation"]["achieved"]["bits"] <= 4.25
    manifest = Manifest.load(tmp_path / "a")
    assert manifest.allocation.to_dict() == summary["allocation"]
    assert manifest.allocation.achieved.bits == summary["allocation"]["achieved"]["bits"]   # typed on reading
    document = json.loads((tmp_path / "a" / "quant_manifest.json").read_text())
    del document["allocation"]["achieved"]
    with pytest.raises(QuantkitError, match="'allocation' has a missing or malformed field"):
        Manifest.from_dict(document)
    assert get_scheme("w4a16").name in summary["schemes"]
    done = run_cli(*common, "--out", tmp_path / "b")
    assert done.exit_code == 0, done.output
    assert "allocation" in done.output and "bits per weight" in done.output


@pytest.mark.parametrize("flags, fragment", [
    (["--target-bits", "4", "--target-size", "1MB"], "not both"),
    (["--target-bits", "0"], "must be in (0, 32]"),
    (["--target-bits", "1.5"], "below the smallest the candidates allow"),
    (["--target-size", "lots"], "is not a size"),
    (["--target-bits", "4", "--candidates", "int4-g64,in5-g64"], "unknown candidate 'in5-g64'"),
    (["--target-bits", "4", "--candidates", "w8a8_dynamic"], "quantizes activations"),
    (["--target-bits", "4", "--bits", "3"], "--bits/--group-size fix one grid"),
    (["--candidates", "int4-g64"], "give a target"),
    (["--target-bits", "4", "--scheme", "w8a8_dynamic"], "weight-only integer --scheme"),
    (["--target-bits", "4", "--algo", "hqq", "--candidates", "int4-g64-sym"], "candidate int4-g64-sym"),
])
def test_cli_bad_targets_one_line(llama_dir, text_file, tmp_path, flags, fragment):
    done = run_cli("calibrate", llama_dir, "--dataset", text_file, "--num-samples", "4", "--seq-len", "32",
                   "--out", tmp_path / "x", "--quiet", *flags)
    assert_one_line_error(done, fragment)
    assert not (tmp_path / "x").exists()


def test_gains_are_measured_at_the_median_and_smallest_candidates():
    assert allocate.reference_candidates([30, None, 10, 20, 40]) == [0, 2]   # sizes 30 (median of 4) and 10
    layer = allocate.LayerSensitivity(10, [1, 2], [1, 2], [1.0, 8.0], gains=[(8.0, 4.0), (1.0, 1.0)])
    assert layer.gain(0.5) == 1.0 and layer.gain(16.0) == 4.0
    assert layer.gain(2.0) == pytest.approx(4.0 ** (1 / 3))      # log-linear between the points
    assert layer.loss("block") == [1.0, 32.0] and layer.loss("layer") == [1.0, 8.0]


def test_sensitivity_is_relative_to_the_residual_energy_per_token():
    """E_t[1/||h_t||^2] by hand; the layer kind scales the error by it, the block kind by its gain."""
    outputs = [torch.tensor([[[3.0, 4.0], [0.0, 2.0]]]), torch.tensor([[1.0, 0.0]])]
    assert allocate.inverse_energy(outputs) == pytest.approx((1 / 25 + 1 / 4 + 1) / 3)
    layer = allocate.LayerSensitivity(10, [1, 2], [1, 2], [1.0, 8.0], gains=[(1.0, 3.0)], inverse_energy=0.5)
    assert layer.loss("layer") == [0.5, 4.0] and layer.loss("block") == [3.0, 24.0]


def test_imatrix_allocates_on_symmetric_candidates_without_sym(llama_dir, text_file, tmp_path):
    """The base scheme (asymmetric w4a16) only names the candidates' family: imatrix is checked on each candidate."""
    result = calibrate(CalibrateConfig(model=str(llama_dir), scheme="w4a16", algorithm="imatrix",
                                       dataset=str(text_file), num_samples=4, seq_len=32, target_bits=4.0,
                                       candidates="int3-g64-sym,int4-g64-sym,int8-g64-sym", out=tmp_path / "imatrix"))
    assert result.manifest.allocation.achieved.bits <= 4.0
    assert {entry.algorithm for entry in result.manifest.layers.values()} == {"imatrix"}


def test_imatrix_sensitivities_measure_the_weights_the_gguf_file_holds():
    """Given an importance vector, a GGUF block type llama.cpp searches is measured on that search (the exporter's
    own quantizer, `gguf_budget.requantize`, with the same vector); other candidates and the bytes do not change."""
    from quantkit.exporters.gguf_budget import requantize

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(8, 256, generator=generator) * 0.02
    x = torch.randn(512, 256, generator=generator) * torch.linspace(0.1, 4.0, 256)
    hessian = x.t() @ x / x.shape[0]
    importance = torch.rand(256, generator=generator) * 3 + 0.1      # an imatrix's own, not diag(H)
    candidates = budget.parse_candidates("q4_k,q5_0,q4_1,q8_0,int4-g64", "w4a16", None)
    assert [allocate.searched_type(c) for c in candidates] == ["Q4_K", "Q5_0", "Q4_1", None, None]
    plain, _ = allocate.layer_errors("l", weight, hessian, candidates, lambda quant: 0)
    searched, _ = allocate.layer_errors("l", weight, hessian, candidates, lambda quant: 0, importance=importance)
    assert searched.bytes == plain.bytes and searched.file_bytes == plain.file_bytes
    for candidate, before, after in zip(candidates, plain.error, searched.error):
        if candidate.label in ("q8_0", "int4-g64-asym"):          # not searched: as before
            assert after == before, candidate.label
            continue
        delta = weight - requantize(weight, candidate.label.upper(), importance).dequantize().float()
        assert after == pytest.approx(float(((delta @ hessian) * delta).sum()), rel=1e-5), candidate.label
        assert after != before, candidate.label


def test_imatrix_runs_measure_their_candidates_on_the_imatrix_search():
    """Where the run quantizes with imatrix (the algorithm on any integer grid, asymmetric ones included, or
    SignRound's start on symmetric grids), a candidate's error is that of imatrix's search with importance diag(H),
    by the formula; other grids and runs keep the round-to-nearest error, and the bytes do not change."""
    from quantkit.algorithms.imatrix import quantize_imatrix

    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(8, 256, generator=generator) * 0.02
    x = torch.randn(512, 256, generator=generator) * torch.linspace(0.1, 4.0, 256)
    hessian = x.t() @ x / x.shape[0]
    candidates = budget.parse_candidates("int2-g64-sym,int4-g128-sym,int4-g64-asym,int8-ch-sym", "w4a16", None)
    specs = [c.scheme().weight for c in candidates]
    assert [allocate.imatrix_measured("imatrix", {})(s) for s in specs] == [True, True, True, True]
    assert [allocate.imatrix_measured("signround", {})(s) for s in specs] == [True, True, True, True]
    two_bit_asym = budget.parse_candidates("int2-g64-asym", "w4a16", None)[0].scheme().weight
    assert allocate.imatrix_measured("imatrix", {})(two_bit_asym)
    assert allocate.imatrix_measured("signround", {})(two_bit_asym)          # init=auto: imatrix's search there too
    assert not allocate.imatrix_measured("signround", {"init": "awq"})(two_bit_asym)
    assert not any(allocate.imatrix_measured(name, options)(specs[1])
                   for name, options in (("gptq", {}), ("rtn", {}), ("signround", {"init": "gptq"})))
    plain, _ = allocate.layer_errors("l", weight, hessian, candidates, lambda quant: 0)
    measured, _ = allocate.layer_errors("l", weight, hessian, candidates, lambda quant: 0,
                                        searched=allocate.imatrix_measured("imatrix", {}))
    assert measured.bytes == plain.bytes and measured.file_bytes == plain.file_bytes
    for spec, before, after in zip(specs, plain.error, measured.error):
        delta = weight - quantize_imatrix(weight, spec, hessian.diagonal()).dequantize().float()
        assert after == pytest.approx(float(((delta @ hessian) * delta).sum()), rel=1e-5)
        assert after != before


def test_last_block_gains_are_calibrated_by_the_blocks_median_ratio():
    """(layer error, residual gain, KL gain) per (Linear, candidate): on each candidate the KL gains are scaled by
    the median of residual / KL gain over the block's Linears (by hand: ratios 0.5, 1, 0.25 -> 0.5); a candidate
    without a KL keeps its residual gains."""
    points = {("a", 0): (1.0, 2.0, 4.0), ("b", 0): (3.0, 3.0, 3.0), ("c", 0): (2.0, 1.0, 4.0),
              ("a", 2): (9.0, 7.0, None), ("b", 2): (8.0, 5.0, 0.0)}
    assert allocate.logit_calibrated(points) == {("a", 0): (1.0, 2.0), ("b", 0): (3.0, 1.5), ("c", 0): (2.0, 2.0),
                                                 ("a", 2): (9.0, 7.0), ("b", 2): (8.0, 5.0)}


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_last_block_kl_gain_is_the_models_own_kl(tmp_path, architecture, monkeypatch):
    """The head loaded on its own (tied to the embeddings; Gemma 2 soft-caps its logits) gives the model's own
    next-token distributions: the KL gain of a changed last-block Linear times its layer error equals the KL per
    token between the whole HF model's outputs with and without the change (two Linears, in two groups)."""
    from conftest import make_checkpoint
    from transformers import AutoModelForCausalLM

    from quantkit.calibrate.hooks import BlockInput
    from quantkit.model.architectures import architecture_for
    from quantkit.model.checkpoint import Checkpoint, build_skeleton
    from quantkit.model.head import load_output_head

    overrides = {"final_logit_softcapping": 0.5} if architecture == "gemma2" else {}   # a cap the logits reach
    directory = make_checkpoint(tmp_path / architecture, architecture, tie_word_embeddings=True, **overrides)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    checkpoint = Checkpoint(directory)
    skeleton = build_skeleton(checkpoint.config, torch.float32)
    head = load_output_head(skeleton, architecture_for(checkpoint.config), checkpoint)
    assert skeleton.lm_head.weight.is_meta and head.lm_head.weight.data_ptr() != skeleton.lm_head.weight.data_ptr()
    assert (head.softcap is not None) == (architecture == "gemma2")
    block = model.model.layers[-1]
    captured = {}

    def keep_input(module, args, kwargs):
        captured["call"] = BlockInput(args[0] if args else kwargs["hidden_states"],
                                      {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})

    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    handle = block.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits.log_softmax(-1)
    handle.remove()
    generator = torch.Generator().manual_seed(1)
    names = ["mlp.down_proj", "self_attn.o_proj"]
    changed = {name: block.get_submodule(name).weight.detach() + 0.05 * torch.randn(
        block.get_submodule(name).weight.shape, generator=generator) for name in names}
    monkeypatch.setattr(allocate, "KL_GROUP", 1)
    gains = allocate.block_gains(block, [captured["call"]], {(name, 0): (changed[name], 2.0) for name in names}, head)
    for name in names:
        linear = block.get_submodule(name)
        original = linear.weight.detach().clone()
        with torch.no_grad():
            linear.weight.copy_(changed[name])
            after = model(ids, use_cache=False).logits.log_softmax(-1)
            linear.weight.copy_(original)
        expected = float((before.exp() * (before - after)).sum(-1).mean())
        assert expected > 1e-4
        assert gains[(name, 0)][2] * 2.0 == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("architecture", ["gemma3_multimodal", "phi3", "mixtral"])
def test_families_allocate_with_the_last_block_measured_at_the_logits(tmp_path, text_file, architecture):
    """The head loads under each family's names (multimodal Gemma 3's language_model prefix and tied head, Phi-3's
    own lm_head, Mixtral's experts in the last block): every Linear, the last block's included, has its gain points
    and the target is met."""
    from conftest import make_checkpoint

    directory = make_checkpoint(tmp_path / architecture, architecture, tie_word_embeddings=architecture != "phi3")
    result = calibrate(CalibrateConfig(model=str(directory), scheme="w4a16", algorithm="rtn", dataset=str(text_file),
                                       num_samples=4, seq_len=32, target_bits=4.0, out=tmp_path / "out",
                                       candidates="int2-g32,int4-g32,int8-g32"))
    assert result.manifest.allocation.achieved.bits <= 4.0
    table = json.loads((result.out / "allocation.json").read_text())["layers"]
    last = [name for name in table if ".layers.1." in name]
    assert last and all(len(table[name]["gains"]) == 2 for name in table)
