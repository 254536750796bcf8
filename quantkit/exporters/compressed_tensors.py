"""compressed-tensors export (what vLLM and transformers load) of a quantkit output directory.

Formats, chosen per layer the way compressed-tensors itself infers them:
  int-quantized   layers that also quantize activations (W8A8, W4A8): ``weight`` int8 [out, in] codes
  pack-quantized  weight-only layers (W4A16, W8A16, ...): ``weight_packed`` int32 [out, ceil(in*b/32)]
                  (codes + 2^(b-1), LSB-first bit stream along the input dim, no padding bits),
                  ``weight_shape`` int64 [2]
  float-quantized fp8 e4m3 layers (FP8_DYNAMIC, W8A16 fp8, per-tensor static, 128x128 blocks): ``weight``
                  float8_e4m3fn [out, in], ``weight_scale`` float32 (any float32 value, kept exactly;
                  blocks: [ceil(out/128), ceil(in/128)], strategy "block" with ``block_structure``)
  nvfp4-pack-quantized  NVFP4: ``weight_packed`` uint8 [out, in/2] (two fp4 e2m1 patterns per byte, code 2j
                  in the low nibble), ``weight_scale`` float8_e4m3fn [out, in/16], ``weight_global_scale``
                  float32 [1] (the divisor G: w = code * scale / G; strategy "tensor_group"); W4A4 adds
                  ``input_global_scale`` float32 [1]
  mxfp4-pack-quantized  MXFP4: ``weight_packed`` as NVFP4, ``weight_scale`` uint8 [out, in/32] holding the
                  biased e8m0 exponent E + 127 of each power-of-two scale 2^E (``scale_dtype`` torch.uint8)
All store ``weight_scale`` (quantkit's fp16 scale values exactly for integer grids, as float32 for float32 models and
float16 otherwise, see `scale_dtype_for`) with shape [1] per tensor,
[out, 1] per channel, [out, G] per group; asymmetric grids add ``weight_zero_point`` (signed integer,
the same convention as quantkit: w = (q - zero) * scale): int8 in int-quantized (and for per-tensor
grids), int32 packed along the *output* dim in pack-quantized. Static activations add ``input_scale``
(float32 [1]) and, asymmetric, ``input_zero_point`` (int8 [1]); dynamic per-token activations store
nothing. ``config.json`` gains ``quantization_config`` (quant_method "compressed-tensors", format, one
config group per distinct scheme, ``ignore`` = every Linear left in float, lm_head included).

Refused, naming the layer, before anything is written: act-order g_idx (compressed-tensors removed
group activation ordering), weight or activation group sizes that do not divide the input dim (its group
kernels need whole groups; 2-D weight blocks are padded by the format itself), fractional zero points (its
zero points are integers).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.exporters.source import ExportSource
from quantkit.files import (
    EXPORT_MARKER,
    ShardedWriter,
    check_output_path,
    staged_directory,
)
from quantkit.formats import packing
from quantkit.formats.schemes import ActivationSpec, Scheme, WeightSpec
from quantkit.native.writer import LinearRecord

QUANT_METHOD = "compressed-tensors"
INT_QUANTIZED = "int-quantized"
PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
NVFP4_PACKED = "nvfp4-pack-quantized"
MXFP4_PACKED = "mxfp4-pack-quantized"
MIXED = "mixed-precision"
# compressed-tensors' scale_dtype of a quantkit scale format, where it is not the model's float dtype
_SCALE_DTYPES = {"e8m0": "torch.uint8", "fp8_e4m3": "torch.float8_e4m3fn"}
_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "vocab.json", "merges.txt")


@dataclass
class CTExportResult:
    out: Path
    format: str
    groups: dict[str, dict]                  # group name -> {format, scheme, layers}
    ignore: list[str]
    notes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    def to_dict(self) -> dict:
        return {"out": str(self.out), "format": "compressed-tensors", "quantization_format": self.format,
                "groups": self.groups, "ignore": self.ignore, "notes": self.notes, "size_bytes": self.size_bytes}


def _type(format_name: str) -> str:
    """compressed-tensors' QuantizationType of an element grid: int, or float (fp8 e4m3)."""
    return "int" if format_name == "int" else "float"


