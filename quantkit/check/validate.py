"""``quantkit validate``: run every quantized layer through the kernels and check it against references.

Activations. The output directory keeps no activations, so they are regenerated: the manifest's
calibration dataset spec with its seed and (by default) its sequence length, i.e. the first
``num_samples`` calibration samples themselves, is run through the *quantized model itself* with the
pure-torch QuantLinear forward, and a hook on every QuantLinear takes its input. Those are the inputs each layer
sees when the quantized model runs (smoothed, with upstream quantization error), which is also how
calibration measured each layer's recorded output SQNR. When the dataset cannot be loaded any more
(a moved data file, gsm8k offline), the bundled English text is used, and the report says so.

Per layer, on those inputs x (all in fp32 unless said otherwise):
  reference  QuantLinear's fake-quant forward (dequantized weights, fake-quantized activations);
  kernel     the backend's kernels on x in the model dtype (quantize -> integer GEMM, or dequant-GEMM);
  float      the source checkpoint's float weight with the recorded block transforms (SmoothQuant and
             AWQ folds, AWQ clipping) replayed, i.e. the matrix the quantizer was given (available when the source still exists and its
             weights hash to the manifest's ``weights_sha256``).
Checks, each failure naming the layer:
  weights   the stored codes vs the float weight: weight SQNR not below the one calibration recorded,
            and the weight path (x @ W_hat^T vs x @ W^T, activations unquantized) not far below the
            expected output SQNR: a damaged or misread tensor fails here;
  kernel    kernel vs reference within the output dtype's tolerance (max error relative to max |ref|,
            and SQNR);
  output    kernel vs float SQNR not far below what the layer gave at calibration (the manifest's
            ``output_sqnr_db`` minus a margin; a per-bit floor when none was recorded). With intact
            weights this fails when activations fall outside the calibrated static ranges.
Failures are listed weights first, then kernel, then output, so the first one names the cause (a
damaged layer also disturbs the activations of the layers after it).
End to end: KL(source || model) and top-1 agreement of the kernel model and of the reference model
against the source model on the same tokens.

The report goes to ``validation.json`` in the output directory and a summary into the manifest's
``summary.validation``; both written atomically (temporary file, then rename).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.calibrate.hooks import forward_hooks
from quantkit.errors import QuantkitError
from quantkit.files import atomic_text, json_safe
from quantkit.formats import primitives
from quantkit.model.qlinear import QuantLinear

log = logging.getLogger(__name__)

REPORT_NAME = "validation.json"
# Kernel vs pure-torch reference, by output dtype: (max |y - ref| / max |ref|, minimum SQNR in dB).
# fp32: summation order only; fp16/bf16: rounding of the output (and of dequantized weights, which
# the bf16/fp16 tensor-core dot takes in that dtype).
KERNEL_TOLERANCE = {torch.float32: (1e-4, 80.0), torch.float16: (4e-3, 50.0), torch.bfloat16: (2e-2, 35.0)}
FLOOR_DB_PER_BIT = 2.5              # fallback expectation without a recorded SQNR: 10 dB at 4 bits
WEIGHT_SQNR_SLACK_DB = 1.0          # stored codes may not be worse than calibration recorded by more
_PROBLEM_ORDER = ("weights", "kernel", "output")


@dataclass
class ValidateConfig:
    path: Path
    backend: str = "auto"           # auto | triton | interpreter | reference (quantkit.cuda.BACKENDS)
    device: str = "auto"            # auto: cuda when available, else cpu
    dtype: str = "auto"             # auto: fp32 on CPU; the storage dtype (fp16/bf16, else bf16) on CUDA
    num_samples: int | None = None  # None: min(4, calibration samples)
    seq_len: int | None = None      # None: the calibration sequence length (128 without one)
    sqnr_margin_db: float = 10.0
    write: bool = True              # write validation.json and the manifest summary


@dataclass
class _Sums:
    """Running sums of one comparison: SQNR and max error relative to the reference's max."""

    signal: float = 0.0
    noise: float = 0.0
    max_error: float = 0.0
    max_reference: float = 0.0

    def add(self, reference: torch.Tensor, value: torch.Tensor) -> None:
        reference, value = reference.double(), value.double()
        self.signal += reference.pow(2).sum().item()
        self.noise += (value - reference).pow(2).sum().item()
        self.max_error = max(self.max_error, (value - reference).abs().max().item())
        self.max_reference = max(self.max_reference, reference.abs().max().item())

    @property
    def sqnr_db(self) -> float:
        return primitives.sqnr_db_from_sums(self.signal, self.noise)

    @property
    def max_rel_error(self) -> float:
        return self.max_error / self.max_reference if self.max_reference > 0 else (math.inf if self.max_error else 0.0)


