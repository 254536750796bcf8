"""SmoothQuant inside a block: which groups to smooth, the per-block alpha search, and the fold.

For a group (the op in front -> the Linears reading its output), factors
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
are folded into the op in front (its outputs / s) and into the consumers' columns (* s), which leaves
the block's function unchanged (algorithms/smoothquant.py). With ``alpha`` None the block tries each
alpha of `ALPHA_GRID` (and no smoothing) on a copy: smooth, round-to-nearest every assigned Linear,
and keep the alpha whose block output is closest (sum of squared errors) to the float block's on the
first ``search_samples`` samples.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantkit.algorithms import smoothquant
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.calibrate.hooks import BlockInput, run_block
from quantkit.calibrate.stats import LayerStats
from quantkit.model.architectures import ScaleGroup, channel_map
from quantkit.model.qlinear import set_submodule
from quantkit.run.layers import (
    cast_parameters,
    input_range,
    make_quant_linear,
    runner_for,
)

# SmoothQuant strengths tried per block by --alpha auto (plus "no smoothing").
ALPHA_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class SmoothingOutcome:
    """alpha: the strength applied (None: not smoothed); alpha_errors: the search's error per alpha
    ("None" for no smoothing); factors: the saved search results, ``<prev>.smooth_factors``."""

    alpha: float | None = None
    alpha_errors: dict[str, float] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict)


def smooth_groups(job) -> tuple[ScaleGroup, ...]:
    """Groups whose consumers are all quantized, at least one of them with quantized activations."""
    assigned = job.assigned
    return tuple(g for g in job.arch.smooth
                 if all(c in assigned for c in g.consumers)
                 and any(assigned[c].scheme.activation for c in g.consumers))


def smooth_block(job, stats: dict[str, LayerStats], first_samples: Callable[[int], list[BlockInput]]
                 ) -> SmoothingOutcome:
    """Search (or take) alpha and fold the factors into ``job.block``; the consumers' statistics are
    rescaled to their new input x / s."""
    outcome = SmoothingOutcome()
    groups = tuple(g for g in smooth_groups(job) if smoothquant.input_observed(g, stats))
    if not groups:
        return outcome
    maps = {g.prev: channel_map(g, job.model_config, job.block.get_submodule(g.consumers[0]).in_features)
            for g in groups}
    absmax = {g.observed: stats[g.observed].range.absmax for g in groups}
    if job.alpha is None:
        outcome.alpha, outcome.alpha_errors = search_alpha(job, groups, maps, absmax, stats,
                                                           first_samples(job.search_samples))
    else:
        outcome.alpha = job.alpha
    if outcome.alpha is None:
        return outcome
    factors = smoothquant.search(job.block, groups, absmax, outcome.alpha, maps)
    smoothquant.apply(job.block, groups, factors, maps, job.arch.norm_offset)
    for group in groups:
        for consumer in group.consumers:  # their input is now x / s
            stats[consumer].scale_channels(smoothquant.consumer_factors(factors[group.prev], maps[group.prev]))
    outcome.factors = {smoothquant.result_name(job.prefix, prev): s for prev, s in factors.items()}
    return outcome


def search_alpha(job, groups, maps, absmax, stats, subset: list[BlockInput]) -> tuple[float | None, dict[str, float]]:
    """The alpha (or None: no smoothing) whose smoothed, RTN-quantized block reproduces the float
    block's output best (sum of squared errors) on ``subset``."""
    float_runner = runner_for(job.block, job.compute_dtype)
    reference = [run_block(float_runner, call).float() for call in subset]
    errors: dict[str, float] = {}
    for alpha in (None, *ALPHA_GRID):
        trial = copy.deepcopy(job.block)
        consumer_factors: dict[str, torch.Tensor] = {}
        if alpha is not None:
            factors = smoothquant.search(trial, groups, absmax, alpha, maps)
            smoothquant.apply(trial, groups, factors, maps, job.arch.norm_offset)
            consumer_factors = {c: smoothquant.consumer_factors(factors[g.prev], maps[g.prev])
                                for g in groups for c in g.consumers}
        for name, assignment in job.assigned.items():
            linear = trial.get_submodule(name)
            quant = quantize_rtn(linear.weight, assignment.scheme.weight)
            set_submodule(trial, name, make_quant_linear(
                linear, assignment.scheme, quant, input_range(stats[name], consumer_factors.get(name)),
                job.storage_dtype))
        runner = cast_parameters(trial, job.compute_dtype)
        errors[str(alpha)] = sum(F.mse_loss(run_block(runner, call).float(), ref, reduction="sum").item()
                                 for call, ref in zip(subset, reference))
        del trial, runner  # before the next deepcopy: two trial blocks would be alive at once
    errors = dict(zip(errors, job.processes.sum_values(list(errors.values()))))
    best = min(errors, key=errors.get)
    return (None if best == "None" else float(best)), errors
