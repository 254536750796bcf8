"""llama.cpp's importance-weighted scale search on any symmetric integer grid (`weighted_search`): equal to ggml's
own Q4_0/Q5_0 search where the grid is one of those blocks, better than round-to-nearest elsewhere, and what
`--algo imatrix` and GPTQ's `weighted_grid` option produce; on asymmetric integer grids the search with an
integer zero point, against a loop written out per group."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from quantkit.algorithms.gptq import gptq_quantize
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.formats import ggml_blocks, weighted_search
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec
from quantkit.native.loader import load_quantized
from quantkit.native.manifest import IN_COUNT, IN_SUM2
from quantkit.run.pipeline import CalibrateConfig, calibrate


@pytest.mark.parametrize("bits,fmt", [(4, "Q4_0"), (5, "Q5_0")])
def test_equals_ggml_search_on_its_blocks(bits, fmt):
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(32, 256, generator=generator) * torch.logspace(-3, 1, 32)[:, None]
    importance = torch.rand(256, generator=generator)
    spec = WeightSpec(bits, "group", True, 32)
    ours = weighted_search.weighted_symmetric(weight, spec, importance)
    ggml = QuantTensor.from_ggml_blocks(ggml_blocks.quantize_weighted_blocks(weight, fmt, importance), spec)
    assert torch.equal(ours.codes, ggml.codes) and torch.equal(ours.scale, ggml.scale)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 128), (3, 64), (2, 64), (4, -1)])
def test_weighted_error_is_below_round_to_nearest(bits, group_size):
    """576 columns: group 128 leaves a ragged last group of 64; -1 is one scale per row."""
    generator = torch.Generator().manual_seed(bits * 1000 + group_size)
    weight = torch.randn(48, 576, generator=generator)
    importance = torch.rand(576, generator=generator) ** 3 * 10
    spec = WeightSpec(bits, "channel" if group_size == -1 else "group", True, None if group_size == -1 else group_size)
    searched, nearest = weighted_search.weighted_symmetric(weight, spec, importance), quantize_rtn(weight, spec)
    assert searched.scale.shape == nearest.scale.shape

    def error(quant):
        return float(((quant.dequantize() - weight) ** 2 * importance).sum())

    assert error(searched) < 0.9 * error(nearest)


def test_float_grids_are_not_searched_asymmetric_ones_only_when_asked():
    assert not weighted_search.supports(WeightSpec(4, "group", False, 64))
    assert weighted_search.supports(WeightSpec(4, "group", False, 64), asymmetric=True)
    assert not weighted_search.supports(WeightSpec(4, "group", True, 32, scale_format="e8m0", format="fp4_e2m1"),
                                        asymmetric=True)
    assert not weighted_search.supports(WeightSpec(4, "group", True, 32, scale_format="e8m0", format="fp4_e2m1"))


def _asymmetric_by_loop(group: torch.Tensor, weights: torch.Tensor, bits: int) -> tuple[float, float, list[float]]:
    """The module docstring's asymmetric search for one group, one trial at a time in float64 (scale rounded to
    float16 as stored): -> (scale, zero, codes)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x, q = group.double().tolist(), weights.double().tolist()
    lo, hi = min(min(x), 0.0), max(max(x), 0.0)

    def half(v):
        return float(torch.tensor(v, dtype=torch.float64).to(torch.float16))

    def error(scale, zero, codes):
        return sum(qj * ((c - zero) * scale - xj) ** 2 for qj, xj, c in zip(q, x, codes))

    scale = half((hi - lo) / (qmax - qmin))
    zero = min(max(qmin - round(lo / scale), qmin), qmax)
    best = (scale, zero, [min(max(round(xj / scale) + zero, qmin), qmax) for xj in x])
    for t in range(21):
        iscale = (qmax - qmin - 1 + 0.1 * t) / (hi - lo)
        zero = min(max(qmin - round(lo * iscale), qmin), qmax)
        codes = [min(max(round(xj * iscale) + zero, qmin), qmax) for xj in x]
        norm = sum(qj * (c - zero) ** 2 for qj, c in zip(q, codes))
        scale = half(sum(qj * xj * (c - zero) for qj, xj, c in zip(q, x, codes)) / norm)
        if error(scale, zero, codes) < error(*best):
            best = (scale, zero, codes)
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_search_equals_the_loop_per_group(bits):
    """Each group's scale, zero point and codes are the written-out search's (shifted weights, so the groups'
    ranges are lopsided; near-tie trials can flip between float32 and float64, so a few groups may differ)."""
    generator = torch.Generator().manual_seed(bits)
    weight = torch.randn(6, 96, generator=generator) + torch.rand(6, 1, generator=generator)
    importance = torch.rand(96, generator=generator) + 0.1
    spec = WeightSpec(bits, "group", False, 32)
    ours = weighted_search.weighted_asymmetric(weight, spec, importance)
    sigma2 = (weight * weight).mean(dim=1, keepdim=True)
    weights = importance[None, :] * torch.sqrt(sigma2 + weight * weight)
    agree = 0
    for row in range(6):
        for g in range(3):
            columns = slice(32 * g, 32 * g + 32)
            scale, zero, codes = _asymmetric_by_loop(weight[row, columns], weights[row, columns], bits)
            agree += (float(ours.scale[row, g]) == scale and float(ours.zero[row, g]) == zero
                      and ours.codes[row, columns].tolist() == codes)
    assert agree >= 17
    assert int(ours.codes.min()) >= spec.element.min and int(ours.codes.max()) <= spec.element.max


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (2, 64)])
def test_asymmetric_weighted_error_is_below_round_to_nearest(bits, group_size):
    """576 columns (group 128: a ragged last group of 64); the zero points stay integers in the code range."""
    generator = torch.Generator().manual_seed(bits * 1000 + group_size)
    weight = torch.randn(48, 576, generator=generator) + 0.3
    importance = torch.rand(576, generator=generator) ** 3 * 10
    spec = WeightSpec(bits, "group", False, group_size)
    searched, nearest = weighted_search.weighted_asymmetric(weight, spec, importance), quantize_rtn(weight, spec)
    assert searched.scale.shape == nearest.scale.shape == searched.zero.shape
    assert torch.equal(searched.zero, searched.zero.round())
    assert searched.zero.min() >= spec.element.min and searched.zero.max() <= spec.element.max

    def error(quant):
        return float(((quant.dequantize() - weight) ** 2 * importance).sum())

    assert error(searched) < 0.9 * error(nearest)


