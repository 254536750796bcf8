"""Running a QuantLinear through the kernels: backends, `kernel_forward`, `KernelLinear`.

Backends:
  triton       the compiled Triton kernels, through the torch.ops.quantkit ops (CUDA tensors)
  interpreter  the same Triton kernel source run by Triton's CPU interpreter (CPU tensors; slow,
               for tests and for validating on machines without a GPU)
  reference    the pure-torch references (any device)
  auto         triton for CUDA tensors when Triton is installed, else reference

`QuantLinear.forward` (the fake-quant reference) is untouched: kernels run only when asked for, via
`kernel_forward(layer, x)` or by swapping `KernelLinear` modules in with `kernel_modules(model)`.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quantkit.cuda import layout, reference, scaled_mm
from quantkit.errors import QuantkitError, first_line
from quantkit.formats import primitives
from quantkit.formats.primitives import signed_range
from quantkit.model.qlinear import QuantLinear, set_submodule

BACKENDS = ("auto", "triton", "interpreter", "reference")


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising anything
        return f"{type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=1)
def interpreter_error() -> str | None:
    """None when Triton's CPU interpreter runs our kernels here, else why not. The interpreter needs
    TRITON_INTERPRET=1 in the environment before Triton is imported (Triton's own jit helpers are
    built at import); a tiny probe launch also catches triton < 3.8, whose interpreter fails on
    loops with run-time bounds under numpy >= 2.4."""
    reason = triton_import_error()
    if reason is not None:
        return f"Triton is not installed ({reason})"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "set TRITON_INTERPRET=1 in the environment before Triton is imported"
    from quantkit.cuda import triton_kernels

    x = torch.linspace(-3.0, 3.0, 40).reshape(2, 20)
    try:
        codes, _ = triton_kernels.quantize_int8(x, None, None, -128, 127, interpret=True)
    except Exception as error:
        import numpy
        import triton

        return (f"the Triton {triton.__version__} interpreter fails here with numpy {numpy.__version__} "
                f"({first_line(error)}); triton >= 3.8 works")
    if not torch.equal(codes, reference.quantize_int8_dynamic(x, 8)[0]):
        return "the Triton interpreter probe returned wrong codes"
    return None


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``; an impossible choice is a clear error."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise QuantkitError(f"unknown kernel backend '{name}'; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_import_error() is None else "reference"
    if name == "triton":
        if device.type != "cuda":
            raise QuantkitError("backend 'triton' needs a CUDA device; "
                                "use 'interpreter' to run the Triton kernels on CPU")
        if triton_import_error() is not None:
            raise QuantkitError(f"backend 'triton' needs Triton: {triton_import_error()}; "
                                "pip install 'quantkit[kernels]'")
    if name == "interpreter":
        if device.type != "cpu":
            raise QuantkitError("backend 'interpreter' runs on CPU tensors; use 'triton' on a GPU")
        if interpreter_error() is not None:
            raise QuantkitError(f"backend 'interpreter' is unavailable: {interpreter_error()}")
    return name


def describe_backend(backend: str, device: torch.device) -> str:
    device = torch.device(device)
    if backend == "triton":
        return f"Triton kernels compiled for {torch.cuda.get_device_name(device)}"
    if backend == "interpreter":
        import triton

        return f"Triton {triton.__version__} kernels in the CPU interpreter (TRITON_INTERPRET semantics)"
    return f"pure-torch reference ops on {device.type}"


class ReferenceOps:
    """The four kernel operations as pure-torch references (any device)."""

    def quantize_dynamic(self, x, bits):
        return reference.quantize_int8_dynamic(x, bits)

    def quantize_static(self, x, scale, zero, bits):
        return reference.quantize_int8_static(x, scale, zero, bits)

    def int8_mm(self, *args):
        return reference.int8_scaled_mm(*args)

    def weight_only_mm(self, *args):
        return reference.weight_only_mm(*args)

    def fp8_mm(self, *args):
        return reference.fp8_scaled_mm(*args)


class InterpreterOps:
    """The Triton kernels run by Triton's CPU interpreter (Triton imported on first use)."""

    def __init__(self):
        from quantkit.cuda import triton_kernels

        self.kernels = triton_kernels

    def quantize_dynamic(self, x, bits):
        return self.kernels.quantize_int8(x, None, None, *signed_range(bits), interpret=True)

    def quantize_static(self, x, scale, zero, bits):
        return self.kernels.quantize_int8(x, scale, zero, *signed_range(bits), interpret=True)[0]

    def int8_mm(self, *args):
        return self.kernels.int8_gemm(*args, interpret=True)

    def weight_only_mm(self, *args):
        return self.kernels.weight_only_gemm(*args, interpret=True)

    def fp8_mm(self, *args):     # no Triton fp8 GEMM: the interpreter has nothing of ours to run
        return reference.fp8_scaled_mm(*args)


