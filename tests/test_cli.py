"""The CLI: the main job works, and every bad input is one line and a non-zero exit."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, make_checkpoint, run_cli

FAST = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]


run = run_cli


def test_schemes_lists_one_line_each():
    result = run("schemes")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names[:3] == ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2"] and "w8a8_dynamic" in names


def test_calibrate_json_then_eval(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = run("calibrate", llama_dir, "--scheme", "w8a8_dynamic", *FAST, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["layers_quantized"] == 14 and summary["schemes"] == ["w8a8_dynamic"]
    result = run("eval", out, "--text", text_file, "--seq-len", "32", "--max-windows", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    labels = [row["label"] for row in report["rows"]]
    assert labels == ["reference", "quantized"]
    assert report["rows"][1]["kl_divergence"] >= 0 and "4 non-overlapping windows" in report["protocol_text"]


def test_existing_output_needs_overwrite(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run("calibrate", llama_dir, *FAST, "--out", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what quantkit wrote: a user's directory stays (test_bad_inputs.py)
    assert_one_line_error(run("calibrate", llama_dir, *FAST, "--out", out, "--overwrite"), "refusing to replace")
    (out / "keep.txt").unlink()
    result = run("calibrate", llama_dir, *FAST, "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 0 and (out / "quant_manifest.json").is_file()


@pytest.mark.parametrize("args, fragment", [
    (["calibrate", "/no/such/model"], "model path not found: /no/such/model"),
    (["calibrate", "{llama}", "--scheme", "smq_q8i8f16_3"], "did you mean smq_q8i8f16_2"),
    (["calibrate", "{llama}", "--algo", "gptqq"], "unknown algorithm 'gptqq'"),
    (["calibrate", "{llama}", "--scheme", "w4a16", "--algo", "gptq", "--algo-option", "act_ordr=false"],
     "algorithm 'gptq' has no option 'act_ordr'; did you mean act_order?"),
    (["calibrate", "{llama}", "--dataset", "gsm8k"], "gsm8k is not available offline"),
    (["calibrate", "{llama}", "--dataset", "{text}", "--num-samples", "100000"], "fewer than the 100000 asked"),
    (["calibrate", "{llama}", "--seq-len", "100000"], "over the model's maximum of 256"),
    (["calibrate", "{llama}", "--out", "{llama}"], "overlaps the input"),
    (["eval", "/no/such/dir"], "model path not found"),
])
def test_bad_input_is_one_line(args, fragment, llama_dir, text_file, tmp_path):
    args = [a.format(llama=llama_dir, text=text_file) for a in args]
    if args[0] == "calibrate":
        args += [] if "--out" in args else ["--out", tmp_path / "out"]
        args += [] if "--seq-len" in args else ["--seq-len", "32"]
    assert_one_line_error(run(*args), fragment)
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model", "llama")
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("calibrate", checkpoint, *FAST, "--out", tmp_path / "out"),
                          "architecture FancyNewForCausalLM has no layer mapping")


def test_nan_weight_names_the_tensor(tmp_path, llama_dir):
    checkpoint = tmp_path / "model"
    shutil.copytree(llama_dir, checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_one_line_error(run("calibrate", checkpoint, *FAST, "--out", out), "NaN/Inf in weight model.layers.1.mlp.up_proj.weight")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_nan_activation_names_the_layer(tmp_path, llama_dir):
    checkpoint = tmp_path / "model"
    shutil.copytree(llama_dir, checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    # finite weights whose attention scores overflow: softmax(inf - inf) = NaN reaches o_proj
    weights["model.layers.0.input_layernorm.weight"] = torch.full((64,), 1e30)
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run("calibrate", checkpoint, *FAST, "--out", tmp_path / "out"),
                          "NaN/Inf in the input activations of model.layers.0.self_attn.o_proj")


def test_truncated_safetensors(tmp_path, llama_dir):
    checkpoint = tmp_path / "model"
    shutil.copytree(llama_dir, checkpoint)
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("calibrate", checkpoint, *FAST, "--out", tmp_path / "out"), "corrupt or truncated safetensors")


def test_alpha_and_no_smooth_conflict(llama_dir, tmp_path):
    assert_one_line_error(run("calibrate", llama_dir, "--alpha", "0.5", "--no-smooth", "--out", tmp_path / "o"),
                          "contradict")


def test_dry_run_estimates_and_writes_nothing(llama_dir, tmp_path):
    result = run("calibrate", llama_dir, "--scheme", "w4a16", "--algo", "gptq", *FAST, "--out", tmp_path / "o",
                 "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)["estimate"]
    assert estimate["peak_memory_bytes"] > estimate["phases"]["block"] > 0 and estimate["disk_bytes"] > 0
    assert list(tmp_path.iterdir()) == []


def test_dry_run_counts_the_sensitivity_pass_head(llama_dir, tmp_path):
    """With a target the estimate has the sensitivity pass's phase: the last block's run with the LM head (fp32,
    vocab x hidden) and a chunk of logits; without one it has none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llama_dir)
    phases = {}
    for name, flags in (("plain", []), ("target", ["--target-bits", "4"])):
        result = run("calibrate", llama_dir, "--scheme", "w4a16", *FAST, "--out", tmp_path / name, "--dry-run",
                     "--json", *flags)
        assert result.exit_code == 0, result.output
        phases[name] = json.loads(result.output)["estimate"]["phases"]
    assert "sensitivity" not in phases["plain"]
    assert phases["target"]["sensitivity"] > config.vocab_size * config.hidden_size * 4 + 4 * 256 * config.vocab_size * 4


def test_memory_the_machine_lacks_stops_before_work(llama_dir, tmp_path):
    # 100k samples of 256 tokens cannot be cached in memory: the estimate refuses and names the fixes
    result = run("calibrate", llama_dir, "--num-samples", "400000", "--seq-len", "256", "--out", tmp_path / "o")
    assert_one_line_error(result, "try fewer calibration samples (--num-samples), shorter ones (--seq-len), or --offload-activations")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["export", "{out}", "--format", "gguff"], "'gguff' is not one of 'gguf', 'compressed-tensors'"),
    (["calibrate", "{out}", "--propagate", "flaot"], "'flaot' is not one of 'quantized', 'float'"),
    (["validate", "{out}", "--backend", "tritn"], "'tritn' is not one of 'auto', 'triton'"),
])
def test_mistyped_choice_names_the_closest(args, fragment, tmp_path):
    """A flag's fixed choices (click's usage error, exit 2) name the closest one when one is close, and only then."""
    args = [a.format(out=tmp_path) for a in args]
    closest = {"gguff": "gguf", "flaot": "float", "tritn": "triton"}[args[-1]]
    result = run(*args)
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 2 and len(error) == 1 and "Traceback" not in result.output, result.output
    assert fragment in error[0] and error[0].endswith(f"; did you mean {closest}?"), error[0]
    far = run(*args[:-1], "zzzz")
    assert far.exit_code == 2 and "did you mean" not in far.output, far.output
