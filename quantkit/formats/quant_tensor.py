"""`QuantTensor`: the one typed hand-off from algorithms to the model, the native file and exporters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats import ggml_blocks, kquants, primitives
from quantkit.formats.schemes import WeightSpec


@dataclass
class QuantTensor:
    """A quantized weight matrix.

    codes:  [out, in] values of the element grid ``spec.element``, unpacked (packing is the file's job):
            int8 for int{b} ([-2^(b-1), 2^(b-1)-1]), float8_e4m3fn for fp8 e4m3 and fp4 e2m1 values
    scale:  [R, G] float32 holding values of ``spec.scale_format`` (fp16, fp32, e8m0, fp8 e4m3);
            R = 1 (per-tensor), ceil(out / block rows) (2-D blocks) or out; G = ceil(in / group_size)
    zero:   [R, G] float32 or None (symmetric). Integer-valued for RTN/GPTQ/AWQ grids; HQQ's
            optimised zero points may be fractional (see `integer_zero`).
    spec:   the grid (bits, granularity, symmetric, group_size)
    g_idx:  [in] int32 group of each input column when act-order reordered the groups, else None
    global_scale: [1] float32 per-tensor divisor of two-level grids (NVFP4: w = code * scale / global_scale),
            present exactly when ``spec.second_scale`` is set
    super_scale, super_min: [out, in / 256] float32 holding float16 values: a K-quant grid's super-block
            ``d`` and ``dmin`` (``spec.super_group``); ``scale`` then holds the integer sub-block scales
            (Q3_K's as sc - 32) and ``zero`` the integer sub-block mins m:
            w = (d * scale) * code  (symmetric),  (d * scale) * (code + 2^(bits-1)) - (dmin * zero)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: WeightSpec
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out_features, in_features = self.codes.shape
        element = self.spec.element
        assert self.codes.dtype == primitives.code_dtype(element), (self.codes.dtype, element.name)
        rows = primitives.group_count(out_features, self.row_block)
        assert self.scale.shape[0] in (1, rows), (self.scale.shape, self.codes.shape)
        assert (self.global_scale is None) == (self.spec.second_scale is None)
        assert self.scale.shape[1] == primitives.group_count(in_features, self.group_size), self.scale.shape
        assert self.zero is None or self.zero.shape == self.scale.shape
        assert self.spec.symmetric == (self.zero is None)
        assert (self.super_scale is None) == (self.spec.super_group is None)
        assert (self.super_min is None) == (self.super_scale is None or self.spec.symmetric)
        if self.super_scale is not None:
            assert in_features % self.spec.super_group == 0, (in_features, self.spec.super_group)
            assert self.super_scale.shape == (out_features, in_features // self.spec.super_group), self.super_scale.shape
        values = self.codes.float()
        assert self.codes.numel() == 0 or element.min <= float(values.min()) <= float(values.max()) <= element.max

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def group_size(self) -> int:
        return primitives.group_size_for(self.spec, self.codes.shape[1])

    @property
    def row_block(self) -> int:
        """Output rows sharing one row of scales (`primitives.rows_per_scale`)."""
        return primitives.rows_per_scale(self.spec, self.codes.shape[0])

    @property
    def ragged(self) -> bool:
        """True when the last group holds fewer than group_size columns."""
        return self.codes.shape[1] % self.group_size != 0

    @property
    def integer_zero(self) -> bool:
        return self.zero is None or bool(torch.equal(self.zero, torch.round(self.zero)))

    def grid_indices(self) -> torch.Tensor:
        """[out, in] uint8 position of each code in ``spec.element.grid`` (for int{b}: code - qmin, the
        unsigned value the packer stores)."""
        element = self.spec.element
        if element.kind == "float":
            return torch.searchsorted(element.values(), self.codes.float().contiguous()).to(torch.uint8)
        return (self.codes.to(torch.int16) - int(element.min)).to(torch.uint8)

    @classmethod
    def from_k_blocks(cls, blocks: kquants.KBlocks, spec: WeightSpec) -> "QuantTensor":
        """The K-quant fields as a QuantTensor of ``spec`` (whose `WeightSpec.k_format` is ``blocks.fmt``)."""
        assert spec.k_format == blocks.fmt, (spec, blocks.fmt.name)
        rows, n = blocks.q.shape
        scale = blocks.sc - 32 if blocks.fmt.name == "Q3_K" else blocks.sc
        codes = (blocks.q - (1 << (spec.bits - 1))).to(torch.int8)
        return cls(codes, scale.reshape(rows, -1).float(), None if blocks.m is None else blocks.m.reshape(rows, -1).float(),
                   spec, super_scale=blocks.d.float(), super_min=None if blocks.dmin is None else blocks.dmin.float())

    @classmethod
    def from_ggml_blocks(cls, blocks: ggml_blocks.Blocks, spec: WeightSpec) -> "QuantTensor":
        """A 32-value block type as the int g32 grid of ``spec``: code = q - offset, scale = d (negative where
        llama.cpp's d = max / -8 is). Symmetric types (Q4_0, Q5_0, Q8_0) are held exactly; a type with a
        minimum (Q4_1, Q5_1: x = d * q + m) gets the fractional zero point z = -m / d - offset, so that
        (code - z) * d = d * q + m and the exporter's m = -d * (z + offset) rounds back to the same float16
        (blocks of zeros: z = -offset; a constant block first gets a step, `ggml_blocks.with_steps`)."""
        assert (spec.group_size, spec.symmetric) == (ggml_blocks.BLOCK, not blocks.fmt.has_min), spec
        blocks = ggml_blocks.with_steps(blocks)
        codes = (blocks.q - blocks.fmt.offset).to(torch.int8)
        if not blocks.fmt.has_min:
            return cls(codes, blocks.d.float(), None, spec)
        d, m = blocks.d.double(), blocks.m.double()
        zero = torch.where(d == 0, 0.0, -m / torch.where(d == 0, 1.0, d)) - blocks.fmt.offset
        return cls(codes, blocks.d.float(), zero.float(), spec)

    def k_blocks(self) -> kquants.KBlocks:
        """The K-quant fields of a K grid (`from_k_blocks` inverted)."""
        fmt = self.spec.k_format
        rows, n = self.shape
        nb = n // kquants.SUPER
        sc = self.scale.long().reshape(rows, nb, -1)
        q = self.codes.long() + (1 << (self.spec.bits - 1))
        return kquants.KBlocks(fmt, q, sc + 32 if fmt.name == "Q3_K" else sc,
                               None if self.zero is None else self.zero.long().reshape(rows, nb, -1),
                               self.super_scale.half(), None if self.super_min is None else self.super_min.half())

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32."""
        if self.super_scale is not None:       # K-quants: ggml's own order of float32 operations
            return self.k_blocks().dequantize()
        return primitives.dequantize(self.codes, self.scale, self.zero, self.group_size, self.g_idx, self.row_block,
                                     self.global_scale)
