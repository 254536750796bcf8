"""The final norm's gain fitted to the float model's next-token distributions, once every block is quantized.

The quantized blocks leave the last hidden states h_q off the float model's h_f, and part of what reaches the
logits is a per-channel scale that the final RMSNorm's gain (kept in float by every export: GGUF's
output_norm, compressed-tensors' unquantized norm) can take back. With g0 the source's effective gain
(offset + w: 1 + w in Gemma-style norms) and p [hidden] learned from 0:

    minimize  mean_t KL( softmax(head(h_f,t ; g0)) || softmax(head(h_q,t ; g0 * (1 + p))) )

over the calibration tokens (both streams are the pipeline's: the float stream is SignRound's target; at most
FIT_TOKENS of them, a seeded sample), with Adam on random batches of tokens and bf16 matrix products (the
vocabulary-wide product and softmax are the cost). The fit is kept only where it lowers the KL, measured in
float32 on a fixed subset of the tokens; the stored weight is g0 * (1 + p) - offset.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from quantkit.model.head import OutputHead

STEPS = 60
TOKENS_PER_STEP = 256
LEARNING_RATE = 3e-3
MEASURED_TOKENS = 2048
FIT_TOKENS = 16384           # tokens the fit draws its batches and measured subset from (a seeded sample of them)


@dataclass(frozen=True)
class FinalNormFit:
    """The fitted norm weight [hidden] float32 (the source's where the fit did not help: ``kept`` False) and
    the mean KL(float || quantized) per token on the measured tokens before and after."""

    weight: torch.Tensor
    kl_before: float
    kl_after: float
    steps: int
    tokens: int
    kept: bool

    def to_dict(self) -> dict:
        return {"kl_before": round(self.kl_before, 6), "kl_after": round(self.kl_after, 6), "steps": self.steps,
                "tokens": self.tokens, "kept": self.kept}


def _kl(reference: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p || q) from log-probabilities [T, vocab]."""
    return (reference.exp() * (reference - log_probs)).sum(-1).mean()


def _measured_kls(head: OutputHead, quantized: torch.Tensor, floats: torch.Tensor, source: torch.Tensor,
                  fitted: torch.Tensor) -> tuple[float, float]:
    """Mean KL per token with the source and with the fitted norm weight, in float32, a chunk of tokens at a
    time (the float log-probabilities formed once per chunk for both)."""
    before = after = 0.0
    for start in range(0, len(quantized), TOKENS_PER_STEP):
        rows = slice(start, start + TOKENS_PER_STEP)
        reference, tokens = head.log_probs(floats[rows], source), len(quantized[rows])
        before += _kl(reference, head.log_probs(quantized[rows], source)).item() * tokens
        after += _kl(reference, head.log_probs(quantized[rows], fitted)).item() * tokens
    return before / len(quantized), after / len(quantized)


def sample_tokens(total: int, count: int, seed: int) -> list[int] | None:
    """The flat token indices (sorted) of a seeded sample of ``count`` of ``total`` tokens; None: all of them
    (no more than ``count``)."""
    if total <= count:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values.tolist()


def gather_tokens(hidden: Iterable[torch.Tensor], rows: list[int] | None, total: int) -> torch.Tensor:
    """The rows ``rows`` (flat token indices over the calls, sorted; None: all) of the calls' ``hidden``
    [..., H] (read one at a time: offloaded calls are loaded once), which hold ``total`` tokens, as one float32
    [tokens, H] tensor (a copy)."""
    flat, start, picked = [], 0, torch.tensor(rows if rows is not None else [], dtype=torch.long)
    for h in hidden:
        tokens = h.reshape(-1, h.shape[-1])
        if rows is None:
            flat.append(tokens.float().clone())
        else:
            inside = picked[(picked >= start) & (picked < start + len(tokens))] - start
            flat.append(tokens[inside].float())
        start += len(tokens)
    assert start == total, f"the calls hold {start} tokens, not the {total} the sample was drawn from"
    return torch.cat(flat)


def fit_final_norm(head: OutputHead, quantized: torch.Tensor, floats: torch.Tensor, offset: float,
                   steps: int = STEPS, seed: int = 0, storage: torch.dtype = torch.float32) -> FinalNormFit:
    """quantized, floats [T, hidden] float32: the last block's outputs on the quantized and the float streams
    (same tokens, same order); head: the final norm and LM head in float32; offset: the norm's (1.0 for Gemma);
    storage: the dtype the weight is written in (the KL after is measured on the stored values).
    Call outside inference mode. -> `FinalNormFit`."""
    source = head.norm.weight.detach().float()
    gain = source + offset
    generator = torch.Generator().manual_seed(seed)
    measured = torch.randperm(len(quantized), generator=generator)[:MEASURED_TOKENS]
    scale = torch.zeros_like(gain, requires_grad=True)
    optimizer = torch.optim.Adam([scale], lr=LEARNING_RATE)
    for param in head.lm_head.parameters():
        param.requires_grad_(False)
    for _ in range(steps):
        rows = torch.randint(0, len(quantized), (TOKENS_PER_STEP,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                reference = head.log_probs(floats[rows], source)
            loss = _kl(reference, head.log_probs(quantized[rows], gain * (1 + scale) - offset))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    fitted = (gain * (1 + scale.detach()) - offset).to(storage).to(source.dtype)
    with torch.no_grad():
        kl_before, kl_after = _measured_kls(head, quantized[measured], floats[measured], source, fitted)
    kept = kl_after < kl_before
    return FinalNormFit(fitted if kept else source, kl_before, kl_after, steps, len(quantized), kept)
