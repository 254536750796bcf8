"""llm-compressor GPTQ (W4A16, group 128, symmetric) on a MoE checkpoint, with the token ids quantkit
calibrated on (run with a Python that has llmcompressor).

usage: run_llmcompressor_moe.py CHECKPOINT IDS.safetensors ; prints one JSON line: the oneshot call's
seconds and the process's peak RSS.
"""
import json
import resource
import sys
import time


def main(checkpoint: str, ids_file: str) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(ids_file)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head", "re:.*mlp.gate$"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # what it quantized: modules carrying a weight scale, and how many of them are expert weights
    quantized = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
    experts = sum(".experts." in name for name in quantized)
    print(json.dumps({"quantize_s": seconds, "peak_rss_mib": peak, "quantized_modules": len(quantized),
                      "expert_modules": experts}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
