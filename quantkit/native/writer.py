"""The native output's tensors: one quantized Linear as the files hold it, and the names it gets.

Tensors of a quantized Linear ``L`` (roles recorded in the manifest's ``tensors`` map):
  L.weight_codes  int8 [out, in] for 8-bit; int32 [out, ceil(in/32)*bits] packed (packing.py) below 8;
                  float8_e4m3fn [out, in] for fp8 e4m3 grids; uint8 [out, ceil(in/2)] for fp4 e2m1
                  (two 4-bit patterns per byte, `packing.pack_fp4`)
  L.weight_scale  [R, G] in the scale format's dtype: float16 (integer grids), float32 (fp8),
                  float8_e8m0fnu (MXFP4), float8_e4m3fn (NVFP4)
  L.weight_zero   int8 [R, G] (float32 when fractional)     L.weight_global_scale  float32 [1] (NVFP4)
  L.weight_super_scale, L.weight_super_min  float16 [out, in/256] (K-quants' d, dmin; then weight_scale holds
                  the integer sub-block scales and weight_zero the integer mins, `QuantTensor`)
  L.weight_g_idx  int32 [in] (act-order)  L.input_scale  float32 [1] (static activations)
  L.input_zero    int8 [1] (static asym)  L.input_global_scale  float32 [1] (NVFP4 activations)
  L.bias          storage dtype [out]
Everything else (embeddings, smoothed norms, lm_head) is stored under its HF name in the source dtype.
Shards: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``
(`quantkit.files.ShardedWriter`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats import packing
from quantkit.formats.numbers import scale_format
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.model.qlinear import QuantLinear

# role -> tensor-name suffix
SUFFIXES = {"codes": "weight_codes", "scale": "weight_scale", "zero": "weight_zero", "g_idx": "weight_g_idx",
            "global_scale": "weight_global_scale", "super_scale": "weight_super_scale",
            "super_min": "weight_super_min", "input_scale": "input_scale", "input_zero": "input_zero",
            "input_global_scale": "input_global_scale", "bias": "bias"}


@dataclass
class LinearRecord:
    """One quantized Linear as the native files hold it: the hand-off to the writer, from the loader
    and to exporters.

    quant:        the weight (`QuantTensor`: codes [out, in] int8, scale/zero [R, G] float32)
    input_scale:  float32 [1] for static activation grids, else None
    input_zero:   float32 [1] holding an integer, for static asymmetric grids, else None
    bias:         [out] in the storage dtype, or None
    input_global_scale: float32 [1], the calibrated global scale of NVFP4 activations, else None
    """

    quant: QuantTensor
    input_scale: torch.Tensor | None = None
    input_zero: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: QuantLinear) -> "LinearRecord":
        return cls(layer.quant_tensor(), layer.input_scale, layer.input_zero, layer.bias, layer.input_global_scale)

    def module(self, activation) -> QuantLinear:
        """The runnable QuantLinear of this record under an activation grid (or None)."""
        return QuantLinear(self.quant, activation, input_scale=self.input_scale, input_zero=self.input_zero,
                           bias=self.bias, input_global_scale=self.input_global_scale)


def codes_layout(spec) -> str:
    """How a grid's codes are stored: fp8 values as float8_e4m3 tensors, fp4 values as 4-bit patterns two
    per byte, 8-bit integers as int8, narrower integers packed into int32 words."""
    if spec.format == "fp4_e2m1":
        return "fp4_e2m1-packed"
    if spec.format != "int":
        return spec.format
    return "int8" if spec.bits == 8 else "int32-packed"



def tensor_names(name: str, record: LinearRecord) -> dict[str, str]:
    """The role -> tensor-name map of one quantized Linear for the manifest (nothing is packed)."""
    present = {"codes": True, "scale": True, "zero": record.quant.zero is not None,
               "g_idx": record.quant.g_idx is not None, "global_scale": record.quant.global_scale is not None,
               "super_scale": record.quant.super_scale is not None, "super_min": record.quant.super_min is not None,
               "input_scale": record.input_scale is not None, "input_zero": record.input_zero is not None,
               "input_global_scale": record.input_global_scale is not None, "bias": record.bias is not None}
    return {role: f"{name}.{SUFFIXES[role]}" for role, here in present.items() if here}


def record_tensors(name: str, record: LinearRecord) -> dict[str, torch.Tensor]:
    """The file tensors of one quantized Linear, under the names `tensor_names` gives."""
    quant = record.quant
    layout = codes_layout(quant.spec)
    codes = quant.codes
    if layout == "int32-packed":
        codes = packing.pack(quant.codes, quant.spec.bits)
    elif layout == "fp4_e2m1-packed":
        codes = packing.pack_fp4(quant.codes)
    by_role = {"codes": codes, "scale": quant.scale.to(scale_format(quant.spec.scale_format).dtype)}
    if quant.zero is not None:
        integral = torch.equal(quant.zero, torch.round(quant.zero))
        by_role["zero"] = quant.zero.to(torch.int8) if integral else quant.zero.float()
    if quant.g_idx is not None:
        by_role["g_idx"] = quant.g_idx.to(torch.int32)
    if quant.global_scale is not None:
        by_role["global_scale"] = quant.global_scale.float().reshape(1)
    for role in ("super_scale", "super_min"):          # K-quants' fp16 d and dmin
        if getattr(quant, role) is not None:
            by_role[role] = getattr(quant, role).to(torch.float16)
    if record.input_global_scale is not None:
        by_role["input_global_scale"] = record.input_global_scale.float().reshape(1)
    if record.input_scale is not None:
        by_role["input_scale"] = record.input_scale
    if record.input_zero is not None:
        by_role["input_zero"] = record.input_zero.to(torch.int8)
    if record.bias is not None:
        by_role["bias"] = record.bias
    names = tensor_names(name, record)
    return {names[role]: t.contiguous() for role, t in by_role.items()}
