"""``quantkit validate``: kernels vs references on regenerated calibration activations, and a damaged
model must fail naming the damaged layer."""
import hashlib
import json
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports Triton

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from quantkit.cli.main import cli  # noqa: E402
from quantkit.cuda import forward  # noqa: E402
from quantkit.native.manifest import Manifest  # noqa: E402
from quantkit.run.pipeline import CalibrateConfig, calibrate  # noqa: E402
from quantkit.check.validate import ValidateConfig, validate  # noqa: E402

SMALL = ["--device", "cpu", "--num-samples", "2"]   # at the calibration sequence length (32)


def run(*args):
    return CliRunner().invoke(cli, ["validate", *[str(a) for a in args]])


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def quantized(llama_dir, tmp_path_factory):
    """One calibrated model per kernel family: W8A8 with asymmetric static activations and asymmetric
    per-channel weights (the zero-point correction path), W4A16 g128 asym (packed int4), and W4A16 by AWQ
    (whose recorded scale folds and clipping the float reference must replay)."""
    outs = {}
    for label, scheme, algorithm in (("smq_q8i8f16_2", "smq_q8i8f16_2", "rtn"), ("w4a16", "w4a16", "rtn"),
                                     ("w4a16_awq", "w4a16", "awq")):
        out = tmp_path_factory.mktemp("validate") / label
        calibrate(CalibrateConfig(model=str(llama_dir), scheme=scheme, algorithm=algorithm, num_samples=4, seq_len=32,
                                  batch_size=4, out=out))
        outs[label] = out
    return outs


@pytest.fixture()
def copy_of(quantized, tmp_path):
    def make(scheme):
        target = tmp_path / scheme
        shutil.copytree(quantized[scheme], target)
        return target
    return make


@pytest.mark.parametrize("scheme", ["smq_q8i8f16_2", "w4a16", "w4a16_awq"])
def test_validate_passes_and_records(copy_of, scheme):
    out = copy_of(scheme)
    weights_before = _digest(out / "model.safetensors")
    report = validate(ValidateConfig(out, backend="reference", device="cpu", num_samples=2, seq_len=32))
    assert report.passed, report.failures
    assert report.backend == "reference"
    if scheme == "w4a16":   # RTN weight-only needs no calibration data: the bundled text stands in
        assert report.activations["source"].startswith("bundled text") and "no calibration dataset" in \
            report.activations["reason"]
    else:
        assert report.activations["source"] == "calibration dataset"
    manifest = Manifest.load(out)
    assert len(report.layers) == len(manifest.layers) == 14
    for name, layer in report.layers.items():
        # the float reference replays the recorded smoothing exactly: calibration's weight SQNR comes back
        assert layer.weight_sqnr_db == pytest.approx(manifest.layers[name].metrics["weight_sqnr_db"], abs=1e-6)
        assert layer.kernel_sqnr_db > 80 and layer.kernel_max_rel_error < 1e-4
        assert layer.kernel_float_sqnr_db >= layer.expected_min_sqnr_db
    e2e = report.end_to_end
    assert e2e["kernel_vs_reference_top1_agreement"] == 1.0 and 0 <= e2e["kernel_kl_divergence"] < 0.05
    # written: validation.json and the manifest summary; the weights untouched, the manifest still loads
    written = json.loads((out / "validation.json").read_text())
    assert written["passed"] and set(written["layers"]) == set(manifest.layers)
    assert manifest.summary.validation["passed"] and manifest.summary.validation["report"] == "validation.json"
    assert _digest(out / "model.safetensors") == weights_before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]          # no temporary files left


