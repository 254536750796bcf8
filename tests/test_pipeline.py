"""End to end on tiny checkpoints: calibrate -> native files -> load_quantized, bit for bit."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.native.manifest import Manifest
from quantkit.run.pipeline import CalibrateConfig, Progress, calibrate
from quantkit.model.qlinear import QuantLinear
from quantkit.formats.schemes import SCHEMES

from conftest import make_checkpoint


def _logits(model, seed=0):
    inputs = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(inputs).logits


def _calibrate(checkpoint, out, **options):
    options = {"num_samples": 8, "seq_len": 32, "batch_size": 4, "keep_model": True, **options}
    return calibrate(CalibrateConfig(model=str(checkpoint), out=out, **options))


def _tree_digest(directory):
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_reloads_bit_exact(llama_dir, tmp_path, scheme):
    result = _calibrate(llama_dir, tmp_path / "out", scheme=scheme)
    reloaded = load_quantized(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14  # 7 Linears x 2 blocks
    assert torch.equal(_logits(result.model), _logits(reloaded))


@pytest.mark.parametrize("fixture", ["mistral_dir", "qwen2_dir", "qwen3_dir"])
@pytest.mark.parametrize("scheme", ["smq_q8i8f16_2", "w8a8_dynamic", "w4a16"])
def test_other_architectures_reload_bit_exact(fixture, scheme, tmp_path, request):
    checkpoint = request.getfixturevalue(fixture)
    result = _calibrate(checkpoint, tmp_path / "out", scheme=scheme)
    reloaded = load_quantized(tmp_path / "out")
    assert torch.equal(_logits(result.model), _logits(reloaded))
    if fixture == "qwen2_dir":  # q/k/v biases survive quantization
        assert reloaded.model.layers[0].self_attn.q_proj.bias is not None


def test_quantized_model_stays_close_to_float(llama_dir, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    result = _calibrate(llama_dir, tmp_path / "out", scheme="w8a16")
    p = torch.log_softmax(_logits(reference), -1)
    q = torch.log_softmax(_logits(result.model), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 1e-3
    assert (p.argmax(-1) == q.argmax(-1)).float().mean().item() > 0.95


def test_manifest_round_trips_and_describes_every_layer(llama_dir, tmp_path):
    result = _calibrate(llama_dir, tmp_path / "out", scheme="smq_q8i8f16_2", dataset="dummy", seed=3)
    manifest = Manifest.load(tmp_path / "out")
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert json.loads(json.dumps(manifest.to_dict())) == manifest.to_dict()
    assert manifest.to_dict() == result.manifest.to_dict()
    assert manifest.source.weights_sha256 and manifest.source.architecture == "LlamaForCausalLM"
    assert manifest.calibration.seed == 3 and manifest.calibration.num_samples == 8
    assert manifest.smoothing.enabled and set(manifest.smoothing.block_alpha) == {"0", "1"}
    entry = manifest.layers["model.layers.1.mlp.down_proj"]
    assert entry.scheme.name == "smq_q8i8f16_2" and entry.algorithm == "rtn"
    assert set(entry.tensors) == {"codes", "scale", "zero", "input_scale", "input_zero"}
    assert entry.metrics["output_sqnr_db"] > 10 and entry.metrics["weight_sqnr_db"] > 30


def test_outputs_and_input_untouched(llama_dir, tmp_path):
    before = _tree_digest(llama_dir)
    _calibrate(llama_dir, tmp_path / "out", scheme="w4a16", keep_model=False)
    assert _tree_digest(llama_dir) == before
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "quant_manifest.json", "config.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_half_precision_checkpoint_keeps_its_dtype(tmp_path):
    # the checks before work build the model on the meta device from a copy of the config: building it
    # from the checkpoint's own config object used to rewrite its dtype to float32 (fp32 outputs)
    checkpoint = make_checkpoint(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    result = _calibrate(checkpoint, tmp_path / "out", scheme="w8a8_dynamic", keep_model=False)
    assert result.manifest.storage_dtype == "bfloat16"
    assert result.manifest.calibration.compute_dtype == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_four_bit_codes_take_four_bits(llama_dir, tmp_path):
    _calibrate(llama_dir, tmp_path / "out", scheme="w4a16", group_size=32)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        codes = handle.get_tensor("model.layers.0.mlp.down_proj.weight_codes")
    # down_proj: 64 x 160 codes at 4 bits = 64 x 20 int32 words
    assert codes.dtype == torch.int32 and codes.shape == (64, 160 * 4 // 32)


def test_ragged_groups_work(llama_dir, tmp_path):
    # hidden 64 and intermediate 160 with group 48: every layer ends in a ragged group
    result = _calibrate(llama_dir, tmp_path / "out", scheme="w4a16", group_size=48)
    entry = result.manifest.layers["model.layers.0.mlp.down_proj"]
    assert entry.ragged_last_group and entry.scheme.weight.group_size == 48
    assert torch.equal(_logits(result.model), _logits(load_quantized(tmp_path / "out")))


def test_calibration_is_reproducible(llama_dir, tmp_path):
    first = _calibrate(llama_dir, tmp_path / "a", scheme="smq_q8i8f16_1", seed=7)
    second = _calibrate(llama_dir, tmp_path / "b", scheme="smq_q8i8f16_1", seed=7)
    assert torch.equal(_logits(first.model), _logits(second.model))


class _KillAfter(Progress):
    """A progress sink that interrupts the run right after block ``index`` is committed."""

    def __init__(self, index):
        self.index = index

    def block_done(self, index, layers):
        if index == self.index:
            raise KeyboardInterrupt


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "quant_manifest.json"}


@pytest.mark.parametrize("fixture, scheme, algorithm", [
    ("llama_dir", "smq_q8i8f16_2", "rtn"), ("llama_dir", "w4a16", "gptq"),
    ("gemma3_dir", "smq_q8i8f16_2", "rtn"),   # block 1's own (full-attention) mask is recaptured on resume
    ("qwen3_moe_dir", "w4a16", "gptq"),       # experts in batches of 3
])
def test_resume_after_kill_is_bit_identical(fixture, tmp_path, scheme, algorithm, request):
    from quantkit.errors import RunInterrupted

    options = dict(model=str(request.getfixturevalue(fixture)), scheme=scheme, algorithm=algorithm, num_samples=8,
                   seq_len=32, batch_size=4, expert_batch=3)
    calibrate(CalibrateConfig(out=tmp_path / "straight", **options))
    with pytest.raises(RunInterrupted, match="--resume"):
        calibrate(CalibrateConfig(out=tmp_path / "resumed", **options), progress=_KillAfter(0))
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial" / "progress.json").is_file()
    calibrate(CalibrateConfig(out=tmp_path / "resumed", resume=True, **options))
    assert _files(tmp_path / "straight") == _files(tmp_path / "resumed")
    straight, resumed = Manifest.load(tmp_path / "straight"), Manifest.load(tmp_path / "resumed")
    assert straight.layers == resumed.layers and straight.smoothing == resumed.smoothing
    assert not (tmp_path / ".resumed.partial").exists()


def test_resume_with_other_settings_is_refused(llama_dir, tmp_path):
    from quantkit.errors import QuantkitError, RunInterrupted

    options = dict(model=str(llama_dir), num_samples=8, seq_len=32, batch_size=4, out=tmp_path / "o")
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(scheme="w8a8_dynamic", **options), progress=_KillAfter(0))
    with pytest.raises(QuantkitError, match="other settings"):
        calibrate(CalibrateConfig(scheme="w8a8_dynamic", seed=1, resume=True, **options))


def test_a_run_without_resume_state_commits_no_inputs_and_writes_the_same_files(llama_dir, tmp_path, monkeypatch):
    """resumable=False (export --algo's run, whose work directory goes away with it): no block commits the next
    block's inputs (either stream), the output is the resumable run's, and --resume is refused up front."""
    from quantkit.errors import QuantkitError
    from quantkit.run.workdir import WorkDir

    options = dict(model=str(llama_dir), scheme="w4a16", algorithm="gptq", num_samples=8, seq_len=32, batch_size=4,
                   imatrix_from="float")      # a second (float) stream, committed beside the quantized one
    calibrate(CalibrateConfig(out=tmp_path / "resumable", **options))
    committed, commit_block = [], WorkDir.commit_block

    def spy(self, index, tensors, record, search_results, next_inputs, next_float_inputs=None):
        committed.append((next_inputs, next_float_inputs))
        commit_block(self, index, tensors, record, search_results, next_inputs, next_float_inputs)

    monkeypatch.setattr(WorkDir, "commit_block", spy)
    calibrate(CalibrateConfig(out=tmp_path / "plain", resumable=False, **options))
    assert len(committed) == 2 and all(inputs is None and float_inputs is None for inputs, float_inputs in committed)
    assert _files(tmp_path / "resumable") == _files(tmp_path / "plain")
    with pytest.raises(QuantkitError, match="resume state"):
        calibrate(CalibrateConfig(out=tmp_path / "again", resumable=False, resume=True, **options))


def test_no_metric_samples_skips_the_output_sqnr_pass_and_writes_the_same_files(llama_dir, tmp_path, monkeypatch):
    """metric_samples=0 (export --algo's run): with --propagate float the quantized block is never run (that pass
    only measured output SQNR), no output figure is recorded, the weight SQNR still is, and the codes are the same;
    --target-bits, which measures block gains on the metric samples, refuses it, as it refuses a negative count."""
    from quantkit.errors import QuantkitError
    from quantkit.run.block import BlockQuantizer

    options = dict(model=str(llama_dir), scheme="w4a16", algorithm="gptq", num_samples=8, seq_len=32, batch_size=4,
                   propagate="float", options={"true_sequential": False})
    measured = calibrate(CalibrateConfig(out=tmp_path / "measured", **options))
    passes, propagate = [], BlockQuantizer.propagate

    def counted(self, *args, **kwargs):
        passes.append(self.job.index)
        return propagate(self, *args, **kwargs)

    monkeypatch.setattr(BlockQuantizer, "propagate", counted)
    plain = calibrate(CalibrateConfig(out=tmp_path / "plain", metric_samples=0, **options))
    assert passes == []
    assert _files(tmp_path / "measured") == _files(tmp_path / "plain")
    assert all("output_sqnr_db" in e.metrics for e in measured.manifest.layers.values())
    assert all("output_sqnr_db" not in e.metrics and "weight_sqnr_db" in e.metrics
               for e in plain.manifest.layers.values())
    for wrong in (dict(metric_samples=-1), dict(metric_samples=0, target_bits=4.0)):
        with pytest.raises(QuantkitError, match="metric_samples"):
            calibrate(CalibrateConfig(out=tmp_path / "wrong", **{**options, **wrong}))


def test_the_progress_bar_shows_the_worst_weight_sqnr_when_no_output_sqnr_is_measured():
    from io import StringIO

    from rich.console import Console

    from quantkit.cli.render import RichProgress

    for layers, shown in [({"a": {"weight_sqnr_db": 20.0, "output_sqnr_db": 30.0}, "b": {"weight_sqnr_db": 25.0,
                                                                                        "output_sqnr_db": 12.5}},
                           "worst output SQNR 12.5 dB (b)"),
                          ({"a": {"weight_sqnr_db": 20.0}, "b": {"weight_sqnr_db": 17.25}}, "worst weight SQNR 17.2 dB (b)")]:
        progress = RichProgress(Console(file=StringIO()))
        progress.stage("blocks", 1)
        progress.block_done(0, layers)
        progress.advance("blocks", "block 0")
        assert progress.bar.tasks[progress.tasks["blocks"]].fields["detail"] == f"block 0  {shown}"


@pytest.mark.parametrize("true_sequential", [True, False])    # False: blocks quantized in the second lane
def test_propagate_float_resumes_and_offloads_to_the_same_files(llama_dir, tmp_path, true_sequential):
    """--propagate float (each block calibrated on the float model's inputs, which the observing pass keeps as
    the next block's): activations offloaded to disk and a run resumed after a kill give the straight run's
    files; resuming with the default propagation is refused."""
    from quantkit.errors import QuantkitError, RunInterrupted

    options = dict(model=str(llama_dir), scheme="w4a16", algorithm="gptq", num_samples=8, seq_len=32, batch_size=2,
                   propagate="float", options={"true_sequential": true_sequential})
    straight = calibrate(CalibrateConfig(out=tmp_path / "memory", **options))
    assert straight.manifest.calibration.propagate == "float"
    calibrate(CalibrateConfig(out=tmp_path / "disk", offload_activations=True, **options))
    assert _files(tmp_path / "memory") == _files(tmp_path / "disk")
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(out=tmp_path / "resumed", **options), progress=_KillAfter(0))
    with pytest.raises(QuantkitError, match="other settings"):
        calibrate(CalibrateConfig(out=tmp_path / "resumed", resume=True, **{**options, "propagate": "quantized"}))
    calibrate(CalibrateConfig(out=tmp_path / "resumed", resume=True, **options))
    assert _files(tmp_path / "memory") == _files(tmp_path / "resumed")
    calibrate(CalibrateConfig(out=tmp_path / "default", **{**options, "propagate": "quantized"}))
    assert _files(tmp_path / "default") != _files(tmp_path / "memory")


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """Blocks wide enough (512 / 1536) that the x^T x of one lane and GPTQ's lazy updates of the other overlap in
    time: without the precision lock, some of the lane's updates run as bf16 and flip codes."""
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("wide"), "llama", hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64)


@pytest.mark.parametrize("scheme", ["w4a16", "q4_k_m"])
def test_quantize_lane_gives_the_one_thread_run_bit_for_bit(wide_llama_dir, tmp_path, scheme):
    """--propagate float with one-pass GPTQ quantizes block i in a second thread while block i+1 is observed
    (each lane on one torch thread): its files equal those of the same run on one thread without the lane,
    byte for byte, so the two threads share nothing (GPTQ's float32 lazy updates stay float32 beside a bf16
    x^T x in the other thread), and the lane's time is reported as overlapped, not added to the total."""
    options = dict(model=str(wide_llama_dir), scheme=scheme, algorithm="gptq", num_samples=16, seq_len=128,
                   batch_size=4, propagate="float", options={"true_sequential": False},
                   dtype="bfloat16")     # bf16: x^T x takes oneDNN's bf16 path where the CPU has it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)          # one thread: no second lane
        alone = calibrate(CalibrateConfig(out=tmp_path / "alone", **options))
        torch.set_num_threads(2)          # two: the main thread and the lane, one torch thread each
        laned = calibrate(CalibrateConfig(out=tmp_path / "laned", **options))
        assert torch.get_num_threads() == 2      # given back
    finally:
        torch.set_num_threads(threads)
    assert alone.overlapped_seconds == 0 and laned.overlapped_seconds > 0
    assert laned.total_seconds == pytest.approx(sum(laned.timings.values()) - laned.overlapped_seconds)
    assert _files(tmp_path / "alone") == _files(tmp_path / "laned")
    assert Manifest.load(tmp_path / "alone").layers == Manifest.load(tmp_path / "laned").layers


def test_fp32_matmuls_wait_for_another_threads_bf16_region():
    """oneDNN's float32 matmul precision is process-wide: while one thread is inside `bf16_matmuls`, another's
    `fp32_matmuls` waits, and runs with the precision restored."""
    import threading

    from quantkit.matmuls import bf16_matmuls, fp32_matmuls

    if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        pytest.skip("this torch has no mkldnn.matmul.fp32_precision")
    inside, release_it, order = threading.Event(), threading.Event(), []

    def hold():
        with bf16_matmuls():
            inside.set()
            release_it.wait(5)
            order.append("bf16 region left")

    holder = threading.Thread(target=hold)
    before = torch.backends.mkldnn.matmul.fp32_precision
    holder.start()
    inside.wait(5)
    threading.Timer(0.3, release_it.set).start()
    with fp32_matmuls():
        order.append("fp32 region entered")
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    holder.join()
    assert order == ["bf16 region left", "fp32 region entered"]


@pytest.mark.parametrize("fixture", ["gemma3_dir", "qwen3_moe_dir"])
def test_propagate_float_on_per_layer_masks_and_experts(fixture, tmp_path, request):
    """--propagate float where blocks take their own masks (Gemma 3's sliding and full attention) and where
    experts are routed (Qwen3-MoE, experts observed in batches): block 0, fed the same embeddings either way,
    gets the default run's weights exactly; a later block gets other ones; the model loads and runs."""
    options = dict(model=str(request.getfixturevalue(fixture)), scheme="w4a16", algorithm="gptq", num_samples=8,
                   seq_len=32, batch_size=4, expert_batch=3)
    floated = calibrate(CalibrateConfig(out=tmp_path / "float", propagate="float", **options))
    calibrate(CalibrateConfig(out=tmp_path / "default", **options))
    assert floated.manifest.calibration.propagate == "float"
    a, b = load_quantized(tmp_path / "float"), load_quantized(tmp_path / "default")
    last = max(int(name.split(".")[2]) for name in floated.manifest.layers)
    def weights(model, block):
        return {name: module.dequantized_weight() for name, module in model.named_modules()
                if name.startswith(f"model.layers.{block}.") and hasattr(module, "dequantized_weight")}
    first_a, first_b = weights(a, 0), weights(b, 0)
    assert first_a and all(torch.equal(first_a[n], first_b[n]) for n in first_a)
    last_a, last_b = weights(a, last), weights(b, last)
    assert any(not torch.equal(last_a[n], last_b[n]) for n in last_a)
    assert torch.isfinite(_logits(a)).all()
    # one pass: Gemma's statistics are llama-imatrix's; MoE experts observed on every token are not
    one_pass = calibrate(CalibrateConfig(out=tmp_path / "one-pass", propagate="float",
                                         options={"true_sequential": False}, **options))
    assert one_pass.manifest.calibration.imatrix_from == ("float" if fixture == "gemma3_dir" else None)


def test_offloaded_activations_give_the_same_result(llama_dir, tmp_path):
    from quantkit.errors import RunInterrupted

    options = dict(model=str(llama_dir), scheme="smq_q8i8f16_1", num_samples=8, seq_len=32, batch_size=2)
    calibrate(CalibrateConfig(out=tmp_path / "memory", **options))
    calibrate(CalibrateConfig(out=tmp_path / "disk", offload_activations=True, **options))
    assert _files(tmp_path / "memory") == _files(tmp_path / "disk")
    with pytest.raises(RunInterrupted):
        calibrate(CalibrateConfig(out=tmp_path / "resumed", offload_activations=True, **options), progress=_KillAfter(0))
    calibrate(CalibrateConfig(out=tmp_path / "resumed", offload_activations=True, resume=True, **options))
    assert _files(tmp_path / "memory") == _files(tmp_path / "resumed")
