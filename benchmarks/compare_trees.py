"""Bit-identity of two quantkit source trees: the same calibrations run in each, compared tensor by tensor.

For every case (scheme, algorithm, options) each tree, in its own process (PYTHONPATH=TREE):
  1. runs ``quantkit calibrate`` on the model;
  2. loads the output with its own ``load_quantized`` and records the dequantized weight of every
     quantized Linear and the logits on fixed token ids (seeded);
  3. exports it as GGUF (where the tokenizer allows) and compressed-tensors.
Then the recorded tensors must be equal bit for bit (``torch.equal``), and the exported files
byte-identical apart from the tool version string and the source directory they record
(``quantkit_export.json``, a marker file, is left out of the comparison). Prints one line per case and exits 1 on any difference.

    python benchmarks/compare_trees.py --old /tmp/head --new . [--model smollm2-135m] [--quick]

``--model`` may be repeated; ``tiny:llama``, ``tiny:mistral``, ``tiny:qwen2`` build a tiny random
checkpoint of that architecture (as the tests do) with a byte-level BPE tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("smq_q8i8f16_0", "rtn", []), ("smq_q8i8f16_1", "rtn", []), ("smq_q8i8f16_2", "rtn", []),
    ("w8a8_dynamic", "rtn", []), ("w8a16", "rtn", []), ("w4a16", "rtn", []), ("w4a8", "rtn", []),
    ("w4a16", "gptq", ["--group-size", "64", "--sym"]), ("w4a16", "awq", ["--group-size", "64"]),
    ("w4a16", "hqq", ["--group-size", "64"]), ("w4a16", "gptq", ["--bits", "3", "--group-size", "64"]),
]
QUICK = [CASES[2], CASES[3], CASES[7], CASES[8], CASES[9]]

# Runs inside one tree: calibrate, load, record, export.
DRIVER = r'''
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from click.testing import CliRunner
from quantkit.cli.main import cli
from quantkit import load_quantized

model, out, record, args = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
runner = CliRunner()
result = runner.invoke(cli, ["calibrate", model, *args, "--out", str(out), "--quiet"])
if result.exit_code != 0:
    sys.exit(f"calibrate failed: {result.output[-400:]}")
quantized = load_quantized(out)
tensors = {}
for name, module in quantized.named_modules():
    if hasattr(module, "dequantized_weight"):
        tensors[f"{name}.dequantized"] = module.dequantized_weight().contiguous()
vocab = quantized.config.vocab_size
ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1234))
with torch.no_grad():
    tensors["logits"] = quantized(input_ids=ids, use_cache=False).logits.float().contiguous()
save_file(tensors, str(record))
for fmt, target in (("gguf", out.parent / (out.name + ".gguf")), ("compressed-tensors", out.parent / (out.name + "-ct"))):
    exported = runner.invoke(cli, ["export", str(out), "--format", fmt, "--out", str(target), "--quiet"])
    print(json.dumps({"format": fmt, "exit": exported.exit_code, "output": exported.output[-300:]}))
'''


def build_tiny(kind: str, directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_checkpoint
    from test_export_gguf import VOCAB, save_byte_level_bpe

    overrides = {"sliding_window": None} if kind == "mistral" else {}
    checkpoint = make_checkpoint(directory / f"tiny-{kind}", kind, vocab_size=VOCAB, **overrides)
    save_byte_level_bpe(checkpoint)
    return checkpoint


def run_tree(tree: Path, model: str, out: Path, record: Path, args: list[str]) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, model, str(out), str(record), json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: {done.stderr[-800:]}")
    exports = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            exports[item["format"]] = item["exit"]
    return exports


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "quantkit_export.json"}


def without_version(data: bytes, versions: set[str]) -> bytes:
    for version in versions:
        data = data.replace(f"quantkit {version}".encode(), b"quantkit VERSION")
        data = data.replace(f'"version": "{version}"'.encode(), b'"version": "VERSION"')
    return data


def compare(old_dir: Path, new_dir: Path, name: str, versions: set[str]) -> list[str]:
    import torch
    from safetensors.torch import load_file

    problems = []
    old, new = load_file(str(old_dir / f"{name}.record.safetensors")), load_file(str(new_dir / f"{name}.record.safetensors"))
    if old.keys() != new.keys():
        problems.append(f"different layers: {sorted(set(old) ^ set(new))[:3]}")
    for key in sorted(set(old) & set(new)):
        if not torch.equal(old[key], new[key]):
            problems.append(f"{key} differs (max |diff| {(old[key].double() - new[key].double()).abs().max():.3g})")
    for suffix in (".gguf", "-ct"):
        a, b = files_of(old_dir / f"{name}{suffix}"), files_of(new_dir / f"{name}{suffix}")
        if a.keys() != b.keys():
            problems.append(f"export {suffix}: files differ {sorted(set(a) ^ set(b))}")
        for file in sorted(set(a) & set(b)):
            # the export records its source directory: .../old/NAME vs .../new/NAME (same length)
            old_bytes = a[file].replace(str(old_dir).encode(), str(new_dir).encode())
            if without_version(old_bytes, versions) != without_version(b[file], versions):
                problems.append(f"export {suffix}: {file} differs")
    return problems


def tree_version(tree: Path) -> str:
    text = (tree / "pyproject.toml").read_text()
    return next(line.split('"')[1] for line in text.splitlines() if line.startswith("version"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=ROOT)
    parser.add_argument("--model", action="append", help="smollm2-135m (default), a path, or tiny:ARCH")
    parser.add_argument("--quick", action="store_true", help="5 cases instead of 11")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="quantkit-compare-"))
    versions = {tree_version(args.old.resolve()), tree_version(args.new.resolve())}
    failures = 0
    for model in args.model or ["smollm2-135m"]:
        path = str(build_tiny(model.split(":", 1)[1], work)) if model.startswith("tiny:") else model
        for scheme, algorithm, extra in (QUICK if args.quick else CASES):
            name = f"{Path(model).name.replace(':', '-')}-{scheme}-{algorithm}{''.join(extra).replace('-', '_')}"
            cli_args = ["--scheme", scheme, "--algo", algorithm, *extra, "--num-samples", str(args.num_samples),
                        "--seq-len", str(args.seq_len), "--batch-size", "8"]
            if not model.startswith("tiny:"):
                cli_args += ["--dataset", str(ROOT / "benchmarks/data/austen_persuasion_head.txt")]
            exits = {}
            for label, tree in (("old", args.old.resolve()), ("new", args.new.resolve())):
                (work / label).mkdir(parents=True, exist_ok=True)
                exits[label] = run_tree(tree, path, work / label / name, work / label / f"{name}.record.safetensors",
                                        cli_args)
            problems = compare(work / "old", work / "new", name, versions)
            if exits["old"] != exits["new"]:
                problems.append(f"export exit codes differ: {exits}")
            failures += bool(problems)
            layers = "identical" if not problems else "; ".join(problems[:3])
            print(f"{'ok  ' if not problems else 'DIFF'} {name}: weights, logits, exports {layers} "
                  f"(export exits {exits['new']})", flush=True)
    print(f"{failures} case(s) differ" if failures else "all cases bit-identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
