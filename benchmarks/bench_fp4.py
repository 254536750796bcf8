"""Issue 13 benchmark, second part: SmolLM2-135M in MXFP4, NVFP4 and 128x128 FP8 blocks, quantkit against
llm-compressor on the same tokens.

    python benchmarks/bench_fp4.py [--peer-python /path/to/venv-with-llmcompressor/bin/python]
        [--torchao-python /path/to/python-with-torchao] [--only WORD ...] [--peers-only | --quantkit-only]

Calibration 64 x 512 tokens of English prose; evaluation 16 x 512 held-out tokens (benchmarks/common.py).
quantkit: every new scheme with RTN and GPTQ (W4A4 also with SmoothQuant's per-block alpha search and
without it). llm-compressor: its presets (round-to-nearest weights: FP8_BLOCK, NVFP4A16, NVFP4, MXFP4A16,
MXFP4) and its GPTQ under the weight-only FP4 presets. torchao: its NVFP4 and MXFP4 weight quantizers
(round-to-nearest; its FP4 kernels need a Blackwell GPU, so the weights are dequantized into the float
model, peers/run_torchao.py). Prints perplexity, KL(float || quantized), top-1 agreement, wall time,
calibrate+quantize time and peak RSS. ``--only`` runs the rows whose label or peer kind contains one of
the given words (e.g. ``--only nvfp4a16``); ``--peers-only`` skips quantkit's rows, ``--quantkit-only`` the
peers'.
"""
import argparse
import tempfile
from pathlib import Path

import common

RUNS = [
    ("nvfp4a16 rtn", ["--scheme", "nvfp4a16"]),
    ("nvfp4a16 gptq", ["--scheme", "nvfp4a16", "--algo", "gptq"]),
    ("mxfp4a16 rtn", ["--scheme", "mxfp4a16"]),
    ("mxfp4a16 gptq", ["--scheme", "mxfp4a16", "--algo", "gptq"]),
    ("nvfp4 rtn --no-smooth", ["--scheme", "nvfp4", "--no-smooth"]),
    ("nvfp4 rtn, smoothing auto", ["--scheme", "nvfp4"]),
    ("nvfp4 gptq, smoothing auto", ["--scheme", "nvfp4", "--algo", "gptq"]),
    ("mxfp4 rtn --no-smooth", ["--scheme", "mxfp4", "--no-smooth"]),
    ("mxfp4 rtn, smoothing auto", ["--scheme", "mxfp4"]),
    ("mxfp4 gptq, smoothing auto", ["--scheme", "mxfp4", "--algo", "gptq"]),
    ("fp8_block rtn", ["--scheme", "fp8_block", "--no-smooth"]),
    ("fp8_block gptq", ["--scheme", "fp8_block", "--no-smooth", "--algo", "gptq"]),
]
PEERS = [
    ("nvfp4a16", "NVFP4A16 preset (RTN)"), ("gptq_nvfp4a16", "GPTQ, NVFP4A16 preset"),
    ("mxfp4a16", "MXFP4A16 preset (RTN)"), ("gptq_mxfp4a16", "GPTQ, MXFP4A16 preset"),
    ("nvfp4", "NVFP4 preset (RTN)"), ("mxfp4", "MXFP4 preset (RTN)"), ("fp8_block", "FP8_BLOCK preset (RTN)"),
]
TORCHAO = [("nvfp4a16", "NVFP4WeightOnlyConfig quantizer (RTN)"),
           ("mxfp4a16", "MX fp4 quantizer, RCEIL scales (RTN)")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--torchao-python", default="")
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--peers-only", action="store_true")
    parser.add_argument("--quantkit-only", action="store_true")
    args = parser.parse_args()

    def wanted(label: str) -> bool:
        return not args.only or any(word in label for word in args.only)

    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "bf16 checkpoint, fp32 eval", **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, flags) in enumerate(RUNS):
            if wanted(label) and not args.peers_only:
                common.add_quantkit_row(rows, Path(tmp) / f"run{index}", label, flags, reference, windows)
    for kind, label in PEERS:
        if wanted(kind) and not args.quantkit_only:
            common.add_peer_row(rows, args.peer_python, "run_llmcompressor.py", kind, "llm-compressor", label)
    for kind, label in TORCHAO:
        if wanted(kind) and not args.quantkit_only:
            common.add_peer_row(rows, args.torchao_python, "run_torchao.py", kind, "torchao 0.18", label)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
