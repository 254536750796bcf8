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
"""
from __future__ import annotations

import torch

from quantkit.formats import kquants, primitives
from quantkit.formats.numbers import scale_format
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def supports(spec: WeightSpec) -> bool:
    """Symmetric integer grids with one float scale per group or row (no K super-blocks, no second scale)."""
    return (spec.element.kind == "int" and spec.symmetric and spec.granularity in ("group", "channel")
            and spec.super_group is None and spec.second_scale is None and spec.scale_format in ("fp16", "bf16", "fp32"))


def weighted_symmetric(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor) -> QuantTensor:
    """weight [out, in] float, importance [in] float32 (E[x^2] per input column) -> the QuantTensor of the weighted
    search on ``spec`` (`supports`)."""
    assert supports(spec), spec.describe()
    x = weight.float()
    out_features, in_features = x.shape
    group = primitives.group_size_for(spec, in_features)
    groups = primitives.group_count(in_features, group)
    padding = groups * group - in_features
    sigma2 = (x * x).sum(dim=1, keepdim=True) / in_features
    weights = importance.float()[None, :] * torch.sqrt(sigma2 + x * x)
    x = torch.nn.functional.pad(x, (0, padding)).reshape(out_features * groups, group)
    weights = torch.nn.functional.pad(weights, (0, padding)).reshape(out_features * groups, group)
    nmax = 1 << (spec.bits - 1)
    scale, levels = kquants.make_qx_quants_rmse1(x, nmax, weights)
    codes = (levels - nmax).reshape(out_features, groups * group)[:, :in_features].to(torch.int8)
    stored = scale_format(spec.scale_format).round(scale.reshape(out_features, groups))
    return QuantTensor(codes, stored, None, spec)
