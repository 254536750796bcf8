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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, option, parse_options, register
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, kquants, primitives, weighted_search
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec
from quantkit.matmuls import fp32_matmuls


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
    [1] overrides a two-level grid's own (a fused group's shared one); ``llama_cpp``: int4/int5 g32 grids take
    their scales (and minimums) from llama.cpp's weighted Q4_0/Q5_0 (Q4_1/Q5_1) search, ``weighted_grid``:
    every symmetric integer grid takes its group scales from that search (`llama_cpp_grid`)."""
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


def gptq_quantize_shared(weights: list[torch.Tensor], hessian: torch.Tensor, specs: list[WeightSpec], *,
                         keep_rounded: bool = False, **settings) -> list[tuple[QuantTensor, dict, torch.Tensor | None]]:
    """Linears that read the same input (q/k/v, gate/up: one Hessian [in, in]) quantized in one column sweep
    over their stacked rows, where every grid is fixed before the sweep (`can_share`); otherwise one sweep each.
    GPTQ treats rows independently (the error feedback runs along a row; H, its damping, the act-order
    permutation and U are the input's), so each Linear gets the codes its own sweep gives, in a third of the
    sweeps' Python steps for q/k/v. ``settings``: `gptq_quantize`'s keywords. -> per Linear (QuantTensor, search
    results, the weight its codes were rounded from or None)."""
    options = dict(_SETTINGS, **settings)
    if len(weights) > 1 and can_share(specs, weights[0].shape[1], options):
        return _gptq_many(weights, hessian, specs, options, keep_rounded)
    return [_gptq_many([w], hessian, [s], options, keep_rounded)[0] for w, s in zip(weights, specs)]


_SETTINGS = dict(block_size=128, damp=0.01, act_order=True, static_groups=True, global_scale=None, llama_cpp=False,
                 weighted_grid=False)


def can_share(specs: list[WeightSpec], in_features: int, options: dict) -> bool:
    """Whether one sweep can quantize these grids together: each one's parameters are fixed before the sweep
    (whole rows, static groups, llama.cpp's searched grids), none is a float element grid or a two-level one,
    and their lazy-update blocks coincide (so the float operations are those of separate sweeps)."""
    steps = set()
    for spec in specs:
        if spec.element.kind != "int" or spec.second_scale is not None or not _fixed_before_sweep(spec, options):
            return False
        steps.add(_sweep_step(spec, in_features, options["block_size"]))
    return len(steps) == 1


def _fixed_before_sweep(spec: WeightSpec, options: dict) -> bool:
    """Whether the grid's parameters are set before the sweep: whole rows (per tensor, channel or 2-D block),
    static act-order groups, or llama.cpp's searched grids; else GPTQ chooses each group's as it reaches it."""
    return (spec.granularity != "group" or (options["act_order"] and options["static_groups"])
            or llama_cpp_searches(spec, options["llama_cpp"], options["weighted_grid"]))


def _sweep_step(spec: WeightSpec, in_features: int, block_size: int) -> int:
    if spec.granularity != "group":
        return block_size
    return _aligned_block_size(block_size, primitives.group_size_for(spec, in_features))


def _gptq(weight, hessian, spec, block_size, damp, act_order, static_groups, global_scale=None, llama_cpp=False,
          keep_rounded=False, weighted_grid=False):
    options = dict(block_size=block_size, damp=damp, act_order=act_order, static_groups=static_groups,
                   global_scale=global_scale, llama_cpp=llama_cpp, weighted_grid=weighted_grid)
    return _gptq_many([weight], hessian, [spec], options, keep_rounded)[0]


@dataclass
class _Grid:
    """One Linear's grid for the sweep, per input column in sweep order ([in, out] each): a column's codes are
        q = clamp(round((w + offset) / step) + zero, low, high),  w_hat = (q - zero) * step - offset,
        code = q - shift
    (K types with mins: offset dmin*m, zero 0, levels 0..2^b-1, shift 2^(b-1); Q4_1/Q5_1 searched by llama.cpp:
    offset -m, zero 0, levels 0..2^b-1, shift 2^(b-1); symmetric grids: offset and zero 0; static asymmetric
    groups: their zero point). ``searched`` [in, out]: llama.cpp's own levels (code +
    shift), kept where a searched (sub-)block's step is 0. None where the parameters follow the sweep."""

    step: torch.Tensor
    offset: torch.Tensor | None
    zero: torch.Tensor | None
    low: float
    high: float
    shift: float
    searched: torch.Tensor | None
    finish: Callable[[torch.Tensor], QuantTensor]     # codes [out, in] in the original column order -> result
    float_element: object = None     # a float element grid (FP8, FP4): its nearest value instead (one Linear)


def _fixed_grid(W: torch.Tensor, H: torch.Tensor, spec: WeightSpec, perm: torch.Tensor, options: dict
                ) -> _Grid | None:
    """The grid of weight W [out, in] fp32 when its parameters are fixed before the sweep, else None."""
    if not _fixed_before_sweep(spec, options):
        return None
    out_features, in_features = W.shape
    group_size = primitives.group_size_for(spec, in_features)
    searched = llama_cpp_grid(W, H, spec, options["llama_cpp"], options["weighted_grid"])
    element = spec.element
    glob = primitives.global_scale(W, spec) if options["global_scale"] is None else options["global_scale"]
    group_of = (torch.arange(in_features) // group_size)[perm]         # each swept column's (original) group
    if ggml_blocks.min_type(spec) is not None and searched is not None:
        return _min_block_grid(searched, spec, group_of, perm)
    if spec.k_format is not None:
        step, offset = k_step(searched)
        shift = float(-element.min) if offset is not None else 0.0
        low, high = (0.0, float(element.max - element.min)) if offset is not None else \
            (float(element.min), float(element.max))

        def finish(codes):
            return QuantTensor(codes, searched.scale, searched.zero, spec, super_scale=searched.super_scale,
                               super_min=searched.super_min)
        return _Grid(_columns(step, group_of), None if offset is None else _columns(offset, group_of), None,
                     low, high, shift, _levels(searched, perm, shift), finish)
    stored, stored_zero = (searched.scale, None) if searched is not None else primitives.weight_qparams(W, spec, glob)
    row_block = primitives.rows_per_scale(spec, out_features)   # blocks repeat their parameters over their rows
    scale = stored if row_block == 1 else stored.repeat_interleave(row_block, dim=0)[:out_features]
    zero = stored_zero
    if zero is not None and row_block > 1:
        zero = zero.repeat_interleave(row_block, dim=0)[:out_features]
    step = primitives.effective_scale(scale.expand(out_features, -1), glob)

    def finish(codes):
        return QuantTensor(codes, stored, stored_zero, spec, None, global_scale=glob)
    zero_columns = None if zero is None else _columns(zero.expand(out_features, -1), group_of)
    return _Grid(_columns(step, group_of), None, zero_columns, float(element.min), float(element.max), 0.0,
                 None if searched is None else _levels(searched, perm, 0.0), finish,
                 element if element.kind == "float" else None)


def _min_block_grid(searched: QuantTensor, spec: WeightSpec, group_of: torch.Tensor, perm: torch.Tensor) -> _Grid:
    """Q4_1/Q5_1 as llama.cpp's search chose them (x = d * q + m, q in 0..2^b - 1): step d and offset -m, taken
    back from the QuantTensor's fractional zero exactly as the exporter takes them (`gguf_blocks.carry_codes`), so
    the sweep rounds onto the values the file holds; code = q - 2^(b-1)."""
    fmt = ggml_blocks.FORMATS[ggml_blocks.min_type(spec)]
    step, offset = minimum_step(searched)
    shift = float(fmt.offset)

    def finish(codes):
        return QuantTensor(codes, searched.scale, searched.zero, spec)
    return _Grid(_columns(step, group_of), _columns(offset, group_of), None, 0.0, float(fmt.levels - 1),
                 shift, _levels(searched, perm, shift), finish)


def _columns(param: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """[out, G] group parameters -> [in, out]: the row of each swept column's group."""
    return param.t()[group_of].contiguous()


def _levels(searched: QuantTensor, perm: torch.Tensor, shift: float) -> torch.Tensor:
    """The search's own codes plus ``shift`` [in, out] in sweep order (float32)."""
    return searched.codes[:, perm].t().float() + shift


def _gptq_many(weights, hessian, specs, options, keep_rounded):
    in_features = weights[0].shape[1]
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0          # a column no token ever activated: any value is exact
    Ws = []
    for weight in weights:
        W = weight.float().clone()
        W[:, dead] = 0.0
        Ws.append(W)
    perm = torch.argsort(torch.diag(H), descending=True) if options["act_order"] else torch.arange(in_features)
    grids = [_fixed_grid(W, H, spec, perm, options) for W, spec in zip(Ws, specs)]
    if options["act_order"]:
        H = H[perm][:, perm]
    U, damp_used = damped_inverse_cholesky(H, options["damp"])
    del H
    results = {"damp": torch.tensor(damp_used)}
    if options["act_order"]:
        results["perm"] = perm.to(torch.int32)
    inverse = torch.argsort(perm)
    if grids[0] is None:      # one Linear whose group parameters follow the sweep
        return [_dynamic_sweep(Ws[0], U, specs[0], perm, inverse, options, keep_rounded, results)]
    # Columns as rows ([in, out], contiguous): each step of the sweep touches one contiguous row.
    Wt = torch.cat([W[:, perm].t() for W in Ws], dim=1).contiguous()
    sweep = _StackedGrid(grids)
    codes_t, rounded_t = _sweep(Wt, U, _sweep_step(specs[0], in_features, options["block_size"]), sweep.round,
                                primitives.code_dtype(specs[0].element), keep_rounded)
    out = []
    for grid, rows in zip(grids, sweep.rows):
        codes = codes_t[:, rows].t()[:, inverse].contiguous()
        rounded = None if rounded_t is None else rounded_t[:, rows].t()[:, inverse].contiguous()
        out.append((grid.finish(codes), {key: value.clone() for key, value in results.items()}, rounded))
    return out


class _StackedGrid:
    """The grids of stacked Linears side by side ([in, sum of out]) and their rounding of one column."""

    def __init__(self, grids: list[_Grid]):
        widths = [g.step.shape[1] for g in grids]
        bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
        self.rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.float_element = grids[0].float_element if len(grids) == 1 else None   # `can_share`: int grids only
        self.step = torch.cat([g.step for g in grids], dim=1)
        self.offset = self._stack(grids, "offset")
        self.zero = self._stack(grids, "zero")
        self.searched = self._stack(grids, "searched")
        # rows whose zero steps keep the search's code: None for all rows (or none: no search)
        mixed = self.searched is not None and any(g.searched is None for g in grids)
        self.searched_rows = torch.cat([torch.full((w,), g.searched is not None) for g, w in zip(grids, widths)]) \
            if mixed else None
        self.low, self.high = self._per_row(grids, widths, "low", "high")     # clamp takes both alike
        self.shift = self._per_row(grids, widths, "shift")
        # where a column's code is the search's (its step is 0: any code means the same), None where nowhere
        self.keep = None
        if self.searched is not None:
            keep = self.step == 0
            if self.searched_rows is not None:
                keep &= self.searched_rows
            self.keep = keep if bool(keep.any()) else None

    @staticmethod
    def _stack(grids, key):
        parts = [getattr(g, key) for g in grids]
        if all(p is None for p in parts):
            return None
        return torch.cat([torch.zeros_like(g.step) if p is None else p for g, p in zip(grids, parts)], dim=1)

    @staticmethod
    def _per_row(grids, widths, *keys):
        """The grids' values of ``keys``: floats where every grid has the same ones, else, for all the keys, a
        [sum of out] tensor each."""
        columns = [[getattr(g, key) for g in grids] for key in keys]
        if any(len(set(column)) > 1 for column in columns):
            columns = [torch.cat([torch.full((w,), float(v)) for v, w in zip(column, widths)]) for column in columns]
        else:
            columns = [column[0] for column in columns]
        return columns[0] if len(keys) == 1 else columns

    def round(self, col: int, W1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column ``col`` (row i of the sweep block W1) onto the grids -> (codes, dequantized) [out]; as ggml's
        final rounding on the searched grids, a (sub-)block whose step is 0 keeps the search's code (any code
        means the same there)."""
        w, step = W1[i], self.step[col]
        if self.float_element is not None:
            return _round_plain(w, step, None, self.float_element)
        divisor = step if self.keep is None else torch.where(self.keep[col], 1.0, step)
        q = torch.round((w if self.offset is None else w + self.offset[col]) / divisor)
        if self.zero is not None:
            q += self.zero[col]
        q = q.clamp_(self.low, self.high)
        if self.keep is not None:
            q = torch.where(self.keep[col], self.searched[col], q)
        dequantized = (q if self.zero is None else q - self.zero[col]) * step
        if self.offset is not None:
            dequantized = dequantized - self.offset[col]
        return (q if isinstance(self.shift, float) and self.shift == 0.0 else q - self.shift), dequantized


def _sweep(Wt: torch.Tensor, U: torch.Tensor, step: int, round_column, code_dtype: torch.dtype, keep_rounded: bool,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The column sweep of Wt [in, out] (columns as rows, sweep order) with U [in, in]: round_column(col, W1, i)
    -> (codes, dequantized) [out] quantizes column ``col``, row i of the current sweep block W1 [B, out], as the
    earlier columns' error feedback left it (the block's later rows: the rest of its group, up to date).
    -> (codes [in, out], the weights the codes were rounded from [in, out] or None)."""
    in_features = Wt.shape[0]
    codes_t = torch.empty(Wt.shape, dtype=code_dtype)
    rounded_t = torch.empty(Wt.shape) if keep_rounded else None

    def sweep_block(i1: int, W1: torch.Tensor, U1: torch.Tensor) -> torch.Tensor:
        """Quantize the columns i1.. of the block W1 [B, out] in order; returns their scaled errors."""
        Err1 = torch.empty_like(W1)
        for i in range(W1.shape[0]):
            col = i1 + i
            w, err = W1[i], Err1[i]
            if rounded_t is not None:
                rounded_t[col] = w
            q, dequantized = round_column(col, W1, i)
            codes_t[col] = q
            torch.sub(w, dequantized, out=err).div_(U1[i, i])
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1.0)   # W[:, i+1:] -= err * U[i, i+1:] (row i is done)
        return Err1

    for i1 in range(0, in_features, step):
        i2 = min(i1 + step, in_features)
        with _single_thread():
            Err1 = sweep_block(i1, Wt[i1:i2].clone(), U[i1:i2, i1:i2])
        with fp32_matmuls():                               # float32 even beside a bf16 x^T x in another thread
            Wt[i2:] -= U[i1:i2, i2:].t() @ Err1          # lazy update of the columns after the block
    return codes_t, rounded_t


def _dynamic_sweep(W, U, spec, perm, inverse, options, keep_rounded, results):
    """GPTQ's own min/max groups, chosen when the sweep reaches a group's first column from the weights as
    updated so far (the sweep's blocks are aligned to groups, so a group's columns are up to date); with
    act_order they follow the sweep order (recorded in g_idx). -> (QuantTensor, results, rounded or None)."""
    out_features, in_features = W.shape
    group_size = primitives.group_size_for(spec, in_features)
    glob = primitives.global_scale(W, spec) if options["global_scale"] is None else options["global_scale"]
    num_groups = primitives.group_count(in_features, group_size)
    scale_t = torch.empty(num_groups, out_features)
    step_t = torch.empty(num_groups, out_features)
    zero_t = None if spec.symmetric else torch.empty(num_groups, out_features)
    element = spec.element

    def round_column(col: int, W1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = col // group_size
        if col % group_size == 0:
            columns = W1[i:i + min(group_size, in_features - col)]      # the group's columns [B, out]
            lo, hi = columns.amin(dim=0).clamp(max=0.0), columns.amax(dim=0).clamp(min=0.0)
            s, z = primitives.qparams_from_range(lo, hi, spec, glob)  # [out] each
            scale_t[g], step_t[g] = s, primitives.effective_scale(s, glob)
            if zero_t is not None:
                zero_t[g] = z
        return _round_plain(W1[i], step_t[g], None if zero_t is None else zero_t[g], element)

    Wt = W[:, perm].t().contiguous()
    codes_t, rounded_t = _sweep(Wt, U, _aligned_block_size(options["block_size"], group_size), round_column,
                                primitives.code_dtype(element), keep_rounded)
    codes = codes_t.t()[:, inverse].contiguous()
    zero = None if zero_t is None else zero_t.t().contiguous()
    g_idx = None
    if options["act_order"]:
        g_idx = (torch.arange(in_features) // group_size)[inverse].to(torch.int32)
    rounded = None if rounded_t is None else rounded_t.t()[:, inverse].contiguous()
    return QuantTensor(codes, scale_t.t().contiguous(), zero, spec, g_idx, global_scale=glob), results, rounded


def _round_plain(w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None, element
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One column [out] onto a grid of steps [out] (and zero points): (codes, dequantized) [out]."""
    if element.kind == "float":      # the nearest grid value (symmetric: no zero point)
        q = element.round(w / step)
        return q, q * step
    if zero is not None:
        q = (torch.round(w / step) + zero).clamp_(element.min, element.max)
        return q, (q - zero) * step
    q = torch.round(w / step).clamp_(element.min, element.max)
    return q, q * step


def llama_cpp_grid(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, legacy: bool,
                   weighted: bool = False) -> QuantTensor | None:
    """The grid GPTQ places codes on when llama.cpp's search chooses it, with importance E[x_j^2] = H_jj / 2:
    K-quant grids always (`kquants.quantize_weighted`: every super-block's d/dmin and sub-block scales/mins),
    with ``legacy`` the int4/int5 g32 grids (llama.cpp's weighted Q4_0/Q5_0 search for each block's scale,
    Q4_1/Q5_1's for its scale and float16 minimum, a fractional zero point; `ggml_blocks.quantize_weighted_blocks`),
    and with ``weighted`` every symmetric integer grid
    (the same search per group, `weighted_search`). None otherwise: GPTQ's own min/max grid."""
    if not llama_cpp_searches(spec, legacy, weighted):
        return None
    importance = torch.diag(hessian).float() / 2
    if spec.k_format is not None:
        return QuantTensor.from_k_blocks(kquants.quantize_weighted(weight, spec.k_format.name, importance), spec)
    block_type = ggml_blocks.searched_type(spec)
    if legacy and block_type is not None:
        return QuantTensor.from_ggml_blocks(ggml_blocks.quantize_weighted_blocks(weight, block_type, importance), spec)
    return weighted_search.weighted_symmetric(weight, spec, importance)


def llama_cpp_searches(spec: WeightSpec, legacy: bool, weighted: bool = False) -> bool:
    """Whether `llama_cpp_grid` gives ``spec`` llama.cpp's searched grid (else GPTQ keeps its own)."""
    return (spec.k_format is not None or (legacy and ggml_blocks.searched_type(spec) is not None)
            or (weighted and weighted_search.supports(spec)))


def k_step(grid: QuantTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[out, G] float32 (d * sc, dmin * m) of a K grid: what one code step is worth and the sub-block's
    offset, computed as ggml does (float32 products of the fp16 super-block scale and the integer)."""
    per = grid.scale.shape[1] // grid.super_scale.shape[1]
    step = grid.super_scale.repeat_interleave(per, dim=1) * grid.scale
    offset = None if grid.zero is None else grid.super_min.repeat_interleave(per, dim=1) * grid.zero
    return step, offset


def minimum_step(grid: QuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, G] float32 (d, -m) of a Q4_1/Q5_1 grid whose float16 minimum m is held as a fractional zero point
    (w = d * q + m): m as the exporter writes it (`ggml_blocks.block_minimum`)."""
    fmt_name = ggml_blocks.min_type(grid.spec)
    return grid.scale.float(), -ggml_blocks.block_minimum(grid.scale, grid.zero, fmt_name).float()


@register("gptq")
class GPTQ:
    """Options: block_size (128), damp (0.01), act_order (True), static_groups (True), true_sequential
    (True; false collects every Linear's Hessian in one pass over the float block: fewer passes), llama_cpp
    (False; true: int4/int5 g32 grids, llama.cpp's Q4_0/Q5_0 and Q4_1/Q5_1, take their scales and minimums from
    llama.cpp's weighted search; the llama.cpp file-type plans set it), weighted_grid (False; true: every
    symmetric integer grid takes its group scales from llama.cpp's importance-weighted least-squares search, `weighted_search`).
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

    def quantize_shared(self, weights: list[torch.Tensor], specs: list[WeightSpec], context: LayerContext,
                        keep_rounded: bool = False) -> list[tuple[QuantTensor, dict, torch.Tensor | None]]:
        """`quantize` (with ``keep_rounded``: `rounding`) of Linears that read the same input, whose statistics
        ``context`` holds, in one sweep where their grids allow (`gptq_quantize_shared`)."""
        options = parse_options(self.name, context.options)
        return gptq_quantize_shared(weights, context.stats.hessian.matrix, specs, keep_rounded=keep_rounded,
                                    **self._settings(options, context))

    @staticmethod
    def _settings(options, context: LayerContext) -> dict:
        return dict(block_size=options.block_size, damp=options.damp, act_order=options.act_order,
                    static_groups=options.static_groups, global_scale=context.global_scale,
                    llama_cpp=options.llama_cpp, weighted_grid=options.weighted_grid)