@dataclass
class LayerReport:
    name: str
    scheme: str
    kernel: str                                     # int8 | weight-only
    shape: tuple[int, int]
    kernel_max_rel_error: float = math.nan          # kernel vs reference
    kernel_sqnr_db: float = math.nan
    reference_float_sqnr_db: float | None = None    # reference vs float layer
    kernel_float_sqnr_db: float | None = None       # kernel vs float layer (what is judged)
    weight_sqnr_db: float | None = None             # stored dequantized weights vs float weights
    recorded_output_sqnr_db: float | None = None
    recorded_weight_sqnr_db: float | None = None
    expected_min_sqnr_db: float | None = None
    weight_path_sqnr_db: float | None = None        # x @ W_hat^T vs x @ W^T (activations unquantized)
    problems: list[tuple[str, str]] = field(default_factory=list)   # (weights | kernel | output, text)

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class ValidationReport:
    path: str
    backend: str
    backend_description: str
    device: str
    dtype: str
    activations: dict
    float_reference: str
    tolerances: dict
    layers: dict[str, LayerReport]
    end_to_end: dict
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        ranked = [(_PROBLEM_ORDER.index(kind), f"{name}: {text}") for name, layer in self.layers.items()
                  for kind, text in layer.problems]
        return [text for _, text in sorted(ranked, key=lambda item: item[0])]

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst(self, metric: str) -> tuple[str | None, float | None]:
        values = [(getattr(layer, metric), name) for name, layer in self.layers.items()
                  if getattr(layer, metric) is not None and not math.isnan(getattr(layer, metric))]
        if not values:
            return None, None
        value, name = max(values) if metric == "kernel_max_rel_error" else min(values)
        return name, value

    def to_dict(self) -> dict:
        layers = {}
        for name, layer in self.layers.items():
            entry = asdict(layer)
            entry["problems"] = [text for _, text in layer.problems]
            entry["passed"] = layer.passed
            layers[name] = {k: json_safe(v) for k, v in entry.items()}
        return {
            "passed": self.passed, "failures": self.failures, "path": self.path, "backend": self.backend,
            "backend_description": self.backend_description, "device": self.device, "dtype": self.dtype,
            "activations": self.activations, "float_reference": self.float_reference,
            "tolerances": self.tolerances, "end_to_end": {k: json_safe(v) for k, v in self.end_to_end.items()},
            "seconds": round(self.seconds, 2), "layers": layers,
        }

    def summary(self) -> dict:
        """The compact record kept in the manifest's summary."""
        kernel_layer, kernel_db = self.worst("kernel_sqnr_db")
        float_layer, float_db = self.worst("kernel_float_sqnr_db")
        return {
            "passed": self.passed, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backend": self.backend, "device": self.device, "dtype": self.dtype, "layers": len(self.layers),
            "failures": self.failures[:10], "float_reference": self.float_reference,
            "worst_kernel_sqnr_db": {"layer": kernel_layer, "db": json_safe(kernel_db)},
            "worst_float_sqnr_db": {"layer": float_layer, "db": json_safe(float_db)},
            "kl_divergence": json_safe(self.end_to_end.get("kernel_kl_divergence")),
            "top1_agreement": json_safe(self.end_to_end.get("kernel_top1_agreement")),
            "report": REPORT_NAME,
        }


