"""Kernels of the quantized layers against independent references.

Strength ladder: integer accumulators and activation codes bit-exact; float outputs within the
rounding bound of their dtype against a dequantize-then-fp32/fp64-matmul reference; every scheme's
layer through the kernel path equal to QuantLinear's pure-torch forward.

Without a GPU the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on small shapes; `gpu` tests run the compiled kernels and skip without CUDA.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantkit.formats import packing, primitives  # noqa: E402
from quantkit.formats.quant_tensor import QuantTensor  # noqa: E402
from quantkit.algorithms.rtn import quantize_rtn  # noqa: E402
from quantkit.cuda import forward, layout, reference  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.model.qlinear import QuantLinear  # noqa: E402
from quantkit.formats.schemes import SCHEMES, ActivationSpec, WeightSpec  # noqa: E402

M_VALUES = (1, 7, 16, 33, 257)
# One ulp at 1.0 (twice the unit roundoff): Triton's interpreter converts fp32 -> bf16 by truncation,
# the GPU rounds to nearest; a bound of one ulp holds for both.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
HAS_GPU = torch.cuda.is_available() and forward.triton_import_error() is None


@pytest.fixture(scope="module")
def tk():
    """The Triton kernel module, usable in the CPU interpreter (skips cleanly otherwise)."""
    reason = forward.interpreter_error()
    if reason is not None:
        pytest.skip(f"Triton interpreter unavailable: {reason}")
    from quantkit.cuda import triton_kernels
    return triton_kernels


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(shape, bits, generator) -> torch.Tensor:
    qmin, qmax = primitives.signed_range(bits)
    return torch.randint(qmin, qmax + 1, shape, generator=generator, dtype=torch.int8)


def _int_accumulator_brute_force(a, b, a_zero, w_zero) -> torch.Tensor:
    """sum_k (a - zx)(b - zw) by explicit int64 products (no matmul)."""
    zx = 0 if a_zero is None else int(a_zero)
    zw = torch.zeros(b.shape[0], dtype=torch.int64) if w_zero is None else w_zero.long()
    return ((a.long()[:, None, :] - zx) * (b.long()[None, :, :] - zw[None, :, None])).sum(-1)


def _assert_within_rounding(y, ref, magnitude, dtype, factor=4.0):
    """|y - ref| <= factor * eps(dtype) * (magnitude + |ref|) elementwise, where magnitude is the sum of
    |products| of each output (the standard bound for a dot product with rounded operands)."""
    y, ref = y.double().cpu(), ref.double().cpu()
    bound = factor * EPS[dtype] * (magnitude.double().cpu() + ref.abs()) + 1e-30
    worst = ((y - ref).abs() / bound).max().item()
    assert torch.isfinite(y).all() and worst <= 1.0, f"error {worst:.2f}x the {dtype} rounding bound"


def _quant_linear(weight_spec: WeightSpec, activation: ActivationSpec | None, n: int, k: int, seed: int,
                  bias: bool = True, g_idx: bool = False, fractional_zero: bool = False) -> QuantLinear:
    generator = _gen(seed)
    w = torch.randn(n, k, generator=generator)
    quant = quantize_rtn(w, weight_spec)
    if g_idx:
        # act-order style: a column permutation of the group assignment
        perm = torch.randperm(k, generator=generator)
        quant = QuantTensor(quant.codes, quant.scale, quant.zero, quant.spec,
                            (torch.arange(k) // quant.group_size)[perm].to(torch.int32))
    if fractional_zero:
        quant = QuantTensor(quant.codes, quant.scale, quant.zero + 0.37, quant.spec, quant.g_idx)
    input_scale = input_zero = input_global_scale = None
    calibrated = (torch.tensor(-2.5), torch.tensor(3.1))
    if activation is not None and not activation.dynamic:
        input_scale, input_zero = primitives.activation_qparams(*calibrated, activation)
    if activation is not None and activation.second_scale is not None:
        input_global_scale = primitives.activation_global_scale(*calibrated, activation)
    b = torch.randn(n, generator=generator) if bias else None
    return QuantLinear(quant, activation, input_scale, input_zero, b, input_global_scale)


# ---------------------------------------------------------------------------------------------------
# References (always run): the op references compute exactly what QuantLinear computes.
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a_zero,w_zero", [(None, None), (5, None), (None, "w"), (-7, "w")])
def test_reference_accumulator_is_exact(a_zero, w_zero):
    g = _gen(0)
    a, b = _codes((9, 70), 8, g), _codes((11, 70), 8, g)
    zx = None if a_zero is None else torch.tensor([a_zero], dtype=torch.int32)
    zw = None if w_zero is None else torch.randint(-128, 128, (11,), generator=g, dtype=torch.int32)
    expected = _int_accumulator_brute_force(a, b, zx, zw)
    assert torch.equal(reference.int8_accumulator(a, b, zx, zw), expected)


KERNEL_SCHEMES = sorted(name for name, scheme in SCHEMES.items() if scheme.weight.k_format is None)


def test_k_quant_grids_have_no_kernel():
    """llama.cpp's K grids run in llama.cpp: the kernels refuse them in one line rather than compute a guess."""
    from quantkit.errors import QuantkitError

    spec = SCHEMES["q4_k"].weight
    layer = _quant_linear(spec, None, n=8, k=256, seed=1)
    with pytest.raises(QuantkitError, match="no kernel for layer <unnamed>: Q4_K is llama.cpp's grid"):
        forward.kernel_forward(layer, torch.randn(2, 256), backend="reference")


