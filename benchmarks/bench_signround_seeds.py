"""How far SignRound's result moves with the order of its steps alone, for quantkit and AutoRound, on the same
calibration token ids (the protocol of `common.py`): the spread a same-run comparison of the two tools sits in.

usage: cd benchmarks && HF_HUB_OFFLINE=1 python bench_signround_seeds.py [--grid "int4 g64 sym"]
        [--variant "signround imatrix 80"] [--offsets 0 1 2] [--peer-python PY] [--autoround-seeds 42 1]
        [--autoround-iters 200]

quantkit's step order is seeded by the run's `--seed`, which also shuffles the calibration documents; to move the
order alone, offset N != 0 runs `quantkit calibrate` in a process whose SignRound trainer adds N to that seed
(a patch of `_Trainer.__init__` in the launched process only, below), so the tokens stay the protocol's.
AutoRound's `seed` (default 42) seeds its sample order on the very same ids (`peers/run_autoround.py` SEED).
Prints one JSON line a row, then a table with each tool's mean and range.
"""
import argparse
import statistics
import tempfile
from pathlib import Path

import common
from bench_signround import GRIDS, autoround_grid, calibrate_flags

LAUNCHER = """import quantkit.algorithms.signround as signround
original = signround._Trainer.__init__
def offset_seed(self, context, names, options):
    context.seed = context.seed + {offset}     # the step order only: the tokens were drawn before
    original(self, context, names, options)
signround._Trainer.__init__ = offset_seed
from quantkit.cli.main import main
main()
"""


def add_seeded_row(rows: list[dict], tmp: Path, grid: str, variant: str, offset: int, reference, windows) -> None:
    launcher = tmp / f"launch_{offset}.py"
    launcher.write_text(LAUNCHER.format(offset=offset))
    common.add_quantkit_row(rows, tmp / f"out_{offset}", f"{grid} {variant}, step order seed +{offset}",
                            calibrate_flags(grid, variant), reference, windows,
                            entry=(str(launcher),))


def spread(rows: list[dict], tool: str) -> dict | None:
    """The mean row of ``tool``'s rows, with their perplexity and KL ranges in its config."""
    mine = [row for row in rows if row["tool"] == tool]
    if not mine:
        return None
    ppl, kl = [row["ppl"] for row in mine], [row["kl"] for row in mine]
    return {"tool": tool, "config": f"mean of {len(mine)} (perplexity {min(ppl):.3f}-{max(ppl):.3f}, "
                                    f"KL {min(kl):.4f}-{max(kl):.4f})",
            "ppl": statistics.fmean(ppl), "kl": statistics.fmean(kl),
            "top1": statistics.fmean(row["top1"] for row in mine)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="int4 g64 sym", choices=list(GRIDS))
    parser.add_argument("--variant", default="signround imatrix 80")
    parser.add_argument("--offsets", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--autoround-seeds", nargs="*", type=int, default=[42, 1])
    parser.add_argument("--autoround-iters", type=int, default=200)
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for offset in args.offsets:
            add_seeded_row(rows, Path(tmp), args.grid, args.variant, offset, reference, windows)
    for seed in args.autoround_seeds:
        common.add_peer_row(rows, args.peer_python, "run_autoround.py",
                            [*autoround_grid(args.grid), str(args.autoround_iters), "8", "default", str(seed)],
                            "AutoRound", f"{args.grid} iters {args.autoround_iters}, seed {seed}")
    summaries = [row for row in (spread(rows, "quantkit"), spread(rows, "AutoRound")) if row is not None]
    print(common.table(rows + summaries, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
