"""oneDNN's precision for float32 matmuls on the CPU, a setting of the whole process.

The Hessian's x^T x of bf16 values is exact on oneDNN's bf16 path (`bf16_matmuls`), but the setting
applies to every float32 matmul of every thread while it is on. When a block is quantized in a second
thread beside the next block's observation (`quantkit.run.pipeline`, --propagate float), GPTQ's lazy
updates there must stay float32: they run under `fp32_matmuls`, and one lock keeps the two apart. Only
a float32 ``@`` / ``mm`` is affected: Cholesky, triangular solves, ``addr`` and bf16 matmuls are not (checked
on torch 2.13).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# one lock for one process-wide setting (the setting itself is torch's global state, not ours)
_PRECISION = threading.RLock()


def bf16_supported() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU and torch lets float32 matmuls take that path (torch >= 2.9's
    ``mkldnn.matmul.fp32_precision``); an older torch: no."""
    if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextmanager
def bf16_matmuls() -> Iterator[None]:
    """oneDNN multiplies float32 matrices as bf16 with float32 accumulation inside the block (restored after);
    no `fp32_matmuls` block of another thread runs meanwhile."""
    with _PRECISION:
        matmul = torch.backends.mkldnn.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            matmul.fp32_precision = before


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """Float32 matmuls that must be computed in float32: waits for any other thread's `bf16_matmuls` block."""
    with _PRECISION:
        yield
