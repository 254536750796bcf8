"""The native output: packed safetensors + ``quant_manifest.json``, and the loader that rebuilds the model.

Tensors of a quantized Linear ``L`` (roles recorded in the manifest's ``tensors`` map):
  L.weight_codes  int8 [out, in] for 8-bit; int32 [out, ceil(in/32)*bits] packed (packing.py) below 8
  L.weight_scale  float16 [R, G]          L.weight_zero  int8 [R, G] (float32 when fractional)
  L.weight_g_idx  int32 [in] (act-order)  L.input_scale  float32 [1] (static activations)
  L.input_zero    int8 [1] (static asym)  L.bias         storage dtype [out]
Everything else (embeddings, smoothed norms, lm_head) is stored under its HF name in the source dtype.
Shards: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.algorithms import packing
from quantkit.algorithms.quant_tensor import QuantTensor
from quantkit.checkpoint import Checkpoint, ExpectedTensors, build_skeleton, check_weights, expected_tensors
from quantkit.errors import QuantkitError
from quantkit.exporters.manifest import MANIFEST_NAME, LayerEntry, Manifest
from quantkit.qlinear import QuantLinear, set_submodule

DEFAULT_SHARD_BYTES = 2 * 1024**3


def codes_layout(bits: int) -> str:
    return "int8" if bits == 8 else "int32-packed"


def quant_linear_tensors(name: str, layer: QuantLinear) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file tensors of one QuantLinear and the role -> tensor-name map for the manifest."""
    spec = layer.weight_spec
    codes = layer.weight_codes if spec.bits == 8 else packing.pack(layer.weight_codes, spec.bits)
    by_role = {"codes": codes, "scale": layer.weight_scale}
    if layer.weight_zero is not None:
        zero = layer.weight_zero
        integral = torch.equal(zero, torch.round(zero))
        by_role["zero"] = zero.to(torch.int8) if integral else zero.float()
    if layer.weight_g_idx is not None:
        by_role["g_idx"] = layer.weight_g_idx
    if layer.input_scale is not None:
        by_role["input_scale"] = layer.input_scale
    if layer.input_zero is not None:
        by_role["input_zero"] = layer.input_zero.to(torch.int8)
    if layer.bias is not None:
        by_role["bias"] = layer.bias
    suffix = {"codes": "weight_codes", "scale": "weight_scale", "zero": "weight_zero", "g_idx": "weight_g_idx",
              "input_scale": "input_scale", "input_zero": "input_zero", "bias": "bias"}
    names = {role: f"{name}.{suffix[role]}" for role in by_role}
    return {names[role]: t.contiguous() for role, t in by_role.items()}, names


def quant_linear_from_tensors(entry: LayerEntry, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    """Inverse of `quant_linear_tensors`, driven by the manifest entry alone."""
    spec, names = entry.scheme.weight, entry.tensors
    out_features, in_features = entry.shape
    codes = tensors[names["codes"]]
    if entry.codes_layout == "int32-packed":
        codes = packing.unpack(codes, spec.bits, in_features)
    if tuple(codes.shape) != (out_features, in_features):
        raise QuantkitError(f"codes of {names['codes']} have shape {tuple(codes.shape)}, manifest says {entry.shape}")
    zero = tensors[names["zero"]].float() if "zero" in names else None
    g_idx = tensors[names["g_idx"]] if "g_idx" in names else None
    weight = QuantTensor(codes.to(torch.int8), tensors[names["scale"]].float(), zero, spec, g_idx)
    return QuantLinear(
        weight, entry.scheme.activation,
        input_scale=tensors.get(names.get("input_scale", "")),
        input_zero=tensors[names["input_zero"]].float() if "input_zero" in names else None,
        bias=tensors.get(names.get("bias", "")),
    )


class ShardedWriter:
    """Writes tensors as they come in shards of at most ``max_shard_bytes``; `finish` names them."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.parts: list[tuple[Path, list[str]]] = []
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            assert name not in self.buffer, name
            self.buffer[name] = tensor.detach().contiguous()
            self.buffer_bytes += tensor.numel() * tensor.element_size()
        if self.buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.directory / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Final file names: one ``model.safetensors``, or numbered shards plus an index."""
        self.flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        total = len(self.parts)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            path.rename(self.directory / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": sum((self.directory / f).stat().st_size for f in files)},
                 "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files


QUANT_TENSOR_SUFFIXES = (".weight_codes", ".weight_scale", ".weight_zero", ".weight_g_idx")


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
