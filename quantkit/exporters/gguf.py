"""GGUF export (llama.cpp, ollama, LM Studio) of a quantkit output directory or a float HF checkpoint.

Written with gguf-py's `GGUFWriter` (the llama.cpp project's library) in two passes: a plan (every
tensor's name, shape and ggml type, the metadata and the tokenizer) is built and checked before a
byte is written; then the tensors are converted one at a time and streamed into a temporary file
that is renamed into place.

Linear weights, each decided from its manifest entry:
  exact        quantkit codes on a grid a block type holds (b <= 4 sym -> Q4_0, 5 sym -> Q5_0, <= 8 sym
               -> Q8_0) with one scale per 32-column block (group sizes that are multiples of 32,
               per-channel, per-tensor): codes and fp16 scales are written as they are, and the GGUF
               dequantizes to exactly quantkit's weights.
  carried      asymmetric b <= 4 (Q4_1) / b = 5 (Q5_1): codes and scales as they are; the block
               minimum m = -scale * (zero + 8 or 16) is rounded to f16 (the only rounding; its
               largest error, in units of the scale, is reported).
  requantized  anything else (group sizes not a multiple of 32, act-order g_idx mixing groups in a
               block, asymmetric 6-8 bits, float sources) is re-rounded from its dequantized weights
               to the requested type (default: closest to the source's bits/symmetry), bit-identical
               to gguf-py's quantizer.
  float        unquantized linears, and rows whose length is not a multiple of 32: F16 (F32 when the
               source stores float32).
  calibrated   a float checkpoint exported with ``codes`` (`quantkit export --algo gptq --dataset ...`): the
               block Linears' types are chosen first (``--type``'s choice, or ``--target-size``'s), then a
               calibration run quantizes each Linear on exactly that type's grid (GPTQ's error feedback, ...)
               and its codes are written as they are.
A K-quant file type (``--type Q4_K_M`` ..., `ggml_mixes`) chooses each tensor's type as llama-quantize
does, token_embd and output included; K-quant blocks are computed by llama.cpp's reference quantizer
(`gguf_kquants`, bit-identical to llama-quantize without an importance matrix), legacy fallbacks as above.
Activation quantization has no GGUF equivalent: layers whose scheme quantizes activations keep
their weights (as above) and the export notes that the activation grid was dropped.
Embeddings, the lm_head and biases: F32 for float32 sources, else F16 (F32 if a value exceeds the
f16 range); norms F32. For llama.cpp's ``llama`` architecture the q/k rows are permuted to its
interleaved rotary layout (`rotary_row_permutation`; n_head_kv heads for k). Which tensor got what is
recorded in the ``quantkit.export`` metadata key (JSON) and returned as `GGUFExportResult`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import quantkit
from quantkit.errors import QuantkitError
from quantkit.exporters import gguf_blocks, gguf_budget, gguf_imatrix, gguf_kquants
from quantkit.exporters.gguf_vocab import GGUFVocab, read_vocab
from quantkit.exporters.source import ExportSource
from quantkit.files import check_output_path, staged_file
from quantkit.formats import ggml_blocks, ggml_mixes, knapsack, kquants, primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.model.gguf_names import GGUFNames, model_shape

REQUANT_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# llama.cpp's K-quant file types (and its aliases Q3_K, Q4_K, Q5_K for the _M mixes)
FILE_TYPES = (*ggml_mixes.BASE_TYPES, *ggml_mixes.ALIASES)
# --target-size --dataset's measure: (checkpoint name -> the importance its tensor is searched with, or None)
# -> block Linear's checkpoint name -> GGUF type -> loss
Sensitivities = Callable[[dict[str, torch.Tensor] | None], dict[str, dict[str, float | None]]]
# --algo: block Linear's checkpoint name -> its chosen GGUF type  ->  a quantkit output directory whose layers hold
# codes on exactly those types' grids (a calibration run with that recipe)
CodesSource = Callable[[dict[str, str]], Path]
METADATA_KEY = "quantkit.export"
F16_MAX = 65504.0


@dataclass
class TensorRecord:
    """One tensor of the GGUF file: what it is, what type it got and why."""

    name: str                        # GGUF name, e.g. blk.0.attn_q.weight
    source: str                      # HF tensor / layer name it comes from
    shape: tuple[int, ...]           # torch order: [rows, cols] or [n]
    ggml_type: str                   # F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4, Q2_K ... Q6_K
    status: str                      # exact | carried | requantized | calibrated | float
    reason: str = ""
    is_linear: bool = False
    activation_dropped: bool = False         # the scheme quantized activations; GGUF cannot
    weight_sqnr_db: float | None = None      # GGUF weights vs the source's (dequantized) weights
    min_error_in_scales: float | None = None  # carried Q4_1/Q5_1: max |m_f16 - m| / scale
    experts: tuple["TensorRecord", ...] = ()  # MoE: each stacked expert's own record, [e] of this [E, rows, cols]
    expert: int = 0                          # which expert of its stack this record is (importance matrices)
    error_sums: tuple[float, float] | None = None  # (sum w^2, sum (w - w_gguf)^2) behind weight_sqnr_db

    def nbytes(self) -> int:
        count = math.prod(self.shape)
        if self.ggml_type in ("F32", "F16"):
            return count * (4 if self.ggml_type == "F32" else 2)
        if self.ggml_type in kquants.K_FORMATS:
            return count // kquants.SUPER * kquants.K_FORMATS[self.ggml_type].type_size
        return count // ggml_blocks.BLOCK * gguf_blocks.BLOCK_BYTES[self.ggml_type]


@dataclass
class GGUFExportResult:
    out: Path
    architecture: str
    file_type: str
    tensors: list[TensorRecord]
    tokenizer: str
    notes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    @property
    def linears(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.is_linear]

    def summary(self) -> dict[str, int]:
        return dict(Counter(f"{t.status} {t.ggml_type}" for t in self.linears))

    def to_dict(self) -> dict:
        def finite(value):
            return None if isinstance(value, float) and not math.isfinite(value) else value

        return {
            "out": str(self.out), "format": "gguf", "architecture": self.architecture, "file_type": self.file_type,
            "tokenizer": self.tokenizer, "size_bytes": self.size_bytes, "notes": self.notes,
            "summary": self.summary(),
            "layers": {t.source: {"tensor": t.name, "type": t.ggml_type, "status": t.status, "reason": t.reason,
                                  "activation_dropped": t.activation_dropped,
                                  "weight_sqnr_db": finite(t.weight_sqnr_db),
                                  "min_error_in_scales": t.min_error_in_scales} for t in self.linears},
        }


def rotary_row_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's ``llama`` architecture wants for q (heads = n_head) and k (heads = n_head_kv).

    HF rotates dimension i of a head with i + D/2 (halves); llama.cpp rotates pairs (2i, 2i + 1).
    GGUF row h*D + 2i + j holds HF row h*D + j*D/2 + i (convert_hf_to_gguf's ``permute``):
    returns perm [rows] int64 with gguf_weight = hf_weight[perm].
    """
    assert rows % (2 * heads) == 0, (rows, heads)
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


