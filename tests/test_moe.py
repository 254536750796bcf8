"""Mixture of experts (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral) with transformers 5's
fused 3-D experts: each expert quantized as its own matrices, never one expert's rows on another's.

References: transformers' own fused-experts model (eager) for the split and for every expert's
weights; round-to-nearest of the source expert for the codes; the pipeline itself without batching
for the bounded-batch run."""
import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.calibrate import stats as stats_module
from quantkit.formats import primitives
from quantkit.model.architectures import architecture_for
from quantkit.model.checkpoint import Checkpoint, build_skeleton, materialize
from quantkit.model.moe import SplitExperts
from quantkit.model.qlinear import QuantLinear
from quantkit.run.pipeline import CalibrateConfig, calibrate

from conftest import EVERY_SCHEME_AND_ALGORITHM, calibrate_and_reload, run_cli

FAMILIES = ["qwen3_moe_dir", "qwen2_moe_dir", "mixtral_dir"]
FAST = dict(num_samples=8, seq_len=32, batch_size=4)


def hf_model(directory, dtype=torch.float32):
    """transformers' own model with its fused experts (eager: the reference computation)."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, experts_implementation="eager").eval()


def ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def fused_experts(model, block: int):
    """[E, 2I, H] gate_up and [E, H, I] down of a block, from transformers' model."""
    experts = model.model.layers[block].mlp.experts
    return experts.gate_up_proj.detach(), experts.down_proj.detach()


