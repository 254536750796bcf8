"""torchao's FP4 weight quantizers on SmolLM2 with the benchmark protocol (run with a Python that has torchao).

usage: run_torchao.py {nvfp4a16|mxfp4a16} ; prints one JSON line.
torchao's NVFP4/MXFP4 inference kernels need a Blackwell GPU; its quantizers run anywhere. So every
Linear of the decoder blocks gets torchao's own quantize-dequantize of its weight (round-to-nearest, what
``quantize_`` stores), and the model is scored in float32 on the protocol's windows:
  nvfp4a16: NVFP4Tensor.to_nvfp4 with the per-tensor scale of NVFP4WeightOnlyConfig (the default)
  mxfp4a16: MXTensor.to_mx(fp4 e2m1, block 32) with the RCEIL scales of MXDynamicActivationMXWeightConfig
            (torchao has no MX weight-only config; these are that config's weights)
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks import common  # noqa: E402


def fake_quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import (
        NVFP4Tensor,
        per_tensor_amax_to_scale,
    )

    w = weight.detach().float()
    if kind == "nvfp4a16":
        quantized = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=per_tensor_amax_to_scale(w.abs().max()))
    elif kind == "mxfp4a16":
        quantized = MXTensor.to_mx(w, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.RCEIL)
    else:
        raise SystemExit(f"unknown kind {kind}")
    return quantized.dequantize(torch.float32)


def main(kind: str) -> None:
    model = common.float_model().float()
    start = time.perf_counter()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(fake_quantize(module.weight, kind))
    seconds = time.perf_counter() - start
    result = common.score(model.eval(), common.float_model(), common.eval_windows())
    print(json.dumps({**result, "quantize_s": seconds, "peak_rss_mib": common.peak_rss_mib()}))


if __name__ == "__main__":
    main(sys.argv[1])
