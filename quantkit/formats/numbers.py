"""Number formats as data: the element formats codes are drawn from and the formats scales are stored in.

An element format is its value grid and its round-to-nearest:
  int{b}  / uint{b}  two's-complement / unsigned integers of b = 2..8 bits: grid qmin..qmax;
  fp8_e4m3           OCP FP8 E4M3 ("e4m3fn": bias 7, no infinities, S.1111.111 is NaN): max 448;
  fp8_e5m2           OCP FP8 E5M2 (bias 15, IEEE-style infinities and NaNs): max 57344;
  fp4_e2m1           OCP MX FP4 (bias 1, no infinities or NaNs): +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
A float grid with e exponent bits, m mantissa bits and bias B holds the subnormals k/2^m * 2^(1-B)
(k = 1..2^m-1) and the normals (1 + k/2^m) * 2^(E-B), E = 1..E_max, both signs and zero.
Rounding is to the nearest grid value, ties to the even code (even mantissa, even integer), after
saturating at the largest finite value (the convention of quantizers, not of IEEE overflow).

A scale format is how a scale is stored: fp32, fp16, bf16 (rounded by a cast), fp8_e4m3 (the grid
above, NVFP4's per-block scales) or e8m0 (MX: a bare power of two 2^E, E in [-127, 127]; rounded up,
so that a scaled block never exceeds its element grid).

Integer grids are what quantkit's pipeline quantizes to today: a `QuantTensor`'s codes are the
signed integer grid values (int8 storage). Float element formats are registered here with their
grids so that the formats that use them (FP8, MXFP4, NVFP4) are data, not code.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class ElementFormat:
    """A code's value grid. ``grid``: every finite representable value, ascending (float64 exact)."""

    name: str
    kind: Literal["int", "float"]
    bits: int
    grid: tuple[float, ...] = field(repr=False)

    @property
    def max(self) -> float:
        return self.grid[-1]

    @property
    def min(self) -> float:
        return self.grid[0]

    @property
    def mantissa_bits(self) -> int:
        """m of a float grid: the binade [1, 2) holds 2^m values (0 for integer grids)."""
        if self.kind == "int":
            return 0
        return (sum(1 for v in self.grid if 1.0 <= v < 2.0)).bit_length() - 1

    def values(self) -> torch.Tensor:
        """The grid as a [len(grid)] float32 tensor (every value is exact in fp32)."""
        return torch.tensor(self.grid, dtype=torch.float32)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to the nearest grid value (ties to even, saturating), in x's float dtype."""
        if self.kind == "int":
            return torch.round(x).clamp_(self.min, self.max)
        native = _NATIVE_DTYPES.get(self.name)
        if native is not None:  # torch's cast rounds to nearest, ties to even; saturate first (a cast gives NaN)
            return x.clamp(self.min, self.max).to(native).to(x.dtype)
        if self.name == "fp4_e2m1":
            return _round_fp4_e2m1(x)
        return self.round_on_grid(x)

    def round_on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """`round` computed from the grid values alone (the reference the native casts are tested against)."""
        if self.kind == "int":
            return torch.round(x).clamp_(self.min, self.max)
        magnitudes = _magnitudes(self.grid)
        a = x.double().abs().clamp(max=magnitudes[-1].item())
        upper = torch.searchsorted(magnitudes, a).clamp_(max=len(magnitudes) - 1)
        lower = (upper - 1).clamp_(min=0)
        below, above = a - magnitudes[lower], magnitudes[upper] - a
        # magnitude index parity is mantissa parity: code 0 is zero, and every binade has 2^m codes
        take_upper = (above < below) | ((above == below) & (upper % 2 == 0))
        rounded = magnitudes[torch.where(take_upper, upper, lower)]
        return (torch.sign(x.double()) * rounded).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _magnitudes(grid: tuple[float, ...]) -> torch.Tensor:
    """The grid's non-negative values as float64 (built once per grid: GPTQ rounds column by column)."""
    return torch.tensor([v for v in grid if v >= 0], dtype=torch.float64)