# ----------------------------------------------------------------------------------------------------
# Inputs: device, dtype, tokens, the float reference.
# ----------------------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda asked for, but no CUDA device is available")
    return device


def _dtype(name: str, device: torch.device, storage_dtype: str) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        storage = getattr(torch, storage_dtype, torch.bfloat16)
        return storage if storage in (torch.float16, torch.bfloat16) else torch.bfloat16
    dtype = getattr(torch, name, None)
    if dtype not in KERNEL_TOLERANCE:
        raise QuantkitError(f"unsupported --dtype '{name}'; use float32, float16 or bfloat16")
    return dtype


def activation_tokens(manifest, tokenizer, vocab_size: int, num_samples: int,
                      seq_len: int) -> tuple[torch.Tensor, dict]:
    """[num_samples, seq_len] token ids from the calibration dataset spec, else the bundled text."""
    from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens
    from quantkit.check.evaluate import default_text, eval_windows

    if num_samples < 1 or seq_len < 2:
        raise QuantkitError(f"need at least 1 sample of 2 tokens, got {num_samples} x {seq_len}")
    calibration = manifest.calibration
    dataset = calibration.dataset
    seed = int(calibration.seed or 0)
    if isinstance(dataset, dict) and dataset.get("name"):
        spec = DatasetSpec(dataset["name"], tuple(dataset.get("data_files") or ()), dataset.get("text_column", "text"))
        try:
            tokens = calibration_tokens(spec, tokenizer, vocab_size, num_samples, seq_len, seed)
            return tokens, {"source": "calibration dataset", "dataset": dataset, "seed": seed,
                            "num_samples": num_samples, "seq_len": seq_len}
        except QuantkitError as error:
            fallback_reason = f"calibration dataset unavailable ({error})"
    else:
        fallback_reason = "the manifest records no calibration dataset"
    name, text = default_text()
    tokens = eval_windows(tokenizer, text, seq_len, num_samples)
    return tokens, {"source": f"bundled text {name}", "reason": fallback_reason, "num_samples": tokens.shape[0],
                    "seq_len": seq_len}


def _sample_shape(config: ValidateConfig, manifest, model_config) -> tuple[int, int]:
    """(num_samples, seq_len): as asked, else the calibration's sequence length and at most 4 samples."""
    calibration = manifest.calibration
    num_samples = config.num_samples if config.num_samples is not None else min(4, int(calibration.num_samples or 4))
    seq_len = config.seq_len if config.seq_len is not None else int(calibration.seq_len or 128)
    max_len = getattr(model_config, "max_position_embeddings", None)
    if max_len and seq_len > max_len:
        if config.seq_len is not None:
            raise QuantkitError(f"--seq-len {seq_len} is over the model's maximum of {max_len} tokens")
        seq_len = max_len
    return num_samples, seq_len


def _source_checkpoint(manifest):
    """(Checkpoint of the float source, None) when it still exists unchanged, else (None, reason)."""
    from quantkit.model.checkpoint import Checkpoint

    path = manifest.source.path
    if not path or not Path(path).is_dir():
        return None, f"source checkpoint {path} not found"
    try:
        checkpoint = Checkpoint(Path(path))
    except QuantkitError as error:
        return None, f"source checkpoint unreadable: {error}"
    recorded = manifest.source.weights_sha256
    if recorded and checkpoint.sha256() != recorded:
        return None, f"source weights in {path} changed since calibration (sha256 differs)"
    return checkpoint, None



