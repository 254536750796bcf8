"""Issue 16 prototypes: SignRound on a few of SmolLM2's blocks only, the others left in float, scored like
bench_signround.py (64 x 512 calibration tokens of Persuasion; perplexity, KL and top-1 in float32 on 16 held-out
Alice windows). A quick signal (five to six minutes a row for six blocks) before a whole-model run.

    python benchmarks/bench_signround_blocks.py --grid "int4 g64 sym" --blocks 0-5 \
        --variants "signround imatrix 80" "signround imatrix 160 batch=4"

A variant is bench_signround.py's: "signround INIT N [option=value ...] [batch=N]", or a one-pass algorithm's
name ("imatrix", "awq"). Each row is `quantkit calibrate smollm2-135m --recipe R --batch-size B` with R's default
rule the grid and algorithm, and every Linear outside --blocks ignored.
"""
import argparse
import tempfile
from pathlib import Path

import common
from bench_signround import GRIDS


def recipe_text(grid: str, variant: str, first: int, last: int, layers: int) -> tuple[str, str]:
    """(the recipe YAML, the --batch-size) of ``variant`` on ``grid`` quantizing blocks first..last of ``layers``
    only."""
    flags = GRIDS[grid]
    bits, group_size, symmetric = flags[1], flags[3], "true" if flags[4] == "--sym" else "false"
    words = variant.split()
    batch = next((word.split("=")[1] for word in words if word.startswith("batch=")), "8")
    words = [word for word in words if not word.startswith("batch=")]
    options = [word.split("=", 1) for word in words[1:] if "=" in word]
    if words[0] == "signround":
        options = [["init", words[1]], ["iters", words[2]], *[word.split("=", 1) for word in words[3:]]]
    others = "|".join(str(i) for i in range(layers) if not first <= i <= last)
    rule = (f"{{scheme: w4a16, algorithm: {words[0]}, bits: {bits}, group_size: {group_size}, "
            f"symmetric: {symmetric}, options: {{{', '.join(f'{k}: {v}' for k, v in options)}}}}}")
    return f'default: {rule}\nignore: ["re:.*layers\\\\.({others})\\\\..*"]\n', batch


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
            text, batch = recipe_text(args.grid, variant, first, last, reference.config.num_hidden_layers)
            recipe = Path(tmp) / f"recipe{index}.yaml"
            recipe.write_text(text)
            common.add_quantkit_row(rows, Path(tmp) / f"out{index}", f"{args.grid} {variant}, blocks {args.blocks}",
                                    ["--recipe", str(recipe), "--batch-size", batch], reference, windows)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
