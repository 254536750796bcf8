"""HQQ speed, quantkit vs the hqq package, in one process on the same weights (run with a Python that
has hqq; quantkit is imported from this checkout).

    PYTHONPATH=. /work/peers-venv/bin/python benchmarks/bench_hqq_speed.py [--bits 4 3] [--repeats 3]

For every decoder-block Linear of SmolLM2-135M (210 weights, fp32 on CPU), times quantkit's
`hqq_quantize` and hqq's `HQQLinear` construction (which runs its zero-point optimiser) at group 64,
asymmetric, and reports the median of --repeats full passes of each, alternating, plus both
reconstructions' mean |W - W_hat| (HQQ's own objective is an lp loss; this is the plain error).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import common


def weights() -> list[torch.Tensor]:
    model = common.float_model()
    return [m.weight.detach().clone() for block in model.model.layers for m in block.modules()
            if isinstance(m, torch.nn.Linear)]


def run_quantkit(ws: list[torch.Tensor], bits: int) -> tuple[float, float]:
    from quantkit.algorithms.hqq import hqq_quantize
    from quantkit.formats.schemes import WeightSpec

    spec = WeightSpec(bits, "group", False, 64)
    start = time.perf_counter()
    quants = [hqq_quantize(w, spec)[0] for w in ws]
    seconds = time.perf_counter() - start
    error = statistics.fmean((q.dequantize() - w).abs().mean().item() for q, w in zip(quants, ws))
    return seconds, error


def run_hqq(ws: list[torch.Tensor], bits: int) -> tuple[float, float]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=64)
    linears = []
    for w in ws:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.clone()
        linears.append(linear)
    start = time.perf_counter()
    quants = [HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu") for linear in linears]
    seconds = time.perf_counter() - start
    error = statistics.fmean((q.dequantize().float() - w).abs().mean().item() for q, w in zip(quants, ws))
    return seconds, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ws = weights()
    print(f"| bits | quantkit s (median of {args.repeats}) | hqq s (median) | quantkit / hqq | "
          "quantkit mean abs err | hqq mean abs err |")
    print("|---|---|---|---|---|---|")
    for bits in args.bits:
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so drifts of the machine hit both alike
            ours.append(run_quantkit(ws, bits))
            theirs.append(run_hqq(ws, bits))
        q_s, h_s = statistics.median(s for s, _ in ours), statistics.median(s for s, _ in theirs)
        row = {"bits": bits, "quantkit_s": q_s, "hqq_s": h_s, "ratio": q_s / h_s,
               "quantkit_error": ours[0][1], "hqq_error": theirs[0][1],
               "quantkit_all_s": [s for s, _ in ours], "hqq_all_s": [s for s, _ in theirs]}
        print(f"| {bits} | {q_s:.2f} | {h_s:.2f} | {q_s / h_s:.2f}x | {ours[0][1]:.6f} | {theirs[0][1]:.6f} |",
              flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
