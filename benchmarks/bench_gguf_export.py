"""GGUF export of SmolLM2-135M at 4 bits, group 32, symmetric: does the file keep each algorithm's gain?

For every registered weight algorithm among rtn, gptq and awq, the model is calibrated as
``quantkit calibrate smollm2-135m --scheme w4a16 --bits 4 --group-size 32 --sym --algo ALGO``, exported with
``quantkit export OUT --format gguf`` (these grids are carried as exact Q4_0), and the .gguf is loaded
back by transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``, the gguf-py dequantizer).
Two reference rows: the float model, and the float model re-rounded to Q4_0 by the exporter
(bit-identical to gguf-py's quantizer: what llama.cpp's plain Q4_0 does to the linear layers, with
embeddings kept in F16/F32 here).

Protocol (as tests/test_smollm2.py): calibration on the first half of the bundled Alice in Wonderland
text (--num-samples x --seq-len tokens), perplexity over --windows non-overlapping 512-token windows of
the second half (held out), float32 on CPU. For each exported file it also reports the agreement of
the GGUF-loaded model with quantkit's own dequantized model (top-1 and perplexity difference), which
for exact exports must be ~0.

    python benchmarks/bench_gguf_export.py [--algos rtn,gptq,awq] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import common


def main() -> None:
    from quantkit.algorithms.registry import algorithm_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--algos", default=",".join(a for a in ("rtn", "gptq", "awq") if a in algorithm_names()),
                        help="comma-separated; default: those of rtn, gptq, awq that are registered")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--workdir", type=Path, help="keep outputs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    unknown = [a for a in args.algos.split(",") if a not in algorithm_names()]
    if unknown:
        parser.error(f"not registered: {', '.join(unknown)} (registered: {', '.join(algorithm_names())})")
    results = common.in_workdir(args.workdir, "bench-gguf-", lambda workdir: run(args, workdir))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(args, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from quantkit.model.checkpoint import resolve_model
    from quantkit.check.evaluate import compare, perplexity
    from quantkit.exporters.gguf import export_gguf
    from quantkit.native.loader import load_quantized
    from quantkit.run.pipeline import CalibrateConfig, calibrate

    source = resolve_model(args.model).path
    calibration_file, windows, protocol = common.alice_split(workdir, source, args.windows, args.num_samples,
                                                             args.seq_len)

    def gguf_model(path: Path):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    rows = []
    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    float_ppl = perplexity(float_model, windows)
    rows.append({"row": "float (bf16 checkpoint)", "gguf_ppl": None, "quantkit_ppl": float_ppl})
    del float_model

    started = time.perf_counter()
    plain = export_gguf(source, workdir / "float-q4_0.gguf", ggml_type="Q4_0", overwrite=True)
    export_s = time.perf_counter() - started
    plain_ppl = perplexity(gguf_model(plain.out), windows)
    rows.append({"row": "float re-rounded to Q4_0 (gguf-py Q4_0)", "gguf_ppl": plain_ppl, "quantkit_ppl": None,
                 "export_s": export_s, "linears": plain.summary()})

    for algo in args.algos.split(","):
        out = workdir / f"{algo}-w4g32"
        started = time.perf_counter()
        calibrate(CalibrateConfig(model=str(source), scheme="w4a16", bits=4, group_size=32, symmetric=True,
                                  algorithm=algo, dataset=str(calibration_file), num_samples=args.num_samples,
                                  seq_len=args.seq_len, out=out, overwrite=True))
        calibrate_s = time.perf_counter() - started
        started = time.perf_counter()
        result = export_gguf(out, workdir / f"{algo}-w4g32.gguf", overwrite=True)
        export_s = time.perf_counter() - started
        agreement = compare(gguf_model(result.out), load_quantized(out, dtype=torch.float32), windows)
        rows.append({"row": f"{algo} w4 g32 sym -> GGUF", "gguf_ppl": agreement.perplexity,
                     "quantkit_ppl": agreement.reference_perplexity, "top1_vs_quantkit": agreement.top1_agreement,
                     "kl_vs_quantkit": agreement.kl_divergence, "calibrate_s": calibrate_s, "export_s": export_s,
                     "linears": result.summary(), "file_type": result.file_type,
                     "size_mib": result.size_bytes / 2**20})
    return {"model": args.model, "protocol": protocol, "float_ppl": float_ppl, "rows": rows}


def print_table(results: dict) -> None:
    float_ppl = results["float_ppl"]
    print(f"model: {results['model']}\nprotocol: {results['protocol']}\n")
    print("| row | GGUF ppl (transformers GGUF loader) | vs float | quantkit ppl | top-1 GGUF vs quantkit | linears |")
    print("|---|---|---|---|---|---|")
    for row in results["rows"]:
        ppl = row["gguf_ppl"] if row["gguf_ppl"] is not None else row["quantkit_ppl"]
        delta = "" if row["gguf_ppl"] is None else f"{100 * (ppl / float_ppl - 1):+.2f}%"
        both = row.get("quantkit_ppl") is not None and row["gguf_ppl"] is not None
        quantkit_ppl = f"{row['quantkit_ppl']:.4f}" if both else ""
        top1 = "" if "top1_vs_quantkit" not in row else f"{100 * row['top1_vs_quantkit']:.2f}%"
        linears = ", ".join(f"{k}: {v}" for k, v in row.get("linears", {}).items())
        print(f"| {row['row']} | {ppl:.4f} | {delta} | {quantkit_ppl} | {top1} | {linears} |")


if __name__ == "__main__":
    main()
