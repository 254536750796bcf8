"""One decoder block through the pipeline: observe -> smooth -> transform -> quantize -> propagate.
Each stage's work lives with its owner: statistics in calibrate/, smoothing in run/smoothing.py,
block transforms (AWQ) and weight quantizers in algorithms/; this module orders them.

The block arrives materialized in fp32 (the master copy every weight transform and quantizer works
on); forward passes run on a copy in the compute dtype. Nothing here writes files.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.algorithms.registry import (
    BlockContext,
    BlockRefinement,
    BlockTransform,
    LayerContext,
    RefineContext,
    Refined,
    base_algorithm,
    get_algorithm,
    parse_options,
)
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
from quantkit.errors import QuantkitError
from quantkit.formats import primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.model.architectures import Architecture
from quantkit.model.moe import expert_calibration, expert_index, expert_modules
from quantkit.model.qlinear import set_submodule
from quantkit.native.manifest import IN_ABSMAX, IN_COUNT, IN_SUM2, LayerEntry
from quantkit.native.writer import LinearRecord, codes_layout, tensor_names
from quantkit.run.distributed import Processes
from quantkit.run.layers import (
    dtype_name,
    input_range,
    make_quant_linear,
    runner_for,
)
from quantkit.run.recipe import LayerAssignment
from quantkit.run.smoothing import smooth_block

# Every observed Linear keeps its input range (static activations, reports) and sum of squares (llama.cpp's
# importance matrix, saved in the search results as <linear>.in_sum2 [in] and <linear>.in_count [1]).
IMPORTANCE = frozenset({"range", "sum_sq"})


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
    alpha: float | None                          # None: search smoothing.ALPHA_GRID per block
    search_samples: int = 4                      # samples the alpha search compares block outputs on
    metric_samples: int = 4                      # samples each layer's output SQNR is measured on
    processes: Processes = field(default_factory=Processes)  # torch.distributed ranks sharing the batches
    keep: Callable[[BlockInput, int], BlockInput] = lambda call, i: call  # where outputs live (memory/disk)
    float_block: Callable[[], nn.Module] | None = None  # a fresh float copy (to tell overflow from quantization error)
    moe_all_experts: bool = True                 # experts' statistics from every token (outputs keep the routing)
    expert_batch: int = 16                       # experts whose Hessians are collected at once
    float_inputs: list[BlockInput] | None = None  # the float model's own block inputs (the float stream)
    imatrix_from_float: bool = False             # --imatrix-from float: Σx² of the float stream's inputs
    propagate_float: bool = False                # --propagate float: the inputs are the float stream, and the
                                                 # float block's outputs (observed) are the next block's inputs
    on_step: Callable[[int, int, float], None] = lambda done, total, loss: None  # a refinement's steps (progress)


@dataclass
class BlockResult:
    outputs: list[BlockInput] | None
    entries: dict[str, LayerEntry]
    search_results: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    alpha_errors: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    float_outputs: list[BlockInput] | None = None  # the float block's outputs (the next block's float stream)
    importance_is_float: bool = False  # the Σx² recorded are the float model's, as llama-imatrix measures them:
                                       # the float stream's inputs, never re-observed nor scaled (--propagate float)


def base_assignment(assignment: LayerAssignment) -> LayerAssignment:
    """The assignment with the algorithm a Linear runs first: its own, or a refinement's initial one (SignRound's
    init) with that algorithm's options."""
    algorithm, options = base_algorithm(assignment.algorithm, assignment.options, assignment.scheme.weight)
    return dataclasses.replace(assignment, algorithm=algorithm, options=options)


def true_sequential(base: LayerAssignment) -> bool:
    """Whether a Linear's statistics are collected with the block's earlier stages already quantized (``base``:
    its assignment with the algorithm it runs first): its algorithm asks for it (GPTQ) unless the option
    ``true_sequential=false`` trades that for one pass collecting every Linear's statistics from the float
    block (faster)."""
    options = parse_options(base.algorithm, base.options)
    return get_algorithm(base.algorithm).sequential and getattr(options, "true_sequential", True)