@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
def test_reference_ops_compute_quant_linear(scheme):
    """kernel_forward(backend=reference) == QuantLinear.forward (fp32), for every scheme: the prepared
    operands and the op references mean exactly the layer."""
    spec = SCHEMES[scheme]
    layer = _quant_linear(spec.weight, spec.activation, n=24, k=200, seed=1)
    x = torch.randn(2, 5, 200, generator=_gen(2)) * 2
    expected = layer(x)
    got = forward.kernel_forward(layer, x, backend="reference")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


LAYOUT_CASES = [  # bits, granularity, group size, act-order, fractional zeros
    *[(bits, gran, group, False, fractional) for bits, gran, group in
      ((4, "group", 64), (3, "group", 32), (2, "group", 16), (8, "channel", None), (4, "group", 48),
       (5, "tensor", None))
      for fractional in (False, True)],
    (4, "group", 64, True, False), (3, "group", 32, True, False), (2, "group", 16, True, True),
    (4, "group", 48, True, False),
]


@pytest.mark.parametrize("bits,granularity,group_size,g_idx,fractional", LAYOUT_CASES)
def test_reference_weight_only_layouts(bits, granularity, group_size, g_idx, fractional):
    """Packed / int8 kernel layouts, ragged groups (K=100), act-order and fractional zeros."""
    spec = WeightSpec(bits, granularity, False, group_size)
    layer = _quant_linear(spec, None, n=20, k=100, seed=3, g_idx=g_idx, fractional_zero=fractional)
    x = torch.randn(6, 100, generator=_gen(4))
    torch.testing.assert_close(forward.kernel_forward(layer, x, "reference"), layer(x), rtol=1e-5, atol=1e-5)
    operands = layout.prepare(layer)
    assert torch.equal(reference.unpack_weight(operands.weight, bits, 100), layer.weight_codes)


@pytest.mark.parametrize("bits,k", [(4, 70), (4, 64), (2, 70), (2, 33)])
def test_packed_layout_is_transposed_native_packing(bits, k):
    codes = _codes((6, k), bits, _gen(5))
    packed = layout.pack_weight(codes, bits)
    assert torch.equal(packed, packing.pack(codes, bits).T)
    assert packed.shape == (packing.packed_words_per_row(k, bits), 6)


@pytest.mark.parametrize("case,message", [
    ("g_idx", "act-order"), ("fractional", "fractional"), ("asym_group", "asymmetric group-wise"),
    ("act16", "int16 activations")])
