"""AWQ: activation-aware weight quantization (Lin et al. 2023; mit-han-lab/llm-awq, AutoAWQ).

A block-level transform followed by round-to-nearest:
1. scale search, per group "op -> consumers sharing one input" (architectures.Architecture.awq):
       s(r) = x_mean^r / (w_mean^(1-r) + 1e-4),  s <- s / sqrt(max s * min s),  r = i / 20, i = 0..19
   where x_mean is the calibrated mean |x_j| of the input channel and w_mean the mean over rows of
   |W_ij| / max_group |W| (AutoAWQ's "duo scaling"). Each r is scored by the MSE of the group's loss
   module (the attention, the MLP, or the consumer Linear) with the consumers replaced by
   Q(W * s) / s, against its float output on the captured inputs. The best s is folded exactly
   (prev /= s, consumers W *= s), so the float function is unchanged and the quantizer sees W * s.
   Under grouped-query attention v_proj -> o_proj shares one factor per v channel across its copies.
2. clip search, per consumer except q/k: per group, the weight range is shrunk to (1 - i/20) of its
   max, i = 0..9, keeping the ratio with the smallest MSE of the group's partial output x_g . w_g on a
   token sample of the layer's (rescaled) input; the weights are clamped there before RTN.
Embeddings and lm_head are never scaled (only ops inside decoder blocks are in the table).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.algorithms import smoothquant
from quantkit.algorithms.registry import (
    BlockContext,
    LayerContext,
    option,
    parse_options,
    register,
)
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.calibrate.hooks import forward_hooks, run_block
from quantkit.formats import primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec
from quantkit.model.architectures import ScaleGroup, channel_map

GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512


def fake_quantize(weight: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """Q(w) in float32: [out, in] -> [out, in]."""
    return primitives.fake_quantize_weight(weight, spec)


def weight_mean(weights: list[torch.Tensor], spec: WeightSpec) -> torch.Tensor:
    """w_mean [C]: mean over rows of |W| normalised by each group's max |W|."""
    weight = torch.cat([w.float() for w in weights])
    groups = primitives.to_groups(weight.abs(), primitives.group_size_for(spec, weight.shape[1]))
    normalised = groups / groups.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return normalised.reshape(weight.shape[0], -1)[:, : weight.shape[1]].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def _mean_per_prev_channel(values: torch.Tensor, column_map: torch.Tensor | None) -> torch.Tensor:
    if column_map is None:
        return values
    size = int(column_map.max()) + 1
    total = torch.zeros(size).index_add_(0, column_map, values.float())
    return total / torch.bincount(column_map, minlength=size).float()


class _Captured:
    """Inputs of the loss modules and the Linears on the search samples, captured while `run`
    passes the calls through the block (the hooks come off afterwards)."""

    def __init__(self, module_names: set[str], linear_names: set[str]):
        self.calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in module_names}
        self.linear_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linear_names}

    def run(self, block: nn.Module, calls) -> "_Captured":
        with forward_hooks({n: block.get_submodule(n) for n in self.calls}, self._keep_call, pre=True, with_kwargs=True), \
                forward_hooks({n: block.get_submodule(n) for n in self.linear_inputs}, self._keep_input, pre=True):
            for call in calls:
                run_block(block, call)
        return self

    def _keep_call(self, name):
        def hook(module, args, kwargs):
            self.calls[name].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        return hook

    def _keep_input(self, name):
        def hook(module, args):
            self.linear_inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook


def _module_output(module: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    out = module(*call[0], **call[1])
    return (out[0] if isinstance(out, tuple) else out).float()


@torch.no_grad()
def search_group_scales(runner: nn.Module, master: nn.Module, group: ScaleGroup, spec: WeightSpec,
                        x_mean: torch.Tensor, calls: list, column_map: torch.Tensor | None,
                        sum_=lambda t: t) -> tuple[torch.Tensor, list[float]]:
    """Best s for one group (prev channels) and the loss of every grid ratio (``sum_`` adds the
    losses of other processes' samples)."""
    consumers = [master.get_submodule(name).weight.float() for name in group.consumers]
    run_modules = [runner.get_submodule(name) for name in group.consumers]
    originals = [m.weight.data.clone() for m in run_modules]
    loss_module = runner.get_submodule(group.loss_on)
    reference = [_module_output(loss_module, call) for call in calls]
    x_prev = _mean_per_prev_channel(x_mean, column_map)
    w_prev = _mean_per_prev_channel(weight_mean(consumers, spec), column_map)
    losses, best, best_scales = [], float("inf"), torch.ones_like(x_prev)
    try:
        for i in range(GRID):
            scales = candidate_scales(x_prev, w_prev, i / GRID)
            column_scales = smoothquant.consumer_factors(scales, column_map)
            for module, weight in zip(run_modules, consumers):
                module.weight.data = (fake_quantize(weight * column_scales, spec) / column_scales).to(module.weight.dtype)
            loss = sum(F.mse_loss(_module_output(loss_module, call), ref, reduction="sum").item()
                       for call, ref in zip(calls, reference))
            loss = sum_(torch.tensor([loss], dtype=torch.float64)).item()
            losses.append(loss)
            if loss < best:
                best, best_scales = loss, scales
    finally:
        for module, original in zip(run_modules, originals):
            module.weight.data = original
    return best_scales, losses


@torch.no_grad()
def search_clip(weight: torch.Tensor, inputs: torch.Tensor, spec: WeightSpec, sum_=lambda t: t) -> torch.Tensor:
    """Per-group clip ratio [out, G] minimising the squared error of the group partial outputs
    x_g . w_g over a token sample of ``inputs`` [n, in] (``sum_`` adds other processes' errors)."""
    group_size = primitives.group_size_for(spec, weight.shape[1])
    w = primitives.to_groups(weight.float(), group_size)                    # [out, G, g]
    step = max(1, inputs.shape[0] // CLIP_TOKENS)
    x = primitives.to_groups(inputs.float()[::step][:CLIP_TOKENS], group_size)  # [n, G, g]
    valid = (torch.arange(w.shape[1] * group_size) < weight.shape[1]).reshape(w.shape[1], group_size)
    x = x * valid  # padding columns of a ragged group contribute nothing
    reference = torch.einsum("ogk,ngk->ogn", w, x)
    max_abs = w.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full(w.shape[:2], float("inf"))
    best_ratio = torch.ones(w.shape[:2])
    group_spec = WeightSpec(spec.bits, "channel", spec.symmetric)
    for i in range(int(MAX_SHRINK * GRID)):
        ratio = 1 - i / GRID
        limit = max_abs * ratio
        clipped = torch.maximum(torch.minimum(w, limit), -limit)
        flat = clipped.reshape(-1, group_size)
        quantized = fake_quantize(flat, group_spec).reshape(w.shape)
        error = sum_((torch.einsum("ogk,ngk->ogn", quantized, x) - reference).pow(2).sum(dim=-1))
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def apply_clip(linear: nn.Module, ratio: torch.Tensor, spec: WeightSpec) -> None:
    """Clamp each group of ``linear.weight`` to +-ratio * its max |w|."""
    weight = linear.weight.data.float()
    group_size = primitives.group_size_for(spec, weight.shape[1])
    limit = primitives.expand_to_columns(primitives.to_groups(weight.abs(), group_size).amax(dim=-1) * ratio,
                                         weight.shape[1], group_size)
    linear.weight.data = torch.maximum(torch.minimum(weight, limit), -limit).to(linear.weight.dtype)


# The search results this module saves (names it owns): per scaling group ``<block>.<prev>.awq_scales``
# and ``.awq_losses``, per clipped Linear ``<block>.<linear>.awq_clip`` (per-group ratios).
SCALES, LOSSES, CLIP = "awq_scales", "awq_losses", "awq_clip"


def replay(block: nn.Module, block_prefix: str, groups, results: dict[str, torch.Tensor], config,
           norm_offset: float, specs: dict[str, WeightSpec]) -> None:
    """Re-apply saved AWQ scale folds, then clipping, to a float block (``specs``: full Linear name ->
    its weight grid, which sets the clipping groups)."""
    smoothquant.replay(block, block_prefix, groups, results, config, norm_offset, kind=SCALES)
    suffix = f".{CLIP}"
    for key, ratio in sorted(results.items()):
        if key.startswith(block_prefix + ".") and key.endswith(suffix):
            name = key.removesuffix(suffix)
            apply_clip(block.get_submodule(name[len(block_prefix) + 1:]), ratio, specs[name])


@register("awq")
class AWQ:
    """Options: samples (16: calibration samples the searches run on), clip (True)."""

    @dataclass(frozen=True)
    class Options:
        samples: int = option(16, minimum=1)
        clip: bool = option(True)

    statistics = frozenset({"mean_abs"})
    sequential = False

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        return quantize_rtn(weight, spec, context.global_scale), {}

    def transform_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        """Search and fold AWQ scales, then search and apply clipping, for this block's AWQ layers."""
        awq_layers = {n for n, a in context.assigned.items() if a.algorithm == "awq"}
        groups = [g for g in context.groups if all(c in awq_layers for c in g.consumers)]
        # Each layer's own options (a recipe may give layers different ones): the searches share one
        # capture of the block's inputs, on the most samples any of its AWQ layers asks for.
        options = {n: parse_options(self.name, context.assigned[n].options) for n in awq_layers}
        calls = context.first_samples(max(o.samples for o in options.values()))
        clip_layers = {n for n in awq_layers if n not in context.no_clip and options[n].clip}
        runner = context.runner()
        captured = _Captured({g.loss_on for g in groups}, clip_layers).run(runner, calls)
        results: dict[str, torch.Tensor] = {}
        column_scales: dict[str, torch.Tensor] = {}
        for group in groups:
            searched = context.sum_(torch.tensor([float(len(captured.calls[group.loss_on]))], dtype=torch.float64))
            if not smoothquant.input_observed(group, context.stats) or not searched.item():
                continue   # a MoE expert no (search) token reached: no evidence for a scale, left unscaled
            spec = context.assigned[group.consumers[0]].scheme.weight
            column_map = channel_map(group, context.model_config, context.block.get_submodule(group.consumers[0]).in_features)
            scales, losses = search_group_scales(runner, context.block, group, spec,
                                                 context.stats[group.observed].mean_abs.mean,
                                                 captured.calls[group.loss_on], column_map, context.sum_)
            smoothquant.fold_into_previous(context.block.get_submodule(group.prev), scales, context.norm_offset)
            consumer_scales = smoothquant.consumer_factors(scales, column_map)
            smoothquant.fold_into_consumers([context.block.get_submodule(c) for c in group.consumers + group.also_scaled],
                                            consumer_scales)
            for consumer in group.consumers:
                column_scales[consumer] = consumer_scales
                context.stats[consumer].scale_channels(consumer_scales)
            results[f"{group.prev}.{SCALES}"] = scales
            results[f"{group.prev}.{LOSSES}"] = torch.tensor(losses)
        for name in sorted(clip_layers):
            linear = context.block.get_submodule(name)
            spec = context.assigned[name].scheme.weight
            parts = captured.linear_inputs[name]  # empty on a process holding none of the search samples
            inputs = torch.cat(parts).float() if parts else torch.zeros(0, linear.in_features)
            if name in column_scales:
                inputs = inputs / column_scales[name]
            ratio = search_clip(linear.weight, inputs, spec, context.sum_)
            apply_clip(linear, ratio, spec)
            results[f"{name}.{CLIP}"] = ratio
        return results