@pytest.mark.parametrize("scheme,corruption", [("smq_q8i8f16_2", "zero"), ("w4a16", "flip")])
def test_damaged_codes_fail_naming_the_layer(copy_of, scheme, corruption):
    out = copy_of(scheme)
    layer = "model.layers.1.self_attn.o_proj" if scheme == "w4a16" else "model.layers.0.mlp.up_proj"
    tensors = load_file(str(out / "model.safetensors"))
    codes = tensors[f"{layer}.weight_codes"]
    if corruption == "zero":
        tensors[f"{layer}.weight_codes"] = torch.zeros_like(codes)
    else:   # int4 packed words: flip the sign bit of every code (u ^ 8 turns code c into c -/+ 8)
        tensors[f"{layer}.weight_codes"] = codes ^ 0x08888888 ^ torch.tensor(-0x80000000, dtype=torch.int32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    result = run(out, *SMALL, "--quiet")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: validation failed: {layer}: damaged or misread weights"), \
        result.output
    report = json.loads((out / "validation.json").read_text())
    assert not report["passed"] and not report["layers"][layer]["passed"]
    assert Manifest.load(out).summary.validation["passed"] is False


def test_kernel_disagreement_fails(copy_of, monkeypatch):
    out = copy_of("smq_q8i8f16_2")
    real = forward.ReferenceOps.int8_mm

    def off_by_a_bit(self, *args):
        y = real(self, *args)
        return y * 1.01
    monkeypatch.setattr(forward.ReferenceOps, "int8_mm", off_by_a_bit)
    report = validate(ValidateConfig(out, backend="reference", device="cpu", num_samples=2, write=False))
    assert not report.passed
    assert all("kernel disagrees with the reference" in failure for failure in report.failures)
    assert len(report.failures) == 14


def test_interpreter_backend_json(copy_of):
    if forward.interpreter_error() is not None:
        pytest.skip(f"Triton interpreter unavailable: {forward.interpreter_error()}")
    for scheme in ("smq_q8i8f16_2", "w4a16"):
        out = copy_of(scheme)
        result = run(out, "--backend", "interpreter", "--device", "cpu", "--num-samples", "1", "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["passed"] and report["backend"] == "interpreter"
        assert "interpreter" in report["backend_description"]
        assert all(layer["kernel_sqnr_db"] is None or layer["kernel_sqnr_db"] > 80
                   for layer in report["layers"].values())


def test_without_the_source_only_kernels_are_checked(copy_of, tmp_path):
    out = copy_of("w4a16")
    manifest = json.loads((out / "quant_manifest.json").read_text())
    manifest["source"]["path"] = str(tmp_path / "gone")
    (out / "quant_manifest.json").write_text(json.dumps(manifest))
    result = run(out, *SMALL)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "validation.json").read_text())
    assert report["float_reference"].startswith("unavailable: source checkpoint")
    assert all(layer["kernel_float_sqnr_db"] is None for layer in report["layers"].values())
    assert "kernel_kl_divergence" not in report["end_to_end"]


def test_quiet_prints_nothing_and_bad_input_is_one_line(copy_of, tmp_path):
    out = copy_of("w4a16")
    result = run(out, *SMALL, "--quiet")
    assert result.exit_code == 0 and result.output == ""
    for args, fragment in [((tmp_path / "missing",), "not found"), ((tmp_path,), "quant_manifest.json"),
                           ((out, "--backend", "triton", "--device", "cpu"), "needs a CUDA device"),
                           ((out, "--seq-len", "1"), "at least 1 sample of 2 tokens"),
                           ((out, "--num-samples", "0"), "at least 1 sample"),
                           ((out, "--seq-len", "100000"), "over the model's maximum")]:
        result = run(*args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.output


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and forward.triton_import_error() is None),
                    reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("scheme", ["smq_q8i8f16_2", "w4a16"])
def test_gpu_validate_with_compiled_kernels(copy_of, scheme):
    out = copy_of(scheme)
    report = validate(ValidateConfig(out, backend="triton", device="cuda", num_samples=2))
    assert report.passed, report.failures
    assert report.backend == "triton" and report.dtype == "bfloat16"     # fp32 source -> bf16 on the GPU
    assert all(layer.kernel_sqnr_db > 35 for layer in report.layers.values())
