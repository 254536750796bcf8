"""Peak memory and disk a calibration run will need, computed before any work from the checkpoint's
safetensors headers (no tensor is read) and the run's settings.

Memory model (bytes), the largest of three phases on top of the Python/torch baseline:
  capture: embeddings in the compute dtype + the cached block inputs
  block:   the fp32 master block, two compute-dtype copies (runner and search trial), the cached
           inputs and outputs of every calibration sample (N x L x hidden, twice), one batch's largest
           intermediate (B x L x intermediate x 3 in fp32) and the statistics of the block's Linears
           (per-channel ranges; Hessians in x in fp32 for GPTQ; AWQ's captured inputs of its search
           samples); SignRound adds the float stream's cached inputs, its training copy of the block
           with per-weight offsets, their gradients and two snapshots, and one batch's autograd tape
  finish:  the non-block tensors, plus the whole output when it is small enough to be merged into
           one model.safetensors
Disk: the output (codes at their bit width, fp16 scales, the rest in the storage dtype) and, during the
run, the work directory (the committed blocks plus one copy of the cached inputs).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from quantkit.errors import QuantkitError
from quantkit.files import nearest_existing
from quantkit.formats import primitives
from quantkit.formats.numbers import scale_format
from quantkit.model.moe import expert_index
from quantkit.run.allocate import KL_GROUP, LOGIT_CHUNK
from quantkit.run.final_norm import FIT_TOKENS, TOKENS_PER_STEP

BASELINE_BYTES = 700 * 2**20     # an idle Python with torch and transformers imported
MANIFEST_LAYER_BYTES = 8192      # one Linear's entry in quant_manifest.json (measured: about 1.5 KB)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class Estimate:
    peak_memory: int
    disk: int
    phases: dict[str, int] = field(default_factory=dict)
    activations: int = 0

    def describe(self) -> str:
        gib = 2**30
        return (f"estimated peak memory {self.peak_memory / gib:.2f} GiB (cached activations "
                f"{self.activations / gib:.2f} GiB), disk {self.disk / gib:.2f} GiB")

    def to_dict(self) -> dict:
        return {"peak_memory_bytes": self.peak_memory, "disk_bytes": self.disk, "phases": self.phases,
                "activation_bytes": self.activations}


def tensor_shapes(checkpoint) -> dict[str, tuple[tuple[int, ...], int]]:
    """{name: (shape, bytes per element)} from the safetensors headers alone."""
    return {name: (shape, _DTYPE_BYTES.get(dtype, 4)) for name, (shape, dtype) in checkpoint.shapes().items()}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def estimate_run(run) -> Estimate:
    """The estimate for a prepared pipeline run (pipeline._Run)."""
    config = run.checkpoint.text_config
    shapes = tensor_shapes(run.checkpoint)
    compute = torch.finfo(run.compute_dtype).bits // 8
    storage = torch.finfo(run.storage_dtype).bits // 8
    blocks_prefix = run.arch.blocks + "."
    block_params = max((sum(_numel(s) for n, (s, _) in shapes.items() if n.startswith(f"{blocks_prefix}{i}."))
                        for i in range(config.num_hidden_layers)), default=0)
    rest = sum(_numel(s) * storage for n, (s, _) in shapes.items() if not n.startswith(blocks_prefix))
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    samples, seq_len = run.config.num_samples, run.config.seq_len
    activations = samples * seq_len * hidden * compute if run.needs_data else 0
    if run.config.offload_activations:  # one batch of inputs and one of outputs in memory at a time
        activations = min(activations, run.config.batch_size * seq_len * hidden * compute)
    refined = run.refined
    if run.second_stream:   # the float stream, in memory next to the quantized one
        activations += samples * seq_len * hidden * compute
    embeddings = config.vocab_size * hidden * compute if run.needs_data else 0
    batch_intermediate = run.config.batch_size * seq_len * intermediate * 4 * 3 if run.needs_data else 0
    stats = _statistics_bytes(run, shapes) if run.needs_data else 0
    output = _output_bytes(run, shapes, storage) + rest
    # the quantize lane (--propagate float): a block is quantized, with its statistics and inputs, while the next
    # one is observed
    lane = block_params * (4 + compute + compute) + stats + activations if run.pipelined else 0
    phases = {
        "capture": embeddings + activations,
        # fp32 master copy, the compute-dtype runner, and the float reference weights of the metrics
        "block": block_params * (4 + compute + compute) + 2 * activations + batch_intermediate + stats
        + _alpha_search_bytes(run, block_params, compute)
        + (_refine_bytes(run, block_params, compute, hidden, intermediate) if refined else 0) + lane,
        "finish": rest + (output if output <= 2 * 1024**3 else 0),
    }
    if run.needs_data and run.config.sensitivity == "block" and (run.config.target_bits is not None
                                                                 or run.config.target_size is not None):
        # the sensitivity pass's last block also runs the final norm and LM head (fp32) on chunks of tokens:
        # the head, up to KL_GROUP changed block outputs of a metric sample, a chunk's float and changed logits
        # with their exp and difference
        changed = KL_GROUP * run.config.metric_samples * seq_len * hidden * 4
        phases["sensitivity"] = (block_params * (4 + compute) + 2 * activations + batch_intermediate + stats
                                 + changed + config.vocab_size * hidden * 4 + 4 * LOGIT_CHUNK * config.vocab_size * 4)
    if run.fits_final_norm:
        # both streams, the fit's float32 copies of its tokens, the head in fp32, and one step's logits (float and
        # fitted, with their exp, difference and gradients: about 8 vocabulary-wide fp32 rows per token)
        phases["final norm"] = (2 * activations + 2 * FIT_TOKENS * hidden * 4 + config.vocab_size * hidden * 4
                                + 8 * TOKENS_PER_STEP * config.vocab_size * 4)
    # the work directory's blocks and inputs (none kept in memory is written without --resume's state), then the
    # output with the copied config/tokenizer files
    saved_inputs = activations if run.config.resumable or run.config.offload_activations else 0
    disk = output + (output + saved_inputs) + sum(f.stat().st_size for f in run.copied_files) + _side_bytes(run, shapes)
    return Estimate(BASELINE_BYTES + max(phases.values()), disk, phases, activations)


def _refine_bytes(run, block_params: int, compute: int, hidden: int, intermediate: int) -> int:
    """SignRound's training of one block: the block copy in the compute dtype; per weight in fp32 the
    weight it was rounded from, its source weight, the initial codes and weight, the offsets, their
    gradient, two snapshots (best, initial) and the step's dequantized weight with its temporaries (about
    14 fp32 values per weight, K grids' expanded scales included); and the autograd tape of one batch (the
    inputs of every Linear and activation: about 10 hidden-wide and 4 intermediate-wide fp32 tensors per token)."""
    tokens = run.config.batch_size * run.config.seq_len
    return block_params * (compute + 14 * 4) + tokens * (10 * hidden + 4 * intermediate) * 4


def _alpha_search_bytes(run, block_params: int, compute: int) -> int:
    """--alpha auto tries each alpha on a trial block: its fp32 copy, the codes and the dequantized
    weights of its QuantLinears, and its compute-dtype runner, next to the float runner."""
    if not run.needs_data or run.alpha is not None or not run.smooth:
        return 0
    return block_params * (4 + 1 + compute + compute + compute)


def _statistics_bytes(run, shapes) -> int:
    """Statistics of one block's Linears (block 0's shapes; blocks are alike)."""
    from quantkit.algorithms.registry import (
        base_algorithm,
        get_algorithm,
        parse_options,
    )

    total, gptq_working_set = 0, 0
    layout = run.arch.experts
    experts = layout.num_experts(run.checkpoint.text_config) if layout else 1
    for name in run.arch.linears:
        assignment = run.plan.get(f"{run.arch.blocks}.0.{name}")
        weight = shapes.get(f"{run.arch.blocks}.0.{name}.weight")
        if assignment is None or weight is None:
            continue
        out_features, in_features = weight[0]
        algorithm, options = base_algorithm(assignment.algorithm, assignment.options,
                                             assignment.scheme.weight)  # a refinement's init
        kinds = get_algorithm(algorithm).statistics
        # MoE experts: Hessians of at most --expert-batch experts are alive at once; AWQ captures the
        # routed tokens, top_k of every E experts' worth in all
        expert = layout is not None and expert_index(name, layout) is not None
        alive = min(experts, run.config.expert_batch) / experts if expert else 1.0
        routed = run.checkpoint.text_config.num_experts_per_tok / experts if expert else 1.0
        total += 2 * in_features * 4
        if "hessian" in kinds:
            # the fp64 sum; while one Linear is swept: its fp32 matrix, the working copy, the damped
            # copy and its Cholesky factor, plus two fp32 copies of the weight
            total += int(in_features * in_features * 8 * alive)
            gptq_working_set = max(gptq_working_set, 4 * in_features * in_features * 4
                                   + 2 * out_features * in_features * 4)
        if algorithm == "awq":
            samples = parse_options("awq", options).samples
            total += int(samples * run.config.seq_len * in_features * 4 * routed)
    return total + gptq_working_set


def _output_bytes(run, shapes, storage: int) -> int:
    """Quantized Linears at their bit width plus their scales (in the scale format, one row per block of
    rows for 2-D blocks), zero points and global scales; other block tensors in the storage dtype."""
    total = 0
    blocks_prefix = run.arch.blocks + "."
    for name, (shape, _) in shapes.items():
        if not name.startswith(blocks_prefix):
            continue
        assignment = run.plan.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if assignment is None or len(shape) != 2:
            total += _numel(shape) * storage
            continue
        spec = assignment.scheme.weight
        groups = primitives.group_count(shape[1], primitives.group_size_for(spec, shape[1]))
        rows = primitives.group_count(shape[0], primitives.rows_per_scale(spec, shape[0]))
        per_scale = scale_format(spec.scale_format).bits // 8 + (0 if spec.symmetric else 1)
        total += _numel(shape) * spec.bits // 8 + rows * groups * per_scale + (4 if spec.second_scale else 0)
        if spec.super_group:   # K-quants' fp16 d (and dmin) per super-block
            total += rows * (shape[1] // spec.super_group) * 2 * (1 if spec.symmetric else 2)
    return total


def _side_bytes(run, shapes) -> int:
    """quant_manifest.json and search_results.safetensors: per quantized Linear its manifest entry
    and at most a few fp32 vectors along its input and output dimension (smoothing factors, AWQ
    scales and clip ratios, per-group errors)."""
    total = 64 * 1024
    for name, assignment in run.plan.items():
        weight = shapes.get(f"{name}.weight")
        if assignment is not None and weight is not None:
            out_features, in_features = weight[0]
            total += MANIFEST_LAYER_BYTES + 4 * 4 * (in_features + out_features)
    return total


def check_fits(estimate: Estimate, out: Path, *, memory_factor: float = 0.9) -> None:
    """Stop before any work when the machine cannot hold the run, naming what would make it fit."""
    available = psutil.virtual_memory().available
    if estimate.peak_memory > memory_factor * available:
        hint = ("fewer calibration samples (--num-samples), shorter ones (--seq-len), or --offload-activations"
                if estimate.activations > 0.25 * estimate.peak_memory else
                "a machine with more memory (the largest block alone does not fit)")
        raise QuantkitError(f"this run needs about {estimate.peak_memory / 2**30:.1f} GiB of memory but "
                            f"{available / 2**30:.1f} GiB is available; try {hint}")
    parent = nearest_existing(out)
    free = shutil.disk_usage(parent).free
    if estimate.disk > free:
        raise QuantkitError(f"this run needs about {estimate.disk / 2**30:.1f} GiB of disk in {parent} but "
                            f"{free / 2**30:.1f} GiB is free")
