"""Number formats as data (every grid against hand-written values, rounding against torch's own casts)
and the typed manifest sections (exact round trip)."""
import json

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.numbers import (
    ELEMENT_FORMATS,
    SCALE_FORMATS,
    element_format,
    scale_format,
)
from quantkit.formats.primitives import signed_range
from quantkit.formats.schemes import (
    WeightSpec,
    get_scheme,
    scheme_from_dict,
    scheme_to_dict,
)


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_grids(bits):
    signed, unsigned = element_format(f"int{bits}"), element_format(f"uint{bits}")
    assert signed.grid == tuple(float(v) for v in range(-(2 ** (bits - 1)), 2 ** (bits - 1)))
    assert unsigned.grid == tuple(float(v) for v in range(2**bits))
    assert signed_range(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def test_fp4_e2m1_grid_is_the_mx_table():
    positive = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # OCP MX spec, table of FP4 E2M1 values
    assert element_format("fp4_e2m1").grid == tuple(sorted({-v for v in positive} | set(positive)))


def test_fp8_grids_by_hand():
    e4m3, e5m2 = element_format("fp8_e4m3"), element_format("fp8_e5m2")
    assert (e4m3.max, len(e4m3.grid)) == (448.0, 253)            # 126 positive codes, no inf, one NaN
    assert e4m3.grid[127] == 2.0**-9 and e4m3.grid[127 + 7] == 2.0**-6 and e4m3.grid[-2] == 416.0
    assert (e5m2.max, len(e5m2.grid)) == (57344.0, 247)          # 123 positive codes
    assert e5m2.grid[124] == 2.0**-16 and e5m2.grid[-2] == 49152.0


@pytest.mark.parametrize("name, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_float_rounding_matches_torch_casts(name, dtype):
    fmt = element_format(name)
    grid = fmt.values()
    midpoints = (grid[1:] + grid[:-1]) / 2                      # exact ties: round half to even
    values = torch.cat([torch.randn(20000) * fmt.max / 8, torch.randn(2000) * 1e-3, grid, midpoints])
    values = values.clamp(fmt.min, fmt.max)
    assert torch.equal(fmt.round(values), values.to(dtype).float())
    assert fmt.round(torch.tensor([1e9, -1e9])).tolist() == [fmt.max, fmt.min]  # saturating


def test_fp4_rounding_ties_to_even():
    fmt = element_format("fp4_e2m1")
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -5.1])
    # ties go to the even code: 0.25 -> 0 (code 0), 0.75 -> 1.0 (code 2), 2.5 -> 2 (code 4), 5 -> 4 (code 6)
    assert fmt.round(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0]


def test_scale_formats():
    scales = torch.tensor([0.3, 1.0, 5.0, 1e-3, 3.14159])
    assert torch.equal(scale_format("fp16").round(scales), scales.half().float())
    assert torch.equal(scale_format("bf16").round(scales), scales.bfloat16().float())
    assert torch.equal(scale_format("fp8_e4m3").round(scales), scales.to(torch.float8_e4m3fn).float())
    assert scale_format("e8m0").round(scales).tolist() == [0.5, 1.0, 8.0, 2.0**-9, 4.0]
    assert set(SCALE_FORMATS) == {"fp32", "fp16", "bf16", "fp8_e4m3", "e8m0"}
    assert {"int4", "uint8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"} <= set(ELEMENT_FORMATS)


def test_unknown_names_suggest():
    with pytest.raises(QuantkitError, match="did you mean fp8_e4m3"):
        element_format("fp8_e4m4")
    with pytest.raises(QuantkitError, match="unknown scale format 'e8m1'"):
        scale_format("e8m1")


def test_weight_spec_names_its_formats_and_keeps_its_record():
    spec = WeightSpec(4, "group", False, 128)
    assert spec.element.name == "int4" and spec.scale_format == "fp16"
    scheme = get_scheme("w4a16")
    record = scheme_to_dict(scheme)
    assert "scale_format" not in record["weight"]            # integer schemes' records are unchanged
    assert scheme_from_dict(record) == scheme


def test_an_overridden_grid_is_summarised_as_it_is():
    """--sym on w4a16 (asymmetric by name): the manifest's summary says symmetric, not the named scheme's text."""
    scheme = get_scheme("w4a16")
    assert "asym" in scheme.summary
    symmetric = scheme.with_weight(symmetric=True, group_size=64)
    assert symmetric.summary == "w4a16 with weights int4 g64 sym, float activations"
    assert scheme.with_weight(symmetric=False) is scheme      # nothing changed: its own words


@pytest.mark.parametrize("fields, fragment", [
    ({"scale_format": "e8m0"}, "no weight grid has int codes with e8m0 scales per group"),
    ({"granularity": "block", "group_size": None, "block_shape": (128, 128)},
     "no weight grid has int codes with fp16 scales per block"),
    ({"second_scale": "fp32"}, "no weight grid has int codes with fp16 scales per group under a fp32 global"),
    ({"format": "fp4_e2m1", "scale_format": "fp32"}, "no weight grid has fp4_e2m1 codes with fp32 scales"),
    ({"format": "fp8_e4m3", "bits": 8, "scale_format": "fp32", "granularity": "block", "group_size": None},
     "block_shape is set exactly when granularity is 'block'"),
    ({"scale_format": "fp9"}, "unknown scale format 'fp9'"),
])
def test_weight_spec_refuses_grids_that_do_not_exist(fields, fragment):
    spec = {"bits": 4, "granularity": "group", "symmetric": True, "group_size": 32, **fields}
    with pytest.raises(QuantkitError, match=fragment):
        WeightSpec(**spec)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_tensor_codes_index_their_element_grid(bits):
    from quantkit.algorithms.rtn import quantize_rtn
    from quantkit.formats import packing
    from quantkit.formats.quant_tensor import QuantTensor

    quant = quantize_rtn(torch.randn(16, 64), WeightSpec(bits, "group", True, 32))
    assert isinstance(quant, QuantTensor) and quant.spec.element.name == f"int{bits}"
    indices = quant.grid_indices()
    assert torch.equal(quant.spec.element.values()[indices.long()], quant.codes.float())
    # the packed file stores exactly these indices: code 0 of each row in the low bits of word 0
    words = packing.pack(quant.codes, bits)
    if bits < 8:
        assert torch.equal(words[:, 0] & ((1 << bits) - 1), indices[:, 0].to(torch.int32))


def test_manifest_sections_round_trip(llama_dir, tmp_path):
    from quantkit.native.manifest import (
        CalibrationInfo,
        Manifest,
        SmoothingInfo,
        Summary,
    )
    from quantkit.run.pipeline import CalibrateConfig, calibrate

    for scheme, algorithm in (("smq_q8i8f16_2", "rtn"), ("w4a16", "rtn")):  # calibrated and calibration-free
        out = tmp_path / scheme
        calibrate(CalibrateConfig(model=str(llama_dir), scheme=scheme, algorithm=algorithm, out=out,
                                  num_samples=4, seq_len=32, batch_size=4))
        text = (out / "quant_manifest.json").read_text()
        manifest = Manifest.load(out)
        assert isinstance(manifest.calibration, CalibrationInfo) and isinstance(manifest.summary, Summary)
        assert isinstance(manifest.smoothing, SmoothingInfo)
        assert Manifest.from_dict(manifest.to_dict()) == manifest
        assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text   # the file is exactly its sections
    assert manifest.calibration.skipped and manifest.calibration.to_dict() == {
        "dataset": None, "skipped": manifest.calibration.skipped}
    assert manifest.smoothing.to_dict() == {"enabled": False}