class TritonOps:
    """The compiled Triton kernels behind the ``torch.ops.quantkit`` ops (registered on first use)."""

    def __init__(self):
        import quantkit.cuda.ops  # noqa: F401  (registers torch.ops.quantkit)

    def quantize_dynamic(self, x, bits):
        return torch.ops.quantkit.quantize_int8_dynamic(x, bits)

    def quantize_static(self, x, scale, zero, bits):
        return torch.ops.quantkit.quantize_int8_static(x, scale, zero, bits)

    def int8_mm(self, *args):
        return torch.ops.quantkit.int8_scaled_mm(*args)

    def weight_only_mm(self, *args):
        return torch.ops.quantkit.weight_only_mm(*args)

    def fp8_mm(self, *args):     # torch's cuBLASLt fp8 GEMM
        return scaled_mm.fp8_scaled_mm(*args)


_OPS = {"reference": ReferenceOps, "interpreter": InterpreterOps, "triton": TritonOps}


def _ops(backend: str):
    return _OPS[backend]()


def run_operands(operands: layout.Operands, x: torch.Tensor, backend: str) -> torch.Tensor:
    """y = layer(x) through the kernels of ``backend`` (concrete, see `resolve_backend`): x [..., K] -> [..., N]."""
    ops = _ops(backend)
    n, k = operands.shape
    if x.shape[-1] != k:
        raise QuantkitError(f"input has {x.shape[-1]} features, the layer expects {k}")
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if isinstance(operands, layout.GroupScaledOperands):
        # microscaled grids: the CPU reference on every backend (no fp4/block-fp8 kernel is wired yet)
        activation, a_scale, a = operands.activation, None, x2d
        if activation is not None:
            groups, a_scale = primitives.group_activation_scales(x2d, activation, operands.input_global_scale)
            a = activation.element.round(groups / a_scale).reshape(x2d.shape[0], -1)[:, :k]
            a_scale = a_scale.squeeze(-1)
        y = reference.group_scaled_mm(a, a_scale, operands.codes, operands.scale, operands.group_size,
                                      operands.bias, x.dtype)
    elif isinstance(operands, layout.Fp8Operands):
        # fp8 layers: activations to fp8 codes (torch), then the scaled product: torch._scaled_mm on the
        # GPU backend, the float64 reference elsewhere
        activation = operands.activation
        if activation.dynamic:
            codes, a_scale = primitives.quantize_activation_per_token(x2d, activation.element)
        else:
            codes = primitives.quantize_activation_static(x2d, operands.input_scale, None, activation.element)
            a_scale = operands.input_scale
        y = ops.fp8_mm(codes, operands.codes, a_scale.reshape(-1), operands.scale, operands.bias, x.dtype)
    elif isinstance(operands, layout.WeightOnlyOperands) and operands.weight.dtype == torch.float8_e4m3fn:
        # fp8 weight-only: the torch reference on every backend (no fp8-dequantizing kernel yet)
        y = reference.weight_only_mm(x2d, operands.weight, operands.bits, operands.scale, operands.zero,
                                     operands.group_size, operands.g_idx, operands.bias, k)
    elif isinstance(operands, layout.WeightOnlyOperands):
        y = ops.weight_only_mm(x2d, operands.weight, operands.bits, operands.scale, operands.zero,
                               operands.group_size, operands.g_idx, operands.bias, k)
    else:
        bits = operands.activation_bits
        if operands.dynamic:
            codes, a_scale = ops.quantize_dynamic(x2d, bits)
        else:
            codes = ops.quantize_static(x2d, operands.input_scale, operands.input_zero, bits)
            a_scale = operands.input_scale
        a_zero = None if operands.input_zero is None else operands.input_zero.to(torch.int32)
        y = ops.int8_mm(codes, operands.codes, a_scale, operands.scale, operands.group_size, a_zero, operands.zero,
                        operands.rowsum, operands.bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


class KernelLinear(nn.Module):
    """A QuantLinear's prepared kernel operands plus the backend that runs them. Prepare it on the
    device it will run on (it keeps plain tensors, not buffers: `.to()` does not move it)."""

    def __init__(self, layer: QuantLinear, name: str = "", backend: str = "auto"):
        super().__init__()
        self.name = name
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.operands = layout.prepare(layer, name)
        self.backend = resolve_backend(backend, layer.weight_codes.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_operands(self.operands, x, self.backend)

    def extra_repr(self) -> str:
        return f"{self.name or 'layer'}: in={self.in_features}, out={self.out_features}, backend={self.backend}"


def kernel_forward(layer: QuantLinear | KernelLinear, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``layer(x)`` through the kernels. A QuantLinear is prepared on every call (repacking): for
    repeated use build a `KernelLinear` once, or use `kernel_modules`."""
    if isinstance(layer, KernelLinear):
        return layer(x)
    return run_operands(layout.prepare(layer), x, resolve_backend(backend, x.device))


@contextmanager
def kernel_modules(model: nn.Module, backend: str = "auto",
                   prepared: dict[str, KernelLinear] | None = None) -> Iterator[dict[str, KernelLinear]]:
    """Swap every QuantLinear of ``model`` for a KernelLinear (``prepared`` ones are reused by name)
    while the body runs; they are always swapped back."""
    originals = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    prepared = prepared or {}
    swapped = {}
    try:
        for name, module in originals.items():
            swapped[name] = prepared.get(name) or KernelLinear(module, name, backend)
            set_submodule(model, name, swapped[name])
        yield swapped
    finally:
        for name in swapped:
            set_submodule(model, name, originals[name])
