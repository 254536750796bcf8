"""SmoothQuant (Xiao et al. 2023; mit-han-lab/smoothquant, mlc-llm PR #855).

Migrates activation outliers into the weights with a per-input-channel factor s:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
where max|X_j| is the calibrated running absmax of input channel j and max|W_j| is over every
consumer linear of that input. The op in front absorbs 1/s (norm.weight /= s), each consumer absorbs
s (W[:, j] *= s), so the float model computes the same function.

Three steps, each separately callable and saveable: statistics come from the hooked pass
(`ChannelRange`), `search` returns the factors, `apply` folds them.
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.model.architectures import ScaleGroup, channel_map

# Both maxima are clamped to >= 1e-5 (the reference implementation's floor).
_FLOOR = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, consumer_weights: list[torch.Tensor], alpha: float,
                      column_map: torch.Tensor | None = None) -> torch.Tensor:
    """s [C_prev] float32 from act_absmax [C] and consumer weights [out_i, C].

    With ``column_map`` ([C] -> prev channel, GQA v -> o), both maxima are first taken over the
    consumer channels sharing a prev channel, so one factor serves all of its copies.
    A dead channel (act absmax at the floor) gets s = 1: scaling it buys nothing, and s = 1e-5 would
    multiply the norm weight by 1e5 (an fp16 overflow trap of the reference).
    """
    weight_absmax = torch.cat([w.float() for w in consumer_weights]).abs().amax(dim=0)
    act = act_absmax.float()
    if column_map is not None:
        act, weight_absmax = _max_per_prev_channel(act, column_map), _max_per_prev_channel(weight_absmax, column_map)
    act, weight_absmax = act.clamp(min=_FLOOR), weight_absmax.clamp(min=_FLOOR)
    factors = act.pow(alpha) / weight_absmax.pow(1.0 - alpha)
    factors = torch.where(act <= _FLOOR, torch.ones_like(factors), factors)
    return factors.clamp(min=_FLOOR)


def _max_per_prev_channel(values: torch.Tensor, column_map: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(int(column_map.max()) + 1, dtype=values.dtype)
    return out.scatter_reduce(0, column_map, values, reduce="amax", include_self=False)


def input_observed(group: ScaleGroup, stats: dict) -> bool:
    """Whether the group's input was seen at all: a MoE expert no calibration token reached has no
    statistics, and no evidence for a factor (it is left unscaled)."""
    seen = stats.get(group.observed)
    return seen is not None and bool(seen.tokens > 0)


def consumer_factors(factors: torch.Tensor, column_map: torch.Tensor | None) -> torch.Tensor:
    """The factor of each consumer input channel: s itself, or s[map] for shared channels."""
    return factors if column_map is None else factors[column_map]


def search(block: nn.Module, groups: tuple[ScaleGroup, ...], act_absmax: dict[str, torch.Tensor],
           alpha: float, column_maps: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """{group.prev: s} for every group; ``act_absmax`` is keyed by the module observed for the
    group's input (`ScaleGroup.observed`)."""
    factors = {}
    for group in groups:
        weights = [block.get_submodule(name).weight for name in group.consumers]
        factors[group.prev] = smoothing_factors(act_absmax[group.observed], weights, alpha,
                                                column_maps.get(group.prev))
    return factors


@torch.no_grad()
def fold_into_previous(prev: nn.Module, factors: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Divide the output channels of ``prev`` by s: a norm's weight (and bias), or a Linear's rows.

    For a norm computing x_hat * (norm_offset + w) the fold is w' = (norm_offset + w) / s - norm_offset.
    """
    # Folds compute in fp64 so the only rounding is the final cast to the weight's dtype.
    s = factors.to(prev.weight.device, torch.float64)
    weight = prev.weight.double()
    if isinstance(prev, nn.Linear):
        prev.weight.copy_((weight / s[:, None]).to(prev.weight.dtype))
    else:
        prev.weight.copy_(((weight + norm_offset) / s - norm_offset).to(prev.weight.dtype))
    if getattr(prev, "bias", None) is not None:
        prev.bias.copy_((prev.bias.double() / s).to(prev.bias.dtype))


@torch.no_grad()
def fold_into_consumers(consumers: list[nn.Module], factors: torch.Tensor) -> None:
    """Multiply input channel j of every consumer by s_j: W[:, j] *= s_j."""
    for linear in consumers:
        s = factors.to(linear.weight.device, torch.float64)
        linear.weight.copy_((linear.weight.double() * s[None, :]).to(linear.weight.dtype))


# The search result this module saves, per group: ``<block>.<prev>.smooth_factors`` [channels of prev].
FACTORS = "smooth_factors"


def result_name(block_prefix: str, prev: str, kind: str = FACTORS) -> str:
    return f"{block_prefix}.{prev}.{kind}"


def replay(block: nn.Module, block_prefix: str, groups: tuple[ScaleGroup, ...], results: dict[str, torch.Tensor],
           config, norm_offset: float = 0.0, kind: str = FACTORS) -> None:
    """Re-apply saved per-channel folds (of this module, or AWQ's scales: ``kind``) to a float block."""
    factors = {g.prev: results[result_name(block_prefix, g.prev, kind)].float()
               for g in groups if result_name(block_prefix, g.prev, kind) in results}
    groups = tuple(g for g in groups if g.prev in factors)
    maps = {g.prev: channel_map(g, config, block.get_submodule(g.consumers[0]).in_features) for g in groups}
    apply(block, groups, factors, maps, norm_offset)


def apply(block: nn.Module, groups: tuple[ScaleGroup, ...], factors: dict[str, torch.Tensor],
          column_maps: dict[str, torch.Tensor | None], norm_offset: float = 0.0) -> None:
    """Fold searched factors into the block; the float block's function is unchanged."""
    for group in groups:
        if group.prev not in factors:
            continue
        fold_into_previous(block.get_submodule(group.prev), factors[group.prev], norm_offset)
        fold_into_consumers([block.get_submodule(name) for name in group.consumers + group.also_scaled],
                            consumer_factors(factors[group.prev], column_maps.get(group.prev)))
