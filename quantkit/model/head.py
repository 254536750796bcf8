"""What reads the last decoder block's output: the final norm, the LM head and the logit soft-capping some
families apply, loaded on their own (the sensitivity pass measures the last block's Linears at the logits
without the rest of the model in memory)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from quantkit.model.architectures import Architecture
from quantkit.model.checkpoint import Checkpoint, materialize


@dataclass
class OutputHead:
    """The final norm and LM head (modules in float32) and the logit soft-capping cap * tanh(logits / cap)
    (Gemma 2's final_logit_softcapping; None: none)."""

    norm: nn.Module
    lm_head: nn.Module
    softcap: float | None = None

    def log_probs(self, hidden: torch.Tensor, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., hidden_size] -> next-token log-probabilities [..., vocab] float32; ``norm_weight``
        [hidden_size] stands in for the final norm's weight (the module is not changed)."""
        normed = self.norm(hidden.float()) if norm_weight is None else \
            functional_call(self.norm, {"weight": norm_weight}, (hidden.float(),))
        logits = self.lm_head(normed).float()
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits.log_softmax(-1)


def load_output_head(skeleton: nn.Module, arch: Architecture, checkpoint: Checkpoint) -> OutputHead:
    """The head of ``skeleton`` (the model built on the meta device), loaded in float32 into copies of its
    modules (the skeleton is not changed); a tied LM head takes the embeddings' weight."""
    tied = {f"{arch.lm_head}.weight": f"{arch.embeddings}.weight"}
    modules = []
    for name in (arch.final_norm, arch.lm_head):
        module = copy.deepcopy(skeleton.get_submodule(name))
        materialize(module, name, checkpoint, torch.float32, tied)
        modules.append(module)
    softcap = getattr(checkpoint.text_config, "final_logit_softcapping", None)
    return OutputHead(*modules, float(softcap) if softcap else None)