@dataclass(frozen=True)
class _Requested:
    """What the user asked for: one type for every requantized tensor, a K-quant file type whose type is
    chosen per tensor (`ggml_mixes`), or nothing (each layer's closest type)."""

    uniform: str | None = None
    mix: str | None = None
    model: ggml_mixes.ModelShape | None = None

    def for_tensor(self, gguf_name: str, row_length: int) -> tuple[str | None, str]:
        """(type, why) for one tensor; (None, "") leaves the choice to the layer."""
        if self.mix is None:
            return self.uniform, ""
        return ggml_mixes.tensor_type(self.mix, gguf_name, row_length, self.model)


@dataclass
class _Plan:
    source: ExportSource
    gguf_arch: str
    vocab: GGUFVocab
    records: list[TensorRecord]
    permutations: dict[str, torch.Tensor]       # HF linear name -> row permutation (q, k)
    computed: dict[str, torch.Tensor]           # GGUF name -> a tensor derived from the config (rope_freqs)
    notes: list[str]
    requested: _Requested
    importance: gguf_imatrix.ImportanceMatrix | None = None
    codes: ExportSource | None = None           # --algo: the calibrated directory the block Linears' codes come from


def export_gguf(source_dir, out, *, ggml_type: str | None = None, overwrite: bool = False,
                imatrix=None, target_size: int | None = None, candidates: tuple[str, ...] | None = None,
                sensitivities: Sensitivities | None = None, codes: CodesSource | None = None,
                codes_by: str = ""
                ) -> GGUFExportResult:
    """Write ``source_dir`` (a quantkit output directory or a float HF checkpoint) as one GGUF file.
    ``ggml_type``: one type for whatever is requantized (F16, Q8_0, Q4_0, ...), or a K-quant file type
    (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K) choosing each tensor's type as llama-quantize does.
    ``imatrix``: a llama.cpp importance-matrix file; K-quant tensors are then searched as llama-quantize
    --imatrix does. ``target_size`` (bytes, float checkpoints): the block Linears' types are chosen among
    ``candidates`` (`gguf_budget.CANDIDATES`) so that the file is at most that size (`gguf_budget`), by the
    importance-weighted weight error, or by what ``sensitivities`` returns when given (block Linear's checkpoint
    name -> GGUF type -> loss, `run.pipeline.measure_sensitivities`), called once every input is checked with the
    importance vectors the tensors will be searched with (checkpoint name -> [in], None without ``imatrix``).
    ``codes`` (float checkpoints): once every block Linear's type is chosen, called with {Linear: type} for those
    to be quantized; it returns a quantkit output directory holding codes on exactly those grids (a calibration
    run, ``codes_by`` naming its algorithm), which are written as they are ("calibrated")."""
    if ggml_type is not None and ggml_type not in REQUANT_TYPES + FILE_TYPES:
        close = difflib.get_close_matches(ggml_type, REQUANT_TYPES + FILE_TYPES, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(REQUANT_TYPES + FILE_TYPES)}"
        raise QuantkitError(f"unknown GGUF type '{ggml_type}'; {hint}")
    out = Path(out)
    source = ExportSource.open(source_dir, require_manifest=False)
    if ggml_type is None and source.manifest is not None and source.manifest.gguf_file_type:
        ggml_type = source.manifest.gguf_file_type     # calibrated as llama.cpp's file type: written as one
    if out.is_dir():
        raise QuantkitError(f"output {out} is a directory; give the path of the .gguf file to write")
    check_output_path(out, overwrite, [source.path])
    if target_size is not None and source.manifest is not None:
        raise QuantkitError("--target-size chooses the GGUF types of a float checkpoint's tensors; a calibrated "
                            "directory's grids are already chosen (calibrate it with --target-bits/--target-size)")
    if codes is not None and source.manifest is not None:
        raise QuantkitError("--algo quantizes a float checkpoint; this directory is already calibrated (export it "
                            "without --algo)")
    plan = _plan(source, ggml_type)
    if imatrix is not None:
        plan.importance = gguf_imatrix.read_imatrix(imatrix)
        plan.notes += _importance_notes(plan)
    target_note = None
    suffix = f"; codes by {codes_by}" if codes is not None else ""
    if target_size is not None:
        measured = None if sensitivities is None else sensitivities(_block_importance(plan))
        target_note = _fit_target(plan, target_size, candidates or gguf_budget.CANDIDATES, measured, suffix)
    codes_note = _attach_codes(plan, codes, codes_by, suffix) if codes is not None else None
    with staged_file(out, overwrite) as staging:
        _write(plan, staging)
        if target_size is not None and staging.stat().st_size > target_size:
            raise QuantkitError(f"the file came to {staging.stat().st_size} bytes, over --target-size {target_size}: "
                                "a quantkit bug, nothing was written; please report it")
    return GGUFExportResult(out.resolve(), plan.gguf_arch, _file_type(plan.records, plan.requested.mix).name, plan.records,
                            plan.vocab.model, plan.notes + [n for n in (target_note, codes_note) if n],
                            out.stat().st_size)


# ---------------------------------------------------------------------------------------------- plan


def _requested(source: ExportSource, ggml_type: str | None) -> _Requested:
    mix = ggml_mixes.file_type(ggml_type) if ggml_type else None
    if mix is None:
        return _Requested(uniform=ggml_type)
    tied = source.arch.lm_head not in source.linear_names() or source.tied_embeddings
    model = model_shape(source.arch, source.config, tied)
    return _Requested(mix=mix, model=model)


