"""Triton kernels of the quantized layers and their launchers (imported only when Triton is used).

Kernels are written as plain functions and wrapped on demand, so one source serves two runners:
  - compiled (``interpret=False``): ``triton.autotune(triton.jit(fn))`` for CUDA tensors (Hopper configs);
  - interpreted (``interpret=True``): Triton's CPU interpreter on CPU tensors with one small fixed
    config, which is how CPU-only CI runs the very same kernel code (slow: small shapes only).
Neither is built at import; `kernels(interpret)` builds and caches them.

Operand layouts (see `quantkit.cuda.layout` for how they are made from a QuantLinear):
  int8 GEMM:       a [M, K] int8 (row-major), b [N, K] int8 (K contiguous: K-major, what int8 wgmma needs),
                   a_scale [M] or [1] fp32, w_scale [G, N] fp32, w_zero [N] int32, w_rowsum [G, N] int32.
  weight-only GEMM: x [M, K] fp16/bf16/fp32; weights K-major words [ceil(K/32)*bits, N] int32 for
                   bits 2 and 4 (the transpose of packing.pack: 32/bits codes per word, LSB first,
                   unsigned u = code + 2^(bits-1)), or int8 codes [K, N] for any other bit width;
                   scale [G, N] fp16, zero [G, N] fp16/fp32 (w = (code - zero) * scale), g_idx [K] int32.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Magic constant 1.5 * 2^23: for |v| < 2^22, (v + C) - C is v rounded to the nearest integer with
# ties to even in fp32 arithmetic (the sum lands where one ulp is 1). Used in the interpreter, which
# has no libdevice; compiled kernels call libdevice.rint. Both equal torch.round.
_RINT_MAGIC = tl.constexpr(12582912.0)
# x / scale is clamped to +-2^20 before rounding: far outside any int8 range, so clamping after
# rounding gives the same codes, and the magic-constant rounding stays exact.
_PRE_CLAMP = tl.constexpr(1048576.0)
GEMV_MAX_M = 4


# ------------------------------------------------------------------------------------------------
# Shared pieces (jit helpers are inlined into the kernels that call them).
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (pid_m, pid_n) in grouped order: GROUP_M row-tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _dequantize_tile(w_ptr, scale_ptr, zero_ptr, g_idx_ptr, k0, rn, mask_n, K, N, word_rows, stride_wk,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                     HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # W[k0:k0+BLOCK_K, rn] in fp32 = (code - zero[g(k)]) * scale[g(k)], 0 outside K. Packed widths load
    # the [BLOCK_K * BITS / 32, BLOCK_N] words once and split each word into its 32 / BITS codes in
    # registers: code k0 + PER_WORD * r + j is bits [BITS * j, BITS * (j + 1)) of word row r.
    kk = k0 + tl.arange(0, BLOCK_K)
    mask_k = kk < K
    w_mask = mask_k[:, None] & mask_n[None, :]
    if BITS == 8:
        code = tl.load(w_ptr + kk.to(tl.int64)[:, None] * stride_wk + rn[None, :], mask=w_mask, other=0)
        code = code.to(tl.int32)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        rw = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        words = tl.load(w_ptr + rw.to(tl.int64)[:, None] * stride_wk + rn[None, :],
                        mask=(rw[:, None] < word_rows) & mask_n[None, :], other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        unsigned = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        code = tl.reshape(unsigned, (BLOCK_K, BLOCK_N)) - (1 << (BITS - 1))
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + kk, mask=mask_k, other=0)
        params = g[:, None] * N + rn[None, :]
        scale = tl.load(scale_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
    elif GROUP_SIZE % BLOCK_K == 0:
        # the whole tile lies in one group: one row of parameters
        params = (k0 // GROUP_SIZE) * N + rn
        scale = tl.load(scale_ptr + params, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_ZERO:
            zero = tl.load(zero_ptr + params, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        params = (kk // GROUP_SIZE)[:, None] * N + rn[None, :]
        scale = tl.load(scale_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(zero_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
    w = code.to(tl.float32)
    if HAS_ZERO:
        w = w - zero
    return tl.where(w_mask, w * scale, 0.0)


# ------------------------------------------------------------------------------------------------
# Activation quantization: ROWS rows per program (1 on the GPU; many in the interpreter, which pays
# per program).
# ------------------------------------------------------------------------------------------------

def _quantize_int8_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, M, K, stride_xm, qmin, qmax,
                          DYNAMIC: tl.constexpr, HAS_ZERO: tl.constexpr, EXACT_RINT: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    # dynamic:  s_m = max(max_k |x_mk| / qmax, 1e-8);  static: s from calibration (one value)
    # codes = clamp(rint(x / s) + zero, qmin, qmax)   (x / s correctly rounded: div_rn)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    mask_m = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    codes_rows = codes_ptr + rows[:, None] * K
    if DYNAMIC:
        amax = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + rk[None, :], mask=mask_m[:, None] & (rk[None, :] < K), other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), qmax.to(tl.float32)), 1e-8)
        tl.store(scale_ptr + rows, scale, mask=mask_m)
        scale = scale[:, None]
    else:
        scale = tl.load(scale_ptr)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (rk[None, :] < K)
        x = tl.load(x_rows + rk[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_PRE_CLAMP), _PRE_CLAMP)
        if EXACT_RINT:
            q = libdevice.rint(v)
        else:
            q = (v + _RINT_MAGIC) - _RINT_MAGIC
        if HAS_ZERO:
            q = q + tl.load(zero_ptr)
        q = tl.minimum(tl.maximum(q, qmin.to(tl.float32)), qmax.to(tl.float32))
        tl.store(codes_rows + rk[None, :], q.to(tl.int8), mask=mask)


# ------------------------------------------------------------------------------------------------
# int8 x int8 -> int32 GEMM with a fused epilogue (per-tensor / per-channel weight scales).
# ------------------------------------------------------------------------------------------------

def _int8_gemm_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_zero_ptr, w_rowsum_ptr,
                      bias_ptr, M, N, K, M_BUCKET, stride_am, stride_bn, stride_om, a_scale_stride,
                      HAS_A_ZERO: tl.constexpr, HAS_W_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      RAW_INT32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # acc[m, n] = sum_k (a - zx)(b - zw) = sum a*b - zx * sum_k b[n] - zw[n] * sum_k a[m] + K * zx * zw[n]
    # y[m, n]   = acc * a_scale[m] * w_scale[n] + bias[n]
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K), other=0)
        b = tl.load(b_cols + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_W_ZERO:
            a_sum += tl.sum(a.to(tl.int32), axis=1)
    if HAS_A_ZERO:
        zx = tl.load(a_zero_ptr)
        acc -= zx * tl.load(w_rowsum_ptr + rn, mask=mask_n, other=0)[None, :]
    if HAS_W_ZERO:
        zw = tl.load(w_zero_ptr + rn, mask=mask_n, other=0)
        acc -= a_sum[:, None] * zw[None, :]
        if HAS_A_ZERO:
            acc += (K * zx) * zw[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if RAW_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        a_scale = tl.load(a_scale_ptr + rm * a_scale_stride, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0)
        y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def _int8_grouped_gemm_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, w_scale_ptr, a_zero_ptr, w_rowsum_ptr, bias_ptr,
                              M, N, K, M_BUCKET, group_size, num_groups, stride_am, stride_bn, stride_om,
                              a_scale_stride, HAS_A_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    # Group-wise symmetric weight scales (W4A8): exact int32 sums per group, scaled in fp32:
    # y[m, n] = a_scale[m] * sum_g w_scale[g, n] * (sum_{k in g} a*b - zx * sum_{k in g} b) + bias[n]
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, num_groups):
        k_start = g * group_size
        k_end = tl.minimum(k_start + group_size, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < k_end), other=0)
            b = tl.load(b_cols + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < k_end), other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_A_ZERO:
            acc -= tl.load(a_zero_ptr) * tl.load(w_rowsum_ptr + g * N + rn, mask=mask_n, other=0)[None, :]
        w_scale = tl.load(w_scale_ptr + g * N + rn, mask=mask_n, other=0.0)
        y += acc.to(tl.float32) * w_scale[None, :]
    a_scale = tl.load(a_scale_ptr + rm * a_scale_stride, mask=mask_m, other=0.0)
    y = y * a_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------
# Weight-only (W4A16, W8A16, ...) dequantize-GEMM and split-K GEMV.
# ------------------------------------------------------------------------------------------------

def _weight_only_gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, g_idx_ptr, bias_ptr, out_ptr,
                             M, N, K, M_BUCKET, word_rows, stride_xm, stride_wk, stride_om,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                             HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr):
    # y = x @ W^T + bias with W[k, n] = (code[k, n] - zero[g(k), n]) * scale[g(k), n] dequantized per
    # tile in fp32, cast to x's dtype for the tensor-core dot, accumulated in fp32. FP32_DOT: an exact
    # fp32 dot instead (fp32 inputs; and the interpreter, whose tl.dot cannot multiply bf16).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequantize_tile(w_ptr, scale_ptr, zero_ptr, g_idx_ptr, k0, rn, mask_n, K, N, word_rows, stride_wk,
                             BITS, GROUP_SIZE, HAS_ZERO, HAS_G_IDX, BLOCK_K, BLOCK_N)
        if FP32_DOT:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _weight_only_gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, g_idx_ptr, bias_ptr, out_ptr,
                             M, N, K, word_rows, stride_xm, stride_wk, stride_om,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                             HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # Decode (M <= 4): memory-bound, so no tensor cores: y[m, n] = sum_k x[m, k] * W[k, n] as a
    # broadcast product reduced over k, in fp32. Split-K: program (n, s) covers K tiles
    # [s * T, (s + 1) * T) and adds its partial sum into the pre-zeroed output (bias from s = 0).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = pid_k * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first_tile, last_tile):
        k0 = tile * BLOCK_K
        kk = k0 + rk
        mask_k = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        w = _dequantize_tile(w_ptr, scale_ptr, zero_ptr, g_idx_ptr, k0, rn, mask_n, K, N, word_rows, stride_wk,
                             BITS, GROUP_SIZE, HAS_ZERO, HAS_G_IDX, BLOCK_K, BLOCK_N)
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask, sem="relaxed")


# ------------------------------------------------------------------------------------------------
# Configurations: Hopper autotune lists (compiled) and one small fixed config (interpreter).
# ------------------------------------------------------------------------------------------------

def _config(block_m, block_n, block_k, group_m, stages, warps, **extra):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m, **extra},
                         num_stages=stages, num_warps=warps)


# int8 wgmma wants K-major operands and BLOCK_K = 128 (32 bytes x 4); large M tiles for prefill,
# 16/32-row tiles so decode-sized M does not waste 8x the MMA work.
INT8_GEMM_CONFIGS = [
    _config(128, 256, 128, 8, 3, 8), _config(256, 128, 128, 8, 3, 8), _config(128, 128, 128, 8, 4, 8),
    _config(128, 128, 128, 8, 4, 4), _config(128, 64, 128, 8, 4, 4), _config(64, 256, 128, 8, 4, 8),
    _config(64, 128, 128, 8, 4, 4), _config(64, 64, 128, 8, 5, 4), _config(32, 128, 128, 8, 5, 4),
    _config(32, 64, 256, 8, 4, 4), _config(16, 128, 128, 1, 5, 4), _config(16, 64, 256, 1, 4, 4),
]
WEIGHT_ONLY_GEMM_CONFIGS = [
    _config(128, 256, 64, 8, 3, 8), _config(256, 128, 64, 8, 3, 8), _config(128, 128, 64, 8, 4, 8),
    _config(128, 128, 64, 8, 4, 4), _config(64, 256, 64, 8, 3, 8), _config(64, 128, 64, 8, 4, 4),
    _config(64, 128, 128, 8, 3, 4), _config(32, 128, 128, 8, 4, 4), _config(32, 64, 128, 8, 4, 4),
    _config(16, 128, 128, 1, 4, 4), _config(16, 64, 128, 1, 4, 4), _config(16, 256, 64, 1, 4, 8),
]


# Decode GEMV candidates, tuned by `Kernels.gemv_config` (not triton.autotune: the launcher must know
# SPLIT_K to choose between writing the output directly and atomics into an fp32 buffer + one cast).
# Split-K fills the 132 SMs when N / BLOCK_N alone gives too few programs (N = 4096, BLOCK_N = 64: 64).
WEIGHT_ONLY_GEMV_CANDIDATES = [
    {"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, "num_warps": warps, "num_stages": 3}
    for n, k, warps in ((32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 128, 4), (16, 512, 4), (32, 512, 8))
    for s in (1, 2, 4, 8)
]

INTERPRETER_GEMV_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}


def interpreter_config(m: int, n: int, k: int) -> dict:
    """Tiles for the interpreter: small ones on small problems (several tiles and ragged edges in every
    dimension, what the tests need), larger ones on model-sized problems (numpy time is per tile)."""
    return {"BLOCK_M": 16 if m <= 64 else 64, "BLOCK_N": 32 if n <= 64 else 64, "BLOCK_K": 32 if k <= 64 else 64,
            "GROUP_M": 4}


def _prune_by_m(configs, named_args, **kwargs):
    """Drop tiles much taller than M (they only add masked-out MMA work); keep at least one."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


