"""The byte layouts of llama.cpp's K-quant blocks (Q2_K ... Q6_K) in GGUF files: `pack` / `unpack`
between `KBlocks` (the unpacked fields, `quantkit.formats.kquants`) and the bytes (documented at each
packer; ggml-common.h block_q*_K, gguf-py's dequantizers).
"""
from __future__ import annotations

import numpy as np
import torch

from quantkit.formats.kquants import K_FORMATS, SUPER, KBlocks

# ---------------------------------------------------------------------------------------------------
# byte layouts
# ---------------------------------------------------------------------------------------------------

def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[..., b] -> [..., 2b] uint8: float16, little-endian."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """2-bit values of 128-value halves: [R, nb, 256] -> [R, nb, 64], byte 32h + l holding values
    128h + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7 (Q2_K's and Q3_K's qs)."""
    halves = q.reshape(*q.shape[:-1], 2, 4, 32)
    packed = halves[..., 0, :] | (halves[..., 1, :] << 2) | (halves[..., 2, :] << 4) | (halves[..., 3, :] << 6)
    return packed.reshape(*q.shape[:-1], 64)


def _uncrumbs(qs: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6]).reshape(1, 1, 1, 4, 1)
    halves = (qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts) & 3
    return halves.reshape(*qs.shape[:-1], 256)


def _scales_6bit(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 scale bytes from 8 6-bit scales and mins [..., 8]: bytes 0-3 hold scale j (low 6
    bits) and the top 2 bits of scale j+4; bytes 4-7 min j and the top 2 bits of min j+4; bytes 8-11 the
    low 4 bits of scale j+4 and (high nibble) of min j+4."""
    out = torch.zeros(*ls.shape[:-1], 12, dtype=torch.int64)
    out[..., 0:4] = ls[..., :4] | ((ls[..., 4:] >> 4) << 6)
    out[..., 4:8] = lm[..., :4] | ((lm[..., 4:] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:] & 0xF) | ((lm[..., 4:] & 0xF) << 4)
    return out