def weight_args(spec: WeightSpec) -> dict:
    """compressed-tensors QuantizationArgs of a quantkit weight grid (a global scale makes the strategy
    "tensor_group"; 2-D blocks name their ``block_structure``; fp8/e8m0 scales their ``scale_dtype``)."""
    args = {"num_bits": spec.bits, "type": _type(spec.format), "symmetric": spec.symmetric,
            "group_size": spec.group_size if spec.granularity == "group" else None,
            "strategy": "tensor_group" if spec.second_scale else spec.granularity, "dynamic": False}
    if spec.granularity == "block":
        args["block_structure"] = list(spec.block_shape)
    if spec.scale_format in _SCALE_DTYPES:
        args["scale_dtype"] = _SCALE_DTYPES[spec.scale_format]
    return args


def activation_args(spec: ActivationSpec) -> dict:
    """compressed-tensors QuantizationArgs of a quantkit activation grid (token and group = dynamic;
    NVFP4's dynamic group scales under a static global scale are "local" dynamic, "tensor_group")."""
    args = {"num_bits": spec.bits, "type": _type(spec.format), "symmetric": spec.symmetric,
            "group_size": spec.group_size, "strategy": spec.granularity, "dynamic": spec.dynamic}
    if spec.second_scale is not None:
        args.update(strategy="tensor_group", dynamic="local")
    if spec.scale_format in _SCALE_DTYPES:
        args["scale_dtype"] = _SCALE_DTYPES[spec.scale_format]
    return args


def layer_format(scheme: Scheme) -> str:
    if scheme.weight.format == "fp4_e2m1":
        return NVFP4_PACKED if scheme.weight.second_scale else MXFP4_PACKED
    if scheme.weight.format != "int":
        return FLOAT_QUANTIZED
    return INT_QUANTIZED if scheme.activation is not None else PACK_QUANTIZED


def export_compressed_tensors(source_dir, out, *, overwrite: bool = False) -> CTExportResult:
    """Write the quantkit output ``source_dir`` as a compressed-tensors checkpoint directory ``out``."""
    source = ExportSource.open(source_dir, require_manifest=True)
    out = Path(out)
    check_output_path(out, overwrite, [source.path])
    groups, ignore = _plan(source)
    quantization_config = _quantization_config(groups, ignore)
    with staged_directory(out, overwrite) as staging:
        writer = ShardedWriter(staging)
        _write_tensors(source, writer)
        files = writer.finish()
        _write_config(source, staging, quantization_config)
        _write_marker(source, staging)
        for name in _COPIED_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, staging / name)
    size = sum((out / f).stat().st_size for f in files)
    notes = _notes(groups)
    summary = {name: {"format": group["format"], "scheme": group["scheme"], "layers": len(group["layers"])}
               for name, group in groups.items()}
    return CTExportResult(out.resolve(), quantization_config["format"], summary, ignore, notes, size)


def _plan(source: ExportSource) -> tuple[dict[str, dict], list[str]]:
    """Config groups (one per distinct scheme, layers in model order) and the ignore list; every
    layer the format cannot express is refused here, before anything is written."""
    by_scheme: dict[str, dict] = {}
    ignore = []
    for name in source.linear_names():
        if not source.is_quantized(name):
            ignore.append(name)
            continue
        entry = source.manifest.layers[name]
        _check_expressible(name, entry)
        scheme = entry.scheme
        inputs = activation_args(scheme.activation) if scheme.activation is not None else None
        key = json.dumps([weight_args(scheme.weight), inputs])
        group = by_scheme.setdefault(key, {"format": layer_format(scheme), "scheme": scheme.describe(),
                                           "weights": weight_args(scheme.weight), "input_activations": inputs,
                                           "layers": []})
        group["layers"].append(source.arch.exported_name(name))
    if not by_scheme:
        raise QuantkitError(f"{source.path} has no quantized layers to export")
    if source.arch.lm_head not in ignore and not source.is_quantized(source.arch.lm_head):
        ignore.append(source.arch.lm_head)        # tied to the embeddings: still never a quantization target
    # float Linears inside blocks (MoE routers, the shared-expert gate) are never targets either
    ignore += [f"{source.arch.blocks}.{i}.{module}" for i in range(source.num_blocks)
               for module in source.arch.float_modules]
    ignore = [source.arch.exported_name(name) for name in ignore]
    return {f"group_{i}": group for i, group in enumerate(by_scheme.values())}, ignore


