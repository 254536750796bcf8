"""The ``quantkit::`` torch.library custom ops.

Each op has one meaning, three implementations:
  - default (CPU and any non-CUDA device): the pure-torch reference in `quantkit.cuda.reference`;
  - CUDA: the Triton kernels in `quantkit.cuda.triton_kernels` (Triton imported on first use);
  - fake (meta): shapes and dtypes only, for torch.compile / export tracing.
Importing this module registers the ops (that is what defining a torch.library op is); it imports
neither Triton nor CUDA.

Ops (shapes: M tokens, K inputs, N outputs, G weight groups):
  quantkit::quantize_int8_dynamic(x [M,K], bits) -> (codes [M,K] int8, scale [M] fp32)
  quantkit::quantize_int8_static(x [M,K], scale [1], zero [1]?, bits) -> codes [M,K] int8
  quantkit::int8_scaled_mm(a [M,K] i8, b [N,K] i8, a_scale [M]|[1], w_scale [G,N], group_size,
                           a_zero [1] i32?, w_zero [N] i32?, w_rowsum [G,N] i32?, bias [N]?, out_dtype) -> [M,N]
  quantkit::weight_only_mm(x [M,K], weight, bits, scale [G,N] f16, zero [G,N]?, group_size, g_idx [K]?,
                           bias [N]?, k) -> [M,N] x.dtype
"""
from typing import Optional

import torch

from quantkit.cuda import reference
from quantkit.errors import QuantkitError
from quantkit.formats.primitives import signed_range


def _triton_kernels():
    try:
        from quantkit.cuda import triton_kernels
    except ImportError as error:
        raise QuantkitError(f"the CUDA kernels need Triton ({error}); "
                            "install it with pip install 'quantkit[kernels]'") from None
    return triton_kernels


@torch.library.custom_op("quantkit::quantize_int8_dynamic", mutates_args=())
def quantize_int8_dynamic(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.quantize_int8_dynamic(x, bits)


@quantize_int8_dynamic.register_kernel("cuda")
def _(x, bits):
    qmin, qmax = signed_range(bits)
    return _triton_kernels().quantize_int8(x, None, None, qmin, qmax)


@quantize_int8_dynamic.register_fake
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("quantkit::quantize_int8_static", mutates_args=())
def quantize_int8_static(x: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    return reference.quantize_int8_static(x, scale, zero, bits)


@quantize_int8_static.register_kernel("cuda")
def _(x, scale, zero, bits):
    qmin, qmax = signed_range(bits)
    return _triton_kernels().quantize_int8(x, scale, zero, qmin, qmax)[0]


@quantize_int8_static.register_fake
def _(x, scale, zero, bits):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op("quantkit::int8_scaled_mm", mutates_args=())
def int8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, group_size: int,
                   a_zero: Optional[torch.Tensor], w_zero: Optional[torch.Tensor], w_rowsum: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    return reference.int8_scaled_mm(a, b, a_scale, w_scale, group_size, a_zero, w_zero, w_rowsum, bias, out_dtype)


@int8_scaled_mm.register_kernel("cuda")
def _(a, b, a_scale, w_scale, group_size, a_zero, w_zero, w_rowsum, bias, out_dtype):
    return _triton_kernels().int8_gemm(a, b, a_scale, w_scale, group_size, a_zero, w_zero, w_rowsum, bias, out_dtype)


@int8_scaled_mm.register_fake
def _(a, b, a_scale, w_scale, group_size, a_zero, w_zero, w_rowsum, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("quantkit::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, weight: torch.Tensor, bits: int, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   group_size: int, g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   k: int) -> torch.Tensor:
    return reference.weight_only_mm(x, weight, bits, scale, zero, group_size, g_idx, bias, k)


@weight_only_mm.register_kernel("cuda")
def _(x, weight, bits, scale, zero, group_size, g_idx, bias, k):
    return _triton_kernels().weight_only_gemm(x, weight, bits, scale, zero, group_size, g_idx, bias, k)


@weight_only_mm.register_fake
def _(x, weight, bits, scale, zero, group_size, g_idx, bias, k):
    return x.new_empty((x.shape[0], weight.shape[1]))
