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
from quantkit.formats import ggml_blocks, ggml_mixes, kquants
from quantkit.formats.numbers import (
    ElementFormat,
    element_format,
    scale_format,
    signed_int,
)

WeightGranularity = Literal["tensor", "channel", "group", "block"]
ActivationGranularity = Literal["tensor", "token", "group"]


@dataclass(frozen=True)
class WeightSpec:
    """Weight grid: ``w ~ (code - zero) * scale`` (``code * scale / global_scale`` with a second-level
    scale), codes from the element format: ``int{bits}`` (signed, [-2^(b-1), 2^(b-1)-1]) or a float
    grid (``format``: fp8_e4m3, fp4_e2m1), scales stored in ``scale_format`` (formats/numbers.py).

    granularity: one scale for the tensor, per output channel, per group of ``group_size``
    consecutive input channels within each output channel (the last group may be shorter), or per
    2-D ``block_shape`` = (rows, columns) tile (DeepSeek-V3 FP8 blocks; edge tiles may be smaller).
    second_scale: the scale format of one per-tensor "global" scale G over the group scales (NVFP4:
    fp32 over fp8 e4m3 group scales; the group's effective scale is s / G), or None.
    The combinations that exist (`_GRIDS`): integers with fp16 scales per tensor, channel or group;
    fp8 e4m3 with fp32 scales per tensor, channel, group or block; fp4 e2m1 in groups with e8m0
    scales (MXFP4) or fp8 e4m3 scales under an fp32 global scale (NVFP4).
    super_group: llama.cpp's K-quants (Q2_K ... Q6_K, `kquants`): int{bits} codes in groups (sub-blocks)
    of 16 or 32 with small integer scales (and integer mins for the asymmetric types) under one fp16
    scale (and fp16 min scale) per super-block of 256 columns:
      w = (d * sc) * code                      (Q3_K, Q6_K: symmetric)
      w = (d * sc) * (code + 2^(bits-1)) - (dmin * m)   (Q2_K, Q4_K, Q5_K)
    """

    bits: int
    granularity: WeightGranularity
    symmetric: bool
    group_size: int | None = None
    scale_format: str = "fp16"
    block_shape: tuple[int, int] | None = None
    second_scale: str | None = None
    format: str = "int"        # the element grid: "int" (int{bits}) or a float element format
    super_group: int | None = None   # llama.cpp K-quants: integer group scales under fp16 super-block scales

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QuantkitError(f"weight bits must be between 2 and 8, got {self.bits}")
        if self.super_group is not None:
            self._check_k_grid()
            return
        scale_format(self.scale_format)  # an unknown name stops here
        if self.second_scale is not None:
            scale_format(self.second_scale)
        _check_element(self.format, self.bits, self.symmetric, "weight")
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape", tuple(int(n) for n in self.block_shape))
        grid = (self.format, self.scale_format, self.second_scale)
        if grid not in _GRIDS or self.granularity not in _GRIDS[grid]:
            raise QuantkitError(f"no weight grid has {self.format} codes with {self.scale_format} scales per "
                                f"{self.granularity}" + (f" under a {self.second_scale} global scale"
                                                         if self.second_scale else "") + f"; {_GRID_LIST}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise QuantkitError("group_size is set exactly when granularity is 'group'")
        if (self.granularity == "block") != (self.block_shape is not None):
            raise QuantkitError("block_shape is set exactly when granularity is 'block'")
        sizes = [self.group_size] if self.group_size is not None else list(self.block_shape or ())
        if any(size < 1 for size in sizes) or (self.block_shape is not None and len(self.block_shape) != 2):
            raise QuantkitError(f"group and block sizes must be positive (a block is rows x columns), got {sizes}")

    def _check_k_grid(self) -> None:
        fmt = kquants.format_of(self.bits, self.symmetric, self.group_size or 0)
        if (self.super_group != kquants.SUPER or fmt is None or self.granularity != "group" or self.format != "int"
                or self.scale_format != "fp16" or self.second_scale is not None or self.block_shape is not None):
            grids = ", ".join(f"{name} (int{b} g{sub} {'sym' if sym else 'asym'})"
                              for name, (b, sym, sub) in ((f.name, kquants.grid_of(f)) for f in kquants.K_FORMATS.values()))
            raise QuantkitError(f"no K-quant grid has int{self.bits} {'sym' if self.symmetric else 'asym'} codes in "
                                f"groups of {self.group_size} under super-blocks of {self.super_group}; the K grids "
                                f"(super-blocks of {kquants.SUPER}, fp16 super-block scales) are: {grids}")

    @property
    def k_format(self) -> kquants.KFormat | None:
        """The llama.cpp K-quant type this grid is (`quantkit.formats.kquants`), or None."""
        return None if self.super_group is None else kquants.format_of(self.bits, self.symmetric, self.group_size)

    @property
    def element(self) -> ElementFormat:
        return signed_int(self.bits) if self.format == "int" else element_format(self.format)

    def describe(self) -> str:
        if self.k_format is not None:
            scales = {"Q2_K": "4-bit scales and mins", "Q6_K": "int8 scales", "Q3_K": "6-bit scales"}.get(
                self.k_format.name, "6-bit scales and mins")
            return f"{self.k_format.name} (int{self.bits} g{self.group_size}, {scales} x fp16 per {self.super_group})"
        grain = {"group": f"g{self.group_size}", "block": "block{}x{}".format(*(self.block_shape or (0, 0)))
                 }.get(self.granularity, f"per-{self.granularity}")
        return _describe_grid(self, grain, "")


# (element, scale format, second-level scale) -> the granularities that exist.
_GRIDS: dict[tuple[str, str, str | None], tuple[str, ...]] = {
    ("int", "fp16", None): ("tensor", "channel", "group"),
    ("fp8_e4m3", "fp32", None): ("tensor", "channel", "group", "block"),
    ("fp4_e2m1", "e8m0", None): ("group",),                      # MXFP4 (OCP MX)
    ("fp4_e2m1", "fp8_e4m3", "fp32"): ("group",),                # NVFP4
}
_GRID_LIST = ("the grids are: int codes with fp16 scales per tensor/channel/group; fp8_e4m3 with fp32 scales "
              "per tensor/channel/group/block; fp4_e2m1 groups with e8m0 scales (MX) or fp8_e4m3 scales under "
              "an fp32 global scale (NV)")


@dataclass(frozen=True)
class ActivationSpec:
    """Input-activation grid. ``tensor`` is static (scale from calibration); ``token`` is dynamic per
    token; ``group`` is dynamic per token and per ``group_size`` consecutive input channels, with
    scales in ``scale_format`` (fp32; e8m0 for MX; fp8 e4m3 under a static fp32 global scale from
    calibration for NV, ``second_scale``)."""

    bits: int
    granularity: ActivationGranularity
    symmetric: bool
    format: str = "int"        # "int" (int{bits}) or a float element format (fp8_e4m3, fp4_e2m1)
    group_size: int | None = None
    scale_format: str = "fp32"
    second_scale: str | None = None

    def __post_init__(self) -> None:
        _check_element(self.format, self.bits, self.symmetric, "activation")
        grid = (self.format, self.scale_format, self.second_scale)
        if grid not in _ACTIVATION_GRIDS or self.granularity not in _ACTIVATION_GRIDS[grid]:
            raise QuantkitError(f"no activation grid has {self.format} codes with {self.scale_format} scales per "
                                f"{self.granularity}; the grids are: int or fp8_e4m3 per tensor/token (fp32 "
                                "scales), fp8_e4m3 per token group, fp4_e2m1 per token group (MX: e8m0 scales; "
                                "NV: fp8_e4m3 scales under an fp32 global)")
        if (self.granularity == "group") != (self.group_size is not None) or (self.group_size or 1) < 1:
            raise QuantkitError("an activation group_size (positive) is set exactly when granularity is 'group'")

    @property
    def dynamic(self) -> bool:
        """Scales computed from each input at run time (per token, or per token and group)."""
        return self.granularity != "tensor"

    @property
    def calibrated(self) -> bool:
        """Something comes from calibration: the static scale, or NV's global scale."""
        return not self.dynamic or self.second_scale is not None

    @property
    def element(self) -> ElementFormat:
        return signed_int(self.bits) if self.format == "int" else element_format(self.format)

    def describe(self) -> str:
        kind = {"tensor": "static per-tensor", "token": "dynamic per-token",
                "group": f"dynamic per-token g{self.group_size}"}[self.granularity]
        return _describe_grid(self, kind, "static ")


def _describe_grid(spec: WeightSpec | ActivationSpec, grain: str, global_kind: str) -> str:
    """"int4 g128 asym", "fp8_e4m3 per-channel", "fp4_e2m1 g16 fp8_e4m3 scales x fp32 global"."""
    if spec.format == "int":
        return f"int{spec.bits} {grain} {'sym' if spec.symmetric else 'asym'}"
    if spec.second_scale is not None:
        return f"{spec.format} {grain} {spec.scale_format} scales x {global_kind}{spec.second_scale} global"
    if spec.scale_format not in ("fp32", "fp16"):
        return f"{spec.format} {grain} {spec.scale_format} scales"
    return f"{spec.format} {grain}"


_ACTIVATION_GRIDS: dict[tuple[str, str, str | None], tuple[str, ...]] = {
    ("int", "fp32", None): ("tensor", "token"),
    ("fp8_e4m3", "fp32", None): ("tensor", "token", "group"),
    ("fp4_e2m1", "e8m0", None): ("group",),
    ("fp4_e2m1", "fp8_e4m3", "fp32"): ("group",),
}

# Float element formats the pipeline quantizes to.
FLOAT_ELEMENTS = ("fp8_e4m3", "fp4_e2m1")


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
        """The same scheme with weight grid fields replaced (from --bits/--group-size/--sym); a changed grid gets a
        summary saying what it now is (the named scheme's own text would describe the grid it replaced)."""
        weight = dataclasses.replace(self.weight, **changes)
        if weight == self.weight:
            return self
        changed = dataclasses.replace(self, weight=weight)
        return dataclasses.replace(changed, summary=f"{self.name} with {changed.describe()}")

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float activations"
        return f"weights {self.weight.describe()}, {act}"


_A8_TENSOR_SYM = ActivationSpec(8, "tensor", symmetric=True)
_A8_TENSOR_ASYM = ActivationSpec(8, "tensor", symmetric=False)
_A8_TOKEN_SYM = ActivationSpec(8, "token", symmetric=True)
_FP8_CHANNEL = WeightSpec(8, "channel", True, scale_format="fp32", format="fp8_e4m3")
_MXFP4 = WeightSpec(4, "group", True, 32, scale_format="e8m0", format="fp4_e2m1")
_NVFP4 = WeightSpec(4, "group", True, 16, scale_format="fp8_e4m3", second_scale="fp32", format="fp4_e2m1")

def _block_spec(fmt: ggml_blocks.BlockFormat) -> WeightSpec:
    """llama.cpp's 32-value block type as the integer grid whose codes and fp16 scales carry into it (Q4_1/Q5_1
    store their min m = -scale * (zero + 2^(b-1)) in fp16)."""
    return WeightSpec(fmt.levels.bit_length() - 1, "group", not fmt.has_min, ggml_blocks.BLOCK)


def _k_spec(fmt: kquants.KFormat) -> WeightSpec:
    bits, symmetric, sub = kquants.grid_of(fmt)
    return WeightSpec(bits, "group", symmetric, sub, super_group=kquants.SUPER)


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
        Scheme("fp8_block", "FP8 blocks (DeepSeek-V3, llm-compressor FP8_BLOCK): fp8 e4m3 weights with one fp32 scale "
               "per 128x128 tile, dynamic fp8 e4m3 activations per token and 128-channel group",
               WeightSpec(8, "block", True, scale_format="fp32", block_shape=(128, 128), format="fp8_e4m3"),
               ActivationSpec(8, "group", True, "fp8_e4m3", group_size=128)),
        Scheme("mxfp4", "OCP MXFP4: fp4 e2m1 weights in groups of 32 with e8m0 (power-of-two) scales, dynamic "
               "MXFP4 activations per token group of 32", _MXFP4,
               ActivationSpec(4, "group", True, "fp4_e2m1", group_size=32, scale_format="e8m0")),
        Scheme("mxfp4a16", "OCP MXFP4 weight-only: fp4 e2m1 groups of 32, e8m0 scales; activations stay float", _MXFP4),
        Scheme("nvfp4", "NVFP4: fp4 e2m1 weights in groups of 16 with fp8 e4m3 scales under one fp32 global "
               "scale, NVFP4 activations (dynamic fp8 group scales under a calibrated global scale)", _NVFP4,
               ActivationSpec(4, "group", True, "fp4_e2m1", group_size=16, scale_format="fp8_e4m3",
                              second_scale="fp32")),
        *(Scheme(f.name.lower(), f"llama.cpp {f.name} weight-only: super-blocks of 256, sub-blocks of {f.sub} "
                 f"({'symmetric' if not f.has_min else 'with mins'}); activations stay float (GGUF)",
                 _k_spec(f)) for f in kquants.K_FORMATS.values()),
        *(Scheme(f.name.lower(), f"llama.cpp {f.name} weight-only: int{_block_spec(f).bits} "
                 f"{'with a min' if f.has_min else 'symmetric'} in blocks of 32 with fp16 scales (GGUF)", _block_spec(f))
          for f in ggml_blocks.FORMATS.values()),
        Scheme("nvfp4a16", "NVFP4 weight-only: fp4 e2m1 groups of 16, fp8 e4m3 scales x fp32 global scale; "
               "activations stay float", _NVFP4),
    )
}


