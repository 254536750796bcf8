"""Architecture knowledge as data: where the blocks are, which norm feeds which linears.

Keyed by the HF ``config.architectures[0]`` name. An architecture missing from `ARCHITECTURES` is an
error, never a silent Llama fallback. All names inside a block are relative to the block module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears sharing one input, and the op in front of them that can absorb a per-channel scale.

    prev:      the module producing the shared input (a norm, or a linear whose output rows feed it)
    consumers: the linears reading that input
    loss_on:   the module whose output an AWQ search compares (the attention/MLP, or the consumer)
    """

    prev: str
    consumers: tuple[str, ...]
    loss_on: str
    # The consumers' input channels repeat prev's output channels once per query head of a GQA
    # group (v_proj -> o_proj): one factor per prev channel, shared by its copies.
    gqa_shared: bool = False


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str                           # ModuleList of decoder blocks, from the model root
    embeddings: str
    final_norm: str
    lm_head: str
    rotary: str | None                    # module computing rotary embeddings once per forward
    # Linears of a block in true-sequential order: each stage's inputs depend only on earlier stages.
    sequential: tuple[tuple[str, ...], ...]
    smooth: tuple[ScaleGroup, ...]        # SmoothQuant pairs (norm -> consumers)
    awq: tuple[ScaleGroup, ...]           # AWQ scaling groups (norms, plus linear -> linear folds)
    norm_offset: float = 0.0              # 1.0 for Gemma-style norms computing x * (1 + w)
    gguf_arch: str | None = None          # llama.cpp architecture name when GGUF export supports it
    block_norms: tuple[str, ...] = ()     # the block's norm modules, in order
    # Projections whose output rows are rotary head halves, and the config field giving their head
    # count (llama.cpp's llama layout interleaves them: the GGUF export permutes these rows).
    rotary_projections: tuple[tuple[str, str], ...] = ()
    no_clip: tuple[str, ...] = ()         # Linears AWQ's clip search skips (softmax squashes their error)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for stage in self.sequential for name in stage)


# Where transformers' decoder-only models keep their parts.
_HF_DECODER = dict(blocks="model.layers", embeddings="model.embed_tokens", final_norm="model.norm",
                   lm_head="lm_head", rotary="model.rotary_emb")

_LLAMA_LIKE = dict(
    **_HF_DECODER,
    sequential=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
    smooth=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        # Beyond the reference (which leaves down_proj unsmoothed): down_proj's input carries the
        # largest outliers (SmolLM2: absmax > 2000), and up_proj's rows can absorb 1/s exactly.
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", gqa_shared=True),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    awq=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", gqa_shared=True),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    block_norms=("input_layernorm", "post_attention_layernorm"),
    rotary_projections=(("self_attn.q_proj", "num_attention_heads"), ("self_attn.k_proj", "num_key_value_heads")),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),  # AutoAWQ skips them too
)

# Phi-3 / Phi-4-mini: q, k and v are one fused Linear (rows [q | k | v]) and gate/up another (rows
# [gate | up]). The norms fold into the fused Linears' input columns exactly; the v -> o and up -> down
# folds would scale a row slice of a fused Linear and are not done (o_proj and down_proj get no
# smoothing or AWQ scales). The fused q/k/v Linear is not clipped (its q and k rows feed the softmax).
_PHI3 = dict(
    **_HF_DECODER,
    sequential=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    smooth=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ),
    awq=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
    ),
    block_norms=("input_layernorm", "post_attention_layernorm"),
    no_clip=("self_attn.qkv_proj",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LlamaForCausalLM", gguf_arch="llama", **_LLAMA_LIKE),
    "MistralForCausalLM": Architecture("MistralForCausalLM", gguf_arch="llama", **_LLAMA_LIKE),
    "Qwen2ForCausalLM": Architecture("Qwen2ForCausalLM", gguf_arch="qwen2", **_LLAMA_LIKE),
    # Qwen3: Llama's layout plus an RMSNorm over each head of q and k after their projections (the
    # smoothing/AWQ folds only touch q/k input columns, never their output rows, so the per-head norms
    # see the same values); llama.cpp's qwen3 uses NEOX rotary like qwen2 (no row permutation).
    "Qwen3ForCausalLM": Architecture("Qwen3ForCausalLM", gguf_arch="qwen3", **{
        **_LLAMA_LIKE,
        "block_norms": _LLAMA_LIKE["block_norms"] + ("self_attn.q_norm", "self_attn.k_norm")}),
    # llama.cpp's phi3 takes the fused attn_qkv and ffn_up (gate and up rows) as they are, NEOX rotary.
    "Phi3ForCausalLM": Architecture("Phi3ForCausalLM", gguf_arch="phi3", **_PHI3),
}


def channel_map(group: ScaleGroup, config, consumer_in: int) -> torch.Tensor | None:
    """For each consumer input channel, the prev output channel it copies ([consumer_in] int64),
    or None when they are the same channels. Under GQA, query head h reads kv head h // n_rep, so
    o_proj column j = h * head_dim + d copies v_proj row (h // n_rep) * head_dim + d."""
    if not group.gqa_shared:
        return None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    n_rep = heads // getattr(config, "num_key_value_heads", heads)
    column = torch.arange(consumer_in)
    return (column // (head_dim * n_rep)) * head_dim + column % head_dim


def architecture_for(config) -> Architecture:
    """The table entry for an HF config; unknown or missing architectures are a clear error."""
    names = getattr(config, "architectures", None) or []
    if not names:
        raise QuantkitError("config.json names no architecture ('architectures' is empty); cannot map its layers")
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise QuantkitError(
        f"architecture {names[0]} has no layer mapping; supported: {', '.join(sorted(ARCHITECTURES))}"
    )
