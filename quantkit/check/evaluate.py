"""Perplexity and next-token agreement, with the protocol stated alongside every number.

Protocol: the text is tokenized once without special tokens, cut into non-overlapping windows of
``seq_len`` tokens (the remainder is dropped; at most ``max_windows`` windows from the start), and
each window is scored independently: ppl = exp(mean over windows and positions 1..L-1 of
-log p(token_t | tokens_<t)). KL is KL(reference || model) per predicted position, averaged; top-1
agreement is the share of positions where both models' most likely next token is the same.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError

DEFAULT_TEXT = "alice_in_wonderland.txt"


@dataclass(frozen=True)
class EvalProtocol:
    source: str
    seq_len: int
    windows: int
    predicted_tokens: int
    dtype: str

    def describe(self) -> str:
        return (f"{self.windows} non-overlapping windows x {self.seq_len} tokens of {self.source} "
                f"({self.predicted_tokens} predicted tokens, no BOS, {self.dtype})")

    def to_dict(self) -> dict:
        return asdict(self)


def default_text() -> tuple[str, str]:
    """(name, text) of the bundled evaluation text: Alice's Adventures in Wonderland (public domain)."""
    return DEFAULT_TEXT, resources.files("quantkit.data").joinpath(DEFAULT_TEXT).read_text(encoding="utf-8")


def read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise QuantkitError(f"cannot read {path}: {error}") from None


