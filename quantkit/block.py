"""One decoder block through the pipeline: observe -> smooth -> quantize -> propagate.

The block arrives materialized in fp32 (the master copy every weight transform and quantizer works
on); forward passes run on a copy in the compute dtype. Nothing here writes files.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.algorithms import primitives, smoothquant
from quantkit.algorithms.quant_tensor import QuantTensor
from quantkit.algorithms.registry import BlockContext, LayerContext, get_algorithm, parse_options
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.architectures import Architecture, ScaleGroup, channel_map
from quantkit.calibrate.hooks import (
    BlockInput,
    NonFiniteActivation,
    ObservationComplete,
    all_finite,
    forward_hooks,
    observe_inputs,
    run_block,
)
from quantkit.calibrate.stats import LayerStats
from quantkit.distributed import Processes
from quantkit.errors import QuantkitError
from quantkit.exporters.manifest import LayerEntry
from quantkit.exporters.native import codes_layout, quant_linear_tensors
from quantkit.qlinear import QuantLinear, set_submodule
from quantkit.recipe import LayerAssignment
from quantkit.schemes import Scheme

# SmoothQuant strengths tried per block by --alpha auto (plus "no smoothing").
ALPHA_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast float parameters (not buffers: QuantLinear's fp16 scales and int codes keep their types)."""
    for param in module.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return module


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def runner_for(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The block as forward passes run it: itself in fp32, else a copy in the compute dtype."""
    return block if dtype == torch.float32 else cast_parameters(copy.deepcopy(block), dtype)


def input_range(stats: LayerStats, factors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor (min, max) of the layer input, or of input / factors after smoothing (exact: s > 0)."""
    lo, hi = stats.range.min, stats.range.max
    if factors is not None:
        lo, hi = lo / factors, hi / factors
    return lo.min(), hi.max()


def make_quant_linear(linear: nn.Module, scheme: Scheme, quant: QuantTensor,
                      activation_range: tuple[torch.Tensor, torch.Tensor] | None, bias_dtype: torch.dtype) -> QuantLinear:
    """A QuantLinear for ``linear``'s quantized weight; static activation grids come from the range."""
    activation = scheme.activation
    input_scale = input_zero = None
    if activation is not None and not activation.dynamic:
        input_scale, input_zero = primitives.activation_qparams(*activation_range, activation)
    bias = None if linear.bias is None else linear.bias.detach().to(bias_dtype)
    return QuantLinear(quant, activation, input_scale, input_zero, bias)


@dataclass
class BlockJob:
    """What the pipeline hands over for one block."""

    index: int
    prefix: str                                  # the block's full name, e.g. model.layers.3
    block: nn.Module                             # fp32 master copy, materialized
    assigned: dict[str, LayerAssignment]         # block-relative Linear name -> what it gets
    inputs: list[BlockInput] | None              # None: no layer needs calibration data
    arch: Architecture
    model_config: object
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    smooth: bool
    alpha: float | None                          # None: search ALPHA_GRID per block
    search_samples: int = 4                      # samples the alpha search compares block outputs on
    metric_samples: int = 4                      # samples each layer's output SQNR is measured on
    processes: Processes = field(default_factory=Processes)  # torch.distributed ranks sharing the batches
    keep: Callable[[BlockInput, int], BlockInput] = lambda call, i: call  # where outputs live (memory/disk)
    float_block: Callable[[], nn.Module] | None = None  # a fresh float copy (to tell overflow from quantization error)


@dataclass
class BlockResult:
    outputs: list[BlockInput] | None
    entries: dict[str, LayerEntry]
    search_results: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    alpha_errors: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class BlockQuantizer:
    def __init__(self, job: BlockJob):
        self.job = job
        self.timings: dict[str, float] = {}

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def full_name(self, name: str) -> str:
        return f"{self.job.prefix}.{name}"

    def run(self) -> BlockResult:
        """observe -> smooth -> transform -> quantize -> propagate. Without inputs (no layer needs
        calibration data) only the weights are quantized and no output is propagated."""
        job = self.job
        calibrated = job.inputs is not None
        result = BlockResult(outputs=None, entries={})
        stats: dict[str, LayerStats | None] = dict.fromkeys(job.assigned)
        if calibrated:
            with self.timed("observe"):
                try:
                    stats = self.observe(list(job.assigned), deferred=self.resequenced())
                except NonFiniteActivation as error:  # nothing is quantized yet: the float block overflows
                    raise NonFiniteActivation(f"{error}: the float model overflows there, before any quantization "
                                              f"({_dtype_name(job.compute_dtype)} forward)") from None
            if job.smooth:
                with self.timed("smooth"):
                    self.smooth(stats, result)
            with self.timed("transform"):
                self.transform(stats, result)
        float_weights: dict[str, torch.Tensor] = {}
        with self.timed("quantize"):
            for stage_index, stage in enumerate(job.arch.sequential):
                names = [name for name in stage if name in job.assigned]
                resequence = any(self.true_sequential(n) for n in names)
                if calibrated and stage_index > 0 and resequence:
                    stats.update(self.observe(names, partial=True))
                for name in names:
                    if calibrated:  # the output-SQNR reference of propagate, which runs in the compute dtype
                        float_weights[name] = job.block.get_submodule(name).weight.to(job.compute_dtype, copy=True)
                    self.quantize_linear(name, stats[name], result)
                    if stats[name] is not None:
                        stats[name].release("hessian")  # GPTQ's [C, C] sums: up to 1 GB per Linear
        if calibrated:
            with self.timed("propagate"):
                result.outputs, output_sqnr = self.propagate(float_weights)
            for name, value in output_sqnr.items():
                result.entries[self.full_name(name)].metrics["output_sqnr_db"] = value
        result.timings = self.timings
        return result

    def explain_nonfinite(self, call: BlockInput) -> str:
        """Why the quantized block gave NaN/Inf on ``call``: when the float block does too, the float
        model overflows (named at its first module with a non-finite output), else quantization did it."""
        job = self.job
        if job.float_block is None:
            return f"NaN/Inf in the quantized outputs of {job.prefix}"
        runner = runner_for(job.float_block(), job.compute_dtype)
        first: list[str] = []

        def make_hook(name: str):
            def hook(module, args, output):
                value = output[0] if isinstance(output, tuple) else output
                if not first and isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
                    first.append(name)
            return hook

        leaves = {name: m for name, m in runner.named_modules() if name and not list(m.children())}
        with forward_hooks(leaves, make_hook):
            float_finite = all_finite(run_block(runner, call))
        if float_finite:
            return f"NaN/Inf in the quantized outputs of {job.prefix} (the float block's outputs are finite)"
        where = f"{job.prefix}.{first[0]}" if first else job.prefix
        return (f"the float model overflows: NaN/Inf in the output of {where} before any quantization "
                f"({_dtype_name(job.compute_dtype)} forward); quantized outputs cannot be finite either")

    def observe(self, names: list[str], partial: bool = False, deferred: frozenset[str] = frozenset()
                ) -> dict[str, LayerStats]:
        """One pass over the inputs with hooks keeping each named Linear's input statistics (its range,
        plus what its algorithm needs unless the Linear is ``deferred`` to a later re-observe); with
        ``partial`` each forward stops once all named Linears have run (true-sequential re-observes)."""
        job = self.job
        kinds = {name: frozenset({"range"}) | (frozenset() if name in deferred else
                                               get_algorithm(job.assigned[name].algorithm).statistics)
                 for name in names}
        runner = runner_for(job.block, job.compute_dtype)
        modules = {name: runner.get_submodule(name) for name in names}
        with observe_inputs(modules, kinds, label=self.full_name, stop_when_done=partial) as stats:
            for call in job.inputs:
                try:
                    run_block(runner, call)
                except ObservationComplete:
                    pass
        job.processes.all_reduce_stats(stats)
        return stats

    def resequenced(self) -> frozenset[str]:
        """Linears past the first stage whose (sequential) algorithm re-observes them after the
        earlier stages are quantized: the first pass need not collect their algorithm statistics."""
        job = self.job
        later = [name for stage in job.arch.sequential[1:] for name in stage if name in job.assigned]
        return frozenset(n for n in later if self.true_sequential(n))

    def true_sequential(self, name: str) -> bool:
        """Whether the Linear's statistics are collected with the block's earlier stages already
        quantized: its algorithm asks for it (GPTQ) unless the option ``true_sequential=false`` trades
        that for one pass collecting every Linear's statistics from the float block (faster)."""
        assignment = self.job.assigned[name]
        options = parse_options(assignment.algorithm, assignment.options)
        return get_algorithm(assignment.algorithm).sequential and getattr(options, "true_sequential", True)

    # SmoothQuant ---------------------------------------------------------------------------------

    def smooth_groups(self) -> tuple[ScaleGroup, ...]:
        """Groups whose consumers are all quantized, at least one of them with quantized activations."""
        assigned = self.job.assigned
        return tuple(g for g in self.job.arch.smooth
                     if all(c in assigned for c in g.consumers)
                     and any(assigned[c].scheme.activation for c in g.consumers))

    def smooth(self, stats: dict[str, LayerStats], result: BlockResult) -> None:
        job = self.job
        groups = self.smooth_groups()
        if not groups:
            return
        maps = {g.prev: channel_map(g, job.model_config, job.block.get_submodule(g.consumers[0]).in_features)
                for g in groups}
        absmax = {g.consumers[0]: stats[g.consumers[0]].range.absmax for g in groups}
        if job.alpha is None:
            result.alpha, result.alpha_errors = self.search_alpha(groups, maps, absmax, stats)
        else:
            result.alpha = job.alpha
        if result.alpha is None:
            return
        factors = smoothquant.search(job.block, groups, absmax, result.alpha, maps)
        smoothquant.apply(job.block, groups, factors, maps, job.arch.norm_offset)
        for group in groups:
            for consumer in group.consumers:  # their input is now x / s
                stats[consumer].scale_channels(smoothquant.consumer_factors(factors[group.prev], maps[group.prev]))
        result.search_results.update({f"{self.full_name(prev)}.smooth_factors": s for prev, s in factors.items()})

    def search_alpha(self, groups, maps, absmax, stats) -> tuple[float | None, dict[str, float]]:
        """The alpha (or None: no smoothing) whose smoothed, RTN-quantized block reproduces the float
        block's output best (sum of squared errors) on the first ``search_samples`` samples."""
        job = self.job
        subset = self.first_samples(job.search_samples)
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

    def first_samples(self, count: int) -> list[BlockInput]:
        """This process's calls among the first ``count`` calibration samples (the batch that
        crosses ``count`` cut to it)."""
        return [call.head(count - call.first_sample) for call in self.job.inputs if call.first_sample < count]

    def transform(self, stats: dict[str, LayerStats], result: BlockResult) -> None:
        """Block-level transforms of the assigned algorithms (AWQ), after smoothing."""
        job = self.job
        for name in sorted({a.algorithm for a in job.assigned.values()}):
            algorithm = get_algorithm(name)
            if not hasattr(algorithm, "transform_block"):
                continue
            context = BlockContext(
                prefix=job.prefix, block=job.block, assigned=job.assigned, stats=stats, groups=job.arch.awq,
                model_config=job.model_config, norm_offset=job.arch.norm_offset, first_samples=self.first_samples,
                runner=lambda: runner_for(job.block, job.compute_dtype), sum_=job.processes.sum_,
            )
            found = algorithm.transform_block(context)
            result.search_results.update({f"{job.prefix}.{key}": value for key, value in found.items()})

    # Quantize and propagate -----------------------------------------------------------------------

    def quantize_linear(self, name: str, stats: LayerStats | None, result: BlockResult) -> None:
        """Quantize one Linear with its algorithm and swap in a QuantLinear."""
        job = self.job
        assignment = job.assigned[name]
        linear = job.block.get_submodule(name)
        weight = linear.weight.float()
        full_name = self.full_name(name)
        algorithm = get_algorithm(assignment.algorithm)
        quant, results = algorithm.quantize(weight, assignment.scheme.weight,
                                            LayerContext(full_name, stats, dict(assignment.options)))
        layer = make_quant_linear(linear, assignment.scheme, quant, input_range(stats) if stats else None,
                                  job.storage_dtype)
        set_submodule(job.block, name, layer)
        _, tensor_names = quant_linear_tensors(full_name, layer)
        result.entries[full_name] = LayerEntry(
            scheme=assignment.scheme, algorithm=assignment.algorithm, rule=assignment.rule,
            shape=quant.shape, tensors=tensor_names, codes_layout=codes_layout(quant.spec.bits),
            ragged_last_group=quant.ragged, integer_zero=quant.integer_zero,
            metrics={"weight_sqnr_db": primitives.sqnr_db(weight, quant.dequantize())},
        )
        if stats is not None:
            result.entries[full_name].metrics["input_absmax"] = float(stats.range.absmax.max())
        result.search_results.update({f"{full_name}.{key}": value for key, value in results.items()})

    def propagate(self, float_weights: dict[str, torch.Tensor]) -> tuple[list[BlockInput], dict[str, float]]:
        """Recompute the block's outputs with its quantized Linears (the next block's inputs), and
        measure each Linear's output SQNR against its float weight on the first ``metric_samples``."""
        job = self.job
        runner = runner_for(job.block, job.compute_dtype)
        signal = dict.fromkeys(float_weights, 0.0)
        noise = dict.fromkeys(float_weights, 0.0)
        measuring = [True]

        def make_hook(name: str):
            def hook(module, args, output):
                if measuring[0]:  # sums of squares in fp32: plenty for a dB figure, half the cost of fp64
                    x = args[0]
                    bias = None if module.bias is None else module.bias.to(x.dtype)
                    reference = F.linear(x, float_weights[name].to(x.dtype), bias).float()
                    signal[name] += reference.pow(2).sum().item()
                    noise[name] += (output.float() - reference).pow(2).sum().item()
            return hook

        outputs = []
        with forward_hooks({name: runner.get_submodule(name) for name in float_weights}, make_hook):
            for call in job.inputs:
                measuring[0] = call.first_sample < job.metric_samples
                hidden = run_block(runner, call)
                if not all_finite(hidden):
                    raise QuantkitError(self.explain_nonfinite(call))
                outputs.append(job.keep(BlockInput(hidden, call.kwargs, call.first_sample), len(outputs)))
        names = sorted(float_weights)
        sums = job.processes.sum_values([signal[n] for n in names] + [noise[n] for n in names])
        return outputs, {n: primitives.sqnr_db_from_sums(sums[i], sums[len(names) + i]) for i, n in enumerate(names)}
