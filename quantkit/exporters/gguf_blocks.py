"""GGUF (ggml) 32-value block formats written by the exporter: their byte layouts, and codes carried into them.

Every format cuts a row into blocks of 32 consecutive values; a block is stored little-endian as

  type   bytes  layout                                    value of element j
  Q8_0   34     d f16 | qs int8[32]                       x_j = d * qs_j
  Q4_0   18     d f16 | qs u8[16]                         x_j = d * (q_j - 8),  q_j in [0, 15]
  Q4_1   20     d f16 | m f16 | qs u8[16]                 x_j = d * q_j + m,    q_j in [0, 15]
  Q5_0   22     d f16 | qh u32 | qs u8[16]                x_j = d * (q_j - 16), q_j in [0, 31]
  Q5_1   24     d f16 | m f16 | qh u32 | qs u8[16]        x_j = d * q_j + m,    q_j in [0, 31]
  MXFP4  17     e u8  | qs u8[16]                         x_j = fp4(q_j) * 2^(e - 127)
                (e: the e8m0 exponent byte; q_j: the 4-bit e2m1 pattern S.EE.M; ggml stores the e2m1
                values doubled, kvalues_mxfp4 = 0, 1, 2, 3, 4, 6, 8, 12, -0, -1, ..., and multiplies by
                GGML_E8M0_TO_FP32_HALF(e) = 2^(e - 128): the same value)

Nibbles: byte i of qs holds the low 4 bits of q_i (low nibble) and of q_{i+16} (high nibble);
qh bit j holds bit 4 of q_j. (ggml-common.h block_q4_0 ... block_q8_0; gguf-py quants.py.)

The fields and the roundings onto them (`Blocks`, `quantize_blocks`, `quantize_weighted_blocks`) are
`quantkit.formats.ggml_blocks`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from quantkit.formats import packing
from quantkit.formats.ggml_blocks import BLOCK, FORMATS, Blocks, block_minimum

BLOCK_BYTES = {**{name: fmt.type_size for name, fmt in FORMATS.items()}, "MXFP4": 17}


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[rows, b] float16 -> [rows, b, 2] uint8, little-endian."""
    assert sys.byteorder == "little", "GGUF is written little-endian"
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[rows, b, 32] uint8 values -> [rows, b, 16] uint8: low nibble q_i, high nibble q_{i+16}."""
    low = q & 0x0F
    return low[..., :16] | (low[..., 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """[rows, b, 32] uint8 5-bit values -> [rows, b, 4] uint8: the u32 whose bit j is bit 4 of q_j."""
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)                # byte j // 8, bit j % 8
    packed = torch.zeros(bits.shape[:-1], dtype=torch.uint8)
    for bit in range(8):
        packed |= bits[..., bit] << bit
    return packed


def pack(blocks: Blocks) -> np.ndarray:
    """Serialize to the GGUF byte layout: [rows, n/32 * type_size] uint8 (numpy, for the writer)."""
    fmt, q = blocks.fmt, blocks.q.long()
    rows, n = q.shape
    assert n % BLOCK == 0, n
    assert int(q.min()) >= (-128 if fmt.name == "Q8_0" else 0), "stored values below the format's range"
    assert int(q.max()) < (128 if fmt.name == "Q8_0" else fmt.levels), "stored values above the format's range"
    q = q.reshape(rows, n // BLOCK, BLOCK)
    q = q.to(torch.int8).view(torch.uint8) if fmt.name == "Q8_0" else q.to(torch.uint8)
    parts = [_f16_bytes(blocks.d)]
    if fmt.has_min:
        parts.append(_f16_bytes(blocks.m))
    if fmt.name == "Q8_0":
        parts.append(q)
    else:
        if fmt.levels == 32:
            parts.append(_high_bits(q))
        parts.append(_nibbles(q))
    packed = torch.cat(parts, dim=-1)
    assert packed.shape[-1] == fmt.type_size
    return packed.reshape(rows, -1).numpy()


def unpack(data: np.ndarray, fmt_name: str, n: int) -> Blocks:
    """Inverse of `pack`: [rows, n/32 * type_size] uint8 -> `Blocks`."""
    fmt = FORMATS[fmt_name]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(-1, n // BLOCK, fmt.type_size)

    def f16(at: int) -> torch.Tensor:
        return (raw[..., at].long() | (raw[..., at + 1].long() << 8)).to(torch.int16).view(torch.float16)

    d = f16(0)
    m = f16(2) if fmt.has_min else None
    at = 4 if fmt.has_min else 2
    if fmt.name == "Q8_0":
        q = raw[..., at:].contiguous().view(torch.int8).long()
    else:
        high = torch.zeros(*raw.shape[:-1], BLOCK, dtype=torch.int64)
        if fmt.levels == 32:
            qh = raw[..., at:at + 4].long()
            high = ((qh.repeat_interleave(8, dim=-1) >> (torch.arange(BLOCK) % 8)) & 1) << 4
            at += 4
        qs = raw[..., at:at + 16].long()
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1) | high
    return Blocks(fmt, q.reshape(raw.shape[0], n), d, m)


@dataclass
class MxBlocks:
    """MXFP4 blocks of a [rows, n] matrix, n a multiple of 32: q [rows, n] uint8 e2m1 patterns (0..15),
    e [rows, n/32] uint8 biased exponents (scale 2^(e - 127))."""

    q: torch.Tensor
    e: torch.Tensor
    name: str = "MXFP4"

    def dequantize(self) -> torch.Tensor:
        """[rows, n] float32: fp4(q) * 2^(e - 127), as ggml computes it (exact in float32)."""
        rows, n = self.q.shape
        values = packing.fp4_values(self.q).reshape(rows, n // BLOCK, BLOCK)
        return (values * torch.exp2(self.e.float() - 127)[..., None]).reshape(rows, n)


def carry_mxfp4(codes: torch.Tensor, scale: torch.Tensor) -> MxBlocks:
    """MXFP4 blocks holding quantkit's fp4 codes [rows, n] and per-block power-of-two scales
    [rows, n/32] (2^E, E in [-127, 127]) as they are: q = the code's pattern, e = E + 127."""
    exponent = torch.log2(scale.float())
    assert torch.equal(exponent, exponent.round()), "MXFP4 scales are powers of two"
    return MxBlocks(packing.fp4_nibbles(codes), (exponent.round().long() + 127).to(torch.uint8))


