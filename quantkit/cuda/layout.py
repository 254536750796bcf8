"""Kernel-friendly operands of a QuantLinear, computed once at load (`prepare`).

Two kinds of layer:

``Int8Operands`` (the scheme quantizes activations: W8A8, SmoothQuant, W4A8):
  codes    [N, K] int8   the weight codes as stored (K contiguous = K-major, what int8 MMA reads);
                         sub-8-bit codes are unpacked to int8 here (they are signed codes in range)
  scale    [G, N] fp32   weight scales (fp16 values); per-tensor is broadcast to [1, N]
  zero     [N] int32     asymmetric per-channel zero points, or None
  rowsum   [G, N] int32  sum over each group of the codes, for the activation zero correction
                         (acc -= zx * rowsum), or None when activations are symmetric
  activation: bits, dynamic (per token) or static (input_scale [1] fp32, input_zero [1] fp32)

``WeightOnlyOperands`` (activations stay float: W4A16, W8A16, ...):
  weight   bits 2 and 4: [ceil(K/32)*bits, N] int32, the transpose of the native packed words
           (packing.py: 32/bits codes per word, LSB first, u = code + 2^(bits-1)), so a tile load is
           contiguous along N (the GPTQ ``qweight`` orientation); other bit widths: codes [K, N] int8
  scale    [G, N] fp16;  zero [G, N] fp16 (integer zeros, exact) or fp32 (HQQ's fractional zeros)
  g_idx    [K] int32 (act-order) or None

``Fp8Operands`` (fp8 e4m3 per-channel or per-tensor weights with fp8 activations): codes [N, K], scales.

``GroupScaledOperands`` (microscaled grids: MXFP4, NVFP4, 128x128 FP8 blocks, with or without their
group-quantized activations): codes [N, K] float8_e4m3fn (fp4 or fp8 values), the effective weight scale
of every row and group [N, G] fp32 (block rows expanded; NVFP4's s / G), the activation grid and NVFP4's
activation global scale. What a block-scaled GEMM computes: per group, products of codes accumulated,
then scaled (`reference.group_scaled_mm`); the activation groups must be the weight groups.

Combinations no kernel implements are refused with an error naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.cuda.reference import PACKED_BITS
from quantkit.errors import QuantkitError
from quantkit.formats import packing, primitives
from quantkit.model.qlinear import QuantLinear


class _CodesShaped:
    """Operands whose weight codes are held unpacked [N, K]: their shape is the codes' shape."""

    codes: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


@dataclass
class Int8Operands(_CodesShaped):
    codes: torch.Tensor
    scale: torch.Tensor
    group_size: int
    zero: torch.Tensor | None
    rowsum: torch.Tensor | None
    activation_bits: int
    dynamic: bool
    input_scale: torch.Tensor | None
    input_zero: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class WeightOnlyOperands:
    weight: torch.Tensor
    bits: int
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


@dataclass
class Fp8Operands(_CodesShaped):
    """An fp8 e4m3 layer with fp8 activations: codes [N, K] float8_e4m3fn, one fp32 weight scale per
    output channel ([N]) or for the tensor ([1]), the activation grid, bias [N]."""

    codes: torch.Tensor
    scale: torch.Tensor
    activation: object              # ActivationSpec (fp8_e4m3)
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class GroupScaledOperands(_CodesShaped):
    codes: torch.Tensor
    scale: torch.Tensor
    group_size: int
    activation: object | None          # ActivationSpec (per-token group grid) or None (float activations)
    input_global_scale: torch.Tensor | None
    bias: torch.Tensor | None


Operands = Int8Operands | WeightOnlyOperands | Fp8Operands | GroupScaledOperands


