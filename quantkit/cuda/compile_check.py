"""Compile the Triton kernels for Hopper (sm_90) without a GPU: Triton's bundled ptxas builds the cubin.

What a CPU-only machine can check about the compiled path: every autotune config lowers to a cubin,
fits the 227 KiB of shared memory a block may use, and the matrix products use the instructions
meant for them (``wgmma ... s8.s8`` for the int8 GEMM, ``wgmma ... bf16`` for the weight-only GEMM).
Integer arguments are compiled with the divisibility-by-16 hints Triton's launcher gives shapes that
are multiples of 16 (the Llama shapes), which is what lets the loads pipeline.
Run in a process without TRITON_INTERPRET=1 (that setting turns triton.jit into the interpreter).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HOPPER_SMEM_LIMIT = 232448          # bytes of shared memory one block may use on sm_90 (227 KiB)
_DIVISIBLE = ("N", "K", "stride_am", "stride_bn", "stride_om", "stride_xm", "stride_wk")


@dataclass
class CompiledKernel:
    kernel: str
    config: dict
    shared_bytes: int
    mma: list[str]          # distinct wgmma / mma instructions in the PTX
    pipelined_copies: int   # async global->shared copies in the TTGIR (0: the K loop is not pipelined)
    rounding: list[str]     # correctly rounded division / round-to-nearest-even conversions in the PTX

    def to_dict(self) -> dict:
        return {"kernel": self.kernel, "config": self.config, "shared_bytes": self.shared_bytes, "mma": self.mma,
                "pipelined_copies": self.pipelined_copies, "rounding": self.rounding}


def _signature(kernel_name: str, dtype: str) -> dict[str, str]:
    i32 = "i32"
    if kernel_name == "quantize":
        return {"x_ptr": f"*{dtype}", "codes_ptr": "*i8", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "M": i32, "K": i32,
                "stride_xm": i32, "qmin": i32, "qmax": i32}
    if kernel_name == "int8_grouped_gemm":
        return {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": f"*{dtype}", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                "a_zero_ptr": "*i32", "w_rowsum_ptr": "*i32", "bias_ptr": f"*{dtype}", "M": i32, "N": i32, "K": i32,
                "M_BUCKET": i32, "group_size": i32, "num_groups": i32, "stride_am": i32, "stride_bn": i32,
                "stride_om": i32, "a_scale_stride": i32}
    if kernel_name == "int8_gemm":
        return {"a_ptr": "*i8", "b_ptr": "*i8", "out_ptr": f"*{dtype}", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
                "a_zero_ptr": "*i32", "w_zero_ptr": "*i32", "w_rowsum_ptr": "*i32", "bias_ptr": f"*{dtype}",
                "M": i32, "N": i32, "K": i32, "M_BUCKET": i32, "stride_am": i32, "stride_bn": i32,
                "stride_om": i32, "a_scale_stride": i32}
    common = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "g_idx_ptr": "*i32",
              "bias_ptr": f"*{dtype}"}
    if kernel_name == "weight_only_gemm":
        return {**common, "out_ptr": f"*{dtype}", "M": i32, "N": i32, "K": i32, "M_BUCKET": i32,
                "word_rows": i32, "stride_xm": i32, "stride_wk": i32, "stride_om": i32}
    if kernel_name == "weight_only_gemv":
        return {**common, "out_ptr": "*fp32", "M": i32, "N": i32, "K": i32, "word_rows": i32, "stride_xm": i32,
                "stride_wk": i32, "stride_om": i32}
    raise ValueError(kernel_name)


def compile_kernel(kernel_name: str, constexprs: dict, num_warps: int, num_stages: int,
                   dtype: str = "bf16") -> CompiledKernel:
    """Compile one kernel of `quantkit.cuda.triton_kernels` for sm_90 with the given meta-parameters."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantkit.cuda import triton_kernels

    fn = getattr(triton_kernels, f"_{'quantize_int8' if kernel_name == 'quantize' else kernel_name}_kernel")
    signature = _signature(kernel_name, dtype)
    names = list(signature)
    hints = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if name.endswith("_ptr") or name in _DIVISIBLE}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=triton.jit(fn), signature=signature, constexprs=dict(constexprs), attrs=hints)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    mma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]+|mma\.sync[\w.]+", ptx)))
    return CompiledKernel(kernel_name, {**constexprs, "num_warps": num_warps, "num_stages": num_stages},
                          compiled.metadata.shared, mma,
                          len(re.findall("async_copy_global_to_local|async_tma_copy", ttgir)),
                          sorted(set(re.findall(r"div\.rn\.f32|cvt\.rni\.f32\.f32", ptx))))


