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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from bench_signround import GRIDS, variant_flags

LAUNCHER = """import sys
import quantkit.algorithms.signround as signround
original = signround._Trainer.__init__
def offset_seed(self, context, names, options):
    context.seed = context.seed + {offset}     # the step order only: the tokens were drawn before
    original(self, context, names, options)
signround._Trainer.__init__ = offset_seed
from quantkit.cli.main import main
main()
"""


def quantkit_row(tmp: Path, grid: str, variant: str, offset: int, reference, windows) -> dict:
    launcher = tmp / f"launch_{offset}.py"
    launcher.write_text(LAUNCHER.format(offset=offset))
    out = tmp / f"out_{offset}"
    command = [sys.executable, str(launcher), "calibrate", "smollm2-135m", "--out", str(out), "--overwrite",
               "--json", "--scheme", "w4a16", *variant_flags(variant), *GRIDS[grid], *common.CALIBRATION_FLAGS,
               "--num-samples", str(common.SAMPLES), "--seq-len", str(common.SEQ_LEN)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    return {"tool": "quantkit", "config": f"{grid} {variant}, step order seed +{offset}",
            "wall_s": time.perf_counter() - start, "quantize_s": common.work_seconds(summary),
            "peak_rss_mib": summary["peak_rss_mib"],
            **common.score(common.load_quantized_fp32(out), reference, windows)}


def spread(rows: list[dict], tool: str) -> dict | None:
    values = [row["ppl"] for row in rows if row["tool"] == tool]
    kls = [row["kl"] for row in rows if row["tool"] == tool]
    if not values:
        return None
    return {"tool": tool, "config": f"mean of {len(values)} (perplexity {min(values):.3f}-{max(values):.3f}, "
                                    f"KL {min(kls):.4f}-{max(kls):.4f})",
            "ppl": statistics.fmean(values), "kl": statistics.fmean(kls),
            "top1": statistics.fmean(row["top1"] for row in rows if row["tool"] == tool)}


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
    bits, group_size, symmetry = GRIDS[args.grid][1], GRIDS[args.grid][3], GRIDS[args.grid][4].lstrip("-")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for offset in args.offsets:
            rows.append(quantkit_row(Path(tmp), args.grid, args.variant, offset, reference, windows))
            print(json.dumps(rows[-1]), flush=True)
    for seed in args.autoround_seeds:
        common.add_peer_row(rows, args.peer_python, "run_autoround.py",
                            [bits, group_size, symmetry, str(args.autoround_iters), "8", "default", str(seed)],
                            "AutoRound", f"{args.grid} iters {args.autoround_iters}, seed {seed}")
    summaries = [row for row in (spread(rows, "quantkit"), spread(rows, "AutoRound")) if row is not None]
    print(common.table(rows + summaries, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
