"""The sequential, layer-wise calibration pipeline: checkpoint -> packed safetensors + manifest.

    1. capture:   run the calibration batches up to decoder block 0 and keep its inputs (once);
    2. per block: load its weights -> observe (hooks keep running per-channel input statistics)
                  -> smooth (SmoothQuant fold) -> quantize its Linears (stage by stage, re-observing
                  for sequential algorithms) -> propagate (recompute the block's outputs with the
                  quantized weights; they are the next block's inputs) -> write its tensors -> release;
    3. finish:    copy embeddings, final norm, lm_head, config and tokenizer; write the manifest;
                  rename the staging directory into place.
Peak memory is one block (plus a compute-dtype copy) and the cached activations of the calibration
samples, whatever the number of blocks.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import resource
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import quantkit
from quantkit.algorithms.registry import (
    BlockRefinement,
    BlockTransform,
    base_algorithm,
    check_options,
    get_algorithm,
    validate_grid,
)
from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens
from quantkit.calibrate.hooks import (
    BlockInput,
    OffloadedHidden,
    capture_block_inputs,
)
from quantkit.errors import QuantkitError, RunInterrupted
from quantkit.files import atomic_json, check_output_path, tensor_bytes, writing
from quantkit.formats import ggml_mixes
from quantkit.formats.schemes import get_scheme, scheme_to_dict
from quantkit.model.architectures import Architecture, architecture_for
from quantkit.model.checkpoint import (
    Checkpoint,
    ModelSource,
    build_skeleton,
    check_weights,
    expected_tensors,
    materialize,
    release,
    resolve_model,
)
from quantkit.model.head import load_output_head
from quantkit.model.qlinear import QuantLinear
from quantkit.native.manifest import (
    AchievedSize,
    AllocationInfo,
    CalibrationInfo,
    LayerEntry,
    Manifest,
    SmoothingInfo,
    SourceInfo,
    Summary,
    ToolInfo,
)
from quantkit.native.writer import LinearRecord, record_tensors
from quantkit.run import allocate, budget, final_norm
from quantkit.run.allocate import Allocation
from quantkit.run.block import (
    BlockJob,
    BlockQuantizer,
    BlockResult,
    ObservedBlock,
    base_assignment,
    true_sequential,
)
from quantkit.run.budget import Candidate
from quantkit.run.distributed import Processes, from_environment
from quantkit.run.estimate import Estimate, check_fits, estimate_run
from quantkit.run.final_norm import FinalNormFit
from quantkit.run.lane import LaneTask, QuantizeLane
from quantkit.run.layers import cast_parameters
from quantkit.run.mixes import resolve_ggml_types
from quantkit.run.recipe import LayerAssignment, Recipe, make_scheme, uniform_plan
from quantkit.run.smoothing import ALPHA_GRID
from quantkit.run.workdir import WorkDir, check_committed_work, work_path

_SOURCE_FILE_PATTERNS = ("*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken")
_SENSITIVITY_FILE = "sensitivity.json"   # in the work directory: the measured sensitivities, for --resume
_SKIPPED_SOURCE_FILES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


@dataclass
class CalibrateConfig:
    """Everything `calibrate` needs; the CLI parses flags into this and nothing else."""

    model: str
    scheme: str = "w8a8_dynamic"
    dataset: str = "dummy"
    data_files: tuple[str, ...] = ()
    text_column: str = "text"
    num_samples: int = 64
    seq_len: int = 512
    alpha: float | None = None          # None: searched per block over smoothing.ALPHA_GRID
    smooth: bool | None = None          # None: on exactly when the scheme quantizes activations
    algorithm: str = "rtn"
    options: dict = field(default_factory=dict)   # algorithm options (e.g. GPTQ act_order)
    recipe: Path | None = None          # a YAML recipe instead of scheme/algorithm/overrides
    bits: int | None = None             # overrides of the scheme's weight grid
    group_size: int | None = None
    symmetric: bool | None = None
    seed: int = 0
    batch_size: int = 8
    out: Path | None = None
    overwrite: bool = False
    dtype: str = "auto"                 # compute dtype of the forward passes
    trust_remote_code: bool = False
    metric_samples: int = 4             # samples whose layer outputs are compared float vs quantized (0: none, no
                                        # output-SQNR figures; with --propagate float the block's second pass goes)
    keep_model: bool = False            # return the in-memory quantized model (tests, validation)
    resume: bool = False                # continue an interrupted run from its first unfinished block
    resumable: bool = True              # False: no block commits the next block's inputs (what --resume restarts
                                        # from), for a run whose work directory goes away with it (export --algo)
    offload_activations: bool = False   # keep the cached block inputs on disk, one file per batch
    imatrix_from: str = "quantized"     # importance statistics of the inputs as calibration propagates them, or
                                        # "float": the float model's own (llama-imatrix's; one more forward per block)
    propagate: str = "quantized"        # each block's calibration inputs: the quantized blocks' outputs before it,
                                        # or "float": the float model's (one forward per block instead of two)
    dry_run: bool = False               # validate everything and estimate memory/disk, then stop
    moe_all_experts: bool = True        # MoE: every expert's statistics from every token (outputs keep the routing)
    expert_batch: int = 16              # MoE: experts whose Hessians are collected at once
    target_bits: float | None = None    # automatic mixed precision: bits per weight of the quantized Linears
    target_size: str | None = None      # or bytes of the output's weight files ("3.2GB", "800MiB")
    candidates: str | None = None       # the grids allowed (`run.budget.parse_candidates`); None: int 2-8 x g32-128
    sensitivity: str = "block"          # how a grid's harm is measured (`run.allocate`): block or layer
    fit_final_norm: bool | None = None  # fit the final norm's gain to the float logits (`run.final_norm`); None: on
                                        # with a refinement (SignRound), whose float stream it reads


@dataclass
class CalibrationResult:
    out: Path
    manifest: Manifest | None           # None on a dry run and on torch.distributed ranks other than 0
    model: nn.Module | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    estimate: Estimate | None = None
    overlapped_seconds: float = 0.0     # quantize-lane seconds counted in the stage times beside observe's

    @property
    def total_seconds(self) -> float:
        """The stages' wall time: their sum, less what the quantize lane ran beside the main thread."""
        return sum(self.timings.values()) - self.overlapped_seconds


