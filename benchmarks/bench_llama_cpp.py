"""Our GGUF files run in llama.cpp itself, with the perplexity of our own reloaded model.

    pip install llama-cpp-python          # builds llama.cpp from source (~15 min on 2 cores)
    python benchmarks/bench_llama_cpp.py [--windows 8] [--algos rtn,gptq,awq]

SmolLM2-135M (the demo model, Llama architecture) is calibrated as
``quantkit calibrate smollm2-135m --scheme w4a16 --bits 4 --group-size 32 --sym --algo ALGO`` (carried
exactly as Q4_0) and ``--scheme w8a16 --group-size 32 --sym`` (exact Q8_0), exported with
``quantkit export OUT --format gguf``, and each file is run by llama.cpp (llama-cpp-python's bindings:
the token ids are evaluated directly, no BOS, n_ctx 512). Peer rows: llama.cpp's own quantizer
(``llama_model_quantize``) applied to our float F16 export, Q4_0 and Q8_0.

Reported per file: llama.cpp's perplexity on the held-out windows (tests/test_smollm2.py's protocol),
quantkit's own perplexity of the same quantized model (``load_quantized``, fp32), their ratio, and the
top-1 agreement and KL between llama.cpp's and quantkit's next-token distributions.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import common


@torch.no_grad()
def torch_logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(w[None]).logits.float() for w in windows])


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean()
    return math.exp(float(nll))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--algos", default="rtn,gptq,awq")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    common.in_workdir(args.workdir, "bench-llama-cpp-", lambda d: run(d, args))


def run(workdir: Path, args) -> None:
    import llama_cpp

    from quantkit.exporters.gguf import export_gguf

    source = common.demo_model()
    calibration, windows, protocol = common.alice_split(workdir, source, args.windows, 32, 512)
    rows = []
    float_logits = torch_logits(common.float_model(), windows)
    rows.append(("float (transformers)", None, perplexity(float_logits, windows), None, None, None))
    f16 = workdir / "float-f16.gguf"
    export_gguf(source, f16, ggml_type="F16", overwrite=True)
    for ftype, name in ((llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_0"), (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q8_0")):
        target = workdir / f"llama-quantize-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(target).encode(), params) != 0:
            raise SystemExit(f"llama_model_quantize {name} failed")
        logits = common.llama_cpp_logits(target, windows)
        rows.append((f"llama.cpp's quantizer {name} (from our F16)", perplexity(logits, windows), None, None, None, None))
    runs = [(f"quantkit {algo} w4 g32 sym -> Q4_0", ["--scheme", "w4a16", "--bits", "4", "--group-size", "32", "--sym",
                                                      "--algo", algo]) for algo in args.algos.split(",")]
    runs.append(("quantkit rtn w8 g32 sym -> Q8_0", ["--scheme", "w8a16", "--group-size", "32", "--sym"]))
    for label, flags in runs:
        out = workdir / label.split(" ->")[0].replace(" ", "-")
        common.run_quantkit(out, "--dataset", str(calibration), "--num-samples", "32", "--seq-len", "512", *flags)
        gguf_path = out.with_suffix(".gguf")
        result = export_gguf(out, gguf_path, overwrite=True)
        theirs = common.llama_cpp_logits(gguf_path, windows)
        ours = torch_logits(common.load_quantized_fp32(out), windows)
        top1, kl = common.next_token_agreement(ours, theirs)
        statuses = ", ".join(f"{k} {v}" for k, v in result.summary().items())
        rows.append((f"{label} ({statuses})", perplexity(theirs, windows), perplexity(ours, windows), top1, kl, None))
    print(f"SmolLM2-135M; {protocol}; llama-cpp-python {llama_cpp.__version__}")
    print("| model | llama.cpp ppl | quantkit ppl (load_quantized) | llama.cpp / quantkit | top-1 agreement | KL |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, theirs, ours, top1, kl, _ in rows:
        ratio = f"{theirs / ours:.4f}" if theirs and ours else ""
        print(f"| {label} | {_fmt(theirs)} | {_fmt(ours)} | {ratio} | {'' if top1 is None else f'{top1:.2%}'} | "
              f"{'' if kl is None else f'{kl:.5f}'} |")


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