class FloatWeights:
    """The float weight each QuantLinear was quantized from: the source block in fp32 with the recorded
    block transforms replayed in the pipeline's order (smooth -> transform -> quantize), each by the
    algorithm that saved it (`smoothquant.replay`: its folds; `awq.replay`: scale folds, then clipping).
    One block is materialized at a time."""

    def __init__(self, checkpoint, manifest, search_results: dict[str, torch.Tensor]):
        from quantkit.model.architectures import architecture_for
        from quantkit.model.checkpoint import build_skeleton

        self.checkpoint = checkpoint
        self.manifest = manifest
        self.arch = architecture_for(checkpoint.config)
        self.results = search_results
        self.skeleton = build_skeleton(checkpoint.config, torch.float32)
        self.cached_block: str | None = None
        self.cached: dict[str, torch.Tensor] = {}

    def block_of(self, name: str) -> str:
        prefix = self.arch.blocks + "."
        if not name.startswith(prefix):
            raise QuantkitError(f"quantized layer {name} is outside the decoder blocks ({self.arch.blocks})")
        return prefix + name[len(prefix):].split(".")[0]

    def weight(self, name: str) -> torch.Tensor:
        """[out, in] fp32 float weight of quantized layer ``name``."""
        block = self.block_of(name)
        if block != self.cached_block:
            self.cached, self.cached_block = self._load_block(block), block
        return self.cached[name]

    def _load_block(self, prefix: str) -> dict[str, torch.Tensor]:
        from quantkit.algorithms import awq, smoothquant
        from quantkit.model.checkpoint import materialize, release

        block = self.skeleton.get_submodule(prefix)
        materialize(block, prefix, self.checkpoint, torch.float32)
        config, offset = self.checkpoint.text_config, self.arch.norm_offset
        try:
            with torch.no_grad():
                smoothquant.replay(block, prefix, self.arch.smooth, self.results, config, offset)
                specs = {name: entry.scheme.weight for name, entry in self.manifest.layers.items()}
                awq.replay(block, prefix, self.arch.awq, self.results, config, offset, specs)
            wanted = [n for n in self.manifest.layers if n.startswith(prefix + ".")]
            return {n: block.get_submodule(n[len(prefix) + 1:]).weight.detach().float().clone() for n in wanted}
        finally:
            release(block)


# ----------------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------------

class _LayerProbe:
    """Forward hook on one QuantLinear: compares kernel, reference and float outputs on its input."""

    def __init__(self, name: str, kernel_layer, float_weight: Callable[[], torch.Tensor] | None):
        self.name = name
        self.kernel_layer = kernel_layer
        self.float_weight = float_weight
        self.kernel = _Sums()
        self.reference_float = _Sums()
        self.kernel_float = _Sums()
        self.weight_path = _Sums()

    def __call__(self, module: QuantLinear, args, output) -> None:
        x = args[0]
        reference = QuantLinear.forward(module, x.float())            # the pure-torch fp32 reference
        kernel = self.kernel_layer(x).float()
        self.kernel.add(reference, kernel)
        if self.float_weight is not None:
            bias = None if module.bias is None else module.bias.float()
            exact = F.linear(x.float(), self.float_weight().to(x.device), bias)
            self.reference_float.add(exact, reference)
            self.kernel_float.add(exact, kernel)
            self.weight_path.add(exact, F.linear(x.float(), module.dequantized_weight(), bias))


def expected_min_sqnr(entry, margin_db: float) -> tuple[float, str]:
    """The lowest acceptable output SQNR vs the float layer, and why: the calibration-time value minus
    the margin, or (nothing finite recorded) a floor of FLOOR_DB_PER_BIT per bit of the coarser grid."""
    recorded = entry.metrics.get("output_sqnr_db")
    if recorded is not None and math.isfinite(recorded):
        return recorded - margin_db, f"calibration recorded {recorded:.1f} dB - {margin_db:g} dB margin"
    bits = entry.scheme.weight.bits
    if entry.scheme.activation is not None:
        bits = min(bits, entry.scheme.activation.bits)
    return FLOOR_DB_PER_BIT * bits, f"{FLOOR_DB_PER_BIT:g} dB per bit of int{bits}"


