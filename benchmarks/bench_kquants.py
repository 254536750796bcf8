"""Issue 14 (first part) benchmark: SmolLM2-135M's K-quant files in llama.cpp, quantkit's export against
llama.cpp's own quantizer on the same float model.

    python benchmarks/bench_kquants.py [--windows 8] [--types Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K]

needs llama-cpp-python (it builds llama.cpp from source). For each file type: ``quantkit export SMOLLM2
--format gguf --type T`` (from the bf16 checkpoint; no calibration) and llama.cpp's ``llama_model_quantize``
of our F16 export of the same model; reported: whether the two files are byte-identical tensor for tensor,
the types the 576-wide rows fell back to, the file size, and llama.cpp's perplexity / KL / top-1 against the
float model (transformers, fp32) on held-out Alice windows (tests/test_smollm2.py's protocol), plus the
export time of each tool.
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import common
from bench_llama_cpp import perplexity, torch_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--types", default="Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    common.in_workdir(args.workdir, "bench-kquants-", lambda d: run(d, args))


def identical(ours: Path, theirs: Path) -> bool:
    equal, total = common.identical_tensors(ours, theirs)
    return equal == total


def run(workdir: Path, args) -> None:
    import llama_cpp

    from quantkit.exporters.gguf import export_gguf

    source = common.demo_model()
    _, windows, protocol = common.alice_split(workdir, source, args.windows, 32, 512)
    float_logits = torch_logits(common.float_model(), windows)
    f16 = workdir / "f16.gguf"
    export_gguf(source, f16, ggml_type="F16", overwrite=True)
    rows = [("F16 (quantkit export)", perplexity(common.llama_cpp_logits(f16, windows), windows), None, None,
             f16.stat().st_size, None, None, "")]
    for file_type in args.types.split(","):
        ours, theirs = workdir / f"quantkit-{file_type}.gguf", workdir / f"llama-{file_type}.gguf"
        start = time.perf_counter()
        result = export_gguf(source, ours, ggml_type=file_type, overwrite=True)
        our_seconds = time.perf_counter() - start
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
        start = time.perf_counter()
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize {file_type} failed")
        their_seconds = time.perf_counter() - start
        logits = common.llama_cpp_logits(ours, windows)
        top1, kl = common.next_token_agreement(float_logits, logits)
        types = Counter(t.ggml_type for t in result.linears)
        rows.append((f"{file_type}", perplexity(logits, windows), top1, kl, ours.stat().st_size, our_seconds,
                     their_seconds, f"{'yes' if identical(ours, theirs) else 'NO'}; linears: " +
                     ", ".join(f"{k} {v}" for k, v in types.most_common())))
    print(f"SmolLM2-135M; {protocol}; llama-cpp-python {llama_cpp.__version__}; float (transformers) ppl "
          f"{perplexity(float_logits, windows):.3f}")
    print("| file | llama.cpp ppl | top-1 vs float | KL vs float | MiB | quantkit export s | llama-quantize s | "
          "byte-identical to llama-quantize; types |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, ppl, top1, kl, size, ours_s, theirs_s, note in rows:
        print(f"| {label} | {ppl:.3f} | {'' if top1 is None else f'{top1:.2%}'} | {'' if kl is None else f'{kl:.4f}'} "
              f"| {size / 2**20:.1f} | {'' if ours_s is None else f'{ours_s:.1f}'} | "
              f"{'' if theirs_s is None else f'{theirs_s:.1f}'} | {note} |")


if __name__ == "__main__":
    main()
