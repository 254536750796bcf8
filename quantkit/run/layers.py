"""Small operations on a block's modules shared by the block's stages: casting, the compute-dtype
runner copy, and building a QuantLinear from a quantized weight and its input range."""
from __future__ import annotations

import copy

import torch
from torch import nn

from quantkit.calibrate.stats import LayerStats
from quantkit.formats import primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import Scheme
from quantkit.model.qlinear import QuantLinear


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters (not buffers: QuantLinear's fp16 scales and int codes keep their types)."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def runner_for(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The block as forward passes run it: itself in fp32, else a copy in the compute dtype."""
    return block if dtype == torch.float32 else cast_parameters(copy.deepcopy(block), dtype)


def input_range(stats: LayerStats, factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (min, max) of the layer input, or of input / factors after smoothing (exact: s > 0)."""
    lo, hi = stats.range.min, stats.range.max
    if factors is not None:
        lo, hi = lo / factors, hi / factors
    return lo.min(), hi.max()


def make_quant_linear(linear: nn.Module, scheme: Scheme, quant: QuantTensor,
                      activation_range: tuple[torch.Tensor, torch.Tensor] | None, bias_dtype: torch.dtype) -> QuantLinear:
    """A QuantLinear for ``linear``'s quantized weight; static activation grids come from the range."""
    activation = scheme.activation
    input_scale = input_zero = input_global_scale = None
    if activation is not None and not activation.dynamic:
        input_scale, input_zero = primitives.activation_qparams(*activation_range, activation)
    if activation is not None and activation.second_scale is not None:
        input_global_scale = primitives.activation_global_scale(*activation_range, activation)
    bias = None if linear.bias is None else linear.bias.detach().to(bias_dtype)
    return QuantLinear(quant, activation, input_scale, input_zero, bias, input_global_scale)