def _judge(report: LayerReport, probe: _LayerProbe, entry, dtype: torch.dtype, margin_db: float,
           float_weight: torch.Tensor | None, layer: QuantLinear) -> None:
    rel_tol, sqnr_tol = KERNEL_TOLERANCE[dtype]
    report.kernel_max_rel_error, report.kernel_sqnr_db = probe.kernel.max_rel_error, probe.kernel.sqnr_db
    if not (report.kernel_max_rel_error <= rel_tol and report.kernel_sqnr_db >= sqnr_tol):
        report.problems.append(("kernel",
            f"kernel disagrees with the reference: max relative error {report.kernel_max_rel_error:.3g} "
            f"(tolerance {rel_tol:g}), SQNR {report.kernel_sqnr_db:.1f} dB (minimum {sqnr_tol:g} dB)"))
    report.recorded_output_sqnr_db = entry.metrics.get("output_sqnr_db")
    report.recorded_weight_sqnr_db = entry.metrics.get("weight_sqnr_db")
    if float_weight is None:
        return
    report.reference_float_sqnr_db = probe.reference_float.sqnr_db
    report.kernel_float_sqnr_db = probe.kernel_float.sqnr_db
    report.weight_path_sqnr_db = probe.weight_path.sqnr_db
    report.weight_sqnr_db = primitives.sqnr_db(float_weight, layer.dequantized_weight().cpu())
    expected, basis = expected_min_sqnr(entry, margin_db)
    report.expected_min_sqnr_db = expected
    weight_recorded = report.recorded_weight_sqnr_db
    if weight_recorded is not None and math.isfinite(weight_recorded) and \
            not report.weight_sqnr_db >= weight_recorded - WEIGHT_SQNR_SLACK_DB:
        report.problems.append(("weights", f"damaged or misread weights: stored weights are "
                                f"{report.weight_sqnr_db:.1f} dB from the float weights, calibration recorded "
                                f"{weight_recorded:.1f} dB"))
    elif not report.weight_path_sqnr_db >= expected:
        report.problems.append(("weights", f"damaged or misread weights: the weights alone give output SQNR "
                                f"{report.weight_path_sqnr_db:.1f} dB vs the float layer, expected >= "
                                f"{expected:.1f} dB ({basis})"))
    if not report.kernel_float_sqnr_db >= expected:
        cause = "" if report.problems else \
            f"; the weights alone give {report.weight_path_sqnr_db:.1f} dB, so activations fall outside the " \
            "calibrated range"
        report.problems.append(("output", f"output SQNR vs the float layer is {report.kernel_float_sqnr_db:.1f} dB, "
                                f"expected >= {expected:.1f} dB ({basis}){cause}"))