def pack_mxfp4(blocks: MxBlocks) -> np.ndarray:
    """[rows, n/32 * 17] uint8: per block the exponent byte, then byte i = q_i | q_{i+16} << 4."""
    rows, n = blocks.q.shape
    q = blocks.q.reshape(rows, n // BLOCK, BLOCK)
    packed = torch.cat([blocks.e[..., None], _nibbles(q)], dim=-1)
    return packed.reshape(rows, -1).numpy()


def carrier_format(bits: int, symmetric: bool) -> str | None:
    """The smallest block format whose grid holds every ``bits``-bit signed code c exactly:
    symmetric x = s*c -> Q4_0/Q5_0 (q = c + 8/16) or Q8_0 (q = c); asymmetric x = (c - z)*s =
    s*(c + o) - s*(z + o) -> Q4_1/Q5_1 with m = -s*(z + o). None when no format can (asymmetric > 5 bits)."""
    if symmetric:
        return "Q4_0" if bits <= 4 else "Q5_0" if bits == 5 else "Q8_0"
    return "Q4_1" if bits <= 4 else "Q5_1" if bits == 5 else None


def holds(fmt_name: str, bits: int, symmetric: bool) -> bool:
    """Whether block type ``fmt_name`` holds every ``bits``-bit code of a (a)symmetric grid exactly: a wider
    type of the same kind does (int4 codes c are Q5_0's q = c + 16 and Q8_0's q = c under the same scale;
    asymmetric ones Q5_1's with m = -scale * (zero + 16))."""
    fmt = FORMATS.get(fmt_name)
    if fmt is None or fmt.has_min == symmetric:
        return False
    return bits <= fmt.levels.bit_length() - 1


def closest_format(bits: int, symmetric: bool) -> str:
    """Default re-rounding target for a layer that cannot be carried: same bits and symmetry where a
    format has them, else Q8_0."""
    if bits <= 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 5:
        return "Q5_0" if symmetric else "Q5_1"
    return "Q8_0"


def carry_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt_name: str) -> Blocks:
    """Blocks holding quantkit codes as they are.

    codes: [rows, n] int8 signed codes; scale, zero: [rows, n/32] per-block float32 (scale holding
    fp16 values, zero None for symmetric). Symmetric: q = c + offset, d = scale (exact). Asymmetric:
    q = c + offset, d = scale, m = -scale * (zero + offset) rounded to f16 (the only rounding).
    """
    fmt = FORMATS[fmt_name]
    assert fmt.has_min == (zero is not None), (fmt_name, zero is None)
    q = codes.long() + fmt.offset
    m = None
    if zero is not None:
        m = block_minimum(scale, zero, fmt_name)
    return Blocks(fmt, q, scale.half(), m)
