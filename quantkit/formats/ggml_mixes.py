"""llama.cpp's K-quant file types (``llama-quantize MODEL OUT Q4_K_M``): which ggml type each tensor gets.

A file type names a base tensor type and a few per-tensor promotions, decided by the tensor's role, its
layer and the model's shape, exactly as llama.cpp's ``llama_tensor_get_type`` does for the same GGUF
tensor names (src/llama-quant.cpp); then rows whose length is not a multiple of the type's block fall
back to a 32-block type (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when even 32
does not divide). SmolLM2's 576-wide rows fall back everywhere but ``ffn_down`` (1536 wide).

  file type  base   promotions
  Q2_K       Q2_K   attn_v Q3_K (Q4_K with >= 4 query heads per kv head), ffn_down Q3_K, attn_output Q3_K
  Q3_K_S     Q3_K   -
  Q3_K_M     Q3_K   attn_v Q5_K in the first 2 layers, else Q4_K; ffn_down Q5_K in the first 1/16 of the
                    layers, else Q4_K; attn_output Q4_K
  Q3_K_L     Q3_K   attn_v, ffn_down, attn_output Q5_K
  Q4_K_S     Q4_K   attn_v of the first 4 layers Q5_K; ffn_down of the first 1/8 of the layers Q5_K
  Q4_K_M     Q4_K   attn_v and ffn_down Q6_K where use_more_bits (the first and last 1/8 of the layers and
                    every third layer between)
  Q5_K_S     Q5_K   -
  Q5_K_M     Q5_K   as Q4_K_M
  Q6_K       Q6_K   -
Every file type: output.weight (and token_embd.weight when the embeddings are tied) Q6_K, or Q8_0 when its
rows are not a multiple of 256; 8-expert models get attn_v and attn_k in Q8_0 and attn_output in Q5_K
(for Q2_K, Q3_K_S/M and Q4_K_S/M); 70B Llama models get attn_v Q5_K instead of Q3_K/Q4_K.
``Q3_K``, ``Q4_K`` and ``Q5_K`` as file types mean Q3_K_M, Q4_K_M and Q5_K_M (llama-quantize's aliases).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.formats.kquants import K_FORMATS, SUPER

BASE_TYPES = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
              "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


# The file types usable as a scheme name (quantkit calibrate --scheme): gguf:<type> for every file type above
# and its aliases, and the _S/_M/_L mixes under their own names (q2_k ... q6_k alone are uniform grids).
FILE_TYPE_SCHEMES = {
    **{f"gguf:{name.lower()}": name for name in BASE_TYPES},
    **{f"gguf:{alias.lower()}": target for alias, target in ALIASES.items()},
    **{name.lower(): name for name in BASE_TYPES if name[-2] == "_" and name[-1] in "SML"},
}


def scheme_file_type(scheme_name: str) -> str | None:
    """The file type a scheme name means (``q4_k_m``, ``gguf:q4_k_m`` -> Q4_K_M), or None."""
    return FILE_TYPE_SCHEMES.get(scheme_name.lower())


def file_type(name: str) -> str | None:
    """The K-quant file type ``name`` means (aliases resolved), or None."""
    name = ALIASES.get(name, name)
    return name if name in BASE_TYPES else None


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's type choice reads from the model."""

    n_layers: int
    n_gqa: int                # query heads per kv head
    n_expert: int             # 0 for dense models
    is_70b: bool              # llama.cpp's LLM_TYPE_70B (Llama with 80 layers)
    tied: bool                # no output.weight: token_embd is quantized as the output


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                           ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                           ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def _promoted(mix: str, category: str, layer: int, model: ModelShape) -> str | None:
    """The promotion of one tensor under ``mix`` (None: the base type)."""
    n = model.n_layers
    if category == "attn_v":
        if model.n_expert == 8:
            return "Q8_0"
        chosen = {"Q2_K": "Q4_K" if model.n_gqa >= 4 else "Q3_K",
                  "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K",
                  "Q3_K_L": "Q5_K",
                  "Q4_K_M": "Q6_K" if use_more_bits(layer, n) else None,
                  "Q5_K_M": "Q6_K" if use_more_bits(layer, n) else None,
                  "Q4_K_S": "Q5_K" if layer < 4 else None}.get(mix)
        if model.is_70b and (chosen or BASE_TYPES[mix]) in ("Q3_K", "Q4_K"):
            return "Q5_K"
        return chosen
    if category == "attn_k":
        return "Q8_0" if model.n_expert == 8 else None
    if category == "ffn_down":
        return {"Q2_K": "Q3_K",
                "Q3_K_M": "Q5_K" if layer < n // 16 else "Q4_K",
                "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if use_more_bits(layer, n) else None,
                "Q5_K_M": "Q6_K" if use_more_bits(layer, n) else None,
                "Q4_K_S": "Q5_K" if layer < n // 8 else None}.get(mix)
    if category == "attn_output":
        if model.n_expert == 8:
            return "Q5_K" if mix in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else None
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix)
    return None


def _block(ggml_type: str) -> int:
    return SUPER if ggml_type in K_FORMATS else 32


def tensor_type(mix: str, name: str, row_length: int, model: ModelShape) -> tuple[str, str]:
    """(ggml type, why) of the GGUF tensor ``name`` whose rows hold ``row_length`` values under ``mix``."""
    base = BASE_TYPES[mix]
    category = _category(name)
    if category == "output" or (category == "token_embd" and model.tied):
        if row_length % _block(base):
            return "Q8_0", f"{mix}: output tensor with rows of {row_length}, not a multiple of {_block(base)}"
        return "Q6_K", f"{mix}: output tensor"
    layer = _layer(name)
    chosen = _promoted(mix, category, layer, model) or base
    why = f"{mix}: {category} promoted to {chosen}" if chosen != base else f"{mix}"
    return fit(chosen, row_length, why)


def fit(ggml_type: str, row_length: int, why: str = "") -> tuple[str, str]:
    """(type, why) for rows of ``row_length`` values: ``ggml_type``, or llama.cpp's fallback when its block
    does not divide the rows (F16 when even 32 does not)."""
    if row_length % _block(ggml_type) == 0:
        return ggml_type, why
    prefix = f"{why}; " if why else ""
    fallback = FALLBACK.get(ggml_type, ggml_type)
    if row_length % _block(fallback):
        return "F16", f"{prefix}rows of {row_length} fit no block type"
    return fallback, f"{prefix}rows of {row_length} are not a multiple of 256: {fallback}, as llama.cpp"
