"""Pure quantization primitives. Every function is stateless; shapes and dtypes are in the docstrings.

Conventions (the whole package uses them):
- codes are values of the spec's element grid: signed integers in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
  held in int8 tensors, fp8 e4m3 values, or fp4 e2m1 values (every one exact in e4m3), both held in
  float8_e4m3fn tensors (`code_dtype`);
- dequantization is ``w_hat = (code - zero) * scale``; symmetric grids have zero = 0; a two-level grid
  (NVFP4) divides by its per-tensor global scale: ``w_hat = code * (scale / global_scale)``;
- weight parameters have shape [R, G]: R = ceil(out / rows_per_scale) with rows_per_scale = out for one
  scale per tensor (R = 1), the block height for 2-D blocks, 1 otherwise; G = ceil(in / group_size)
  groups of consecutive input channels (per-channel: group_size = in; blocks: the block width).
  The last group may be shorter than group_size (a ragged group) when group_size does not divide in;
- weight scales are rounded to the spec's scale format: float16 for integer grids (so every export
  format that keeps fp16 scales, GGUF and GPTQ/AWQ checkpoints, carries them exactly), float32 for fp8,
  e8m0 (powers of two) for MXFP4, fp8 e4m3 for NVFP4;
- rounding is round-half-to-even (``torch.round``; the nearest grid value, ties to the even code, for
  float grids, saturating at the largest finite value).
"""
from __future__ import annotations

import math

import torch

from quantkit.formats import kquants
from quantkit.formats.numbers import (
    ELEMENT_FORMATS,
    ElementFormat,
    scale_format,
    signed_int,
)
from quantkit.formats.schemes import ActivationSpec, WeightSpec

# Activation scales are float32; this floor only guards against a zero range (dead channel).
MIN_ACTIVATION_SCALE = 1e-8