def eval_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """[W, seq_len] int64 windows of the tokenized text."""
    if seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise QuantkitError(f"--max-windows must be at least 1, got {max_windows}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise QuantkitError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).reshape(count, seq_len)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits[:, :-1].float()


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> float:
    """exp(mean next-token negative log-likelihood) over all windows."""
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        logits = _logits(model, batch)
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@dataclass
class Comparison:
    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float


@torch.inference_mode()
def compare(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> Comparison:
    """Perplexity of both models and the mean KL(reference || model) and top-1 agreement."""
    nll = ref_nll = kl = 0.0
    agree = tokens = 0
    for batch in windows.split(batch_size):
        targets = batch[:, 1:].reshape(-1)
        log_p = F.log_softmax(_logits(model, batch), dim=-1).flatten(0, 1)
        log_q = F.log_softmax(_logits(reference, batch), dim=-1).flatten(0, 1)
        nll -= log_p.gather(1, targets[:, None]).sum().item()
        ref_nll -= log_q.gather(1, targets[:, None]).sum().item()
        kl += (log_q.exp() * (log_q - log_p)).sum().item()
        agree += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
        tokens += targets.numel()
    return Comparison(math.exp(nll / tokens), math.exp(ref_nll / tokens), kl / tokens, agree / tokens)


@dataclass
class EvalConfig:
    target: str                          # a quantkit output directory, or any model (alias, path, hub id)
    reference: str | None = None         # compare against this model; None: the manifest's source
    compare_reference: bool = True
    text: Path | None = None             # default: the bundled English text
    dataset: str | None = None           # or calibration-style data (gsm8k, a .jsonl, ...)
    data_files: tuple[str, ...] = ()
    text_column: str = "text"
    seq_len: int = 512
    max_windows: int | None = 16
    batch_size: int = 2
    dtype: str = "float32"


@dataclass
class EvalRow:
    label: str
    model: str
    perplexity: float
    kl_divergence: float | None = None
    top1_agreement: float | None = None


@dataclass
class EvalReport:
    protocol: EvalProtocol
    rows: list[EvalRow]

    def to_dict(self) -> dict:
        return {"protocol": self.protocol.to_dict(), "protocol_text": self.protocol.describe(),
                "rows": [asdict(row) for row in self.rows]}


def load_model(name: str, dtype: torch.dtype) -> tuple[nn.Module, object, str, Path]:
    """(model, tokenizer, kind, path) for a quantkit output directory or a float checkpoint. Every
    weight the model has must come from the files: a missing or unexpected tensor is an error, never
    a randomly initialised layer that would be scored."""
    from quantkit.model.checkpoint import (
        Checkpoint,
        check_weights,
        expected_tensors,
        resolve_model,
    )
    from quantkit.native.loader import check_manifest_present, load_quantized
    from quantkit.native.manifest import MANIFEST_NAME

    path = Path(name)
    if (path / MANIFEST_NAME).is_file():
        return load_quantized(path, dtype=dtype), Checkpoint(path).tokenizer(), "quantized", path
    source = resolve_model(name)
    checkpoint = Checkpoint(source.path)
    check_manifest_present(checkpoint)
    if getattr(checkpoint.config, "quantization_config", None) is None:
        check_weights(source.path, checkpoint.shapes(), expected_tensors(checkpoint.config))
    from transformers import AutoModelForCausalLM

    from quantkit.model.architectures import attention_implementation

    model, info = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=dtype, attn_implementation=attention_implementation(checkpoint.config), output_loading_info=True,
        use_safetensors=any(f.suffix == ".safetensors" for f in checkpoint.files))
    for kind, what in (("missing_keys", "no tensor for"), ("unexpected_keys", "an unused tensor"),
                       ("mismatched_keys", "a tensor of the wrong shape:")):
        names = sorted(str(n) for n in info.get(kind) or ())
        if names:
            raise QuantkitError(f"{source.path} has {what} {names[0]}" +
                                (f" (and {len(names) - 1} more)" if len(names) > 1 else "") + " as transformers loads it")
    return model.eval(), checkpoint.tokenizer(), "float", source.path


def _check_vocabulary(windows: torch.Tensor, tokenizer, model: nn.Module) -> None:
    from quantkit.calibrate.datasets import check_token_range

    check_token_range(windows, tokenizer, model.get_input_embeddings().num_embeddings)


def _eval_text(config: EvalConfig) -> tuple[str, str]:
    if config.text is not None:
        return Path(config.text).name, read_text(config.text)
    if config.dataset is not None:
        from quantkit.calibrate.datasets import DatasetSpec, load_documents

        documents = load_documents(DatasetSpec(config.dataset, tuple(config.data_files), config.text_column))
        return config.dataset, "\n\n".join(documents)
    return default_text()


def _reference_name(config: EvalConfig, target_path: Path, kind: str) -> str | None:
    if not config.compare_reference:
        return None
    if config.reference is not None:
        return config.reference
    if kind != "quantized":
        return None
    from quantkit.native.manifest import Manifest

    source = Manifest.load(target_path).source
    path = source.path
    return path if path and Path(path).is_dir() else source.requested


def run_eval(config: EvalConfig) -> EvalReport:
    """Perplexity of the target and, when a reference is known, of the reference with KL and top-1."""
    if config.batch_size < 1:
        raise QuantkitError(f"--batch-size must be at least 1, got {config.batch_size}")
    dtype = getattr(torch, config.dtype)
    model, tokenizer, kind, path = load_model(config.target, dtype)
    source_name, text = _eval_text(config)
    windows = eval_windows(tokenizer, text, config.seq_len, config.max_windows)
    _check_vocabulary(windows, tokenizer, model)
    protocol = EvalProtocol(source_name, config.seq_len, windows.shape[0], windows.shape[0] * (config.seq_len - 1),
                            config.dtype)
    reference_name = _reference_name(config, path, kind)
    if reference_name is None:
        return EvalReport(protocol, [EvalRow(kind, str(path), perplexity(model, windows, config.batch_size))])
    reference, _, _, reference_path = load_model(reference_name, dtype)
    _check_vocabulary(windows, tokenizer, reference)
    sizes = (model.get_output_embeddings().out_features, reference.get_output_embeddings().out_features)
    if sizes[0] != sizes[1]:
        raise QuantkitError(f"the reference {reference_path} predicts {sizes[1]} tokens, the model {sizes[0]}: "
                            "KL and agreement need the same vocabulary (use --no-reference)")
    result = compare(model, reference, windows, config.batch_size)
    return EvalReport(protocol, [
        EvalRow("reference", str(reference_path), result.reference_perplexity),
        EvalRow(kind, str(path), result.perplexity, result.kl_divergence, result.top1_agreement),
    ])
