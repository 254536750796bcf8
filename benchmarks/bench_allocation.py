"""Issue 15 benchmark: automatic mixed precision (--target-bits) against uniform grids of about the same size, on
SmolLM2-135M with the protocol of benchmarks/common.py (64 x 512 calibration tokens, perplexity/KL/top-1 in
float32 on 16 held-out Alice windows).

    python benchmarks/bench_allocation.py [--budgets 3.0 3.5 4.25 5.0] [--algo gptq]
        [--uniform int3-g128 int3-g64 ...] [--layer-budgets 3.5] [--peer-python PY --peer-budgets 3.5 4.25]
        [--matched-algo imatrix] [--matched-only]

Rows: for each budget B, `quantkit calibrate --target-bits B --algo ALGO` (default candidates: asymmetric int2..int8
at groups 32/64/128/256 and per channel) with the block sensitivity (and the layer sensitivity at --layer-budgets), and each --uniform grid with the same algorithm. With
--peer-python (a Python with auto-round), per --peer-budgets budget a matched pair on AutoRound's candidates (symmetric int 2/3/4/8
at groups of 128) and the same quantizer: AutoRound's iters 0 is its "optimized RTN" (an importance-weighted
scale search per group, on by default), which is quantkit's imatrix search on integer grids, so quantkit
`--target-bits B --candidates MATCHED --algo imatrix` (--matched-algo) against AutoScheme(avg_bits B) with iters 0
(benchmarks/peers/run_autoscheme.py). Every row's bits per weight are read from its written files (codes, scales, zeros
of the quantized Linears over their weight count); the sensitivity pass's seconds are reported apart.
"""
import argparse
import json
import math
import tempfile
from pathlib import Path

import common

MATCHED = "int2-g128-sym,int3-g128-sym,int4-g128-sym,int8-g128-sym"
DEFAULT_UNIFORM = ["int3-g128", "int3-g64", "int3-g32", "int4-g128", "int4-g64", "int4-g32", "int5-g128"]


def uniform_flags(label: str) -> list[str]:
    bits, group = label.removeprefix("int").split("-g")
    return ["--scheme", "w4a16", "--bits", bits, "--group-size", group, "--asym"]


def stored_bits(out: Path) -> float:
    """Bits per weight of the quantized Linears as written (every role but bias), from the files."""
    from quantkit.files import tensor_bytes
    from quantkit.native.manifest import Manifest

    manifest = Manifest.load(out)
    sizes = tensor_bytes([out / f for f in manifest.weight_files])
    stored = sum(sizes[t] for e in manifest.layers.values() for role, t in e.tensors.items() if role != "bias")
    return 8 * stored / sum(math.prod(e.shape) for e in manifest.layers.values())


def add_allocation_columns(row: dict, out: Path) -> None:
    """An allocated run's bits per weight (from its files), sensitivity seconds and grids chosen; echoed."""
    manifest = json.loads((out / "quant_manifest.json").read_text())
    row["bits"] = f"{stored_bits(out):.3f}"
    row["sensitivity_s"] = manifest["summary"]["timings_s"].get("sensitivity")
    row["grids"] = ", ".join(f"{k} x{v}" for k, v in manifest["allocation"]["chosen"].items())
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", nargs="*", type=float, default=[3.0, 3.5, 4.25, 5.0])
    parser.add_argument("--algo", default="gptq")
    parser.add_argument("--uniform", nargs="*", default=DEFAULT_UNIFORM)
    parser.add_argument("--layer-budgets", nargs="*", type=float, default=[])
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--peer-budgets", nargs="*", type=float, default=[3.5, 4.25])
    parser.add_argument("--matched-algo", default="imatrix", help="quantkit's side of the AutoScheme pair")
    parser.add_argument("--matched-only", action="store_true",
                        help="run quantkit's side of the pair at --peer-budgets without a peer Python")
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "", **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.uniform:
            out = Path(tmp) / label
            common.add_quantkit_row(rows, out, f"uniform {label}-asym {args.algo}",
                                    [*uniform_flags(label), "--algo", args.algo], reference, windows)
            rows[-1]["bits"] = f"{stored_bits(out):.3f}"
        for target in sorted({*args.budgets, *args.layer_budgets, *args.peer_budgets}):
            for kind in [k for k, budgets in (("block", args.budgets), ("layer", args.layer_budgets)) if target in budgets]:
                out = Path(tmp) / f"auto-{target}-{kind}"
                common.add_quantkit_row(rows, out, f"auto --target-bits {target} ({kind}) {args.algo}",
                                        ["--target-bits", str(target), "--sensitivity", kind, "--algo", args.algo],
                                        reference, windows)
                add_allocation_columns(rows[-1], out)
            if target in args.peer_budgets and (args.peer_python or args.matched_only):
                out = Path(tmp) / f"matched-{target}"
                common.add_quantkit_row(rows, out, f"auto --target-bits {target} on AutoScheme's grids, "
                                        f"{args.matched_algo}", ["--target-bits", str(target), "--candidates",
                                                                 MATCHED, "--algo", args.matched_algo],
                                        reference, windows)
                add_allocation_columns(rows[-1], out)
                if args.peer_python:
                    common.add_peer_row(rows, args.peer_python, "run_autoscheme.py", str(target), "AutoRound",
                                        f"AutoScheme avg_bits {target}, iters 0")
    columns = [("tool", "tool"), ("config", "config"), ("bits", "bits/weight"), ("ppl", "perplexity"), ("kl", "KL"),
               ("top1", "top-1"), ("quantize_s", "calibrate+quantize s"), ("sensitivity_s", "of which sensitivity s"),
               ("grids", "grids chosen")]
    print(common.table(sorted(rows, key=lambda r: float(r.get("bits", 0))), columns))


if __name__ == "__main__":
    main()
