"""compressed-tensors export of SmolLM2-135M, loaded back by transformers (CPU) and compared with quantkit.

For each scheme, ``quantkit calibrate smollm2-135m --scheme S ...`` then ``quantkit export OUT --format
compressed-tensors``; the directory is loaded with ``AutoModelForCausalLM.from_pretrained`` (the
compressed-tensors package; asymmetric pack-quantized with ``CompressedTensorsConfig(dequantize=True)``,
see docs/compressed-tensors.md) and its logits are compared with ``quantkit.load_quantized(OUT)``. For
dynamic per-token activations the same file is also compared with quantkit's model computing
compressed-tensors' own per-token scale (absmax/127.5; quantkit and vLLM use absmax/127), which
separates the file's correctness from the runtime's definition of the dynamic scale.

Protocol (as tests/test_smollm2.py): calibration on the first half of the bundled Alice in Wonderland
text (--num-samples x --seq-len tokens), perplexity, KL and top-1 agreement over --windows
non-overlapping 512-token windows of the second half (held out), float32 on CPU.

    python benchmarks/bench_compressed_tensors.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch

import common

# (label, CalibrateConfig overrides). SmolLM2's hidden size 576 is not a multiple of 128, so the
# default w4a16 group of 128 would leave ragged groups, which compressed-tensors refuses: group 64.
SCHEMES = {
    "w4a16": ("w4a16 g64 asym (rtn)", dict(scheme="w4a16", group_size=64)),
    "w8a8_dynamic": ("w8a8_dynamic (smoothquant + rtn)", dict(scheme="w8a8_dynamic")),
    "smq_q8i8f16_1": ("smq_q8i8f16_1 static (smoothquant + rtn)", dict(scheme="smq_q8i8f16_1")),
}


def consumer_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' CPU definition of dynamic symmetric per-token int8 (calculate_qparams):
    scale = absmax / ((qmax - qmin) / 2) = absmax / 127.5, codes = clamp(round(x / scale), -128, 127).
    quantkit and vLLM's kernel use absmax / 127."""
    from quantkit.formats import primitives

    qmin, qmax = primitives.signed_range(bits)
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=primitives.MIN_ACTIVATION_SCALE)
    return torch.round(xf / scale).clamp(qmin, qmax).to(torch.int8), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, of {', '.join(SCHEMES)}")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--workdir", type=Path, help="keep outputs here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = common.in_workdir(args.workdir, "bench-ct-", lambda workdir: run(args, workdir))
    print(f"model: {results['model']}\nprotocol: {results['protocol']}\n")
    print("| scheme | format | transformers ppl | quantkit ppl | ppl diff | top-1 agreement | KL | "
          "top-1 / KL vs quantkit computing compressed-tensors' per-token scale |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        consumer = "" if "top1_consumer_definition" not in row else \
            f"{100 * row['top1_consumer_definition']:.2f}% / {row['kl_consumer_definition']:.2e}"
        print(f"| {row['scheme']} | {row['format']} | {row['transformers_ppl']:.4f} | {row['quantkit_ppl']:.4f} | "
              f"{100 * (row['transformers_ppl'] / row['quantkit_ppl'] - 1):+.3f}% | {100 * row['top1']:.2f}% | "
              f"{row['kl']:.2e} | {consumer} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run(args, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantkit.formats import primitives
    from quantkit.model.checkpoint import resolve_model
    from quantkit.check.evaluate import compare
    from quantkit.exporters.compressed_tensors import export_compressed_tensors
    from quantkit.native.loader import load_quantized
    from quantkit.run.pipeline import CalibrateConfig, calibrate

    source = resolve_model(args.model).path
    calibration_file, windows, protocol = common.alice_split(workdir, source, args.windows, args.num_samples,
                                                             args.seq_len)
    rows = []
    for key in args.schemes.split(","):
        label, options = SCHEMES[key]
        out = workdir / key
        calibrate(CalibrateConfig(model=str(source), dataset=str(calibration_file), num_samples=args.num_samples,
                                  seq_len=args.seq_len, out=out, overwrite=True, **options))
        started = time.perf_counter()
        result = export_compressed_tensors(out, workdir / f"{key}-ct", overwrite=True)
        export_s = time.perf_counter() - started
        config = json.loads((result.out / "config.json").read_text())["quantization_config"]
        weights = config["config_groups"]["group_0"]["weights"]
        dequantize = config["format"] == "pack-quantized" and not weights["symmetric"]
        extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
        model = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32, **extra).eval()
        reference = load_quantized(out, dtype=torch.float32)
        agreement = compare(model, reference, windows)
        row = {"scheme": label, "format": config["format"], "transformers_ppl": agreement.perplexity,
               "quantkit_ppl": agreement.reference_perplexity, "top1": agreement.top1_agreement,
               "kl": agreement.kl_divergence, "export_s": export_s, "size_mib": result.size_bytes / 2**20,
               "loaded_with_dequantize": dequantize}
        if any(g["input_activations"] and g["input_activations"]["dynamic"] for g in config["config_groups"].values()):
            # The same file against quantkit's model computing the consumer's own per-token definition:
            # isolates the file (weights, scales, config) from the runtime's choice of dynamic scale.
            with mock.patch.object(primitives, "quantize_activation_per_token", consumer_per_token):
                same_definition = compare(model, reference, windows)
            row.update(top1_consumer_definition=same_definition.top1_agreement,
                       kl_consumer_definition=same_definition.kl_divergence)
        rows.append(row)
    return {"model": args.model, "protocol": protocol, "rows": rows}


if __name__ == "__main__":
    main()
