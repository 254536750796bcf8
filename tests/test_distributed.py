"""Calibration over 2 CPU processes (torchrun, gloo) equals the single-process run."""
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from quantkit import load_quantized
from quantkit.native.manifest import Manifest
from quantkit.model.qlinear import QuantLinear

ARGS = ["--num-samples", "8", "--seq-len", "32", "--batch-size", "2", "--quiet"]


def _calibrate(checkpoint, out, *flags, processes=1):
    launcher = [sys.executable, "-m", "quantkit"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "quantkit"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, "calibrate", str(checkpoint), "--out", str(out), *ARGS, *flags],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("flags, exact", [
    (["--scheme", "smq_q8i8f16_2"], True),               # absmax statistics, alpha search, static scales
    (["--scheme", "w8a8_dynamic", "--alpha", "0.7"], True),
    (["--scheme", "w4a16", "--algo", "gptq", "--group-size", "32"], False),   # Hessians: float sums
])
def test_two_processes_match_one(llama_dir, tmp_path, flags, exact):
    _calibrate(llama_dir, tmp_path / "single", *flags)
    _calibrate(llama_dir, tmp_path / "double", *flags, processes=2)
    single = load_file(tmp_path / "single" / "model.safetensors")
    double = load_file(tmp_path / "double" / "model.safetensors")
    assert single.keys() == double.keys()
    if exact:
        assert all(single[k].equal(double[k]) for k in single)
    else:
        # Hessian sums differ in float summation order, so GPTQ may round a few weights the other way;
        # the dequantized layers must still agree closely.
        a, b = load_quantized(tmp_path / "single"), load_quantized(tmp_path / "double")
        for (name, la), (_, lb) in zip(a.named_modules(), b.named_modules()):
            if isinstance(la, QuantLinear):
                wa, wb = la.dequantized_weight(), lb.dequantized_weight()
                assert (wa - wb).norm() <= 0.02 * wa.norm(), name
    one, two = Manifest.load(tmp_path / "single"), Manifest.load(tmp_path / "double")
    assert two.calibration.processes == 2 and one.calibration.processes == 1
    assert one.smoothing == two.smoothing
    for name, entry in one.layers.items():
        a, b = entry.metrics.get("output_sqnr_db"), two.layers[name].metrics.get("output_sqnr_db")
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-3 if exact else 5e-2)


def test_moe_routed_only_is_refused_under_torchrun(qwen3_moe_dir, tmp_path):
    """An expert one rank never routes a token to would have no statistics there: refused in one line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "quantkit"]
    done = subprocess.run([*launcher, "calibrate", str(qwen3_moe_dir), "--out", str(tmp_path / "out"), *ARGS,
                           "--scheme", "w4a16", "--algo", "gptq", "--moe-routed-only"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode != 0
    assert "error: --moe-routed-only runs in one process" in done.stderr + done.stdout
    # (torchrun itself then reports the failed child with its own traceback: the launcher's, not ours)
    assert not (tmp_path / "out").exists()
