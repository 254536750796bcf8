"""Round-to-nearest: the baseline every other algorithm is measured against."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, register
from quantkit.formats import primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def quantize_rtn(weight: torch.Tensor, spec: WeightSpec, global_scale: torch.Tensor | None = None) -> QuantTensor:
    """Min/max grid per group, codes = round(w / scale) + zero. weight: [out, in] float; ``global_scale``
    [1] overrides a two-level grid's own (a fused group's shared one)."""
    weight = weight.float()
    glob = primitives.global_scale(weight, spec) if global_scale is None else global_scale
    scale, zero = primitives.weight_qparams(weight, spec, glob)
    group_size = primitives.group_size_for(spec, weight.shape[1])
    codes = primitives.quantize(weight, primitives.effective_scale(scale, glob), zero, group_size, spec.element,
                                row_block=primitives.rows_per_scale(spec, weight.shape[0]))
    return QuantTensor(codes, scale, zero, spec, global_scale=glob)


@register("rtn")
class RoundToNearest:
    """No statistics, no search."""

    @dataclass(frozen=True)
    class Options:
        pass

    statistics: frozenset[str] = frozenset()
    sequential = False

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        return quantize_rtn(weight, spec, context.global_scale), {}
