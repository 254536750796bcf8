"""Kernels for quantized layers: Triton first, each behind a ``quantkit::`` torch.library op whose
pure-torch reference is what CPU runs and what the kernels are tested against.

Importing this package imports neither Triton nor CUDA; `quantkit.cuda.ops` registers the torch ops
(imported on first GPU use), `quantkit.cuda.triton_kernels` holds the kernels. See docs/kernels.md.
"""
from quantkit.cuda.forward import (
    BACKENDS,
    KernelLinear,
    describe_backend,
    interpreter_error,
    kernel_forward,
    kernel_modules,
    resolve_backend,
    run_operands,
    triton_import_error,
)
from quantkit.cuda.layout import Int8Operands, WeightOnlyOperands, prepare

__all__ = [
    "BACKENDS", "Int8Operands", "KernelLinear", "WeightOnlyOperands", "describe_backend", "interpreter_error",
    "kernel_forward", "kernel_modules", "prepare", "resolve_backend", "run_operands", "triton_import_error",
]
