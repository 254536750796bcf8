"""Which layer gets which scheme and algorithm: one default for every block Linear, or a recipe.

A `LayerAssignment` records what a layer gets and why (``rule``), and is written to the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from quantkit.schemes import Scheme


@dataclass(frozen=True)
class LayerAssignment:
    scheme: Scheme
    algorithm: str
    rule: str                                  # which CLI option or recipe rule chose this
    options: dict = field(default_factory=dict, hash=False, compare=False)


def uniform_plan(layer_names: list[str], assignment: LayerAssignment) -> dict[str, LayerAssignment | None]:
    """Every layer gets the same assignment."""
    return {name: assignment for name in layer_names}
