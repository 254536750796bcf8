"""llm-compressor on SmolLM2 with the benchmark protocol (run with a Python that has llmcompressor).

usage: run_llmcompressor.py {w8a8|w8a8_smooth|fp8_dynamic|gptq_w4g64|fp8_block|nvfp4a16|nvfp4|mxfp4a16|mxfp4|
                             gptq_nvfp4a16|gptq_mxfp4a16} ; prints one JSON line.
The calibration ids are quantkit's own (benchmarks/common.py), so both tools see the same tokens.
"""
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks import common  # noqa: E402

PRESETS = {"fp8_block": "FP8_BLOCK", "nvfp4a16": "NVFP4A16", "nvfp4": "NVFP4", "mxfp4a16": "MXFP4A16",
           "mxfp4": "MXFP4"}


def recipe(kind: str):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if kind == "w8a8":
        return [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if kind == "w8a8_smooth":
        return [SmoothQuantModifier(smoothing_strength=0.8),
                QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if kind == "fp8_dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    if kind in PRESETS:           # round-to-nearest weights under the preset scheme
        return [QuantizationModifier(targets="Linear", scheme=PRESETS[kind], ignore=["lm_head"])]
    if kind.startswith("gptq_") and kind.removeprefix("gptq_") in PRESETS:
        return [GPTQModifier(targets="Linear", scheme=PRESETS[kind.removeprefix("gptq_")], ignore=["lm_head"])]
    if kind == "gptq_w4g64":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64)
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"])]
    raise SystemExit(f"unknown kind {kind}")


def main(kind: str) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = common.calibration_ids()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = common.float_model()
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe(kind), num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - start
    model = model.float().eval()
    result = common.score(model, common.float_model(), common.eval_windows())
    print(json.dumps({**result, "quantize_s": seconds, "peak_rss_mib": common.peak_rss_mib()}))


if __name__ == "__main__":
    main(sys.argv[1])
