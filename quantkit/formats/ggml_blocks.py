"""llama.cpp's 32-value block types as grids (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): their fields (`Blocks`), the
reference rounding (``quantize_row_q*_ref``, what gguf-py and llama-quantize run without an importance
matrix) and llama.cpp's importance-weighted search for them (``quantize_row_q*_impl``, llama-quantize
--imatrix). The byte layouts are the exporter's (`quantkit.exporters.gguf_blocks`).

  type   value of element j of a block
  Q8_0   d * q_j,          q_j in [-128, 127]
  Q4_0   d * (q_j - 8),    q_j in [0, 15]          Q5_0   d * (q_j - 16), q_j in [0, 31]
  Q4_1   d * q_j + m,      q_j in [0, 15]          Q5_1   d * q_j + m,    q_j in [0, 31]
(d, m float16; float32 arithmetic.)

The reference rounding reproduces gguf-py's float32 arithmetic step by step:
  Q8_0: d = absmax/127, q = round_half_away(x / d)
  Q4_0/Q5_0: d = x_max_abs_signed / -8 (or -16), q = trunc(x / d + 8.5 (16.5)), clamp
  Q4_1/Q5_1: d = (max - min)/15 (31), m = min, q = trunc((x - min) / d + 0.5), clamp
where "/ d" is a multiplication by id = 1/d (0 when d = 0), exactly as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats import kquants

BLOCK = 32


@dataclass(frozen=True)
class BlockFormat:
    name: str
    type_size: int          # bytes per block
    offset: int             # q = code + offset for the signed-code formats (0 for Q8_0)
    levels: int             # number of q values: 2^bits
    has_min: bool           # Q4_1 / Q5_1 store an f16 minimum m


FORMATS: dict[str, BlockFormat] = {
    "Q8_0": BlockFormat("Q8_0", 34, 0, 256, False),
    "Q4_0": BlockFormat("Q4_0", 18, 8, 16, False),
    "Q4_1": BlockFormat("Q4_1", 20, 8, 16, True),
    "Q5_0": BlockFormat("Q5_0", 22, 16, 32, False),
    "Q5_1": BlockFormat("Q5_1", 24, 16, 32, True),
}


# Bytes per 32-value block of every block type the exporter writes (the integer formats and MXFP4).

@dataclass
class Blocks:
    """Block parameters of a [rows, n] matrix, n a multiple of 32.

    q: [rows, n] int64 stored values (unsigned q for Q4/Q5, signed qs for Q8_0)
    d: [rows, n/32] float16 block scales;  m: [rows, n/32] float16 block minimums (Q4_1/Q5_1) or None
    """

    fmt: BlockFormat
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """[rows, n] float32, computed as ggml does: d * (q - offset) or d * q + m."""
        rows, n = self.q.shape
        q = self.q.reshape(rows, n // BLOCK, BLOCK).float()
        d = self.d.float()[..., None]
        if self.fmt.has_min:
            return (d * q + self.m.float()[..., None]).reshape(rows, n)
        return (d * (q - self.fmt.offset)).reshape(rows, n)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """ggml's roundf as gguf-py writes it: sign(x) * (floor|x| + floor(2 * (|x| - floor|x|)))."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def quantize_blocks(weight: torch.Tensor, fmt_name: str) -> Blocks:
    """Re-round float weights [rows, n] (n a multiple of 32) to a block format, bit-identical to
    ``gguf.quants.quantize(weight.float().numpy(), type)``. All arithmetic in float32."""
    fmt = FORMATS[fmt_name]
    rows, n = weight.shape
    assert n % BLOCK == 0, n
    x = weight.float().reshape(rows, n // BLOCK, BLOCK)
    if fmt.name == "Q8_0":
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(x * _inverse(d))
        return Blocks(fmt, q.long().reshape(rows, n), d.squeeze(-1).half())
    if fmt.has_min:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        d = (hi - lo) / (fmt.levels - 1)
        q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, fmt.levels - 1)
        return Blocks(fmt, q.long().reshape(rows, n), d.squeeze(-1).half(), lo.squeeze(-1).half())
    # Symmetric 4/5-bit: the element of largest magnitude (first one on ties, keeping its sign)
    # maps to q = 0, i.e. d = x_max / -offset.
    index = x.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(x, -1, index) / -fmt.offset
    q = torch.trunc(x * _inverse(d) + (fmt.offset + 0.5)).clamp(0, fmt.levels - 1)
    return Blocks(fmt, q.long().reshape(rows, n), d.squeeze(-1).half())


def symmetric_type(spec) -> str | None:
    """The symmetric 32-value block type whose values a `WeightSpec` grid holds exactly (int4/int5/int8 in
    groups of 32 with fp16 scales: Q4_0, Q5_0, Q8_0), or None."""
    if spec.format != "int" or spec.granularity != "group" or spec.group_size != BLOCK or not spec.symmetric \
            or spec.super_group is not None or spec.scale_format != "fp16":
        return None
    return next((f.name for f in FORMATS.values() if not f.has_min and f.levels == 1 << spec.bits), None)


def min_type(spec) -> str | None:
    """The 32-value block type with a minimum whose grid an asymmetric ``spec`` is (int4/int5 in groups of 32 with
    fp16 scales: Q4_1, Q5_1), or None. Its codes carry exactly; its float16 minimum m is the fractional zero point
    z = -m / d - offset (`QuantTensor.from_ggml_blocks`)."""
    if spec.format != "int" or spec.granularity != "group" or spec.group_size != BLOCK or spec.symmetric \
            or spec.super_group is not None or spec.scale_format != "fp16":
        return None
    return next((f.name for f in FORMATS.values() if f.has_min and f.levels == 1 << spec.bits), None)


