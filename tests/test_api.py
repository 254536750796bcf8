"""The public Python API (`quantkit.calibrate`, `export`, `evaluate`, `validate`): the CLI's behaviour, typed."""
from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import quantkit
from quantkit.errors import QuantkitError

FAST = dict(num_samples=4, seq_len=32, batch_size=4)


def codes_of(directory):
    """Every tensor of a quantkit output, by name."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name != "search_results.safetensors":
            tensors.update(load_file(str(path)))
    return tensors


def test_calibrate_a_path_reports_progress_and_writes_what_the_cli_writes(llama_dir, tmp_path):
    events = []
    result = quantkit.calibrate(llama_dir, scheme="w4a16", algo="gptq", group_size=32, out=tmp_path / "api",
                                progress=events.append, **FAST)
    assert result.out == tmp_path / "api" and result.manifest.layers
    kinds = {event.kind for event in events}
    assert {"estimate", "stage", "advance", "block"} <= kinds, kinds
    blocks = [event for event in events if event.kind == "block"]
    assert [event.done for event in blocks] == [0, 1]
    assert all(isinstance(metrics, dict) for event in blocks for metrics in event.layers.values())
    cli = run_cli("calibrate", llama_dir, "--scheme", "w4a16", "--algo", "gptq", "--group-size", "32",
                  "--num-samples", "4", "--seq-len", "32", "--batch-size", "4", "--out", tmp_path / "cli", "--quiet")
    assert cli.exit_code == 0, cli.output
    ours, theirs = codes_of(tmp_path / "api"), codes_of(tmp_path / "cli")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_calibrate_a_loaded_model_writes_it_out_and_leaves_it_unchanged(llama_dir, text_file, tmp_path):
    """A loaded transformers model + tokenizer: the same output as calibrating its checkpoint directory,
    the model object untouched, and no temporary copy left behind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = dict(scheme="w4a16", algo="awq", group_size=32, dataset=str(text_file), **FAST)
    result = quantkit.calibrate(model, tokenizer, out=tmp_path / "loaded", **options)
    quantkit.calibrate(llama_dir, out=tmp_path / "path", **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ours, theirs = codes_of(tmp_path / "loaded"), codes_of(tmp_path / "path")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loaded", "path"]
    reloaded = quantkit.load_quantized(result.out)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(reloaded(ids).logits).all()


def test_a_loaded_model_can_keep_its_float_checkpoint_for_validation(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    result = quantkit.calibrate(model, AutoTokenizer.from_pretrained(llama_dir), scheme="w8a16", out=tmp_path / "q",
                                save_source=tmp_path / "float", **FAST)
    assert (tmp_path / "float" / "config.json").is_file()
    report = quantkit.validate(result.out)
    assert report.passed and report.float_reference


def test_errors_are_the_cli_lines(llama_dir, tmp_path):
    with pytest.raises(QuantkitError) as error:
        quantkit.calibrate(llama_dir, scheme="w4a61", out=tmp_path / "x")
    cli = run_cli("calibrate", llama_dir, "--scheme", "w4a61", "--out", tmp_path / "x")
    assert cli.output.strip().splitlines()[-1] == f"error: {error.value}"
    with pytest.raises(QuantkitError, match="give out="):
        from transformers import AutoModelForCausalLM

        quantkit.calibrate(AutoModelForCausalLM.from_pretrained(llama_dir), scheme="w8a16")
    with pytest.raises(QuantkitError, match="pass the model's tokenizer"):
        quantkit.calibrate(AutoModelForCausalLM.from_pretrained(llama_dir), dataset="gsm8k", out=tmp_path / "y")
    with pytest.raises(QuantkitError, match="did you mean gguf"):
        quantkit.export(llama_dir, format="guff", out=tmp_path / "z.gguf")
    with pytest.raises(QuantkitError, match="model must be a checkpoint path"):
        quantkit.calibrate(42, out=tmp_path / "w")


def test_export_and_evaluate(llama_dir, text_file, tmp_path):
    out = quantkit.calibrate(llama_dir, scheme="w8a16", out=tmp_path / "q", **FAST).out
    ct = quantkit.export(out, format="compressed-tensors", out=tmp_path / "ct")
    assert (tmp_path / "ct" / "config.json").is_file() and ct.to_dict()["out"]
    report = quantkit.evaluate(out, text=text_file, seq_len=32, max_windows=4)
    quantized = report.rows[-1]
    assert report.rows[0].label == "reference" and quantized.kl_divergence >= 0
    cli = run_cli("eval", out, "--text", text_file, "--seq-len", "32", "--max-windows", "4", "--json")
    import json

    assert json.loads(cli.output)["rows"][-1]["perplexity"] == pytest.approx(quantized.perplexity, rel=1e-6)


def test_loaded_model_checks_come_before_any_save(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(QuantkitError, match="already exists"):
        quantkit.calibrate(model, scheme="w8a16", out=tmp_path / "taken")
    with pytest.raises(QuantkitError, match="resume needs the same source"):
        quantkit.calibrate(model, scheme="w8a16", out=tmp_path / "r", resume=True)
    with pytest.raises(QuantkitError, match="in \\[0, 1\\]"):
        quantkit.calibrate(llama_dir, scheme="smq_q8i8f16_2", alpha=1.5, out=tmp_path / "a")
    with pytest.raises(QuantkitError, match="--recipe sets every layer"):
        quantkit.calibrate(llama_dir, recipe=tmp_path / "r.yaml", algo="gptq", out=tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_function_survives_importing_the_calibration_stage():
    """quantkit/calibrate/ (the stage's package) and quantkit.calibrate (the API function) share a name: importing
    the package's modules in any order must leave the function in place."""
    import subprocess
    import sys

    code = ("import quantkit.calibrate.datasets, quantkit.calibrate.hooks; import quantkit; "
            "from quantkit.calibrate import stats; assert callable(quantkit.calibrate), quantkit.calibrate; "
            "assert quantkit.calibrate.__module__ == 'quantkit.api'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
