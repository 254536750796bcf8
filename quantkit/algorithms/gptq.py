"""GPTQ (Frantar et al. 2022; IST-DASLab/gptq, AutoGPTQ, llm-compressor).

Quantizes the columns of W one at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss:
    H = (2/n) sum_t x_t x_t^T            (fp32, accumulated by hooks; calibrate/stats.Hessian)
    U = chol(H^-1)^T (upper)              (after damping H += lambda * mean(diag H) * I)
    for column i:  q_i = Q(w_i);  err = (w_i - q_i) / U_ii;  W[:, i:] -= err * U[i, i:]
Columns are swept in blocks of ``block_size`` with a lazy update of the remaining columns after each
block. Group parameters are chosen when the sweep reaches a group's first column, from the weights as
updated so far (blocks are aligned to groups so a group's columns are always up to date).
act_order sweeps columns by descending diag(H); groups then follow the sweep order (recorded in
g_idx), or, with static_groups, are fixed up front on the original column order (no g_idx needed).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, option, parse_options, register
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, kquants, primitives, weighted_search
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def damped_inverse_cholesky(hessian: torch.Tensor, damp: float, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, raising damp x10 on failure.

    With J the order reversal, J H J = L' L'^T gives H = R R^T for the upper triangular R = J L' J,
    so H^-1 = (R^-1)^T R^-1 and U = R^-1 = J L'^-1 J: one Cholesky and one triangular inverse instead of
    a Cholesky, an inverse and a second Cholesky (2.3x faster at 4096 columns, same U to 4e-7)."""
    mean_diag = torch.diag(hessian).mean().item()
    size = hessian.shape[0]
    for _ in range(max_tries):
        damped = hessian.flip(0, 1)                       # J H J (a copy)
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            identity = torch.eye(size, dtype=hessian.dtype)
            inverse = torch.linalg.solve_triangular(lower, identity, upper=False, out=identity)
            del lower
            return inverse.flip(0, 1), damp
        damp = damp * 10.0 if damp > 0 else 1e-3
    raise QuantkitError(f"GPTQ: the Hessian stays singular even with damping {damp:g}; use more calibration data")


