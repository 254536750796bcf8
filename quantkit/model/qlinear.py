"""`QuantLinear`: a Linear layer that computes exactly what its scheme means.

y = fake_quant(x) @ dequantize(codes, scale, zero)^T + bias, where
  dequantize: w_hat = (code - zero) * scale, per tensor / channel / group (fp32);
  fake_quant (W8A8 schemes): static per-tensor  x_hat = (clamp(round(x/s) + z) - z) * s,
                             dynamic per-token  x_hat = clamp(round(x/s_t)) * s_t, s_t = max|x_t| / 127,
                             dynamic per-token group (FP8 blocks, MXFP4, NVFP4 under its static global
                             scale): `primitives.group_activation_scales`.
The buffers hold the integer codes and parameters themselves, so the module saved and reloaded from
the native format is bit-identical to the one the pipeline built in memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import primitives
from quantkit.formats.numbers import scale_format
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import ActivationSpec, WeightSpec


class QuantLinear(nn.Module):
    def __init__(self, weight: QuantTensor, activation: ActivationSpec | None = None,
                 input_scale: torch.Tensor | None = None, input_zero: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, input_global_scale: torch.Tensor | None = None):
        super().__init__()
        if activation is not None and not activation.dynamic and input_scale is None:
            raise ValueError("a static activation grid needs an input_scale")
        if activation is not None and (activation.second_scale is not None) != (input_global_scale is not None):
            raise ValueError("a two-level activation grid (NVFP4) needs its input_global_scale, and only it")
        self.out_features, self.in_features = weight.shape
        self.weight_spec: WeightSpec = weight.spec
        self.activation_spec = activation
        self.register_buffer("weight_codes", weight.codes)
        self.register_buffer("weight_scale", weight.scale.to(scale_format(weight.spec.scale_format).dtype))
        self.register_buffer("weight_zero", None if weight.zero is None else weight.zero.float())
        self.register_buffer("weight_g_idx", None if weight.g_idx is None else weight.g_idx.to(torch.int32))
        self.register_buffer("weight_global_scale",  # a fused group shares one value, never one tensor
                             None if weight.global_scale is None else weight.global_scale.float().clone())
        for role in ("super_scale", "super_min"):      # K-quants' fp16 super-block scales
            value = getattr(weight, role)
            self.register_buffer(f"weight_{role}", None if value is None else value.to(torch.float16))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.register_buffer("input_zero", None if input_zero is None else input_zero.float().reshape(1))
        self.register_buffer("input_global_scale",
                             None if input_global_scale is None else input_global_scale.float().reshape(1))
        self.register_buffer("bias", bias)
        self._cached_weight: tuple | None = None

    def quant_tensor(self) -> QuantTensor:
        supers = {role: getattr(self, f"weight_{role}") for role in ("super_scale", "super_min")}
        return QuantTensor(self.weight_codes, self.weight_scale.float(), self.weight_zero, self.weight_spec,
                           self.weight_g_idx, self.weight_global_scale,
                           **{role: None if value is None else value.float() for role, value in supers.items()})

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] float32."""
        return self.quant_tensor().dequantize()

    def _weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight in the input dtype, computed once per dtype and device (the codes
        never change after construction; the cache is not part of the state dict)."""
        key = (dtype, self.weight_codes.device)
        if self._cached_weight is None or self._cached_weight[0] != key:
            self._cached_weight = (key, self.dequantized_weight().to(dtype))
        return self._cached_weight[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_spec is None:
            return x
        return primitives.fake_quantize_activation(x, self.activation_spec, self.input_scale, self.input_zero,
                                                   self.input_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight_as(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), weight, bias)

    def extra_repr(self) -> str:
        act = self.activation_spec.describe() if self.activation_spec else "float activations"
        return f"in={self.in_features}, out={self.out_features}, weights {self.weight_spec.describe()}, {act}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted path ``name`` under ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
