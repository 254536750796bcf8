"""Round-to-nearest: the baseline every other algorithm is measured against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, option, parse_options, register
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, kquants, primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def quantize_rtn(weight: torch.Tensor, spec: WeightSpec, global_scale: torch.Tensor | None = None) -> QuantTensor:
    """Min/max grid per group, codes = round(w / scale) + zero. weight: [out, in] float; ``global_scale``
    [1] overrides a two-level grid's own (a fused group's shared one). K-quant grids take llama.cpp's
    reference search (bit-identical to ``llama-quantize`` without an importance matrix)."""
    weight = weight.float()
    if spec.k_format is not None:    # K-quants: llama.cpp's reference search (llama-quantize, no imatrix)
        return QuantTensor.from_k_blocks(kquants.quantize_reference(weight, spec.k_format.name), spec)
    glob = primitives.global_scale(weight, spec) if global_scale is None else global_scale
    scale, zero = primitives.weight_qparams(weight, spec, glob)
    group_size = primitives.group_size_for(spec, weight.shape[1])
    codes = primitives.quantize(weight, primitives.effective_scale(scale, glob), zero, group_size, spec.element,
                                row_block=primitives.rows_per_scale(spec, weight.shape[0]))
    return QuantTensor(codes, scale, zero, spec, global_scale=glob)


def quantize_llama_cpp(weight: torch.Tensor, spec: WeightSpec) -> QuantTensor:
    """llama.cpp's reference rounding onto a symmetric 32-value block grid (Q4_0, Q5_0, Q8_0: d = signed max / -8
    or / -16, absmax / 127; `ggml_blocks.quantize_blocks`), as the exact int g32 QuantTensor."""
    return QuantTensor.from_ggml_blocks(ggml_blocks.quantize_blocks(weight.float(), ggml_blocks.symmetric_type(spec)),
                                        spec)


@register("rtn")
class RoundToNearest:
    """No statistics, no search. Option llama_cpp (False): on int4/int5/int8 g32 symmetric grids round as
    llama.cpp's Q4_0/Q5_0/Q8_0 reference does (the file-type plans set it, so --algo rtn reproduces
    llama-quantize); K grids always take llama.cpp's reference search."""

    @dataclass(frozen=True)
    class Options:
        llama_cpp: bool = option(False)

    statistics: frozenset[str] = frozenset()
    sequential = False

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        options = parse_options(self.name, context.options)
        if options.llama_cpp:
            if ggml_blocks.symmetric_type(spec) is None:
                raise QuantkitError(f"rtn option llama_cpp takes int4/int5/int8 g32 symmetric grids (llama.cpp's "
                                    f"Q4_0/Q5_0/Q8_0), not {spec.describe()}")
            return quantize_llama_cpp(weight, spec), {}
        return quantize_rtn(weight, spec, context.global_scale), {}