def test_imatrix_algorithm_on_an_asymmetric_group_grid(llama_dir, tmp_path):
    """`--algo imatrix` on int3 g64 asym: the reloaded codes, scales and zero points are the search's on each
    Linear's recorded importance."""
    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "o", scheme="w4a16", bits=3, group_size=64,
                              symmetric=False, algorithm="imatrix", dataset="dummy", num_samples=8, seq_len=32,
                              batch_size=4))
    results = load_file(tmp_path / "o" / "search_results.safetensors")
    model = load_quantized(tmp_path / "o", dtype=torch.float32)
    source = load_file(llama_dir / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj"
    importance = results[f"{name}.{IN_SUM2}"] / results[f"{name}.{IN_COUNT}"]
    expected = weighted_search.weighted_asymmetric(source[f"{name}.weight"], WeightSpec(3, "group", False, 64),
                                                   importance)
    layer = model.get_submodule(name)
    assert torch.equal(layer.weight_codes, expected.codes)
    assert torch.equal(layer.weight_scale.float(), expected.scale)
    assert torch.equal(layer.weight_zero, expected.zero)


def test_imatrix_algorithm_on_an_integer_group_grid(llama_dir, tmp_path):
    """`--algo imatrix` on int4 g64: each Linear's codes are the search's on its recorded importance E[x^2]."""
    calibrate(CalibrateConfig(model=str(llama_dir), out=tmp_path / "o", scheme="w4a16", group_size=64, symmetric=True,
                              algorithm="imatrix", dataset="dummy", num_samples=8, seq_len=32, batch_size=4))
    results = load_file(tmp_path / "o" / "search_results.safetensors")
    model = load_quantized(tmp_path / "o", dtype=torch.float32)
    source = load_file(llama_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    importance = results[f"{name}.{IN_SUM2}"] / results[f"{name}.{IN_COUNT}"]
    expected = weighted_search.weighted_symmetric(source[f"{name}.weight"], WeightSpec(4, "group", True, 64), importance)
    layer = model.get_submodule(name)
    assert torch.equal(layer.weight_codes, expected.codes)
    assert torch.equal(layer.weight_scale.float(), expected.scale)


def test_gptq_places_codes_on_the_searched_grid():
    """With weighted_grid, GPTQ keeps the search's scales and lowers the Hessian-weighted output error below the
    search's own codes on correlated inputs."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 128, generator=generator)
    mixing = torch.randn(128, 128, generator=generator) * 0.3 + torch.eye(128)
    x = torch.randn(2048, 128, generator=generator) @ mixing
    hessian = 2 * x.T @ x / x.shape[0]
    spec = WeightSpec(4, "group", True, 64)
    quant, _ = gptq_quantize(weight, hessian, spec, weighted_grid=True)
    searched = weighted_search.weighted_symmetric(weight, spec, torch.diag(hessian) / 2)
    assert torch.equal(quant.scale, searched.scale)

    def output_error(q):
        return float(((x @ (q.dequantize() - weight).T) ** 2).mean())

    assert output_error(quant) < 0.8 * output_error(searched)
