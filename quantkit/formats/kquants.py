"""llama.cpp's K-quant grids (Q2_K ... Q6_K): their fields, dequantization, and llama.cpp's searches
for them (``quantize_row_q*_K_ref``, what ``llama-quantize`` runs without an importance matrix, and
``quantize_row_q*_K_impl``, what it runs with one), re-implemented here on whole tensors. The byte
layouts of the GGUF blocks are the exporter's (`quantkit.exporters.gguf_kquants`).

A row is cut into super-blocks of 256 values; a super-block into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or
32 (Q4_K, Q5_K) values, each with an integer scale (and, for the asymmetric types, an integer min) that
the super-block's float16 ``d`` (and ``dmin``) multiply (ggml-common.h, block_q*_K):

  type  bytes  sub  value of element e in sub-block j                  fields
  Q2_K   84    16   d * sc_j * q_e - dmin * m_j,   q in 0..3, sc/m 4-bit  scales[16] qs[64] d dmin
  Q3_K  110    16   d * (sc_j - 32) * (q_e - 4),   q in 0..7, sc 6-bit    hmask[32] qs[64] scales[12] d
  Q4_K  144    32   d * sc_j * q_e - dmin * m_j,   q in 0..15, 6-bit      d dmin scales[12] qs[128]
  Q5_K  176    32   d * sc_j * q_e - dmin * m_j,   q in 0..31, 6-bit      d dmin scales[12] qh[32] qs[128]
  Q6_K  210    16   d * sc_j * (q_e - 32),         q in 0..63, sc int8    ql[128] qh[64] scales[16] d

(float32 arithmetic in ggml's order: ``(d * sc) * q - (dmin * m)``.) `KBlocks` holds the fields unpacked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER = 256


@dataclass(frozen=True)
class KFormat:
    name: str
    type_size: int      # bytes per super-block
    sub: int            # values per sub-block
    levels: int         # stored q values: 0 .. levels-1
    offset: int         # signed value = q - offset (Q3_K: 4, Q6_K: 32; 0 with a min)
    has_min: bool


K_FORMATS: dict[str, KFormat] = {f.name: f for f in (
    KFormat("Q2_K", 84, 16, 4, 0, True),
    KFormat("Q3_K", 110, 16, 8, 4, False),
    KFormat("Q4_K", 144, 32, 16, 0, True),
    KFormat("Q5_K", 176, 32, 32, 0, True),
    KFormat("Q6_K", 210, 16, 64, 32, False),
)}


def grid_of(fmt: KFormat) -> tuple[int, bool, int]:
    """(bits, symmetric, sub-block size) of the codes of ``fmt``: the `WeightSpec` that means it."""
    return fmt.levels.bit_length() - 1, not fmt.has_min, fmt.sub


def format_of(bits: int, symmetric: bool, sub: int) -> KFormat | None:
    """The K format whose codes are int{bits} (symmetric or with mins) in sub-blocks of ``sub``, or None."""
    return next((f for f in K_FORMATS.values() if grid_of(f) == (bits, symmetric, sub)), None)


@dataclass
class KBlocks:
    """The fields of a [rows, n] matrix in a K format (n a multiple of 256, nb = n / 256, S sub-blocks per
    super-block).

    q:    [rows, n] int64 stored values 0 .. levels-1
    sc:   [rows, nb, S] int64 sub-block scales as stored (Q3_K: 0..63, the scale is sc - 32; Q6_K: -128..127)
    m:    [rows, nb, S] int64 sub-block mins (Q2_K, Q4_K, Q5_K) or None
    d, dmin: [rows, nb] float16 super-block scales (dmin None without mins)
    """

    fmt: KFormat
    q: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """[rows, n] float32, as ggml's dequantize_row_q*_K computes it."""
        rows, n = self.q.shape
        fmt = self.fmt
        q = (self.q - fmt.offset).float().reshape(rows, n // SUPER, SUPER // fmt.sub, fmt.sub)
        scale = self.sc - 32 if fmt.name == "Q3_K" else self.sc
        dl = (self.d.float()[..., None] * scale.float())[..., None]           # d * sc, float32
        y = dl * q
        if fmt.has_min:
            y = y - (self.dmin.float()[..., None] * self.m.float())[..., None]
        return y.reshape(rows, n)


# ---------------------------------------------------------------------------------------------------
# llama.cpp's reference quantizers (ggml-quants.c quantize_row_q*_K_ref), on [S, n] sub-blocks at once.
# Every sum runs element by element in float32, in the C loops' order, so the results can be bit-identical.
# ---------------------------------------------------------------------------------------------------

GROUP_MAX_EPS = 1e-15


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _nearest(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (the 1.5 * 2^23 trick), as int64."""
    return torch.round(x).long()


def weighted_sum(terms) -> torch.Tensor:
    """sum_i terms[i] in float32, left to right (the C loop's order), added in place into a copy of the first."""
    total = None
    for term in terms:
        if total is None:
            total = term.clone()
        else:
            total.add_(term)
    return total


def sum_rows(*terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """terms [n, S] float32 each -> their sums over the n rows [S], left to right (the C loop's order over a
    sub-block's columns, one float32 add per element; torch's own reductions add in another order). The
    searches hold their sub-blocks as columns ([n, S], contiguous rows), so the sums read contiguous rows."""
    if len(terms) == 1:
        return (weighted_sum(terms[0]),)
    return tuple(weighted_sum(torch.stack(terms, dim=1)))


SEARCH_ROWS = 32768   # sub-blocks a search takes at once: its temporaries stay near 50 MB on any tensor
# make_qx_quants' 19 trials side by side: [19, rows] buffers; at 8192 rows they stay in cache (2x faster on one
# thread than 32768 rows, and faster on two)
TRIAL_SEARCH_ROWS = 8192


def _row_chunks(x: torch.Tensor, weights: torch.Tensor | None, search, chunk: int | None = None
                ) -> tuple[torch.Tensor, ...]:
    """``search(x_rows, weights_rows)`` over at most ``chunk`` (SEARCH_ROWS) rows at a time, the results
    concatenated: every row (sub-block) is searched on its own, so the result is the same as in one pass."""
    chunk = chunk or SEARCH_ROWS
    parts = [search(x[i:i + chunk], None if weights is None else weights[i:i + chunk])
             for i in range(0, max(x.shape[0], 1), chunk)]
    return tuple(torch.cat(values) for values in zip(*parts))


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric sub-block search: x, weights [S, n] float32 -> (scale [S], the_min [S] (>= 0), L [S, n]
    in 0..nmax) with x ~ scale * L - the_min. Start from the min/max grid, then try nstep + 1 widths
    iscale = (rmin + rdelta * is + nmax) / (max - min), fit scale and min by weighted least squares on
    each rounding and keep the lowest weighted error (|diff| for use_mad, else diff^2). As in ggml, a
    better fit's min (<= 0) moves the origin of the later trials' grids."""
    return _row_chunks(x, weights, lambda rows, row_weights: _qkx2_rows(rows, row_weights, nmax, rmin, rdelta, nstep,
                                                                          use_mad))


def _qkx2_rows(x, weights, nmax, rmin, rdelta, nstep, use_mad):
    xt, wt = x.t().contiguous(), weights.t().contiguous()     # [n, S]: a sub-block per column
    lo, hi = xt.amin(dim=0), xt.amax(dim=0)
    sum_w, sum_x = sum_rows(wt, wt * xt)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    iscale = _f32(nmax) / span
    scale = 1 / iscale
    # Levels stay float32 (small integers, exact); a trial's levels are nearest(iscale * (x - origin)) clamped,
    # so only the best trial's iscale and origin are kept and its levels recomputed at the end (the same ops
    # on the same values: the same levels). Buffers [n, S] are reused across the trials.
    levels, diff = torch.empty_like(xt), torch.empty_like(xt)
    products = torch.empty((3, *xt.shape))      # w*l, w*l*l, w*l*x: summed over the rows together

    def rounded(trial_iscale, origin):
        return torch.sub(xt, origin, out=levels).mul_(trial_iscale).round_().clamp_(0, nmax)

    def error(s, m, lf):
        torch.mul(lf, s, out=diff).add_(m).sub_(xt)        # s * l + m - x, in the C loop's order
        (diff.abs_() if use_mad else diff.mul_(diff)).mul_(wt)
        return weighted_sum(diff)

    best = error(scale, lo, rounded(iscale, lo))
    best_iscale, best_origin, minimum = iscale, lo, lo
    for step in range(nstep + 1):
        # the C loop reads the min as updated by the best fit so far, for the width and the offset alike
        span = torch.where(flat, torch.ones_like(hi), hi - minimum)
        trial_iscale = (_f32(rmin) + _f32(rdelta) * step + nmax) / span
        lf = rounded(trial_iscale, minimum)
        weighted_level = torch.mul(wt, lf, out=products[0])
        torch.mul(weighted_level, lf, out=products[1])
        torch.mul(weighted_level, xt, out=products[2])
        sum_l, sum_l2, sum_xl = weighted_sum(products.unbind(1))
        D = sum_w * sum_l2 - sum_l * sum_l
        valid = D > 0
        safe_d = torch.where(valid, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2),
                                 this_scale)
        current = error(this_scale, this_min, lf)
        better = valid & (current < best)
        best_iscale = torch.where(better, trial_iscale, best_iscale)
        best_origin = torch.where(better, minimum, best_origin)
        best = torch.where(better, current, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    L = rounded(best_iscale, best_origin).long()
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, lo, minimum)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, -minimum, L.t().contiguous()


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric sub-block scale (make_qx_quants, rmse_type 1, weights x^2 or the given ones): x [S, n] -> (scale [S],
    levels [S, n] stored as l + nmax, 0 for an all-zero sub-block). Try iscale = -(nmax + 0.1 is) / max for
    is = -9..9 and keep the least-squares scale of the rounding with the largest sumlx^2 / suml2."""
    return _row_chunks(x, weights, lambda rows, row_weights: _qx_rmse1_rows(rows, nmax, row_weights),
                       min(SEARCH_ROWS, TRIAL_SEARCH_ROWS))


def _qx_rmse1_rows(x, nmax, weights):
    n = x.shape[1]
    signed_max = _signed_max(x)
    zero = signed_max.abs() < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x if weights is None else weights
    # The 19 trials side by side: iscale [T, S] in ggml's order (is = 0, then -9..9 without 0); the sums run
    # over the columns left to right with the C loop's float32 products, so every trial's sums are ggml's.
    numerators = [-_f32(nmax)] + [-(_f32(nmax) + _f32(0.1) * step) for step in range(-9, 10) if step != 0]
    iscales = torch.stack([numerator / safe_max for numerator in numerators])
    xt, wt = x.t().contiguous(), w.t().contiguous()      # [n, S]: each column one contiguous row
    wx = wt * xt
    # C: sumlx += w*x*l, suml2 += w*l*l (float32, products left to right); buffers reused across the columns
    levels, term, sumlx, suml2 = (torch.empty_like(iscales) for _ in range(4))
    for i in range(n):
        torch.mul(iscales, xt[i], out=levels).round_().clamp_(-nmax, nmax - 1)
        if i == 0:      # the first terms are the sums (as in C, where 0 + t is t, the sign of a zero included)
            torch.mul(levels, wx[0], out=sumlx)
            torch.mul(levels, wt[0], out=suml2).mul_(levels)
            continue
        sumlx.add_(torch.mul(levels, wx[i], out=term))
        suml2.add_(torch.mul(levels, wt[i], out=term).mul_(levels))
    safe_l2 = torch.where(suml2 == 0, torch.ones_like(suml2), suml2)
    trial_scales = sumlx / safe_l2
    scale = torch.where(suml2[0] != 0, trial_scales[0], torch.zeros_like(sumlx[0]))
    best, chosen = scale * sumlx[0], torch.zeros_like(scale, dtype=torch.long)
    for t in range(1, len(numerators)):     # a later trial must beat the best so far strictly, as in ggml
        better = (suml2[t] > 0) & (sumlx[t] * sumlx[t] > best * suml2[t])
        scale = torch.where(better, trial_scales[t], scale)
        best = torch.where(better, trial_scales[t] * sumlx[t], best)
        chosen = torch.where(better, t, chosen)
    iscale = iscales.gather(0, chosen[None])[0]
    L = _nearest(iscale[:, None] * x).clamp(-nmax, nmax - 1)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], 0, L + nmax)


def make_q3_quants_rmse(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's symmetric sub-block scale (make_q3_quants with do_rmse): start from round(-nmax / max * x),
    then up to 5 passes of coordinate descent, each element moved to its best level for the current
    least-squares fit (weights x^2) when that improves sumlx^2 / suml2. x [S, n] -> (scale [S], levels
    [S, n] stored as l + nmax, 0 for an all-zero sub-block)."""
    n = x.shape[1]
    columns = [x[:, i] for i in range(n)]
    signed_max = _signed_max(x)
    zero = signed_max.abs() < GROUP_MAX_EPS
    iscale = -_f32(nmax) / torch.where(zero, torch.ones_like(signed_max), signed_max)
    L = [_nearest(iscale * c).clamp(-nmax, nmax - 1) for c in columns]
    w = [c * c for c in columns]
    sumlx = weighted_sum(w[i] * columns[i] * L[i].float() for i in range(n))
    suml2 = weighted_sum(w[i] * L[i].float() * L[i].float() for i in range(n))
    L, sumlx, suml2 = _coordinate_descent(columns, w, L, sumlx, suml2, -nmax, nmax - 1, ~zero, q3_rules=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    levels = torch.stack(L, dim=1) + nmax
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], 0, levels)


def _coordinate_descent(columns, w, L, sumlx, suml2, low, high, active, q3_rules: bool):
    """Up to 5 passes over the elements of every group at once: move L_i to nearest(x_i * sl2 / slx) (the
    least-squares level for the fit without element i) when that raises sumlx^2 / suml2; a group stops
    after a pass that changes nothing. make_q3_quants tries when slx > 0 and keeps a move only with
    sl2 > 0 afterwards; make_qp_quants tries when slx > 0 and sl2 > 0 (levels only clamped above)."""
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(len(columns)):
            li = L[i].float()
            slx = sumlx - w[i] * columns[i] * li
            sl2 = suml2 - w[i] * li * li
            candidate = active & (slx > 0) if q3_rules else active & (slx > 0) & (sl2 > 0)
            new_l = _nearest(columns[i] * sl2 / torch.where(candidate, slx, _f32(1))).clamp(low, high)
            nf = new_l.float()
            slx_new, sl2_new = slx + w[i] * columns[i] * nf, sl2 + w[i] * nf * nf
            accept = candidate & (new_l != L[i]) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            if q3_rules:
                accept &= sl2_new > 0
            L[i] = torch.where(accept, new_l, L[i])
            sumlx, suml2 = torch.where(accept, slx_new, sumlx), torch.where(accept, sl2_new, suml2)
            changed |= accept
        active = active & changed
        if not bool(active.any()):
            break
    return L, sumlx, suml2


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _requantize(x: torch.Tensor, d_sub: torch.Tensor, m_sub: torch.Tensor | None, low: int, high: int) -> torch.Tensor:
    """The final levels: nearest_int((x + dm) / d) clamped (or x / d for symmetric types); sub-blocks whose
    d is 0 keep the search's levels (the caller passes them in ``x``'s place via `torch.where`)."""
    safe = torch.where(d_sub == 0, torch.ones_like(d_sub), d_sub)
    shifted = x if m_sub is None else x + m_sub
    return _nearest(shifted / safe).clamp(low, high)


def quantize_reference(weight: torch.Tensor, name: str) -> KBlocks:
    """llama.cpp's reference quantization (no importance matrix) of weight [rows, n] (n % 256 == 0)."""
    fmt = K_FORMATS[name]
    rows, n = weight.shape
    assert n % SUPER == 0, n
    nb, per = n // SUPER, SUPER // fmt.sub
    x = weight.float().reshape(rows * nb * per, fmt.sub)
    return {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q45_k, "Q5_K": _q45_k, "Q6_K": _q6_k}[name](x, fmt, rows, nb)


def _asymmetric_fields(scales, mins, levels_max, rows, nb, per):
    """Super-block d = max_scale / levels_max, dmin likewise, integer sub-block scales/mins (shared by
    Q4_K/Q5_K: inv = 63 / max, l = min(63, nearest(inv * s)))."""
    scales, mins = scales.reshape(rows, nb, per), mins.reshape(rows, nb, per)
    # the C loops start from +0 and only take larger values: never -0.0 (an all-zero block's mins are -0.0)
    max_scale = torch.where(scales.amax(dim=-1) > 0, scales.amax(dim=-1), _f32(0))
    max_min = torch.where(mins.amax(dim=-1) > 0, mins.amax(dim=-1), _f32(0))
    inv_scale = torch.where(max_scale > 0, _f32(levels_max) / torch.where(max_scale > 0, max_scale, _f32(1)), _f32(0))
    inv_min = torch.where(max_min > 0, _f32(levels_max) / torch.where(max_min > 0, max_min, _f32(1)), _f32(0))
    return max_scale, max_min, inv_scale, inv_min


def _asymmetric_blocks(x, fmt, ls, lm, d, dmin, search_levels) -> KBlocks:
    """The levels of Q2_K/Q4_K/Q5_K once the super-block fields are fixed: nearest((x + dmin * m) / (d * sc))
    clamped, where d * sc is not 0 (there the search's levels stay, as in ggml). ls, lm [rows, nb, per]
    int64; d, dmin [rows, nb] float16."""
    rows, nb = d.shape
    d_sub = (d.float()[..., None] * ls.float()).reshape(-1, 1)
    m_sub = (dmin.float()[..., None] * lm.float()).reshape(-1, 1)
    levels = torch.where(d_sub == 0, search_levels, _requantize(x, d_sub, m_sub, 0, fmt.levels - 1))
    return KBlocks(fmt, levels.reshape(rows, nb * SUPER), ls, lm, d, dmin)


def _q45_k(x, fmt, rows, nb):
    """Q4_K / Q5_K: weights av_x + |x| (av_x = sqrt(mean x^2)), make_qkx2_quants(nmax 15 / 31, rmin -1 / -0.5,
    rdelta 0.1, nstep 20 / 15), 6-bit scales and mins under d = max_scale / 63, dmin = max_min / 63."""
    nmax = fmt.levels - 1
    per = SUPER // fmt.sub
    sum_x2 = weighted_sum(x[:, i] * x[:, i] for i in range(fmt.sub))
    # sqrtf is correctly rounded; torch's vectorised float32 sqrt may be off by an ulp: round from float64
    av_x = torch.sqrt((sum_x2 / fmt.sub).double()).float()
    weights = av_x[:, None] + x.abs()
    rmin, nstep = (-1.0, 20) if fmt.name == "Q4_K" else (-0.5, 15)
    scales, mins, search_levels = make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep, False)
    max_scale, max_min, inv_scale, inv_min = _asymmetric_fields(scales, mins, 63, rows, nb, per)
    ls = _nearest(inv_scale[..., None] * scales.reshape(rows, nb, per)).clamp(max=63)
    lm = _nearest(inv_min[..., None] * mins.reshape(rows, nb, per)).clamp(max=63)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    return _asymmetric_blocks(x, fmt, ls, lm, d, dmin, search_levels)


def _q2_k(x, fmt, rows, nb):
    """Q2_K: weights |x|, make_qkx2_quants(nmax 3, rmin -0.5, rdelta 0.1, nstep 15, mean absolute error),
    4-bit scales and mins under d = max_scale / 15, dmin = max_min / 15 (nearest, not clamped)."""
    per = SUPER // fmt.sub
    scales, mins, search_levels = make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, True)
    max_scale, max_min, inv_scale, inv_min = _asymmetric_fields(scales, mins, 15, rows, nb, per)
    ls = torch.where(max_scale[..., None] > 0, _nearest(inv_scale[..., None] * scales.reshape(rows, nb, per)),
                     torch.zeros(rows, nb, per, dtype=torch.int64))
    lm = torch.where(max_min[..., None] > 0, _nearest(inv_min[..., None] * mins.reshape(rows, nb, per)),
                     torch.zeros(rows, nb, per, dtype=torch.int64))
    d = _f16(torch.where(max_scale > 0, max_scale / 15, _f32(0)))
    dmin = _f16(torch.where(max_min > 0, max_min / 15, _f32(0)))
    return _asymmetric_blocks(x, fmt, ls, lm, d, dmin, search_levels)


