"""llama.cpp's tensor names for a model's HF tensors (gguf-py's `TensorNameMap`, after the architecture
table's renames), shared by the GGUF exporter and the llama.cpp file-type recipes (`run/mixes.py`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.errors import QuantkitError
from quantkit.formats import ggml_mixes
from quantkit.model.architectures import Architecture


@dataclass
class GGUFNames:
    """HF -> GGUF tensor names of one model (``blk.3.attn_v.weight``)."""

    table: object
    arch: Architecture

    @classmethod
    def of(cls, arch: Architecture, num_blocks: int) -> "GGUFNames":
        import gguf

        if arch.gguf_arch is None:
            raise QuantkitError(f"architecture {arch.name} has no GGUF mapping")
        key = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch.gguf_arch)
        return cls(gguf.get_tensor_name_map(key, num_blocks), arch)

    def get_name(self, name: str, try_suffixes=()) -> str | None:
        return self.table.get_name(self.arch.gguf_source_name(name), try_suffixes=try_suffixes)

    def linear_weight(self, linear: str) -> tuple[str, int | None]:
        """(GGUF weight name, expert) of a block Linear: an expert's Linear is row e of its stacked tensor
        (``....mlp.experts.3.down_proj`` -> ``blk.N.ffn_down_exps.weight``, 3); any other has its own (None)."""
        experts = self.arch.experts
        if experts is not None:
            match = re.search(rf"\.{re.escape(experts.container)}\.(\d+)\.", linear)
            if match:
                merged = f"{linear[:match.start()]}.{experts.container}.{linear[match.end():]}"
                return self.gguf_name(merged + ".weight"), int(match.group(1))
        return self.gguf_name(linear + ".weight"), None

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of ``hf_name`` (with its .weight/.bias suffix); a name with none is an error."""
        name = self.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QuantkitError(f"tensor {hf_name} has no GGUF name")
        return name


def model_shape(arch: Architecture, config, tied: bool) -> ggml_mixes.ModelShape:
    """What llama.cpp's choice of tensor types (`ggml_mixes`) reads from the model; ``tied``: the output
    tensor is the token embedding."""
    n_heads = config.num_attention_heads
    return ggml_mixes.ModelShape(
        n_layers=config.num_hidden_layers, n_gqa=n_heads // (getattr(config, "num_key_value_heads", None) or n_heads),
        n_expert=0 if arch.experts is None else arch.experts.num_experts(config),
        is_70b=arch.gguf_arch == "llama" and config.num_hidden_layers == 80, tied=tied)
