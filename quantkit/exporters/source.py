"""What exporters read: a quantkit output directory (manifest + packed safetensors), or a float HF
checkpoint directory, behind one interface that never modifies the input.

A Linear is either quantized (the manifest has an entry: its `LinearRecord`, a `QuantTensor` plus
activation parameters, is read from the file tensors alone) or float (its ``.weight`` is read as stored).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.primitives import all_finite
from quantkit.model.architectures import Architecture, architecture_for
from quantkit.model.checkpoint import Checkpoint, check_weights, expected_tensors
from quantkit.native.loader import check_manifest_present, open_native, read_record
from quantkit.native.manifest import MANIFEST_NAME, Manifest
from quantkit.native.writer import LinearRecord


@dataclass
class ExportSource:
    path: Path
    checkpoint: Checkpoint
    arch: Architecture
    manifest: Manifest | None          # None: a float HF checkpoint

    @classmethod
    def open(cls, path, *, require_manifest: bool) -> "ExportSource":
        """Open ``path``; a directory without ``quant_manifest.json`` is accepted only when
        ``require_manifest`` is False (then it must be a float HF checkpoint)."""
        path = Path(path)
        if not path.exists():
            raise QuantkitError(f"input directory not found: {path}")
        if not path.is_dir():
            raise QuantkitError(f"input {path} is a file; give a quantkit output directory")
        has_manifest = (path / MANIFEST_NAME).is_file()
        if has_manifest:
            checkpoint, manifest = open_native(path)
            return cls(path, checkpoint, architecture_for(checkpoint.config), manifest)
        checkpoint = Checkpoint(path) if (path / "config.json").is_file() else None
        if checkpoint is not None:
            check_manifest_present(checkpoint)
        if require_manifest:
            raise QuantkitError(f"{path} has no {MANIFEST_NAME}; is it a quantkit output directory?")
        if checkpoint is None:
            raise QuantkitError(f"{path} is neither a quantkit output directory ({MANIFEST_NAME}) nor a "
                                "Hugging Face checkpoint (config.json)")
        arch = architecture_for(checkpoint.config)
        if getattr(checkpoint.config, "quantization_config", None):
            raise QuantkitError(f"{path} is already quantized (config.json has quantization_config) and has "
                                f"no {MANIFEST_NAME}; export reads quantkit outputs and float checkpoints")
        check_weights(path, checkpoint.shapes(), expected_tensors(checkpoint.config))
        return cls(path, checkpoint, arch, None)

    @property
    def config(self):
        """The language model's settings (a multimodal checkpoint's text_config)."""
        return self.checkpoint.text_config

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def name(self) -> str:
        if self.manifest is not None:
            requested = self.manifest.source.requested or self.manifest.source.path or self.path.name
            return Path(str(requested)).name
        return self.path.name

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.checkpoint.config, "tie_word_embeddings", False))

    def linear_names(self) -> list[str]:
        """Every Linear the exporters handle: the blocks' linears in table order, then the lm_head
        (absent when tied to the embeddings and not stored)."""
        names = self.arch.block_linears(self.num_blocks)
        lm_head = self.arch.lm_head
        if not self.tied_embeddings or self.is_quantized(lm_head) or self.checkpoint.has(f"{lm_head}.weight"):
            names.append(lm_head)
        return names

    def is_quantized(self, name: str) -> bool:
        return self.manifest is not None and name in self.manifest.layers

    def record(self, name: str) -> LinearRecord:
        """A quantized Linear as the files hold it: its `QuantTensor` and activation parameters."""
        entry = self.manifest.layers[name]
        return read_record(entry, self.checkpoint.tensors(list(entry.tensors.values())))

    def quant_params(self, name: str) -> dict[str, torch.Tensor]:
        """The small tensors of a quantized layer (everything but the codes), by role."""
        entry = self.manifest.layers[name]
        wanted = {role: tensor for role, tensor in entry.tensors.items() if role != "codes"}
        loaded = self.checkpoint.tensors(list(wanted.values()))
        return {role: loaded[tensor] for role, tensor in wanted.items()}

    def has(self, name: str) -> bool:
        return self.checkpoint.has(name)

    def tensor(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.tensors([name])[name]
        if torch.is_floating_point(tensor) and not all_finite(tensor):
            raise QuantkitError(f"NaN/Inf in tensor {name} of {self.path}")
        return tensor

    def bias_name(self, linear: str) -> str | None:
        """The stored bias of a Linear, if it has one (quantized layers keep it as ``<name>.bias``)."""
        name = f"{linear}.bias"
        return name if self.checkpoint.has(name) else None
