"""torch's own fp8 GEMM (``torch._scaled_mm``: cuBLASLt on Hopper/Ada/Blackwell, a CPU fallback elsewhere)
behind the fp8 layers' kernel op, with the operand conventions of `reference.fp8_scaled_mm`.

cuBLASLt's row-wise scaled fp8 GEMM wants: A [M, K] row-major and B [K, N] column-major (our [N, K]
codes transposed, a view), K and N multiples of 16, scales as [M, 1] and [1, N] float32 (a per-tensor
scale is broadcast to rows), and a bfloat16 output; the bias is added afterwards in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN = 16


def fp8_scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y[m, n] = a_scale[m] * w_scale[n] * sum_k a[m,k] b[n,k] + bias[n] -> [M, N] out_dtype.

    a [M, K] float8_e4m3fn, b [N, K] float8_e4m3fn, a_scale [M] or [1], w_scale [N] or [1] float32.
    K and N are zero-padded to multiples of 16 (zero codes add nothing), the output sliced back."""
    m, k = a.shape
    n = b.shape[0]
    pad_k, pad_n = -k % ALIGN, -n % ALIGN
    if pad_k or pad_n:
        # pad in a float dtype (fp8 tensors have no pad kernel), then back: zeros stay exact
        a = F.pad(a.to(torch.bfloat16), (0, pad_k)).to(torch.float8_e4m3fn)
        b = F.pad(b.to(torch.bfloat16), (0, pad_k, 0, pad_n)).to(torch.float8_e4m3fn)
    scale_a = a_scale.float().reshape(-1, 1).expand(m, 1).contiguous()
    scale_b = F.pad(w_scale.float().reshape(1, -1).expand(1, n), (0, pad_n), value=1.0).contiguous()
    result_dtype = torch.bfloat16 if a.is_cuda else torch.float32     # row-wise scaling on CUDA: bf16 out
    y = torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=scale_a, scale_b=scale_b,
                         out_dtype=result_dtype)[:, :n].float()
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)
