"""Issue 16 benchmark: SignRound (block-wise learned rounding) against RTN/GPTQ/AWQ/HQQ and AutoRound on SmolLM2.

    python benchmarks/bench_signround.py --peer-python /work/peers-venv/bin/python \
        [--grids "int4 g64 sym" ...] [--variants gptq "signround gptq 50" ...] [--autoround-iters 50 200]

Protocol of benchmarks/common.py: 64 x 512 calibration tokens of Austen's Persuasion (AutoRound gets the very same
ids, one sample per batch entry; it keeps every sample, all being 512 tokens long), perplexity, KL and top-1 in
float32 on 16 held-out Alice windows. Grids: 4-bit g64 symmetric, 4-bit g128 symmetric (ragged: 576 = 4.5 x 128),
3-bit g64 asymmetric and 2-bit g64 asymmetric (the issue's rows), and 4-bit g128 asymmetric (`w4a16`'s grid). A
variant "signround INIT N" is `--algo signround --algo-option init=INIT --algo-option iters=N`; more words are
options (`lr=0.01`; "gptq act_order=false" for the other algorithms); `batch=4` sets `--batch-size 4` (samples
per step), `propagate=float` sets `--propagate float` and `final-norm=off` sets `--no-fit-final-norm`, for any
variant. Time: quantkit's calibrate+quantize seconds (every stage but load and write) and AutoRound's quantize()
call, in the same run on the same machine.
"""
import argparse
import tempfile
from pathlib import Path

import common

GRIDS = {
    "int4 g64 sym": ["--bits", "4", "--group-size", "64", "--sym"],
    "int4 g128 sym": ["--bits", "4", "--group-size", "128", "--sym"],
    "int4 g128 asym": ["--bits", "4", "--group-size", "128", "--asym"],
    "int3 g64 asym": ["--bits", "3", "--group-size", "64", "--asym"],
    "int2 g64 asym": ["--bits", "2", "--group-size", "64", "--asym"],
}
DEFAULT_VARIANTS = ["rtn", "gptq", "awq", "hqq", "signround gptq 50", "signround gptq 200"]


def parse_variant(variant: str) -> tuple[str, list[str], list[str]]:
    """(algorithm, its options as "key=value" words, the calibrate flags) of a variant (module docstring)."""
    words = variant.split()
    # "batch=N": N calibration samples per batch (`--batch-size`), so SignRound takes N samples per step
    flags = [flag for word in words if word.startswith("batch=") for flag in ("--batch-size", word.split("=")[1])]
    # "propagate=float": every block calibrated on the float model's inputs (`--propagate float`)
    flags += [flag for word in words if word.startswith("propagate=") for flag in ("--propagate", word.split("=")[1])]
    # "final-norm=off": the final norm's fit left out (`--no-fit-final-norm`; on by default with signround)
    for word in words:
        if word.startswith("final-norm=") and word != "final-norm=off":
            raise SystemExit(f"{word}: the fit is on by default; the word is final-norm=off")
    flags += ["--no-fit-final-norm" for word in words if word == "final-norm=off"]
    words = [word for word in words if not word.startswith(("batch=", "propagate=", "final-norm="))]
    if words[0] == "signround":
        return "signround", [f"init={words[1]}", f"iters={words[2]}", *words[3:]], flags
    return words[0], words[1:], flags


def variant_flags(variant: str) -> list[str]:
    algorithm, options, flags = parse_variant(variant)
    return ["--algo", algorithm, *[flag for option in options for flag in ("--algo-option", option)], *flags]


def calibrate_flags(grid: str, variant: str) -> list[str]:
    """`quantkit calibrate`'s flags for ``variant`` on ``grid`` (w4a16's scheme with the grid's weights)."""
    return ["--scheme", "w4a16", *variant_flags(variant), *GRIDS[grid]]


def autoround_grid(grid: str) -> list[str]:
    """``grid`` as run_autoround.py's first arguments: BITS GROUP_SIZE SYM|ASYM."""
    return [GRIDS[grid][1], GRIDS[grid][3], GRIDS[grid][4].lstrip("-")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--grids", nargs="*", default=list(GRIDS))
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.add_argument("--autoround-iters", nargs="*", type=int, default=[50, 200])
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "", **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for grid in args.grids:
            for variant in args.variants:
                if variant == "hqq" and "--sym" in GRIDS[grid]:
                    continue   # HQQ optimises a zero point: asymmetric grids only
                out = Path(tmp) / f"{grid}-{variant}".replace(" ", "_")
                common.add_quantkit_row(rows, out, f"{grid} {variant}", calibrate_flags(grid, variant), reference,
                                        windows)
            for iters in args.autoround_iters:
                common.add_peer_row(rows, args.peer_python, "run_autoround.py", [*autoround_grid(grid), str(iters)],
                                    "AutoRound", f"{grid} iters {iters}")
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
