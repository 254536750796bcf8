"""`quantkit inspect`: the report's numbers against the manifest and independent recomputation."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file

import quantkit
from quantkit.native.manifest import Manifest

FAST = dict(num_samples=4, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def smoothed(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "smq"
    quantkit.calibrate(llama_dir, scheme="smq_q8i8f16_2", dataset=str(text_file), out=out, **FAST)
    return out


def sections(document: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)">(.*?)</section>', document, flags=re.S))


def embedded(document: str) -> dict:
    return json.loads(re.search(r'<script id=quantkit-report type=application/json>(.*?)</script>', document,
                                flags=re.S).group(1))


def test_report_has_one_figure_per_section_and_the_manifest_numbers(smoothed, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli("inspect", smoothed, "--out", out)
    assert result.exit_code == 0, result.output
    document = out.read_text()
    parts = sections(document)
    assert list(parts) == ["weights", "activations", "smoothing", "errors"]
    assert all(part.count("<img ") == 1 and "data:image/png;base64," in part for part in parts.values())
    manifest = Manifest.load(smoothed)
    data = embedded(document)
    assert data["block_alpha"] == manifest.smoothing.block_alpha
    quality = {row["name"]: row for row in data["quality"]}
    assert quality.keys() == manifest.layers.keys()
    for name, entry in manifest.layers.items():
        row = quality[name]
        assert (row["algorithm"], row["rule"]) == (entry.algorithm, entry.rule)
        assert row["weight_sqnr_db"] == entry.metrics["weight_sqnr_db"]
        assert row["output_sqnr_db"] == entry.metrics["output_sqnr_db"]
        # the HTML table prints the same values (4 significant digits)
        assert f"<td>{name}</td><td>{entry.scheme.weight.describe()}</td><td>{entry.algorithm}</td>" in parts["errors"]
        assert f"<td>{entry.metrics['output_sqnr_db']:.4g}</td>" in parts["errors"]


def test_weight_statistics_are_those_of_the_stored_weights(smoothed):
    report = quantkit.inspect(smoothed)
    model = quantkit.load_quantized(smoothed)
    for stats in report.weights:
        weight = model.get_submodule(stats.name).dequantized_weight().float()
        assert stats.absmax == pytest.approx(float(weight.abs().max()), rel=1e-6)
        assert stats.p50 == pytest.approx(float(weight.abs().median()), rel=1e-2)
        columns = weight.abs().amax(dim=0)
        expected = torch.nonzero(columns > 8 * columns.median()).flatten().tolist()
        assert stats.outlier_count == len(expected) and set(stats.outlier_channels) <= set(expected)


@pytest.mark.parametrize("scheme, algo", [("smq_q8i8f16_2", "rtn"), ("w4a16", "awq")])
def test_activation_absmax_is_the_float_models_on_the_calibration_tokens(llama_dir, text_file, tmp_path, scheme, algo):
    """Block 0 reads the embeddings (nothing quantized before it) and RTN/AWQ observe the float block once: the
    report's per-channel max |x| of q_proj's input (after input_layernorm) and of o_proj's (the attention
    output, reached through GQA's shared channels) equal the float model's on the regenerated calibration
    tokens, SmoothQuant's or AWQ's division undone."""
    from transformers import AutoModelForCausalLM

    from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens
    from quantkit.model.checkpoint import Checkpoint

    out = quantkit.calibrate(llama_dir, scheme=scheme, algo=algo, group_size=32 if algo == "awq" else None,
                             dataset=str(text_file), out=tmp_path / "q", **FAST).out
    checkpoint = Checkpoint(llama_dir)
    tokens = calibration_tokens(DatasetSpec(str(text_file)), checkpoint.tokenizer(), checkpoint.text_config.vocab_size,
                                FAST["num_samples"], FAST["seq_len"], 0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = args[0].abs().amax(dim=(0, 1))
        return hook

    for name in ("q_proj", "o_proj"):
        model.model.layers[0].self_attn.get_submodule(name).register_forward_hook(record(name))
    with torch.no_grad():
        model(tokens)
    report = {a.name: a for a in quantkit.inspect(out).activations}
    for name in ("q_proj", "o_proj"):
        stats = report[f"model.layers.0.self_attn.{name}"]
        assert stats.before_scaling, name
        assert torch.allclose(torch.tensor(stats.channel_absmax), seen[name], rtol=1e-4, atol=1e-6), name
    assert {0, 1} <= set(report["model.layers.0.self_attn.q_proj"].outlier_channels)  # make_checkpoint's outliers


def test_float_checkpoint_report(llama_dir, tmp_path):
    report = quantkit.inspect(llama_dir, out=tmp_path / "float.html")
    weights = load_file(str(llama_dir / "model.safetensors"))
    assert {s.name: s.absmax for s in report.weights} == pytest.approx(
        {s.name: float(weights[s.name + ".weight"].abs().max()) for s in report.weights})
    parts = sections((tmp_path / "float.html").read_text())
    assert list(parts) == ["weights"] and parts["weights"].count("<img ") == 1
    cli = run_cli("inspect", llama_dir, "--json")
    assert json.loads(cli.output) == json.loads(json.dumps(report.to_dict()))


def test_bad_inputs_are_one_line(tmp_path, smoothed):
    assert_one_line_error(run_cli("inspect", tmp_path / "missing"), "not found")
    (tmp_path / "file.txt").write_text("x")
    assert_one_line_error(run_cli("inspect", tmp_path / "file.txt"), "is a file")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("inspect", tmp_path / "empty"), "neither a quantkit output")
    foreign = tmp_path / "notes.html"
    foreign.write_text("<html>mine</html>")
    assert_one_line_error(run_cli("inspect", smoothed, "--out", foreign, "--overwrite"), "quantkit did not write")
    assert foreign.read_text() == "<html>mine</html>"
    assert run_cli("inspect", smoothed, "--out", tmp_path / "ours.html").exit_code == 0
    assert_one_line_error(run_cli("inspect", smoothed, "--out", tmp_path / "ours.html"), "already exists")
    assert run_cli("inspect", smoothed, "--out", tmp_path / "ours.html", "--overwrite").exit_code == 0