@dataclass
class ObservedBlock:
    """A block between `BlockQuantizer.observe_block` and `BlockQuantizer.quantize_block`: the result so far
    (with --propagate float its outputs already), each assigned Linear's statistics, the Linears observed again
    at their stage (true-sequential), and whether the outputs are the float block's (--propagate float)."""

    result: BlockResult
    stats: dict[str, LayerStats | None]
    deferred: frozenset[str]
    float_stream: bool


class BlockQuantizer:
    def __init__(self, job: BlockJob):
        self.job = job
        self.fused_scales: dict[tuple[str, ...], torch.Tensor] = {}
        self.timings: dict[str, float] = {}
        self.routed_tokens: dict[int, float] = {}   # MoE: expert -> calibration tokens routed to it
        self.float_importance: dict[str, LayerStats] = {}  # --imatrix-from float: Σx² on the float model
        # what each Linear runs first: its algorithm, or a refinement's initial one (SignRound's init)
        self.base = {name: base_assignment(a) for name, a in job.assigned.items()}
        self.rounded_from: dict[str, torch.Tensor] = {}   # refinement's Linears: the weight their codes came from
        self.source_weights: dict[str, torch.Tensor] = {}  # and their weights before quantization (metrics)

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
        return self.quantize_block(self.observe_block())

    def observe_block(self) -> ObservedBlock:
        """The first half of `run`: observe, smooth, transform. With --propagate float the result's outputs (the
        next block's inputs) are known from here on."""
        job = self.job
        calibrated = job.inputs is not None
        result = BlockResult(outputs=None, entries={})
        stats: dict[str, LayerStats | None] = dict.fromkeys(job.assigned)
        deferred = self.resequenced()
        observed: list[BlockInput] | None = [] if calibrated and job.propagate_float else None
        # --propagate float: the observing pass measures llama-imatrix's statistics itself where no Linear is
        # re-observed, scaled, or (MoE) observed on every token; then --imatrix-from float needs no float pass
        importance_is_float = observed is not None and not deferred and not job.smooth and not any(
            isinstance(get_algorithm(self.base[n].algorithm), BlockTransform) for n in job.assigned
        ) and not self.dense_experts(list(job.assigned))
        if job.float_inputs is not None and not importance_is_float:   # before anything changes the block
            with self.timed("observe"):
                self.float_importance, result.float_outputs = self.float_statistics(job.imatrix_from_float)
        if calibrated:
            with self.timed("observe"):
                try:
                    stats = self.observe(list(job.assigned), deferred=deferred, count_routes=True, outputs=observed)
                except NonFiniteActivation as error:  # nothing is quantized yet: the float block overflows
                    raise NonFiniteActivation(f"{error}: the float model overflows there, before any quantization "
                                              f"({dtype_name(job.compute_dtype)} forward)") from None
            if observed is not None:      # the float stream: a refinement's targets too
                result.float_outputs, result.importance_is_float = observed, importance_is_float
            if job.smooth:
                with self.timed("smooth"):
                    outcome = smooth_block(job, stats, self.first_samples)
                    result.alpha, result.alpha_errors = outcome.alpha, outcome.alpha_errors
                    result.search_results.update(outcome.factors)
            with self.timed("transform"):
                self.transform(stats, result)
        if observed is not None:
            result.outputs = observed
        return ObservedBlock(result, stats, deferred, observed is not None)

    def quantize_block(self, observed_block: ObservedBlock) -> BlockResult:
        """The second half of `run`: quantize, refine, propagate (with --propagate float only the output-SQNR
        figures). Touches nothing but this block: it may run in another thread beside the next block's
        `observe_block` (`quantkit.run.pipeline`)."""
        job = self.job
        calibrated = job.inputs is not None
        result, stats, deferred = observed_block.result, observed_block.stats, observed_block.deferred
        float_weights: dict[str, torch.Tensor] = {}
        measured = calibrated and job.metric_samples > 0     # metric_samples 0: no output-SQNR figures
        with self.timed("quantize"):
            for stage in job.arch.sequential:
                for batch in self.batches([name for name in stage if name in job.assigned]):
                    later = [name for name in batch if name in deferred]
                    if calibrated and later:
                        stats.update(self.observe(later, partial=True))
                    swept = self.shared_sweeps(batch, stats) if calibrated else {}
                    for name in batch:
                        if measured:  # the output-SQNR reference of propagate, which runs in the compute dtype
                            float_weights[name] = job.block.get_submodule(name).weight.to(job.compute_dtype, copy=True)
                        self.quantize_linear(name, stats[name], result, swept.pop(name, None))
                        if stats[name] is not None:
                            stats[name].release("hessian")  # GPTQ's [C, C] sums: up to 1 GB per Linear
        pending: list[tuple[str, Refined]] = []
        targets: list[torch.Tensor] = []    # a refinement's: the float block's outputs, read once
        if calibrated and self.rounded_from:
            assert result.float_outputs is not None, "a refinement needs the float stream (BlockJob.float_inputs)"
            targets = [call.tensor() for call in result.float_outputs]
            with self.timed("refine"):
                pending = self.refine(stats, result, targets)
            targets = targets if pending else []    # held on only where the propagating pass settles with them
        output_sqnr: dict[str, float] = {}
        if calibrated and (measured or not observed_block.float_stream or pending):
            with self.timed("propagate"):
                output_sqnr = self.propagate_and_settle(float_weights, observed_block, pending, targets, stats)
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
                f"({dtype_name(job.compute_dtype)} forward); quantized outputs cannot be finite either")

    def observe(self, names: list[str], partial: bool = False, deferred: frozenset[str] = frozenset(),
                count_routes: bool = False, outputs: list[BlockInput] | None = None) -> dict[str, LayerStats]:
        """One pass over the inputs with hooks keeping each named Linear's input statistics (its range,
        plus what its algorithm needs unless the Linear is ``deferred`` to a later re-observe); with
        ``partial`` each forward stops once all named Linears have run (true-sequential re-observes).
        The first pass (not ``partial``) also observes the inputs of scaling groups whose consumers
        see only part of them (MoE experts); ``count_routes`` counts each expert's routed tokens.
        ``outputs`` (a full pass): the block's outputs are appended to it, kept where the job keeps inputs."""
        job = self.job
        kinds = {name: IMPORTANCE | (frozenset() if name in deferred else
                                               get_algorithm(self.base[name].algorithm).statistics)
                 for name in names}
        if not partial:
            kinds.update(dict.fromkeys(self.group_inputs(), frozenset({"range", "mean_abs"})))
        runner = runner_for(job.block, job.compute_dtype)
        modules = {name: runner.get_submodule(name) for name in kinds}
        experts = expert_modules(runner)
        with observe_inputs(modules, kinds, label=self.full_name, stop_when_done=partial) as stats, \
                expert_calibration(experts, self.dense_experts(names), count_routes) as routed:
            for call in job.inputs:
                try:
                    hidden = run_block(runner, call)
                except ObservationComplete:
                    continue
                if outputs is not None:
                    if not all_finite(hidden):
                        raise NonFiniteActivation(f"NaN/Inf in the outputs of {job.prefix}")
                    outputs.append(job.keep(BlockInput(hidden, call.kwargs, call.first_sample), len(outputs)))
        job.processes.all_reduce_stats(stats)
        if count_routes and routed:
            self.routed_tokens = dict(enumerate(job.processes.sum_values(routed)))
        return stats

    def float_statistics(self, importance: bool = True) -> tuple[dict[str, LayerStats], list[BlockInput]]:
        """The float block's outputs on the float stream (the next block's float inputs, and SignRound's
        targets), and with ``importance`` what llama-imatrix measures: each assigned Linear's Σx² and token
        count on the float model's own activations (experts see their routed tokens)."""
        job = self.job
        runner = runner_for(job.float_block(), job.compute_dtype)
        stats = {name: LayerStats(frozenset({"sum_sq"})) for name in job.assigned} if importance else {}

        def make_hook(name: str):
            def hook(module, args, output):
                if args[0].shape[0]:
                    stats[name].update(args[0])
            return hook

        outputs = []
        modules = {name: runner.get_submodule(name) for name in stats}
        with forward_hooks(modules, make_hook):
            for call in job.float_inputs:
                outputs.append(BlockInput(run_block(runner, call), call.kwargs, call.first_sample))
        for name, stat in stats.items():   # every rank reduces every Linear (an expert may see no token on one)
            if stat.sum_sq.total is None:
                stat.sum_sq.total = torch.zeros(modules[name].in_features, dtype=torch.float64)
        job.processes.all_reduce_stats(stats)
        return stats, outputs

    def group_inputs(self) -> list[str]:
        """Modules observed for a scaling group's input (the MoE block: its experts each see part)."""
        job = self.job
        groups = (*job.arch.smooth, *job.arch.awq)
        return sorted({g.observe_at for g in groups if g.observe_at and any(c in job.assigned for c in g.consumers)})

    def dense_experts(self, names: list[str]) -> frozenset[int]:
        """Experts whose Linears are observed on every token (all those among ``names``, unless the
        job keeps statistics to routed tokens)."""
        layout = self.job.arch.experts
        if layout is None or not self.job.moe_all_experts:
            return frozenset()
        return frozenset(e for e in map(lambda n: expert_index(n, layout), names) if e is not None)

    def batches(self, names: list[str]) -> list[list[str]]:
        """A stage's Linears in the batches they are observed and quantized in: experts at most
        ``expert_batch`` at a time (their Hessians would not all fit at once), other Linears first."""
        layout = self.job.arch.experts
        if layout is None:
            return [names] if names else []
        by_expert: dict[int | None, list[str]] = {}
        for name in names:
            by_expert.setdefault(expert_index(name, layout), []).append(name)
        shared = by_expert.pop(None, [])
        experts = sorted(by_expert)
        step = max(1, self.job.expert_batch)
        batches = [shared] if shared else []
        batches += [[n for e in experts[i:i + step] for n in by_expert[e]] for i in range(0, len(experts), step)]
        return batches

    def resequenced(self) -> frozenset[str]:
        """Linears whose algorithm statistics the first pass does not collect: past the first stage,
        those whose (sequential) algorithm re-observes them after the earlier stages are quantized,
        and MoE experts needing Hessians when a stage has more than one batch of experts (each batch
        is observed when its turn comes, so only one batch of Hessians is alive)."""
        job = self.job
        later = [name for stage in job.arch.sequential[1:] for name in stage if name in job.assigned]
        deferred = {n for n in later if self.true_sequential(n)}
        for stage in job.arch.sequential:
            batches = self.batches([name for name in stage if name in job.assigned])
            if len(batches) > 1:
                deferred |= {n for batch in batches for n in batch
                             if "hessian" in get_algorithm(self.base[n].algorithm).statistics}
        return frozenset(deferred)

    def true_sequential(self, name: str) -> bool:
        return true_sequential(self.base[name])

    def first_samples(self, count: int) -> list[BlockInput]:
        """This process's calls among the first ``count`` calibration samples (the batch that
        crosses ``count`` cut to it)."""
        return [call.head(count - call.first_sample) for call in self.job.inputs if call.first_sample < count]

    def transform(self, stats: dict[str, LayerStats], result: BlockResult) -> None:
        """Block-level transforms of the assigned algorithms (AWQ), after smoothing."""
        job = self.job
        for name in sorted({a.algorithm for a in self.base.values()}):
            algorithm = get_algorithm(name)
            if not isinstance(algorithm, BlockTransform):
                continue
            context = BlockContext(
                prefix=job.prefix, block=job.block, assigned=self.base, stats=stats, groups=job.arch.awq,
                model_config=job.model_config, norm_offset=job.arch.norm_offset, first_samples=self.first_samples,
                runner=lambda: runner_for(job.block, job.compute_dtype), sum_=job.processes.sum_,
                no_clip=job.arch.no_clip,
            )
            found = algorithm.transform_block(context)
            result.search_results.update({f"{job.prefix}.{key}": value for key, value in found.items()})

    # Quantize and propagate -----------------------------------------------------------------------

    def fused_global_scale(self, name: str, spec) -> torch.Tensor | None:
        """Two-level grids (NVFP4): the Linears vLLM runs as one fused GEMM (q/k/v, gate/up, each expert's
        gate/up: the consumers of one norm-fed group under one parent module) must share one global
        scale, the smallest of theirs, G = 448 * 6 / (largest absmax among them), as llm-compressor does;
        a lone Linear keeps its own (None)."""
        if spec.second_scale is None:
            return None
        job = self.job
        parent = name.rpartition(".")[0]
        members = next((tuple(c for c in group.consumers if c.rpartition(".")[0] == parent and c in job.assigned
                              and job.assigned[c].scheme.weight == spec)
                        for group in job.arch.smooth if name in group.consumers), ())
        if len(members) < 2:
            return None
        if members not in self.fused_scales:    # computed at the first member, before any is quantized
            weights = [job.block.get_submodule(m).weight.float() for m in members]
            self.fused_scales[members] = torch.stack([primitives.global_scale(w, spec) for w in weights]).amin(0)
        return self.fused_scales[members]

    def shared_sweeps(self, names: list[str], stats: dict[str, LayerStats | None]) -> dict[str, tuple]:
        """GPTQ's output for the Linears among ``names`` that read the same input (q/k/v, gate/up: equal
        Hessians) with the same algorithm and options, quantized together in one column sweep where their
        grids allow (`GPTQ.quantize_shared`: the codes of separate sweeps). -> name -> (QuantTensor, search
        results, the weight its codes were rounded from); Linears left out are quantized one by one."""
        groups: list[list[str]] = []
        for name in names:
            assignment, stat = self.job.assigned[name], stats[name]
            if self.base[name].algorithm != "gptq" or stat is None or not stat.tokens or "hessian" not in stat.items \
                    or self.fused_global_scale(name, assignment.scheme.weight) is not None:
                continue
            same = next((g for g in groups if self._same_input(g[0], name, stats)), None)
            if same is None:
                groups.append([name])
            else:
                same.append(name)
        swept = {}
        gptq = get_algorithm("gptq")
        for group in groups:
            if len(group) < 2:
                continue
            first = group[0]
            context = LayerContext(self.full_name(first), stats[first], self.base[first].options)
            refined = isinstance(get_algorithm(self.job.assigned[first].algorithm), BlockRefinement)
            weights = [self.job.block.get_submodule(n).weight.float() for n in group]
            specs = [self.job.assigned[n].scheme.weight for n in group]
            for name, output in zip(group, gptq.quantize_shared(weights, specs, context, keep_rounded=refined)):
                swept[name] = output
        return swept

    def _same_input(self, a: str, b: str, stats: dict[str, LayerStats | None]) -> bool:
        """Whether Linears a and b get one sweep: the same algorithm and options, and equal Hessians."""
        assigned = self.job.assigned
        if (assigned[a].algorithm, assigned[a].options) != (assigned[b].algorithm, assigned[b].options):
            return False
        ha, hb = stats[a].hessian, stats[b].hessian
        return bool(ha.count == hb.count) and torch.equal(ha.sum, hb.sum)

    def quantize_linear(self, name: str, stats: LayerStats | None, result: BlockResult,
                        swept: tuple | None = None) -> None:
        """Quantize one Linear with its algorithm and swap in a QuantLinear. A Linear that saw no
        calibration token (an expert no token was routed to) gets the data-free RTN instead. ``swept``: its
        output of a shared GPTQ sweep (`shared_sweeps`), used instead of quantizing it alone."""
        job = self.job
        assignment = job.assigned[name]
        linear = job.block.get_submodule(name)
        weight = linear.weight.float()
        full_name = self.full_name(name)
        algorithm_name, note, options = assignment.algorithm, "", dict(assignment.options)
        if stats is not None and not stats.tokens:
            algorithm_name, stats = "rtn", None
            options = {k: v for k, v in options.items() if k == "llama_cpp"}   # the one option rtn shares
            note = f"no calibration token reached it: {assignment.algorithm} fell back to rtn (data-free)"
        activation = assignment.scheme.activation
        if activation is not None and activation.calibrated and stats is None and job.inputs is not None:
            raise QuantkitError(f"{full_name} saw no calibration token, so its static activation range is unknown; "
                                "calibrate with more samples or keep MoE statistics on every token")
        context = LayerContext(full_name, stats, options,
                               global_scale=self.fused_global_scale(name, assignment.scheme.weight))
        algorithm = get_algorithm(algorithm_name)
        if isinstance(algorithm, BlockRefinement):   # its initial codes now, refined with the whole block later
            quant, results, self.rounded_from[name] = swept or algorithm.initialize(weight, assignment.scheme.weight,
                                                                                     context)
            self.source_weights[name] = weight
        elif swept is not None:
            quant, results, _ = swept
        else:
            quant, results = algorithm.quantize(weight, assignment.scheme.weight, context)
        layer = make_quant_linear(linear, assignment.scheme, quant, input_range(stats) if stats else None,
                                  job.storage_dtype)
        set_submodule(job.block, name, layer)
        names = tensor_names(full_name, LinearRecord.of(layer))
        result.entries[full_name] = LayerEntry(
            scheme=assignment.scheme, algorithm=algorithm_name, rule=assignment.rule,
            shape=quant.shape, tensors=names, codes_layout=codes_layout(quant.spec),
            ragged_last_group=quant.ragged, integer_zero=quant.integer_zero,
            metrics={"weight_sqnr_db": primitives.sqnr_db(weight, quant.dequantize())}, note=note,
        )
        if stats is not None:
            result.entries[full_name].metrics["input_absmax"] = float(stats.range.absmax.max())
            result.search_results[f"{full_name}.{IN_ABSMAX}"] = stats.range.absmax.float().clone()
        # llama.cpp's importance matrix (export --format imatrix): of the input this Linear was quantized on, or
        # with --imatrix-from float of the float model's
        importance = self.float_importance.get(name, stats) if job.imatrix_from_float else stats
        if importance is not None and importance.tokens and importance.sum_sq.total is not None:
            result.search_results[f"{full_name}.{IN_SUM2}"] = importance.sum_sq.total.float()
            result.search_results[f"{full_name}.{IN_COUNT}"] = importance.sum_sq.count.float().reshape(1)
        expert = expert_index(name, job.arch.experts) if job.arch.experts else None
        if expert is not None and expert in self.routed_tokens:
            result.entries[full_name].metrics["routed_tokens"] = float(self.routed_tokens[expert])
        result.search_results.update({f"{full_name}.{key}": value for key, value in results.items()})

    def refine(self, stats: dict[str, LayerStats | None], result: BlockResult, targets: list[torch.Tensor]
               ) -> list[tuple[str, Refined]]:
        """Block-level refinements (SignRound) of the Linears quantized with one: their codes are learned
        against the float model's block outputs on the float stream (``targets``, one per call; the pipeline
        keeps that stream for them), and the refined QuantLinears replace the initial ones. Returns the
        refinements whose loss over the whole calibration set is still to be measured (`settle`)."""
        job = self.job
        pending = []
        for algorithm_name in sorted({job.assigned[n].algorithm for n in self.rounded_from}):
            names = sorted(n for n in self.rounded_from if job.assigned[n].algorithm == algorithm_name)
            context = RefineContext(prefix=job.prefix, block=job.block, assigned=job.assigned,
                                    rounded_from={n: self.rounded_from.pop(n) for n in names}, inputs=job.inputs,
                                    targets=targets, compute_dtype=job.compute_dtype, seed=job.index,
                                    advance=job.on_step)
            refined = get_algorithm(algorithm_name).refine_block(context)
            self.install(refined.weights, stats)
            if refined.loss_after is None:
                pending.append((algorithm_name, refined))
            else:
                self.record_refinement(algorithm_name, refined, result)
        return pending

    def install(self, weights: dict[str, QuantTensor], stats: dict[str, LayerStats | None]) -> None:
        job = self.job
        for name, quant in weights.items():
            layer = make_quant_linear(job.block.get_submodule(name), job.assigned[name].scheme, quant,
                                      input_range(stats[name]) if stats[name] else None, job.storage_dtype)
            set_submodule(job.block, name, layer)

    def record_refinement(self, algorithm_name: str, refined: Refined, result: BlockResult) -> None:
        job = self.job
        for name, quant in refined.weights.items():
            metrics = result.entries[self.full_name(name)].metrics
            metrics["weight_sqnr_db"] = primitives.sqnr_db(self.source_weights.pop(name), quant.dequantize())
            metrics["block_loss_before"], metrics["block_loss_after"] = refined.loss_before, refined.loss_after
        result.search_results[f"{job.prefix}.{algorithm_name}.loss"] = torch.tensor(
            [refined.loss_before, refined.loss_after])
        result.search_results[f"{job.prefix}.{algorithm_name}.steps"] = torch.tensor(
            [float(refined.iterations), float(refined.best_iteration)])

    def settle(self, pending: list[tuple[str, Refined]], loss_after: float, stats: dict[str, LayerStats | None],
               result: BlockResult) -> bool:
        """Keep each pending refinement whose block loss over the whole calibration set (``loss_after``,
        measured with the refined codes) is below its loss at the start, else put its initial codes back.
        Returns whether any was put back (the block's outputs then change)."""
        reverted = False
        for algorithm_name, refined in pending:
            if loss_after < refined.loss_before:
                refined = dataclasses.replace(refined, loss_after=loss_after, initial=None)
            else:       # the best state on single calls did not help over the whole set
                self.install(refined.initial, stats)
                refined = dataclasses.replace(refined, weights=refined.initial, loss_after=refined.loss_before,
                                              best_iteration=0, initial=None)
                reverted = True
            self.record_refinement(algorithm_name, refined, result)
        return reverted

    def propagate_and_settle(self, float_weights: dict[str, torch.Tensor], observed_block: ObservedBlock,
                             pending: list[tuple[str, Refined]], targets: list[torch.Tensor],
                             stats: dict[str, LayerStats | None]) -> dict[str, float]:
        """The quantized block's outputs (the next block's inputs, unless --propagate float) and output-SQNR
        figures; the pending refinements settled on the same pass (their loss against ``targets``), with the
        block run again where one is put back."""
        job, result = self.job, observed_block.result
        if not observed_block.float_stream:
            result.outputs, output_sqnr, loss = self.propagate(float_weights, job.inputs,
                                                               targets=targets if pending else None)
            if pending and self.settle(pending, loss, stats, result):
                result.outputs, output_sqnr, _ = self.propagate(float_weights, job.inputs)
            return output_sqnr
        if pending:   # --propagate float: the outputs are the float block's, a pass for the loss alone
            _, _, loss = self.propagate({}, job.inputs, keep=False, targets=targets)
            self.settle(pending, loss, stats, result)
        # only the output-SQNR figures: the quantized block on the first metric samples
        return self.propagate(float_weights, self.first_samples(job.metric_samples), keep=False)[1]

    def propagate(self, float_weights: dict[str, torch.Tensor], calls: list[BlockInput], keep: bool = True,
                  targets: list[torch.Tensor] | None = None) -> tuple[list[BlockInput], dict[str, float], float | None]:
        """Recompute the block's outputs on ``calls`` with its quantized Linears (with ``keep``: the next
        block's inputs, else none are returned), measure each Linear's output SQNR against its float
        weight on the first ``metric_samples``, and with ``targets`` (one per call) the mean squared error
        of the outputs against them over every element (a refinement's loss)."""
        job = self.job
        error = [0.0, 0.0]     # fp32 sum of squared errors, element count
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
            for index, call in enumerate(calls):
                measuring[0] = call.first_sample < job.metric_samples
                hidden = run_block(runner, call)
                if not all_finite(hidden):
                    raise QuantkitError(self.explain_nonfinite(call))
                if targets is not None:
                    error[0] += F.mse_loss(hidden.float(), targets[index].float(), reduction="sum").item()
                    error[1] += float(targets[index].numel())
                if keep:
                    outputs.append(job.keep(BlockInput(hidden, call.kwargs, call.first_sample), len(outputs)))
        names = sorted(float_weights)
        sums = job.processes.sum_values([signal[n] for n in names] + [noise[n] for n in names] + error)
        loss = sums[-2] / max(sums[-1], 1) if targets is not None else None
        # A Linear no measured token reached (a MoE expert routed nothing in those samples) gets no figure.
        return outputs, {n: primitives.sqnr_db_from_sums(sums[i], sums[len(names) + i]) for i, n in enumerate(names)
                         if sums[i] > 0 or sums[len(names) + i] > 0}, loss