def _plan(source: ExportSource, ggml_type: str | None) -> _Plan:
    gguf_arch = source.arch.gguf_arch
    if gguf_arch is None:
        raise QuantkitError(f"architecture {source.arch.name} has no GGUF mapping")
    notes = _check_config(source.config, gguf_arch, source.tied_embeddings)
    vocab = read_vocab(source.path, source.config.vocab_size)
    permutations = rotary_permutations(source) if gguf_arch == "llama" else {}   # qwen2 & co: NEOX rope, none
    requested = _requested(source, ggml_type)
    records = _embedding_record(source, requested)
    name_map = GGUFNames.of(source.arch, source.num_blocks)
    stacked = _expert_stacks(source)
    in_stacks = {name for names in stacked.values() for name in names}
    for linear in source.linear_names():
        if linear == source.arch.lm_head or linear in in_stacks:
            continue
        records += _linear_records(source, linear, name_map, requested)
    for merged, experts in stacked.items():
        records.append(_stacked_record(source, name_map.gguf_name(merged + ".weight"), experts, requested))
    for index in range(source.num_blocks):
        for norm in _block_norms(source, index):
            records.append(TensorRecord(name_map.gguf_name(norm), norm, tuple(_shape(source, norm)), "F32", "float"))
        for module in source.arch.float_modules:   # routers: F32, as llama.cpp's converter keeps them
            name = f"{source.arch.blocks}.{index}.{module}.weight"
            shape = tuple(_shape(source, name))
            if shape[0] == 1:      # a one-row gate (Qwen2-MoE's shared-expert gate): llama.cpp wants [n_embd]
                shape = shape[1:]
            records.append(TensorRecord(name_map.gguf_name(name), name, shape, "F32", "float"))
    final_norm = source.arch.final_norm + ".weight"
    records.append(TensorRecord(name_map.gguf_name(final_norm), final_norm, tuple(_shape(source, final_norm)),
                                "F32", "float"))
    if source.arch.lm_head in source.linear_names():
        if source.is_quantized(source.arch.lm_head):
            records += _linear_records(source, source.arch.lm_head, name_map, requested)
        elif requested.mix is not None:    # llama.cpp quantizes the output under every file type
            records += _linear_records(source, source.arch.lm_head, name_map, requested, weight_name="output.weight")
        else:
            records += _float_record(source, source.arch.lm_head + ".weight", "output.weight", is_linear=True)
    computed = {}
    if rope_type(source.config) == "llama3":
        computed["rope_freqs.weight"] = llama3_rope_factors(source.config)
        records.append(TensorRecord("rope_freqs.weight", "rope_parameters", tuple(computed["rope_freqs.weight"].shape),
                                    "F32", "float", "Llama 3 rope scaling factors, from the config"))
    _check_all_consumed(source, records)
    if any(name.startswith(source.arch.gguf_skipped) for name in source.checkpoint.weight_map):
        notes.append("the vision tower is not written: llama.cpp reads it from a separate mmproj file")
    if any(r.activation_dropped for r in records):
        notes.append("activation quantization (W8A8/W4A8) has no GGUF equivalent and was dropped: llama.cpp "
                     "computes those layers with its own activation handling")
    return _Plan(source, gguf_arch, vocab, records, permutations, computed, notes, requested)


def _check_all_consumed(source: ExportSource, records: list[TensorRecord]) -> None:
    """Every stored tensor has a place in the file: nothing is silently dropped."""
    used = set()
    for record in records:
        for linear in [e.source for e in record.experts] or ([record.source] if record.is_linear else []):
            if source.is_quantized(linear):
                used |= set(source.manifest.layers[linear].tensors.values())
            else:
                used.add(linear + ".weight")
        if not record.is_linear:
            used.add(record.source)
    leftover = sorted(n for n in set(source.checkpoint.weight_map) - used if not n.startswith(source.arch.gguf_skipped))
    if leftover:
        raise QuantkitError(f"tensor {leftover[0]} of {source.path} has no place in a GGUF {source.arch.gguf_arch} "
                            "file" + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else ""))


def _check_config(config, gguf_arch: str, tied: bool) -> list[str]:
    notes = []
    gemma = gguf_arch in _GEMMA_ARCHS
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    wanted = "gelu_pytorch_tanh" if gemma else "silu"
    if act != wanted:
        raise QuantkitError(f"hidden activation '{act}' is not expressible in GGUF's {gguf_arch} architecture ({wanted})")
    rope = rope_parameters(config)
    scaling = rope_type(config)
    if scaling == "llama3" and gguf_arch != "llama":
        raise QuantkitError(f"rope scaling 'llama3' has no place in GGUF's {gguf_arch} architecture")
    if scaling == "linear" and gguf_arch != "gemma3":
        raise QuantkitError(f"linear rope scaling is written for gemma3 only, not {gguf_arch}")
    if scaling not in ("default", "llama3", "linear"):
        raise QuantkitError(f"rope scaling '{scaling}' is not supported by the GGUF exporter "
                            "(unscaled rope, Llama 3's 'llama3' and Gemma 3's 'linear' are)")
    if gemma:
        _check_gemma(config, gguf_arch, tied)
    if rope_theta(config) is None:
        raise QuantkitError("config has no rope_theta (rope_parameters)")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise QuantkitError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported by the "
                            "GGUF exporter yet")
    if gguf_arch in _ROUTING_NORMALIZED and bool(getattr(config, "norm_topk_prob", True)) != _ROUTING_NORMALIZED[gguf_arch]:
        raise QuantkitError(f"norm_topk_prob {getattr(config, 'norm_topk_prob', None)} differs from llama.cpp's "
                            f"{gguf_arch}, which {'always' if _ROUTING_NORMALIZED[gguf_arch] else 'never'} "
                            "renormalizes the top-k routing weights")
    if getattr(config, "mlp_bias", False):
        raise QuantkitError(f"MLP biases are not part of GGUF's {gguf_arch} architecture")
    window = getattr(config, "sliding_window", None)
    if window and not gemma and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        notes.append(f"sliding window {window} is not written: llama.cpp attends to the whole context")
    return notes