def ggml_scheme(ggml_type: str) -> Scheme:
    """The weight-only scheme whose grid is the ggml block type ``ggml_type`` (Q2_K ... Q6_K, Q4_0 ... Q8_0)."""
    return SCHEMES[ggml_type.lower()]


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``; an unknown name suggests the closest ones."""
    try:
        return SCHEMES[name]
    except KeyError:
        close = difflib.get_close_matches(name, [*SCHEMES, *ggml_mixes.FILE_TYPE_SCHEMES], n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(SCHEMES)}"
        raise QuantkitError(f"unknown scheme '{name}'{hint}") from None


def scheme_to_dict(scheme: Scheme) -> dict:
    """JSON form of a scheme; fields at their defaults that older manifests lack (`_WEIGHT_DEFAULTS`)
    are left out, so the integer schemes' records are unchanged."""
    data = dataclasses.asdict(scheme)
    for name, default in _WEIGHT_DEFAULTS.items():
        if data["weight"].get(name, default) == default:
            data["weight"].pop(name, None)
    if data["activation"] is not None:
        for name, default in _ACTIVATION_DEFAULTS.items():
            if data["activation"].get(name, default) == default:
                data["activation"].pop(name, None)
    return data


# Fields newer than the first manifests, left out of a scheme's record at their defaults.
_WEIGHT_DEFAULTS = {"scale_format": "fp16", "block_shape": None, "second_scale": None, "format": "int",
                    "super_group": None}
_ACTIVATION_DEFAULTS = {"format": "int", "group_size": None, "scale_format": "fp32", "second_scale": None}


def scheme_from_dict(data: dict) -> Scheme:
    act = data.get("activation")
    return Scheme(
        name=data["name"],
        summary=data.get("summary", ""),
        weight=WeightSpec(**data["weight"]),
        activation=ActivationSpec(**act) if act else None,
    )