class Kernels:
    """The kernels of one runner (compiled or interpreted)."""

    def __init__(self, interpret: bool):
        self.interpret = interpret
        self.quantize = self._wrap(_quantize_int8_kernel)
        self.int8_gemm = self._wrap(_int8_gemm_kernel, INT8_GEMM_CONFIGS, ["M_BUCKET", "N", "K"], prune=True)
        self.int8_grouped_gemm = self._wrap(_int8_grouped_gemm_kernel, INT8_GEMM_CONFIGS,
                                            ["M_BUCKET", "N", "K", "group_size"], prune=True)
        self.weight_only_gemm = self._wrap(_weight_only_gemm_kernel, WEIGHT_ONLY_GEMM_CONFIGS,
                                           ["M_BUCKET", "N", "K"], prune=True)
        self.weight_only_gemv = self._wrap(_weight_only_gemv_kernel)
        self.gemv_tuned: dict[tuple, dict] = {}

    def _wrap(self, fn, configs=None, key=None, prune=False):
        if self.interpret:
            from triton.runtime.interpreter import InterpretedFunction

            return InterpretedFunction(fn)
        jitted = triton.jit(fn)
        if configs is None:
            return jitted
        pruning = {"early_config_prune": _prune_by_m} if prune else None
        return triton.autotune(configs=configs, key=key, prune_configs_by=pruning)(jitted)

    def gemv_config(self, key: tuple, launch) -> dict:
        """The fastest GEMV candidate for ``key``, timed once with do_bench; ``launch(config)`` runs one."""
        if key not in self.gemv_tuned:
            from triton.testing import do_bench

            times = {i: do_bench(lambda c=c: launch(c), warmup=5, rep=20)
                     for i, c in enumerate(WEIGHT_ONLY_GEMV_CANDIDATES)}
            self.gemv_tuned[key] = WEIGHT_ONLY_GEMV_CANDIDATES[min(times, key=times.get)]
        return self.gemv_tuned[key]

    def meta(self, m: int, n: int, k: int) -> dict:
        """Launch meta-parameters: fixed tiles in the interpreter, none (autotuned) compiled."""
        return interpreter_config(m, n, k) if self.interpret else {}


