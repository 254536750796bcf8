"""Quantize/dequantize primitives against hand-computed values, and packing round trips."""
import math

import pytest
import torch

from quantkit.formats import packing, primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.formats.schemes import ActivationSpec, WeightSpec


def test_symmetric_int4_per_channel_by_hand():
    # scale = absmax / 7.5 (the grid spans [-8, 7]): 3.75 -> 0.5 and 1.875 -> 0.25, exact in fp16
    w = torch.tensor([[-3.75, 1.0, 0.5, 3.75], [1.875, -0.25, 0.375, 0.0]])
    spec = WeightSpec(4, "channel", symmetric=True)
    scale, zero = primitives.weight_qparams(w, spec)
    assert zero is None
    assert torch.equal(scale, torch.tensor([[0.5], [0.25]]))
    codes = primitives.quantize(w, scale, zero, 4, 4)
    # -7.5 rounds half-to-even to -8; +7.5 rounds to 8 and is clipped to 7; 1.5 rounds to 2
    assert torch.equal(codes, torch.tensor([[-8, 2, 1, 7], [7, -1, 2, 0]], dtype=torch.int8))
    expected = torch.tensor([[-4.0, 1.0, 0.5, 3.5], [1.75, -0.25, 0.5, 0.0]])
    assert torch.equal(primitives.dequantize(codes, scale, zero, 4), expected)


def test_asymmetric_int4_group_by_hand():
    # group [-1, 0, 2.75]: range 3.75 -> scale 0.25, zero = -8 - round(-1 / 0.25) = -4
    # group [0, 1.5]: lo widened to 0, range 1.5 -> scale 0.1, zero = -8
    w = torch.tensor([[-1.0, 0.0, 2.75, 0.0, 1.5]])
    spec = WeightSpec(4, "group", symmetric=False, group_size=3)
    scale, zero = primitives.weight_qparams(w, spec)
    assert scale.shape == (1, 2)  # ragged: groups of 3 and 2
    assert scale[0, 0].item() == 0.25
    assert scale[0, 1].item() == torch.tensor(0.1, dtype=torch.float16).item()
    assert torch.equal(zero, torch.tensor([[-4.0, -8.0]]))
    codes = primitives.quantize(w, scale, zero, 3, 4)
    assert torch.equal(codes[0, :3], torch.tensor([-8, -4, 7], dtype=torch.int8))
    assert codes[0, 3].item() == -8 and codes[0, 4].item() == 7
    assert torch.allclose(primitives.dequantize(codes, scale, zero, 3), w, atol=1e-3)


def test_per_tensor_int8_one_scale():
    w = torch.tensor([[127.5, -255.0], [1.0, 2.0]])
    scale, _ = primitives.weight_qparams(w, WeightSpec(8, "tensor", True))
    assert scale.shape == (1, 1) and scale.item() == 2.0  # 255 / 127.5
    codes = primitives.quantize(w, scale, None, 2, 8)
    # 63.75 -> 64, -127.5 -> -128 (half-even), 0.5 -> 0 (half-even)
    assert torch.equal(codes, torch.tensor([[64, -128], [0, 1]], dtype=torch.int8))


def test_scales_are_fp16_values():
    w = torch.randn(16, 96)
    scale, zero = primitives.weight_qparams(w, WeightSpec(4, "group", False, 32))
    assert torch.equal(scale, scale.to(torch.float16).float())
    assert torch.equal(zero, torch.round(zero))


def test_per_token_activation_by_hand():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    codes, scale = primitives.quantize_activation_per_token(x, 8)
    assert torch.allclose(scale[0], torch.tensor([2.0 / 127]))
    # 1 / (2/127) = 63.5 -> 64 (half-even), -127, 31.75 -> 32
    assert torch.equal(codes[0], torch.tensor([64, -127, 32], dtype=torch.int8))
    assert torch.equal(codes[1], torch.zeros(3, dtype=torch.int8))


