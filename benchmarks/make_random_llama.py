"""Write a random-weight checkpoint with Llama-2-7B's config (fp16 safetensors shards + index).

    python benchmarks/make_random_llama.py /tmp/llama2-7b-random [--layers 32]

Weights ~ N(0, 0.02) (norms 1), the shapes of meta-llama/Llama-2-7b-hf: hidden 4096, intermediate
11008, 32 layers, 32 heads, vocab 32000; 6.74 B parameters, 13.5 GB on disk. One shard per decoder
layer, generated and written one at a time (a few hundred MB of memory).
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}


def layer_tensors(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, i = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    prefix = f"model.layers.{index}"
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    tensors = {f"{prefix}.{name}.weight": (torch.randn(shape, generator=generator) * 0.02).half()
               for name, shape in shapes.items()}
    tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    config = dict(CONFIG, num_hidden_layers=args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    total = args.layers + 1
    weight_map, size = {}, 0
    for index in range(total):
        name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
        if index < args.layers:
            tensors = layer_tensors(index, generator)
        else:
            h, v = config["hidden_size"], config["vocab_size"]
            tensors = {"model.embed_tokens.weight": (torch.randn(v, h, generator=generator) * 0.02).half(),
                       "model.norm.weight": torch.ones(h, dtype=torch.float16),
                       "lm_head.weight": (torch.randn(v, h, generator=generator) * 0.02).half()}
        save_file(tensors, str(args.out / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        size += sum(t.numel() * 2 for t in tensors.values())
        print(f"wrote {name}", flush=True)
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"{args.out}: {size / 1e9:.2f} GB of fp16 weights")


if __name__ == "__main__":
    main()