def test_unsupported_layers_are_refused_by_name(case, message):
    activation = ActivationSpec(16 if case == "act16" else 8, "token", True)
    spec = WeightSpec(4, "group", case != "asym_group" and case != "fractional", 32)
    if case == "fractional":
        spec = WeightSpec(8, "channel", False)
    layer = _quant_linear(spec, activation, n=8, k=64, seed=6, g_idx=case == "g_idx",
                          fractional_zero=case == "fractional")
    with pytest.raises(QuantkitError, match=f"model.layers.3.mlp.up_proj.*{message}"):
        layout.prepare(layer, "model.layers.3.mlp.up_proj")


def test_torch_ops_registered_with_reference_cpu_kernels():
    """The quantkit:: ops: schema, fake (meta) kernels and CPU dispatch pass torch.library.opcheck, and
    on CPU they compute the references."""
    import quantkit.cuda.ops  # noqa: F401

    g = _gen(12)
    x = torch.randn(5, 40, generator=g, dtype=torch.bfloat16)
    a, b = _codes((5, 40), 8, g), _codes((12, 40), 8, g)
    a_scale, w_scale = torch.rand(5, generator=g), torch.rand(1, 12, generator=g)
    zx, zw = torch.tensor([2], dtype=torch.int32), torch.randint(-5, 5, (12,), generator=g, dtype=torch.int32)
    weight, scale = layout.pack_weight(_codes((12, 40), 4, g), 4), torch.rand(2, 12, generator=g).half()
    cases = [
        (torch.ops.quantkit.quantize_int8_dynamic, (x, 8)),
        (torch.ops.quantkit.quantize_int8_static, (x, torch.tensor([0.1]), torch.tensor([3.0]), 8)),
        (torch.ops.quantkit.int8_scaled_mm, (a, b, a_scale, w_scale, 40, zx, zw, layout.group_rowsum(b, 40),
                                             torch.randn(12, generator=g), torch.bfloat16)),
        (torch.ops.quantkit.weight_only_mm, (x, weight, 4, scale, None, 32, None, None, 40)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    expected = reference.int8_scaled_mm(*cases[2][1])
    assert torch.equal(torch.ops.quantkit.int8_scaled_mm(*cases[2][1]), expected)
    assert torch.equal(torch.ops.quantkit.weight_only_mm(*cases[3][1]), reference.weight_only_mm(*cases[3][1]))


def test_unknown_or_impossible_backend_is_a_clear_error():
    with pytest.raises(QuantkitError, match="unknown kernel backend"):
        forward.resolve_backend("cutlass", torch.device("cpu"))
    with pytest.raises(QuantkitError, match="needs a CUDA device"):
        forward.resolve_backend("triton", torch.device("cpu"))
    assert forward.resolve_backend("auto", torch.device("cpu")) == "reference"


# ---------------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter (small shapes).
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_kernels_bit_exact(tk, dtype):
    g = _gen(7)
    x = (torch.randn(7, 300, generator=g) * 4).to(dtype)
    x[0, :5] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5]).to(dtype) * 0.25   # exact ties for scale 0.25
    x[1] = 0.0                                                                # dead row: the scale floor
    codes, scale = tk.quantize_int8(x, None, None, -128, 127, interpret=True)
    ref_codes, ref_scale = reference.quantize_int8_dynamic(x, 8)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
    for zero in (None, torch.tensor([3.0])):
        static = tk.quantize_int8(x, torch.tensor([0.25]), zero, -128, 127, interpret=True)[0]
        assert torch.equal(static, reference.quantize_int8_static(x, torch.tensor([0.25]), zero, 8))
    four_bit = tk.quantize_int8(x, torch.tensor([0.25]), None, -8, 7, interpret=True)[0]
    assert torch.equal(four_bit, reference.quantize_int8_static(x, torch.tensor([0.25]), None, 4))


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("a_zero,w_zero", [(False, False), (True, False), (False, True), (True, True)])
def test_int8_gemm_accumulator_bit_exact(tk, m, a_zero, w_zero):
    g = _gen(m)
    n, k = 40, 80
    a, b = _codes((m, k), 8, g), _codes((n, k), 8, g)
    zx = torch.tensor([-9], dtype=torch.int32) if a_zero else None
    zw = torch.randint(-128, 128, (n,), generator=g, dtype=torch.int32) if w_zero else None
    rowsum = layout.group_rowsum(b, k) if a_zero else None
    acc = tk.int8_gemm(a, b, torch.ones(1), torch.ones(1, n), k, zx, zw, rowsum, None, torch.int32, interpret=True)
    assert torch.equal(acc.long(), _int_accumulator_brute_force(a, b, zx, zw))


