"""The budgeted choice of one format per tensor: a multiple-choice knapsack.

Minimise sum_i loss[i][c_i] subject to sum_i cost[i][c_i] <= budget, by dynamic programming over the budget in
units of ``unit`` bytes with each cost rounded up to whole units: a solution of the rounded problem is within the
true budget, and with unit 1 it is the exact optimum. O(items x options x budget / unit) time, one small
[budget / unit] choice table per item.
"""
from __future__ import annotations

import numpy as np

from quantkit.errors import QuantkitError

MAX_TABLE_BYTES = 2**30     # the DP's choice tables (int16 per item and cell)


def unit_for(budget: int, items: int) -> int:
    """Bytes per DP cell: at least 64 cells per item (so rounding every cost up wastes at most about 1/64 of
    the budget), at least 65536 cells, at most what MAX_TABLE_BYTES of choice tables hold."""
    cells = max(65536, 64 * items)
    cells = min(cells, max(1024, MAX_TABLE_BYTES // (2 * max(items, 1))))
    return max(1, budget // cells)


def solve(losses: list[list[float]], costs: list[list[int]], budget: int, unit: int = 1) -> list[int]:
    """The multiple-choice knapsack: one option per item minimising sum(losses[i][choice_i]) with
    sum(costs[i][choice_i]) <= budget. Costs and budget in bytes; dynamic programming over budget // unit
    cells, each cost rounded up to whole units (exact for unit 1). Ties prefer the cheaper option.
    Infeasible: `QuantkitError` naming the smallest size the options allow."""
    if not losses or len(losses) != len(costs):
        raise ValueError("one loss and cost list per item")
    if not all(np.isfinite(loss).all() for loss in losses):
        raise ValueError("losses must be finite")
    smallest = sum(min(c) for c in costs)
    cells = budget // unit
    if smallest > budget:
        raise QuantkitError(f"the target is below the smallest allocation the candidates allow "
                            f"({smallest} bytes against a budget of {budget}); lower-bit candidates or a larger target")
    if sum(-(-min(c) // unit) for c in costs) > cells:
        raise QuantkitError(f"the target is within {len(costs) * unit} bytes of the smallest allocation ({smallest} "
                            f"bytes against {budget}), finer than the solver's {unit}-byte steps; raise the target a little")
    best = np.zeros(cells + 1)                # best[b]: the least loss of the items so far within b units
    choices = []
    for item_losses, item_costs in zip(losses, costs):
        units = [-(-c // unit) for c in item_costs]
        new = np.full(cells + 1, np.inf)
        pick = np.full(cells + 1, -1, dtype=np.int16)
        for option in sorted(range(len(units)), key=lambda o: (item_costs[o], o)):
            if units[option] > cells:
                continue
            shifted = np.full(cells + 1, np.inf)
            shifted[units[option]:] = best[:cells + 1 - units[option]] + item_losses[option]
            better = shifted < new
            new[better], pick[better] = shifted[better], option
        best = new
        choices.append(pick)
    chosen, cell = [], int(np.argmin(best))
    for pick, item_costs in zip(reversed(choices), reversed(costs)):
        option = int(pick[cell])
        assert option >= 0, "a reachable cell has a choice"
        chosen.append(option)
        cell -= -(-item_costs[option] // unit)
    return chosen[::-1]