def block_minimum(d: torch.Tensor, zero: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """The float16 minimum m = -d * (zero + offset) [rows, n/32] of Q4_1/Q5_1 blocks with scales d and zero points
    ``zero`` [rows, n/32] float32, in float64: exact for integer zeros, and a fractional zero of
    `QuantTensor.from_ggml_blocks` comes back to the float16 m it was made from."""
    return (-d.double() * (zero.double() + FORMATS[fmt_name].offset)).half()


def with_steps(blocks: Blocks) -> Blocks:
    """The same values, every block with a step: llama.cpp's search gives a block of equal negative values
    x = m no step (d = 0, q = 0); it becomes d = m, m = 0, q = 1 (d * 1 + 0 = m exactly), so the value is a code
    step of a grid other algorithms can round on. Blocks of zeros (d = 0, m = 0) stay."""
    if not blocks.fmt.has_min:
        return blocks
    constant = (blocks.d == 0) & (blocks.m != 0)
    if not bool(constant.any()):
        return blocks
    q = torch.where(constant.repeat_interleave(BLOCK, dim=1), 1, blocks.q)
    return Blocks(blocks.fmt, q, torch.where(constant, blocks.m, blocks.d), torch.where(constant, 0, blocks.m).half())


# llama.cpp's importance-weighted search per type: (make_qx_quants nmax) for the symmetric ones, (make_qkx3_quants
# nmax) for those with a minimum (quantize_row_q4_0_impl ... quantize_row_q5_1_impl); Q8_0 ignores the matrix.
WEIGHTED = {"Q4_0": 8, "Q5_0": 16, "Q4_1": 15, "Q5_1": 31}


def quantize_weighted_blocks(weight: torch.Tensor, fmt_name: str, importance: torch.Tensor) -> Blocks:
    """llama.cpp's search of weight [rows, n] with an importance matrix (importance [n] float32, E[x_j^2]):
    each value's weight is importance_j * sqrt(sigma2 + x_j^2), sigma2 = (sum of x^2 over the whole row) / n;
    Q4_0/Q5_0 take make_qx_quants' scale (19 trial grids, weighted least squares), Q4_1/Q5_1 make_qkx3_quants'
    scale and min (36 trial grids); the search's own levels are stored (not re-rounded with the f16 d).
    Q8_0 is the reference rounding, as llama.cpp ignores the matrix there."""
    if fmt_name not in WEIGHTED:
        return quantize_blocks(weight, fmt_name)
    fmt = FORMATS[fmt_name]
    rows, n = weight.shape
    x = weight.float()
    xt = x.t().contiguous()                                                       # [n, rows]: columns as rows
    sum_x2 = kquants.weighted_sum(xt * xt)                                        # float32, in the C loop's order
    sigma2 = (sum_x2 / n).repeat_interleave(n // BLOCK)[:, None]
    blocks = x.reshape(rows * (n // BLOCK), BLOCK)
    qw = importance.float().reshape(1, n // BLOCK, BLOCK).expand(rows, -1, -1).reshape(-1, BLOCK)
    weights = qw * torch.sqrt((sigma2 + blocks * blocks).double()).float()      # sqrtf: correctly rounded
    nmax = WEIGHTED[fmt_name]
    if fmt.has_min:
        scale, the_min, levels = kquants.make_qkx2_quants(blocks, weights, nmax, -0.9, 0.05, 36, False)
        return Blocks(fmt, levels.reshape(rows, n), scale.reshape(rows, -1).half(), (-the_min).reshape(rows, -1).half())
    scale, levels = kquants.make_qx_quants_rmse1(blocks, nmax, weights)
    return Blocks(fmt, levels.reshape(rows, n), scale.reshape(rows, -1).half())


def searched_type(spec) -> str | None:
    """The 32-value block type llama.cpp searches with an importance matrix whose grid ``spec`` is (Q4_0, Q5_0:
    `symmetric_type`; Q4_1, Q5_1: `min_type`), or None."""
    block_type = symmetric_type(spec) or min_type(spec)
    return block_type if block_type in WEIGHTED else None


def importance_searched(ggml_type: str) -> bool:
    """Whether llama.cpp quantizes ``ggml_type`` with an importance-weighted search given an importance matrix
    (the K types, Q4_0/Q5_0, Q4_1/Q5_1; Q8_0 ignores the matrix)."""
    return ggml_type in kquants.K_FORMATS or ggml_type in WEIGHTED


def requantize(weight: torch.Tensor, ggml_type: str, importance: torch.Tensor | None):
    """llama.cpp's quantization of weight [rows, n] float32 to a block type (K blocks or 32-value blocks), with its
    importance-weighted search when ``importance`` [n] is given (what llama-quantize --imatrix runs)."""
    if ggml_type in kquants.K_FORMATS:
        if importance is not None:
            return kquants.quantize_weighted(weight, ggml_type, importance.float())
        return kquants.quantize_reference(weight, ggml_type)
    if importance is not None:
        return quantize_weighted_blocks(weight, ggml_type, importance.float())
    return quantize_blocks(weight, ggml_type)
