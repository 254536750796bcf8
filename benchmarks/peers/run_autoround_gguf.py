"""AutoRound's GGUF K-quant export of SmolLM2 (run with a Python that has auto-round).

usage: run_autoround_gguf.py MODEL_DIR CALIBRATION_IDS.safetensors OUT_DIR FORMAT ITERS [BATCH]
  FORMAT: gguf:q4_k_m, gguf:q3_k_m, gguf:q2_k_s ...; ITERS: AutoRound's signround steps per block (0: its RTN);
  BATCH: samples per step (8, AutoRound's default)
The calibration is the benchmark's own token ids ([n, seq_len] under "ids"), one sample per batch entry, on
the CPU. Prints one JSON line: the written .gguf and the wall time.
"""
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main(model_dir: str, ids_path: str, out_dir: str, fmt: str, iters: str, batch: str = "8") -> None:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(ids_path)["ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(ids.shape[0])]
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer=tokenizer, dataset=batches, iters=int(iters), nsamples=ids.shape[0],
                        seqlen=ids.shape[1], batch_size=min(int(batch), ids.shape[0]), device_map="cpu")
    rounder.quantize_and_save(out_dir, format=fmt)
    seconds = time.perf_counter() - start
    files = sorted(str(p) for p in Path(out_dir).rglob("*.gguf"))
    print(json.dumps({"tool": "auto-round", "format": fmt, "iters": int(iters), "batch": int(batch), "gguf": files,
                      "seconds": seconds}))


if __name__ == "__main__":
    main(*sys.argv[1:])
