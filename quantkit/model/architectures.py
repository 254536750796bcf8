"""Architecture knowledge as data: where the blocks are, which norm feeds which linears.

Keyed by the HF ``config.architectures[0]`` name. An architecture missing from `ARCHITECTURES` is an
error, never a silent Llama fallback. All names inside a block are relative to the block module.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.model.moe import ExpertLayout


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
    # Float modules reading the same input (a MoE router, the shared-expert gate): they absorb the
    # consumers' factor too, so the fold stays exact, but are not quantized.
    also_scaled: tuple[str, ...] = ()
    # The module whose input is the group's input, observed for the group's statistics when the
    # consumers each see only part of it (experts fed their routed tokens); None: the first consumer.
    observe_at: str | None = None

    @property
    def observed(self) -> str:
        return self.observe_at or self.consumers[0]


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
    # Mixture of experts: where the experts are. Names containing "{e}" are templates, one per expert,
    # expanded by `architecture_for` with the config's expert count.
    experts: ExpertLayout | None = None
    attention: str = "sdpa"               # transformers attention implementation (eager where SDPA is refused)
    # Float modules inside a block that are neither norms nor quantized (MoE routers, the shared-expert gate).
    float_modules: tuple[str, ...] = ()
    # Stored checkpoint names -> ours (regex, replacement), e.g. Mixtral's block_sparse_moe.experts.N.w1,
    # and back (exports write the family's own names, which its runtimes load).
    stored_names: tuple[tuple[str, str], ...] = ()
    export_names: tuple[tuple[str, str], ...] = ()
    # GGUF: our names -> the text model's names gguf-py's table knows, and what the file leaves out
    # (a multimodal checkpoint's vision tower: llama.cpp takes it as a separate mmproj file).
    gguf_names: tuple[tuple[str, str], ...] = ()
    gguf_skipped: tuple[str, ...] = ()

    def gguf_source_name(self, name: str) -> str:
        """A name of ours as gguf-py's tensor table knows it."""
        return rename(name, self.gguf_names)

    def exported_name(self, name: str) -> str:
        """A (module or tensor) name of ours as the family's checkpoints spell it."""
        return rename(name, self.export_names)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for stage in self.sequential for name in stage)

    def block_linears(self, num_blocks: int) -> list[str]:
        """Every block Linear's full name, block by block, each block's in table order."""
        return [f"{self.blocks}.{i}.{linear}" for i in range(num_blocks) for linear in self.linears]


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

# Gemma 2 / Gemma 3: RMSNorms computing x * (1 + w) (folds keep the offset: w' = (1 + w) / s - 1) and
# four norms per block; input_layernorm feeds q/k/v and pre_feedforward_layernorm feeds gate/up, while
# post_attention_layernorm and post_feedforward_layernorm normalize the attention and MLP outputs (they
# feed no Linear, so nothing folds into them). Sliding and full attention layers get their own masks
# and rotary tables (captured per block). Gemma 3 adds Qwen3-style per-head q/k norms.
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_GEMMA = dict(
    _LLAMA_LIKE,
    smooth=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        _LLAMA_LIKE["smooth"][2], _LLAMA_LIKE["smooth"][3],
    ),
    awq=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        _LLAMA_LIKE["awq"][1],
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        _LLAMA_LIKE["awq"][3],
    ),
    block_norms=_GEMMA_NORMS,
    norm_offset=1.0,
)

# Sparse MoE blocks (transformers 5): attention as Llama's, the MLP replaced by a router (mlp.gate)
# and experts split one Linear per expert (model/moe.py). The post-attention norm feeds every expert's
# gate/up (and the router, which absorbs the factor but stays float); each expert's up -> down fold is
# its own group. Expert Linears are quantized like MLP Linears, each with its own statistics.
_MOE_LAYOUT = ExpertLayout(container="mlp.experts", count="num_experts", moe_block="mlp", router="mlp.gate")
_EXPERT = "mlp.experts.{e}"