_GEMMA_ARCHS = ("gemma2", "gemma3")
# Block counts llama.cpp takes for the 27B models, whose queries it scales by 1/sqrt(hidden / heads).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _check_gemma(config, gguf_arch: str, tied: bool) -> None:
    """What llama.cpp's gemma2/gemma3 compute and the file cannot change: queries scaled by
    1/sqrt(head_dim) (1/sqrt(hidden / heads) in the 27B models, recognised by their block count), and
    Gemma 2's output layer is always the token embeddings."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    head_dim = _head_dim(config)
    big = config.num_hidden_layers == _GEMMA_27B_LAYERS[gguf_arch] and scalar == config.hidden_size // config.num_attention_heads
    if scalar is not None and scalar != head_dim and not big:
        raise QuantkitError(f"query_pre_attn_scalar {scalar} is not what llama.cpp's {gguf_arch} uses (head_dim {head_dim})")
    if gguf_arch == "gemma2" and not tied:
        raise QuantkitError("llama.cpp's gemma2 always uses the token embeddings as its output layer; this "
                            "checkpoint has a separate lm_head")
    if gguf_arch == "gemma3" and getattr(config, "attn_logit_softcapping", None) is not None:
        raise QuantkitError(f"attn_logit_softcapping {config.attn_logit_softcapping} is not computed by llama.cpp's gemma3")


def _sliding_layers(config) -> list[bool]:
    """Which blocks use sliding-window attention (llama.cpp's per-layer sliding_window_pattern)."""
    return [kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or []]


def _sliding_rope_theta(config) -> float | None:
    """The sliding layers' own rope base (Gemma 3's rope_parameters per layer type), if any."""
    sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    return float(sliding["rope_theta"]) if isinstance(sliding, dict) and "rope_theta" in sliding else None


# Whether llama.cpp renormalizes the chosen experts' routing weights to sum to 1, per architecture.
_ROUTING_NORMALIZED = {"qwen2moe": False, "qwen3moe": True}


def _expert_stacks(source: ExportSource) -> dict[str, list[str]]:
    """MoE: {merged HF name (``<block>.mlp.experts.gate_proj``): the expert Linears stacked into it}."""
    layout = source.arch.experts
    if layout is None:
        return {}
    count = layout.num_experts(source.config)
    stacks = {}
    for index in range(source.num_blocks):
        container = f"{source.arch.blocks}.{index}.{layout.container}"
        for part in ("gate_proj", "up_proj", "down_proj"):
            stacks[f"{container}.{part}"] = [f"{container}.{e}.{part}" for e in range(count)]
    return stacks


def _stacked_record(source: ExportSource, gguf_name: str, experts: list[str], requested: _Requested) -> TensorRecord:
    """One [E, rows, cols] tensor of every expert's Linear: one ggml type for all (llama.cpp's layout).
    Each expert keeps its codes when its own decision is that type and exact or carried; otherwise
    the stack takes the closest type and the experts that cannot carry their codes are requantized."""
    records = [_linear_records(source, name, None, requested, weight_name=gguf_name)[0] for name in experts]
    types = {r.ggml_type for r in records}
    first = records[0]
    if len(types) == 1:
        ggml_type = first.ggml_type
    elif any(t in ("F16", "F32") for t in types):
        ggml_type = "F16"
    else:
        wanted = requested.for_tensor(gguf_name, first.shape[-1])[0]
        ggml_type = wanted or next(r.ggml_type for r in records if r.status == "requantized")
    statuses = {r.status if r.ggml_type == ggml_type else "requantized" for r in records}
    status = next(s for s in ("float", "requantized", "carried", "exact") if s in statuses)
    reason = next((r.reason for r in records if r.status == status and r.reason), "")
    if len(types) > 1:
        reason = f"experts' own types differ ({', '.join(sorted(types))}); one type per stacked tensor"
    singles = tuple(dataclasses.replace(r, expert=e) if r.ggml_type == ggml_type else
                    dataclasses.replace(r, ggml_type=ggml_type, status="requantized", expert=e)
                    for e, r in enumerate(records))
    return TensorRecord(gguf_name, experts[0].rsplit(".", 2)[0] + "." + experts[0].rsplit(".", 1)[1],
                        (len(experts), *first.shape), ggml_type, status, reason, is_linear=True,
                        activation_dropped=first.activation_dropped, experts=singles)


def rope_parameters(config) -> dict:
    """The config's rope settings: transformers 5's ``rope_parameters`` merged over the older
    ``rope_scaling``; per layer type (Gemma 3), those of the full-attention layers (GGUF's rope.* keys)."""
    rope = {**(getattr(config, "rope_scaling", None) or {}), **(getattr(config, "rope_parameters", None) or {})}
    return dict(rope["full_attention"]) if isinstance(rope.get("full_attention"), dict) else rope


def rope_type(config) -> str:
    rope = rope_parameters(config)
    return rope.get("rope_type") or rope.get("type") or "default"


def llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for Llama 3.x rope scaling: [head_dim / 2] float32 divisors of the
    unscaled frequencies f_i = theta^(-2i/d) (llama.cpp rotates by pos * f_i / factor_i).

    With wavelength w_i = 2*pi / f_i, L = original_max_position_embeddings and the config's factor,
    low_freq_factor, high_freq_factor: factor_i = 1 where w_i < L / high_freq_factor (kept), ``factor``
    where w_i > L / low_freq_factor (fully scaled), and in between 1 / ((1 - s) / factor + s) with
    s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor) (Meta's interpolation)."""
    rope = rope_parameters(config)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    dim = _head_dim(config)
    freqs = 1.0 / float(rope_theta(config)) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelength = 2 * math.pi / freqs
    smooth = (original / wavelength - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelength < original / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelength > original / low, torch.full_like(factors, factor), factors)
    return factors.float()


def rope_theta(config) -> float | None:
    rope = rope_parameters(config)
    return rope.get("rope_theta", getattr(config, "rope_theta", None))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_permutations(source: ExportSource) -> dict[str, torch.Tensor]:
    """Every block's q/k row permutation to the adjacent-pair rotary layout (`rotary_row_permutation`) that
    llama.cpp's llama architecture and llama2.c's runq.c rotate: {Linear name: perm}."""
    config = source.config
    head_dim = _head_dim(config)
    result = {}
    for index in range(source.num_blocks):
        block = f"{source.arch.blocks}.{index}"
        for projection, heads_field in source.arch.rotary_projections:
            heads = getattr(config, heads_field, None) or config.num_attention_heads
            result[f"{block}.{projection}"] = rotary_row_permutation(heads * head_dim, heads)
    return result


def _block_norms(source: ExportSource, index: int) -> list[str]:
    prefix = f"{source.arch.blocks}.{index}."
    return [f"{prefix}{norm}.weight" for norm in source.arch.block_norms]


def _shape(source: ExportSource, name: str) -> list[int]:
    stored = source.checkpoint.shapes().get(name)
    if stored is None:
        raise QuantkitError(f"{source.path} is incomplete: no tensor for {name}")
    return list(stored[0])


def _float_type(source: ExportSource, name: str) -> str:
    """F32 for float32 sources (nothing is lost); F16 otherwise, unless a value exceeds f16's range."""
    tensor = source.tensor(name)
    if tensor.dtype == torch.float32:
        return "F32"
    return "F32" if float(tensor.float().abs().max()) > F16_MAX else "F16"


def _embedding_record(source: ExportSource, requested: _Requested) -> list[TensorRecord]:
    """token_embd: float, or under a K-quant file type the type llama.cpp gives it (the output's when tied)."""
    hf_name = source.arch.embeddings + ".weight"
    if requested.mix is None:
        return _float_record(source, hf_name, "token_embd.weight")
    shape = tuple(_shape(source, hf_name))
    ggml_type, why = requested.for_tensor("token_embd.weight", shape[1])
    status = "float" if ggml_type in ("F16", "F32") else "requantized"
    return [TensorRecord("token_embd.weight", hf_name, shape, ggml_type, status, why)]


def _float_record(source: ExportSource, hf_name: str, gguf_name: str, *,
                  is_linear: bool = False) -> list[TensorRecord]:
    ggml_type = _float_type(source, hf_name)
    return [TensorRecord(gguf_name, hf_name.removesuffix(".weight") if is_linear else hf_name,
                         tuple(_shape(source, hf_name)), ggml_type, "float", "not quantized in the source",
                         is_linear=is_linear)]


def _linear_records(source: ExportSource, linear: str, name_map, requested: _Requested, *,
                    weight_name: str | None = None) -> list[TensorRecord]:
    weight_name = weight_name or name_map.gguf_name(linear + ".weight")
    records = []
    shape = tuple(source.manifest.layers[linear].shape) if source.is_quantized(linear) else \
        tuple(_shape(source, linear + ".weight"))
    wanted, why = requested.for_tensor(weight_name, shape[-1])
    if source.is_quantized(linear):
        entry = source.manifest.layers[linear]
        ggml_type, status, reason = _quantized_decision(entry, source.quant_params(linear), wanted, requested.mix)
        if status == "requantized" and why:
            reason = f"{reason}; {why}"
        elif why and not reason:          # carried under a file type: the file type's choice, and why
            reason = why
        if entry.scheme.activation is not None:
            reason = (reason + "; " if reason else "") + \
                f"its activation grid ({entry.scheme.activation.describe()}) is dropped"
    else:
        if (source.manifest is None or requested.mix is not None) and wanted not in (None, "F16"):
            # a float checkpoint, re-rounded (under a K-quant file type, float layers too, as llama.cpp does)
            ggml_type, status, reason = wanted, "requantized", "; ".join(filter(None, ["float source", why]))
        elif source.manifest is None:
            ggml_type = wanted or _float_type(source, linear + ".weight")
            status, reason = "float", "float source"
        else:
            ggml_type, status, reason = _float_type(source, linear + ".weight"), "float", "not quantized in the source"
        if ggml_type not in ("F16", "F32") and shape[1] % ggml_blocks.BLOCK:
            ggml_type, status, reason = "F16", "float", f"row length {shape[1]} is not a multiple of 32"
    dropped = source.is_quantized(linear) and source.manifest.layers[linear].scheme.activation is not None
    records.append(TensorRecord(weight_name, linear, shape, ggml_type, status, reason, is_linear=True,
                                activation_dropped=dropped))
    bias = source.bias_name(linear)
    if bias is not None:
        records.append(TensorRecord(name_map.gguf_name(bias), bias, (shape[0],), "F32", "float"))
    return records


def _quantized_decision(entry, params: dict[str, torch.Tensor], requested: str | None,
                        mix: str | None = None) -> tuple[str, str, str]:
    """(ggml type, status, reason) of a quantized layer, from its grid and its scales/zeros/g_idx. Under a
    K-quant file type (``mix``) the codes are carried only where the file type's choice for the tensor
    (``requested``) is the type that holds them; otherwise they are requantized to that choice."""
    decision = _carrying_decision(entry, params, requested, widen=mix is not None)
    if mix is not None and decision[1] in ("exact", "carried") and decision[0] != requested:
        return requested, "requantized", f"{mix} gives this tensor {requested}, not {decision[0]}"
    return decision


def _carrying_decision(entry, params: dict[str, torch.Tensor], requested: str | None,
                       widen: bool = False) -> tuple[str, str, str]:
    """``widen``: carry the codes in the requested type when it holds them (a file type's fallback
    Q5_0 / Q8_0 keeps int4 codes exactly), not only in their own smallest type."""
    spec = entry.scheme.weight
    out_features, in_features = entry.shape
    if in_features % ggml_blocks.BLOCK:
        return "F16", "float", f"row length {in_features} is not a multiple of 32, so no block type fits"
    if spec.k_format is not None:        # K-quant fields carry as they are (quantkit computes them as ggml)
        return spec.k_format.name, "exact", ""
    fallback = requested or gguf_blocks.closest_format(spec.bits, spec.symmetric)
    if spec.format == "fp4_e2m1" and spec.scale_format == "e8m0":
        if spec.group_size == ggml_blocks.BLOCK and "g_idx" not in params:
            return "MXFP4", "exact", ""
        return fallback, "requantized", "MXFP4 blocks hold 32 consecutive columns under one e8m0 scale"
    if spec.format != "int":
        scales = f" with {spec.scale_format} scales" if spec.format == "fp4_e2m1" else ""
        return fallback, "requantized", f"{spec.format} codes{scales} have no GGUF block type"
    carrier = gguf_blocks.carrier_format(spec.bits, spec.symmetric)
    if widen and requested is not None and gguf_blocks.holds(requested, spec.bits, spec.symmetric):
        carrier = requested           # a wider block type asked for holds the codes too (Q4_0 codes in Q5_0)
    if carrier is None:
        return fallback, "requantized", f"asymmetric {spec.bits}-bit codes have no GGUF block type"
    scale = params["scale"].float()
    if not torch.equal(scale, scale.half().float()):
        return fallback, "requantized", "its scales are not float16 values"
    why_not = _block_misalignment(spec, in_features, params)
    if why_not:
        return fallback, "requantized", why_not
    if spec.symmetric:
        return carrier, "exact", ""
    return carrier, "carried", "block minimum m = -scale*(zero+offset) rounded to f16"


def _block_misalignment(spec, in_features: int, params: dict[str, torch.Tensor]) -> str:
    """Why one (scale, zero) per row and 32-column block cannot describe this layer ('' if it can)."""
    group_size = primitives.group_size_for(spec, in_features)
    g_idx = params.get("g_idx")
    blocks = in_features // ggml_blocks.BLOCK
    for role in ("scale", "zero"):
        if role not in params:
            continue
        per_column = primitives.expand_to_columns(params[role].float(), in_features, group_size, g_idx)
        per_block = per_column.reshape(per_column.shape[0], blocks, ggml_blocks.BLOCK)
        if not bool((per_block == per_block[..., :1]).all()):
            if g_idx is not None:
                return "act-order g_idx puts columns of different groups in one 32-value block"
            return f"group size {group_size} is not a multiple of GGUF's 32-value blocks"
    return ""


# --------------------------------------------------------------------------------------------- write


def _block_linears(plan: _Plan) -> list[TensorRecord]:
    """The records of the decoder blocks' Linears (not the output, not stacked experts)."""
    block_prefix = plan.source.arch.blocks + "."
    return [r for r in plan.records if r.is_linear and not r.experts and r.source.startswith(block_prefix)]


def _fit_target(plan: _Plan, target_size: int, candidates: tuple[str, ...],
                sensitivities: dict[str, dict[str, float | None]] | None = None, suffix: str = "") -> str:
    """Choose each block Linear's type under ``target_size`` bytes (`gguf_budget`): measure every candidate (or
    take the measured ``sensitivities``), size the header (the same whatever the choice; ``suffix`` ends every
    chosen tensor's reason, as it will be written), solve, and assign; returns a note saying what was chosen."""
    source = plan.source
    chosen = _block_linears(plan)
    if sensitivities is not None:
        missing = [r.source for r in chosen if r.source not in sensitivities]
        if missing:
            raise QuantkitError(f"no measured sensitivity for {missing[0]}")
        choices = [gguf_budget.measured(r.name, r.shape, candidates, sensitivities[r.source]) for r in chosen]
    else:
        choices = [gguf_budget.measure(r.name, _permute(plan, r.source, source.tensor(r.source + ".weight").float()),
                                       candidates, _importance(plan, r)) for r in chosen]
    for record, choice in zip(chosen, choices):          # any choice: the header's size does not depend on it
        _assign(record, next(iter(choice.costs)), suffix)
    chosen_ids = {id(r) for r in chosen}
    fixed = gguf_budget.aligned(_header_bytes(plan)) + sum(gguf_budget.aligned(r.nbytes()) for r in plan.records
                                                           if id(r) not in chosen_ids)
    if not chosen:
        raise QuantkitError("--target-size found no block Linear to choose a type for")
    smallest = fixed + sum(min(choice.costs.values()) for choice in choices)
    if smallest > target_size:
        raise QuantkitError(f"--target-size {target_size} bytes is below the smallest file these candidates allow "
                            f"({smallest} bytes, of which {fixed} the header and the tensors --type sets)")
    types = [list(choice.costs) for choice in choices]
    picks = knapsack.solve([[c.errors[t] for t in ts] for c, ts in zip(choices, types)],
                           [[c.costs[t] for t in ts] for c, ts in zip(choices, types)],
                           target_size - fixed, knapsack.unit_for(target_size - fixed, len(chosen)))
    for record, names, pick in zip(chosen, types, picks):
        _assign(record, names[pick], suffix)
    counts = Counter(record.ggml_type for record in chosen)
    # said after writing: the file's metadata holds the notes, and the header was sized without this one
    return (f"--target-size {target_size}: {len(chosen)} block Linears' types chosen under {target_size - fixed} "
            f"bytes ({', '.join(f'{t} x{n}' for t, n in sorted(counts.items()))}); "
            f"{_measure_name(plan, sensitivities)}")


def _measure_name(plan: _Plan, sensitivities) -> str:
    if sensitivities is not None:
        return (f"block sensitivities measured on calibration data "
                f"({'importance-weighted search' if plan.importance is not None else 'reference rounding'})")
    return f"{'importance-weighted' if plan.importance is not None else 'unweighted'} weight error"


def _assign(record: TensorRecord, ggml_type: str, suffix: str = "") -> None:
    record.ggml_type, record.status, record.reason = ggml_type, "requantized", f"--target-size: {ggml_type}{suffix}"


def _attach_codes(plan: _Plan, codes: CodesSource, codes_by: str, suffix: str) -> str | None:
    """--algo: the block Linears the plan requantizes get their codes from a calibration run on exactly their
    chosen types (``codes``); each must come back on that type's grid (checked), and is then written as it is.
    Returns a note naming the Linears whose type ``codes_by`` cannot search (the run rounded them: rtn)."""
    chosen = [r for r in _block_linears(plan) if r.status == "requantized"]
    if not chosen:
        raise QuantkitError("--algo found no block Linear to quantize: give --type (a quantized type or a K-quant "
                            "file type) or --target-size")
    calibrated = ExportSource.open(codes({r.source: r.ggml_type for r in chosen}), require_manifest=True)
    for record in chosen:
        if not calibrated.is_quantized(record.source):
            raise QuantkitError(f"the calibration run left {record.source} unquantized; a quantkit bug, please report it")
        entry = calibrated.manifest.layers[record.source]
        ggml_type, status, why = _carrying_decision(entry, calibrated.quant_params(record.source), record.ggml_type,
                                                    widen=True)
        if ggml_type != record.ggml_type or status not in ("exact", "carried"):
            raise QuantkitError(f"the calibration run's codes of {record.source} do not fit {record.ggml_type} "
                                f"({why or ggml_type}); a quantkit bug, please report it")
        record.status = "calibrated"
        if not record.reason.endswith(suffix):        # --target-size already said it (its header was sized so)
            record.reason = "; ".join(filter(None, [record.reason, suffix.removeprefix("; ")]))
    plan.codes = calibrated
    others = Counter((calibrated.manifest.layers[r.source].algorithm, r.ggml_type) for r in chosen
                     if calibrated.manifest.layers[r.source].algorithm != codes_by)
    if not others:
        return None
    return (f"--algo {codes_by} does not search every chosen type: "
            + ", ".join(f"{n} x {t} by {a}" for (a, t), n in sorted(others.items())))


def _write_header(writer, plan: _Plan) -> None:
    """Header, metadata and tensor infos: everything before the tensor data."""
    _add_metadata(writer, plan)
    _add_tensor_infos(writer, plan)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()


def _add_tensor_infos(writer, plan: _Plan) -> None:
    import gguf

    for record in plan.records:
        if record.ggml_type in ("F32", "F16"):
            dtype = np.float32 if record.ggml_type == "F32" else np.float16
            writer.add_tensor_info(record.name, record.shape, np.dtype(dtype), record.nbytes())
        else:
            byte_shape = (*record.shape[:-1], record.nbytes() // math.prod(record.shape[:-1]))
            writer.add_tensor_info(record.name, byte_shape, np.dtype(np.uint8), record.nbytes(),
                                   raw_dtype=gguf.GGMLQuantizationType[record.ggml_type])


def _header_bytes(plan: _Plan) -> int:
    """The bytes of the file before its tensor data (header, metadata, tensor infos), written to a scratch file."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        writer = gguf.GGUFWriter(path, plan.gguf_arch)
        try:
            _write_header(writer, plan)
        finally:
            writer.close()
        return path.stat().st_size


def _write(plan: _Plan, path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, plan.gguf_arch)
    try:
        _write_header(writer, plan)
        for record in plan.records:
            data = _tensor_bytes(plan, record)
            assert data.nbytes == record.nbytes(), (record.name, data.nbytes, record.nbytes())
            writer.write_tensor_data(data)
    finally:
        writer.close()


def _add_metadata(writer, plan: _Plan) -> None:
    config, source = plan.source.config, plan.source
    writer.add_name(source.name)
    writer.add_quantized_by(f"quantkit {quantkit.__version__}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", config.num_attention_heads))
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads and plan.gguf_arch not in _GEMMA_ARCHS:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if plan.gguf_arch in _GEMMA_ARCHS:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
            if _sliding_layers(config):
                writer.add_sliding_window_pattern(_sliding_layers(config))
        if _sliding_rope_theta(config) is not None:
            writer.add_rope_freq_base_swa(_sliding_rope_theta(config))
        if plan.gguf_arch == "gemma3" and getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if plan.gguf_arch == "gemma2":
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf_rope_scaling_linear())
        writer.add_rope_scaling_factor(float(rope_parameters(config)["factor"]))
    if source.arch.experts is not None:
        writer.add_expert_count(source.arch.experts.num_experts(config))
        writer.add_expert_used_count(config.num_experts_per_tok)
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(plan.records, plan.requested.mix))
    writer.add_quantization_version(gguf_quantization_version())
    plan.vocab.add_to(writer)
    report = {"tool": f"quantkit {quantkit.__version__}", "source": str(source.path), "notes": plan.notes,
              "layers": {r.name: {"source": r.source, "type": r.ggml_type, "status": r.status, "reason": r.reason}
                         for r in plan.records if r.is_linear}}
    writer.add_string(METADATA_KEY, json.dumps(report, sort_keys=True))


def gguf_rope_scaling_linear():
    import gguf

    return gguf.RopeScalingType.LINEAR


def gguf_quantization_version() -> int:
    import gguf

    return gguf.GGML_QUANT_VERSION


def _file_type(records: list[TensorRecord], mix: str | None = None):
    """general.file_type: the K-quant file type asked for, else the type holding most linear weight elements."""
    import gguf

    if mix is not None:
        return gguf.LlamaFileType[f"MOSTLY_{mix}"]
    counts = Counter()
    for record in records:
        if record.is_linear:
            counts[record.ggml_type] += math.prod(record.shape)
    dominant = counts.most_common(1)[0][0] if counts else "F32"
    if dominant == "MXFP4":       # llama.cpp's only MXFP4 file type (gpt-oss) is named for MoE models
        return gguf.LlamaFileType.MOSTLY_MXFP4_MOE
    # a K type alone names llama.cpp's all-base-type file type (Q4_K -> Q4_K_S, which promotes nothing)
    dominant = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}.get(dominant, dominant)
    return gguf.LlamaFileType.ALL_F32 if dominant == "F32" else gguf.LlamaFileType[f"MOSTLY_{dominant}"]


def _tensor_bytes(plan: _Plan, record: TensorRecord) -> np.ndarray:
    source = plan.source
    if record.name in plan.computed:
        return _float_bytes(plan.computed[record.name], record.ggml_type)
    if record.experts:
        return _stacked_bytes(plan, record)
    if not record.is_linear:
        tensor = source.tensor(record.source)
        if record.source.endswith(".bias"):
            tensor = _permute(plan, record.source.removesuffix(".bias"), tensor)
        if record.source.endswith("norm.weight") and source.arch.norm_offset:
            tensor = tensor.float() + source.arch.norm_offset   # llama.cpp computes x * w: store 1 + w
        if record.ggml_type not in ("F32", "F16"):    # token_embd under a K-quant file type
            return _requantized_bytes(record, tensor.float().reshape(record.shape), _importance(plan, record))
        return _float_bytes(tensor.reshape(record.shape), record.ggml_type)
    linear = record.source
    if record.status == "calibrated":        # --algo's codes, measured against the float weight they stand for
        quant = _permute_quant(plan, linear, plan.codes.record(linear).quant)
        return _carried_bytes(record, quant, _permute(plan, linear, source.tensor(linear + ".weight").float()))
    if source.is_quantized(linear) and record.status in ("exact", "carried"):
        quant = _permute_quant(plan, linear, source.record(linear).quant)
        return _carried_bytes(record, quant, quant.dequantize())
    if source.is_quantized(linear):    # requantized from the dequantized weight (rows permuted after)
        reference = _permute(plan, linear, source.record(linear).quant.dequantize())
    else:
        reference = _permute(plan, linear, source.tensor(linear + ".weight").float())
    if record.ggml_type in ("F32", "F16"):
        data = _float_bytes(reference, record.ggml_type)
        _measure(record, reference, torch.from_numpy(data).float())
        return data
    return _requantized_bytes(record, reference, _importance(plan, record))


def _carried_bytes(record: TensorRecord, quant: QuantTensor, reference: torch.Tensor) -> np.ndarray:
    """The record's blocks holding ``quant``'s codes and scales as they are, measured against ``reference``."""
    if record.ggml_type == "MXFP4":
        blocks = gguf_blocks.carry_mxfp4(quant.codes, _per_block(quant.scale, quant))
        _measure(record, reference, blocks.dequantize())
        return gguf_blocks.pack_mxfp4(blocks)
    if record.ggml_type in kquants.K_FORMATS:
        k_blocks = quant.k_blocks()
        _measure(record, reference, k_blocks.dequantize())
        return gguf_kquants.pack(k_blocks)
    blocks = _carried_blocks(quant, record.ggml_type)
    if blocks.m is not None:
        record.min_error_in_scales = _min_error(quant, blocks)
    return _blocks_bytes(record, blocks, reference)


def _importance(plan: _Plan, record: TensorRecord) -> torch.Tensor | None:
    if plan.importance is None:
        return None
    vector = plan.importance.importance(record.name, record.expert)
    if vector is not None and vector.shape[0] != record.shape[-1]:
        raise QuantkitError(f"the importance matrix has {vector.shape[0]} values for {record.name}, whose rows hold "
                            f"{record.shape[-1]}: it was computed for another model")
    return vector


def _block_importance(plan: _Plan) -> dict[str, torch.Tensor] | None:
    """Each block Linear's checkpoint name -> the importance vector its tensor is searched with (--imatrix; those
    it has no entry for are rounded by reference), or None without an importance matrix."""
    if plan.importance is None:
        return None
    vectors = {r.source: _importance(plan, r) for r in plan.records if r.is_linear and not r.experts}
    return {name: vector for name, vector in vectors.items() if vector is not None}


def _importance_notes(plan: _Plan) -> list[str]:
    """What the importance matrix does and does not cover, said once."""
    searched = [r for r in plan.records if ggml_blocks.importance_searched(r.ggml_type) and r.status == "requantized"]
    missing = [r.name for r in searched if plan.importance.importance(r.name, 0) is None]
    notes = []
    if missing:
        notes.append(f"the importance matrix has no entry for {len(missing)} quantized tensor(s) ({missing[0]}, ...): "
                     "they use llama.cpp's search without importance, as llama-quantize does")
    return notes


def _requantized_bytes(record: TensorRecord, reference: torch.Tensor,
                       importance: torch.Tensor | None = None) -> np.ndarray:
    """Float weights [rows, n] re-rounded to the record's block type by llama.cpp's quantizers (K-quants:
    `kquants`; 32-value types: `ggml_blocks`), with its importance-weighted search when ``importance`` [n] is
    given (what llama-quantize --imatrix runs), measured against ``reference``."""
    blocks = ggml_blocks.requantize(reference, record.ggml_type, importance)
    if record.ggml_type in kquants.K_FORMATS:
        _measure(record, reference, blocks.dequantize())
        return gguf_kquants.pack(blocks)
    return _blocks_bytes(record, blocks, reference)


def _stacked_bytes(plan: _Plan, record: TensorRecord) -> np.ndarray:
    """The experts' bytes one after another (expert e at [e]), each as its own record (planned in
    `_stacked_record`) says: codes carried, or requantized from its dequantized weight. The stack's
    SQNR adds up the experts' sums: 10 log10(sum |w|^2 / sum |w - w_gguf|^2)."""
    parts = [_tensor_bytes(plan, single).reshape(-1) for single in record.experts]
    signal = sum(single.error_sums[0] for single in record.experts)
    noise = sum(single.error_sums[1] for single in record.experts)
    record.weight_sqnr_db = primitives.sqnr_db_from_sums(signal, noise)
    return np.concatenate(parts)