def _round_fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """`ElementFormat.round` onto fp4 e2m1 in three uniform pieces: step 0.5 on [0, 2), 1 on [2, 4), 2 on
    [4, 6]. Within each piece the code's parity is that of the value divided by the step, so
    round-half-to-even of a / step is ties-to-even on the grid (scaling by 2 is exact in float)."""
    a = x.abs().clamp(max=6.0)
    rounded = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(rounded, x)


# Float grids torch holds natively: the same values, rounding done by the dtype cast (fast).
_NATIVE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _int_format(bits: int, signed: bool) -> ElementFormat:
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return ElementFormat(f"{'int' if signed else 'uint'}{bits}", "int", bits, tuple(float(v) for v in range(low, high + 1)))


def _float_format(name: str, exponent_bits: int, mantissa_bits: int, bias: int, top: Literal["ieee", "fn", "none"]
                  ) -> ElementFormat:
    """top: "ieee" reserves the top exponent for inf/NaN, "fn" only its all-ones mantissa for NaN,
    "none" reserves nothing (FP4)."""
    steps = 1 << mantissa_bits
    top_exponent = (1 << exponent_bits) - 1
    positive = [k / steps * 2.0 ** (1 - bias) for k in range(1, steps)]
    for exponent in range(1, top_exponent + 1):
        for k in range(steps):
            if top == "ieee" and exponent == top_exponent:
                continue
            if top == "fn" and exponent == top_exponent and k == steps - 1:
                continue
            positive.append((1 + k / steps) * 2.0 ** (exponent - bias))
    grid = tuple(sorted({-v for v in positive} | {0.0} | set(positive)))
    return ElementFormat(name, "float", 1 + exponent_bits + mantissa_bits, grid)


ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f for f in (
        *(_int_format(bits, True) for bits in range(2, 9)),
        *(_int_format(bits, False) for bits in range(2, 9)),
        _float_format("fp8_e4m3", 4, 3, 7, "fn"),
        _float_format("fp8_e5m2", 5, 2, 15, "ieee"),
        _float_format("fp4_e2m1", 2, 1, 1, "none"),
    )
}


@dataclass(frozen=True)
class ScaleFormat:
    """How a scale is stored, and its rounding to that storage."""

    name: str
    bits: int

    @property
    def dtype(self) -> torch.dtype:
        """The tensor dtype scales of this format are stored in (exactly)."""
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp8_e4m3": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu}[self.name]

    @property
    def smallest(self) -> float:
        """The smallest positive storable scale (the floor weight scales are clamped to; fp8 e4m3: its
        smallest subnormal, 2^-9, which NVFP4 group scales of near-zero groups may take)."""
        return {"fp32": torch.finfo(torch.float32).tiny, "fp16": 2.0**-14, "bf16": torch.finfo(torch.bfloat16).tiny,
                "fp8_e4m3": 2.0**-9, "e8m0": 2.0**-127}[self.name]

    def round(self, scale: torch.Tensor) -> torch.Tensor:
        """Positive scales [any shape] float32 -> the nearest storable value (e8m0: the power of two at
        or above), as float32."""
        scale = scale.float()
        if self.name == "fp32":
            return scale.clone()
        if self.name in _CAST_DTYPES:
            return scale.to(_CAST_DTYPES[self.name]).float()
        if self.name == "fp8_e4m3":
            return ELEMENT_FORMATS["fp8_e4m3"].round(scale)
        exponent = torch.ceil(torch.log2(scale.clamp(min=2.0**-127))).clamp_(-127, 127)
        return torch.exp2(exponent)


_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCALE_FORMATS: dict[str, ScaleFormat] = {
    s.name: s for s in (ScaleFormat("fp32", 32), ScaleFormat("fp16", 16), ScaleFormat("bf16", 16),
                        ScaleFormat("fp8_e4m3", 8), ScaleFormat("e8m0", 8))
}


def _lookup(table: dict, name: str, what: str):
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, table, n=2, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(table)}"
    raise QuantkitError(f"unknown {what} '{name}'{hint}")


def element_format(name: str) -> ElementFormat:
    return _lookup(ELEMENT_FORMATS, name, "element format")


def scale_format(name: str) -> ScaleFormat:
    return _lookup(SCALE_FORMATS, name, "scale format")


def signed_int(bits: int) -> ElementFormat:
    """The two's-complement grid of ``bits`` bits (what integer weight and activation codes are)."""
    return element_format(f"int{bits}")

