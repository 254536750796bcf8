"""llama2.c's runq.c on quantkit's `export --format llama2c`: greedy generation vs load_quantized's.

    python bench_llama2c.py --llama2c-src DIR [--scheme q8_0] [--steps 48] [--workdir DIR]

DIR holds karpathy/llama2.c's runq.c (e.g. `git show HEAD:runq.c` of a clone); without it the benchmark
says so and exits 0. Steps: calibrate SmolLM2 with ``--scheme`` (q8_0: int8 symmetric groups of 32, carried
into the file exactly), export it, build runq.c with gcc (its hard-coded RoPE theta 10000 replaced by the
model's, as the export's note says), then generate greedily (-t 0) from BOS (id 1) twice: with an id
tokenizer (piece of id i = " i", so runq.c prints the ids) and with the exported tokenizer.bin (its text must
be the Hugging Face tokenizer's decoding of those ids). The reference is quantkit's own model
(`load_quantized`, fp32) generating greedily from the same BOS without stopping at EOS, as runq.c does.
runq.c also quantizes every matmul's input to int8 (groups of the file's group size) and takes the classifier
from the Q8 embedding table: a third run, quantkit's model with that arithmetic emulated (`runq_arithmetic`),
shows whether that explains where the first two part. First divergences and agreements are printed, with
the float model's.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_runq(source: Path, theta: float, workdir: Path) -> Path:
    """runq.c with its RoPE base set to ``theta``, compiled with llama2.c's `runfast` flags."""
    text = source.read_text()
    if text.count("powf(10000.0f,") != 1:
        raise SystemExit(f"{source}: expected one 'powf(10000.0f,' (runq.c's RoPE base); is it llama2.c's runq.c?")
    patched = workdir / "runq.c"
    patched.write_text(text.replace("powf(10000.0f,", f"powf({theta:.1f}f,"))
    binary = workdir / "runq"
    subprocess.run(["gcc", "-Ofast", "-o", str(binary), str(patched), "-lm"], check=True)
    return binary


def id_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer.bin whose piece for id i is " i": runq.c's output is then the generated ids."""
    pieces = [f" {i}".encode() for i in range(vocab_size)]
    with open(path, "wb") as handle:
        handle.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece in pieces:
            handle.write(struct.pack("<fi", 0.0, len(piece)) + piece)


def run_runq(binary: Path, model: Path, tokenizer: Path, steps: int) -> tuple[str, float]:
    done = subprocess.run([str(binary), str(model), "-z", str(tokenizer), "-t", "0", "-n", str(steps)],
                          capture_output=True, text=True, errors="replace", check=True)
    rate = re.search(r"achieved tok/s: ([0-9.]+)", done.stderr)
    return done.stdout.rstrip("\n"), float(rate.group(1)) if rate else float("nan")


@torch.inference_mode()
def greedy(model, bos: int, new_tokens: int) -> list[int]:
    """Greedy ids after ``bos`` (whole-sequence forward each step, no EOS stop)."""
    ids = torch.tensor([[bos]])
    for _ in range(new_tokens):
        next_id = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, 1:].tolist()


def runq_arithmetic(model, group_size: int):
    """``model`` computing as runq.c does: every Linear's input (the classifier's too) quantized per group of
    ``group_size`` (s = max|x| / 127, q = round half away from zero, as C's round()), and the token embedding
    (the classifier when tied) replaced by its Q8 requantization, the only tensor the export requantizes."""
    from quantkit.exporters.llama2c import dequantize_q80, quantize_q80

    def fake_quantize(module, args):
        x = args[0]
        groups = x.reshape(-1, group_size)
        scale = groups.abs().amax(dim=1, keepdim=True) / 127.0
        scaled = groups / torch.where(scale > 0, scale, torch.ones_like(scale))
        rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
        return (rounded * scale).reshape(x.shape)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "QuantLinear":
            module.register_forward_pre_hook(fake_quantize)
    embedding = model.get_input_embeddings().weight
    codes, scales = quantize_q80(embedding, group_size)
    with torch.no_grad():
        embedding.copy_(dequantize_q80(codes, scales, group_size).reshape(embedding.shape))
    return model


def agreement(a: list[int], b: list[int]) -> tuple[int, float]:
    """(first index where they differ (len if never), share of equal positions)."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return first, sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama2c-src", type=Path, required=True, help="directory with llama2.c's runq.c")
    parser.add_argument("--scheme", default="q8_0")
    parser.add_argument("--steps", type=int, default=48, help="runq.c's -n (BOS included)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    source = args.llama2c_src / "runq.c"
    if not source.is_file() or shutil.which("gcc") is None:
        print(f"skipped: {source} or gcc is missing")
        return
    common.in_workdir(args.workdir, "bench-llama2c-", lambda work: run(args, source, work))


def run(args, source: Path, work: Path) -> None:
    from quantkit import api, load_quantized

    summary = common.run_quantkit(work / "out", "--scheme", args.scheme)
    start = time.perf_counter()
    result = api.export(work / "out", format="llama2c", out=work / "model.bin", overwrite=True)
    export_s = time.perf_counter() - start
    config = load_quantized(work / "out").config
    theta = float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    binary = build_runq(source, theta, work)
    id_tokenizer(work / "ids.bin", config.vocab_size)
    printed, rate = run_runq(binary, work / "model.bin", work / "ids.bin", args.steps)
    runq_ids = [int(token) for token in printed.split()]
    text, _ = run_runq(binary, work / "model.bin", result.tokenizer, args.steps)
    tokenizer = common.tokenizer()
    ours = greedy(load_quantized(work / "out", dtype=torch.float32).eval(), 1, args.steps - 1)
    emulated = greedy(runq_arithmetic(load_quantized(work / "out", dtype=torch.float32).eval(), result.group_size),
                      1, args.steps - 1)
    reference = greedy(common.float_model(), 1, args.steps - 1)
    first, share = agreement(runq_ids, ours)
    emulated_first, emulated_share = agreement(runq_ids, emulated)
    float_first, float_share = agreement(ours, reference)
    row = {"scheme": args.scheme, "group_size": result.group_size, "file_mb": result.size_bytes / 1e6,
           "carried": sum(t.status == "carried" for t in result.tensors), "tensors": len(result.tensors),
           "export_s": export_s, "calibrate_s": summary["wall_s"], "runq_tok_s": rate, "generated": len(runq_ids),
           "runq_vs_load_quantized_first_diff": first, "runq_vs_load_quantized_agreement": share,
           "runq_vs_emulated_first_diff": emulated_first, "runq_vs_emulated_agreement": emulated_share,
           "load_quantized_vs_float_first_diff": float_first, "load_quantized_vs_float_agreement": float_share,
           "tokenizer_text_matches": text == tokenizer.decode(runq_ids)}
    print(json.dumps(row, indent=1))
    print("runq.c ids:        ", runq_ids)
    print("load_quantized ids:", ours)
    print("emulated ids:      ", emulated)
    print("runq.c text with the exported tokenizer.bin:", repr(text[:200]))


if __name__ == "__main__":
    main()
