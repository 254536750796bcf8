"""Hooks that always come off, and the one place that captures decoder block 0's inputs."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.calibrate.stats import LayerStats
from quantkit.errors import QuantkitError
from quantkit.formats.primitives import all_finite


@contextmanager
def forward_hooks(modules: Mapping[str, nn.Module], make_hook: Callable[[str], Callable], *, pre: bool = False,
                  with_kwargs: bool = False) -> Iterator[None]:
    """Register ``make_hook(name)`` on every module, as a forward hook ``(module, args, output)`` or,
    with ``pre``, a forward pre-hook ``(module, args)`` (``(module, args, kwargs)`` with
    ``with_kwargs``); all are removed on exit, also when the body raises. The one place hooks are
    registered."""
    handles = []
    try:
        for name, module in modules.items():
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(make_hook(name), with_kwargs=with_kwargs) if with_kwargs else register(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class NonFiniteActivation(QuantkitError):
    pass


class ObservationComplete(Exception):
    """Raised by `observe_inputs(stop_when_done=True)` once every observed module ran in a forward:
    the rest of the forward is not needed for the statistics."""


@contextmanager
def observe_inputs(modules: Mapping[str, nn.Module], kinds: frozenset[str] | Mapping[str, frozenset[str]],
                   label: Callable[[str], str] = str, stop_when_done: bool = False) -> Iterator[dict[str, LayerStats]]:
    """Keep running statistics of each module's first input while the body runs forwards.

    ``kinds`` names the statistics (see stats.STATISTICS), for all modules or per module.
    Yields {name: LayerStats}. A batch whose input holds NaN or Inf stops the run with an error
    naming the layer (``label(name)`` gives its full name). With ``stop_when_done`` the forward is cut
    short by `ObservationComplete` as soon as every module has seen its input.
    """
    per_module = kinds if isinstance(kinds, Mapping) else dict.fromkeys(modules, kinds)
    stats = {name: LayerStats(per_module[name]) for name in modules}
    seen: set[str] = set()
    last: dict = {"input": lambda: None, "shared": {}}  # the latest input (weakly) and its contributions

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0]
            if last["input"]() is not x:
                if not all_finite(x):
                    raise NonFiniteActivation(f"NaN/Inf in the input activations of {label(name)}")
                last["input"], last["shared"] = weakref.ref(x), {}
            stats[name].update(x, last["shared"])
            seen.add(name)
            if stop_when_done and len(seen) == len(stats):
                seen.clear()
                raise ObservationComplete
        return hook

    with forward_hooks(modules, make_hook):
        yield stats


class OffloadedHidden:
    """Hidden states kept in a safetensors file and read back on every use (--offload-activations)."""

    def __init__(self, path: Path, hidden: torch.Tensor | None = None):
        self.path = Path(path)
        if hidden is not None:
            save_file({"hidden": hidden.contiguous()}, str(self.path))

    def load(self) -> torch.Tensor:
        return load_file(str(self.path))["hidden"]


@dataclass
class BlockInput:
    """One batch's call of a decoder block: its hidden states (in memory, or offloaded to disk) and
    the model's other arguments (attention mask, rotary embeddings, position ids) as the model passed them."""

    hidden: torch.Tensor | OffloadedHidden
    kwargs: dict
    first_sample: int = 0      # index of the batch's first sample in the whole calibration set

    def tensor(self) -> torch.Tensor:
        return self.hidden.load() if isinstance(self.hidden, OffloadedHidden) else self.hidden

    def head(self, count: int) -> "BlockInput":
        """The call restricted to its first ``count`` samples: the hidden states and every argument
        whose leading dimension is the batch (rotary tables, masks) are sliced."""
        hidden = self.tensor()
        batch = hidden.shape[0]
        if count >= batch:
            return self

        def cut(value):
            if torch.is_tensor(value):
                return value[:count] if value.dim() > 0 and value.shape[0] == batch else value
            if isinstance(value, (tuple, list)):
                return type(value)(cut(v) for v in value)
            return value

        return BlockInput(hidden[:count], {k: cut(v) for k, v in self.kwargs.items()}, self.first_sample)


class _LastBlockReached(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder block while the model's forward runs: keeps the block's arguments and
    returns its hidden states unchanged, so the forward goes on to the next block without computing
    anything. Attributes the model reads off its blocks (Qwen2's ``attention_type``) come from the
    block it replaces."""

    def __init__(self, block: nn.Module, index: int, last: bool, calls: list):
        super().__init__()
        self.__dict__["_block"] = block
        self.index, self.last, self.calls = index, last, calls

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args, **kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((self.index, hidden.detach(), kwargs))
        if self.last:
            raise _LastBlockReached
        return hidden


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[torch.Tensor],
                         first_samples: Iterable[int] | None = None) -> tuple[list[BlockInput], list[list[dict]]]:
    """Run the model on each batch [B, L] of token ids with every decoder block stood in for by a
    recorder, and keep block 0's inputs plus every block's keyword arguments ([batch][block]): models
    with several layer types pass each its own mask and rotary table (Gemma's sliding and full
    attention), the rest the same objects to all. Works for any architecture: the model computes masks
    and rotary embeddings itself; no block is computed (they may be unloaded).
    ``first_samples`` gives each batch's first sample index (default: consecutive batches)."""
    batches = list(batches)
    originals = list(blocks)
    captured: list[BlockInput] = []
    block_kwargs: list[list[dict]] = []
    for batch in batches:
        calls: list = []
        for index, block in enumerate(originals):
            blocks[index] = _Recorder(block, index, index == len(originals) - 1, calls)
        try:
            model(input_ids=batch, use_cache=False)
        except _LastBlockReached:
            pass
        finally:
            for index, block in enumerate(originals):
                blocks[index] = block
        if [index for index, _, _ in calls] != list(range(len(originals))):
            raise RuntimeError("the model did not call its decoder blocks once each, in order")
        captured.append(BlockInput(calls[0][1], calls[0][2]))
        block_kwargs.append([kwargs for _, _, kwargs in calls])
    starts = list(first_samples) if first_samples is not None else [sum(b.shape[0] for b in batches[:i]) for i in range(len(batches))]
    for call, start in zip(captured, starts):
        call.first_sample = start
    return captured, block_kwargs


def run_block(block: nn.Module, call: BlockInput) -> torch.Tensor:
    """The block's output hidden states for one captured call."""
    out = block(call.tensor(), **call.kwargs)
    return out[0] if isinstance(out, tuple) else out