def _kl_top1(log_p_reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || model) per position and top-1 agreement; log_p_reference [T, V] log-probs."""
    log_q = F.log_softmax(logits.double(), dim=-1)
    log_p = log_p_reference.double()
    # each position's KL is >= 0; float rounding of two near-identical distributions may dip below
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0).mean().item()
    top1 = (log_p_reference.argmax(-1) == log_q.argmax(-1)).float().mean().item()
    return kl, top1


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits.reshape(-1, model.config.get_text_config().vocab_size).float()


def validate(config: ValidateConfig, on_stage: Callable[[str], None] | None = None) -> ValidationReport:
    """Validate the quantized model in ``config.path``; writes the report unless ``config.write`` is off."""
    from quantkit.cuda import (
        KernelLinear,
        describe_backend,
        kernel_modules,
        resolve_backend,
    )
    from quantkit.model.checkpoint import Checkpoint
    from quantkit.native.loader import load_quantized, load_search_results, open_native

    stage = on_stage or (lambda name: None)
    start = time.perf_counter()
    path = Path(config.path)
    _, manifest = open_native(path)
    if not manifest.layers:
        raise QuantkitError(f"{path} has no quantized layers to validate")
    device = _device(config.device)
    dtype = _dtype(config.dtype, device, manifest.storage_dtype)
    backend = resolve_backend(config.backend, device)

    stage("load")
    model = load_quantized(path, dtype=dtype, device=device)
    files = Checkpoint(path)
    num_samples, seq_len = _sample_shape(config, manifest, files.text_config)
    tokens, activations = activation_tokens(manifest, files.tokenizer(), files.text_config.vocab_size, num_samples, seq_len)
    tokens = tokens.to(device)
    source, source_problem = _source_checkpoint(manifest)
    float_weights = FloatWeights(source, manifest, load_search_results(path, manifest)) if source else None
    if source_problem:
        log.warning("no float reference: %s", source_problem)

    stage("prepare kernels")
    modules = {name: model.get_submodule(name) for name in manifest.layers}
    kernel_layers = {name: KernelLinear(module, name, backend) for name, module in modules.items()}
    probes = {name: _LayerProbe(name, kernel_layers[name],
                                None if float_weights is None else (lambda n=name: float_weights.weight(n)))
              for name in modules}

    stage("layers")
    with forward_hooks(modules, lambda name: probes[name]), torch.inference_mode():
        reference_logits = _logits(model, tokens)
    layers = {}
    for name, module in modules.items():
        entry = manifest.layers[name]
        kernel_kind = "weight-only" if module.activation_spec is None else "int8"
        report = LayerReport(name, entry.scheme.name, kernel_kind, tuple(entry.shape))
        weight = float_weights.weight(name) if float_weights is not None else None
        _judge(report, probes[name], entry, dtype, config.sqnr_margin_db, weight, module)
        layers[name] = report

    stage("end to end")
    with torch.inference_mode(), kernel_modules(model, backend, prepared=kernel_layers):
        kernel_logits = _logits(model, tokens)
    end_to_end = _end_to_end(source, dtype, device, tokens, reference_logits, kernel_logits)
    report = ValidationReport(
        path=str(path.resolve()), backend=backend, backend_description=describe_backend(backend, device),
        device=str(device), dtype=str(dtype).removeprefix("torch."), activations=activations,
        float_reference="source checkpoint with the recorded block transforms replayed" if source else
        f"unavailable: {source_problem}; damaged weights cannot be detected, only kernel agreement is checked",
        tolerances={"kernel_max_rel_error": KERNEL_TOLERANCE[dtype][0],
                    "kernel_min_sqnr_db": KERNEL_TOLERANCE[dtype][1],
                    "sqnr_margin_db": config.sqnr_margin_db, "weight_sqnr_slack_db": WEIGHT_SQNR_SLACK_DB},
        layers=layers, end_to_end=end_to_end, seconds=time.perf_counter() - start)
    if config.write:
        stage("write")
        write_report(path, report)
    return report


def _end_to_end(source, dtype, device, tokens, reference_logits, kernel_logits) -> dict:
    # Kernel vs reference model: equal functions in exact arithmetic, but a rounding-level difference can
    # flip a code at a quantization tie and grow over the layers, so this is reported, not judged.
    kl, top1 = _kl_top1(F.log_softmax(reference_logits, dim=-1), kernel_logits)
    result = {"tokens": int(tokens.numel()), "kernel_vs_reference_kl_divergence": kl,
              "kernel_vs_reference_top1_agreement": top1,
              "kernel_vs_reference_max_abs_logit_diff": (kernel_logits - reference_logits).abs().max().item()}
    if source is None:
        return result
    from transformers import AutoModelForCausalLM

    from quantkit.model.architectures import attention_implementation

    safetensors = any(f.suffix == ".safetensors" for f in source.files)
    float_model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype,
                                                       attn_implementation=attention_implementation(source.config),
                                                       use_safetensors=safetensors)
    with torch.inference_mode():
        log_p = F.log_softmax(_logits(float_model.to(device).eval(), tokens), dim=-1)
    del float_model
    result["kernel_kl_divergence"], result["kernel_top1_agreement"] = _kl_top1(log_p, kernel_logits)
    result["reference_kl_divergence"], result["reference_top1_agreement"] = _kl_top1(log_p, reference_logits)
    return result


def write_report(directory: Path, report: ValidationReport) -> None:
    """validation.json, then the manifest's summary.validation (each replaced atomically); the rest of
    the manifest is kept exactly as read."""
    from quantkit.native.manifest import MANIFEST_NAME

    atomic_text(directory / REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    manifest_path = directory / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data.setdefault("summary", {})["validation"] = report.summary()
    atomic_text(manifest_path, json.dumps(data, indent=2) + "\n")