def _check_expressible(name: str, entry) -> None:
    spec = entry.scheme.weight
    out_features, in_features = entry.shape
    if spec.k_format is not None:
        raise QuantkitError(f"layer {name}: {spec.k_format.name} is llama.cpp's grid (fp16 super-block scales over "
                            "integer sub-block scales and mins), which compressed-tensors cannot express; export it "
                            "with --format gguf")
    if "g_idx" in entry.tensors:
        raise QuantkitError(f"layer {name}: act-order g_idx cannot be expressed in compressed-tensors "
                            "(group activation ordering was removed from the format)")
    if spec.granularity == "group" and in_features % spec.group_size:
        raise QuantkitError(f"layer {name}: input dim {in_features} is not a multiple of group size "
                            f"{spec.group_size}; compressed-tensors needs whole groups")
    activation = entry.scheme.activation
    if activation is not None and activation.granularity == "group" and in_features % activation.group_size:
        raise QuantkitError(f"layer {name}: input dim {in_features} is not a multiple of the activation group size "
                            f"{activation.group_size}; compressed-tensors and vLLM quantize activations in whole "
                            "groups (use fp8_dynamic, or a model whose dims are multiples of it)")
    if not entry.integer_zero:
        raise QuantkitError(f"layer {name}: fractional zero points (HQQ's, or llama.cpp's Q4_1/Q5_1 minimums from "
                            "imatrix or gptq llama_cpp) cannot be expressed in compressed-tensors, whose zero points "
                            "are integers")
    if layer_format(entry.scheme) == PACK_QUANTIZED and spec.bits > 8:
        raise QuantkitError(f"layer {name}: {spec.bits}-bit weights cannot be packed")


def _quantization_config(groups: dict[str, dict], ignore: list[str]) -> dict:
    formats = {group["format"] for group in groups.values()}
    mixed = len(formats) > 1
    config_groups = {}
    for name, group in groups.items():
        # One group: it targets every Linear (minus ignore). Several: each names its layers exactly.
        targets = ["Linear"] if len(groups) == 1 else list(group["layers"])
        config_groups[name] = {"targets": targets, "weights": group["weights"],
                               "input_activations": group["input_activations"], "output_activations": None}
        if mixed:
            config_groups[name]["format"] = group["format"]
    return {"quant_method": QUANT_METHOD, "format": MIXED if mixed else formats.pop(),
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}


def _notes(groups: dict[str, dict]) -> list[str]:
    notes = []
    for group in groups.values():
        weights, inputs = group["weights"], group["input_activations"]
        if inputs is not None and not weights["symmetric"]:
            notes.append(f"{group['scheme']}: vLLM's int8 W8A8 kernels take symmetric weights only; this group "
                         "loads in transformers (compressed-tensors) but not in vLLM")
        if inputs is not None and inputs["dynamic"] is True and inputs["type"] == "int":
            notes.append(f"{group['scheme']}: dynamic per-token scales are computed by the runtime (vLLM: absmax/127, "
                         "as quantkit; compressed-tensors' CPU reference: absmax/127.5)")
    return notes