def _moe(shared_expert: bool, layout: ExpertLayout = _MOE_LAYOUT, **overrides) -> dict:
    """A sparse-MoE table entry; ``shared_expert``: Qwen2-MoE's always-on MLP with its sigmoid gate."""
    up_gate = (f"{_EXPERT}.up_proj", f"{_EXPERT}.gate_proj")
    shared = ("mlp.shared_expert.up_proj", "mlp.shared_expert.gate_proj") if shared_expert else ()
    sequential = (_LLAMA_LIKE["sequential"][0], _LLAMA_LIKE["sequential"][1], up_gate + shared,
                  (f"{_EXPERT}.down_proj",) + (("mlp.shared_expert.down_proj",) if shared_expert else ()))
    feeds = ScaleGroup("post_attention_layernorm", (f"{_EXPERT}.gate_proj", f"{_EXPERT}.up_proj") + shared[::-1],
                       "mlp", also_scaled=(layout.router,) + (("mlp.shared_expert_gate",) if shared_expert else ()),
                       observe_at=layout.moe_block)
    per_expert = ScaleGroup(f"{_EXPERT}.up_proj", (f"{_EXPERT}.down_proj",), f"{_EXPERT}.down_proj")
    shared_fold = (ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",),
                              "mlp.shared_expert.down_proj"),) if shared_expert else ()
    attention = _LLAMA_LIKE["smooth"][0], _LLAMA_LIKE["smooth"][2]
    return dict(_LLAMA_LIKE, sequential=sequential, smooth=(*attention, feeds, per_expert, *shared_fold),
                awq=(*attention, feeds, per_expert, *shared_fold), experts=layout,
                float_modules=feeds.also_scaled, **overrides)


