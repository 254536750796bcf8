"""Automatic mixed precision: measure each Linear's sensitivity to each candidate grid, then choose one grid
per Linear under a size budget (`formats.knapsack.solve`) and write the choice as an ordinary recipe.

Sensitivity of Linear l to candidate c, measured block by block on the float model's own activations (one
streaming pass before the quantizing one; one block in memory):

    layer  e(l, c) = mean over calibration tokens of ||(W - Q_c(W)) x||^2 = tr(D H D^T),  D = W - Q_c(W),
                     H = E[x x^T] of the Linear's input, Q_c the candidate's round-to-nearest grid (given an
                     importance vector: llama.cpp's importance-weighted search of a GGUF block type with it,
                     the weights `export --format gguf --imatrix` writes; where the run quantizes with imatrix,
                     the algorithm or SignRound's start: its search with E[x_j^2] = diag(H), the codes the run
                     writes or starts from)
           s(l, c) = e(l, c) * E_t[1 / ||h_t||^2], h_t the block's float output at token t
    block  s(l, c) = g_l(e) * e(l, c), g_l(e) = E_t[||dh_t||^2 / ||h_t||^2] / e(l, r) with only l on a reference
                     candidate r (dh_t its change of the block output): the layer's error carried to the residual
                     stream the block writes, so the errors of a q_proj and a down_proj are comparable (default);
                     measured at the median-size and the smallest candidate, log-linear in e between them;
                     in the last block, whose output only the final norm and the LM head read, the gain is
                     measured where it acts: g_l(e) = c * E_t[KL(p_t || q_t)] / e(l, r), p_t / q_t the next-token
                     distributions from the float block's output and from the one with only l on r, and
                     c = median over the block's Linears of (residual gain / KL gain) at r, so the block's typical
                     Linear keeps its residual-relative scale and the logits rank the block's Linears (SmolLM2:
                     the last down_proj's KL is 2.4x what its residual error predicts next to its neighbours')

Both are relative to the residual stream's energy per token: every consumer of the stream reads it through an
RMSNorm, and the stream's norm grows by orders of magnitude with depth (SmolLM2: a last-block down_proj's
absolute error is ~200x a middle one's on the same grid), so absolute errors would send the lowest bits to the
first blocks, where they hurt most. The allocation minimises sum_l s(l, c_l) subject to the stored size; a
Linear's error is taken as additive across Linears (the knapsack's assumption).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from quantkit.algorithms.imatrix import quantize_imatrix, searches
from quantkit.algorithms.registry import base_algorithm, parse_options
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.calibrate.hooks import BlockInput, run_block
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, ggml_mixes, knapsack
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec
from quantkit.model.head import OutputHead
from quantkit.run import budget
from quantkit.run.block import BlockQuantizer
from quantkit.run.budget import Candidate
from quantkit.run.layers import runner_for

SENSITIVITIES = ("block", "layer")


@dataclass
class LayerSensitivity:
    """One Linear's measurements: per candidate (same order as the run's candidates) its stored bytes (with
    what its algorithm adds, `extra_bytes`) and its layer output error (None where the candidate's grid does not fit the Linear), and its block gain."""

    weights: int                      # out * in
    bytes: list[int | None]           # data bytes of the stored grid tensors
    file_bytes: list[int | None]      # and with their safetensors header entries (a bound): --target-size's cost
    error: list[float | None]
    gains: list[tuple[float, float]] = field(default_factory=list)   # measured (layer error, block gain) points
    inverse_energy: float = 1.0       # E_t[1 / ||h_t||^2] of its block's float output (the layer kind's scale)

    def gain(self, error: float) -> float:
        """The block gain at a layer error: measured at the median-size and the smallest candidate, log-linear
        in the error between them (the block's response grows faster than linearly at low bits: attention
        scores and gates saturate), constant beyond."""
        points = sorted(self.gains)
        if not points:
            return 1.0
        if error <= points[0][0] or len(points) == 1:
            return points[0][1]
        if error >= points[-1][0]:
            return points[-1][1]
        (e0, g0), (e1, g1) = points[0], points[-1]
        t = (math.log(error) - math.log(e0)) / (math.log(e1) - math.log(e0))
        return math.exp((1 - t) * math.log(g0) + t * math.log(g1))

    def to_dict(self) -> dict:
        return {"weights": self.weights, "bytes": self.bytes, "file_bytes": self.file_bytes, "error": self.error,
                "gains": [list(point) for point in self.gains], "inverse_energy": self.inverse_energy}

    @classmethod
    def from_dict(cls, data: dict) -> LayerSensitivity:
        return cls(data["weights"], data["bytes"], data["file_bytes"], data["error"],
                   [tuple(point) for point in data["gains"]], data["inverse_energy"])

    def loss(self, kind: str) -> list[float | None]:
        scale = (lambda e: self.inverse_energy) if kind == "layer" else self.gain
        return [None if e is None else e * scale(e) for e in self.error]


@dataclass
class Allocation:
    """The chosen candidate per Linear and what the budget and the choice come to."""

    candidates: list[Candidate]
    layers: dict[str, LayerSensitivity]
    chosen: dict[str, int]
    sensitivity: str
    target: dict                      # {"bits": 4.25} or {"size_bytes": N, "fixed_bytes_bound": F}
    budget_bytes: int                 # what the quantized Linears' stored tensors may take
    seconds: float = 0.0

    def layer_bytes(self, name: str) -> int:
        layer = self.layers[name]
        return (layer.bytes if "bits" in self.target else layer.file_bytes)[self.chosen[name]]

    @property
    def planned_bytes(self) -> int:
        return sum(self.layer_bytes(name) for name in self.chosen)

    @property
    def planned_bits(self) -> float:
        data = sum(self.layers[name].bytes[index] for name, index in self.chosen.items())
        return 8 * data / sum(self.layers[name].weights for name in self.chosen)

    def counts(self) -> dict[str, int]:
        """Candidate label -> how many Linears got it."""
        labels = [self.candidates[i].label for i in self.chosen.values()]
        return {c.label: labels.count(c.label) for c in self.candidates if c.label in labels}

    def recipe(self, algorithm: str, options: dict) -> dict:
        """The recipe that reproduces this allocation: one rule per chosen candidate, naming its Linears."""
        rules = []
        for index, candidate in enumerate(self.candidates):
            names = [name for name, chosen in self.chosen.items() if chosen == index]
            if names:
                rule = {"match": names, **candidate.rule(), "algorithm": algorithm}
                if options:
                    rule["options"] = dict(options)
                rules.append(rule)
        return {"rules": rules, "smooth": False}

    def to_dict(self) -> dict:
        """The manifest's record (the recipe itself is stored beside it)."""
        return {"target": self.target, "sensitivity": self.sensitivity, "budget_bytes": self.budget_bytes,
                "planned_bytes": self.planned_bytes, "planned_bits": round(self.planned_bits, 6),
                "candidates": [c.label for c in self.candidates], "chosen": self.counts(),
                "seconds": round(self.seconds, 3), "recipe_file": RECIPE_FILE}


RECIPE_FILE = "recipe.yaml"
OFFSET_DIGITS = 15     # safetensors data offsets of up to a petabyte (a size target bounds them by its own digits)


def extra_bytes(algorithm: str, options: dict, quant: QuantTensor) -> int:
    """Bytes an algorithm's output stores beyond the round-to-nearest QuantTensor ``quant`` of the same grid:
    GPTQ's act-order group indices (int32 per input column) when its groups follow the permuted order
    (act_order without static_groups); fractional zero points, stored as float32 instead of int8: HQQ's, and
    llama.cpp's Q4_1/Q5_1 float16 minimums (imatrix, and gptq with llama_cpp, on those grids)."""
    spec = quant.spec
    name, base_options = base_algorithm(algorithm, options, spec)
    if quant.zero is not None and _fractional_zeros(name, base_options, spec):
        return 3 * quant.zero.numel()
    if name != "gptq":
        return 0
    parsed = parse_options(name, base_options)
    grouped = spec.granularity == "group" and spec.super_group is None
    return 4 * quant.shape[1] if parsed.act_order and not parsed.static_groups and grouped else 0


def _fractional_zeros(name: str, options: dict, spec) -> bool:
    """Whether algorithm ``name`` with ``options`` stores fractional zero points on the asymmetric grid ``spec``."""
    if name == "hqq":
        return True
    if ggml_blocks.min_type(spec) is None:
        return False
    return name == "imatrix" or (name == "gptq" and parse_options(name, options).llama_cpp)


def _fits(candidate: Candidate, in_features: int) -> bool:
    """K-quant candidates need rows that are a multiple of 256 (llama.cpp would fall back otherwise)."""
    k_format = candidate.scheme().weight.k_format
    return k_format is None or not ggml_mixes.fit(k_format.name, in_features)[1]


def searched_type(candidate: Candidate) -> str | None:
    """The GGUF block type llama.cpp quantizes with an importance-weighted search (K types, Q4_0/Q5_0, Q4_1/Q5_1)
    when ``candidate`` is one, else None (Q8_0 ignores the matrix: its reference rounding is what is written)."""
    name = candidate.scheme_name.upper()
    return name if candidate.label == candidate.scheme_name and ggml_blocks.importance_searched(name) else None


def imatrix_measured(algorithm: str, options: dict) -> Callable[[WeightSpec], bool]:
    """Which candidate grids a run of ``algorithm`` quantizes with imatrix's search (the algorithm itself, or
    SignRound's start on it): their errors are measured on that search, the codes the run starts from."""
    return lambda spec: searches(spec) and base_algorithm(algorithm, options, spec)[0] == "imatrix"


def layer_errors(name: str, weight: torch.Tensor, hessian: torch.Tensor, candidates: list[Candidate],
                 extra: Callable[[QuantTensor], int], offset_digits: int = OFFSET_DIGITS,
                 importance: torch.Tensor | None = None,
                 searched: Callable[[WeightSpec], bool] = lambda spec: False
                 ) -> tuple[LayerSensitivity, dict[int, torch.Tensor]]:
    """Linear ``name``'s weight [out, in] fp32 and hessian [in, in] fp32 (E[x x^T]) -> its sensitivity record
    (per candidate: stored bytes + ``extra`` (what the algorithm adds), with header entries, and tr(D H D^T)),
    and the dequantized weights by candidate index (None and absent where the grid does not fit). With
    ``importance`` [in] (an imatrix's E[x_j^2]) the GGUF block types llama.cpp searches are measured on that
    search instead of their reference rounding (the bytes are the same); the grids ``searched`` names are measured on
    imatrix's search with importance diag(H) = E[x_j^2] (`imatrix_measured`)."""
    record = LayerSensitivity(weight.numel(), [], [], [])
    dequantized = {}
    for index, candidate in enumerate(candidates):
        if not _fits(candidate, weight.shape[1]):
            for values in (record.bytes, record.file_bytes, record.error):
                values.append(None)
            continue
        spec = candidate.scheme().weight
        quant = quantize_rtn(weight, spec)
        ggml_type = None if importance is None else searched_type(candidate)
        result = None if ggml_type is None else ggml_blocks.requantize(weight, ggml_type, importance)
        if result is None and searched(spec):      # the run's imatrix search, E[x_j^2] = diag(H)
            result = quantize_imatrix(weight, spec, hessian.diagonal())
        approx = (quant if result is None else result).dequantize().float()
        delta = weight.float() - approx
        error = float(((delta @ hessian) * delta).sum())
        if not math.isfinite(error):
            raise QuantkitError(f"the quantization error of {name} on {candidate.label} is not finite "
                                "(its calibration inputs overflow)")
        added = extra(quant)
        index_entry = budget.header_entry_bound(f"{name}.weight_g_idx", (weight.shape[1],), offset_digits)
        record.bytes.append(budget.stored_bytes(quant) + added)
        record.file_bytes.append(budget.file_bytes_bound(budget.stored_tensors(name, quant), offset_digits) + added
                                 + index_entry)
        record.error.append(max(error, 0.0))
        dequantized[index] = approx
    return record, dequantized


def reference_candidates(sizes: list[int | None]) -> list[int]:
    """The candidates the block gain is measured at: the median-size and the smallest of those that fit."""
    fitting = sorted((size, index) for index, size in enumerate(sizes) if size is not None)
    return sorted({fitting[len(fitting) // 2][1], fitting[0][1]})


def token_energy(hidden: torch.Tensor) -> torch.Tensor:
    """||h_t||^2 per token of hidden [..., hidden_size] -> [...] float32 (a zero vector counts as tiny)."""
    return hidden.float().pow(2).sum(-1).clamp_min(1e-30)


def inverse_energy(outputs: list[torch.Tensor]) -> float:
    """E_t[1 / ||h_t||^2] over every token of the block outputs [..., hidden]."""
    total = sum(float(token_energy(o).reciprocal().sum()) for o in outputs)
    return total / max(sum(o.numel() // o.shape[-1] for o in outputs), 1)


LOGIT_CHUNK = 256      # tokens per head pass: the logits of a chunk, not of every sample, are in memory
KL_GROUP = 8           # changed block outputs kept per sample to share one pass of the float logits


def kl_sums(head: OutputHead, reference: torch.Tensor, changed: dict[tuple[str, int], torch.Tensor]
            ) -> dict[tuple[str, int], float]:
    """Per key of ``changed``: the sum over tokens of KL(p || q), p / q the next-token distributions of
    ``reference`` / that changed output [..., hidden] (same shapes); the logits are formed a chunk of tokens at a
    time, the float ones once per chunk for every key."""
    width = reference.shape[-1]
    sums = dict.fromkeys(changed, 0.0)
    for start in range(0, reference.numel() // width, LOGIT_CHUNK):
        log_p = head.log_probs(reference.reshape(-1, width)[start:start + LOGIT_CHUNK])
        p = log_p.exp()
        for key, hidden in changed.items():
            log_q = head.log_probs(hidden.reshape(-1, width)[start:start + LOGIT_CHUNK])
            sums[key] += float((p * (log_p - log_q)).sum())
    return sums


def _run_changed(runner: torch.nn.Module, name: str, weight: torch.Tensor, call: BlockInput) -> torch.Tensor:
    """The block's output [..., hidden] float32 on ``call`` with Linear ``name``'s weight replaced (put back)."""
    linear = runner.get_submodule(name)
    original = linear.weight.data
    linear.weight.data = weight.to(original.dtype)
    try:
        return run_block(runner, call).float()
    finally:
        linear.weight.data = original


@torch.no_grad()
def block_gains(runner: torch.nn.Module, samples: list[BlockInput], references: dict[tuple[str, int], tuple],
                head: OutputHead | None = None) -> dict[tuple[str, int], tuple[float, float, float | None]]:
    """Per (Linear, candidate): (its layer error, E_t[||dh_t||^2 / ||h_t||^2] with only that Linear on that grid,
    divided by the layer error, and with ``head`` (the last block) E_t[KL] at the logits divided by the layer
    error, else None). ``runner``: the float block in the compute dtype (its weights are swapped and put back);
    ``references``: (name, candidate) -> (dequantized weight [out, in], layer error per token)."""
    targets = [run_block(runner, call).float() for call in samples]
    energies = [token_energy(t) for t in targets]
    tokens = max(sum(e.numel() for e in energies), 1)
    keys = list(references)
    totals, kls = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
    for group in (keys[i:i + KL_GROUP] for i in range(0, len(keys), KL_GROUP)):
        for call, target, energy in zip(samples, targets, energies):
            changed = {}
            for key in group:
                output = _run_changed(runner, key[0], references[key][0], call)
                totals[key] += float(((output - target).pow(2).sum(-1) / energy).sum())
                if head is not None:
                    changed[key] = output
            if head is not None:
                for key, kl in kl_sums(head, target, changed).items():
                    kls[key] += kl
    gains = {}
    for key in keys:
        error = references[key][1]
        if error > 0 and totals[key] > 0:
            gains[key] = (error, (totals[key] / tokens) / error, None if head is None else (kls[key] / tokens) / error)
    return gains


def logit_calibrated(points: dict[tuple[str, int], tuple[float, float, float | None]]
                     ) -> dict[tuple[str, int], tuple[float, float]]:
    """The last block's gain points (layer error, residual gain, KL gain) -> (layer error, gain): each candidate's
    KL gains times the median over the block's Linears of residual gain / KL gain on that candidate (the module
    docstring); a candidate with no positive KL keeps its residual gains."""
    result = {key: (error, gain) for key, (error, gain, _) in points.items()}
    for candidate in {key[1] for key in points}:
        keys = [key for key in points if key[1] == candidate and (points[key][2] or 0.0) > 0]
        if not keys:
            continue
        scale = statistics.median(points[key][1] / points[key][2] for key in keys)
        for key in keys:
            result[key] = (points[key][0], points[key][2] * scale)
    return result


def choose(layers: dict[str, LayerSensitivity], candidates: list[Candidate], sensitivity: str, target: dict,
           budget_bytes: int) -> Allocation:
    """Solve the budgeted choice: ``target`` {"bits": b} counts the grids' data bytes, {"size_bytes": n} their
    bytes in the files (header entries included); the budget is met exactly (costs rounded up to the units of
    `knapsack.unit_for`)."""
    names = sorted(layers)
    unit = knapsack.unit_for(budget_bytes, len(names))
    losses, costs, options = [], [], []
    for name in names:
        loss = layers[name].loss(sensitivity)
        fitting = [i for i, size in enumerate(layers[name].bytes) if size is not None]
        if not fitting:
            raise QuantkitError(f"no candidate grid fits {name} (rows of {layers[name].weights} weights)")
        options.append(fitting)
        losses.append([loss[i] for i in fitting])
        sizes = layers[name].bytes if "bits" in target else layers[name].file_bytes
        costs.append([sizes[i] for i in fitting])
    picks = knapsack.solve(losses, costs, budget_bytes, unit)
    chosen = {name: options[k][pick] for k, (name, pick) in enumerate(zip(names, picks))}
    return Allocation(candidates, layers, chosen, sensitivity, target, budget_bytes)


def measure_block(quantizer: BlockQuantizer, candidates: list[Candidate], algorithm: str, options: dict,
                  sensitivity: str, offset_digits: int = OFFSET_DIGITS,
                  importance: Mapping[str, torch.Tensor] | None = None, head: OutputHead | None = None
                  ) -> tuple[dict[str, LayerSensitivity], list[BlockInput]]:
    """One float block: every assigned Linear's errors on every candidate (its Hessian from the block's
    inputs, Linears observed in the quantizer's batches; ``importance``: full Linear name -> the vector its GGUF
    types are searched with, `layer_errors`), the block gains (``sensitivity`` "block"; with ``head``, the last
    block's, calibrated at the logits: `logit_calibrated`), and the block's float outputs on every call (the
    next block's inputs)."""
    job = quantizer.job
    runner = runner_for(job.block, job.compute_dtype)
    samples = quantizer.first_samples(job.metric_samples)
    searched = imatrix_measured(algorithm, options)
    layers: dict[str, LayerSensitivity] = {}
    points: dict[tuple[str, int], tuple[float, float, float | None]] = {}
    for batch in quantizer.batches(list(job.assigned)):
        stats = quantizer.observe(batch)
        references = {}
        for name in batch:
            weight = job.block.get_submodule(name).weight.detach().float()
            hessian = stats[name].items["hessian"].matrix / 2      # the statistic is 2 E[x x^T] (GPTQ's H)
            stats[name].release("hessian")
            record, approx = layer_errors(quantizer.full_name(name), weight, hessian, candidates,
                                          lambda quant: extra_bytes(algorithm, options, quant), offset_digits,
                                          importance=None if importance is None
                                          else importance.get(quantizer.full_name(name)),
                                          searched=searched)
            if not approx:
                raise QuantkitError(f"no candidate grid fits {quantizer.full_name(name)} "
                                    f"({weight.shape[1]} input columns)")
            for reference in reference_candidates(record.bytes):
                references[(name, reference)] = (approx[reference], record.error[reference])
            layers[quantizer.full_name(name)] = record
        if sensitivity == "block":
            points.update(block_gains(runner, samples, references, head))
    measured = logit_calibrated(points) if head is not None else {key: p[:2] for key, p in points.items()}
    for (name, _), point in measured.items():
        layers[quantizer.full_name(name)].gains.append(point)
    with torch.no_grad():
        outputs = [BlockInput(run_block(runner, call), call.kwargs, call.first_sample) for call in job.inputs]
    scale = inverse_energy([o.hidden for o in outputs])
    for name in job.assigned:
        layers[quantizer.full_name(name)].inverse_energy = scale
    return layers, outputs
