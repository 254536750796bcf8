"""Reading the native output: a checked directory (manifest and tensors), each quantized Linear as a
`LinearRecord`, and the runnable model (`load_quantized`). File layout: `quantkit.native.writer`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import packing, primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.model.checkpoint import (
    Checkpoint,
    ExpectedTensors,
    build_skeleton,
    check_weights,
    expected_tensors,
)
from quantkit.model.qlinear import QuantLinear, set_submodule
from quantkit.native.manifest import MANIFEST_NAME, LayerEntry, Manifest
from quantkit.native.writer import LinearRecord


def read_record(entry: LayerEntry, tensors: dict[str, torch.Tensor]) -> LinearRecord:
    """Inverse of `record_tensors`, driven by the manifest entry alone."""
    spec, names = entry.scheme.weight, entry.tensors
    out_features, in_features = entry.shape
    codes = tensors[names["codes"]]
    if entry.codes_layout == "int32-packed":
        codes = packing.unpack(codes, spec.bits, in_features)
    elif entry.codes_layout == "fp4_e2m1-packed":
        if codes.dtype != torch.uint8 or codes.shape != (out_features, -(-in_features // 2)):
            raise QuantkitError(f"codes of {names['codes']} are {codes.dtype} {tuple(codes.shape)}, expected packed "
                                f"fp4 uint8 {(out_features, -(-in_features // 2))}")
        codes = packing.unpack_fp4(codes, in_features)
    if tuple(codes.shape) != (out_features, in_features):
        raise QuantkitError(f"codes of {names['codes']} have shape {tuple(codes.shape)}, manifest says {entry.shape}")
    zero = tensors[names["zero"]].float() if "zero" in names else None
    g_idx = tensors[names["g_idx"]] if "g_idx" in names else None
    global_scale = tensors[names["global_scale"]].float() if "global_scale" in names else None
    supers = {role: tensors[names[role]].float() for role in ("super_scale", "super_min") if role in names}
    weight = QuantTensor(codes.to(primitives.code_dtype(spec.element)), tensors[names["scale"]].float(), zero, spec,
                         g_idx, global_scale, **supers)
    return LinearRecord(
        weight, input_scale=tensors.get(names.get("input_scale", "")),
        input_zero=tensors[names["input_zero"]].float() if "input_zero" in names else None,
        bias=tensors.get(names.get("bias", "")),
        input_global_scale=tensors.get(names.get("input_global_scale", "")),
    )


def quant_linear_from_tensors(entry: LayerEntry, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    return read_record(entry, tensors).module(entry.scheme.activation)


QUANT_TENSOR_SUFFIXES = (".weight_codes", ".weight_scale", ".weight_zero", ".weight_g_idx", ".weight_global_scale",
                          ".weight_super_scale", ".weight_super_min")


def check_native_weights(path: Path, checkpoint: Checkpoint, manifest: Manifest) -> None:
    """The output directory holds exactly the tensors its config and manifest call for: every quantized
    layer's tensors, every other weight of the model with its shape, and nothing else."""
    expected = expected_tensors(checkpoint.config)
    for name, entry in manifest.layers.items():
        if f"{name}.weight" not in expected.shapes:
            raise QuantkitError(f"{path}: the manifest names layer {name}, which the model has no Linear for")
        missing = [t for t in entry.tensors.values() if not checkpoint.has(t)]
        if missing:
            raise QuantkitError(f"{path} is incomplete: layer {name} lacks tensor {missing[0]}")
    replaced = {f"{name}.weight" for name in manifest.layers}
    plain = ExpectedTensors({n: s for n, s in expected.shapes.items() if n not in replaced}, expected.optional)
    quantized = frozenset(t for entry in manifest.layers.values() for t in entry.tensors.values())
    check_weights(path, checkpoint.shapes(), plain, extra=quantized)


def check_manifest_present(checkpoint: Checkpoint) -> None:
    """A directory with quantkit's packed tensors but no manifest cannot be read as a float model
    (every quantized Linear's ``weight`` is missing): say what happened instead."""
    packed = [n for n in checkpoint.weight_map if n.endswith(QUANT_TENSOR_SUFFIXES)]
    if packed:
        raise QuantkitError(f"{checkpoint.path} holds quantkit tensors ({packed[0]}, ...) but no {MANIFEST_NAME}; "
                            "without its manifest the quantized model cannot be loaded (restore the file or "
                            "recalibrate)")


def open_native(path: Path) -> tuple[Checkpoint, Manifest]:
    """The files and manifest of a native output directory, checked: the manifest is well formed, and
    the tensors are exactly those it and the config call for."""
    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"quantized model directory not found: {path}")
    if not (path / MANIFEST_NAME).is_file() and (path / "config.json").is_file():
        check_manifest_present(Checkpoint(path))
    manifest = Manifest.load(path)
    storage = getattr(torch, str(manifest.storage_dtype), None)
    if not isinstance(storage, torch.dtype) or not storage.is_floating_point:
        raise QuantkitError(f"{path / MANIFEST_NAME}: storage_dtype '{manifest.storage_dtype}' is not a float dtype")
    files = Checkpoint(path)
    check_native_weights(path, files, manifest)
    return files, manifest


def load_quantized(path, *, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """The quantized model of a native output directory, from its manifest and safetensors alone.

    Float tensors kept from the source load in the manifest's storage dtype unless ``dtype`` is given;
    QuantLinear buffers keep their stored integer/fp16/fp32 types. A missing, unexpected or misshapen
    tensor is a `QuantkitError`: no weight is ever left at random.
    """
    path = Path(path)
    files, manifest = open_native(path)
    dtype = dtype or getattr(torch, manifest.storage_dtype)
    model = build_skeleton(files.config, dtype)
    for name, entry in manifest.layers.items():
        tensors = files.tensors(list(entry.tensors.values()))
        set_submodule(model, name, quant_linear_from_tensors(entry, tensors))
    quantized_names = {t for entry in manifest.layers.values() for t in entry.tensors.values()}
    plain = {name for name in files.weight_map if name not in quantized_names}
    state = {name: t.to(dtype) if torch.is_floating_point(t) else t for name, t in files.tensors(sorted(plain)).items()}
    model.load_state_dict(state, strict=False, assign=True)
    _tie_if_needed(model, files.config)
    leftover = [name for name, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise QuantkitError(f"{path} is incomplete: no tensor for {leftover[0]}" +
                            (f" and {len(leftover) - 1} more" if len(leftover) > 1 else ""))
    return model.to(device).eval()


def _tie_if_needed(model: nn.Module, config) -> None:
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and output is not None and output.weight.is_meta:
        output.weight = inputs.weight


def load_search_results(path: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The output's search results (smoothing factors, algorithm results, input statistics), by name;
    empty when the manifest names none, an error when the file it names is missing."""
    if not manifest.search_results:
        return {}
    from safetensors.torch import load_file

    file = Path(path) / manifest.search_results
    if not file.is_file():
        raise QuantkitError(f"{file} named by the manifest is missing")
    return load_file(str(file))