def _measure(record: TensorRecord, reference: torch.Tensor, approximation: torch.Tensor) -> None:
    """The record's weight SQNR against ``reference`` (and the sums behind it, for expert stacks)."""
    record.error_sums = primitives.error_sums(reference, approximation)
    record.weight_sqnr_db = primitives.sqnr_db_from_sums(*record.error_sums)


def _blocks_bytes(record: TensorRecord, blocks: ggml_blocks.Blocks, reference: torch.Tensor) -> np.ndarray:
    _measure(record, reference, blocks.dequantize())
    return gguf_blocks.pack(blocks)


def _float_bytes(tensor: torch.Tensor, ggml_type: str) -> np.ndarray:
    return tensor.to(torch.float32 if ggml_type == "F32" else torch.float16).contiguous().numpy()


def _permute(plan: _Plan, linear: str, tensor: torch.Tensor) -> torch.Tensor:
    perm = plan.permutations.get(linear)
    return tensor if perm is None else tensor[perm]


def _permute_quant(plan: _Plan, linear: str, quant: QuantTensor) -> QuantTensor:
    perm = plan.permutations.get(linear)
    if perm is None:
        return quant
    per_row = quant.scale.shape[0] != 1
    return QuantTensor(quant.codes[perm], quant.scale[perm] if per_row else quant.scale,
                       None if quant.zero is None else (quant.zero[perm] if per_row else quant.zero),
                       quant.spec, quant.g_idx, quant.global_scale,
                       None if quant.super_scale is None else quant.super_scale[perm],
                       None if quant.super_min is None else quant.super_min[perm])


