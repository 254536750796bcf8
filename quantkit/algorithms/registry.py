"""Weight-quantization algorithms, registered by name.

An algorithm declares which input statistics the hooked calibration pass must accumulate for its
layers (``statistics``), whether it needs the inputs recomputed after earlier layers of the block
are quantized (``sequential``, GPTQ's true-sequential order), and quantizes one weight matrix given
those statistics. It returns the `QuantTensor` and a dict of search results (tensors) that the
pipeline saves so a run can be audited or re-applied without recalibrating.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Protocol

import torch

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


class WeightAlgorithm(Protocol):
    statistics: frozenset[str]
    sequential: bool

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        ...


_REGISTRY: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return decorator


def _load_builtin() -> None:
    # Importing the algorithm modules registers them; done lazily to keep imports side-effect free.
    from quantkit.algorithms import rtn  # noqa: F401
    for module in ("gptq", "hqq", "awq"):
        try:
            __import__(f"quantkit.algorithms.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"quantkit.algorithms.{module}":
                raise


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