@functools.lru_cache(maxsize=2)
def kernels(interpret: bool) -> Kernels:
    return Kernels(interpret)


# ------------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by the callers (quantkit.cuda.ops / forward); shapes in docstrings.
# ------------------------------------------------------------------------------------------------

def _m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two (capped), so prefill lengths share tuned configs."""
    return min(1 << max(0, math.ceil(math.log2(max(m, 1)))), 8192)


def _check_device(interpret: bool, *tensors: torch.Tensor) -> None:
    want_cuda = not interpret
    for tensor in tensors:
        if tensor is not None and tensor.is_cuda != want_cuda:
            where = "CPU (interpreter)" if interpret else "CUDA"
            raise ValueError(f"Triton {where} launch got a tensor on {tensor.device}")


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None, qmin: int, qmax: int,
                  *, interpret: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float (last dim contiguous) -> (codes [M, K] int8, scale [M] fp32 dynamic | the static scale).

    scale None: dynamic symmetric per-row; else static per-tensor with optional zero ([1] fp32 each).
    """
    _check_device(interpret, x, scale, zero)
    m, k = x.shape
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    dynamic = scale is None
    out_scale = torch.empty(m, dtype=torch.float32, device=x.device) if dynamic else scale.float().reshape(1)
    zero_arg = zero.float().reshape(1) if zero is not None else out_scale
    if m == 0:
        return codes, out_scale
    block_k = 128 if interpret else min(4096, triton.next_power_of_2(k))
    rows = 32 if interpret else 1
    kernels(interpret).quantize[(triton.cdiv(m, rows),)](
        x, codes, out_scale, zero_arg, m, k, x.stride(0), qmin, qmax,
        DYNAMIC=dynamic, HAS_ZERO=zero is not None, EXACT_RINT=not interpret, ROWS=rows, BLOCK_K=block_k,
        **({} if interpret else {"num_warps": 4 if block_k <= 1024 else 8}))
    return codes, out_scale


