"""AutoRound (intel/auto-round, SignRound) on SmolLM2 with the benchmark protocol (run with a Python that has
auto-round).

usage: run_autoround.py BITS GROUP_SIZE SYM|ASYM ITERS [BATCH] [COMPILE] [SEED]
The calibration is the protocol's own token ids (benchmarks/common.py: 64 x 512), one sample per batch entry, on
the CPU, at AutoRound's defaults otherwise (lr 1/iters, min/max tuning, torch.compile of its quant function on
Linux; COMPILE "off" turns that off, to see what it buys; SEED, default 42 as AutoRound's, seeds its sample
order and the rest of its randomness on the same token ids). Its quantize() leaves the weights
fake-quantized in place: the model is scored as it is. Prints one JSON line, with the samples AutoRound kept.
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks import common  # noqa: E402


def main(bits: str, group_size: str, symmetry: str, iters: str, batch: str = "8",
         torch_compile: str = "default", seed: str = "42") -> None:
    from auto_round import AutoRound

    ids = common.calibration_ids()
    model = common.float_model()
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(ids.shape[0])]
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer=common.tokenizer(), dataset=batches, bits=int(bits), group_size=int(group_size),
                        sym=symmetry == "sym", iters=int(iters), nsamples=ids.shape[0], seqlen=ids.shape[1],
                        batch_size=int(batch), device_map="cpu", seed=int(seed),
                        enable_torch_compile=None if torch_compile == "default" else torch_compile == "on")
    model, _ = rounder.quantize()
    seconds = time.perf_counter() - start
    kept = getattr(getattr(rounder, "calibration_context", None), "nsamples", None)
    model = model.float().eval()
    result = common.score(model, common.float_model(), common.eval_windows())
    print(json.dumps({**result, "quantize_s": seconds, "peak_rss_mib": common.peak_rss_mib(), "iters": int(iters),
                      "samples": kept, "compile": torch_compile, "seed": int(seed)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