@pytest.mark.parametrize("fixture", FAMILIES)
def test_split_checkpoint_model_computes_what_transformers_computes(fixture, request):
    """Our skeleton (one Linear per expert) filled from the checkpoint by name (Mixtral's stored
    block_sparse_moe.experts.N.w1/w2/w3 renamed) gives transformers' fused model's logits."""
    directory = request.getfixturevalue(fixture)
    checkpoint = Checkpoint(directory)
    model = build_skeleton(checkpoint.config, torch.float64)
    materialize(model, "", checkpoint, torch.float64)
    assert isinstance(model.model.layers[0].mlp.experts, SplitExperts)
    reference = hf_model(directory, torch.float64)
    inputs = ids(checkpoint.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, reference(inputs).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_every_expert_is_its_own_source_expert(fixture, tmp_path, request):
    """llm-compressor #2939 by construction: at 8 bits, expert e of every block dequantizes to the
    source's expert e (high SQNR) and to no other expert (every other pairing is noise)."""
    directory = request.getfixturevalue(fixture)
    calibrate(CalibrateConfig(model=str(directory), out=tmp_path / "q", scheme="w8a16", algorithm="gptq", **FAST))
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    source = hf_model(directory)
    count = len(quantized.model.layers[0].mlp.experts)
    for block in range(len(quantized.model.layers)):
        gate_up, down = fused_experts(source, block)
        intermediate = gate_up.shape[1] // 2
        experts = quantized.model.layers[block].mlp.experts
        for part, reference in (("gate_proj", gate_up[:, :intermediate]), ("up_proj", gate_up[:, intermediate:]),
                                ("down_proj", down)):
            weights = [getattr(experts[e], part) for e in range(count)]
            assert all(isinstance(w, QuantLinear) for w in weights)
            sqnr = torch.tensor([[primitives.sqnr_db(reference[s], w.dequantized_weight().float())
                                  for w in weights] for s in range(count)])
            assert torch.all(sqnr.diagonal() > 35), (block, part, sqnr.diagonal())
            off_diagonal = sqnr[~torch.eye(count, dtype=torch.bool)]
            assert torch.all(off_diagonal < 3), (block, part, off_diagonal.max())


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("options", EVERY_SCHEME_AND_ALGORITHM)
def test_every_scheme_and_algorithm_reloads_exactly(fixture, options, tmp_path, request):
    directory = request.getfixturevalue(fixture)
    result, reloaded = calibrate_and_reload(directory, tmp_path / "out", **options)
    config = Checkpoint(directory).config
    experts = architecture_for(config).experts.num_experts(config)
    shared = 3 if fixture == "qwen2_moe_dir" else 0
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 2 * (4 + 3 * experts + shared)
    # the routers (and Qwen2-MoE's shared-expert gate) stay float
    assert not isinstance(reloaded.model.layers[0].mlp.gate, QuantLinear)


def test_quantized_moe_stays_close_to_float(qwen3_moe_dir, tmp_path):
    """W8A8 with SmoothQuant (router folded) keeps the model's predictions."""
    result, reloaded = calibrate_and_reload(qwen3_moe_dir, tmp_path / "out", scheme="w8a8_dynamic")
    reference = hf_model(qwen3_moe_dir)
    inputs = ids(reference.config.vocab_size, seed=3)
    with torch.no_grad():
        ours, theirs = reloaded(inputs).logits, reference(inputs).logits
    assert primitives.sqnr_db(theirs, ours) > 25
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_every_expert_gets_statistics_and_routing_counts(qwen3_moe_dir, tmp_path):
    """Default: every expert is observed on every token (the output keeps top-k routing), so every
    expert gets its algorithm, and the manifest says how many tokens were routed to it."""
    result = calibrate(CalibrateConfig(model=str(qwen3_moe_dir), out=tmp_path / "q", scheme="w4a16",
                                       algorithm="gptq", num_samples=1, seq_len=8))
    experts = {k: v for k, v in result.manifest.layers.items() if ".experts." in k}
    assert len(experts) == 2 * 8 * 3
    assert all(v.algorithm == "gptq" and not v.note for v in experts.values())
    routed = [v.metrics["routed_tokens"] for k, v in experts.items() if k.endswith("down_proj")]
    assert sum(routed) == 2 * 8 * 2          # 8 tokens x top-2, per block
    assert min(routed) == 0                  # a starved expert, still calibrated on every token


def test_starved_experts_fall_back_and_are_reported(qwen3_moe_dir, tmp_path):
    """--moe-routed-only: an expert no calibration token reaches gets data-free RTN, and the
    manifest and the CLI say which."""
    out = tmp_path / "q"
    result = run_cli("calibrate", str(qwen3_moe_dir), "--scheme", "w4a16", "--algo", "gptq", "--num-samples", "1",
                     "--seq-len", "8", "--moe-routed-only", "--out", str(out))
    assert result.exit_code == 0, result.output
    from quantkit.native.manifest import Manifest
    layers = Manifest.load(out).layers
    starved = {k for k, v in layers.items() if ".experts." in k and v.metrics["routed_tokens"] == 0}
    assert starved
    for name in starved:
        assert layers[name].algorithm == "rtn" and "no calibration token" in layers[name].note
    for name in set(layers) - starved:
        assert layers[name].algorithm == "gptq"
    assert "no calibration token" in " ".join(result.output.split())   # rich wraps the line


def test_expert_batches_bound_hessians_and_change_nothing(qwen3_moe_dir, tmp_path, monkeypatch):
    """GPTQ Hessians of at most --expert-batch experts are alive at once, and the result is bit-identical
    to collecting them all together (experts of one stage never read each other's outputs)."""
    alive: list[weakref.ref] = []
    peak = [0]
    original = stats_module.Hessian.__init__

    def counting_init(self):
        original(self)
        alive.append(weakref.ref(self))
        gc.collect()
        peak[0] = max(peak[0], sum(r() is not None for r in alive))

    monkeypatch.setattr(stats_module.Hessian, "__init__", counting_init)
    batched = calibrate(CalibrateConfig(model=str(qwen3_moe_dir), out=tmp_path / "b", scheme="w4a16",
                                        algorithm="gptq", expert_batch=2, keep_model=True, **FAST))
    assert peak[0] <= 2 * 2 + 3    # two experts' gate+up Hessians (+ attention's q/k/v, freed per stage)
    monkeypatch.setattr(stats_module.Hessian, "__init__", original)
    whole = calibrate(CalibrateConfig(model=str(qwen3_moe_dir), out=tmp_path / "w", scheme="w4a16",
                                      algorithm="gptq", expert_batch=64, keep_model=True, **FAST))
    inputs = ids(64)
    with torch.no_grad():
        assert torch.equal(batched.model(inputs).logits, whole.model(inputs).logits)


def test_mixed_dense_and_sparse_blocks_are_refused(tmp_path):
    from conftest import make_checkpoint

    directory = make_checkpoint(tmp_path / "m", "qwen3_moe", mlp_only_layers=[0])
    result = run_cli("calibrate", str(directory), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "mixes dense and sparse blocks" in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ GGUF


def _gguf_source(tmp_path, architecture, **overrides):
    """A tiny MoE with a GGUF-describable tokenizer; expert sizes at transformers' config defaults (its
    GGUF reader takes them from the config class, not from the file)."""
    from conftest import make_checkpoint
    from test_export_gguf import VOCAB, save_byte_level_bpe

    directory = make_checkpoint(tmp_path / architecture, architecture, seed=7, vocab_size=VOCAB, outlier_channels=0,
                                **overrides)
    save_byte_level_bpe(directory)
    return directory


@pytest.mark.parametrize("architecture, overrides", [
    ("qwen3_moe", dict(moe_intermediate_size=768, head_dim=16)),
    ("qwen2_moe", dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632)),
])
def test_gguf_stacks_experts_and_is_read_back_by_transformers(architecture, overrides, tmp_path):
    """llama.cpp's stacked ffn_{gate,up,down}_exps carry every expert's Q4_0 codes exactly; transformers'
    GGUF loader rebuilds the fused model, whose logits are load_quantized's."""
    from gguf import GGUFReader

    from quantkit.check.evaluate import eval_windows
    from quantkit.exporters.gguf import export_gguf
    from test_export_gguf import load_gguf, max_logit_difference, tensors_by_name
    from conftest import tiny_text

    source_dir = _gguf_source(tmp_path, architecture, **overrides)
    calibrate(CalibrateConfig(model=str(source_dir), out=tmp_path / "q", scheme="w4a16", algorithm="gptq",
                              group_size=32, symmetric=True, **FAST))
    result = export_gguf(tmp_path / "q", tmp_path / "moe.gguf")
    stacks = [t for t in result.linears if t.experts]
    assert len(stacks) == 2 * 3 and all(t.status == "exact" and t.ggml_type == "Q4_0" for t in stacks)
    tensors = tensors_by_name(result.out)
    config = Checkpoint(source_dir).config
    assert tuple(tensors["blk.0.ffn_gate_exps.weight"].shape) == (64, config.moe_intermediate_size, 8)  # ggml order
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    reader = GGUFReader(result.out)
    arch = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch}.expert_count"].contents() == 8
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    if architecture == "qwen2_moe":
        assert "blk.1.ffn_gate_inp_shexp.weight" in tensors and "blk.1.ffn_down_shexp.weight" in tensors
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    model = load_gguf(result.out)
    for layer in model.model.layers:   # transformers' GGUF reader does not carry norm_topk_prob
        layer.mlp.gate.norm_topk_prob = config.norm_topk_prob
    windows = eval_windows(Checkpoint(source_dir).tokenizer(), tiny_text(2000, seed=7), 32, 2)
    assert max_logit_difference(model, quantized, windows) < 1e-4