def int8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, group_size: int,
              a_zero: torch.Tensor | None, w_zero: torch.Tensor | None, w_rowsum: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype, *, interpret: bool = False) -> torch.Tensor:
    """a [M, K] int8, b [N, K] int8 -> [M, N] out_dtype (int32: the zero-corrected accumulator).

    a_scale [M] or [1] fp32; w_scale [G, N] fp32 (G = ceil(K / group_size)); a_zero [1] int32;
    w_zero [N] int32 (G = 1 only); w_rowsum [G, N] int32 = per-group sum_k b (needed with a_zero).
    """
    _check_device(interpret, a, b, a_scale, w_scale, a_zero, w_zero, w_rowsum, bias)
    m, k = a.shape
    n = b.shape[0]
    groups = w_scale.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    dummy = w_scale
    common = dict(a_scale_stride=1 if a_scale.numel() > 1 else 0)
    ks = kernels(interpret)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if groups == 1:
        ks.int8_gemm[grid](
            a, b, out, a_scale, w_scale, a_zero if a_zero is not None else dummy,
            w_zero if w_zero is not None else dummy, w_rowsum if w_rowsum is not None else dummy,
            bias if bias is not None else dummy, m, n, k, _m_bucket(m), a.stride(0), b.stride(0), out.stride(0),
            HAS_A_ZERO=a_zero is not None, HAS_W_ZERO=w_zero is not None, HAS_BIAS=bias is not None,
            RAW_INT32=out_dtype == torch.int32, **common, **ks.meta(m, n, k))
    else:
        ks.int8_grouped_gemm[grid](
            a, b, out, a_scale, w_scale, a_zero if a_zero is not None else dummy,
            w_rowsum if w_rowsum is not None else dummy, bias if bias is not None else dummy,
            m, n, k, _m_bucket(m), group_size, groups, a.stride(0), b.stride(0), out.stride(0),
            HAS_A_ZERO=a_zero is not None, HAS_BIAS=bias is not None, **common, **ks.meta(m, n, k))
    return out