# Mixtral stores its experts as block_sparse_moe.experts.N.{w1 (gate), w3 (up), w2 (down)}; transformers
# renames them on load, and so does the checkpoint reader.
_MIXTRAL_NAMES = ((r"\.block_sparse_moe\.", ".mlp."), (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
                  (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."), (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."))

_MIXTRAL_EXPORT = ((r"\.mlp\.experts\.(\d+)\.gate_proj(\.|$)", r".block_sparse_moe.experts.\1.w1\2"),
                   (r"\.mlp\.experts\.(\d+)\.up_proj(\.|$)", r".block_sparse_moe.experts.\1.w3\2"),
                   (r"\.mlp\.experts\.(\d+)\.down_proj(\.|$)", r".block_sparse_moe.experts.\1.w2\2"),
                   (r"\.mlp\.gate(\.|$)", r".block_sparse_moe.gate\1"))

# Multimodal Gemma 3 checkpoints store language_model.model.*, vision_tower.*, multi_modal_projector.*
# (and language_model.lm_head when untied); transformers 5 keeps them under model.*.
_GEMMA3_MULTIMODAL_NAMES = ((r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
                            (r"^vision_tower\.", "model.vision_tower."),
                            (r"^multi_modal_projector\.", "model.multi_modal_projector."))
_GEMMA3_MULTIMODAL_EXPORT = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                             (r"^model\.vision_tower\.", "vision_tower."),
                             (r"^model\.multi_modal_projector\.", "multi_modal_projector."))

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
    # Gemma 2's attention soft-capping: transformers refuses SDPA for it
    "Gemma2ForCausalLM": Architecture("Gemma2ForCausalLM", gguf_arch="gemma2", attention="eager", **_GEMMA),
    "Gemma3ForCausalLM": Architecture("Gemma3ForCausalLM", gguf_arch="gemma3", **{
        **_GEMMA, "block_norms": _GEMMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm")}),
    # The text tower of multimodal Gemma 3: the same blocks under model.language_model; the vision tower
    # and projector are carried as float tensors (not quantized, left out of GGUF).
    "Gemma3ForConditionalGeneration": Architecture("Gemma3ForConditionalGeneration", gguf_arch="gemma3", **{
        **_GEMMA, "block_norms": _GEMMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
        "blocks": "model.language_model.layers", "embeddings": "model.language_model.embed_tokens",
        "final_norm": "model.language_model.norm", "rotary": "model.language_model.rotary_emb",
        "stored_names": _GEMMA3_MULTIMODAL_NAMES, "export_names": _GEMMA3_MULTIMODAL_EXPORT,
        "gguf_names": ((r"^model\.language_model\.", "model."),),
        "gguf_skipped": ("model.vision_tower.", "model.multi_modal_projector.")}),
    "MixtralForCausalLM": Architecture("MixtralForCausalLM", gguf_arch="llama", **_moe(
        False, ExpertLayout("mlp.experts", "num_local_experts", "mlp", "mlp.gate"), stored_names=_MIXTRAL_NAMES,
        export_names=_MIXTRAL_EXPORT)),
    "Qwen2MoeForCausalLM": Architecture("Qwen2MoeForCausalLM", gguf_arch="qwen2moe", **_moe(True)),
    "Qwen3MoeForCausalLM": Architecture("Qwen3MoeForCausalLM", gguf_arch="qwen3moe", **_moe(
        False, block_norms=_LLAMA_LIKE["block_norms"] + ("self_attn.q_norm", "self_attn.k_norm"))),
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
    entry = table_entry(config)
    if entry is not None:
        return expand_experts(entry, text_config_of(config))
    raise QuantkitError(
        f"architecture {names[0]} has no layer mapping; supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def expand_experts(arch: Architecture, config) -> Architecture:
    """``arch`` with its per-expert templates ("{e}") written out for the config's expert count: a
    group whose prev is per expert becomes one group per expert; one whose consumers are per expert
    (the norm feeding all experts) lists every expert's Linears."""
    if arch.experts is None:
        return arch
    _check_uniform_moe(config)
    experts = range(arch.experts.num_experts(config))

    def names(templates: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n.format(e=e) for e in experts for n in templates if "{e}" in n) + \
            tuple(n for n in templates if "{e}" not in n)

    def groups(table: tuple[ScaleGroup, ...]) -> tuple[ScaleGroup, ...]:
        out = []
        for group in table:
            if "{e}" in group.prev:
                out += [ScaleGroup(group.prev.format(e=e), tuple(c.format(e=e) for c in group.consumers),
                                   group.loss_on.format(e=e), group.gqa_shared) for e in experts]
            else:
                out.append(ScaleGroup(group.prev, names(group.consumers), group.loss_on, group.gqa_shared,
                                      group.also_scaled, group.observe_at))
        return tuple(out)

    return dataclasses.replace(arch, sequential=tuple(names(stage) for stage in arch.sequential),
                               smooth=groups(arch.smooth), awq=groups(arch.awq))


def _check_uniform_moe(config) -> None:
    """Every block sparse (the table describes one block layout): Qwen-MoE configs can make some
    blocks dense (mlp_only_layers, decoder_sparse_step)."""
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    if dense or step != 1:
        raise QuantkitError(f"this MoE config mixes dense and sparse blocks (mlp_only_layers {dense}, "
                            f"decoder_sparse_step {step}); only models whose every block is sparse are mapped")


def table_entry(config) -> Architecture | None:
    """The table's entry for the first of ``config.architectures`` it has (experts not expanded), or None."""
    names = getattr(config, "architectures", None) or []
    return next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)


def text_config_of(config):
    """The language model's settings: a multimodal config's text_config, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    """``name`` after each (regex, replacement) of ``table`` in turn."""
    for pattern, replacement in table:
        name = re.sub(pattern, replacement, name)
    return name


def attention_implementation(config) -> str:
    """The attention implementation to build a model of ``config`` with: the table's, else SDPA."""
    entry = table_entry(config)
    return entry.attention if entry is not None else "sdpa"
