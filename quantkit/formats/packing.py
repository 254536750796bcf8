"""Bit packing of signed b-bit codes (b in 2..8) into int32 words along the input dimension.

Bit order (the native format's, written down once):
  1. each code c in [-2^(b-1), 2^(b-1)-1] becomes the unsigned value u = c + 2^(b-1);
  2. each row is padded with zeros (u = 0) to a multiple of 32 codes;
  3. the row is read as a little-endian bit stream: code i of the row occupies bits
     [i*b, (i+1)*b) of the stream, least significant bit first; stream bit k lives in word k // 32
     at bit k % 32. A 3-bit code may straddle two words.
  4. words are stored as int32 (two's complement of the uint32 bit pattern).
A row of n codes therefore takes ceil(n / 32) * b words. For b = 4 this is the GPTQ/compressed-tensors
order (8 codes per word, code 0 in the low nibble).
"""
from __future__ import annotations

import torch

PACKABLE_BITS = tuple(range(2, 9))


def packed_words_per_row(in_features: int, bits: int) -> int:
    return -(-in_features // 32) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] int8 signed codes -> [rows, ceil(n/32)*bits] int32 words."""
    assert bits in PACKABLE_BITS, bits
    rows, n = codes.shape
    padded = -(-n // 32) * 32
    unsigned = torch.zeros(rows, padded, dtype=torch.int64)
    unsigned[:, :n] = codes.long() + (1 << (bits - 1))
    assert int(unsigned.min()) >= 0 and int(unsigned.max()) < (1 << bits), "codes out of range"
    start = torch.arange(padded) * bits                  # first stream bit of each code
    word, offset = start // 32, start % 32
    words = torch.zeros(rows, padded * bits // 32, dtype=torch.int64)
    # Low part of each code: into its word at its offset (bits of distinct codes never overlap,
    # so a sum is an OR). High part, for codes straddling a word boundary: into the next word.
    words.index_add_(1, word, (unsigned << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32
    if bool(spill.any()):
        words.index_add_(1, word[spill] + 1, unsigned[:, spill] >> (32 - offset[spill]))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """[rows, ceil(n/32)*bits] int32 words -> [rows, n] int8 signed codes (inverse of `pack`)."""
    assert bits in PACKABLE_BITS, bits
    rows = words.shape[0]
    assert words.shape[1] == packed_words_per_row(in_features, bits), (words.shape, in_features, bits)
    if 32 % bits == 0:  # no code straddles a word: shift every word by each slot at once
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        slots = torch.bitwise_right_shift(words[:, :, None], shifts) & ((1 << bits) - 1)
        values = slots.reshape(rows, -1)[:, :in_features]
        return (values - (1 << (bits - 1))).to(torch.int8)
    unsigned_words = words.long() & 0xFFFFFFFF
    start = torch.arange(in_features) * bits
    word, offset = start // 32, start % 32
    mask = (1 << bits) - 1
    values = unsigned_words[:, word] >> offset
    spill = offset + bits > 32
    if bool(spill.any()):
        high = unsigned_words[:, word[spill] + 1] << (32 - offset[spill])
        values[:, spill] = values[:, spill] | high
    values = values & mask
    return (values - (1 << (bits - 1))).to(torch.int8).reshape(rows, in_features)


# FP4 e2m1 codes (OCP MX / NVFP4): each value is a 4-bit pattern S.EE.M, whose low three bits are the
# magnitude's position in (0, 0.5, 1, 1.5, 2, 3, 4, 6) and bit 3 the sign; two codes per byte along the
# input dim, code 2j in the low nibble (compressed-tensors' and vLLM's ``weight_packed``). An odd row is
# padded with a zero nibble.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def fp4_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """fp4 e2m1 values (any float dtype) [...] -> their 4-bit patterns [...] uint8."""
    values = codes.float()
    magnitude = torch.searchsorted(torch.tensor(FP4_MAGNITUDES), values.abs().contiguous())
    assert bool((torch.tensor(FP4_MAGNITUDES)[magnitude.clamp(max=7)] == values.abs()).all()), "not fp4 values"
    return (magnitude | (torch.signbit(values).long() << 3)).to(torch.uint8)


def fp4_values(nibbles: torch.Tensor) -> torch.Tensor:
    """4-bit patterns [...] (uint8, 0..15) -> fp4 e2m1 values [...] float32 (pattern 8 is -0.0)."""
    magnitude = torch.tensor(FP4_MAGNITUDES)[(nibbles & 7).long()]
    return torch.where((nibbles & 8) != 0, -magnitude, magnitude)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[rows, n] fp4 e2m1 values -> [rows, ceil(n/2)] uint8, code 2j in the low nibble of byte j."""
    nibbles = fp4_nibbles(codes)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """[rows, ceil(n/2)] uint8 -> [rows, n] fp4 e2m1 values as float8_e4m3fn (inverse of `pack_fp4`)."""
    assert packed.dtype == torch.uint8 and packed.shape[1] == -(-in_features // 2), (packed.dtype, packed.shape)
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return fp4_values(nibbles).to(torch.float8_e4m3fn)
