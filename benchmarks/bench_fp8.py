"""Issue 13 benchmark: SmolLM2-135M in FP8 (e4m3), quantkit against llm-compressor on the same tokens.

    python benchmarks/bench_fp8.py [--peer-python /path/to/venv-with-llmcompressor/bin/python]

Calibration 64 x 512 tokens of English prose; evaluation 16 x 512 held-out tokens (benchmarks/common.py).
quantkit: fp8_dynamic (per-channel fp8 weights, dynamic per-token fp8 activations; SmoothQuant alpha
searched per block, and --no-smooth) with RTN and GPTQ, and weight-only w8a16_fp8 with RTN and GPTQ.
llm-compressor: its FP8_DYNAMIC preset (round-to-nearest weights) on the same model. Prints perplexity,
KL(float || quantized), top-1 agreement, quantkit's whole process wall time, its calibrate+quantize
stages (comparable with the peer's timed oneshot call) and peak RSS.
"""
import argparse
import tempfile
from pathlib import Path

import common

RUNS = [
    ("fp8_dynamic rtn, smoothing auto", ["--scheme", "fp8_dynamic"]),
    ("fp8_dynamic rtn --no-smooth", ["--scheme", "fp8_dynamic", "--no-smooth"]),
    ("fp8_dynamic gptq, smoothing auto", ["--scheme", "fp8_dynamic", "--algo", "gptq"]),
    ("w8a16_fp8 rtn", ["--scheme", "w8a16_fp8"]),
    ("w8a16_fp8 gptq", ["--scheme", "w8a16_fp8", "--algo", "gptq"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default="")
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "bf16 checkpoint, fp32 eval", **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, flags) in enumerate(RUNS):
            common.add_quantkit_row(rows, Path(tmp) / f"run{index}", label, flags, reference, windows)
    common.add_peer_row(rows, args.peer_python, "run_llmcompressor.py", "fp8_dynamic", "llm-compressor",
                        "FP8_DYNAMIC preset")
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
