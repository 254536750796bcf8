"""Size budgets for automatic mixed precision: candidate grids, exact stored sizes, and the budgeted choice.

A target is either bits per weight over the quantized Linears (``--target-bits``: every stored bit of their
codes, scales, zeros, global and super-block scales and act-order indices, divided by their weight count) or
the bytes of the whole output's weight files (``--target-size``: embeddings, norms and the safetensors headers
included). `formats.knapsack.solve` then picks one candidate per layer under the budget.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import ggml_mixes
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import SCHEMES, Scheme
from quantkit.native.writer import LinearRecord, record_tensors

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GRAINS = ("g32", "g64", "g128", "g256", "ch")   # the coarse grids fill the gaps between bit widths
_INT = re.compile(r"int(?P<bits>[2-8])(?:-g(?P<group>\d+)|-(?P<channel>ch))?(?:-(?P<sym>sym|asym))?")
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?i?B?)", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Candidate:
    """One grid a layer may get: a scheme name plus weight-grid overrides, as a recipe rule writes them."""

    label: str                     # int4-g64-asym, q4_k, ...
    scheme_name: str
    bits: int | None = None
    group_size: int | None = None  # -1: per channel
    symmetric: bool | None = None

    def scheme(self) -> Scheme:
        from quantkit.run.recipe import make_scheme

        return make_scheme(self.scheme_name, self.bits, self.group_size, self.symmetric)

    def rule(self) -> dict:
        """The recipe keys of this candidate (scheme and overrides)."""
        rule = {"scheme": self.scheme_name}
        for key in ("bits", "group_size", "symmetric"):
            if getattr(self, key) is not None:
                rule[key] = getattr(self, key)
        return rule


def parse_candidates(text: str | None, base: str, symmetric: bool | None) -> list[Candidate]:
    """``--candidates``: comma-separated ``intB[-gG|-ch][-sym|-asym]`` (integer grids on the weight-only scheme
    ``base``) or scheme names (``q4_k``, ``nvfp4a16``, ``w8a16`` ...). None: integer 2/3/4/5/6/8 bits at groups
    32/64/128/256 and per channel with the base's symmetry (or ``symmetric``)."""
    base_scheme = SCHEMES.get(base)
    if base_scheme is None or base_scheme.activation is not None or base_scheme.weight.element.kind != "int" \
            or base_scheme.weight.super_group is not None:
        raise QuantkitError(f"--target-bits/--target-size need a weight-only integer --scheme for the integer "
                            f"candidates (w4a16, w8a16), not {base}")
    if text is None:
        tokens = [f"int{b}-{grain}" for b in DEFAULT_BITS for grain in DEFAULT_GRAINS]
    else:
        tokens = [t.strip() for t in text.split(",") if t.strip()]
        if not tokens:
            raise QuantkitError("--candidates is empty")
    candidates = [_candidate(token, base, symmetric) for token in tokens]
    labels = [c.label for c in candidates]
    duplicate = next((label for label in labels if labels.count(label) > 1), None)
    if duplicate:
        raise QuantkitError(f"--candidates names {duplicate} twice")
    return candidates


def _candidate(token: str, base: str, symmetric: bool | None) -> Candidate:
    match = _INT.fullmatch(token)
    if match:
        group = -1 if match["channel"] else int(match["group"] or 128)
        if group == 0:
            raise QuantkitError(f"candidate {token}: the group size must be positive")
        sym = {"sym": True, "asym": False}.get(match["sym"] or "", symmetric)
        sym = SCHEMES[base].weight.symmetric if sym is None else sym
        grain = "ch" if group == -1 else f"g{group}"
        candidate = Candidate(f"int{match['bits']}-{grain}-{'sym' if sym else 'asym'}", base, int(match["bits"]),
                              group, sym)
    elif token in SCHEMES and ggml_mixes.scheme_file_type(token) is None:
        candidate = Candidate(token, token)
    else:
        close = difflib.get_close_matches(token, [*SCHEMES, "int4-g64", "int4-g128-sym", "int8-ch"], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise QuantkitError(f"unknown candidate '{token}' (intB[-gG|-ch][-sym|-asym] with B in 2..8, or a weight "
                            f"scheme from `quantkit schemes`; llama.cpp file types are not candidates){hint}")
    candidate.scheme()   # bad combinations (a grid that does not exist) stop here
    return candidate


def parse_size(text: str) -> int:
    """'3.2GB' (10^9), '80MiB' (2^20), '123456' (bytes) -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    unit = (match["unit"] or "").upper() if match else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if match is None or unit not in _UNITS:
        raise QuantkitError(f"--target-size '{text}' is not a size; give e.g. 3.2GB, 800MiB or a byte count")
    return int(float(match["number"]) * _UNITS[unit])


def stored_tensors(name: str, quant: QuantTensor) -> dict[str, torch.Tensor]:
    """The tensors the native files hold for Linear ``name``'s quantized weight: codes (packed as stored),
    scales, zeros, global and super-block scales, act-order indices (`native.writer.record_tensors`; no bias)."""
    return record_tensors(name, LinearRecord(quant))


def stored_bytes(quant: QuantTensor) -> int:
    """The data bytes of `stored_tensors`."""
    return sum(t.numel() * t.element_size() for t in stored_tensors("w", quant).values())


# A safetensors file: 8 bytes of header length, the JSON header (with quantkit's writer's metadata entry), padded
# with spaces to a multiple of 8 bytes.
FILE_OVERHEAD = 8 + len('{"__metadata__":{"format":"pt"},}') + 7
_ENTRY = len('"":{"dtype":"F8_E8M0","shape":[],"data_offsets":[,]},')   # the longest dtype name quantkit writes


def header_entry_bound(name: str, shape: tuple[int, ...], offset_digits: int) -> int:
    """An upper bound of one tensor's entry in a safetensors header: its name, the longest dtype name, its
    shape and two offsets of at most ``offset_digits`` digits."""
    return len(json.dumps(name)) - 2 + _ENTRY + len(",".join(str(s) for s in shape)) + 2 * offset_digits


def file_bytes_bound(tensors: dict[str, torch.Tensor], offset_digits: int) -> int:
    """What ``tensors`` add to a safetensors file at most: their data and their header entries."""
    return sum(t.numel() * t.element_size() + header_entry_bound(name, tuple(t.shape), offset_digits)
               for name, t in tensors.items())