def _aligned_block_size(block_size: int, group_size: int) -> int:
    """A block size holding whole groups, so a group never straddles a lazy-update boundary."""
    if group_size >= block_size:
        return group_size
    return max(1, block_size // group_size) * group_size


@contextmanager
def _single_thread() -> Iterator[None]:
    """For the column loop of one sweep block only: thousands of tiny ops, where OpenMP threads just add
    synchronisation (10x slower on a busy 2-core machine). The factorisation and the lazy block updates
    are large matrix products and run outside it, on the caller's threads (restored on exit)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, static_groups: bool = True,
                  global_scale: torch.Tensor | None = None, llama_cpp: bool = False, weighted_grid: bool = False
                  ) -> tuple[QuantTensor, dict[str, torch.Tensor]]:
    """weight [out, in] float, hessian [in, in] fp32 -> (QuantTensor, search results); ``global_scale``
    [1] overrides a two-level grid's own (a fused group's shared one); ``llama_cpp``: int4/int5 g32 symmetric
    grids take their scales from llama.cpp's weighted Q4_0/Q5_0 search, ``weighted_grid``: every symmetric
    integer grid takes its group scales from that search (`llama_cpp_grid`)."""
    quant, results, _ = _gptq(weight, hessian, spec, block_size, damp, act_order, static_groups, global_scale,
                              llama_cpp, weighted_grid=weighted_grid)
    return quant, results


def gptq_rounding(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, static_groups: bool = True,
                  global_scale: torch.Tensor | None = None, llama_cpp: bool = False, weighted_grid: bool = False
                  ) -> tuple[QuantTensor, dict[str, torch.Tensor], torch.Tensor]:
    """`gptq_quantize`, and the weight [out, in] fp32 its codes were rounded from: each column as the error
    feedback of the earlier columns left it, so codes = grid_round(rounded / scale) + zero exactly (where
    SignRound's learned offsets start)."""
    return _gptq(weight, hessian, spec, block_size, damp, act_order, static_groups, global_scale, llama_cpp,
                 keep_rounded=True, weighted_grid=weighted_grid)


def _gptq(weight, hessian, spec, block_size, damp, act_order, static_groups, global_scale=None, llama_cpp=False,
          keep_rounded=False, weighted_grid=False):
    out_features, in_features = weight.shape
    W = weight.float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0          # a column no token ever activated: any value is exact
    W[:, dead] = 0.0

    group_size = primitives.group_size_for(spec, in_features)
    whole_row = spec.granularity != "group"          # per tensor, channel or 2-D block: fixed parameters
    searched = llama_cpp_grid(W, H, spec, llama_cpp, weighted_grid)  # K-quants (Q4_0/Q5_0, ...): llama.cpp's search's
    k_grid = searched if spec.k_format is not None else None
    fixed_params = whole_row or (act_order and static_groups) or searched is not None
    # two-level grids (NVFP4): fixed by the whole tensor, or shared with the layers fused with it
    glob = primitives.global_scale(W, spec) if global_scale is None else global_scale
    if k_grid is not None:
        stored, stored_zero = k_grid.scale, k_grid.zero
        scale, zero = k_step(k_grid)
    elif fixed_params:  # per-tensor/channel/block, or static groups: parameters from the original weights
        stored, stored_zero = (searched.scale, None) if searched is not None else primitives.weight_qparams(W, spec, glob)
        zero = stored_zero
        # one row of parameters per output row (blocks repeat theirs over the block's rows)
        row_block = primitives.rows_per_scale(spec, out_features)
        scale = stored if row_block == 1 else stored.repeat_interleave(row_block, dim=0)[:out_features]
        if zero is not None and row_block > 1:
            zero = zero.repeat_interleave(row_block, dim=0)[:out_features]
    else:
        num_groups = primitives.group_count(in_features, group_size)
        scale = torch.empty(out_features, num_groups)
        zero = None if spec.symmetric else torch.empty(out_features, num_groups)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_features)
    searched_t = None if searched is None else searched.codes[:, perm].t().contiguous()  # the search's own codes
    if act_order:
        H = H[perm][:, perm]
    U, damp_used = damped_inverse_cholesky(H, damp)
    del H
    # Columns as rows ([in, out], contiguous): each step of the sweep touches one contiguous row.
    Wt = W[:, perm].t().contiguous()
    scale_t = scale.expand(out_features, -1).t().contiguous()        # [G, out] stored scales
    step_t = scale_t if k_grid is not None else primitives.effective_scale(scale_t, glob)  # [G, out] a code's worth
    zero_t = None if zero is None else zero.expand(out_features, -1).t().contiguous()

    # Group of each swept position: static groups follow the original column, dynamic ones the sweep.
    original_group = torch.arange(in_features) // group_size
    position_group = (original_group[perm] if fixed_params else torch.arange(in_features) // group_size).tolist()
    element = spec.element
    codes_t = torch.empty(in_features, out_features, dtype=primitives.code_dtype(element))
    rounded_t = torch.empty(in_features, out_features) if keep_rounded else None
    qmin, qmax = element.min, element.max
    step = block_size if whole_row else _aligned_block_size(block_size, group_size)

    def sweep_block(i1: int, W1: torch.Tensor, U1: torch.Tensor) -> torch.Tensor:
        """Quantize the columns i1.. of the block W1 [B, out] in order; returns their scaled errors."""
        Err1 = torch.empty_like(W1)
        for i in range(W1.shape[0]):
            col = i1 + i
            g = position_group[col]
            if not fixed_params and col % group_size == 0:
                end = min(col + group_size, in_features) - i1
                columns = W1[i:end]                                       # the group's columns [B, out]
                lo, hi = columns.amin(dim=0).clamp(max=0.0), columns.amax(dim=0).clamp(min=0.0)
                s, z = primitives.qparams_from_range(lo, hi, spec, glob)  # [out] each
                scale_t[g], step_t[g] = s, primitives.effective_scale(s, glob)
                if zero_t is not None:
                    zero_t[g] = z
            s = step_t[g]
            w = W1[i]
            if rounded_t is not None:
                rounded_t[col] = w
            if searched is not None:   # llama.cpp's grid: a sub-block whose step is 0 keeps the search's code
                offset = None if zero_t is None else zero_t[g]
                q, dequantized = _llama_cpp_round(w, s, offset, element, searched_t[col])
            elif element.kind == "float":      # the nearest grid value (symmetric: no zero point)
                q = element.round(w / s)
                dequantized = q * s
            elif zero_t is not None:
                q = (torch.round(w / s) + zero_t[g]).clamp_(qmin, qmax)
                dequantized = (q - zero_t[g]) * s
            else:
                q = torch.round(w / s).clamp_(qmin, qmax)
                dequantized = q * s
            codes_t[col] = q.to(codes_t.dtype)
            err = (w - dequantized) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)   # W[:, i+1:] -= err * U[i, i+1:] (row i is done)
            Err1[i] = err
        return Err1

    for i1 in range(0, in_features, step):
        i2 = min(i1 + step, in_features)
        with _single_thread():
            Err1 = sweep_block(i1, Wt[i1:i2].clone(), U[i1:i2, i1:i2])
        Wt[i2:] -= U[i1:i2, i2:].t() @ Err1              # lazy update of the columns after the block

    inverse = torch.argsort(perm)
    codes = codes_t.t()[:, inverse].contiguous()
    scale = stored if fixed_params else scale_t.t().contiguous()     # [R, G] as the grid defines them
    if fixed_params:
        zero = stored_zero
    else:
        zero = None if zero_t is None else zero_t.t().contiguous()
    g_idx = None
    if act_order and not fixed_params:
        g_idx = torch.tensor(position_group)[inverse].to(torch.int32)
    results = {"damp": torch.tensor(damp_used)}
    if act_order:
        results["perm"] = perm.to(torch.int32)
    rounded = None if rounded_t is None else rounded_t.t()[:, inverse].contiguous()
    if k_grid is not None:
        return QuantTensor(codes, stored, stored_zero, spec, super_scale=k_grid.super_scale,
                           super_min=k_grid.super_min), results, rounded
    return QuantTensor(codes, scale, zero, spec, g_idx, global_scale=glob), results, rounded


