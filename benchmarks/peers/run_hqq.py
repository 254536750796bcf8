"""The hqq package on SmolLM2 (run with a Python that has hqq): quantize every decoder-block Linear
with HQQLinear (nbits, group 64, axis 1, its defaults) and score with the benchmark protocol.

usage: run_hqq.py BITS ; prints one JSON line. Timing covers only the quantization of the Linears.
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks import common  # noqa: E402


def main(bits: int) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = common.float_model()
    config = BaseQuantizeConfig(nbits=bits, group_size=64)
    start = time.perf_counter()
    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, HQQLinear(module, config, compute_dtype=torch.float32, device="cpu"))
    seconds = time.perf_counter() - start
    result = common.score(model.eval(), common.float_model(), common.eval_windows())
    print(json.dumps({**result, "quantize_s": seconds, "peak_rss_mib": common.peak_rss_mib()}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
