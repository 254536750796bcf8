"""Issue 3 benchmark: RTN vs AWQ / GPTQ / HQQ on SmolLM2-135M, and the peers where they install.

    python benchmarks/bench_algorithms.py [--peer-python /path/to/venv-with-llmcompressor-and-hqq/bin/python]

Same protocol as bench_w8a8.py (64 x 512 calibration tokens of English prose, 16 x 512 held-out eval tokens).
Grids: 4-bit group 64 symmetric (RTN, GPTQ, AWQ; llm-compressor GPTQ), 4-bit group 64 asymmetric (RTN,
HQQ; the hqq package) and 3-bit group 64 asymmetric (RTN, GPTQ, AWQ, HQQ; the hqq package). 576, the
hidden size, is a multiple of 64, so no group is ragged here. Wall time is the whole quantkit process.
"""
import argparse
import tempfile
from pathlib import Path

import common

VARIANTS = {
    "rtn": ["--algo", "rtn"],
    "gptq": ["--algo", "gptq"],  # default: act-order with static groups
    "gptq no act-order": ["--algo", "gptq", "--algo-option", "act_order=false"],
    "gptq one-pass": ["--algo", "gptq", "--algo-option", "true_sequential=false"],
    "awq": ["--algo", "awq"],
    "hqq": ["--algo", "hqq"],
}
GRIDS = {
    "int4 g64 sym": (["--bits", "4", "--group-size", "64", "--sym"], ["rtn", "gptq", "gptq no act-order", "gptq one-pass", "awq"]),
    "int4 g64 asym": (["--bits", "4", "--group-size", "64", "--asym"], ["rtn", "hqq"]),
    "int3 g64 asym": (["--bits", "3", "--group-size", "64", "--asym"], ["rtn", "gptq", "gptq no act-order", "awq", "hqq"]),
}
PEERS = {
    "int4 g64 sym": [("run_llmcompressor.py", "gptq_w4g64", "llm-compressor GPTQ")],
    "int4 g64 asym": [("run_hqq.py", "4", "hqq package")],
    "int3 g64 asym": [("run_hqq.py", "3", "hqq package")],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--grids", nargs="*", default=list(GRIDS))
    parser.add_argument("--algos", nargs="*", default=None, help="restrict quantkit algorithms")
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "", **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for grid in args.grids:
            flags, algorithms = GRIDS[grid]
            for algorithm in algorithms:
                if args.algos and algorithm not in args.algos:
                    continue
                out = Path(tmp) / f"{grid}-{algorithm}".replace(" ", "_")
                common.add_quantkit_row(rows, out, f"{grid} {algorithm}", ["--scheme", "w4a16", *VARIANTS[algorithm],
                                                                           *flags], reference, windows)
            for script, argument, label in PEERS.get(grid, []):
                common.add_peer_row(rows, args.peer_python, script, argument, label, grid)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
