"""Issue 6 benchmark: quantize a model larger than memory allows to load whole, block by block.

    python benchmarks/make_random_llama.py /tmp/llama2-7b-random
    python benchmarks/bench_streaming.py /tmp/llama2-7b-random

Runs `quantkit calibrate` on the Llama-2-7B-shaped random checkpoint (13.5 GB fp16, 27 GB in fp32)
with w8a8_dynamic and with w4a16 --algo gptq, 16 x 256 dummy tokens, each in a fresh process, and
prints wall time, the process's peak RSS (VmHWM, reported by quantkit itself), the estimate quantkit
printed before starting, and the output size. Target: peak RSS under 6 GB.
"""
import argparse
import json
import tempfile
from pathlib import Path

import common

RUNS = {
    "w8a8_dynamic": ["--scheme", "w8a8_dynamic"],
    "w4a16 gptq g128": ["--scheme", "w4a16", "--algo", "gptq", "--group-size", "128", "--sym"],
}


def run(checkpoint: Path, out: Path, flags: list[str]) -> dict:
    import os
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "quantkit", "calibrate", str(checkpoint), "--out", str(out), "--overwrite",
               "--dataset", "dummy", "--num-samples", "16", "--seq-len", "256", "--json", *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-1000:])
    summary = json.loads(done.stdout)
    summary["wall_s"] = time.perf_counter() - start
    summary["output_gb"] = sum(p.stat().st_size for p in out.iterdir()) / 1e9
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for label in args.runs:
            summary = run(args.checkpoint, Path(tmp) / label.replace(" ", "_"), RUNS[label])
            estimate = summary.get("estimate") or {}
            rows.append({"config": label, "wall_s": summary["wall_s"], "peak_rss_gib": summary["peak_rss_mib"] / 1024,
                         "estimate_gib": estimate.get("peak_memory_bytes", 0) / 2**30, "output_gb": summary["output_gb"]})
            print(json.dumps(rows[-1]), flush=True)
    print(common.table(rows, [("config", "config"), ("wall_s", "wall s"), ("peak_rss_gib", "peak RSS GiB"),
                              ("estimate_gib", "estimated GiB"), ("output_gb", "output GB")]))


if __name__ == "__main__":
    main()