def linear_tensors(name: str, record: LinearRecord, scheme: Scheme,
                   scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized Linear (module-relative names prefixed by ``name``).
    ``scale_dtype``: float16 or float32, both hold quantkit's fp16 scale values exactly."""
    quant = record.quant
    spec = quant.spec
    out_features, in_features = quant.shape
    tensors = {"weight_scale": _stored_scale(quant, scale_dtype)}
    if layer_format(scheme) in (NVFP4_PACKED, MXFP4_PACKED):
        tensors["weight_packed"] = packing.pack_fp4(quant.codes)
        if quant.global_scale is not None:
            tensors["weight_global_scale"] = quant.global_scale.float().reshape(1)
        if record.input_global_scale is not None:
            tensors["input_global_scale"] = record.input_global_scale.float().reshape(1)
    elif layer_format(scheme) == FLOAT_QUANTIZED:
        tensors["weight"] = quant.codes              # float8_e4m3fn values, as compressed-tensors stores them
    elif layer_format(scheme) == INT_QUANTIZED:
        tensors["weight"] = quant.codes.to(torch.int8)
    else:
        words = -(-in_features * spec.bits // 32)    # dense: no padding bits beyond the last code
        tensors["weight_packed"] = packing.pack(quant.codes, spec.bits)[:, :words].contiguous()
        tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64)
    if quant.zero is not None:
        zero = _shaped(quant.zero.round().to(torch.int8), spec)
        if layer_format(scheme) == PACK_QUANTIZED and spec.granularity in ("group", "channel"):
            # packed along the output dim: the [out, G] matrix's columns are packed like rows
            words = -(-out_features * spec.bits // 32)
            zero = packing.pack(zero.t().contiguous(), spec.bits)[:, :words].t().contiguous()
        tensors["weight_zero_point"] = zero
    if record.input_scale is not None:
        tensors["input_scale"] = record.input_scale.float().reshape(1)
    if record.input_zero is not None:
        tensors["input_zero_point"] = record.input_zero.round().to(torch.int8).reshape(1)
    if record.bias is not None:
        tensors["bias"] = record.bias
    return {f"{name}.{key}": value for key, value in tensors.items()}


def _stored_scale(quant, scale_dtype: torch.dtype) -> torch.Tensor:
    """``weight_scale`` as compressed-tensors stores it: e8m0 as the biased exponent byte (2^E -> E + 127),
    NVFP4's as float8_e4m3fn, fp8 grids' float32 values exactly, integer grids' fp16 values in
    ``scale_dtype``."""
    spec = quant.spec
    if spec.scale_format == "e8m0":
        return (torch.log2(quant.scale).round().to(torch.int32) + 127).to(torch.uint8)
    if spec.scale_format == "fp8_e4m3":
        return quant.scale.to(torch.float8_e4m3fn)
    return _shaped(quant.scale.to(torch.float32 if spec.format != "int" else scale_dtype), spec)


def _shaped(param: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """[R, G] quantkit parameter -> compressed-tensors shape: [1] tensor, [out, 1] channel, [out, G] group."""
    return param.reshape(1) if spec.granularity == "tensor" else param


def scale_dtype_for(storage_dtype: str) -> torch.dtype:
    """float32 for float32 models (compressed-tensors keeps scales in the model dtype, and its
    dequantize-on-load computes in the scale's dtype); float16 otherwise, which holds quantkit's
    scales exactly where bfloat16 would round them."""
    return torch.float32 if storage_dtype == "float32" else torch.float16


def _write_tensors(source: ExportSource, writer: ShardedWriter) -> None:
    scale_dtype = scale_dtype_for(source.manifest.storage_dtype)
    quantized_tensors = set()
    for name in source.linear_names():
        if source.is_quantized(name):
            entry = source.manifest.layers[name]
            quantized_tensors |= set(entry.tensors.values())
            writer.add(linear_tensors(source.arch.exported_name(name), source.record(name), entry.scheme, scale_dtype))
    for name in sorted(source.checkpoint.weight_map):
        if name not in quantized_tensors:
            writer.add({source.arch.exported_name(name): source.tensor(name)})


def _write_marker(source: ExportSource, directory: Path) -> None:
    """Marks the directory as quantkit's, so that ``--overwrite`` may replace it later."""
    import quantkit

    marker = {"tool": "quantkit", "version": quantkit.__version__, "format": QUANT_METHOD, "source": str(source.path)}
    (directory / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _write_config(source: ExportSource, directory: Path, quantization_config: dict) -> None:
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise QuantkitError(f"cannot read {source.path / 'config.json'}: {error}") from None
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