def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] int8 -> the weight-only kernel layout (see the module docstring), on codes' device.

    For bits 2 and 4 no code straddles a word, so packing.pack's bit stream is, per word w of a row,
    sum_j u[32/bits * w + j] << (bits * j) with u = code + 2^(bits-1) (rows padded with u = 0)."""
    if bits not in PACKED_BITS:
        return codes.T.contiguous()
    n, k = codes.shape
    per_word = 32 // bits
    padded = packing.packed_words_per_row(k, bits) * per_word
    unsigned = torch.zeros(n, padded, dtype=torch.int64, device=codes.device)
    unsigned[:, :k] = codes.long() + (1 << (bits - 1))
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (unsigned.reshape(n, -1, per_word) << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)    # uint32 bits as int32
    return words.T.contiguous()


def params_by_group(param: torch.Tensor, out_features: int) -> torch.Tensor:
    """[R, G] (R = 1 or N) -> [G, N]: one row of parameters per group, contiguous along N."""
    return param.expand(out_features, param.shape[1]).T.contiguous()


def group_rowsum(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group sum of each row's codes: [N, K] int8 -> [G, N] int32 (exact)."""
    n, k = codes.shape
    groups = primitives.group_count(k, group_size)
    padded = torch.zeros(n, groups * group_size, dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes.int()
    return padded.reshape(n, groups, group_size).sum(dim=-1, dtype=torch.int32).T.contiguous()


def _refuse(name: str, reason: str):
    raise QuantkitError(f"no kernel for layer {name or '<unnamed>'}: {reason}")


def prepare(layer: QuantLinear, name: str = "") -> Operands:
    """The kernel operands of ``layer`` (on its device); ``name`` labels errors."""
    spec = layer.weight_spec
    if spec.k_format is not None:
        _refuse(name, f"{spec.k_format.name} is llama.cpp's grid (its sub-block mins are no zero point these kernels "
                      "take): export it with --format gguf and run it in llama.cpp")
    if spec.format == "fp4_e2m1" or spec.granularity == "block":
        return _prepare_group_scaled(layer, name)
    if layer.activation_spec is None:
        return _prepare_weight_only(layer)
    activation = layer.activation_spec
    if activation.format != "int" or spec.format != "int":
        return _prepare_fp8(layer, name)
    if not 2 <= activation.bits <= 8:
        _refuse(name, f"int{activation.bits} activations (the int8 GEMM takes codes of 2 to 8 bits)")
    if activation.dynamic and not activation.symmetric:
        _refuse(name, "asymmetric dynamic activations (per-token quantization is symmetric)")
    if layer.weight_g_idx is not None:
        _refuse(name, "act-order (g_idx) weights with quantized activations")
    zero = layer.weight_zero
    if zero is not None and not bool(torch.equal(zero, torch.round(zero))):
        _refuse(name, "fractional weight zero points with quantized activations")
    grouped = spec.granularity == "group" and primitives.group_count(layer.in_features, spec.group_size) > 1
    if zero is not None and grouped:
        _refuse(name, "asymmetric group-wise weights with quantized activations")
    n = layer.out_features
    group_size = primitives.group_size_for(spec, layer.in_features)
    codes = layer.weight_codes.contiguous()
    input_zero = layer.input_zero
    return Int8Operands(
        codes=codes,
        scale=params_by_group(layer.weight_scale.float(), n),
        group_size=group_size,
        zero=None if zero is None else zero.expand(n, 1).reshape(n).to(torch.int32).contiguous(),
        rowsum=None if input_zero is None else group_rowsum(codes, group_size),
        activation_bits=activation.bits,
        dynamic=activation.dynamic,
        input_scale=None if activation.dynamic else layer.input_scale.float().reshape(1),
        input_zero=None if input_zero is None else input_zero.float().reshape(1),
        bias=layer.bias,
    )


def _prepare_fp8(layer: QuantLinear, name: str) -> Fp8Operands:
    spec, activation = layer.weight_spec, layer.activation_spec
    if spec.format != "fp8_e4m3" or activation.format != "fp8_e4m3" or spec.granularity not in ("channel", "tensor"):
        _refuse(name, f"{spec.describe()} weights with {activation.describe()} activations (the fp8 GEMM takes fp8 "
                      "e4m3 per-channel or per-tensor weights with fp8 e4m3 activations)")
    scale = layer.weight_scale.float().reshape(-1)
    return Fp8Operands(codes=layer.weight_codes.contiguous(), scale=scale, activation=activation,
                       input_scale=None if activation.dynamic else layer.input_scale.float().reshape(1),
                       bias=layer.bias)


def _prepare_group_scaled(layer: QuantLinear, name: str) -> GroupScaledOperands:
    quant = layer.quant_tensor()
    activation = layer.activation_spec
    if activation is not None and (activation.granularity != "group" or activation.group_size != quant.group_size):
        _refuse(name, f"{layer.weight_spec.describe()} weights with {activation.describe()} activations (a block-"
                      "scaled GEMM takes activation groups equal to the weight groups)")
    if quant.g_idx is not None:
        _refuse(name, "act-order (g_idx) with block-scaled weights")
    n, k = quant.shape
    effective = primitives.effective_scale(quant.scale.float(), quant.global_scale)
    scale = primitives.expand_params(effective, (n, primitives.group_count(k, quant.group_size)), 1,
                                     row_block=quant.row_block).expand(n, -1).contiguous()
    return GroupScaledOperands(codes=quant.codes.contiguous(), scale=scale, group_size=quant.group_size,
                               activation=activation, input_global_scale=layer.input_global_scale, bias=layer.bias)


def _prepare_weight_only(layer: QuantLinear) -> WeightOnlyOperands:
    spec = layer.weight_spec
    n, k = layer.out_features, layer.in_features
    zero = layer.weight_zero
    if zero is not None:
        integral = bool(torch.equal(zero, torch.round(zero)))
        zero = params_by_group(zero.float(), n).to(torch.float16 if integral else torch.float32)
    return WeightOnlyOperands(
        weight=pack_weight(layer.weight_codes, spec.bits),
        bits=spec.bits,
        scale=params_by_group(layer.weight_scale.to(torch.float16 if spec.scale_format == "fp16" else torch.float32), n),
        zero=zero,
        group_size=primitives.group_size_for(spec, k),
        g_idx=None if layer.weight_g_idx is None else layer.weight_g_idx.to(torch.int32).contiguous(),
        bias=layer.bias,
        in_features=k,
        out_features=n,
    )