class Progress:
    """Callbacks the CLI renders with rich; the library default ignores them."""

    def stage(self, name: str, total: int | None = None) -> None:
        """A stage starts; ``total`` steps will follow."""

    def advance(self, name: str, detail: str = "") -> None:
        """One step of the current stage is done."""

    def step(self, name: str, done: int, total: int, detail: str = "") -> None:
        """``done`` of ``total`` steps of a long stage inside a block (SignRound's optimisation)."""

    def block_done(self, index: int, layers: dict[str, dict]) -> None:
        """A decoder block is quantized; ``layers`` holds each Linear's metrics."""

    def estimate(self, estimate: Estimate) -> None:
        """The memory and disk the run is expected to need, before any work."""


def compute_dtype(name: str, source: torch.dtype) -> torch.dtype:
    """auto: fp32 sources compute in fp32; half-precision sources in bf16 on CPU (fp16 matmuls are
    slow there and bf16 has fp32's range)."""
    if name != "auto":
        try:
            dtype = getattr(torch, name)
        except AttributeError:
            dtype = None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise QuantkitError(f"unknown dtype '{name}'; use auto, float32, bfloat16 or float16")
        return dtype
    return torch.float32 if source == torch.float32 else torch.bfloat16


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM of its address space. (ru_maxrss is no
    good here: Linux carries it over fork and exec, so a process started by a big parent reports the
    parent's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class _Run:
    """The state of one calibration run, built and validated before any heavy work."""

    config: CalibrateConfig
    source: ModelSource
    checkpoint: Checkpoint
    arch: Architecture
    plan: dict[str, LayerAssignment | None]
    ignored: dict[str, str]             # block Linears left in the source dtype, and why
    recipe: dict | None
    smooth: bool
    alpha: float | None
    compute_dtype: torch.dtype
    storage_dtype: torch.dtype
    out: Path
    needs_data: bool = True             # False: every layer's algorithm is calibration-free
    weights_sha256: str = ""
    estimate: Estimate | None = None
    processes: Processes = field(default_factory=Processes)
    dataset: DatasetSpec | None = None
    calibration_tokens: int = 0
    tokens: torch.Tensor | None = None  # [num_samples, seq_len] int64 calibration token ids
    copied_files: list[Path] = field(default_factory=list)  # config and tokenizer files copied to the output
    block_alpha: dict[int, float | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    gguf_file_type: str | None = None   # the llama.cpp file type the plan follows (--scheme q4_k_m)
    candidates: list[Candidate] | None = None   # --target-bits/--target-size: the grids the allocation chooses from
    allocation: Allocation | None = None
    allocation_record: AllocationInfo | None = None   # the manifest's: the allocation, the achieved size from the files
    measurements: dict | None = None    # sensitivities measured by this run (kept in the work dir for --resume)
    fixed_bytes: int = 0                # --target-size: the weight files' bytes no allocation changes (bound)
    importance_is_float: bool = True    # every block's recorded Σx² is the float model's (`BlockResult`), so far
    overlapped: float = 0.0             # seconds the quantize lane worked beside the main thread (in two stages' times)
    final_norm: FinalNormFit | None = None   # the fitted final norm (`fits_final_norm`), once every block is done

    def full_name(self, block_index: int, name: str) -> str:
        return f"{self.arch.blocks}.{block_index}.{name}"

    @property
    def refined(self) -> bool:
        """Whether any layer's algorithm refines its block against the float model's outputs (SignRound): the
        run then keeps the float stream, the float model's own block inputs, next to the quantized one."""
        return any(isinstance(get_algorithm(a.algorithm), BlockRefinement) for a in self.plan.values() if a is not None)

    @property
    def pipelined(self) -> bool:
        """Whether each block is quantized in a second thread while the next one is observed (`lane`): with
        --propagate float (the next block's inputs are known once a block is observed), in one process, without
        a refinement (which trains on both cores) and without smoothing or block transforms (AWQ), whose
        float32 matmuls would share oneDNN's process-wide precision with the other thread's x^T x. Nor where a
        block observes Linears again in its quantize half (true-sequential GPTQ, MoE expert batches): those
        forward passes would run on the lane's one thread, slower than the whole block on all of them."""
        return (self.needs_data and self.config.propagate == "float" and self.processes.world_size == 1
                and not self.refined and not self.smooth and self.arch.experts is None
                and not any(isinstance(get_algorithm(_base(a)), BlockTransform) for a in self.plan.values()
                            if a is not None)
                and not self._re_observes())

    def _re_observes(self) -> bool:
        """Whether a Linear past a block's first stage is observed again once the earlier stages are quantized
        (`block.true_sequential`)."""
        later = {name for stage in self.arch.sequential[1:] for name in stage}
        prefix = f"{self.arch.blocks}."
        for full_name, assignment in self.plan.items():
            if assignment is None or not full_name.startswith(prefix):
                continue
            name = full_name[len(prefix):].partition(".")[2]      # the block-relative name
            if name in later and true_sequential(base_assignment(assignment)):
                return True
        return False

    @property
    def second_stream(self) -> bool:
        """Whether the float stream is kept next to the quantized one (--imatrix-from float, a refinement's
        targets); with --propagate float the one stream is the float model's."""
        return (self.needs_data and self.config.propagate == "quantized"
                and (self.config.imatrix_from == "float" or self.refined or bool(self.config.fit_final_norm)))

    @property
    def fits_final_norm(self) -> bool:
        """Whether the final norm's gain is fitted once every block is quantized (`run.final_norm`): asked for, or
        by default with a refinement; it reads both streams' last outputs."""
        wanted = self.config.fit_final_norm if self.config.fit_final_norm is not None else self.refined
        return wanted and self.second_stream


@contextmanager
def _timed(run: _Run, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        run.timings[stage] = run.timings.get(stage, 0.0) + time.perf_counter() - start


def _plan(config: CalibrateConfig, layer_names: list[str], candidates: list[Candidate] | None
          ) -> tuple[dict, dict, Recipe | None]:
    """(layer -> assignment, ignored layers, recipe) from --recipe or from --scheme/--algo and overrides
    (llama.cpp file types and K grids are resolved per tensor afterwards: `mixes.resolve_ggml_types`). With a
    target the base scheme only names the candidates' family until the allocation replaces the plan: the
    algorithm is validated on each candidate (`_target_candidates`), so `imatrix` on symmetric candidates
    needs no --sym."""
    if config.recipe is not None:
        recipe = Recipe.load(config.recipe)
        plan, ignored = recipe.plan(layer_names)
        return plan, ignored, recipe
    scheme = make_scheme(config.scheme, config.bits, config.group_size, config.symmetric)
    if not candidates:
        validate_grid(config.algorithm, config.options, scheme.weight)
    file_type = ggml_mixes.scheme_file_type(config.scheme)
    overridden = " with weight overrides" if file_type is None and scheme != get_scheme(config.scheme) else ""
    rule = f"--scheme {config.scheme}{overridden} --algo {config.algorithm}"
    assignment = LayerAssignment(scheme, config.algorithm, rule, dict(config.options), file_type)
    return uniform_plan(layer_names, assignment), {}, None


def _file_type(plan: dict[str, LayerAssignment | None]) -> str | None:
    """The llama.cpp file type every planned layer follows, if they all follow one (the GGUF export's default)."""
    types = {a.file_type for a in plan.values() if a is not None}
    return next(iter(types)) if len(types) == 1 else None


def _target_candidates(config: CalibrateConfig) -> list[Candidate] | None:
    """The candidate grids of --target-bits/--target-size (None without a target), every setting checked."""
    if config.target_bits is None and config.target_size is None:
        if config.candidates is not None:
            raise QuantkitError("--candidates lists the grids --target-bits/--target-size choose from; give a target")
        return None
    if config.target_bits is not None and config.target_size is not None:
        raise QuantkitError("give --target-bits or --target-size, not both")
    if config.recipe is not None:
        raise QuantkitError("--target-bits/--target-size write their own recipe; drop --recipe (rerun the written "
                            "recipe.yaml with --recipe alone)")
    if config.bits is not None or config.group_size is not None:
        raise QuantkitError("--bits/--group-size fix one grid; with a target the grids come from --candidates")
    if config.target_bits is not None and not 0 < config.target_bits <= 32:
        raise QuantkitError(f"--target-bits must be in (0, 32] bits per weight, got {config.target_bits}")
    if config.target_size is not None:
        budget.parse_size(config.target_size)
    if config.sensitivity not in allocate.SENSITIVITIES:
        raise QuantkitError(f"unknown sensitivity '{config.sensitivity}' (use {' or '.join(allocate.SENSITIVITIES)})")
    candidates = budget.parse_candidates(config.candidates, config.scheme, config.symmetric)
    for candidate in candidates:
        scheme = candidate.scheme()
        if scheme.activation is not None:
            raise QuantkitError(f"candidate {candidate.label} quantizes activations; the allocation chooses among "
                                "weight-only grids")
        try:
            validate_grid(config.algorithm, config.options, scheme.weight)
        except QuantkitError as error:
            raise QuantkitError(f"candidate {candidate.label}: {error}") from None
    return candidates


_INTEGER_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _offset_digits(config: CalibrateConfig) -> int:
    """Digits of a safetensors data offset: an offset is below the file's size, so below a size target."""
    return len(str(budget.parse_size(config.target_size))) if config.target_size else allocate.OFFSET_DIGITS


def _fixed_bytes(config: CalibrateConfig, checkpoint: Checkpoint, arch: Architecture, expected, plan: dict,
                 storage_dtype: torch.dtype) -> int:
    """--target-size: an upper bound of the output weight files' bytes besides the quantized Linears' grids:
    the tensors kept in the storage dtype (embeddings, norms, lm_head, biases, routers) with their header
    entries, and every file's own overhead (one file per block and one for the rest when sharded)."""
    size = torch.empty((), dtype=storage_dtype).element_size()
    block_prefix = arch.blocks + "."
    quantized = {f"{name}.weight" for name, assignment in plan.items() if assignment is not None}
    # float tensors are stored in the storage dtype; others (integer buffers) as they are (8 bytes if unknown)
    kept = [(n, s, size if d.startswith(("F", "BF")) else _INTEGER_BYTES.get(d, 8))
            for n, (s, d) in checkpoint.shapes().items() if not n.startswith(block_prefix)]
    kept += [(n, s, size) for n, s in expected.shapes.items() if n.startswith(block_prefix) and n not in quantized]
    headers = sum(budget.header_entry_bound(n, tuple(s), _offset_digits(config)) for n, s, _ in kept)
    files = checkpoint.text_config.num_hidden_layers + 1
    return sum(math.prod(s) * b for _, s, b in kept) + headers + budget.FILE_OVERHEAD * files


def _prepare(config: CalibrateConfig, writes: bool = True) -> _Run:
    """Resolve and check every input before any heavy work: names, numbers, the checkpoint's weights
    against its config, the plan and (``writes``) the output location."""
    if config.recipe is None:
        make_scheme(config.scheme, config.bits, config.group_size, config.symmetric)  # bad names stop here
        get_algorithm(config.algorithm)
        check_options(config.algorithm, config.options)
    if config.num_samples < 1 or config.batch_size < 1:
        raise QuantkitError("--num-samples and --batch-size must be at least 1")
    if config.metric_samples < 0:
        raise QuantkitError(f"metric_samples must be at least 0, got {config.metric_samples}")
    if config.metric_samples == 0 and (config.target_bits or config.target_size):
        raise QuantkitError("--target-bits/--target-size measure block gains on the metric samples: metric_samples "
                            "must be at least 1")
    if config.resume and not config.resumable:
        raise QuantkitError("--resume continues a run that keeps its resume state; this one does not")
    if config.seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2 tokens, got {config.seq_len}")
    if config.expert_batch < 1:
        raise QuantkitError(f"--expert-batch must be at least 1, got {config.expert_batch}")
    if config.imatrix_from not in ("quantized", "float"):
        raise QuantkitError(f"--imatrix-from is 'quantized' or 'float', got '{config.imatrix_from}'")
    if config.propagate not in ("quantized", "float"):
        raise QuantkitError(f"--propagate is 'quantized' or 'float', got '{config.propagate}'")
    source = resolve_model(config.model)
    checkpoint = Checkpoint(source.path, trust_remote_code=config.trust_remote_code)
    arch = architecture_for(checkpoint.config)
    if getattr(checkpoint.config, "quantization_config", None):
        raise QuantkitError(f"{source.path} is already quantized (config.json has quantization_config); give a float checkpoint")
    max_len = getattr(checkpoint.text_config, "max_position_embeddings", None)
    if max_len is not None and config.seq_len > max_len:
        raise QuantkitError(f"--seq-len {config.seq_len} is over the model's maximum of {max_len} tokens")
    expected = expected_tensors(checkpoint.config, trust_remote_code=config.trust_remote_code)
    check_weights(source.path, checkpoint.shapes(), expected)
    names = arch.block_linears(checkpoint.text_config.num_hidden_layers)
    candidates = _target_candidates(config)
    plan, ignored, recipe = _plan(config, names, candidates)
    file_type = _file_type(plan)
    plan, left_float = resolve_ggml_types(plan, {n: tuple(expected.shapes[n + ".weight"]) for n in names}, arch,
                                          checkpoint.text_config)
    ignored = {**ignored, **left_float}
    label = Path(config.recipe).stem if recipe else config.scheme
    out = Path(config.out or Path("out") / f"{Path(config.model).name}-{label}")
    if writes:
        check_output_path(out, config.overwrite, [source.path])
        if not config.resume:
            check_committed_work(out, resume=False, overwrite=config.overwrite)
    assignments = [a for a in plan.values() if a is not None]
    smooth, alpha = config.smooth, config.alpha
    if recipe is not None:
        smooth = recipe.smooth if smooth is None else smooth
        alpha = (None if recipe.alpha in (None, "auto") else float(recipe.alpha)) if alpha is None else alpha
    if smooth is None:
        smooth = alpha is not None or any(a.scheme.activation is not None for a in assignments)
    if config.imatrix_from == "float" and (smooth or any(isinstance(get_algorithm(_base(a)), BlockTransform)
                                                         for a in assignments)):
        raise QuantkitError("--imatrix-from float measures the float model's inputs, which smoothing and AWQ scale "
                            "differently from the quantized model's: use it without them (or the default 'quantized')")
    if candidates is not None and smooth:
        raise QuantkitError("automatic allocation chooses weight-only grids; drop --smooth/--alpha")
    storage_dtype = checkpoint.source_dtype
    return _Run(
        config=config, source=source, checkpoint=checkpoint, arch=arch, plan=plan, ignored=ignored,
        recipe=recipe.source if recipe else None, gguf_file_type=file_type, candidates=candidates,
        fixed_bytes=_fixed_bytes(config, checkpoint, arch, expected, plan, storage_dtype) if candidates else 0,
        needs_data=(smooth or any(_needs_calibration(a) for a in assignments) or config.imatrix_from == "float"
                    or candidates is not None),
        smooth=smooth, alpha=alpha, compute_dtype=compute_dtype(config.dtype, checkpoint.source_dtype),
        storage_dtype=storage_dtype, out=out, weights_sha256=checkpoint.sha256(),
        copied_files=_source_files(source.path),
    )


def _preflight(run: _Run, progress: Progress) -> None:
    """The checks that read the data: every weight finite, the calibration data loaded, tokenized and
    within the model's vocabulary. A dry run stops after these, so it refuses what the run refuses."""
    with _timed(run, "check"):
        progress.stage("check weights")
        run.checkpoint.check_finite()
    if not run.needs_data:
        return
    config = run.config
    with _timed(run, "data"):
        progress.stage("data")
        spec = DatasetSpec(config.dataset, tuple(config.data_files), config.text_column)
        tokenizer = None if spec.name == "dummy" else run.checkpoint.tokenizer()  # random ids need none
        run.tokens = calibration_tokens(spec, tokenizer, run.checkpoint.text_config.vocab_size, config.num_samples,
                                        config.seq_len, config.seed)
        run.calibration_tokens = run.tokens.numel()
        run.dataset = spec


def measure_sensitivities(config: CalibrateConfig, progress: Progress | None = None,
                          importance: Mapping[str, torch.Tensor] | None = None) -> dict[str, allocate.LayerSensitivity]:
    """The sensitivity pass of --target-bits/--target-size on its own, nothing written: each block Linear's
    sensitivity to each of ``config.candidates`` (`run.allocate`), measured block by block on ``config``'s
    calibration data (``config.target_bits`` only marks the run as an allocation). `quantkit export --format gguf
    --target-size --dataset` chooses GGUF types with it; ``importance`` (Linear name -> [in] E[x_j^2], its
    --imatrix): those Linears' GGUF types are measured on llama.cpp's importance-weighted search with it, as the
    file will hold them."""
    if from_environment().world_size > 1:
        raise QuantkitError("the sensitivity pass runs in one process; run without torchrun")
    progress = progress or Progress()
    run = _prepare(config, writes=False)
    if run.candidates is None:
        raise QuantkitError("measure_sensitivities needs candidates and a target")
    _preflight(run, progress)
    return _measure_sensitivities(run, progress, importance)


def _base(assignment: LayerAssignment) -> str:
    """The algorithm a layer runs first (a refinement's initial one)."""
    return base_algorithm(assignment.algorithm, assignment.options, assignment.scheme.weight)[0]


def _needs_calibration(assignment: LayerAssignment) -> bool:
    """Whether a layer's quantization uses calibration activations at all."""
    algorithm = get_algorithm(_base(assignment))
    calibrated_activations = assignment.scheme.activation is not None and assignment.scheme.activation.calibrated
    return (bool(algorithm.statistics) or isinstance(algorithm, BlockTransform) or calibrated_activations
            or isinstance(get_algorithm(assignment.algorithm), BlockRefinement))


def calibrate(config: CalibrateConfig, progress: Progress | None = None) -> CalibrationResult:
    """Calibrate and quantize ``config.model``; write the native output to ``config.out``.

    Blocks are committed to a work directory as they finish; an error discards it, an interrupt
    keeps it so that ``resume=True`` continues from the first unfinished block.
    """
    processes = from_environment()
    progress = progress if progress is not None and processes.writer else Progress()
    run = _prepare(config)
    run.processes = processes
    if run.arch.experts is not None and not config.moe_all_experts and processes.world_size > 1:
        # an expert one rank never routes a token to would have no statistics there to merge
        raise QuantkitError("--moe-routed-only runs in one process; drop it under torchrun (every expert then "
                            "sees every token on every rank)")
    if run.refined and processes.world_size > 1:
        raise QuantkitError("signround optimises each block in one process; run it without torchrun")
    if config.fit_final_norm and processes.world_size > 1:
        raise QuantkitError("--fit-final-norm reads every calibration token's last hidden state in one process; run "
                            "without torchrun")
    if config.fit_final_norm and not run.fits_final_norm:
        raise QuantkitError("--fit-final-norm needs the quantized model's own last hidden states: drop --propagate "
                            "float" if config.propagate == "float" else
                            "--fit-final-norm needs calibration data: no layer of this run takes any")
    if run.candidates is not None and processes.world_size > 1:
        raise QuantkitError("--target-bits/--target-size measure sensitivities in one process; run without torchrun")
    run.estimate = estimate_run(run)
    progress.estimate(run.estimate)
    check_fits(run.estimate, run.out)
    _preflight(run, progress)
    if config.dry_run:
        return CalibrationResult(run.out, None, None, {}, _peak_rss(), estimate=run.estimate)
    if run.candidates is not None:
        _allocate(run, progress)
    work = WorkDir(run.out, _fingerprint(run), rank=processes.rank, writer=processes.writer)
    first = work.start(config.resume, config.overwrite)
    if run.measurements is not None and processes.writer:
        atomic_json(work.path / _SENSITIVITY_FILE, run.measurements)
    processes.barrier()  # the work directory exists before any rank writes into it
    if first and config.keep_model:
        raise QuantkitError("keep_model needs every block in memory: it cannot resume a run")
    try:
        with torch.inference_mode():
            model = _run_blocks(run, work, first, progress)
            processes.barrier()  # every rank has committed its activations
            if not processes.writer:
                return CalibrationResult(run.out, None, None, dict(run.timings), _peak_rss())
            manifest = _finish(run, work, progress)
    except KeyboardInterrupt:
        if work.resumable:
            raise RunInterrupted(f"interrupted; the finished blocks are kept in {work.path}: rerun the same command "
                                 "with --resume to continue") from None
        work.discard()
        raise
    except BaseException:
        if processes.writer:
            work.discard()
        raise
    work.publish(config.overwrite)
    if config.keep_model:
        _finish_in_memory(run, model)
    return CalibrationResult(run.out, manifest, model if config.keep_model else None, dict(run.timings), _peak_rss(),
                             overlapped_seconds=run.overlapped)


def _run_blocks(run: _Run, work: WorkDir, first: int, progress: Progress) -> nn.Module:
    """Every block from ``first`` on: load, quantize, commit (with the next block's inputs), release."""
    model, inputs, block_kwargs = _capture(run, progress) if run.needs_data else (_skeleton(run), None, None)
    if inputs is not None:
        inputs = _restore_or_offload(run, work, first, inputs)
    num_blocks = run.checkpoint.text_config.num_hidden_layers
    progress.stage("blocks", num_blocks)
    # the float stream next to the quantized one (--imatrix-from float, SignRound's targets): the float model's own
    # activations, block by block (kept in memory, committed with each block for --resume)
    float_inputs = None
    if inputs is not None and run.second_stream:
        hidden = [call.tensor() for call in inputs] if first == 0 else work.saved_inputs(float_stream=True)
        float_inputs = [BlockInput(h, call.kwargs, call.first_sample) for h, call in zip(hidden, inputs)]
    lane = QuantizeLane() if run.pipelined and QuantizeLane.available() else None
    pending: tuple[LaneTask, _StartedBlock] | None = None
    try:
        for index in range(num_blocks):
            if index < first:
                progress.advance("blocks", f"block {index} (committed earlier)")
                continue
            inputs, float_inputs = (_block_calls(calls, block_kwargs, index) for calls in (inputs, float_inputs))
            # --imatrix-from float with --propagate float: the float pass of llama-imatrix's statistics reads the
            # one stream (its true-sequential re-observes and MoE's all-token statistics are not llama-imatrix's)
            float_calls = inputs if run.config.propagate == "float" and run.config.imatrix_from == "float" \
                else float_inputs
            started = _start_block(run, index, model.get_submodule(f"{run.arch.blocks}.{index}"), inputs,
                                   _keeper(run, work, index + 1), float_calls, progress)
            if lane is None:
                result, tensors = _finish_block(run, started)
                inputs, float_inputs = result.outputs, result.float_outputs if run.second_stream else None
                _commit_block(run, work, index, result, tensors, progress)
                continue
            # the lane quantizes this block while the loop observes the next one on the float outputs
            inputs = started.observed.result.outputs
            if pending is not None:
                _commit_block(run, work, pending[1].index, *lane.wait(pending[0]), progress)
            pending = (lane.submit(_finish_block, run, started), started)
        if pending is not None:
            _commit_block(run, work, pending[1].index, *lane.wait(pending[0]), progress)
    finally:
        if lane is not None:
            lane.close()
            run.overlapped += lane.overlapped
    if run.fits_final_norm:
        _fit_final_norm(run, model, inputs, float_inputs, progress)
    return model


def _fit_final_norm(run: _Run, model: nn.Module, outputs: list[BlockInput], float_outputs: list[BlockInput],
                    progress: Progress) -> None:
    """The final norm's gain fitted on the last block's outputs of both streams (`run.final_norm`)."""
    with _timed(run, "final_norm"), torch.inference_mode(False), torch.enable_grad():
        progress.stage("final norm")
        head = load_output_head(model, run.arch, run.checkpoint)
        # the same seeded sample of tokens from both streams (their calls hold the same tokens in the same order)
        total = run.calibration_tokens
        rows = final_norm.sample_tokens(total, final_norm.FIT_TOKENS, run.config.seed)
        hidden = [final_norm.gather_tokens((call.tensor() for call in calls), rows, total)
                  for calls in (outputs, float_outputs)]
        run.final_norm = final_norm.fit_final_norm(head, *hidden, run.arch.norm_offset, seed=run.config.seed,
                                                   storage=run.storage_dtype)
        fit = run.final_norm
        progress.advance("final norm", f"KL {fit.kl_before:.4f} -> {fit.kl_after:.4f}"
                                       f"{'' if fit.kept else ' (not lower: the source norm kept)'}")


def _commit_block(run: _Run, work: WorkDir, index: int, result: BlockResult, tensors: dict[str, torch.Tensor],
                  progress: Progress) -> None:
    """Block ``index``'s files, its record and the next block's inputs into the work directory."""
    for stage, seconds in result.timings.items():
        run.timings[stage] = run.timings.get(stage, 0.0) + seconds
    inputs, float_inputs = result.outputs, result.float_outputs if run.second_stream else None
    record = {"entries": {name: entry.to_dict() for name, entry in result.entries.items()},
              "alpha": result.alpha, "timings": result.timings, "importance_is_float": result.importance_is_float}
    in_memory = inputs is not None and not run.config.offload_activations
    resumable = run.config.resumable
    with _timed(run, "write"):
        work.commit_block(index, tensors, record, result.search_results,
                          [call.hidden for call in inputs] if in_memory and resumable else None,
                          None if float_inputs is None or not resumable else [call.tensor() for call in float_inputs])
        if run.config.offload_activations:
            work.drop_offloaded(index)
    progress.block_done(index, {name: entry.metrics for name, entry in result.entries.items()})
    progress.advance("blocks", f"block {index}")


def _allocate(run: _Run, progress: Progress) -> None:
    """--target-bits/--target-size: one streaming pass over the float model measures every Linear's
    sensitivity to every candidate grid (`run.allocate`), the budgeted choice is solved, and the run's plan
    becomes the recipe that choice writes (recorded in the manifest and saved as recipe.yaml)."""
    config = run.config
    start = time.perf_counter()
    key = json.loads(json.dumps({**_fingerprint(run), "candidates": [c.label for c in run.candidates],
                                 "sensitivity": config.sensitivity, "algorithm": [config.algorithm, config.options],
                                 "offset_digits": _offset_digits(config)}))      # as it reads back
    layers = _saved_measurements(run, key) if config.resume else None
    if layers is None:
        layers = _measure_sensitivities(run, progress)
        run.measurements = {"key": key, "layers": {name: layer.to_dict() for name, layer in layers.items()}}
    weights = sum(layer.weights for layer in layers.values())
    if config.target_bits is not None:
        target, budget_bytes = {"bits": config.target_bits}, int(config.target_bits * weights) // 8
    else:
        size = budget.parse_size(config.target_size)
        target, budget_bytes = {"size_bytes": size, "fixed_bytes_bound": run.fixed_bytes}, size - run.fixed_bytes
    smallest = sum(min(b for b in (layer.bytes if config.target_bits is not None else layer.file_bytes)
                       if b is not None) for layer in layers.values())
    if smallest > budget_bytes:
        least = (f"{8 * smallest / weights:.3f} bits per weight" if config.target_bits is not None
                 else f"{(smallest + run.fixed_bytes) / 1e6:.1f} MB")
        raise QuantkitError(f"the target is below the smallest the candidates allow ({least}); "
                            "add lower-bit candidates or raise the target")
    run.allocation = allocate.choose(layers, run.candidates, config.sensitivity, target, budget_bytes)
    run.allocation.seconds = time.perf_counter() - start
    run.recipe = run.allocation.recipe(config.algorithm, config.options)
    plan, _ = Recipe.from_dict(run.recipe, "the allocated recipe").plan(list(run.plan))
    run.plan = {name: plan[name] if run.plan[name] is not None else None for name in run.plan}


def _saved_measurements(run: _Run, key: dict) -> dict[str, allocate.LayerSensitivity] | None:
    """The sensitivities an interrupted run of the same settings measured (kept in its work directory), so
    that --resume does not repeat the sensitivity pass; None when there are none."""
    path = work_path(run.out) / _SENSITIVITY_FILE
    try:
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is None or saved.get("key") != key:
            return None
        return {name: allocate.LayerSensitivity.from_dict(layer) for name, layer in saved["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None      # unreadable: measured again


def _measure_sensitivities(run: _Run, progress: Progress, importance: Mapping[str, torch.Tensor] | None = None
                           ) -> dict[str, allocate.LayerSensitivity]:
    """The streaming float pass of `run.allocate`: every assigned Linear's sensitivity to every candidate
    (``importance``: `measure_sensitivities`')."""
    config = run.config
    model, inputs, block_kwargs = _capture(run, progress)
    with _timed(run, "sensitivity"):
        num_blocks = run.checkpoint.text_config.num_hidden_layers
        progress.stage("sensitivity", num_blocks)
        probe = LayerAssignment(run.candidates[0].scheme(), "gptq", "sensitivity")   # GPTQ's Hessian statistics
        layers: dict[str, allocate.LayerSensitivity] = {}
        for index in range(num_blocks):
            prefix = f"{run.arch.blocks}.{index}"
            block = model.get_submodule(prefix)
            materialize(block, prefix, run.checkpoint, torch.float32)
            assigned = {name: probe for name in run.arch.linears if run.plan.get(f"{prefix}.{name}")}
            job = BlockJob(index=index, prefix=prefix, block=block, assigned=assigned,
                           inputs=_block_calls(inputs, block_kwargs, index), arch=run.arch,
                           model_config=run.checkpoint.text_config, compute_dtype=run.compute_dtype,
                           storage_dtype=run.storage_dtype, smooth=False, alpha=None,
                           metric_samples=config.metric_samples, processes=run.processes,
                           moe_all_experts=config.moe_all_experts, expert_batch=config.expert_batch)
            last = index == num_blocks - 1 and config.sensitivity == "block"
            head = load_output_head(model, run.arch, run.checkpoint) if last else None   # measured at the logits
            measured, inputs = allocate.measure_block(BlockQuantizer(job), run.candidates, config.algorithm,
                                                      config.options, config.sensitivity, _offset_digits(config),
                                                      importance, head)
            layers.update(measured)
            release(block)
            progress.advance("sensitivity", f"block {index}")
    if not layers:
        raise QuantkitError("--target-bits/--target-size found no block Linear to choose a grid for")
    return layers


def _block_calls(calls: list[BlockInput] | None, block_kwargs, index: int) -> list[BlockInput] | None:
    """The calls with block ``index``'s own mask and rotary table (layer types differ in Gemma)."""
    if calls is None:
        return None
    return [dataclasses.replace(call, kwargs=block_kwargs[i][index]) for i, call in enumerate(calls)]


def _restore_or_offload(run: _Run, work: WorkDir, first: int, captured: list[BlockInput]) -> list[BlockInput]:
    """Block ``first``'s inputs: the captured ones (first = 0) or those a resumed run committed, kept
    in memory or, with offload_activations, in the work directory. The captured calls supply the
    model's other arguments (masks, rotary tables), which do not change from block to block."""
    if run.config.offload_activations:
        if first == 0:
            return [_keeper(run, work, 0)(call, i) for i, call in enumerate(captured)]
        return [BlockInput(OffloadedHidden(work.offloaded(first, i)), call.kwargs, call.first_sample)
                for i, call in enumerate(captured)]
    if first == 0:
        return captured
    return [BlockInput(hidden, call.kwargs, call.first_sample) for hidden, call in zip(work.saved_inputs(), captured)]


def _keeper(run: _Run, work: WorkDir, block: int):
    """Where block ``block``'s inputs are kept: memory, or one file per batch in the work directory."""
    if not run.config.offload_activations:
        return lambda call, i: call
    return lambda call, i: BlockInput(OffloadedHidden(work.offloaded(block, i), call.tensor()), call.kwargs,
                                      call.first_sample)


def _finish(run: _Run, work: WorkDir, progress: Progress) -> Manifest:
    """Weights of the rest of the model, shards, search results, source files and the manifest."""
    with _timed(run, "write"):
        progress.stage("write")
        num_blocks = run.checkpoint.text_config.num_hidden_layers
        layers: dict[str, LayerEntry] = {}
        search_results: dict[str, torch.Tensor] = {}
        for index in range(num_blocks):
            record = work.block_record(index)
            layers.update({name: LayerEntry.from_dict(entry) for name, entry in record["entries"].items()})
            run.block_alpha[index] = record["alpha"]
            run.importance_is_float &= record.get("importance_is_float", False) or not record["entries"]
            search_results.update(work.block_search_results(index))
        files = work.finish(num_blocks, _non_block_tensors(run))
        with writing(work.path):
            if run.allocation is not None:
                _record_allocation(run, work.path, files, layers)
            results_file = _save_search_results(work.path, search_results)
            _copy_source_files(run.copied_files, work.path)
            manifest = _build_manifest(run, layers, files, results_file)
            manifest.save(work.path)
    return manifest


def _fingerprint(run: _Run) -> dict:
    """Every setting that changes the output: a resume with any other value is refused."""
    config = run.config
    plan = {name: None if a is None else [scheme_to_dict(a.scheme), a.algorithm, a.options]
            for name, a in run.plan.items()}
    return {
        "quantkit": quantkit.__version__, "source": str(run.source.path), "weights_sha256": run.weights_sha256,
        "plan_sha256": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
        "dataset": [config.dataset, list(config.data_files), config.text_column], "num_samples": config.num_samples,
        "seq_len": config.seq_len, "seed": config.seed, "batch_size": config.batch_size, "smooth": run.smooth,
        "alpha": run.alpha, "compute_dtype": str(run.compute_dtype), "metric_samples": config.metric_samples,
        "world_size": run.processes.world_size, "offload_activations": config.offload_activations,
        **({"imatrix_from": config.imatrix_from} if config.imatrix_from != "quantized" else {}),
        **({"propagate": config.propagate} if config.propagate != "quantized" else {}),
        **({"moe_all_experts": config.moe_all_experts, "expert_batch": config.expert_batch}
           if run.arch.experts is not None else {}),
    }


def _capture(run: _Run, progress: Progress) -> tuple[nn.Module, list[BlockInput], list[list[dict]]]:
    """Tokenize the calibration data and keep decoder block 0's inputs for every batch, and every
    block's other arguments ([batch][block])."""
    config, tokens = run.config, run.tokens
    with _timed(run, "capture"):
        progress.stage("capture")
        model = _skeleton(run)
        embeddings = model.get_submodule(run.arch.embeddings)
        materialize(embeddings, run.arch.embeddings, run.checkpoint, run.compute_dtype)
        # Batch i belongs to rank i % world_size: each batch is the one a single process would run.
        owned = [i for i in range(-(-tokens.shape[0] // config.batch_size)) if run.processes.owns_batch(i)]
        batches = [tokens[i * config.batch_size:(i + 1) * config.batch_size] for i in owned]
        inputs, block_kwargs = capture_block_inputs(model, model.get_submodule(run.arch.blocks), batches,
                                                    [i * config.batch_size for i in owned])
        if not config.keep_model:
            release(embeddings)
    return model, inputs, block_kwargs


def _skeleton(run: _Run) -> nn.Module:
    return build_skeleton(run.checkpoint.config, run.compute_dtype, trust_remote_code=run.config.trust_remote_code)


@dataclass
class _StartedBlock:
    """A block between its observation (`_start_block`, the main thread) and its quantization (`_finish_block`,
    the main thread or the quantize lane)."""

    index: int
    prefix: str
    block: nn.Module
    quantizer: BlockQuantizer
    observed: ObservedBlock


def _start_block(run: _Run, index: int, block: nn.Module, inputs: list[BlockInput] | None, keep,
                 float_inputs: list[BlockInput] | None = None, progress: Progress | None = None) -> _StartedBlock:
    """Load one decoder block and observe it (block.py's first half)."""
    prefix = f"{run.arch.blocks}.{index}"
    template = copy.deepcopy(block)  # still on the meta device: costs no memory

    def float_block() -> nn.Module:
        fresh = copy.deepcopy(template)
        materialize(fresh, prefix, run.checkpoint, torch.float32)
        return fresh

    with _timed(run, "load"):
        materialize(block, prefix, run.checkpoint, torch.float32)
    assigned = {name: run.plan[f"{prefix}.{name}"] for name in run.arch.linears if run.plan.get(f"{prefix}.{name}")}
    job = BlockJob(index=index, prefix=prefix, block=block, assigned=assigned, inputs=inputs, arch=run.arch,
                   model_config=run.checkpoint.text_config, compute_dtype=run.compute_dtype,
                   storage_dtype=run.storage_dtype, smooth=run.smooth, alpha=run.alpha,
                   metric_samples=run.config.metric_samples, processes=run.processes, keep=keep,
                   float_block=float_block, moe_all_experts=run.config.moe_all_experts,
                   expert_batch=run.config.expert_batch, float_inputs=float_inputs,
                   imatrix_from_float=run.config.imatrix_from == "float",
                   propagate_float=run.config.propagate == "float",
                   on_step=lambda done, total, loss: (progress or Progress()).step(
                       f"block {index} signround", done, total, f"batch loss {loss:.3f} x the start"))
    quantizer = BlockQuantizer(job)
    return _StartedBlock(index, prefix, block, quantizer, quantizer.observe_block())


def _finish_block(run: _Run, started: _StartedBlock) -> tuple[BlockResult, dict[str, torch.Tensor]]:
    """Quantize an observed block (block.py's second half) and release it; its result and tensors. Touches only
    this block (it may run in the quantize lane): the run's timings are added when it is committed."""
    result = started.quantizer.quantize_block(started.observed)
    tensors = _block_tensors(run, started.prefix, started.block)
    if run.config.keep_model:
        cast_parameters(started.block, run.storage_dtype)
    else:
        release(started.block)
    return result, tensors


def _block_tensors(run: _Run, prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a processed block under its full name: QuantLinear files, float params as stored."""
    tensors = {}
    quantized = {name for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    for name in quantized:
        tensors.update(record_tensors(f"{prefix}.{name}", LinearRecord.of(block.get_submodule(name))))
    for name, param in block.named_parameters():
        if name.rpartition(".")[0] not in quantized:
            tensors[f"{prefix}.{name}"] = param.detach().to(run.storage_dtype)
    return tensors


def _non_block_tensors(run: _Run) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and an untied lm_head, as the source stored them."""
    block_prefix = run.arch.blocks + "."
    names = [n for n in run.checkpoint.weight_map if not n.startswith(block_prefix)]
    tensors = run.checkpoint.tensors(names)  # finite: _preflight scanned every weight
    if run.final_norm is not None:
        name = f"{run.arch.final_norm}.weight"
        assert name in tensors, f"the final norm {name} is not among the checkpoint's weights"
        tensors[name] = run.final_norm.weight
    return {name: t.to(run.storage_dtype) if t.is_floating_point() else t for name, t in tensors.items()}


def _record_allocation(run: _Run, directory: Path, files: list[str], layers: dict[str, LayerEntry]) -> None:
    """The achieved size, read from the written files (refused if over the target: nothing is published),
    the recipe (recipe.yaml) and every Linear's measured sensitivities (allocation.json)."""
    import yaml

    allocation = run.allocation
    sizes = tensor_bytes([directory / f for f in files])
    grid_bytes = sum(sizes[name] for entry in layers.values() for role, name in entry.tensors.items()
                     if role not in ("bias", "input_scale", "input_zero", "input_global_scale"))
    weights = sum(math.prod(entry.shape) for entry in layers.values())
    file_bytes = sum((directory / f).stat().st_size for f in files)
    achieved = AchievedSize(bits=8 * grid_bytes / weights, grid_bytes=grid_bytes, weight_file_bytes=file_bytes)
    target = allocation.target
    over = (achieved.bits > target["bits"] if "bits" in target else file_bytes > target["size_bytes"])
    if over:
        raise QuantkitError(f"the written weights ({achieved}) exceed the target {target}: this is a quantkit bug, "
                            "nothing was published; please report it")
    run.allocation_record = AllocationInfo(**allocation.to_dict(), achieved=achieved)
    asked = (f"--target-bits {target['bits']}" if "bits" in target else f"--target-size {run.config.target_size}")
    (directory / allocate.RECIPE_FILE).write_text(
        f"# quantkit calibrate {asked}: {achieved.bits:.4f} bits per weight; rerun with --recipe {allocate.RECIPE_FILE}\n"
        + yaml.safe_dump(run.recipe, sort_keys=False, width=120))
    table = {name: {"weights": layer.weights, "gains": layer.gains, "inverse_energy": layer.inverse_energy,
                    "chosen": allocation.candidates[allocation.chosen[name]].label,
                    "candidates": {c.label: {"bytes": layer.bytes[i], "error": layer.error[i]}
                                   for i, c in enumerate(allocation.candidates)}}
             for name, layer in allocation.layers.items()}
    (directory / "allocation.json").write_text(json.dumps({**run.allocation_record.to_dict(), "layers": table},
                                                          indent=1) + "\n")


def _save_search_results(directory: Path, results: dict[str, torch.Tensor]) -> str | None:
    if not results:
        return None
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in results.items()}, str(directory / "search_results.safetensors"))
    return "search_results.safetensors"


def _source_files(source: Path) -> list[Path]:
    """The config, generation config and tokenizer files the output gets (never the source weights)."""
    files = {file for pattern in _SOURCE_FILE_PATTERNS for file in source.glob(pattern)}
    return sorted(f for f in files if f.is_file() and f.name not in _SKIPPED_SOURCE_FILES)


def _copy_source_files(files: list[Path], directory: Path) -> None:
    for file in files:
        shutil.copy2(file, directory / file.name)


def _build_manifest(run: _Run, layers: dict[str, LayerEntry], files: list[str], results_file: str | None) -> Manifest:
    quantized_sqnr = [e.metrics["output_sqnr_db"] for e in layers.values() if e.metrics.get("output_sqnr_db") is not None]
    summary = Summary(
        timings_s={k: round(v, 3) for k, v in run.timings.items()},
        peak_rss_bytes=_peak_rss(),
        layers_quantized=len(layers),
        min_output_sqnr_db=min(quantized_sqnr) if quantized_sqnr else None,
        min_weight_sqnr_db=min((e.metrics["weight_sqnr_db"] for e in layers.values()), default=None),
        estimate=run.estimate.to_dict() if run.estimate else None,
        final_norm=run.final_norm.to_dict() if run.final_norm is not None else None,
    )
    return Manifest(
        tool=ToolInfo("quantkit", quantkit.__version__, datetime.now(timezone.utc).isoformat(timespec="seconds")),
        source=SourceInfo(requested=run.source.requested, path=str(run.source.path), hub_id=run.source.hub_id,
                          architecture=run.arch.name, dtype=str(run.storage_dtype).removeprefix("torch."),
                          files=[f.name for f in run.checkpoint.files], weights_sha256=run.weights_sha256),
        calibration=_calibration_record(run),
        storage_dtype=str(run.storage_dtype).removeprefix("torch."),
        smoothing=_smoothing_record(run),
        layers=layers, ignored=run.ignored, recipe=run.recipe, weight_files=files, search_results=results_file,
        gguf_file_type=run.gguf_file_type, allocation=run.allocation_record,
        summary=summary,
    )


def _calibration_record(run: _Run) -> CalibrationInfo:
    config = run.config
    if not run.needs_data:
        return CalibrationInfo(skipped="no layer needs calibration data (calibration-free algorithm, "
                                       "no smoothing, no static activations)")
    return CalibrationInfo(
        dataset=run.dataset.describe(), num_samples=config.num_samples, seq_len=config.seq_len,
        tokens=run.calibration_tokens, seed=config.seed, batch_size=config.batch_size,
        compute_dtype=str(run.compute_dtype).removeprefix("torch."), metric_samples=config.metric_samples,
        processes=run.processes.world_size,
        imatrix_from="float" if config.imatrix_from == "float" or run.importance_is_float else None,
        propagate="float" if config.propagate == "float" else None)


def _smoothing_record(run: _Run) -> SmoothingInfo:
    if not run.smooth:
        return SmoothingInfo(enabled=False)
    return SmoothingInfo(
        enabled=True,
        alpha="auto" if run.alpha is None else run.alpha,
        alpha_grid=list(ALPHA_GRID) if run.alpha is None else None,
        block_alpha={str(i): a for i, a in run.block_alpha.items()},  # null: smoothing lost the search
        groups=[{"prev": g.prev, "consumers": list(g.consumers), "gqa_shared": g.gqa_shared} for g in run.arch.smooth],
    )


def _finish_in_memory(run: _Run, model: nn.Module) -> None:
    """Load the non-block weights too, so the returned model runs end to end in the storage dtype."""
    for name in (run.arch.embeddings, run.arch.final_norm, run.arch.lm_head):
        module = model.get_submodule(name)
        fallback = {f"{run.arch.lm_head}.weight": f"{run.arch.embeddings}.weight"}
        if any(p.is_meta for p in module.parameters()) or name == run.arch.embeddings:
            materialize(module, name, run.checkpoint, run.storage_dtype, fallback)
    if getattr(run.checkpoint.config, "tie_word_embeddings", False) and not run.checkpoint.has(f"{run.arch.lm_head}.weight"):
        model.get_submodule(run.arch.lm_head).weight = model.get_submodule(run.arch.embeddings).weight
    if run.final_norm is not None:
        with torch.no_grad():
            model.get_submodule(run.arch.final_norm).weight.copy_(run.final_norm.weight)
    cast_parameters(model, run.storage_dtype)
