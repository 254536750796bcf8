"""Weight-quantization algorithms, registered by name.

An algorithm declares which input statistics the hooked calibration pass must accumulate for its
layers (``statistics``), whether it needs the inputs recomputed after earlier layers of the block
are quantized (``sequential``, GPTQ's true-sequential order), and quantizes one weight matrix given
those statistics. It returns the `QuantTensor` and a dict of search results (tensors) that the
pipeline saves so a run can be audited or re-applied without recalibrating.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol, get_type_hints, runtime_checkable

import torch
from torch import nn

from quantkit.calibrate.stats import LayerStats
from quantkit.errors import QuantkitError
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


@dataclass
class LayerContext:
    """What an algorithm may use besides the weight: the layer's name, its input statistics, and
    algorithm options from the CLI or recipe."""

    name: str
    stats: LayerStats | None = None
    options: dict = field(default_factory=dict)
    # two-level grids (NVFP4): the global scale shared with the Linears a runtime fuses with this one
    global_scale: torch.Tensor | None = None


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
    no_clip: tuple[str, ...] = ()            # Linears the clip search skips (Architecture.no_clip)


class WeightAlgorithm(Protocol):
    statistics: frozenset[str]
    sequential: bool
    Options: type                            # frozen dataclass of its options (--algo-option, recipe options)

    def validate(self, spec: WeightSpec) -> None:
        """Raise QuantkitError, before any work, for a grid this algorithm cannot produce."""

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        ...



@runtime_checkable
class BlockTransform(Protocol):
    """An algorithm that also transforms the whole block (AWQ: scale and clip search) once per block,
    after smoothing and before its Linears are quantized. Its results are saved like search results."""

    def transform_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        ...


@dataclass
class RefineContext:
    """What a block-level refinement (SignRound) works on, after every Linear of the block is quantized.

    block holds QuantLinears with the initial codes (fp32 master copy); ``rounded_from[name]`` is the
    weight [out, in] fp32 the initial algorithm rounded to get them (GPTQ: the columns as its error
    feedback left them), ``inputs`` the block's calibration calls (the quantized model's hidden states)
    and ``targets`` the outputs the block should produce for them (the float model's), one per call."""

    prefix: str
    block: nn.Module
    assigned: dict                           # block-relative Linear name -> LayerAssignment (all of them)
    rounded_from: dict[str, torch.Tensor]
    inputs: list                             # BlockInput per calibration batch
    targets: list[torch.Tensor]              # [batch, seq, hidden] per call
    compute_dtype: torch.dtype
    seed: int = 0
    # progress of the optimisation: (steps done, steps planned, loss relative to the start)
    advance: Callable[[int, int, float], None] = lambda done, total, loss: None


@dataclass
class Refined:
    """A refinement's result: the new quantized weights and the block's loss before and after (mean
    squared error of its outputs against the targets over every calibration call).

    ``loss_after`` None: the new weights were chosen on single calls and their loss over the whole set is
    not measured yet; the pipeline measures it on the pass that propagates the block anyway, and keeps
    ``initial`` (the starting codes) instead where it is not below ``loss_before``."""

    weights: dict[str, QuantTensor]
    loss_before: float
    loss_after: float | None
    iterations: int                          # optimisation steps taken (early stopping may cut them)
    best_iteration: int                      # the step whose parameters were kept (0: the initial ones)
    initial: dict[str, QuantTensor] | None = None   # with loss_after None: the codes to fall back to


@runtime_checkable
class BlockRefinement(Protocol):
    """An algorithm that quantizes its Linears with an initial algorithm (its ``init``), then improves the
    whole block's codes together against the block's float outputs (SignRound)."""

    def initial(self, options: dict, spec: WeightSpec) -> tuple[str, dict]:
        """The initial algorithm and its options on grid ``spec``, from this algorithm's options."""

    def initialize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext
                   ) -> tuple[QuantTensor, dict, torch.Tensor]:
        """The initial quantization, its search results, and the weight its codes were rounded from."""

    def refine_block(self, context: RefineContext) -> Refined:
        ...


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
    from quantkit.algorithms import awq, gptq, hqq, imatrix, rtn, signround  # noqa: F401


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


def base_algorithm(name: str, options: dict, spec: WeightSpec) -> tuple[str, dict]:
    """The algorithm whose statistics, block transform and quantizer a Linear's assignment runs first on grid
    ``spec``: the algorithm itself, or a refinement's initial algorithm with its options."""
    algorithm = get_algorithm(name)
    if isinstance(algorithm, BlockRefinement):
        return algorithm.initial(options, spec)
    return name, options


def validate_grid(name: str, options: dict, spec: WeightSpec) -> None:
    """Raise QuantkitError, before any work, when the algorithm, or a refinement's initial algorithm, cannot
    produce ``spec``."""
    get_algorithm(name).validate(spec)
    base, _ = base_algorithm(name, options, spec)
    if base != name:
        get_algorithm(base).validate(spec)


def option(default, *, minimum=None, above=None, maximum=None, choices: tuple[str, ...] | None = None):
    """A typed algorithm option: its default and bounds (``minimum``/``maximum`` inclusive, ``above``
    exclusive), or for text options the ``choices`` it takes."""
    return field(default=default, metadata={"minimum": minimum, "above": above, "maximum": maximum,
                                            "choices": choices})


def parse_options(name: str, raw: dict):
    """The algorithm's frozen options dataclass from KEY=VALUE values (YAML scalars): unknown keys and
    values of the wrong type or out of range are a `QuantkitError` naming the option, before any work.
    Booleans are true/false only; integers refuse fractions and text; floats must be finite."""
    options_class = get_algorithm(name).Options
    known = [f.name for f in fields(options_class)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            listed = ", ".join(sorted(known)) or "none"
            raise QuantkitError(f"algorithm '{name}' has no option '{key}'; {hint}(its options: {listed})")
    hints = get_type_hints(options_class)
    values = {f.name: _typed(name, f, hints[f.name], raw[f.name]) for f in fields(options_class) if f.name in raw}
    return options_class(**values)


def check_options(name: str, options: dict) -> None:
    """Raise QuantkitError for any option the algorithm does not read or a value it cannot take."""
    parse_options(name, options)


def _typed(algorithm: str, spec, kind: type, value):
    what = f"algorithm '{algorithm}' option {spec.name}={value!r}"
    if kind is bool:
        if not isinstance(value, bool):
            raise QuantkitError(f"{what}: expected true or false")
        return value
    if kind is str:
        choices = spec.metadata.get("choices") or ()
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise QuantkitError(f"{what}: not one of {', '.join(choices)}{hint}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise QuantkitError(f"{what}: expected a whole number")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise QuantkitError(f"{what}: expected a finite number")
        value = float(value)
    minimum, above = spec.metadata.get("minimum"), spec.metadata.get("above")
    if minimum is not None and value < minimum:
        raise QuantkitError(f"{what}: must be at least {minimum}")
    if above is not None and value <= above:
        raise QuantkitError(f"{what}: must be greater than {above}")
    maximum = spec.metadata.get("maximum")
    if maximum is not None and value > maximum:
        raise QuantkitError(f"{what}: must be at most {maximum}")
    return value