def _signed_max(scales: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim (the first one on ties, as the C loops keep)."""
    index = scales.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(scales, -1, index)[..., 0]


def _q3_k(x, fmt, rows, nb):
    """Q3_K: make_q3_quants(nmax 4, rmse), 6-bit signed scales under d = 1 / (-32 / max_scale)."""
    per = SUPER // fmt.sub
    scales, search = make_q3_quants_rmse(x, 4)
    scales = scales.reshape(rows, nb, per)
    max_scale = _signed_max(scales)
    nonzero = max_scale != 0
    iscale = -_f32(32) / torch.where(nonzero, max_scale, _f32(1))
    stored = (_nearest(iscale[..., None] * scales).clamp(-32, 31) + 32)
    stored = torch.where(nonzero[..., None], stored, torch.zeros_like(stored))
    d = _f16(torch.where(nonzero, 1 / iscale, _f32(0)))
    d_sub = (d.float()[..., None] * (stored - 32).float()).reshape(-1, 1)
    # sub-blocks whose d * sc is 0 keep the search's levels
    levels = torch.where(d_sub == 0, search, _requantize(x, d_sub, None, -4, 3) + 4)
    return KBlocks(fmt, levels.reshape(rows, nb * SUPER), stored, None, d)


def _q6_k(x, fmt, rows, nb, weights=None):
    """Q6_K: make_qx_quants(nmax 32, rmse_type 1), int8 scales under d = 1 / (-128 / max_scale)."""
    per = SUPER // fmt.sub
    scales, search = make_qx_quants_rmse1(x, 32, weights)
    scales = scales.reshape(rows, nb, per)
    max_scale = _signed_max(scales)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -_f32(128) / torch.where(empty, _f32(1), max_scale)
    stored = _nearest(iscale[..., None] * scales).clamp(max=127)
    stored = torch.where(empty[..., None], torch.zeros_like(stored), stored)
    d = _f16(torch.where(empty, _f32(0), 1 / iscale))
    d_sub = (d.float()[..., None] * stored.float()).reshape(-1, 1)
    # an empty super-block is all zero bytes; other sub-blocks whose d * sc is 0 keep the search's levels
    levels = torch.where(d_sub == 0, search, _requantize(x, d_sub, None, -32, 31) + 32)
    levels = torch.where(empty.reshape(-1, 1).repeat_interleave(per, dim=0), 0, levels)
    return KBlocks(fmt, levels.reshape(rows, nb * SUPER), stored, None, d)


# ---------------------------------------------------------------------------------------------------
# With an importance matrix (llama.cpp's quantize_row_q*_K_impl, what llama-quantize --imatrix runs):
# ``importance`` [n] is the per-column mean of x^2 over the calibration tokens; a weight's importance
# is importance_j * sqrt(sigma2 + w^2) (Q2_K-Q5_K) or importance_j (Q6_K), and the super-block scales
# are fitted to the sub-block scales under the sub-blocks' summed importance (make_qp_quants).
# ---------------------------------------------------------------------------------------------------

def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values x [B, n] (sub-block scales or mins) onto d * L, L in 0..nmax: the best of 9 trial
    grids (nmax + 0.1 is) / max by weighted error, then up to 5 passes of coordinate descent on L
    (weighted least squares). -> (d [B], L [B, n])."""
    n = x.shape[1]
    columns, w = [x[:, i] for i in range(n)], [weights[:, i] for i in range(n)]
    top = _max_from_zero(columns)
    empty = top < GROUP_MAX_EPS
    safe_top = torch.where(empty, _f32(1), top)
    iscale = _f32(nmax) / safe_top
    scale = 1 / iscale
    levels = [_nearest(iscale * c) for c in columns]
    best = weighted_sum(w[i] * (columns[i] - scale * levels[i].float()) * (columns[i] - scale * levels[i].float())
                         for i in range(n))
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = (_f32(0.1) * step + nmax) / safe_top
        trial_scale = 1 / trial
        diffs = [columns[i] - trial_scale * _nearest(trial * columns[i]).clamp(max=nmax).float() for i in range(n)]
        error = weighted_sum(w[i] * diffs[i] * diffs[i] for i in range(n))
        better = error < best
        best, iscale = torch.where(better, error, best), torch.where(better, trial, iscale)
    L = [_nearest(iscale * c).clamp(max=nmax) for c in columns]
    sumlx = weighted_sum(w[i] * columns[i] * L[i].float() for i in range(n))
    suml2 = weighted_sum(w[i] * L[i].float() * L[i].float() for i in range(n))
    L, sumlx, suml2 = _coordinate_descent(columns, w, L, sumlx, suml2, None, nmax, ~empty, q3_rules=False)
    d = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, _f32(1)), _f32(0))
    levels = torch.stack(L, dim=1)
    return torch.where(empty, _f32(0), d), torch.where(empty[:, None], 0, levels)


