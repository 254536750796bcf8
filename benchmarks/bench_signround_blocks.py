"""Issue 16 prototypes: SignRound on a few of SmolLM2's blocks only, the others left in float, scored like
bench_signround.py (64 x 512 calibration tokens of Persuasion; perplexity, KL and top-1 in float32 on 16 held-out
Alice windows). A quick signal (five to six minutes a row for six blocks) before a whole-model run.

    python benchmarks/bench_signround_blocks.py --grid "int4 g64 sym" --blocks 0-5 \
        --variants "signround imatrix 80" "signround imatrix 160 batch=4"

A variant is bench_signround.py's (`parse_variant`): "signround INIT N [option=value ...] [batch=N]
[propagate=float]", or a one-pass algorithm's name and options ("imatrix", "gptq act_order=false"). Each row is
`quantkit calibrate smollm2-135m --recipe R` (plus the variant's flags) with R's default rule the grid and
algorithm, and every Linear outside --blocks ignored.
"""
import argparse
import tempfile
from pathlib import Path

import common
import yaml
from bench_signround import GRIDS, parse_variant


def recipe(grid: str, algorithm: str, options: list[str], first: int, last: int, layers: int) -> dict:
    """The recipe of ``algorithm`` with ``options`` ("key=value" words) on ``grid``, quantizing blocks
    first..last of ``layers`` only."""
    flags = GRIDS[grid]
    others = "|".join(str(i) for i in range(layers) if not first <= i <= last)
    rule = {"scheme": "w4a16", "algorithm": algorithm, "bits": int(flags[1]), "group_size": int(flags[3]),
            "symmetric": flags[4] == "--sym",
            "options": {key: yaml.safe_load(value) for key, value in (o.split("=", 1) for o in options)}}
    return {"default": rule, "ignore": [f"re:.*layers\\.({others})\\..*"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="int4 g64 sym", choices=list(GRIDS))
    parser.add_argument("--blocks", default="0-5", help="first-last, the blocks quantized")
    parser.add_argument("--variants", nargs="+", default=["signround imatrix 80"])
    args = parser.parse_args()
    first, last = (int(part) for part in args.blocks.split("-"))
    windows = common.eval_windows()
    reference = common.float_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, variant in enumerate(args.variants):
            algorithm, options, flags = parse_variant(variant)
            path = Path(tmp) / f"recipe{index}.yaml"
            path.write_text(yaml.safe_dump(recipe(args.grid, algorithm, options, first, last,
                                                  reference.config.num_hidden_layers)))
            common.add_quantkit_row(rows, Path(tmp) / f"out{index}", f"{args.grid} {variant}, blocks {args.blocks}",
                                    ["--recipe", str(path), *flags], reference, windows)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
