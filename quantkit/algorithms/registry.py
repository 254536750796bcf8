"""Weight-quantization algorithms, registered by name.

An algorithm declares which input statistics the hooked calibration pass must accumulate for its
layers (``statistics``), whether it needs the inputs recomputed after earlier layers of the block
are quantized (``sequential``, GPTQ's true-sequential order), and quantizes one weight matrix given
those statistics. It returns the `QuantTensor` and a dict of search results (tensors) that the
pipeline saves so a run can be audited or re-applied without recalibrating.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from quantkit.algorithms.quant_tensor import QuantTensor
from quantkit.calibrate.stats import LayerStats
from quantkit.errors import QuantkitError
from quantkit.schemes import WeightSpec


@dataclass
class LayerContext:
    """What an algorithm may use besides the weight: the layer's name, its input statistics, and
    algorithm options from the CLI or recipe."""

    name: str
    stats: LayerStats | None = None
    options: dict = field(default_factory=dict)


@dataclass
class BlockContext:
    """What a block-level transform (AWQ's scale and clip search) may use and change.

    block is the fp32 master copy; transforms fold exact rescalings into it and must rescale the
    statistics of every input they change (stats[name].scale_channels).
    """

    prefix: str
    block: nn.Module
    assigned: dict                           # block-relative Linear name -> LayerAssignment
    stats: dict[str, LayerStats]
    groups: tuple                            # the architecture's ScaleGroups for this transform
    model_config: object
    norm_offset: float
    first_samples: Callable[[int], list]     # the captured block inputs covering the first n samples
    runner: Callable[[], nn.Module]          # a copy of the block in the compute dtype
    sum_: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # in-place sum over distributed ranks


class WeightAlgorithm(Protocol):
    statistics: frozenset[str]
    sequential: bool
    options: frozenset[str]                  # the option names it reads (--algo-option, recipe options)

    def validate(self, spec: WeightSpec) -> None:
        """Raise QuantkitError, before any work, for a grid this algorithm cannot produce."""

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        ...

    # Optional: ``transform_block(context: BlockContext) -> dict[str, Tensor]`` runs once per block
    # after smoothing and before quantization (AWQ). Its results are saved like search results.


_REGISTRY: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        _REGISTRY[name] = cls
        cls.name = name
        if not hasattr(cls, "validate"):
            cls.validate = lambda self, spec: None
        return cls
    return decorator


def _load_builtin() -> None:
    # Importing the algorithm modules registers them; done on first use, not at import.
    from quantkit.algorithms import awq, gptq, hqq, rtn  # noqa: F401


def algorithm_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_algorithm(name: str) -> WeightAlgorithm:
    _load_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(_REGISTRY))}"
        raise QuantkitError(f"unknown algorithm '{name}'{hint}")
    return _REGISTRY[name]()


def check_options(name: str, options: dict) -> None:
    """Raise QuantkitError naming any option the algorithm does not read (a typo must not be ignored)."""
    known = get_algorithm(name).options
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            listed = ", ".join(sorted(known)) or "none"
            raise QuantkitError(f"algorithm '{name}' has no option '{key}'; {hint}(its options: {listed})")
