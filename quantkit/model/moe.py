"""Mixture-of-experts blocks with one Linear per expert.

transformers 5 keeps a block's experts as two fused 3-D parameters (Mixtral, Qwen2-MoE, Qwen3-MoE):
    gate_up_proj [E, 2I, H]   rows [gate | up] of each expert
    down_proj    [E, H, I]
and computes, for the top-k experts chosen per token t with routing weights w_t,
    y_t = sum_k w_tk * down_e(act(gate_e(x_t)) * up_e(x_t)),   e = top_k_index[t, k].
Quantizing the fused tensor as one matrix would give experts shared scales and Hessians and let one
expert's rows land on another's (llm-compressor #2939). `SplitExperts` computes the same function
with an `ExpertMLP` (three nn.Linear) per expert, so every expert is its own set of Linears with its
own statistics, scales and codes; checkpoints store experts that way on disk (transformers saves
``experts.<e>.gate_proj.weight`` etc.), so the split model reads them by name.

Calibration controls (attributes, set by the block runner around a pass):
    dense          experts that see every token (their statistics), while the output still sums only
                   the routed tokens' contributions: the next block sees what the real model computes
    routed_tokens  when a tensor [E], the routed (token, expert) pairs of the pass are counted into it
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family keeps its experts, relative to the decoder block.

    container:  the fused experts module, replaced by `SplitExperts` (e.g. mlp.experts)
    count:      the config field holding the number of experts
    moe_block:  the sparse MoE module (its input is the whole block MLP input)
    router:     the router, whose rows score each expert (stays float)
    """

    container: str
    count: str
    moe_block: str
    router: str

    def num_experts(self, config) -> int:
        count = getattr(config, self.count, None)
        if not isinstance(count, int) or count < 1:
            raise QuantkitError(f"config field {self.count} (the number of experts) is missing or not a positive "
                                "integer")
        return count


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with [I, H], [I, H] and [H, I] weights."""

    def __init__(self, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SplitExperts(nn.ModuleList):
    """A fused experts module's function with one `ExpertMLP` per expert (same forward signature)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)
        self.dense: frozenset[int] = frozenset()
        self.routed_tokens: torch.Tensor | None = None

    @classmethod
    def like(cls, fused: nn.Module) -> "SplitExperts":
        """Empty (meta) experts shaped like ``fused``'s parameters."""
        count, double_intermediate, hidden = fused.gate_up_proj.shape
        with torch.device("meta"):
            return cls([ExpertMLP(hidden, double_intermediate // 2, fused.act_fn) for _ in range(count)])

    @classmethod
    @torch.no_grad()
    def from_fused(cls, fused: nn.Module) -> "SplitExperts":
        """The same experts as ``fused`` (a materialized transformers experts module), split."""
        split = cls.like(fused).to_empty(device=fused.gate_up_proj.device)
        intermediate = fused.gate_up_proj.shape[1] // 2
        for e, expert in enumerate(split):
            expert.gate_proj.weight.copy_(fused.gate_up_proj[e, :intermediate])
            expert.up_proj.weight.copy_(fused.gate_up_proj[e, intermediate:])
            expert.down_proj.weight.copy_(fused.down_proj[e])
        return split.to(fused.gate_up_proj.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k] -> [T, H]."""
        output = torch.zeros_like(hidden_states)
        if self.routed_tokens is not None:
            self.routed_tokens += torch.bincount(top_k_index.reshape(-1), minlength=len(self)).to(self.routed_tokens)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if e in self.dense:
                contribution = expert(hidden_states)[token]   # statistics see every token
            elif token.numel():
                contribution = expert(hidden_states[token])
            else:
                continue
            output.index_add_(0, token, (contribution * top_k_weights[token, slot, None]).to(output.dtype))
        return output


def split_experts(model: nn.Module, blocks: str, layout: ExpertLayout) -> None:
    """Replace every block's fused experts module by `SplitExperts` (meta parameters stay meta,
    materialized ones are copied)."""
    for block in model.get_submodule(blocks):
        parent_name, _, child = layout.container.rpartition(".")
        parent = block.get_submodule(parent_name)
        fused = getattr(parent, child, None)
        if fused is None or isinstance(fused, SplitExperts):
            continue
        if not hasattr(fused, "gate_up_proj"):
            raise QuantkitError(f"{type(fused).__name__} at {layout.container} is not transformers' fused experts "
                                "module (gate_up_proj / down_proj); this transformers version is not supported")
        meta = fused.gate_up_proj.is_meta
        setattr(parent, child, SplitExperts.like(fused) if meta else SplitExperts.from_fused(fused))


def expert_modules(block: nn.Module) -> list[SplitExperts]:
    return [m for m in block.modules() if isinstance(m, SplitExperts)]


def expert_index(name: str, layout: ExpertLayout) -> int | None:
    """The expert a block-relative Linear name belongs to (``mlp.experts.3.up_proj`` -> 3), else None."""
    prefix = layout.container + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@contextmanager
def expert_calibration(modules: list[SplitExperts], dense: frozenset[int], count: bool) -> Iterator[list[float]]:
    """Within the body, ``dense`` experts see every token and (with ``count``) routed tokens are
    counted; yields a list filled on exit with the count per expert (empty without ``count``)."""
    counts: list[float] = []
    for module in modules:
        module.dense = dense
        module.routed_tokens = torch.zeros(len(module), dtype=torch.float64) if count else None
    try:
        yield counts
    finally:
        for module in modules:
            if module.routed_tokens is not None:
                counts.extend(module.routed_tokens.tolist())
            module.dense, module.routed_tokens = frozenset(), None