def _max_from_zero(columns) -> torch.Tensor:
    """max(0, x_0, x_1, ...) (make_qp_quants starts its max from 0)."""
    top = torch.zeros_like(columns[0])
    for c in columns:
        top = torch.maximum(top, c)
    return top


def _importance_weights(x: torch.Tensor, importance: torch.Tensor, sub: int, sigma_factor: float) -> torch.Tensor:
    """importance_j * sqrt(sigma2 + x_j^2), sigma2 = factor * sum x^2 / 256 over the super-block
    (sub-blocks x [S, sub] of super-blocks in order; importance [S, sub])."""
    per = SUPER // sub
    blocks = x.reshape(-1, SUPER)
    sum_x2 = weighted_sum(blocks[:, i] * blocks[:, i] for i in range(SUPER))
    sigma2 = (_f32(sigma_factor) * sum_x2 / SUPER).repeat_interleave(per)[:, None]   # 1 * s is exact
    return importance * torch.sqrt((sigma2 + x * x).double()).float()


def quantize_weighted(weight: torch.Tensor, name: str, importance: torch.Tensor) -> KBlocks:
    """llama.cpp's quantization of weight [rows, n] with an importance matrix: importance [n] float32 (the
    per-column mean of the squared calibration inputs, llama-quantize --imatrix)."""
    fmt = K_FORMATS[name]
    rows, n = weight.shape
    assert n % SUPER == 0 and importance.shape == (n,), (weight.shape, importance.shape)
    nb, per = n // SUPER, SUPER // fmt.sub
    x = weight.float().reshape(rows * nb * per, fmt.sub)
    qw = importance.float().reshape(1, nb * per, fmt.sub).expand(rows, -1, -1).reshape(-1, fmt.sub)
    return {"Q2_K": _asymmetric_weighted, "Q3_K": _q3_k_weighted, "Q4_K": _asymmetric_weighted,
            "Q5_K": _asymmetric_weighted, "Q6_K": _q6_k_weighted}[name](x, qw, fmt, rows, nb)