def _unscales_6bit(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_scales_6bit` (ggml's get_scale_min_k4)."""
    ls = torch.cat([b[..., 0:4] & 63, (b[..., 8:12] & 0xF) | ((b[..., 0:4] >> 6) << 4)], dim=-1)
    lm = torch.cat([b[..., 4:8] & 63, (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)], dim=-1)
    return ls, lm


def _scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 scale bytes from 16 6-bit values [..., 16]: byte j (j < 8) holds the low 4 bits of value
    j (low nibble) and of value j+8 (high nibble); byte 8 + (j % 4) holds the top 2 bits of value j at bits
    2*(j // 4)."""
    out = torch.zeros(*sc.shape[:-1], 12, dtype=torch.int64)
    out[..., 0:8] = (sc[..., 0:8] & 0xF) | ((sc[..., 8:16] & 0xF) << 4)
    high = (sc >> 4).reshape(*sc.shape[:-1], 4, 4)                       # [..., j // 4, j % 4]
    out[..., 8:12] = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    return out


def _unscales_q3(b: torch.Tensor) -> torch.Tensor:
    low = torch.cat([b[..., 0:8] & 0xF, b[..., 0:8] >> 4], dim=-1)
    shifts = (2 * (torch.arange(16) // 4))
    high = (b[..., 8 + torch.arange(16) % 4] >> shifts) & 3
    return low | (high << 4)


def pack(blocks: KBlocks) -> np.ndarray:
    """The GGUF bytes: [rows, nb * type_size] uint8."""
    fmt = blocks.fmt
    rows, n = blocks.q.shape
    nb = n // SUPER
    q = blocks.q.reshape(rows, nb, SUPER)
    d = _f16_bytes(blocks.d[..., None])
    if fmt.name == "Q2_K":
        parts = [blocks.sc | (blocks.m << 4), _crumbs(q), d, _f16_bytes(blocks.dmin[..., None])]
    elif fmt.name == "Q3_K":
        # hmask bit k of byte m: the high bit (q >= 4) of value 32k + m
        high = (q >> 2).reshape(rows, nb, 8, 32)
        hmask = sum(high[..., k, :] << k for k in range(8))
        parts = [hmask, _crumbs(q & 3), _scales_q3(blocks.sc), d]
    elif fmt.name in ("Q4_K", "Q5_K"):
        chunks = q.reshape(rows, nb, 4, 2, 32)                               # 64-value chunks, two halves
        ql = ((chunks[..., 0, :] & 0xF) | ((chunks[..., 1, :] & 0xF) << 4)).reshape(rows, nb, 128)
        parts = [d, _f16_bytes(blocks.dmin[..., None]), _scales_6bit(blocks.sc, blocks.m)]
        if fmt.name == "Q5_K":
            # qh bit 2c (2c + 1) of byte l: bit 4 of value 64c + l (64c + 32 + l)
            bits = (chunks >> 4) & 1
            parts.append(sum((bits[..., c, 0, :] << (2 * c)) | (bits[..., c, 1, :] << (2 * c + 1)) for c in range(4)))
        parts.append(ql)
    else:  # Q6_K
        halves = q.reshape(rows, nb, 2, 4, 32)                              # values 128h + 32k + l
        low, top = halves & 0xF, halves >> 4
        ql = torch.cat([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], dim=-1)
        qh = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
        parts = [ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), blocks.sc & 0xFF, d]
    packed = torch.cat([p.to(torch.uint8) if p.dtype != torch.uint8 else p for p in parts], dim=-1)
    assert packed.shape[-1] == fmt.type_size, (fmt.name, packed.shape)
    return packed.reshape(rows, nb * fmt.type_size).numpy()


def unpack(data: np.ndarray, name: str, n: int) -> KBlocks:
    """Inverse of `pack`: [rows, nb * type_size] uint8 -> `KBlocks`."""
    fmt = K_FORMATS[name]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(-1, n // SUPER, fmt.type_size).long()
    rows, nb = raw.shape[:2]

    def f16(at: int) -> torch.Tensor:
        return (raw[..., at] | (raw[..., at + 1] << 8)).to(torch.int16).view(torch.float16)

    if fmt.name == "Q2_K":
        q = _uncrumbs(raw[..., 16:80])
        return KBlocks(fmt, q.reshape(rows, n), raw[..., :16] & 0xF, raw[..., :16] >> 4, f16(80), f16(82))
    if fmt.name == "Q3_K":
        hmask = raw[..., 0:32]
        high = torch.stack([(hmask >> k) & 1 for k in range(8)], dim=-2).reshape(rows, nb, SUPER)
        q = _uncrumbs(raw[..., 32:96]) | (high << 2)
        return KBlocks(fmt, q.reshape(rows, n), _unscales_q3(raw[..., 96:108]), None, f16(108))
    if fmt.name in ("Q4_K", "Q5_K"):
        ls, lm = _unscales_6bit(raw[..., 4:16])
        ql = raw[..., -128:].reshape(rows, nb, 4, 1, 32)
        q = torch.cat([ql & 0xF, ql >> 4], dim=-2)                             # [R, nb, 4, 2, 32]
        if fmt.name == "Q5_K":
            qh = raw[..., 16:48].reshape(rows, nb, 1, 1, 32)
            shifts = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :]).reshape(1, 1, 4, 2, 1)
            q = q | (((qh >> shifts) & 1) << 4)
        return KBlocks(fmt, q.reshape(rows, n), ls, lm, f16(0), f16(2))
    ql, qh = raw[..., 0:128].reshape(rows, nb, 2, 2, 32), raw[..., 128:192].reshape(rows, nb, 2, 1, 32)
    low = torch.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], dim=-2)
    top = (qh >> (2 * torch.arange(4)).reshape(1, 1, 1, 4, 1)) & 3
    sc = raw[..., 192:208]
    return KBlocks(fmt, (low | (top << 4)).reshape(rows, n), torch.where(sc > 127, sc - 256, sc), None, f16(208))
