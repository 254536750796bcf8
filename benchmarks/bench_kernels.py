"""Kernel speed against the H100 limits and against torch.matmul in bf16, measured in the same run.

For every Llama-2-7B linear shape (K -> N: 4096 -> 4096 q/k/v/o, 4096 -> 11008 gate/up, 11008 -> 4096
down) and M in {1, 16, 128, 512, 2048, 8192} tokens it times, with ``triton.testing.do_bench`` (median
of repeated runs, L2 flushed between runs):
  bf16      torch.matmul(x, W^T), x and W bf16 (cuBLAS): the baseline of every ratio
  w8a8      quantkit::int8_scaled_mm on pre-quantized int8 activations (per-token scale, per-channel
            weight scale, bf16 out): the int8 GEMM itself
  w8a8+q    the same plus quantkit::quantize_int8_dynamic of the bf16 activations (what a layer costs)
  w4a16     quantkit::weight_only_mm, int4 group-128 asymmetric weights, bf16 activations
and prints TFLOPS (2*M*N*K / t), % of the H100 SXM peak (bf16 989 TFLOPS for bf16 and w4a16, int8 1979
TOPS for w8a8), achieved bandwidth (weights + activations + output bytes / t, vs 3.35 TB/s on an H100,
4.8 on an H200) and the
ratio t_bf16 / t_kernel. Each kernel's output is first checked against the bf16 reference (relative
error), so a fast wrong kernel cannot report a number. Targets (docs/kernels.md): w8a8 >= 1.6x bf16 at
M >= 2048 and >= 1x at M >= 128; w4a16 >= 2.5x at M = 1; the M where w4a16 crosses 1x is reported.

    python benchmarks/bench_kernels.py [--json results.json] [--cuda-graph]   # on a CUDA GPU
    python benchmarks/bench_kernels.py --compile-only                          # sm_90 builds, no GPU
    python benchmarks/bench_kernels.py --smoke                                 # CPU: Triton interpreter,
                                                                               # tiny shapes, no timing claims
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

PEAK_BF16_TFLOPS = 989.0
PEAK_INT8_TOPS = 1979.0
PEAK_BANDWIDTH_TBS = {"H100": 3.35, "H200": 4.8}   # HBM3 / HBM3e datasheet; same bf16/int8 peaks on both
LLAMA2_7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]      # (K, N): in_features -> out_features
M_VALUES = [1, 16, 128, 512, 2048, 8192]
SMOKE_SHAPES = [(96, 64), (64, 160)]
SMOKE_M = [1, 16, 33]
GROUP_SIZE = 128


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU Triton interpreter, tiny shapes (proves it runs)")
    parser.add_argument("--compile-only", action="store_true", help="compile every config for sm_90, no GPU needed")
    parser.add_argument("--m", default=None, help="comma-separated M values (default 1,16,128,512,2048,8192)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time with triton.testing.do_bench_cudagraph (no launch overhead)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args()


def make_operands(k: int, n: int, device, seed: int = 0):
    """Random int8 per-channel and int4 g128 asym weights in the kernel layouts, plus the bf16 weight they
    dequantize to (the baseline multiplies the same function)."""
    import torch

    from quantkit.formats import primitives
    from quantkit.cuda import layout

    generator = torch.Generator(device="cpu").manual_seed(seed)
    codes8 = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale8 = (torch.rand(1, n, generator=generator) * 2e-3 + 1e-4).half().float()
    codes4 = torch.randint(-8, 8, (n, k), generator=generator, dtype=torch.int8)
    groups = primitives.group_count(k, GROUP_SIZE)
    scale4 = (torch.rand(groups, n, generator=generator) * 2e-2 + 1e-3).half()
    zero4 = torch.randint(-2, 2, (groups, n), generator=generator).half()
    ops = {
        "codes8": codes8.to(device), "scale8": scale8.to(device),
        "packed4": layout.pack_weight(codes4.to(device), 4), "scale4": scale4.to(device), "zero4": zero4.to(device),
    }
    w8 = (codes8.float() * scale8.T).to(device)
    w4 = primitives.dequantize(codes4, scale4.float().T, zero4.float().T, GROUP_SIZE).to(device)
    return ops, w8, w4


def kernels_for(backend: str):
    """Callables (x_bf16 -> y) of each kernel, through the torch ops (GPU) or the interpreter (smoke)."""
    import torch

    if backend == "triton":
        import quantkit.cuda.ops  # noqa: F401
        q = torch.ops.quantkit

        def quantize(x):
            return q.quantize_int8_dynamic(x, 8)

        def int8_mm(a, a_scale, ops):
            return q.int8_scaled_mm(a, ops["codes8"], a_scale, ops["scale8"], a.shape[1], None, None, None, None,
                                    torch.bfloat16)

        def w4(x, ops):
            return q.weight_only_mm(x, ops["packed4"], 4, ops["scale4"], ops["zero4"], GROUP_SIZE, None, None,
                                    x.shape[1])
        return quantize, int8_mm, w4
    from quantkit.cuda import triton_kernels as tk

    def quantize(x):
        return tk.quantize_int8(x, None, None, -128, 127, interpret=True)

    def int8_mm(a, a_scale, ops):
        return tk.int8_gemm(a, ops["codes8"], a_scale, ops["scale8"], a.shape[1], None, None, None, None,
                            torch.bfloat16, interpret=True)

    def w4(x, ops):
        return tk.weight_only_gemm(x, ops["packed4"], 4, ops["scale4"], ops["zero4"], GROUP_SIZE, None, None,
                                   x.shape[1], interpret=True)
    return quantize, int8_mm, w4


def rel_error(y, reference) -> float:
    return ((y.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-30)).item()


def timer(smoke: bool, cuda_graph: bool):
    if smoke:
        def run_once(fn):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return run_once
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph:
        return lambda fn: do_bench_cudagraph(fn, rep=100, return_mode="median")
    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_bandwidth(device_name: str) -> float:
    """Datasheet bandwidth in TB/s of the named card (the H100's where the name is neither)."""
    return next((tbs for chip, tbs in PEAK_BANDWIDTH_TBS.items() if chip in device_name), PEAK_BANDWIDTH_TBS["H100"])


def bench_shape(k, n, m_values, device, backend, measure):
    import torch

    ops, w8, w4 = make_operands(k, n, device)
    bandwidth = peak_bandwidth(torch.cuda.get_device_name() if device == "cuda" else "")
    w_bf16 = w8.to(torch.bfloat16)
    quantize, int8_mm, w4_mm = kernels_for(backend)
    rows = []
    for m in m_values:
        x = torch.randn(m, k, device=device).to(torch.bfloat16)
        a, a_scale = quantize(x)
        checks = {
            "w8a8": rel_error(int8_mm(a, a_scale, ops), (a.float() * a_scale[:, None]) @ w8.T),
            "w4a16": rel_error(w4_mm(x, ops), x.float() @ w4.T),
        }
        times = {
            "bf16": measure(lambda: torch.matmul(x, w_bf16.T)),
            "w8a8": measure(lambda: int8_mm(a, a_scale, ops)),
            "w8a8+q": measure(lambda: int8_mm(*quantize(x), ops)),
            "w4a16": measure(lambda: w4_mm(x, ops)),
        }
        flops = 2.0 * m * n * k
        weight_bytes = {"bf16": 2 * n * k, "w8a8": n * k, "w8a8+q": n * k,
                        "w4a16": n * k // 2 + 4 * n * k // GROUP_SIZE}   # codes + fp16 scale and zero per group
        act_bytes = {"bf16": 2 * m * k, "w8a8": m * k, "w8a8+q": 3 * m * k, "w4a16": 2 * m * k}
        for kind, ms in times.items():
            peak = PEAK_INT8_TOPS if kind.startswith("w8a8") else PEAK_BF16_TFLOPS
            tflops = flops / (ms * 1e-3) / 1e12
            moved = weight_bytes[kind] + act_bytes[kind] + 2 * m * n
            rows.append({"K": k, "N": n, "M": m, "kernel": kind, "ms": ms, "tflops": tflops,
                         "pct_peak": 100 * tflops / peak, "tb_per_s": moved / (ms * 1e-3) / 1e12,
                         "pct_bandwidth": 100 * moved / (ms * 1e-3) / 1e12 / bandwidth,
                         "ratio_vs_bf16": times["bf16"] / ms,
                         "rel_error": checks.get(kind if kind != "w8a8+q" else "w8a8")})
    return rows


def crossover(rows, k, n) -> str:
    """The M where w4a16 / bf16 crosses 1x, interpolated in log M between measured points."""
    points = sorted((r["M"], r["ratio_vs_bf16"]) for r in rows
                    if r["K"] == k and r["N"] == n and r["kernel"] == "w4a16")
    for (m0, r0), (m1, r1) in zip(points, points[1:]):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            t = (r0 - 1) / (r0 - r1)
            return f"~{math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0))):.0f}"
    if points and all(r >= 1 for _, r in points):
        return f"> {points[-1][0]} (never below 1x)"
    return f"< {points[0][0]}" if points else "n/a"


def targets(rows) -> list[str]:
    """One line per shape: each speed target met or missed, with the measured ratio."""
    def verdict(values, goal):
        if not values:
            return "not measured"
        return f"{'met' if min(values) >= goal else 'MISSED'} (min {min(values):.2f}x)"

    lines = []
    for k, n in sorted({(r["K"], r["N"]) for r in rows}):
        ratio = {(r["kernel"], r["M"]): r["ratio_vs_bf16"] for r in rows if r["K"] == k and r["N"] == n}
        w8 = {m: v for (kind, m), v in ratio.items() if kind == "w8a8"}
        lines.append(f"{k}->{n}: w8a8 >= 1.6x at M >= 2048: {verdict([v for m, v in w8.items() if m >= 2048], 1.6)}; "
                     f"w8a8 >= 1x at M >= 128: {verdict([v for m, v in w8.items() if m >= 128], 1.0)}; "
                     f"w4a16 >= 2.5x at M = 1: {verdict([ratio[('w4a16', 1)]] if ('w4a16', 1) in ratio else [], 2.5)}; "
                     f"w4a16 crosses 1x at M {crossover(rows, k, n)}")
    return lines


def print_table(rows, title: str) -> None:
    print(title)
    print(f"{'K->N':>12} {'M':>5} {'kernel':>7} {'ms':>9} {'TFLOPS':>8} {'%peak':>6} {'TB/s':>6} {'%BW':>5} "
          f"{'x bf16':>7} {'rel err':>8}")
    for r in rows:
        err = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        print(f"{r['K']:>5}->{r['N']:<6} {r['M']:>5} {r['kernel']:>7} {r['ms']:>9.4f} {r['tflops']:>8.1f} "
              f"{r['pct_peak']:>6.1f} {r['tb_per_s']:>6.2f} {r['pct_bandwidth']:>5.0f} {r['ratio_vs_bf16']:>7.2f} "
              f"{err:>8}")


def compile_only(args) -> None:
    from quantkit.cuda.compile_check import HOPPER_SMEM_LIMIT, hopper_builds

    builds = hopper_builds()
    print(f"{'kernel':<18} {'config':<58} {'smem KiB':>8} {'pipelined':>9}  mma")
    for b in builds:
        config = {k: v for k, v in b.config.items()
                  if k.startswith("BLOCK") or k in ("SPLIT_K", "num_warps", "num_stages")}
        flag = "" if b.shared_bytes <= HOPPER_SMEM_LIMIT else "  OVER LIMIT"
        print(f"{b.kernel:<18} {json.dumps(config):<58} {b.shared_bytes / 1024:>8.1f} {b.pipelined_copies:>9}  "
              f"{','.join(b.mma) or '-'}{flag}")
    if args.json:
        args.json.write_text(json.dumps([b.to_dict() for b in builds], indent=2))


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"          # before Triton is imported
    if args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
        return compile_only(args)
    import torch

    from quantkit.cuda.forward import interpreter_error, triton_import_error

    if args.smoke:
        if interpreter_error():
            sys.exit(f"error: {interpreter_error()}")
        device, backend, shapes = "cpu", "interpreter", SMOKE_SHAPES
        m_values = [int(v) for v in args.m.split(",")] if args.m else SMOKE_M
    else:
        if not torch.cuda.is_available() or triton_import_error():
            sys.exit("error: needs a CUDA GPU and Triton (use --smoke on CPU, --compile-only without a GPU)")
        device, backend, shapes = "cuda", "triton", LLAMA2_7B_SHAPES
        m_values = [int(v) for v in args.m.split(",")] if args.m else M_VALUES
    measure = timer(args.smoke, args.cuda_graph)
    rows = []
    for k, n in shapes:
        rows += bench_shape(k, n, m_values, device, backend, measure)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: timings are meaningless)"
    import triton

    title = (f"{name}; torch {torch.__version__}, triton {triton.__version__}; "
             f"{'do_bench_cudagraph' if args.cuda_graph else 'do_bench'} median" if not args.smoke else name)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                                         "cuda_graph": args.cuda_graph, "rows": rows}, indent=2))
    worst = max(r["rel_error"] for r in rows if r["rel_error"] is not None)
    print_table(rows, title)
    if not args.smoke:
        print("\n".join(targets(rows)))
    print(f"largest relative error vs the bf16/fp32 reference: {worst:.2e}")
    if worst > 2e-2:
        sys.exit("error: a kernel disagrees with its reference; its timings are not valid")


if __name__ == "__main__":
    main()
