"""Issue 14 (time): the K-quant calibration routes in two quantkit source trees, timed stage by stage, and their
outputs compared tensor by tensor.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_search_speed.py --old /tmp/before --new . [--types q4_k_m] [--algorithms imatrix,gptq]

For every (type, algorithm) each tree, in its own process (run from its root, so it imports its own quantkit), runs
``quantkit calibrate smollm2-135m --scheme gguf:TYPE --algo ALGO`` on the protocol of bench_kquant_calibration.py
(32 x 512 tokens of the first half of the bundled Alice), one after the other on the same machine. Prints each run's
`timings_s` and total, the ratio old / new, and whether the two outputs hold the same tensors bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import torch
from safetensors.torch import load_file


def calibrate(tree: Path, out: Path, ggml_type: str, algorithm: str, calibration: Path) -> dict:
    command = [sys.executable, "-m", "quantkit", "calibrate", "smollm2-135m", "--scheme", f"gguf:{ggml_type}",
               "--algo", algorithm, "--dataset", str(calibration), "--num-samples", "32", "--seq-len", "512",
               "--out", str(out), "--overwrite", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} in {tree} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def identical(a: Path, b: Path) -> tuple[int, int]:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    same = sum(1 for name in first if name in second and torch.equal(first[name], second[name]))
    return same, max(len(first), len(second))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--types", default="q4_k_m")
    parser.add_argument("--algorithms", default="imatrix,gptq")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "alice_first_half.txt"
        calibration.write_text(common.alice_halves()[0])
        for ggml_type in args.types.split(","):
            for algorithm in args.algorithms.split(","):
                runs = {}
                for tag, tree in (("old", args.old.resolve()), ("new", args.new.resolve())):
                    runs[tag] = calibrate(tree, Path(tmp) / f"{ggml_type}-{algorithm}-{tag}", ggml_type, algorithm,
                                          calibration)
                    print(f"{ggml_type} {algorithm} {tag}: total {runs[tag]['total_s']:.1f} s, peak RSS "
                          f"{runs[tag]['peak_rss_mib']:.0f} MiB, stages {runs[tag]['timings_s']}", flush=True)
                same, total = identical(Path(tmp) / f"{ggml_type}-{algorithm}-old", Path(tmp) / f"{ggml_type}-{algorithm}-new")
                ratio = runs["old"]["total_s"] / runs["new"]["total_s"]
                print(f"{ggml_type} {algorithm}: old/new time {ratio:.2f}x; identical tensors {same}/{total}", flush=True)


if __name__ == "__main__":
    main()
