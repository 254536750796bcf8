"""The bad-input matrix (docs/bad-inputs.md): every hostile input is one clear line and a non-zero exit,
nothing a user made is deleted, the input is never modified, and no number is printed for a model
that was not loaded whole. Tiny models built here; each case takes a few seconds at most."""
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, make_checkpoint, run_cli

FAST = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]
EVAL_FAST = ["--seq-len", "32", "--max-windows", "2"]


@pytest.fixture(scope="module")
def quantized_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    result = run_cli("calibrate", llama_dir, "--scheme", "w8a8_dynamic", *FAST, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def gguf_ready_dir(tmp_path_factory):
    """A quantized tiny Llama whose (byte-level BPE) tokenizer GGUF can hold."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path_factory.mktemp("bpe") / "model", "llama", vocab_size=VOCAB, outlier_channels=0)
    save_byte_level_bpe(source)
    out = source.parent / "w8a8"
    result = run_cli("calibrate", source, "--scheme", "w8a8_dynamic", *FAST, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def _copy(directory, target):
    shutil.copytree(directory, target)
    return target


def _edit_weights(directory, edit):
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# 1. no number for a model that is partly random -------------------------------------------------------


def test_eval_refuses_float_checkpoint_missing_a_linear(llama_dir, text_file, tmp_path):
    broken = _copy(llama_dir, tmp_path / "model")
    _edit_weights(broken, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    result = run_cli("eval", broken, "--text", text_file, *EVAL_FAST)
    assert_one_line_error(result, "is incomplete: no tensor for model.layers.1.mlp.up_proj.weight")
    assert "perplexity" not in result.output.lower()


def test_eval_refuses_broken_reference(quantized_dir, llama_dir, text_file, tmp_path):
    broken = _copy(llama_dir, tmp_path / "reference")
    _edit_weights(broken, lambda w: w.pop("model.layers.0.self_attn.q_proj.weight"))
    assert_one_line_error(run_cli("eval", quantized_dir, "--reference", broken, "--text", text_file, *EVAL_FAST),
                          "no tensor for model.layers.0.self_attn.q_proj.weight")


def test_eval_refuses_an_unexpected_tensor(llama_dir, text_file, tmp_path):
    broken = _copy(llama_dir, tmp_path / "model")
    _edit_weights(broken, lambda w: w.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)}))
    assert_one_line_error(run_cli("eval", broken, "--text", text_file, *EVAL_FAST),
                          "holds tensor model.layers.7.mlp.up_proj.weight that the model its config describes has no place for")
    assert_one_line_error(run_cli("calibrate", broken, *FAST, "--out", tmp_path / "out"), "has no place for")


def test_wrong_shape_is_named(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "model")
    _edit_weights(broken, lambda w: w.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 100)}))
    assert_one_line_error(run_cli("calibrate", broken, *FAST, "--out", tmp_path / "out"),
                          "tensor model.layers.0.mlp.down_proj.weight in")
    assert not (tmp_path / "out").exists()


def test_quantized_output_without_manifest_says_so(quantized_dir, text_file, tmp_path):
    orphan = _copy(quantized_dir, tmp_path / "orphan")
    (orphan / "quant_manifest.json").unlink()
    for args in (["eval", orphan, "--text", text_file, *EVAL_FAST], ["export", orphan, "--format", "gguf", "--out",
                 tmp_path / "x.gguf"], ["validate", orphan]):
        assert_one_line_error(run_cli(*args), "holds quantkit tensors")
    from quantkit import load_quantized
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="but no quant_manifest.json"):
        load_quantized(orphan)


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_quantized_output_with_damaged_tensors(quantized_dir, text_file, tmp_path, damage):
    from quantkit import load_quantized
    from quantkit.errors import QuantkitError

    damaged = _copy(quantized_dir, tmp_path / "damaged")
    if damage == "missing":
        _edit_weights(damaged, lambda w: w.pop("model.norm.weight"))
        fragment = "is incomplete: no tensor for model.norm.weight"
    else:
        _edit_weights(damaged, lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
        fragment = "holds tensor model.layers.0.mlp.extra.weight"
    for args in (["eval", damaged, "--text", text_file, *EVAL_FAST, "--no-reference"],
                 ["export", damaged, "--format", "compressed-tensors", "--out", tmp_path / "ct"],
                 ["export", damaged, "--format", "gguf", "--out", tmp_path / "x.gguf"], ["validate", damaged]):
        assert_one_line_error(run_cli(*args), fragment)
    with pytest.raises(QuantkitError, match=fragment.split(":")[0]):
        load_quantized(damaged)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "x.gguf").exists()


# 2. --overwrite replaces only what quantkit wrote ----------------------------------------------------


def test_overwrite_refuses_a_users_directory(llama_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = run_cli("calibrate", llama_dir, *FAST, "--out", out, "--overwrite")
    assert_one_line_error(result, "refusing to replace")
    assert "thesis.tex" in result.output
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_empty_directory_and_quantkit_output(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli("calibrate", llama_dir, *FAST, "--out", out, "--overwrite", "--quiet").exit_code == 0
    first = (out / "quant_manifest.json").read_text()
    result = run_cli("calibrate", llama_dir, *FAST, "--seed", "3", "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "quant_manifest.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_gguf_overwrite_leaves_no_old_file_and_refuses_foreign_files(gguf_ready_dir, tmp_path):
    target = tmp_path / "model.gguf"
    result = run_cli("export", gguf_ready_dir, "--format", "gguf", "--out", target, "--quiet")
    assert result.exit_code == 0, result.output
    result = run_cli("export", gguf_ready_dir, "--format", "gguf", "--out", target, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("my notes")
    assert_one_line_error(run_cli("export", gguf_ready_dir, "--format", "gguf", "--out", foreign, "--overwrite"),
                          "it is a file quantkit did not write")
    assert foreign.read_text() == "my notes"


def test_compressed_tensors_overwrite_replaces_its_own_export(quantized_dir, tmp_path):
    target = tmp_path / "ct"
    assert run_cli("export", quantized_dir, "--format", "compressed-tensors", "--out", target, "--quiet").exit_code == 0
    result = run_cli("export", quantized_dir, "--format", "compressed-tensors", "--out", target, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


# 3. committed blocks are never thrown away without a word ------------------------------------------


def test_rerun_without_resume_keeps_committed_blocks(llama_dir, tmp_path):
    from quantkit.errors import RunInterrupted
    from quantkit.run.pipeline import CalibrateConfig, Progress, calibrate

    class KillAfterFirstBlock(Progress):
        def block_done(self, index, layers):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(model=str(llama_dir), out=out, num_samples=4, seq_len=32, batch_size=4),
                  KillAfterFirstBlock())
    partial = tmp_path / ".out.partial"
    before = _snapshot(partial)
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", out, *extra),
                              "1 committed block of an interrupted run found")
    assert _snapshot(partial) == before
    result = run_cli("calibrate", llama_dir, *FAST, "--out", out, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    assert not partial.exists() and (out / "quant_manifest.json").is_file()


# 4. unwritable outputs and full disks -----------------------------------------------------------------


def test_output_under_a_regular_file(llama_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", tmp_path / "afile" / "out"),
                          "afile is a file, not a directory")


def test_output_in_a_pseudo_filesystem(llama_dir, quantized_dir):
    assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", "/proc/quantkit-out"), "cannot write to /proc: not a writable directory")
    assert_one_line_error(run_cli("export", quantized_dir, "--format", "gguf", "--out", "/proc/x.gguf"),
                          "cannot write to /proc: not a writable directory")


@contextlib.contextmanager
def _tmpfs(tmp_path, size, *options):
    """A small tmpfs mounted for the test (root only); skips where mounting is not allowed."""
    mount_point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    spec = ",".join([f"size={size}", *options])
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", spec, "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_read_only_filesystem(llama_dir, quantized_dir, tmp_path):
    with _tmpfs(tmp_path, "1m", "ro") as mount:
        assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", mount / "out"), "Read-only file system")
        assert_one_line_error(run_cli("export", quantized_dir, "--format", "compressed-tensors", "--out", mount / "ct"),
                              "Read-only file system")


def test_disk_too_small_for_the_estimate(llama_dir, tmp_path):
    with _tmpfs(tmp_path, "64k") as mount:
        assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", mount / "out"), f"of disk in {mount}")
        assert list(mount.iterdir()) == []


def test_disk_full_while_writing(llama_dir, gguf_ready_dir, tmp_path, monkeypatch):
    import quantkit.run.pipeline

    # the disk fills up behind the estimate's back (another process, a wrong estimate)
    monkeypatch.setattr(quantkit.run.pipeline, "check_fits", lambda estimate, out: None)
    with _tmpfs(tmp_path, "96k") as mount:
        assert_one_line_error(run_cli("calibrate", llama_dir, *FAST, "--out", mount / "out"), "No space left on device")
        assert list(mount.iterdir()) == []
        for fmt, name in (("gguf", "x.gguf"), ("compressed-tensors", "ct")):
            assert_one_line_error(run_cli("export", gguf_ready_dir, "--format", fmt, "--out", mount / name),
                                  "No space left on device")
            assert list(mount.iterdir()) == []


def test_disk_estimate_counts_everything_written(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model", "llama")
    # a big tokenizer-side file (sentencepiece models are MBs): copied into the output
    (checkpoint / "merges.txt").write_text("a b\n" * 400_000)
    out = tmp_path / "out"
    result = run_cli("calibrate", checkpoint, "--scheme", "w8a8_dynamic", *FAST, "--out", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    estimated = json.loads(result.output)["estimate"]["disk_bytes"]
    assert run_cli("calibrate", checkpoint, "--scheme", "w8a8_dynamic", *FAST, "--out", out, "--quiet").exit_code == 0
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert (out / "merges.txt").is_file() and written <= estimated


# 5. token ids past the embedding ---------------------------------------------------------------------


def test_tokenizer_larger_than_the_embedding(tmp_path, text_file):
    checkpoint = make_checkpoint(tmp_path / "model", "llama", vocab_size=16)  # the tokenizer has 40 tokens
    fragment = "the model's embedding has 16 rows"
    assert_one_line_error(run_cli("calibrate", checkpoint, *FAST, "--dataset", text_file, "--out", tmp_path / "o"),
                          fragment)
    assert_one_line_error(run_cli("eval", checkpoint, "--text", text_file, *EVAL_FAST), fragment)


# 6. sharded checkpoints ------------------------------------------------------------------------------


def test_index_names_a_missing_shard(llama_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(llama_dir, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(llama_dir / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, members in files.items():
        save_file({n: weights[n] for n in members}, sharded / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, members in files.items() for n in members}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run_cli("calibrate", sharded, *FAST, "--out", tmp_path / "ok", "--dry-run").exit_code == 0
    (sharded / "model-00002-of-00002.safetensors").unlink()
    for args in (["calibrate", sharded, *FAST, "--out", tmp_path / "o"], ["eval", sharded]):
        assert_one_line_error(run_cli(*args), "names shard model-00002-of-00002.safetensors, which is missing")


# 7. algorithm option values ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm, option, fragment", [
    ("awq", "samples=banana", "option samples='banana': expected a whole number"),
    ("gptq", "damp=banana", "option damp='banana': expected a finite number"),
    ("awq", "samples=0", "option samples=0: must be at least 1"),
    ("gptq", "act_order=maybe", "option act_order='maybe': expected true or false"),
    ("gptq", "block_size=2.5", "expected a whole number"),
    ("gptq", "damp=0", "must be greater than 0.0"),
    ("hqq", "iterations=true", "expected a whole number"),
])
def test_option_values_are_checked_before_work(llama_dir, tmp_path, algorithm, option, fragment):
    started = time.perf_counter()
    result = run_cli("calibrate", llama_dir, "--scheme", "w4a16", "--algo", algorithm, "--algo-option", option,
                     *FAST, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert "estimated peak memory" not in result.output  # refused at argument time, before any estimate
    assert time.perf_counter() - started < 30 and not (tmp_path / "out").exists()


def test_recipe_option_values_are_checked(llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {scheme: w4a16, algorithm: gptq}\n"
                      "rules:\n  - match: '*.mlp.down_proj'\n    scheme: w4a16\n    algorithm: awq\n"
                      "    options: {clip: maybe}\n")
    assert_one_line_error(run_cli("calibrate", llama_dir, "--recipe", recipe, *FAST, "--out", tmp_path / "o"),
                          "option clip='maybe': expected true or false")


# 8. manifests of the wrong shape ------------------------------------------------------------------------


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: [m], "is a JSON array, not an object"),
    (lambda m: {**m, "layers": None}, "'layers' is a JSON null, expected an object"),
    (lambda m: {**m, "layers": {"model.layers.0.mlp.up_proj": [1, 2]}}, "layer model.layers.0.mlp.up_proj has a missing or malformed field"),
    (lambda m: {**m, "source": "x"}, "'source' is a JSON string, expected an object"),
    (lambda m: {**m, "storage_dtype": "banana"}, "storage_dtype 'banana' is not a float dtype"),
])
def test_manifest_of_the_wrong_shape(quantized_dir, tmp_path, edit, fragment):
    from quantkit import load_quantized
    from quantkit.errors import QuantkitError

    damaged = _copy(quantized_dir, tmp_path / "damaged")
    manifest = json.loads((damaged / "quant_manifest.json").read_text())
    (damaged / "quant_manifest.json").write_text(json.dumps(edit(manifest)))
    with pytest.raises(QuantkitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_quantized(damaged)
    for args in (["eval", damaged, "--no-reference"], ["export", damaged, "--format", "gguf", "--out", tmp_path / "x"],
                 ["validate", damaged]):
        assert_one_line_error(run_cli(*args), fragment)


# 9. the dry run refuses what the run refuses ------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--dataset", "missing.txt"], "dataset file not found: missing.txt"),
    (["--dataset", "gsm8kk"], "unknown dataset 'gsm8kk'; did you mean gsm8k?"),
    (["--dataset", "gsm8k"], "gsm8k is not available offline"),
    (["--seq-len", "-5"], "--seq-len must be at least 2 tokens, got -5"),
    (["--out", "/proc/quantkit-dry"], "cannot write to /proc: not a writable directory"),
])
def test_dry_run_refuses_what_the_run_refuses(llama_dir, tmp_path, args, fragment):
    base = ["calibrate", llama_dir, "--scheme", "smq_q8i8f16_2", "--num-samples", "4", "--batch-size", "4"]
    base += [] if "--seq-len" in args else ["--seq-len", "32"]
    base += [] if "--out" in args else ["--out", tmp_path / "out"]
    for extra in (["--dry-run"], []):
        assert_one_line_error(run_cli(*base, *args, *extra), fragment)
    assert not (tmp_path / "out").exists()


def test_dry_run_reads_every_weight(llama_dir, tmp_path):
    checkpoint = _copy(llama_dir, tmp_path / "model")
    _edit_weights(checkpoint, lambda w: w["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("inf")))
    for extra in (["--dry-run"], []):
        assert_one_line_error(run_cli("calibrate", checkpoint, "--scheme", "w4a16", *FAST, "--out", tmp_path / "o", *extra),
                              "NaN/Inf in weight model.layers.1.mlp.down_proj.weight")


# smaller ---------------------------------------------------------------------------------------------------


def test_pickle_checkpoints_are_read_safely(llama_dir, tmp_path):
    legacy = _copy(llama_dir, tmp_path / "legacy")
    weights = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(weights, legacy / "pytorch_model.bin")
    assert run_cli("calibrate", legacy, *FAST, "--out", tmp_path / "ok", "--quiet").exit_code == 0

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    torch.save({"model.embed_tokens.weight": Payload()}, legacy / "pytorch_model.bin")
    result = run_cli("calibrate", legacy, *FAST, "--out", tmp_path / "o")
    assert_one_line_error(result, f"refusing to load {legacy / 'pytorch_model.bin'}: it holds objects other than tensors")
    assert not Path("pwned").exists()


def test_gsm8k_offline_fails_at_once_with_the_right_hint(llama_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    from quantkit.calibrate import datasets

    monkeypatch.setattr(datasets, "_hub_reachable", lambda timeout=3.0: False)  # as on a machine without network
    started = time.perf_counter()
    result = run_cli("calibrate", llama_dir, "--dataset", "gsm8k", *FAST, "--out", tmp_path / "o")
    assert_one_line_error(result, "the hub cannot be reached")
    assert "--data-files" in result.output and time.perf_counter() - started < 20
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "one plus one?", "text": "two"}) + "\n")
    result = run_cli("calibrate", llama_dir, "--dataset", "gsm8k", "--data-files", data, *FAST, "--out", tmp_path / "o")
    assert_one_line_error(result, "gsm8k needs the columns question and answer")
    assert "--text-column" not in result.output


def test_float_overflow_is_named_as_such(llama_dir, tmp_path):
    checkpoint = _copy(llama_dir, tmp_path / "model")
    # finite weights whose MLP output overflows fp32 in the last block: no Linear sees a bad input
    _edit_weights(checkpoint, lambda w: w["model.layers.1.mlp.down_proj.weight"].fill_(1e38))
    assert_one_line_error(run_cli("calibrate", checkpoint, "--scheme", "w8a8_dynamic", "--alpha", "0.5", *FAST,
                                  "--out", tmp_path / "o"),
                          "the float model overflows: NaN/Inf in the output of model.layers.1.mlp.down_proj")


def test_output_taken_by_the_user_while_working_keeps_the_finished_run(llama_dir, tmp_path, monkeypatch):
    from quantkit.errors import QuantkitError
    from quantkit.run import workdir
    from quantkit.run.pipeline import CalibrateConfig, calibrate

    out = tmp_path / "out"
    real_publish = workdir.WorkDir.publish

    def user_writes_first(self, overwrite):
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")    # the user puts a file there while the run works
        return real_publish(self, overwrite)

    monkeypatch.setattr(workdir.WorkDir, "publish", user_writes_first)
    with pytest.raises(QuantkitError, match="rerun with --resume"):
        calibrate(CalibrateConfig(model=str(llama_dir), out=out, overwrite=True, num_samples=4, seq_len=32,
                                  batch_size=4))
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / ".out.partial" / "progress.json").is_file()


def test_gguf_ownership_is_read_from_the_file_head(tmp_path, monkeypatch):
    """Overwriting asks whether quantkit wrote a GGUF: general.quantized_by, read from the head without parsing
    the whole file; files without the key (llama.cpp's) or naming another tool stay foreign."""
    import gguf

    from quantkit.files import describe_existing

    def write(path, quantized_by):
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_name("m")
        if quantized_by is not None:
            writer.add_quantized_by(quantized_by)
        writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(5000)])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        return path

    ours, other, unnamed = (write(tmp_path / f"{n}.gguf", by) for n, by in
                            [("ours", "quantkit 0.1"), ("other", "llama.cpp"), ("unnamed", None)])
    assert describe_existing(ours) is None
    assert describe_existing(other) == "a file quantkit did not write"
    assert describe_existing(unnamed) == "a file quantkit did not write"      # gguf-py read it all: no key

    parsed = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *args, **kwargs: parsed.append(path))
    assert describe_existing(ours) is None
    assert describe_existing(other) == "a file quantkit did not write"
    assert parsed == []                                    # the head decided both


def test_first_line_of_a_foreign_error():
    from quantkit.errors import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(OSError("\n  disk full \nerrno 28")) == "disk full"
    assert first_line(KeyError("x" * 300), limit=10) == "'xxxxxxxxx"
    assert first_line(RuntimeError("bad\nworse"), typed=True) == "RuntimeError: bad"
    assert first_line(RuntimeError(""), typed=True) == "RuntimeError"


def test_a_foreign_error_without_text_is_still_one_line(llama_dir, monkeypatch):
    # transformers raising OSError() used to end in an IndexError from the empty text's first line
    import transformers

    from quantkit.errors import QuantkitError
    from quantkit.model.checkpoint import Checkpoint

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(QuantkitError, match=r"^cannot load the tokenizer of .*: OSError$"):
        Checkpoint(llama_dir).tokenizer()