def _sub_sums(weights: torch.Tensor) -> torch.Tensor:
    return weighted_sum(weights[:, i] for i in range(weights.shape[1]))


def _asymmetric_weighted(x, qw, fmt, rows, nb):
    """Q2_K/Q4_K/Q5_K: make_qkx3_quants(rmin -0.9, rdelta 0.05, 36 steps) under the importance weights
    (sigma2 = sum x^2 / 256 for Q2_K, twice that for Q4_K/Q5_K), then the integer scales and mins (4-bit
    for Q2_K, 6-bit otherwise) by make_qp_quants under each sub-block's summed weight."""
    per = SUPER // fmt.sub
    q2 = fmt.name == "Q2_K"
    weights = _importance_weights(x, qw, fmt.sub, 1.0 if q2 else 2.0)
    sums = _sub_sums(weights).reshape(rows * nb, per)
    scales, mins, search_levels = make_qkx2_quants(x, weights, fmt.levels - 1, -0.9, 0.05, 36, False)
    scale_levels = 15 if q2 else 63
    d_block, ls = make_qp_quants(scales.reshape(rows * nb, per), scale_levels, sums)
    m_block, lm = make_qp_quants(mins.reshape(rows * nb, per), scale_levels, sums)
    d, dmin = _f16(d_block.reshape(rows, nb)), _f16(m_block.reshape(rows, nb))
    return _asymmetric_blocks(x, fmt, ls.reshape(rows, nb, per), lm.reshape(rows, nb, per), d, dmin, search_levels)


def _q3_k_weighted(x, qw, fmt, rows, nb):
    """Q3_K: make_qx_quants(nmax 4) under the importance weights per sub-block, then the 6-bit signed scales
    by make_qx_quants(nmax 32) of the sub-block scales under their summed weight."""
    per = SUPER // fmt.sub
    weights = _importance_weights(x, qw, fmt.sub, 2.0)
    sums = _sub_sums(weights).reshape(rows * nb, per)
    scales, search = make_qx_quants_rmse1(x, 4, weights)
    d_block, stored = make_qx_quants_rmse1(scales.reshape(rows * nb, per), 32, sums)
    stored = stored.reshape(rows, nb, per)
    d = _f16(d_block.reshape(rows, nb))
    d_sub = (d.float()[..., None] * (stored - 32).float()).reshape(-1, 1)
    levels = torch.where(d_sub == 0, search, _requantize(x, d_sub, None, -4, 3) + 4)
    return KBlocks(fmt, levels.reshape(rows, nb * SUPER), stored, None, d)


def _q6_k_weighted(x, qw, fmt, rows, nb):
    """Q6_K: the reference search with make_qx_quants weighted by the importance itself."""
    return _q6_k(x, fmt, rows, nb, weights=qw)