def all_finite(x: torch.Tensor) -> bool:
    """No NaN/Inf in x (any float dtype). A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one
    reduction in x's own dtype: no converted copy, no boolean mask) settles it; a sum that is not finite, which
    finite values can also give by overflowing, is decided element by element."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


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


def code_dtype(element: ElementFormat) -> torch.dtype:
    """The tensor dtype codes of ``element`` are held in (exactly)."""
    if element.kind == "int":
        return torch.int8
    # fp4 e2m1 values (0, 0.5, ..., 6) are exact in e4m3: one byte per code until the file packs them
    return {"fp8_e4m3": torch.float8_e4m3fn, "fp4_e2m1": torch.float8_e4m3fn}[element.name]


def group_size_for(spec: WeightSpec, in_features: int) -> int:
    """Input channels per group: the spec's group size, the block width, or the whole row for
    tensor/channel grids."""
    if spec.granularity == "group":
        return spec.group_size
    if spec.granularity == "block":
        return spec.block_shape[1]
    return in_features


def rows_per_scale(spec: WeightSpec, out_features: int) -> int:
    """Output rows sharing one row of scales: every row (per tensor), the block height, or 1."""
    if spec.granularity == "tensor":
        return out_features
    return spec.block_shape[0] if spec.granularity == "block" else 1


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


def expand_params(param: torch.Tensor, shape: tuple[int, int], group_size: int, g_idx: torch.Tensor | None = None,
                  row_block: int = 1) -> torch.Tensor:
    """[R, G] parameter -> [out, in] (R = 1 broadcasts over rows; 2-D blocks repeat each row of
    parameters over ``row_block`` output rows)."""
    per_column = expand_to_columns(param, shape[1], group_size, g_idx)
    if row_block > 1 and per_column.shape[0] > 1:
        per_column = per_column.repeat_interleave(row_block, dim=0)[: shape[0]]
    return per_column


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, G, group_size]; a ragged last group is padded by repeating its last
    column, which leaves every group's min, max and absmax unchanged."""
    out_features, in_features = w.shape
    padded = group_count(in_features, group_size) * group_size
    if padded != in_features:
        w = torch.cat([w, w[:, -1:].expand(out_features, padded - in_features)], dim=1)
    return w.reshape(out_features, padded // group_size, group_size)


def to_tiles(w: torch.Tensor, block_shape: tuple[int, int]) -> torch.Tensor:
    """[out, in] -> [ceil(out/rb), rb, ceil(in/cb), cb] tiles of (rb, cb) = block_shape; edge tiles are
    padded by repeating their last row/column (their min, max and absmax unchanged, like `to_groups`)."""
    rows, cols = block_shape
    groups = to_groups(w, cols)                                      # [out, Gc, cb]
    padded = group_count(w.shape[0], rows) * rows
    if padded != w.shape[0]:
        groups = torch.cat([groups, groups[-1:].expand(padded - w.shape[0], -1, -1)], dim=0)
    return groups.reshape(padded // rows, rows, groups.shape[1], cols)


def weight_range(w: torch.Tensor, spec: WeightSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of ``w`` [out, in], each [R, G] float32, widened to include 0 so the
    zero point is always an in-range integer."""
    w = w.float()
    if spec.granularity == "tensor":
        lo, hi = w.min().reshape(1, 1), w.max().reshape(1, 1)
    elif spec.granularity == "block":
        tiles = to_tiles(w, spec.block_shape)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    else:
        groups = to_groups(w, group_size_for(spec, w.shape[1]))
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    return lo.clamp(max=0.0), hi.clamp(min=0.0)


def mx_scale(absmax: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """The e8m0 scale of MX blocks (OCP MX v1.0 section 6.3), absmax [any] float32 -> powers of two, float32:

        scale = 2^(floor(log2(absmax)) - emax),  emax = floor(log2(element.max))   (2 for fp4 e2m1)

    with absmax's mantissa first rounded to the element's mantissa bits (vLLM's and compressed-tensors'
    rounding: a block whose max has mantissa >= 1.75 takes the next power of two instead of saturating to
    1.5 * 2^e). The exponent is clamped to e8m0's [-127, 127]; an all-zero block gets 2^-127."""
    mantissa, exponent = torch.frexp(absmax.float().clamp(min=2.0**-127))   # absmax = mantissa * 2^exponent
    rounds_up = mantissa >= 1.0 - 2.0 ** -(element.mantissa_bits + 2)       # 1.m rounded to m bits reaches 2
    emax = math.floor(math.log2(element.max))
    return torch.exp2((exponent - 1 + rounds_up.int() - emax).clamp(-127, 127).float())


def global_scale(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor | None:
    """The per-tensor global scale of a two-level grid (NVFP4), else None: [1] float32

        G = scale_max * element_max / absmax(w)          (448 * 6 / absmax for NVFP4)

    so that the largest group scale, absmax / 6 * G, lands on the top of the fp8 range (compressed-
    tensors' ``generate_gparam``). An all-zero tensor gets G = 1."""
    if spec.second_scale is None:
        return None
    return _global_scale_of(w.float().abs().amax(), spec.scale_format, spec.element)


def _global_scale_of(absmax: torch.Tensor, storage: str, element: ElementFormat) -> torch.Tensor:
    """G = storage_max * element_max / absmax as [1] float32 (1 where absmax is 0)."""
    value = ELEMENT_FORMATS[storage].max * element.max / absmax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(torch.isfinite(value), value, torch.ones_like(value)).reshape(1).float()


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
    """What a code is multiplied by: the stored scale, divided by the global scale of two-level grids
    (fp32 division, as compressed-tensors and vLLM compute it)."""
    return scale if global_scale is None else scale.float() / global_scale.float()


def symmetric_scale(absmax: torch.Tensor, element: ElementFormat, storage: str,
                    global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The stored scale of a symmetric grid over values of magnitude <= absmax (float32, shape kept):

        e8m0 (MX):          `mx_scale`
        otherwise:          round_storage(absmax / half_range * G)     (G = 1 without a global scale)
    half_range is (qmax - qmin) / 2 for integers and the largest value for float grids."""
    if storage == "e8m0":
        return mx_scale(absmax, element)
    scale = absmax / half_range(element)
    if global_scale is not None:
        scale = scale * global_scale
    fmt = scale_format(storage)
    return fmt.round(scale.clamp(min=fmt.smallest))


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: WeightSpec,
                       global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of a weight grid covering [lo, hi] (each [R, G], lo <= 0 <= hi).

    symmetric:  scale = max(|lo|, hi) / ((qmax - qmin) / 2), zero = None
    asymmetric: scale = (hi - lo) / (qmax - qmin),           zero = clamp(qmin - round(lo / scale))
    The symmetric grid spans the whole signed range, [-2^(b-1), 2^(b-1) - 1] (compressed-tensors' and
    torchao's convention): its step is absmax / 7.5 at 4 bits rather than absmax / 7, at the price of
    clipping the largest positive weight by half a step.
    Float grids (symmetric, `symmetric_scale`): absmax / max (448 for fp8 e4m3), MX's power of two, or
    NVFP4's fp8 value of absmax / 6 * G under the tensor's ``global_scale`` G (required for two-level grids).
    The scale is rounded to the spec's scale format and returned as float32 (the stored values).
    """
    element = spec.element
    qmin, qmax = element.min, element.max
    assert (spec.second_scale is None) == (global_scale is None), "two-level grids need their global scale"
    if spec.symmetric:
        return symmetric_scale(torch.maximum(-lo, hi), element, spec.scale_format, global_scale), None
    scale = (hi - lo) / (qmax - qmin)
    storage = scale_format(spec.scale_format)
    scale = storage.round(scale.clamp(min=storage.smallest))
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def weight_qparams(w: torch.Tensor, spec: WeightSpec,
                   global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest grid for ``w`` [out, in]: (scale [R, G], zero [R, G] or None); two-level grids
    take the tensor's ``global_scale`` (`global_scale`)."""
    return qparams_from_range(*weight_range(w, spec), spec, global_scale)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
             grid: int | ElementFormat, g_idx: torch.Tensor | None = None, row_block: int = 1) -> torch.Tensor:
    """codes = grid_round(w / scale + zero): [out, in] float -> [out, in] codes (`code_dtype`); ``grid``
    is the element format or the bit width of a signed integer grid; ``scale`` is the effective scale
    (`effective_scale`) [R, G], R = ceil(out / row_block) or 1."""
    element = as_element(grid)
    q = w.float() / expand_params(scale, w.shape, group_size, g_idx, row_block)
    if zero is None:
        return element.round(q).to(code_dtype(element))
    q = torch.round(q) + expand_params(zero, w.shape, group_size, g_idx, row_block)
    return element.round(q).to(code_dtype(element))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
               g_idx: torch.Tensor | None = None, row_block: int = 1,
               global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """w_hat = (codes - zero) * scale (scale / global_scale for two-level grids): [out, in] codes ->
    [out, in] float32."""
    q = codes.float()
    if zero is not None:
        q = q - expand_params(zero.float(), codes.shape, group_size, g_idx, row_block)
    return q * expand_params(effective_scale(scale.float(), global_scale), codes.shape, group_size, g_idx, row_block)


def fake_quantize_weight(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """dequantize(quantize(w)) on the round-to-nearest grid: [out, in] -> [out, in] float32.

    Bit-identical to ``rtn.quantize_rtn(w, spec).dequantize()``, computed on the grouped view
    (no per-column gathers): what search loops (AWQ's scale and clip grids) call thousands of times."""
    w = w.float()
    if spec.k_format is not None:      # llama.cpp's reference search (`rtn.quantize_rtn`)
        return kquants.quantize_reference(w, spec.k_format.name).dequantize()
    if spec.granularity == "block" or spec.second_scale is not None:
        glob = global_scale(w, spec)
        scale, zero = weight_qparams(w, spec, glob)
        scale = effective_scale(scale, glob)
        group_size, rows = group_size_for(spec, w.shape[1]), rows_per_scale(spec, w.shape[0])
        codes = quantize(w, scale, zero, group_size, spec.element, row_block=rows)
        return dequantize(codes, scale, zero, group_size, row_block=rows)
    if spec.granularity == "tensor":
        scale, zero = weight_qparams(w, spec)
        groups, scale, zero = w[:, None, :], scale[..., None], None if zero is None else zero[..., None]
    else:
        groups = to_groups(w, group_size_for(spec, w.shape[1]))
        scale, zero = qparams_from_range(groups.amin(dim=-1).clamp(max=0.0), groups.amax(dim=-1).clamp(min=0.0), spec)
        scale, zero = scale[..., None], None if zero is None else zero[..., None]
    element = spec.element
    if zero is not None:
        q = element.round(torch.round(groups / scale) + zero) - zero
    else:
        q = element.round(groups / scale)
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
    return element.round(q).to(code_dtype(element))


def quantize_activation_per_token(x: torch.Tensor, grid: int | ElementFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token codes: scale_t = max_k |x_tk| / qmax (448 for fp8 e4m3).

    x: [..., K] float -> (codes [..., K] (`code_dtype`), scale [..., 1] float32).
    """
    element = as_element(grid)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / element.max).clamp(min=MIN_ACTIVATION_SCALE)
    codes = element.round(xf / scale).to(code_dtype(element))
    return codes, scale


def activation_global_scale(lo: torch.Tensor, hi: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """The static global scale of a two-level activation grid (NVFP4) from the calibrated range:
    G = scale_max * element_max / max(|lo|, |hi|) = 448 * 6 / absmax, [1] float32 (compressed-tensors'
    ``input_global_scale``; an all-zero range gets 1)."""
    return _global_scale_of(torch.maximum(-lo.float(), hi.float()), spec.scale_format, spec.element)


def group_activation_scales(x: torch.Tensor, spec: ActivationSpec,
                            global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-group scales: x [..., K] float -> (groups [..., G, group_size] float32,
    effective scales [..., G, 1] float32). A ragged last group is padded with zeros (absmax unchanged).

        fp32 scales (FP8 blocks):  s = max(absmax / max, 1e-8)
        e8m0 (MX):                 s = `mx_scale`(absmax)
        fp8 under G (NVFP4):       s = fp8(absmax / 6 * G) / G"""
    k, size = x.shape[-1], spec.group_size
    padded = group_count(k, size) * size
    xf = torch.nn.functional.pad(x.float(), (0, padded - k)) if padded != k else x.float()
    groups = xf.reshape(*x.shape[:-1], padded // size, size)
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    if spec.scale_format == "fp32":
        return groups, (absmax / spec.element.max).clamp(min=MIN_ACTIVATION_SCALE)
    stored = symmetric_scale(absmax, spec.element, spec.scale_format, global_scale)
    return groups, effective_scale(stored, global_scale)


def fake_quantize_activation(x: torch.Tensor, spec: ActivationSpec, scale: torch.Tensor | None = None,
                             zero: torch.Tensor | None = None, global_scale: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """x_hat = dequantize(quantize(x)) in float32, cast back to x.dtype: [..., K] -> [..., K].

    The same arithmetic as quantize_activation_* followed by (code - zero) * scale, without the
    int8 round trip (the codes are exact small integers in float32 either way). Group grids compute
    their scales per token and group (`group_activation_scales`; NVFP4 under ``global_scale``)."""
    element = spec.element
    xf = x.float()
    if spec.granularity == "group":
        groups, group_scale = group_activation_scales(x, spec, global_scale)
        x_hat = element.round(groups / group_scale) * group_scale
        return x_hat.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]].to(x.dtype)
    if spec.dynamic:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / element.max).clamp(min=MIN_ACTIVATION_SCALE)
        return (element.round(xf / scale) * scale).to(x.dtype)
    if zero is None:
        return (element.round(xf / scale) * scale).to(x.dtype)
    return ((element.round(torch.round(xf / scale) + zero) - zero) * scale).to(x.dtype)


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
