"""Issue 2 benchmark: SmolLM2-135M, float vs every W8A8/W8A16 scheme with and without smoothing.

    python benchmarks/bench_w8a8.py [--peer-python /path/to/venv-with-llmcompressor/bin/python]

Calibration 64 x 512 tokens of English prose; evaluation 16 x 512 held-out tokens (benchmarks/common.py).
Prints a Markdown table: perplexity, KL(float || quantized), top-1 agreement, the wall time of the whole
`quantkit calibrate` process (model loading and writing included), its calibrate+quantize stages alone
(comparable with the peer's timed oneshot call on a loaded model) and its peak RSS; llm-compressor's
W8A8 (per-channel weights, dynamic per-token activations) with and without SmoothQuant 0.8 on the
same tokens when --peer-python points at an environment that has it.
"""
import argparse
import tempfile
from pathlib import Path

import common

SCHEMES = ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "w8a8_dynamic", "w8a16"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-python", default="")
    parser.add_argument("--schemes", nargs="*", default=SCHEMES)
    args = parser.parse_args()
    windows = common.eval_windows()
    reference = common.float_model()
    rows = [{"tool": "float", "config": "bf16 checkpoint, fp32 eval",
             **common.score(reference, reference, windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes:
            variants = [("smoothing auto", []), ("--no-smooth", ["--no-smooth"])] if scheme != "w8a16" else [("", [])]
            for label, flags in variants:
                common.add_quantkit_row(rows, Path(tmp) / f"{scheme}-{len(flags)}", f"{scheme} {label}".strip(),
                                        ["--scheme", scheme, *flags], reference, windows)
    for kind, label in (("w8a8", "W8A8 dynamic, no smoothing"), ("w8a8_smooth", "W8A8 dynamic + SmoothQuant 0.8")):
        common.add_peer_row(rows, args.peer_python, "run_llmcompressor.py", kind, "llm-compressor", label)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