def test_gguf_mixtral_experts_match_per_expert(tmp_path):
    """Mixtral (llama.cpp's llama with experts): gguf-py's dequantization of stacked expert e is
    quantkit's expert e (transformers' GGUF reader has no Mixtral)."""
    import gguf as gguf_py

    from quantkit.exporters.gguf import export_gguf
    from test_export_gguf import tensors_by_name

    source_dir = _gguf_source(tmp_path, "mixtral", sliding_window=None)
    calibrate(CalibrateConfig(model=str(source_dir), out=tmp_path / "q", scheme="w4a16", group_size=32,
                              symmetric=True, **FAST))
    result = export_gguf(tmp_path / "q", tmp_path / "mixtral.gguf")
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    tensors = tensors_by_name(result.out)
    for block, layer in enumerate(quantized.model.layers):
        for part, gguf_part in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            tensor = tensors[f"blk.{block}.ffn_{gguf_part}_exps.weight"]
            stacked = torch.from_numpy(gguf_py.quants.dequantize(tensor.data, tensor.tensor_type).copy())
            for e, expert in enumerate(layer.mlp.experts):
                ours = getattr(expert, part).dequantized_weight().float()
                assert torch.equal(stacked[e].reshape(ours.shape), ours), (block, part, e)


def test_gguf_refuses_routing_llama_cpp_does_not_compute(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.exporters.gguf import export_gguf

    source_dir = _gguf_source(tmp_path, "qwen3_moe", norm_topk_prob=False)
    with pytest.raises(QuantkitError, match="norm_topk_prob"):
        export_gguf(source_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("fixture", FAMILIES)
def test_compressed_tensors_writes_each_expert_under_its_own_name(fixture, tmp_path, request):
    """Per-expert tensors under the names the family's checkpoints use (what vLLM loads: Mixtral's
    block_sparse_moe.experts.N.w1/w3/w2), each decompressed by compressed-tensors' own decompressor to
    exactly quantkit's expert; routers are float and in the ignore list."""
    import json

    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from quantkit.exporters.compressed_tensors import export_compressed_tensors

    directory = request.getfixturevalue(fixture)
    calibrate(CalibrateConfig(model=str(directory), out=tmp_path / "q", scheme="w4a16", algorithm="gptq",
                              group_size=32, options={"act_order": False}, **FAST))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((result.out / "config.json").read_text())["quantization_config"])
    tensors = load_file(result.out / "model.safetensors")
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    mixtral = fixture == "mixtral_dir"
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"} if mixtral else None
    moe = "block_sparse_moe" if mixtral else "mlp"
    assert f"model.layers.1.{moe}.gate" in config.ignore
    assert f"model.layers.1.{moe}.gate.weight" in tensors
    for block, layer in enumerate(quantized.model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            for part in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{block}.{moe}.experts.{e}.{names[part] if mixtral else part}"
                state = {key.removeprefix(name + "."): value for key, value in tensors.items()
                         if key.startswith(name + ".")}
                weight = PackedQuantizationCompressor.decompress(state, config.config_groups["group_0"])["weight"]
                assert torch.equal(weight.float(), getattr(expert, part).dequantized_weight().float()), name
