"""Pure quantization primitives. Every function is stateless; shapes and dtypes are in the docstrings.

Conventions (the whole package uses them):
- codes are values of the spec's element grid: signed integers in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
  held in int8 tensors, or fp8 e4m3 values held in float8_e4m3fn tensors (`code_dtype`);
- dequantization is ``w_hat = (code - zero) * scale``; symmetric grids have zero = 0;
- weight parameters have shape [R, G]: R = 1 for one scale per tensor, R = out otherwise;
  G = ceil(in / group_size) groups of consecutive input channels (per-channel: group_size = in).
  The last group may be shorter than group_size (a ragged group) when group_size does not divide in;
- weight scales are rounded to the spec's scale format: float16 for integer grids (so every export
  format that keeps fp16 scales, GGUF and GPTQ/AWQ checkpoints, carries them exactly), float32 for fp8;
- rounding is round-half-to-even (``torch.round``; the nearest grid value, ties to the even code, for
  float grids, saturating at the largest finite value).
"""
from __future__ import annotations

import math

import torch

from quantkit.formats.numbers import ElementFormat, scale_format, signed_int
from quantkit.formats.schemes import ActivationSpec, WeightSpec

# Activation scales are float32; this floor only guards against a zero range (dead channel).
MIN_ACTIVATION_SCALE = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed ``bits``-bit code: the ends of the ``int{bits}`` element grid."""
    grid = signed_int(bits)
    return int(grid.min), int(grid.max)


def as_element(grid: int | ElementFormat) -> ElementFormat:
    """An element grid given as itself or as the bit width of a signed integer grid."""
    return signed_int(grid) if isinstance(grid, int) else grid


def half_range(element: ElementFormat) -> float:
    """What a symmetric scale divides the absmax by: (qmax - qmin) / 2 for integers (the whole signed
    range, see `qparams_from_range`), the largest finite value for float grids (448 for fp8 e4m3)."""
    return (element.max - element.min) / 2 if element.kind == "int" else element.max


def round_to_grid(x: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """x (already divided by its scale, zero added) rounded onto the grid, in x's float dtype: integers
    round half to even and clamp to [qmin, qmax]; float grids round to the nearest value (ties to even)
    after saturating at +-max."""
    if element.kind == "int":
        return torch.round(x).clamp_(element.min, element.max)
    return element.round(x)


def code_dtype(element: ElementFormat) -> torch.dtype:
    """The tensor dtype codes of ``element`` are held in (exactly)."""
    if element.kind == "int":
        return torch.int8
    return {"fp8_e4m3": torch.float8_e4m3fn}[element.name]


def group_size_for(spec: WeightSpec, in_features: int) -> int:
    """Input channels per group: the spec's group size, or the whole row for tensor/channel grids."""
    return spec.group_size if spec.granularity == "group" else in_features


