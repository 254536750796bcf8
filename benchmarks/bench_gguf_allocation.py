"""Issue 15 benchmark, GGUF side: `quantkit export --format gguf --target-size` against llama.cpp's own mixes at
their file sizes, every file measured by llama.cpp itself (llama-perplexity) on SmolLM2-135M.

    python benchmarks/bench_gguf_allocation.py --llama-cpp-bin DIR [--types Q3_K_M,Q4_K_M,Q5_K_M] [--chunks 16]
        [--candidates Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0]

The demo model's float weights are SmolLM2's Q4_1 GGUF dequantized: Q4_1 (and Q5_1, whose grid holds Q4_1's)
give them back almost exactly, so quantkit's default candidates pick Q4_1 nearly everywhere at near-zero error;
--candidates without Q4_1/Q5_1 measures the allocation itself.

DIR holds llama.cpp's ``llama-imatrix``, ``llama-quantize`` and ``llama-perplexity`` (the cmake build of the
llama.cpp source llama-cpp-python vendors). Protocol: the bundled Alice text split at the paragraph break nearest
its middle; llama-imatrix reads the first half (32 chunks of 512 tokens); llama-perplexity scores --chunks
512-token chunks of the second half (its own protocol: the second half of each chunk is scored), with the KL
divergence and top-1 agreement against the F16 file's logits (--kl-divergence-base). Rows per mix T:

  llama.cpp T + imatrix        llama-quantize --imatrix F16 -> T: the hand-written mix, size S
  quantkit --target-size S     quantkit export FLOAT --format gguf --type T --target-size S --imatrix (the same
                               importance matrix): the block Linears' types chosen by quantkit under S bytes, the
                               other tensors (embeddings, norms) typed as T types them (--routes weight: by the
                               importance-weighted weight error)
  ... --dataset                the same with --dataset on the calibration text (32 x 512 tokens, the windows
                               llama-imatrix reads): by block sensitivities measured on it (--routes measured)
  ... --dataset --algo gptq    the same choice, then each block Linear quantized on its chosen type by GPTQ on that
                               text (--routes gptq; one command)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import common


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp-bin", type=Path, required=True)
    parser.add_argument("--types", default="Q3_K_M,Q4_K_M,Q5_K_M")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--candidates", help="quantkit export --candidates (default: its own)")
    parser.add_argument("--routes", default="weight,measured",
                        help="quantkit rows: weight (weight error), measured (--dataset sensitivities), gptq "
                             "(measured, then --algo gptq)")
    args = parser.parse_args()
    common.in_workdir(args.workdir, "bench-gguf-alloc-", lambda d: run(d, args))


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    if match is None:
        raise SystemExit(f"llama-perplexity printed no '{pattern}'")
    return float(match.group(1))


def run(workdir: Path, args) -> None:
    from quantkit.exporters.gguf import export_gguf

    binaries = args.llama_cpp_bin
    source = common.demo_model()
    first, second = common.alice_halves()
    calibration = workdir / "calibration.txt"
    calibration.write_text(common.one_document(first))
    held_out = workdir / "held_out.txt"
    held_out.write_text(second)
    f16 = workdir / "f16.gguf"
    export_gguf(source, f16, ggml_type="F16", overwrite=True)
    base = workdir / "f16.kld"
    perplexity = [str(binaries / "llama-perplexity"), "-f", str(held_out), "-c", "512", "--chunks", str(args.chunks),
                  "-t", "2"]
    output, _ = common.run_tool([*perplexity, "-m", str(f16), "--kl-divergence-base", str(base)])
    rows = [("F16", _number(r"Final estimate: PPL = ([0-9.]+)", output), None, None, f16.stat().st_size, None, "")]
    imatrix = workdir / "imatrix.gguf"
    _, imatrix_s = common.run_tool([str(binaries / "llama-imatrix"), "-m", str(f16), "-f", str(calibration),
                                    "-o", str(imatrix), "-c", "512", "--chunks", "32", "-t", "2", "--no-ppl"])

    def measure(label: str, path: Path, seconds: float, note: str) -> None:
        output, _ = common.run_tool([*perplexity, "-m", str(path), "--kl-divergence-base", str(base),
                                     "--kl-divergence"])
        rows.append((label, _number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", output),
                     _number(r"Mean\s+KLD:\s*([0-9.]+)", output), _number(r"Same top p:\s*([0-9.]+)", output) / 100,
                     path.stat().st_size, seconds, note))
        print(rows[-1], flush=True)

    for file_type in args.types.split(","):
        theirs = workdir / f"llama-{file_type}.gguf"
        _, seconds = common.run_tool([str(binaries / "llama-quantize"), "--imatrix", str(imatrix), str(f16),
                                      str(theirs), file_type, "2"])
        measure(f"llama.cpp {file_type} + imatrix", theirs, imatrix_s + seconds,
                f"llama-imatrix {imatrix_s:.0f} s + llama-quantize {seconds:.0f} s")
        size = theirs.stat().st_size
        for route in args.routes.split(","):
            ours = workdir / f"quantkit-{file_type}-{route}.gguf"
            data = ["--dataset", str(calibration), "--num-samples", "32", "--seq-len", "512"] if route != "weight" \
                else []
            if route == "gptq":
                data += ["--algo", "gptq"]
            _, seconds = common.run_tool([sys.executable, "-m", "quantkit", "export", str(source), "--format", "gguf",
                                          "--type", file_type, "--target-size", str(size), "--imatrix", str(imatrix),
                                          *(["--candidates", args.candidates] if args.candidates else []), *data,
                                          "--out", str(ours), "--overwrite", "--quiet"])
            flags = {"weight": "", "measured": ", --dataset", "gptq": ", --dataset --algo gptq"}[route]
            label = f"quantkit --target-size {size} (--type {file_type}{flags})"
            measure(label, ours, imatrix_s + seconds, _types(ours))
    print(f"SmolLM2-135M; llama-perplexity -c 512 --chunks {args.chunks} on the held-out second half of "
          "alice_in_wonderland.txt; llama-imatrix 32 x 512 tokens of the first half")
    print("| file | llama.cpp ppl | KL vs F16 | top-1 vs F16 | bytes | wall s | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, ppl, kl, top1, size, seconds, note in rows:
        print(f"| {label} | {ppl:.3f} | {'' if kl is None else f'{kl:.4f}'} | "
              f"{'' if top1 is None else f'{top1:.2%}'} | {size} | {'' if seconds is None else f'{seconds:.0f}'} "
              f"| {note} |")


def _types(path: Path) -> str:
    """The block weight types of a GGUF file, counted (gguf-py)."""
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(path).tensors
                     if t.name.startswith("blk.") and "norm" not in t.name)
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


if __name__ == "__main__":
    main()
