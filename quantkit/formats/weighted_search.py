"""llama.cpp's importance-weighted scale search on any symmetric integer group grid.

llama-quantize --imatrix fits each 32-value Q4_0/Q5_0 block's scale by weighted least squares
(make_qx_quants, rmse_type 1; `ggml_blocks.quantize_weighted_blocks`); the same search works for any bit width
and group size. Per group of values x_j with weights q_j = importance_j * sqrt(sigma2 + x_j^2) (sigma2 = the
row's mean x^2; importance_j = E[x_j^2] of the input column):

    for 19 trial grids iscale = -(nmax + 0.1 t) / signed_max, t = -9..9:
        L_j = clamp(round(iscale * x_j), -nmax, nmax - 1)
        s   = sum q_j x_j L_j / sum q_j L_j^2                 (the least-squares scale of those levels)
    keep the trial with the largest (sum q x L)^2 / sum q L^2 (the smallest weighted error)

with nmax = 2^(bits-1), so the value of largest magnitude may take the extra negative level (the scale is
negative when it is positive). The scale is stored in the grid's scale format; the search's levels are the
codes. A group of ragged width is searched on its own columns (padding carries weight 0).

Asymmetric integer groups (codes in [qmin, qmax], an integer zero point z, w_hat = (code - z) s) take the same
kind of search with a zero point, as llama.cpp's make_qkx2_quants does for its float minimums (rmin -1, rdelta
0.1, 20 steps), on the group's range [lo, hi] widened to hold 0 (as the min/max grid's, so z stays in range):

    for 21 trial grids iscale = (n - 1 + 0.1 t) / (hi - lo), t = 0..20, n = qmax - qmin:
        z   = clamp(qmin - round(lo * iscale), qmin, qmax)
        L_j = clamp(round(iscale * x_j) + z, qmin, qmax)
        s   = sum q_j x_j (L_j - z) / sum q_j (L_j - z)^2     (the least-squares scale with z fixed)
    keep the trial, or the min/max grid itself, with the smallest sum q_j (s (L_j - z) - x_j)^2
"""
from __future__ import annotations

import torch

from quantkit.formats import kquants, primitives
from quantkit.formats.numbers import scale_format
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec

ASYMMETRIC_TRIALS = [-1.0 + 0.1 * step for step in range(21)]   # n + this: the trial grids' level counts


def supports(spec: WeightSpec, asymmetric: bool = False) -> bool:
    """Symmetric integer grids with one float scale per group or row (no K super-blocks, no second scale); with
    ``asymmetric``, the asymmetric ones too (an integer zero point per group, `weighted_asymmetric`)."""
    return (spec.element.kind == "int" and (spec.symmetric or asymmetric) and spec.granularity in ("group", "channel")
            and spec.super_group is None and spec.second_scale is None and spec.scale_format in ("fp16", "bf16", "fp32"))


def _groups(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """weight [out, in] -> (values, search weights) [out * G, group] float32 (ragged groups padded with weight-0
    zeros), the group size and G. The weights are llama.cpp's q_j = importance_j * sqrt(sigma2 + x_j^2), sigma2
    the row's mean x^2."""
    x = weight.float()
    out_features, in_features = x.shape
    group = primitives.group_size_for(spec, in_features)
    groups = primitives.group_count(in_features, group)
    padding = groups * group - in_features
    sigma2 = (x * x).sum(dim=1, keepdim=True) / in_features
    weights = importance.float()[None, :] * torch.sqrt(sigma2 + x * x)
    x = torch.nn.functional.pad(x, (0, padding)).reshape(out_features * groups, group)
    weights = torch.nn.functional.pad(weights, (0, padding)).reshape(out_features * groups, group)
    return x, weights, group, groups


def weighted_symmetric(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor) -> QuantTensor:
    """weight [out, in] float, importance [in] float32 (E[x^2] per input column) -> the QuantTensor of the weighted
    search on ``spec`` (`supports`)."""
    assert supports(spec) and spec.symmetric, spec.describe()
    out_features, in_features = weight.shape
    x, weights, group, groups = _groups(weight, spec, importance)
    nmax = 1 << (spec.bits - 1)
    scale, levels = kquants.make_qx_quants_rmse1(x, nmax, weights)
    codes = (levels - nmax).reshape(out_features, groups * group)[:, :in_features].to(torch.int8)
    stored = scale_format(spec.scale_format).round(scale.reshape(out_features, groups))
    return QuantTensor(codes, stored, None, spec)


def weighted_asymmetric(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor) -> QuantTensor:
    """weight [out, in] float, importance [in] float32 (E[x^2] per input column) -> the QuantTensor of the weighted
    search with an integer zero point (module docstring) on the asymmetric integer grid ``spec``."""
    assert supports(spec, asymmetric=True) and not spec.symmetric, spec.describe()
    out_features, in_features = weight.shape
    x, weights, _, groups = _groups(weight, spec, importance)
    qmin, qmax = spec.element.min, spec.element.max
    lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)      # padding zeros lie inside [lo, hi] already
    hi = x.amax(dim=1, keepdim=True).clamp(min=0.0)
    span = (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
    storage = scale_format(spec.scale_format)
    best_scale, best_zero = primitives.qparams_from_range(lo, hi, spec)      # the min/max grid itself
    best_codes = (torch.round(x / best_scale) + best_zero).clamp(qmin, qmax)
    best_error = (weights * ((best_codes - best_zero) * best_scale - x) ** 2).sum(dim=1, keepdim=True)
    for extra in ASYMMETRIC_TRIALS:
        iscale = (qmax - qmin + extra) / span
        zero = (qmin - torch.round(lo * iscale)).clamp(qmin, qmax)
        codes = (torch.round(x * iscale) + zero).clamp(qmin, qmax)
        levels = codes - zero
        norm = (weights * levels * levels).sum(dim=1, keepdim=True)
        fitted = (weights * x * levels).sum(dim=1, keepdim=True) / norm.clamp(min=torch.finfo(torch.float32).tiny)
        scale = storage.round(torch.where(norm > 0, fitted, 1 / iscale).clamp(min=storage.smallest))
        error = (weights * (levels * scale - x) ** 2).sum(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_codes = torch.where(better, codes, best_codes)
    codes = best_codes.reshape(out_features, -1)[:, :in_features].to(torch.int8)
    return QuantTensor(codes, best_scale.reshape(out_features, groups), best_zero.reshape(out_features, groups), spec)