def llama_cpp_grid(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, legacy: bool,
                   weighted: bool = False) -> QuantTensor | None:
    """The grid GPTQ places codes on when llama.cpp's search chooses it, with importance E[x_j^2] = H_jj / 2:
    K-quant grids always (`kquants.quantize_weighted`: every super-block's d/dmin and sub-block scales/mins),
    with ``legacy`` the int4/int5 g32 symmetric grids (llama.cpp's weighted Q4_0/Q5_0 search for each
    block's scale, `ggml_blocks.quantize_weighted_blocks`), and with ``weighted`` every symmetric integer grid
    (the same search per group, `weighted_search`). None otherwise: GPTQ's own min/max grid."""
    importance = torch.diag(hessian).float() / 2
    if spec.k_format is not None:
        return QuantTensor.from_k_blocks(kquants.quantize_weighted(weight, spec.k_format.name, importance), spec)
    block_type = ggml_blocks.symmetric_type(spec)
    if legacy and block_type in ("Q4_0", "Q5_0"):
        return QuantTensor.from_ggml_blocks(ggml_blocks.quantize_weighted_blocks(weight, block_type, importance), spec)
    if weighted and weighted_search.supports(spec):
        return weighted_search.weighted_symmetric(weight, spec, importance)
    return None


def k_step(grid: QuantTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, G] float32 (d * sc, dmin * m) of a K grid: what one code step is worth and the sub-block's
    offset, computed as ggml does (float32 products of the fp16 super-block scale and the integer)."""
    per = grid.scale.shape[1] // grid.super_scale.shape[1]
    step = grid.super_scale.repeat_interleave(per, dim=1) * grid.scale
    offset = None if grid.zero is None else grid.super_min.repeat_interleave(per, dim=1) * grid.zero
    return step, offset


def _llama_cpp_round(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, element, searched: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [out] onto llama.cpp's grid: q = nearest((w + dmin*m) / (d*sc)) in 0..2^b-1 (K types with
    mins: w ~ d*sc*q - dmin*m), or nearest(w / step) for the symmetric ones (Q3_K, Q6_K: d*sc; Q4_0, Q5_0: d), as
    ggml's final rounding; a (sub-)block whose step is 0 keeps the search's code (any code means the same
    there). -> (signed codes, dequantized) [out]."""
    half = -element.min
    zero = step == 0
    safe = torch.where(zero, torch.ones_like(step), step)
    if offset is None:
        q = torch.round(w / safe).clamp_(element.min, element.max)
        q = torch.where(zero, searched.float(), q)
        return q, step * q
    q = torch.round((w + offset) / safe).clamp_(0, 2 * half - 1)
    q = torch.where(zero, searched.float() + half, q)
    return q - half, step * q - offset


@register("gptq")
class GPTQ:
    """Options: block_size (128), damp (0.01), act_order (True), static_groups (True), true_sequential
    (True; false collects every Linear's Hessian in one pass over the float block: fewer passes), llama_cpp
    (False; true: int4/int5 g32 symmetric grids, llama.cpp's Q4_0/Q5_0, take their scales from llama.cpp's
    weighted search; the llama.cpp file-type plans set it), weighted_grid (False; true: every symmetric integer
    grid takes its group scales from llama.cpp's importance-weighted least-squares search, `weighted_search`).
    K-quant grids always start from llama.cpp's weighted search (`llama_cpp_grid`).

    act_order with static groups is the default (llm-compressor's "static" act order): on SmolLM2
    4-bit g64 symmetric it cut the perplexity increase over float from +43% to +23%
    (docs/benchmarks.md), and the groups stay on the original columns, so no g_idx is needed by
    kernels or exporters."""

    @dataclass(frozen=True)
    class Options:
        block_size: int = option(128, minimum=1)
        damp: float = option(0.01, above=0.0)
        act_order: bool = option(True)
        static_groups: bool = option(True)
        true_sequential: bool = option(True)
        llama_cpp: bool = option(False)
        weighted_grid: bool = option(False)

    statistics = frozenset({"hessian"})
    sequential = True  # true-sequential: each stage's Hessian sees the earlier stages quantized

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        options = parse_options(self.name, context.options)
        return gptq_quantize(weight, context.stats.hessian.matrix, spec, **self._settings(options, context))

    def rounding(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext
                 ) -> tuple[QuantTensor, dict, torch.Tensor]:
        """`quantize`, and the weight its codes were rounded from (`gptq_rounding`)."""
        options = parse_options(self.name, context.options)
        return gptq_rounding(weight, context.stats.hessian.matrix, spec, **self._settings(options, context))

    @staticmethod
    def _settings(options, context: LayerContext) -> dict:
        return dict(block_size=options.block_size, damp=options.damp, act_order=options.act_order,
                    static_groups=options.static_groups, global_scale=context.global_scale,
                    llama_cpp=options.llama_cpp, weighted_grid=options.weighted_grid)