@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_epilogue(tk, m, dtype, bias):
    g = _gen(100 + m)
    n, k = 40, 72
    a, b = _codes((m, k), 8, g), _codes((n, k), 8, g)
    per_token = m % 2 == 1
    a_scale = torch.rand(m if per_token else 1, generator=g) * 0.02 + 1e-3
    w_scale = (torch.rand(1, n if m > 7 else 1, generator=g) * 0.01 + 1e-4).half().float().expand(1, n).contiguous()
    zx, zw = torch.tensor([4], dtype=torch.int32), torch.randint(-20, 20, (n,), generator=g, dtype=torch.int32)
    b_vec = (torch.randn(n, generator=g)).to(dtype) if bias else None
    y = tk.int8_gemm(a, b, a_scale, w_scale, k, zx, zw, layout.group_rowsum(b, k), b_vec, dtype, interpret=True)
    ref = reference.int8_scaled_mm(a, b, a_scale, w_scale, k, zx, zw, None, b_vec, torch.float64)
    assert y.dtype == dtype
    _assert_within_rounding(y, ref, torch.zeros_like(ref), dtype, factor=1.0)   # one rounding of the output


@pytest.mark.parametrize("m", (1, 16, 33))
@pytest.mark.parametrize("a_zero", [False, True])
def test_int8_grouped_gemm_w4a8(tk, m, a_zero):
    """Group-wise int4 weights x int8 activations; K = 100 with groups of 32 (ragged last group)."""
    g = _gen(200 + m)
    n, k, group = 24, 100, 32
    a, b = _codes((m, k), 8, g), _codes((n, k), 4, g)
    groups = primitives.group_count(k, group)
    a_scale = torch.rand(m, generator=g) * 0.02
    w_scale = torch.rand(groups, n, generator=g) * 0.01
    zx = torch.tensor([11], dtype=torch.int32) if a_zero else None
    rowsum = layout.group_rowsum(b, group)
    y = tk.int8_gemm(a, b, a_scale, w_scale, group, zx, None, rowsum, None, torch.float32, interpret=True)
    # independent: dequantize both operands, fp64 matmul
    a_hat = (a.double() - (11 if a_zero else 0)) * a_scale.double()[:, None]
    w_hat = b.double() * w_scale.double().T[:, torch.arange(k) // group]
    torch.testing.assert_close(y.double(), a_hat @ w_hat.T, rtol=1e-5, atol=1e-6)


WEIGHT_ONLY_CASES = [  # bits, group size (None: per channel), zero kind, g_idx
    (4, 32, "int", False), (4, 64, "fractional", False), (4, 32, "int", True), (2, 16, "none", False),
    (8, None, "none", False), (3, 32, "int", False),
]


@pytest.mark.parametrize("bits,group,zero_kind,act_order", WEIGHT_ONLY_CASES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_only_gemm(tk, bits, group, zero_kind, act_order, m, dtype):
    """x @ dequantize(W)^T against the fp32 dequantize-then-matmul reference. K = 100 is not a multiple
    of the group size (ragged last group); M <= 4 takes the split-K GEMV kernel."""
    g = _gen(300 + m + bits)
    n, k = 48, 100
    group_size = group or k
    groups = primitives.group_count(k, group_size)
    codes = _codes((n, k), bits, g)
    scale = (torch.rand(groups, n, generator=g) * 0.05 + 0.01).half()
    zero = None if zero_kind == "none" else torch.randint(-2, 2, (groups, n), generator=g).half()
    if zero_kind == "fractional":
        zero = (zero.float() + 0.3).contiguous()
    g_idx = (torch.arange(k) // group_size)[torch.randperm(k, generator=g)].int() if act_order else None
    weight = layout.pack_weight(codes, bits)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    y = tk.weight_only_gemm(x, weight, bits, scale, zero, group_size, g_idx, bias, k, interpret=True)
    w = reference.dequantize_weight(weight, bits, scale, zero, group_size, g_idx, k)
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    assert y.dtype == dtype and y.shape == (m, n)
    _assert_within_rounding(y, ref, x.double().abs() @ w.double().abs().T, dtype)


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_weight_only_gemv_split_k(tk, split_k):
    g = _gen(400 + split_k)
    n, k, group_size = 40, 200, 64
    codes = _codes((n, k), 4, g)
    scale = (torch.rand(4, n, generator=g) * 0.05).half()
    x = torch.randn(3, k, generator=g, dtype=torch.float16)
    weight = layout.pack_weight(codes, 4)
    config = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split_k}
    y = tk.weight_only_gemm(x, weight, 4, scale, None, group_size, None, None, k, interpret=True, gemv_config=config)
    w = reference.dequantize_weight(weight, 4, scale, None, group_size, None, k)
    ref = x.double() @ w.double().T
    _assert_within_rounding(y, ref, x.double().abs() @ w.double().abs().T, torch.float16)


@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_scheme_through_the_interpreter(tk, scheme, dtype):
    """A whole layer: prepare + quantize + GEMM kernels == the reference ops on the same operands."""
    spec = SCHEMES[scheme]
    layer = _quant_linear(spec.weight, spec.activation, n=40, k=136, seed=7)
    x = (torch.randn(3, 7, 136, generator=_gen(8)) * 2).to(dtype)
    got = forward.kernel_forward(layer, x, "interpreter")
    expected = forward.kernel_forward(layer, x, "reference")
    assert got.shape == (3, 7, 40) and got.dtype == dtype
    magnitude = x.reshape(-1, 136).double().abs() @ layer.dequantized_weight().double().abs().T
    _assert_within_rounding(got.reshape(-1, 40), expected.reshape(-1, 40).double(), magnitude.reshape(-1, 40), dtype)


def test_kernel_modules_swaps_back_even_on_error(tk):
    model = torch.nn.Sequential(_quant_linear(WeightSpec(4, "group", False, 32), None, 16, 64, seed=9))
    with pytest.raises(RuntimeError, match="boom"):
        with forward.kernel_modules(model, "interpreter") as swapped:
            assert isinstance(model[0], forward.KernelLinear) and list(swapped) == ["0"]
            raise RuntimeError("boom")
    assert isinstance(model[0], QuantLinear)


def test_kernels_compile_for_hopper():
    """Every autotune config / GEMV candidate compiles to an sm_90 cubin (Triton's bundled ptxas, no GPU)
    within the shared-memory limit, with the matrix instructions meant for it."""
    if forward.triton_import_error() is not None:
        pytest.skip(f"Triton not installed: {forward.triton_import_error()}")
    script = ("import json; from quantkit.cuda.compile_check import hopper_builds; "
              "print(json.dumps([b.to_dict() for b in hopper_builds()]))")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    from quantkit.cuda.compile_check import HOPPER_SMEM_LIMIT
    builds = json.loads(run.stdout)
    assert len(builds) > 30
    for build in builds:
        assert build["shared_bytes"] <= HOPPER_SMEM_LIMIT, build
        if build["kernel"] == "quantize":   # bit-exact with torch: x / s correctly rounded, ties to even
            assert build["rounding"] == ["cvt.rni.f32.f32", "div.rn.f32"], build
        config = build["config"]
        if build["kernel"] in ("int8_gemm", "weight_only_gemm"):
            assert build["pipelined_copies"] > 0, build          # the K loop is software-pipelined
            big = config["BLOCK_M"] >= 64
            kind = "s8.s8" if build["kernel"] == "int8_gemm" else "bf16.bf16"
            assert any(kind in op and (op.startswith("wgmma") or not big) for op in build["mma"]), build


# ---------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU.
# ---------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and Triton")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", M_VALUES)
def test_gpu_int8_gemm_exact_and_epilogue(m):
    import quantkit.cuda.ops  # noqa: F401

    g = _gen(500 + m)
    n, k = 4096, 4096
    a, b = _codes((m, k), 8, g).cuda(), _codes((n, k), 8, g).cuda()
    zx = torch.tensor([3], dtype=torch.int32, device="cuda")
    zw = torch.randint(-50, 50, (n,), generator=g, dtype=torch.int32).cuda()
    rowsum = layout.group_rowsum(b, k)
    ones = torch.ones(1, n, device="cuda")
    acc = torch.ops.quantkit.int8_scaled_mm(a, b, torch.ones(1, device="cuda"), ones, k, zx, zw, rowsum, None,
                                            torch.int32)
    assert torch.equal(acc.cpu().long(), reference.int8_accumulator(a.cpu(), b.cpu(), zx.cpu(), zw.cpu()))
    a_scale = torch.rand(m, device="cuda") * 1e-3
    w_scale = torch.rand(1, n, device="cuda") * 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.quantkit.int8_scaled_mm(a, b, a_scale, w_scale, k, None, None, None, bias, torch.bfloat16)
    ref = reference.int8_scaled_mm(a.cpu(), b.cpu(), a_scale.cpu(), w_scale.cpu(), k, None, None, None, bias.cpu(),
                                   torch.float64)
    _assert_within_rounding(y, ref, torch.zeros_like(ref), torch.bfloat16, factor=1.0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_quantize_and_weight_only(m, dtype):
    import quantkit.cuda.ops  # noqa: F401

    g = _gen(600 + m)
    n, k, group_size = 4096, 4096 + 64, 128
    x = (torch.randn(m, k, generator=g) * 3).to(dtype).cuda()
    codes, scale = torch.ops.quantkit.quantize_int8_dynamic(x, 8)
    ref_codes, ref_scale = reference.quantize_int8_dynamic(x.cpu(), 8)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scale.cpu(), ref_scale)
    w_codes = _codes((n, k), 4, g)
    groups = primitives.group_count(k, group_size)
    w_scale = (torch.rand(groups, n, generator=g) * 0.02).half()
    zero = torch.randint(-3, 3, (groups, n), generator=g).half()
    weight = layout.pack_weight(w_codes, 4)
    y = torch.ops.quantkit.weight_only_mm(x, weight.cuda(), 4, w_scale.cuda(), zero.cuda(), group_size, None, None, k)
    w = reference.dequantize_weight(weight, 4, w_scale, zero, group_size, None, k)
    ref = x.cpu().double() @ w.double().T
    _assert_within_rounding(y, ref, x.cpu().double().abs() @ w.double().abs().T, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("scheme", KERNEL_SCHEMES)
def test_gpu_every_scheme_matches_reference(scheme):
    spec = SCHEMES[scheme]
    layer = _quant_linear(spec.weight, spec.activation, n=512, k=1000, seed=10).cuda()
    x = (torch.randn(33, 1000, generator=_gen(11)) * 2).to(torch.bfloat16).cuda()
    got = forward.kernel_forward(layer, x, "triton")
    expected = forward.kernel_forward(layer, x, "reference")
    magnitude = x.double().abs() @ layer.dequantized_weight().double().abs().T
    _assert_within_rounding(got, expected.double(), magnitude, torch.bfloat16)