def group_count(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def column_group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Group index of every input column: [in] int64. ``g_idx`` (act-order) overrides j // group_size."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_features) // group_size


def expand_to_columns(param: torch.Tensor, in_features: int, group_size: int,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """[R, G] per-group parameter -> [R, in] per-column parameter."""
    return param[:, column_group_index(in_features, group_size, g_idx).to(param.device)]


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, G, group_size]; a ragged last group is padded by repeating its last
    column, which leaves every group's min, max and absmax unchanged."""
    out_features, in_features = w.shape
    padded = group_count(in_features, group_size) * group_size
    if padded != in_features:
        w = torch.cat([w, w[:, -1:].expand(out_features, padded - in_features)], dim=1)
    return w.reshape(out_features, padded // group_size, group_size)


def weight_range(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of ``w`` [out, in], each [R, G] float32, widened to include 0 so the
    zero point is always an in-range integer."""
    w = w.float()
    if spec.granularity == "tensor":
        lo, hi = w.min().reshape(1, 1), w.max().reshape(1, 1)
    else:
        groups = to_groups(w, group_size_for(spec, w.shape[1]))
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of a weight grid covering [lo, hi] (each [R, G], lo <= 0 <= hi).

    symmetric:  scale = max(|lo|, hi) / ((qmax - qmin) / 2), zero = None
    asymmetric: scale = (hi - lo) / (qmax - qmin),           zero = clamp(qmin - round(lo / scale))
    The symmetric grid spans the whole signed range, [-2^(b-1), 2^(b-1) - 1] (compressed-tensors' and
    torchao's convention): its step is absmax / 7.5 at 4 bits rather than absmax / 7, at the price of
    clipping the largest positive weight by half a step.
    Float grids (symmetric): scale = absmax / max (448 for fp8 e4m3).
    The scale is rounded to the spec's scale format (fp16 for integers, fp32 for fp8), returned as float32.
    """
    element = spec.element
    qmin, qmax = element.min, element.max
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / half_range(element)
    else:
        scale = (hi - lo) / (qmax - qmin)
    storage = scale_format(spec.scale_format)
    scale = storage.round(scale.clamp(min=storage.smallest))
    if spec.symmetric:
        return scale, None
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def weight_qparams(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest grid for ``w`` [out, in]: (scale [R, G], zero [R, G] or None)."""
    return qparams_from_range(*weight_range(w, spec), spec)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
             grid: int | ElementFormat, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """codes = grid_round(w / scale + zero): [out, in] float -> [out, in] codes (`code_dtype`); ``grid``
    is the element format or the bit width of a signed integer grid."""
    element = as_element(grid)
    in_features = w.shape[1]
    q = w.float() / expand_to_columns(scale, in_features, group_size, g_idx)
    if zero is None:
        return round_to_grid(q, element).to(code_dtype(element))
    q = torch.round(q) + expand_to_columns(zero, in_features, group_size, g_idx)
    return round_to_grid(q, element).to(code_dtype(element))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """w_hat = (codes - zero) * scale: [out, in] int8 -> [out, in] float32."""
    in_features = codes.shape[1]
    q = codes.float()
    if zero is not None:
        q = q - expand_to_columns(zero.float(), in_features, group_size, g_idx)
    return q * expand_to_columns(scale.float(), in_features, group_size, g_idx)


def fake_quantize_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """dequantize(quantize(w)) on the round-to-nearest grid: [out, in] -> [out, in] float32.

    Bit-identical to ``rtn.quantize_rtn(w, spec).dequantize()``, computed on the grouped view
    (no per-column gathers): what search loops (AWQ's scale and clip grids) call thousands of times."""
    w = w.float()
    if spec.granularity == "tensor":
        scale, zero = weight_qparams(w, spec)
        groups, scale, zero = w[:, None, :], scale[..., None], None if zero is None else zero[..., None]
    else:
        groups = to_groups(w, group_size_for(spec, w.shape[1]))
        scale, zero = qparams_from_range(groups.amin(dim=-1).clamp(max=0.0), groups.amax(dim=-1).clamp(min=0.0), spec)
        scale, zero = scale[..., None], None if zero is None else zero[..., None]
    element = spec.element
    if zero is not None:
        q = round_to_grid(torch.round(groups / scale) + zero, element) - zero
    else:
        q = round_to_grid(groups / scale, element)
    return (q * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]


def activation_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: ActivationSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static per-tensor activation grid from the calibrated range [lo, hi] (float32 scalars).

    symmetric:  scale = max(|lo|, |hi|) / qmax; asymmetric: scale = (hi - lo) / (qmax - qmin),
    zero = clamp(qmin - round(lo / scale)). Scales stay float32 (they are applied in fp32).
    """
    element = spec.element
    qmin, qmax = element.min, element.max
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    if spec.symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=MIN_ACTIVATION_SCALE)
        return scale.reshape(1), None
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=MIN_ACTIVATION_SCALE)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale.reshape(1), zero.reshape(1)


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                               grid: int | ElementFormat) -> torch.Tensor:
    """Per-tensor static codes: grid_round(x / scale + zero): [..., K] float -> [..., K] codes."""
    element = as_element(grid)
    q = x.float() / scale
    if zero is not None:
        q = torch.round(q) + zero
    return round_to_grid(q, element).to(code_dtype(element))


def quantize_activation_per_token(x: torch.Tensor, grid: int | ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token codes: scale_t = max_k |x_tk| / qmax (448 for fp8 e4m3).

    x: [..., K] float -> (codes [..., K] (`code_dtype`), scale [..., 1] float32).
    """
    element = as_element(grid)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / element.max).clamp(min=MIN_ACTIVATION_SCALE)
    codes = round_to_grid(xf / scale, element).to(code_dtype(element))
    return codes, scale


def fake_quantize_activation(x: torch.Tensor, spec: ActivationSpec, scale: torch.Tensor | None = None,
                             zero: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat = dequantize(quantize(x)) in float32, cast back to x.dtype: [..., K] -> [..., K].

    The same arithmetic as quantize_activation_* followed by (code - zero) * scale, without the
    int8 round trip (the codes are exact small integers in float32 either way)."""
    element = spec.element
    xf = x.float()
    if spec.dynamic:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / element.max).clamp(min=MIN_ACTIVATION_SCALE)
        return (round_to_grid(xf / scale, element) * scale).to(x.dtype)
    if zero is None:
        return (round_to_grid(xf / scale, element) * scale).to(x.dtype)
    return ((round_to_grid(torch.round(xf / scale) + zero, element) - zero) * scale).to(x.dtype)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (ref - approx)^2), in dB, in float64."""
    ref = reference.double()
    noise = (ref - approximation.double()).pow(2).sum().item()
    return sqnr_db_from_sums(ref.pow(2).sum().item(), noise)


def error_sums(reference: torch.Tensor, approximation: torch.Tensor) -> tuple[float, float]:
    """(sum ref^2, sum (ref - approx)^2): the elementwise work in the inputs' dtype (half the memory and
    time of float64 for whole-model tensors), the sums in float64; `sqnr_db_from_sums` turns them into dB,
    and sums of several tensors (a GGUF expert stack) add up."""
    noise = (reference - approximation).pow(2).sum(dtype=torch.float64).item()
    return reference.pow(2).sum(dtype=torch.float64).item(), noise


def sqnr_db_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from accumulated sums of squares (inf when the noise is exactly zero)."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)
