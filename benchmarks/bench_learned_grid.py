"""SignRound's grid cost per step: `LearnedGrid.weight` (bf16) and its backward on one SmolLM2 block's seven Linears
(q, k, v, o, gate, up, down), learned ranges, int4 symmetric, with whole or ragged groups (576 = 4.5 x 128).

    python benchmarks/bench_learned_grid.py [--group-size 128] [--reps 20] [--rounds 7]

Prints ms per step of the group rounding (`_GroupRounding`, ragged last groups padded) against the expanded
[out, in] path (`_Rounding` on scales gathered by index), in the same process on the same grids, in
alternating rounds, and the median ratio.
"""
import argparse
import time

import torch

from quantkit.algorithms.rtn import quantize_rtn
from quantkit.algorithms.signround import LearnedGrid
from quantkit.formats.schemes import WeightSpec

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def per_step(grids: list[LearnedGrid], grouped: bool, reps: int) -> float:
    saved = [grid.grouped for grid in grids]
    for grid in grids:
        grid.grouped = grouped and grid.grouped
    for _ in range(3):          # warm-up
        for grid in grids:
            grid.weight(torch.bfloat16).float().sum().backward()
    start = time.perf_counter()
    for _ in range(reps):
        for grid in grids:
            grid.weight(torch.bfloat16).float().sum().backward()
    for grid, value in zip(grids, saved):
        grid.grouped = value
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    spec = WeightSpec(4, "group", True, args.group_size)
    grids = []
    for shape in SHAPES:
        weight = torch.randn(*shape, generator=generator) * 0.05
        grids.append(LearnedGrid(quantize_rtn(weight, spec), weight, learn_range=True))
    rounds = [(per_step(grids, True, args.reps), per_step(grids, False, args.reps)) for _ in range(args.rounds)]
    for grouped, expanded in rounds:      # alternating, so a drifting machine weighs on both alike
        print(f"g{args.group_size}: group rounding {grouped:.1f} ms/step, expanded [out, in] {expanded:.1f} ms/step")
    ratios = sorted(grouped / expanded for grouped, expanded in rounds)
    print(f"g{args.group_size}: median ratio group / expanded {ratios[len(ratios) // 2]:.2f} over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