def test_static_asymmetric_activation_by_hand():
    spec = ActivationSpec(8, "tensor", symmetric=False)
    scale, zero = primitives.activation_qparams(torch.tensor(-1.0), torch.tensor(4.1), spec)
    assert scale.item() == pytest.approx(5.1 / 255)
    assert zero.item() == -128 - round(-1.0 / (5.1 / 255))  # -128 + 50 = -78
    x = torch.tensor([-1.0, 0.0, 4.1, 100.0])
    codes = primitives.quantize_activation_static(x, scale, zero, 8)
    assert codes.tolist() == [-128, -78, 127, 127]


def test_sqnr():
    ref = torch.tensor([3.0, 4.0])
    assert primitives.sqnr_db(ref, ref) == math.inf
    assert primitives.sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))


def test_quant_tensor_dequantize_matches_rtn_grid():
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    qt = quantize_rtn(w, WeightSpec(3, "group", False, 16))
    assert qt.ragged and qt.scale.shape == (8, 3)
    # Every code lies in the 3-bit range and the error is at most half a step per element.
    assert int(qt.codes.min()) >= -4 and int(qt.codes.max()) <= 3
    step = primitives.expand_to_columns(qt.scale, 40, 16)
    assert bool(((w - qt.dequantize()).abs() <= step / 2 + 1e-6).all())


def test_g_idx_selects_groups():
    codes = torch.tensor([[1, 1, 1, 1]], dtype=torch.int8)
    scale = torch.tensor([[1.0, 10.0]])
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    qt = QuantTensor(codes, scale, None, WeightSpec(8, "group", True, 2), g_idx)
    assert qt.dequantize().tolist() == [[10.0, 1.0, 10.0, 1.0]]


@pytest.mark.parametrize("bits", packing.PACKABLE_BITS)
@pytest.mark.parametrize("in_features", [1, 7, 31, 32, 33, 96, 100, 576])
def test_pack_round_trip(bits, in_features):
    generator = torch.Generator().manual_seed(bits * 1000 + in_features)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, in_features), generator=generator, dtype=torch.int8)
    words = packing.pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (5, packing.packed_words_per_row(in_features, bits))
    assert torch.equal(packing.unpack(words, bits, in_features), codes)


def test_pack_bit_order_by_hand():
    # 4-bit: code c -> unsigned c + 8; code i sits at bits [4i, 4i+4) -> 0xFEDCBA98 for codes 0..7
    codes = torch.arange(8, dtype=torch.int8)[None]
    assert packing.pack(codes, 4)[0, 0].item() & 0xFFFFFFFF == 0xFEDCBA98
    # 3-bit: code 10 (unsigned u) straddles words 0 and 1: bits 30..32
    codes = torch.full((1, 32), -4, dtype=torch.int8)  # unsigned 0
    codes[0, 10] = 3  # unsigned 7 = 0b111 -> bits 30, 31 of word 0 and bit 0 of word 1
    words = packing.pack(codes, 3)
    assert words[0, 0].item() & 0xFFFFFFFF == 0b11 << 30
    assert words[0, 1].item() == 1 and words[0, 2].item() == 0


@pytest.mark.parametrize("spec", [WeightSpec(4, "group", True, 32), WeightSpec(3, "group", False, 48),
                                  WeightSpec(8, "channel", True), WeightSpec(8, "channel", False),
                                  WeightSpec(8, "tensor", True)], ids=lambda s: s.describe())
def test_fake_quantize_weight_equals_rtn_round_trip(spec):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(primitives.fake_quantize_weight(w, spec), quantize_rtn(w, spec).dequantize())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_against_the_elementwise_check(dtype):
    """all_finite equals torch.isfinite(x).all(): also where finite values overflow the sum (decided element by
    element), and for a NaN, +Inf, -Inf or both infinities anywhere."""
    large = torch.finfo(dtype).max / 2
    cases = [torch.randn(4, 300).to(dtype), torch.full((4, 300), large, dtype=dtype),
             torch.tensor([large, -large, large], dtype=dtype)]
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(4, 300).to(dtype)
        x[2, 17] = bad
        cases.append(x)
    both = torch.randn(50).to(dtype)
    both[3], both[40] = float("inf"), float("-inf")
    cases.append(both)
    for x in cases:
        assert primitives.all_finite(x) == bool(torch.isfinite(x).all())
    assert [primitives.all_finite(x) for x in cases] == [True, True, True, False, False, False, False]
