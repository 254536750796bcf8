"""Quantization schemes: what a layer's weights and input activations become.

A scheme is data, not code: `WeightSpec` (bits, granularity, symmetry) and `ActivationSpec`
(bits, per-tensor static or per-token dynamic, symmetry). Algorithms decide *how* codes are found;
the scheme says *what* the codes mean.

The three ``smq_q8i8f16_*`` schemes are mlc-llm's SmoothQuant schemes (PR #855), exactly:
  _0: int8 per-tensor symmetric activations, int8 per-tensor symmetric weights
  _1: int8 per-tensor symmetric activations, int8 per-channel symmetric weights
  _2: int8 per-tensor asymmetric activations, int8 per-channel asymmetric weights
Activation scales of these are static (from calibration).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Literal

from quantkit.errors import QuantkitError
from quantkit.formats.numbers import (
    ElementFormat,
    element_format,
    scale_format,
    signed_int,
)

WeightGranularity = Literal["tensor", "channel", "group", "block"]
ActivationGranularity = Literal["tensor", "token"]


@dataclass(frozen=True)
class WeightSpec:
    """Integer weight grid: ``w ~ (code - zero) * scale``, codes from the element format ``int{bits}``
    (signed, [-2^(b-1), 2^(b-1)-1]), scales stored in ``scale_format`` (formats/numbers.py).

    granularity: one scale for the tensor, per output channel, per group of ``group_size``
    consecutive input channels within each output channel (the last group may be shorter), or per
    2-D ``block_shape`` = (rows, columns) tile (DeepSeek-style FP8 blocks).
    second_scale: the scale format of a per-tensor scale over the block scales (NVFP4: fp32 over fp8
    block scales), or None.
    The integer pipeline produces fp16 scales per tensor, channel or group; the other fields name
    what the floating-point formats (FP8, MXFP4, NVFP4) will use and are refused until they exist.
    """

    bits: int
    granularity: WeightGranularity
    symmetric: bool
    group_size: int | None = None
    scale_format: str = "fp16"
    block_shape: tuple[int, int] | None = None
    second_scale: str | None = None
    format: str = "int"        # the element grid: "int" (int{bits}) or a float element format (fp8_e4m3)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QuantkitError(f"weight bits must be between 2 and 8, got {self.bits}")
        scale_format(self.scale_format)  # an unknown name stops here
        if self.second_scale is not None:
            scale_format(self.second_scale)
        _check_element(self.format, self.bits, self.symmetric, "weight")
        floating = self.format != "int"
        unsupported = [what for what, used in (
            (f"scale format {self.scale_format}", self.scale_format not in (("fp32",) if floating else ("fp16",))),
            ("2-D block scales", self.granularity == "block" or self.block_shape is not None),
            (f"a second-level {self.second_scale} scale", self.second_scale is not None)) if used]
        if unsupported:
            raise QuantkitError(f"weight grids have fp16 (integer) or fp32 (fp8) scales per tensor, channel or "
                                f"group; {unsupported[0]} comes with the MX/NV formats")
        if (self.granularity == "group") != (self.group_size is not None):
            raise QuantkitError("group_size is set exactly when granularity is 'group'")
        if self.group_size is not None and self.group_size < 1:
            raise QuantkitError(f"group size must be positive, got {self.group_size}")

    @property
    def element(self) -> ElementFormat:
        return signed_int(self.bits) if self.format == "int" else element_format(self.format)

    def describe(self) -> str:
        grain = f"g{self.group_size}" if self.granularity == "group" else f"per-{self.granularity}"
        if self.format != "int":
            return f"{self.format} {grain}"
        return f"int{self.bits} {grain} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class ActivationSpec:
    """Input-activation grid. ``tensor`` is static (scale from calibration); ``token`` is dynamic."""

    bits: int
    granularity: ActivationGranularity
    symmetric: bool
    format: str = "int"        # "int" (int{bits}) or a float element format (fp8_e4m3)

    def __post_init__(self) -> None:
        _check_element(self.format, self.bits, self.symmetric, "activation")

    @property
    def dynamic(self) -> bool:
        return self.granularity == "token"

    @property
    def element(self) -> ElementFormat:
        return signed_int(self.bits) if self.format == "int" else element_format(self.format)

    def describe(self) -> str:
        kind = "dynamic per-token" if self.dynamic else "static per-tensor"
        if self.format != "int":
            return f"{self.format} {kind}"
        return f"int{self.bits} {kind} {'sym' if self.symmetric else 'asym'}"


# Float element formats the pipeline quantizes to (FP4 comes with its MX/NV block scales).
FLOAT_ELEMENTS = ("fp8_e4m3",)


def _check_element(name: str, bits: int, symmetric: bool, what: str) -> None:
    """A float grid is symmetric by construction and has its own width."""
    if name == "int":
        return
    if name not in FLOAT_ELEMENTS:
        element_format(name)   # an unknown name gets the suggestion
        raise QuantkitError(f"{what} format {name} is not supported yet; supported: int, {', '.join(FLOAT_ELEMENTS)}")
    if not symmetric or bits != element_format(name).bits:
        raise QuantkitError(f"{what} format {name} is {element_format(name).bits}-bit and symmetric")


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str
    weight: WeightSpec
    activation: ActivationSpec | None = None

    def with_weight(self, **changes) -> "Scheme":
        """The same scheme with weight grid fields replaced (from --bits/--group-size/--sym)."""
        return dataclasses.replace(self, weight=dataclasses.replace(self.weight, **changes))

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float activations"
        return f"weights {self.weight.describe()}, {act}"


_A8_TENSOR_SYM = ActivationSpec(8, "tensor", symmetric=True)
_A8_TENSOR_ASYM = ActivationSpec(8, "tensor", symmetric=False)
_A8_TOKEN_SYM = ActivationSpec(8, "token", symmetric=True)
_FP8_CHANNEL = WeightSpec(8, "channel", True, scale_format="fp32", format="fp8_e4m3")

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("smq_q8i8f16_0", "mlc-llm SmoothQuant: int8 per-tensor sym weights, static per-tensor sym int8 activations",
               WeightSpec(8, "tensor", True), _A8_TENSOR_SYM),
        Scheme("smq_q8i8f16_1", "mlc-llm SmoothQuant: int8 per-channel sym weights, static per-tensor sym int8 activations",
               WeightSpec(8, "channel", True), _A8_TENSOR_SYM),
        Scheme("smq_q8i8f16_2", "mlc-llm SmoothQuant: int8 per-channel asym weights, static per-tensor asym int8 activations",
               WeightSpec(8, "channel", False), _A8_TENSOR_ASYM),
        Scheme("w8a8_dynamic", "vLLM W8A8: int8 per-channel sym weights, dynamic per-token sym int8 activations",
               WeightSpec(8, "channel", True), _A8_TOKEN_SYM),
        Scheme("w8a16", "weight-only int8 per-channel sym; activations stay float",
               WeightSpec(8, "channel", True)),
        Scheme("w4a16", "weight-only int4 group-128 asym (AWQ/GPTQ style); activations stay float",
               WeightSpec(4, "group", False, 128)),
        Scheme("w4a8", "int4 group-128 sym weights, dynamic per-token sym int8 activations",
               WeightSpec(4, "group", True, 128), _A8_TOKEN_SYM),
        Scheme("fp8_dynamic", "FP8 (vLLM/llm-compressor FP8_DYNAMIC): fp8 e4m3 per-channel weights with fp32 scales, "
               "dynamic per-token fp8 e4m3 activations", _FP8_CHANNEL, ActivationSpec(8, "token", True, "fp8_e4m3")),
        Scheme("fp8_static", "FP8 per-tensor: fp8 e4m3 weights with one fp32 scale, static per-tensor fp8 e4m3 "
               "activations from calibration", WeightSpec(8, "tensor", True, scale_format="fp32", format="fp8_e4m3"),
               ActivationSpec(8, "tensor", True, "fp8_e4m3")),
        Scheme("w8a16_fp8", "weight-only fp8 e4m3 per-channel (fp32 scales); activations stay float", _FP8_CHANNEL),
    )
}


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``; an unknown name suggests the closest ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        close = difflib.get_close_matches(name, SCHEMES, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(SCHEMES)}"
        raise QuantkitError(f"unknown scheme '{name}'{hint}") from None


def scheme_to_dict(scheme: Scheme) -> dict:
    """JSON form of a scheme; fields at their defaults that older manifests lack (`_WEIGHT_DEFAULTS`)
    are left out, so the integer schemes' records are unchanged."""
    data = dataclasses.asdict(scheme)
    for name, default in _WEIGHT_DEFAULTS.items():
        if data["weight"].get(name, default) == default:
            data["weight"].pop(name, None)
    if data["activation"] is not None and data["activation"]["format"] == "int":
        data["activation"].pop("format")
    return data


# Fields newer than the first manifests, left out of a scheme's record at their defaults.
_WEIGHT_DEFAULTS = {"scale_format": "fp16", "block_shape": None, "second_scale": None, "format": "int"}


def scheme_from_dict(data: dict) -> Scheme:
    act = data.get("activation")
    return Scheme(
        name=data["name"],
        summary=data.get("summary", ""),
        weight=WeightSpec(**data["weight"]),
        activation=ActivationSpec(**act) if act else None,
    )
