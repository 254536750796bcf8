"""Issue 12 benchmark: GPTQ on a tiny-but-wide random Qwen3-MoE against a dense Qwen3 of the same active size.

    python benchmarks/bench_moe.py [--experts 64]

Builds (once, in a temporary directory) two bf16 random checkpoints with the same attention:
  MoE    Qwen3MoeForCausalLM, E experts of intermediate I, top-k routing
  dense  Qwen3ForCausalLM with intermediate k * I (the parameters one token passes through)
and runs `quantkit calibrate --scheme w4a16 --algo gptq --group-size 128 --sym` on each in a fresh process
(32 x 256 dummy tokens), the MoE also with --expert-batch E (every expert's Hessians at once) and with
--moe-routed-only. Prints wall time, quantkit's own calibrate+quantize time, the process peak RSS (VmHWM,
reported by quantkit) and ratios against the dense run of the same invocation.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 4, 8, 4, 4096
FLAGS = ["--scheme", "w4a16", "--algo", "gptq", "--group-size", "128", "--sym",
         "--dataset", "dummy", "--num-samples", "32", "--seq-len", "256", "--json"]


def make_checkpoints(root: Path, experts: int, top_k: int, intermediate: int) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  head_dim=HIDDEN // HEADS, vocab_size=VOCAB, max_position_embeddings=1024, tie_word_embeddings=False)
    configs = {
        "moe": Qwen3MoeConfig(**common, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=intermediate,
                              intermediate_size=top_k * intermediate, norm_topk_prob=True),
        "dense": Qwen3Config(**common, intermediate_size=top_k * intermediate),
    }
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        config.architectures = [{"moe": "Qwen3MoeForCausalLM", "dense": "Qwen3ForCausalLM"}[name]]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        _save_tokenizer(paths[name])
    return paths


def _save_tokenizer(directory: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import save_tokenizer

    save_tokenizer(directory)


def calibrate(checkpoint: Path, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "quantkit", "calibrate", str(checkpoint), "--out", str(out), "--overwrite",
               *FLAGS, *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    summary = json.loads(done.stdout)
    timings = summary["timings_s"]
    summary["wall_s"] = time.perf_counter() - start
    summary["work_s"] = sum(v for k, v in timings.items() if k in ("observe", "transform", "quantize", "propagate"))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        root = Path(tmp)
        paths = make_checkpoints(root, args.experts, args.top_k, args.intermediate)
        runs = {
            "dense (same active size)": (paths["dense"], []),
            "MoE, expert batch 16": (paths["moe"], ["--expert-batch", "16"]),
            f"MoE, expert batch {args.experts} (all at once)": (paths["moe"], ["--expert-batch", str(args.experts)]),
            "MoE, batch 16, routed tokens only": (paths["moe"], ["--expert-batch", "16", "--moe-routed-only"]),
        }
        rows = {name: calibrate(path, root / f"out{i}", extra) for i, (name, (path, extra)) in enumerate(runs.items())}
    dense = rows["dense (same active size)"]
    print(f"Qwen3-MoE {LAYERS} blocks, hidden {HIDDEN}, {args.experts} experts x {args.intermediate}, top-{args.top_k}; "
          f"dense: intermediate {args.top_k * args.intermediate}; GPTQ w4 g128 sym, 32 x 256 dummy tokens")
    print("| run | wall s | calibrate+quantize s | observe / quantize / propagate s | x dense | peak RSS MiB | x dense "
          "| estimate MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        estimate = (row.get("estimate") or {}).get("peak_memory_bytes")
        stages = " / ".join(f"{row['timings_s'].get(k, 0.0):.1f}" for k in ("observe", "quantize", "propagate"))
        print(f"| {name} | {row['wall_s']:.1f} | {row['work_s']:.1f} | {stages} | {row['work_s'] / dense['work_s']:.2f} | "
              f"{row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / dense['peak_rss_mib']:.2f} | "
              f"{'' if estimate is None else f'{estimate / 2**20:.0f}'} |")


if __name__ == "__main__":
    main()
