"""``quantkit export FLOAT_CHECKPOINT --format gguf --target-size N``: each block Linear's GGUF type chosen under a
file size, the way ``calibrate --target-size`` chooses grids (`formats.knapsack`).

Per block Linear t (weights W [rows, n]) and candidate type c that fits its rows (K-quants: n a multiple of 256;
the 32-value types: of 32), with W_c the weights llama.cpp's quantizer of c gives (its importance-weighted search
when an importance matrix is given, as the written file holds them):

    error(t, c) = sum_ij imp_j (W - W_c)_ij^2        imp_j = the importance matrix's E[x_j^2], else 1

(the layer output error under a diagonal input covariance), or, given measured sensitivities (`quantkit export
--target-size --dataset`: `run.allocate`'s block kind on calibration data, relative to the residual stream, what
`calibrate --target-bits` chooses with), those; and cost(t, c) = its data bytes padded to the file's alignment. The file's other tensors keep the types ``--type`` gives them (F16 without one); the header's size
does not depend on the choice (type names of 4 characters, fixed-width tensor infos), so the budget for the
Linears is exact: target - header - the other tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, kquants
from quantkit.formats.ggml_blocks import requantize

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# The header's size must not depend on the choice: the file's metadata names each tensor's type
assert len({len(name) for name in CANDIDATES}) == 1, CANDIDATES
ALIGNMENT = 32      # GGUF's default general.alignment: every tensor's data starts on it


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def parse_candidates(text: str | None) -> tuple[str, ...]:
    if text is None:
        return CANDIDATES
    names = tuple(t.strip().upper() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise QuantkitError(f"unknown GGUF candidate type '{unknown[0] if unknown else text}' "
                            f"(choose from {', '.join(CANDIDATES)})")
    return names


def fits(ggml_type: str, row_length: int) -> bool:
    block = kquants.SUPER if ggml_type in kquants.K_FORMATS else ggml_blocks.BLOCK
    return row_length % block == 0


def type_bytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Data bytes of a [rows, n] tensor in a block type."""
    count = shape[0] * shape[-1]
    if ggml_type in kquants.K_FORMATS:
        return count // kquants.SUPER * kquants.K_FORMATS[ggml_type].type_size
    return count // ggml_blocks.BLOCK * ggml_blocks.FORMATS[ggml_type].type_size


@dataclass
class TypeChoice:
    """One tensor's measurements: per candidate (None where it does not fit) its aligned bytes and error."""

    name: str
    costs: dict[str, int]
    errors: dict[str, float]


def measure(name: str, weight: torch.Tensor, candidates: tuple[str, ...], importance: torch.Tensor | None
            ) -> TypeChoice:
    """weight [rows, n] float32 -> its cost and error on every candidate that fits."""
    costs, errors = {}, {}
    scale = torch.ones(weight.shape[1]) if importance is None else importance.float()
    for ggml_type in candidates:
        if not fits(ggml_type, weight.shape[1]):
            continue
        approx = requantize(weight, ggml_type, importance).dequantize().float()
        costs[ggml_type] = aligned(type_bytes(ggml_type, tuple(weight.shape)))
        errors[ggml_type] = float((((weight - approx) ** 2) * scale[None, :]).sum())
        if not math.isfinite(errors[ggml_type]):
            raise QuantkitError(f"{name} has NaN/Inf weights (or importance values): no type can be chosen for it")
    if not costs:
        raise QuantkitError(f"no candidate GGUF type fits {name} (rows of {weight.shape[1]} values)")
    return TypeChoice(name, costs, errors)


def measured(name: str, shape: tuple[int, ...], candidates: tuple[str, ...], losses: dict[str, float | None]
             ) -> TypeChoice:
    """A tensor's costs on every candidate that fits, its errors the measured ``losses`` (GGUF type -> loss, None
    where the type was not measured)."""
    costs, errors = {}, {}
    for ggml_type in candidates:
        if fits(ggml_type, shape[-1]) and losses.get(ggml_type) is not None:
            costs[ggml_type] = aligned(type_bytes(ggml_type, shape))
            errors[ggml_type] = float(losses[ggml_type])
    if not costs:
        raise QuantkitError(f"no candidate GGUF type fits {name} (rows of {shape[-1]} values)")
    return TypeChoice(name, costs, errors)