def _per_block(param: torch.Tensor, quant: QuantTensor) -> torch.Tensor:
    """[R, G] per-group parameter -> [out, in/32] one value per 32-column block."""
    out_features, in_features = quant.shape
    per_column = primitives.expand_to_columns(param.float(), in_features, quant.group_size, quant.g_idx)
    return per_column[:, :: ggml_blocks.BLOCK].expand(out_features, -1)


def _carried_blocks(quant: QuantTensor, ggml_type: str) -> ggml_blocks.Blocks:
    zero = None if quant.zero is None else _per_block(quant.zero, quant)
    return gguf_blocks.carry_codes(quant.codes, _per_block(quant.scale, quant), zero, ggml_type)


def _min_error(quant: QuantTensor, blocks: ggml_blocks.Blocks) -> float:
    """Largest |m_f16 - m| / scale over the blocks, m = -scale * (zero + offset) in float64."""
    scale = _per_block(quant.scale, quant).double()
    exact = -scale * (_per_block(quant.zero, quant).double() + blocks.fmt.offset)
    return float(((blocks.m.double() - exact).abs() / scale).max())


def describe(result: GGUFExportResult) -> list[tuple[str, str, int, str, float | None]]:
    """(status, type, layer count, reason, lowest weight SQNR in dB of the file against the source) rows, most
    layers first, for tables."""
    groups: dict[tuple[str, str, str], list[TensorRecord]] = {}
    for record in result.linears:
        groups.setdefault((record.status, record.ggml_type, record.reason), []).append(record)
    rows = []
    for (status, ggml_type, reason), members in sorted(groups.items(), key=lambda item: -len(item[1])):
        sqnr = [t.weight_sqnr_db for t in members if t.weight_sqnr_db is not None]  # inf: exactly the source's
        rows.append((status, ggml_type, len(members), reason, min(sqnr) if sqnr else None))
    return rows