def hopper_builds(dtype: str = "bf16", limit: int | None = None) -> list[CompiledKernel]:
    """Compile every autotune config / GEMV candidate of the main kernel variants (``limit``: the first
    few of each list, for a quick check)."""
    from quantkit.cuda import triton_kernels as tk

    quantize = {"DYNAMIC": True, "HAS_ZERO": False, "EXACT_RINT": True, "ROWS": 1, "BLOCK_K": 4096}
    builds = [compile_kernel("quantize", quantize, 8, 1, dtype)]
    for config in tk.INT8_GEMM_CONFIGS[:limit]:
        flags = {"HAS_A_ZERO": False, "HAS_W_ZERO": False, "HAS_BIAS": False, "RAW_INT32": False}
        builds.append(compile_kernel("int8_gemm", {**config.kwargs, **flags}, config.num_warps, config.num_stages,
                                     dtype))
    flags = {"BITS": 4, "GROUP_SIZE": 128, "HAS_ZERO": True, "HAS_G_IDX": False, "HAS_BIAS": False}
    for config in tk.WEIGHT_ONLY_GEMM_CONFIGS[:limit]:
        builds.append(compile_kernel("weight_only_gemm", {**config.kwargs, **flags, "FP32_DOT": False},
                                     config.num_warps, config.num_stages, dtype))
    for candidate in tk.WEIGHT_ONLY_GEMV_CANDIDATES[:limit]:
        meta = {k: v for k, v in candidate.items() if k.isupper()}
        builds.append(compile_kernel("weight_only_gemv", {**meta, **flags, "BLOCK_M": 1}, candidate["num_warps"],
                                     candidate["num_stages"], dtype))
    builds += _variant_builds(dtype)
    return builds


def _variant_builds(dtype: str) -> list[CompiledKernel]:
    """One config of each other kernel flavour the launchers can request (zero points, bias, raw int32,
    group-wise int8, act-order, 2- and 8-bit weights, several-row GEMV), so none first fails on a GPU."""
    from quantkit.cuda import triton_kernels as tk

    int8 = tk.INT8_GEMM_CONFIGS[2]
    wo = tk.WEIGHT_ONLY_GEMM_CONFIGS[3]
    gemv = {k: v for k, v in tk.WEIGHT_ONLY_GEMV_CANDIDATES[1].items() if k.isupper()}
    builds = [
        compile_kernel("quantize", {"DYNAMIC": False, "HAS_ZERO": True, "EXACT_RINT": True, "ROWS": 1,
                                    "BLOCK_K": 1024}, 4, 1, dtype),
        compile_kernel("int8_gemm", {**int8.kwargs, "HAS_A_ZERO": True, "HAS_W_ZERO": True, "HAS_BIAS": True,
                                     "RAW_INT32": False}, int8.num_warps, int8.num_stages, dtype),
        compile_kernel("int8_gemm", {**int8.kwargs, "HAS_A_ZERO": True, "HAS_W_ZERO": True, "HAS_BIAS": False,
                                     "RAW_INT32": True}, int8.num_warps, int8.num_stages, "i32"),
        compile_kernel("int8_grouped_gemm", {**int8.kwargs, "HAS_A_ZERO": True, "HAS_BIAS": True},
                       int8.num_warps, int8.num_stages, dtype),
    ]
    for bits, group, g_idx in ((8, 4096, False), (2, 64, False), (4, 128, True), (4, 100, False)):
        flags = {"BITS": bits, "GROUP_SIZE": group, "HAS_ZERO": True, "HAS_G_IDX": g_idx, "HAS_BIAS": True}
        builds.append(compile_kernel("weight_only_gemm", {**wo.kwargs, **flags, "FP32_DOT": False},
                                     wo.num_warps, wo.num_stages, dtype))
        builds.append(compile_kernel("weight_only_gemv", {**gemv, **flags, "BLOCK_M": 4}, 4, 3, dtype))
    return builds
