"""Issue 12 benchmark: GPTQ on a tiny-but-wide random Qwen3-MoE against a dense Qwen3 of the same active size.

    python benchmarks/bench_moe.py [--experts 64] [--peer-python /path/to/venv-with-llmcompressor/bin/python]

Builds (once, in a temporary directory) two bf16 random checkpoints with the same attention:
  MoE    Qwen3MoeForCausalLM, E experts of intermediate I, top-k routing
  dense  Qwen3ForCausalLM with intermediate k * I (the parameters one token passes through)
and runs `quantkit calibrate --scheme w4a16 --algo gptq --group-size 128 --sym` on each in a fresh process
(32 x 256 dummy tokens), the MoE also with --expert-batch E (every expert's Hessians at once) and with
--moe-routed-only. Prints wall time, quantkit's own calibrate+quantize time, the process peak RSS (VmHWM,
reported by quantkit) and ratios against the dense run of the same invocation.
With --peer-python, llm-compressor's GPTQ oneshot (W4A16 g128 sym, routers ignored) runs on the same MoE
checkpoint with quantkit's very token ids (benchmarks/peers/run_llmcompressor_moe.py): its oneshot
seconds sit in the calibrate+quantize column, its process peak RSS in the RSS column.
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
    summary["work_s"] = (sum(v for k, v in timings.items() if k in ("observe", "transform", "quantize", "propagate"))
                         - summary.get("overlapped_s", 0.0))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--peer-python")
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
        if args.peer_python:
            rows["llm-compressor GPTQ (MoE)"] = peer(args.peer_python, paths["moe"], root)
    dense = rows["dense (same active size)"]
    print(f"Qwen3-MoE {LAYERS} blocks, hidden {HIDDEN}, {args.experts} experts x {args.intermediate}, top-{args.top_k}; "
          f"dense: intermediate {args.top_k * args.intermediate}; GPTQ w4 g128 sym, 32 x 256 dummy tokens")
    print("| run | wall s | calibrate+quantize s | observe / quantize / propagate s | x dense | peak RSS MiB | x dense "
          "| estimate MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        if "expert_modules" in row:
            name = f"{name}: {row['quantized_modules']} modules quantized, {row['expert_modules']} of them experts'"
        estimate = (row.get("estimate") or {}).get("peak_memory_bytes")
        stages = " / ".join(f"{row['timings_s'][k]:.1f}" for k in ("observe", "quantize", "propagate")
                            if k in row["timings_s"]) or "(oneshot)"
        print(f"| {name} | {row['wall_s']:.1f} | {row['work_s']:.1f} | {stages} | {row['work_s'] / dense['work_s']:.2f} | "
              f"{row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / dense['peak_rss_mib']:.2f} | "
              f"{'' if estimate is None else f'{estimate / 2**20:.0f}'} |")


def peer(python: str, checkpoint: Path, root: Path) -> dict:
    """llm-compressor on the MoE checkpoint with the token ids quantkit's dummy dataset gives it."""
    from safetensors.torch import save_file

    from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens
    from quantkit.model.checkpoint import Checkpoint

    source = Checkpoint(checkpoint)
    ids = calibration_tokens(DatasetSpec("dummy"), source.tokenizer(), source.text_config.vocab_size, 32, 256, seed=0)
    ids_file = root / "ids.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(ids_file))
    script = Path(__file__).parent / "peers" / "run_llmcompressor_moe.py"
    start = time.perf_counter()
    done = subprocess.run([python, str(script), str(checkpoint), str(ids_file)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"llm-compressor failed: {done.stderr.strip()[-1500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"llm-compressor quantized {result['quantized_modules']} modules, {result['expert_modules']} of them "
          "expert weights", file=sys.stderr)
    return {"wall_s": time.perf_counter() - start, "work_s": result["quantize_s"], "peak_rss_mib": result["peak_rss_mib"],
            "timings_s": {}, "estimate": None, **result}


if __name__ == "__main__":
    main()
