"""Pure-torch references of the kernel ops: what CPU runs, and what every kernel is tested against.

They take the kernels' operand layouts (`quantkit.cuda.layout`) and compute the meaning directly,
without the kernels' algebra: integer products in float64 (exact: every partial sum is an integer
below 2^53), the asymmetric correction as the product of the shifted codes (a - zx)(b - zw), the
dequantized weight through `primitives.dequantize`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats import packing, primitives

PACKED_BITS = (2, 4)   # bit widths the weight-only kernels read packed; others are int8 codes [K, N]


def quantize_int8_dynamic(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (codes [M, K] int8, scale [M] fp32): symmetric per row, s = max|x| / qmax."""
    codes, scale = primitives.quantize_activation_per_token(x, bits)
    return codes, scale.reshape(-1)


def quantize_int8_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """x [M, K] float, scale [1] fp32, zero [1] fp32 | None -> codes [M, K] int8 = clamp(round(x/s) + z)."""
    return primitives.quantize_activation_static(x, scale.float(), None if zero is None else zero.float(), bits)


def int8_accumulator(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor | None,
                     w_zero: torch.Tensor | None) -> torch.Tensor:
    """sum_k (a[m,k] - zx)(b[n,k] - zw[n]) exactly: a [M, K] int8, b [N, K] int8 -> [M, N] int64."""
    a_shifted = a.double() - (0.0 if a_zero is None else float(a_zero.reshape(-1)[0]))
    b_shifted = b.double() - (0.0 if w_zero is None else w_zero.double().reshape(-1, 1))
    return (a_shifted @ b_shifted.T).round().long()


def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, group_size: int,
                   a_zero: torch.Tensor | None, w_zero: torch.Tensor | None, w_rowsum: torch.Tensor | None,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y[m, n] = a_scale[m] * sum_g w_scale[g, n] * acc_g[m, n] + bias[n] -> [M, N] out_dtype.

    a [M, K] int8, b [N, K] int8, a_scale [M] or [1], w_scale [G, N], a_zero [1], w_zero [N] (G = 1),
    bias [N]. ``w_rowsum`` is a kernel helper (per-group sum of b) and is not needed here.
    out_dtype int32 returns the zero-corrected integer accumulator (G = 1 only).
    """
    k = a.shape[1]
    groups = w_scale.shape[0]
    if out_dtype == torch.int32:
        assert groups == 1, "the raw accumulator exists only for per-tensor/per-channel weight scales"
        return int8_accumulator(a, b, a_zero, w_zero).to(torch.int32)
    y = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for g in range(groups):
        cols = slice(g * group_size, min((g + 1) * group_size, k))
        acc = int8_accumulator(a[:, cols], b[:, cols], a_zero, w_zero)
        y += acc.double() * w_scale[g].double()[None, :]
    y = y * a_scale.double().reshape(-1, 1)
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)


def unpack_weight(weight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Kernel weight layout -> codes [N, K] int8 (inverse of `quantkit.cuda.layout.pack_weight`)."""
    if bits in PACKED_BITS:
        return packing.unpack(weight.T.contiguous().cpu(), bits, k).to(weight.device)
    return weight.T.contiguous()


def dequantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
                      group_size: int, g_idx: torch.Tensor | None, k: int) -> torch.Tensor:
    """[N, K] float32 = (code - zero[g(k)]) * scale[g(k)] from the kernel layout ([G, N] parameters)."""
    codes = unpack_weight(weight, bits, k)
    zero_rows = None if zero is None else zero.float().T
    return primitives.dequantize(codes, scale.float().T, zero_rows, group_size, g_idx)


def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
                   group_size: int, g_idx: torch.Tensor | None, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """y = x @ dequantize(W)^T + bias, in fp32, cast to x.dtype: x [M, K] -> [M, N]."""
    w = dequantize_weight(weight, bits, scale, zero, group_size, g_idx, k)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What an fp8 GEMM (torch._scaled_mm) computes: y[m, n] = a_scale[m] * w_scale[n] * sum_k a[m,k] b[n,k]
    + bias[n]. a [M, K] float8_e4m3fn, b [N, K] float8_e4m3fn, a_scale [M] or [1], w_scale [N] or [1]
    float32; products of fp8 values are exact in float64, and so is the sum at these sizes."""
    acc = a.double() @ b.double().T
    y = acc * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)


def group_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor | None, b: torch.Tensor, w_scale: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """What a block-scaled GEMM (MXFP4/NVFP4 tensor cores, DeepSeek FP8 blocks) computes:

        y[m, n] = sum_g a_scale[m, g] * w_scale[n, g] * sum_{k in g} a[m, k] * b[n, k]  + bias[n]

    a [M, K] activation codes (or the float activations themselves with a_scale None), b [N, K] weight
    codes (fp4/fp8 values), a_scale [M, G], w_scale [N, G] float32, G = ceil(K / group_size). In float64:
    code products are exact, and so are the group sums at these sizes."""
    m, k = a.shape
    groups = w_scale.shape[1]
    padded = groups * group_size
    a64 = F.pad(a.double(), (0, padded - k)).reshape(m, groups, group_size)
    b64 = F.pad(b.double(), (0, padded - k)).reshape(b.shape[0], groups, group_size)
    partial = torch.einsum("mgk,ngk->mng", a64, b64)                      # [M, N, G] per-group sums
    scales = w_scale.double()[None]                                       # [1, N, G]
    if a_scale is not None:
        scales = scales * a_scale.double()[:, None, :]
    y = (partial * scales).sum(dim=-1)
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)
