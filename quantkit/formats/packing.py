"""Bit packing of signed b-bit codes (b in 2, 3, 4, 8) into int32 words along the input dimension.

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

PACKABLE_BITS = (2, 3, 4, 8)


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
