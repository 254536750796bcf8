"""AutoRound's automatic mixed precision (AutoScheme) on SmolLM2 with the benchmark protocol (run with a Python
that has auto-round).

usage: run_autoscheme.py AVG_BITS [ITERS]
AutoScheme(avg_bits, options W2A16, W3A16, W4A16, W8A16: symmetric int, groups of 128) chooses each Linear's
scheme from its gradient-based delta loss, then AutoRound quantizes with ITERS steps (0: its "optimized RTN",
an importance-weighted scale search per group, on unless disable_opt_rtn: quantkit's --algo imatrix is the match). Both get the
protocol's calibration as the same 64 windows decoded to text, in a json file (re-tokenized by it): with an
AutoScheme, AutoRound passes its own dataset to the scheme search, which reads only a dataset name or a file. The model is scored as quantize() leaves it
(fake-quantized in place). Prints one JSON line with the achieved bits per weight of the quantized Linears
(codes, one fp16 scale per group of 128; symmetric: no zero point), the schemes chosen and each Linear's bits.
"""
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks import common  # noqa: E402


def main(avg_bits: str, iters: str = "0") -> None:
    from auto_round import AutoRound, AutoScheme

    ids = common.calibration_ids()
    tokenizer = common.tokenizer()
    model = common.float_model()
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "calibration.json"
        texts.write_text(json.dumps([tokenizer.decode(row) for row in ids]))
        scheme = AutoScheme(avg_bits=float(avg_bits), options=("W2A16", "W3A16", "W4A16", "W8A16"),
                            nsamples=ids.shape[0], seqlen=ids.shape[1], dataset=str(texts), device_map="cpu",
                            batch_size=8)
        start = time.perf_counter()
        rounder = AutoRound(model, tokenizer=tokenizer, scheme=scheme, dataset=str(texts), iters=int(iters),
                            nsamples=ids.shape[0], seqlen=ids.shape[1], device_map="cpu")
        model, layer_config = rounder.quantize()
        seconds = time.perf_counter() - start
    chosen, stored, weights, bits_of = Counter(), 0, 0, {}
    for name, config in layer_config.items():
        bits = config.get("bits", 16)
        if bits >= 16 or "lm_head" in name:
            continue
        rows, columns = model.get_submodule(name).weight.shape
        group = config.get("group_size", 128)
        chosen[f"int{bits}-g{group}-{'sym' if config.get('sym', True) else 'asym'}"] += 1
        bits_of[name] = bits
        stored += rows * columns * bits + rows * math.ceil(columns / group) * (16 + (0 if config.get("sym", True) else 8))
        weights += rows * columns
    model = model.float().eval()
    result = common.score(model, common.float_model(), common.eval_windows())
    print(json.dumps({**result, "quantize_s": seconds, "peak_rss_mib": common.peak_rss_mib(), "iters": int(iters),
                      "bits": f"{stored / weights:.3f}", "grids": ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())),
                      "bits_by_layer": bits_of}))


if __name__ == "__main__":
    main(*sys.argv[1:])
