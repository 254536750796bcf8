"""End-to-end tokens/s of a Llama-2-7B-shaped model: bf16 vs W8A8 (dynamic per-token) vs W4A16 (g128),
all in the same run on the same GPU.

The model has Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, 32 layers, vocab 32000)
and random weights (speed does not depend on the values). Every decoder-block Linear is RTN-quantized
to the scheme and replaced by a `quantkit.cuda.KernelLinear` running the Triton kernels; embeddings,
norms, attention and lm_head stay bf16. Measured with CUDA events, median of repeats, after warm-up
(which also runs the kernels' autotuning):
  prefill  batch 1, a short and a ~300-token prompt: prompt tokens / time of one forward
  decode   batch 1, greedy, after a 300-token prefill, KV cache (transformers DynamicCache): new tokens / time
Everything runs eagerly (no CUDA graphs, no torch.compile), so decode includes the Python and launch
overhead of transformers' Llama, the same for every row.

    python benchmarks/bench_e2e_gpu.py [--layers 32] [--decode-tokens 64] [--json results.json]
    python benchmarks/bench_e2e_gpu.py --smoke      # CPU, tiny model, Triton interpreter: proves it runs
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompts", default="16,300", help="prefill prompt lengths")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schemes", default="w8a8_dynamic,w4a16")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, Triton interpreter")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def build_model(args, device):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.smoke:
        shape = dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4,
                     num_hidden_layers=2, vocab_size=256)
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=args.layers, vocab_size=32000)
    config = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


class Clock:
    """Milliseconds of fn(): CUDA events on the GPU, perf_counter on CPU; median of repeats."""

    def __init__(self, device, repeats):
        self.device, self.repeats = device, repeats

    def __call__(self, fn) -> float:
        import torch

        fn()  # warm-up (autotuning, allocator)
        times = []
        for _ in range(self.repeats):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


def measure(model, args, device, clock) -> dict:
    import torch
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    # transformers renamed past_key_values to cache (5.x deprecation); pass whichever this version takes
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generator = torch.Generator().manual_seed(1)
    result = {}
    with torch.inference_mode():
        for length in [int(v) for v in args.prompts.split(",")]:
            ids = torch.randint(0, vocab, (1, length), generator=generator).to(device)
            ms = clock(lambda: model(input_ids=ids, use_cache=False))
            result[f"prefill_{length}_tok_s"] = length / (ms / 1e3)
        longest = max(int(v) for v in args.prompts.split(","))
        prompt = torch.randint(0, vocab, (1, longest), generator=generator).to(device)

        def decode():
            cache = DynamicCache()
            out = model(input_ids=prompt, use_cache=True, **{cache_arg: cache})
            token = out.logits[:, -1:].argmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
                token = out.logits[:, -1:].argmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - begin

        decode()  # warm-up
        seconds = statistics.median(decode() for _ in range(max(1, args.repeats // 2)))
        result["decode_tok_s"] = args.decode_tokens / seconds
        logits = model(input_ids=prompt, use_cache=False).logits.float()
        result["logits_finite"] = bool(torch.isfinite(logits).all())
    return result, logits[0], prompt


def reference_logits(model, scheme, prompt):
    """Logits [T, vocab] of the same RTN-quantized model run by the pure-torch reference ops: what the
    kernels must reproduce (a random model's argmax sits on near-ties, so agreement with bf16 measures
    the quantization, not the kernels)."""
    import torch

    originals = swap_in_kernels(model, scheme, "reference")
    with torch.inference_mode():
        logits = model(input_ids=prompt, use_cache=False).logits.float()[0]
    restore(model, originals)
    return logits


def swap_in_kernels(model, scheme_name, backend):
    """Replace every decoder-block nn.Linear by a KernelLinear of its RTN-quantized weight; returns the
    originals so they can be put back."""
    import torch
    from torch import nn

    from quantkit.algorithms.rtn import quantize_rtn
    from quantkit.cuda import KernelLinear
    from quantkit.model.qlinear import QuantLinear, set_submodule
    from quantkit.formats.schemes import get_scheme

    scheme = get_scheme(scheme_name)
    originals = {name: module for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith("model.layers.")}
    for name, linear in originals.items():
        with torch.no_grad():
            quant = quantize_rtn(linear.weight.float(), scheme.weight)
        layer = QuantLinear(quant, scheme.activation, bias=linear.bias)
        set_submodule(model, name, KernelLinear(layer, name, backend))
        del quant, layer
    return originals


def restore(model, originals) -> None:
    from quantkit.model.qlinear import set_submodule

    for name, module in originals.items():
        set_submodule(model, name, module)


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # before Triton is imported
        args.prompts, args.decode_tokens, args.repeats = "8,24", 4, 1
    import torch

    from quantkit.cuda.forward import interpreter_error, triton_import_error

    if args.smoke:
        if interpreter_error():
            sys.exit(f"error: {interpreter_error()}")
        device, backend = "cpu", "interpreter"
    else:
        if not torch.cuda.is_available() or triton_import_error():
            sys.exit("error: needs a CUDA GPU and Triton (use --smoke on CPU)")
        device, backend = "cuda", "triton"
    model = build_model(args, device)
    clock = Clock(device, args.repeats)
    rows = {}
    rows["bf16"], bf16_logits, prompt = measure(model, args, device, clock)
    for scheme in args.schemes.split(","):
        originals = swap_in_kernels(model, scheme, backend)
        rows[scheme], logits, _ = measure(model, args, device, clock)
        restore(model, originals)
        expected = reference_logits(model, scheme, prompt)
        rows[scheme]["top1_agreement_with_bf16"] = (logits.argmax(-1) == bf16_logits.argmax(-1)).float().mean().item()
        rows[scheme]["top1_agreement_with_reference"] = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
        rows[scheme]["rel_error_vs_reference"] = ((logits - expected).norm() / expected.norm()).item()
        rows[scheme]["reference_top1_agreement_with_bf16"] = (
            (expected.argmax(-1) == bf16_logits.argmax(-1)).float().mean().item())
        if device == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: timings are meaningless)"
    if args.json:
        args.json.write_text(json.dumps({"device": name, "layers": model.config.num_hidden_layers, "rows": rows},
                                        indent=2))
    keys = [k for k in rows["bf16"] if k.endswith("tok_s")]
    print(f"{name}; {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, batch 1, eager")
    header = "".join(f"{k.removesuffix('_tok_s') + ' tok/s':>20}" for k in keys)
    print(f"{'model':<14}{header}{'top-1 vs bf16':>15}{'vs reference: rel err, top-1':>30}")
    for label, row in rows.items():
        cells = "".join(f"{row[k]:>11.1f} ({row[k] / rows['bf16'][k]:>4.2f}x)" for k in keys)
        check = (f"{row['rel_error_vs_reference']:>20.2e} {100 * row['top1_agreement_with_reference']:>8.1f}%"
                 if "rel_error_vs_reference" in row else "")
        print(f"{label:<14}{cells}{100 * row.get('top1_agreement_with_bf16', 1.0):>14.1f}%{check}")
    print("top-1 vs bf16 of the reference ops on the same quantized weights: " + ", ".join(
        f"{label} {100 * row['reference_top1_agreement_with_bf16']:.1f}%" for label, row in rows.items()
        if "reference_top1_agreement_with_bf16" in row))
    if not all(row["logits_finite"] for row in rows.values()):
        sys.exit("error: non-finite logits; the timings are not valid")


if __name__ == "__main__":
    main()
