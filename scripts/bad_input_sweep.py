"""The hostile-input sweep, as a user runs it: each bad input through the installed ``quantkit`` command
in a fresh process. Prints one row per case (exit code and the last stderr line) and checks that the
exit is non-zero, stderr is one ``error:`` line (after the estimate line, if any) with no traceback,
and nothing the case protects was changed or deleted. Exits 1 if any case falls short.

    python scripts/bad_input_sweep.py [--keep DIR]

Builds its tiny models in a temporary directory (no download); about 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FAST = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            h.update(str(p.relative_to(path) if Path(path).is_dir() else p.name).encode() + p.read_bytes())
    return h.hexdigest()


def quantkit(*args, env=None) -> subprocess.CompletedProcess:
    command = [shutil.which("quantkit") or "quantkit", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def edit_weights(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def build(work: Path) -> dict[str, Path]:
    """The models and files the cases use."""
    import torch
    from conftest import make_checkpoint, tiny_text
    from safetensors.torch import load_file

    paths = {"model": make_checkpoint(work / "model", "llama"), "text": work / "corpus.txt"}
    paths["text"].write_text(tiny_text())
    assert quantkit("calibrate", paths["model"], "--scheme", "w8a8_dynamic", *FAST, "--out", work / "q",
                    "--quiet").returncode == 0
    paths["q"] = work / "q"
    assert quantkit("calibrate", paths["model"], "--scheme", "q4_k", *FAST, "--out", work / "q_rtn",
                    "--quiet").returncode == 0       # weight-only rtn: no data, so no importance statistics
    paths["q_rtn"] = work / "q_rtn"

    def variant(name, edit=None):
        target = work / name
        shutil.copytree(paths["model"], target)
        if edit:
            edit_weights(target, edit)
        return target

    paths["missing_linear"] = variant("missing_linear", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    paths["extra_tensor"] = variant("extra_tensor", lambda w: w.update({"model.layers.9.mlp.x.weight": torch.zeros(2)}))
    paths["nan"] = variant("nan", lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("nan")))
    paths["overflow"] = variant("overflow", lambda w: w["model.layers.1.mlp.down_proj.weight"].fill_(1e36))
    paths["small_vocab"] = make_checkpoint(work / "small_vocab", "llama", vocab_size=16)
    orphan = work / "orphan"
    shutil.copytree(paths["q"], orphan)
    (orphan / "quant_manifest.json").unlink()
    paths["orphan"] = orphan
    for name, edit in (("manifest_list", lambda m: [m]), ("manifest_null", lambda m: {**m, "layers": None})):
        target = work / name
        shutil.copytree(paths["q"], target)
        manifest = json.loads((target / "quant_manifest.json").read_text())
        (target / "quant_manifest.json").write_text(json.dumps(edit(manifest)))
        paths[name] = target
    sharded = work / "sharded"
    shutil.copytree(paths["model"], sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(paths["model"] / "model.safetensors")
    from safetensors.torch import save_file

    names = sorted(weights)
    save_file({n: weights[n] for n in names[:10]}, sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors"
                            for i, n in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    paths["sharded"] = sharded
    mine = work / "my_dir"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    paths["my_dir"] = mine
    (work / "afile").write_text("x")
    paths["afile"] = work / "afile"
    gsm = work / "gsm_missing_answer.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "text": "2"}) + "\n")
    paths["gsm_bad"] = gsm
    pickle_dir = work / "pickle"
    shutil.copytree(paths["model"], pickle_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save({"model.embed_tokens.weight": Path("/etc/passwd")}, pickle_dir / "pytorch_model.bin")
    paths["pickle"] = pickle_dir
    return paths


def cases(p: dict[str, Path], work: Path) -> list[tuple[str, list, Path | None]]:
    """(what, arguments, a path that must be unchanged afterwards)."""
    m, out = p["model"], work / "out"
    return [
        ("eval: float checkpoint missing a Linear", ["eval", p["missing_linear"], "--text", p["text"]], p["missing_linear"]),
        ("eval: broken --reference", ["eval", p["q"], "--reference", p["missing_linear"], "--text", p["text"]], p["q"]),
        ("eval: unexpected tensor", ["eval", p["extra_tensor"], "--text", p["text"]], None),
        ("eval: quantkit output, manifest deleted", ["eval", p["orphan"], "--text", p["text"]], p["orphan"]),
        ("export: quantkit output, manifest deleted", ["export", p["orphan"], "--format", "gguf", "--out", work / "o.gguf"], None),
        ("validate: quantkit output, manifest deleted", ["validate", p["orphan"]], None),
        ("calibrate --overwrite onto a user's directory", ["calibrate", m, *FAST, "--out", p["my_dir"], "--overwrite"], p["my_dir"]),
        ("export --overwrite onto a user's file", ["export", p["q"], "--format", "gguf", "--out", p["afile"], "--overwrite"], p["afile"]),
        ("calibrate --out under a regular file", ["calibrate", m, *FAST, "--out", p["afile"] / "out"], p["afile"]),
        ("calibrate --out in /proc", ["calibrate", m, *FAST, "--out", "/proc/quantkit-out"], None),
        ("export --out in /sys", ["export", p["q"], "--format", "compressed-tensors", "--out", "/sys/quantkit-ct"], None),
        ("calibrate: tokenizer larger than the embedding", ["calibrate", p["small_vocab"], *FAST, "--dataset", p["text"],
                                                            "--out", out], None),
        ("eval: tokenizer larger than the embedding", ["eval", p["small_vocab"], "--text", p["text"]], None),
        ("calibrate: index names a missing shard", ["calibrate", p["sharded"], *FAST, "--out", out], p["sharded"]),
        ("--algo-option samples=banana", ["calibrate", m, "--scheme", "w4a16", "--algo", "awq", "--algo-option",
                                          "samples=banana", *FAST, "--out", out], None),
        ("--algo-option damp=banana", ["calibrate", m, "--scheme", "w4a16", "--algo", "gptq", "--algo-option",
                                       "damp=banana", *FAST, "--out", out], None),
        ("--algo-option samples=0", ["calibrate", m, "--scheme", "w4a16", "--algo", "awq", "--algo-option", "samples=0",
                                     *FAST, "--out", out], None),
        ("--algo-option act_order=maybe", ["calibrate", m, "--scheme", "w4a16", "--algo", "gptq", "--algo-option",
                                           "act_order=maybe", *FAST, "--out", out], None),
        ("manifest is a JSON list (eval)", ["eval", p["manifest_list"], "--no-reference"], p["manifest_list"]),
        ("manifest layers: null (export)", ["export", p["manifest_null"], "--format", "gguf", "--out", work / "n.gguf"], None),
        ("--dry-run, missing dataset file", ["calibrate", m, *FAST, "--dataset", "nope.txt", "--out", out, "--dry-run"], None),
        ("--dry-run, misspelled dataset", ["calibrate", m, *FAST, "--dataset", "gsm8kk", "--out", out, "--dry-run"], None),
        ("--dry-run, gsm8k offline", ["calibrate", m, *FAST, "--dataset", "gsm8k", "--out", out, "--dry-run"], None),
        ("--dry-run, --seq-len -5", ["calibrate", m, "--seq-len", "-5", "--out", out, "--dry-run"], None),
        ("--dry-run, NaN weight", ["calibrate", p["nan"], *FAST, "--out", out, "--dry-run"], p["nan"]),
        ("--dry-run, unwritable --out", ["calibrate", m, *FAST, "--out", "/proc/x", "--dry-run"], None),
        ("gsm8k data file without 'answer'", ["calibrate", m, *FAST, "--dataset", "gsm8k", "--data-files", p["gsm_bad"],
                                              "--out", out], None),
        ("pickle checkpoint with a non-tensor", ["calibrate", p["pickle"], *FAST, "--out", out], p["pickle"]),
        ("float model overflows", ["calibrate", p["overflow"], "--scheme", "w8a8_dynamic", "--alpha", "0.5", *FAST,
                                   "--out", out], p["overflow"]),
        ("K-quant file type with hqq", ["calibrate", m, "--scheme", "q4_k_m", "--algo", "hqq", *FAST, "--out", out], None),
        ("misspelled file type", ["calibrate", m, "--scheme", "q4_k_z", *FAST, "--out", out], None),
        ("--imatrix-from float with awq", ["calibrate", m, "--scheme", "q4_k_m", "--algo", "awq", "--imatrix-from",
                                           "float", *FAST, "--out", out], None),
        ("export --format imatrix of a float checkpoint", ["export", m, "--format", "imatrix", "--out", work / "m.gguf"], m),
        ("export --format imatrix, no statistics", ["export", p["q_rtn"], "--format", "imatrix", "--out",
                                                    work / "m.gguf"], p["q_rtn"]),
    ]


def check(result: subprocess.CompletedProcess) -> str | None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode == 0:
        return "exit 0"
    if "Traceback" in result.stderr or "internal error" in result.stderr:
        return "traceback or internal error"
    if not lines or not lines[-1].startswith("error: ") or any(l.startswith("error: ") for l in lines[:-1]):
        return "not one error line"
    if any(not l.startswith("estimated peak memory") for l in lines[:-1]):
        return "extra output"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build the cases here and keep them")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="quantkit-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    os.environ.update(env)
    paths = build(work)
    failures = 0
    for what, arguments, protected in cases(paths, work):
        before = digest(protected) if protected else None
        result = quantkit(*arguments)
        problem = check(result)
        if protected is not None and digest(protected) != before:
            problem = f"{protected} changed"
        if (work / "out").exists():
            problem = "an output was written"
        failures += problem is not None
        last = (result.stderr.strip().splitlines() or [""])[-1]
        print(f"{'ok  ' if problem is None else 'FAIL'} exit {result.returncode}  {what}\n       {last}"
              + (f"\n       -> {problem}" if problem else ""), flush=True)
    print(f"{len(cases(paths, work)) - failures} passed, {failures} failed")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