def weight_only_gemm(x: torch.Tensor, weight: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
                     group_size: int, g_idx: torch.Tensor | None, bias: torch.Tensor | None, k: int, *,
                     interpret: bool = False, gemv_config: dict | None = None) -> torch.Tensor:
    """x [M, K] float -> [M, N] x.dtype. weight: [ceil(K/32)*bits, N] int32 (bits 2, 4) or [K, N] int8;
    scale [G, N] fp16; zero [G, N] fp16/fp32 or None; g_idx [K] int32 or None; bias [N] or None.
    M <= GEMV_MAX_M takes the split-K GEMV kernel, larger M the tensor-core GEMM."""
    _check_device(interpret, x, weight, scale, zero, g_idx, bias)
    m = x.shape[0]
    n = weight.shape[1]
    dummy = scale
    args = (x, weight, scale, zero if zero is not None else dummy, g_idx if g_idx is not None else dummy,
            bias if bias is not None else dummy)
    # codes of widths other than 2 and 4 arrive as int8 [K, N]: the kernel's 8-bit path reads them
    flags = dict(BITS=bits if bits in (2, 4) else 8, GROUP_SIZE=group_size, HAS_ZERO=zero is not None,
                 HAS_G_IDX=g_idx is not None,
                 HAS_BIAS=bias is not None)
    ks = kernels(interpret)
    if m == 0 or n == 0:
        return torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m <= GEMV_MAX_M:
        def gemv(config: dict) -> torch.Tensor:
            split = config["SPLIT_K"]
            # Split-K partial sums are added atomically in fp32 (pre-zeroed), then cast once.
            out = torch.empty((m, n), dtype=x.dtype, device=x.device) if split == 1 else \
                torch.zeros((m, n), dtype=torch.float32, device=x.device)
            grid = (triton.cdiv(n, config["BLOCK_N"]), split)
            ks.weight_only_gemv[grid](*args, out, m, n, k, weight.shape[0], x.stride(0), weight.stride(0),
                                      out.stride(0),
                                      BLOCK_M=triton.next_power_of_2(m), **flags, **config)
            return out if split == 1 else out.to(x.dtype)

        if interpret:
            return gemv(dict(gemv_config or INTERPRETER_GEMV_CONFIG))
        key = (m, n, k, bits, group_size, x.dtype, zero is not None, g_idx is not None)
        return gemv(gemv_config or ks.gemv_config(key, gemv))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

    ks.weight_only_gemm[grid](*args, out, m, n, k, _m_bucket(m), weight.shape[0], x.stride(0), weight.stride(0),
                              out.stride(0),
                              FP32_DOT=interpret or x.dtype == torch.float32, **flags, **ks.meta(m, n, k))
    return out
