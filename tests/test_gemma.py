"""Gemma 2 / Gemma 3 (text): norms computing x * (1 + w), four norms per block, GELU-tanh, per-head q/k
norms (Gemma 3), soft-capping (Gemma 2), and sliding-window layers beside full-attention ones, each
with its own mask and rotary table. References: transformers' own Gemma models (float logits, the
GGUF reader, compressed-tensors loading) and load_quantized."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.calibrate.hooks import capture_block_inputs, run_block
from quantkit.check.evaluate import eval_windows
from quantkit.exporters.compressed_tensors import export_compressed_tensors
from quantkit.exporters.gguf import export_gguf
from quantkit.formats import primitives
from quantkit.model.checkpoint import Checkpoint
from quantkit.model.qlinear import QuantLinear
from quantkit.run.pipeline import CalibrateConfig, calibrate

from conftest import EVERY_SCHEME_AND_ALGORITHM, calibrate_and_reload, make_checkpoint, tiny_text

FAMILIES = ["gemma2_dir", "gemma3_dir"]


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", FAMILIES)
@torch.no_grad()
def test_each_block_gets_its_own_mask_and_rotary_table(fixture, request):
    """Blocks run one at a time on the captured arguments reproduce transformers' logits; giving every
    block block 0's arguments (one sliding mask for all) does not."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float64).eval()
    tokens = _ids(model.config.vocab_size)
    inputs, block_kwargs = capture_block_inputs(model, model.model.layers, [tokens])

    def logits(kwargs_for):
        hidden = inputs[0].hidden
        for index, block in enumerate(model.model.layers):
            hidden = run_block(block, dataclasses.replace(inputs[0], hidden=hidden, kwargs=kwargs_for(index)))
        out = model.lm_head(model.model.norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(out / cap) * cap if cap else out

    reference = model(tokens).logits
    torch.testing.assert_close(logits(lambda i: block_kwargs[0][i]), reference, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(logits(lambda i: block_kwargs[0][0]), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture", FAMILIES)
@pytest.mark.parametrize("options", EVERY_SCHEME_AND_ALGORITHM)
def test_every_scheme_and_algorithm_reloads_exactly(fixture, options, tmp_path, request):
    _, reloaded = calibrate_and_reload(request.getfixturevalue(fixture), tmp_path / "out", **options)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14


@pytest.mark.parametrize("fixture", FAMILIES)
def test_smoothquant_through_the_offset_norms_beats_plain_w8a8(fixture, tmp_path, request):
    """SmoothQuant folds into the (1 + w) norms (pre_feedforward_layernorm among them) and W8A8 with it
    is closer to the float model than W8A8 without it, on the same weights."""
    directory = request.getfixturevalue(fixture)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = _ids(reference.config.vocab_size, seed=3)
    sqnr = {}
    for smooth in (True, False):
        result, reloaded = calibrate_and_reload(directory, tmp_path / str(smooth), scheme="w8a8_dynamic", smooth=smooth)
        with torch.no_grad():
            ours, theirs = reloaded(tokens).logits, reference(tokens).logits
        sqnr[smooth] = primitives.sqnr_db(theirs, ours)
        if smooth:
            groups = {g["prev"] for g in result.manifest.smoothing.groups}
            assert result.manifest.smoothing.enabled and "pre_feedforward_layernorm" in groups
            assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    assert sqnr[True] > sqnr[False] + 1, sqnr


# GGUF: transformers' GGUF reader takes head_dim from the file but query_pre_attn_scalar, layer types
# and soft-capping from its config class defaults, so these checkpoints keep those defaults.
@pytest.mark.parametrize("architecture", ["gemma2", "gemma3"])
def test_gguf_is_read_back_by_transformers(architecture, tmp_path):
    from gguf import GGUFReader

    from test_export_gguf import VOCAB, load_gguf, max_logit_difference, save_byte_level_bpe, tensors_by_name

    defaults = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=8)
    if architecture == "gemma2":
        defaults["layer_types"] = ["sliding_attention", "full_attention"]
    else:
        defaults["layer_types"] = ["sliding_attention", "sliding_attention"]
    source_dir = make_checkpoint(tmp_path / architecture, architecture, seed=10, vocab_size=VOCAB,
                                 outlier_channels=0, tie_word_embeddings=True, **defaults)
    save_byte_level_bpe(source_dir)
    calibrate(CalibrateConfig(model=str(source_dir), out=tmp_path / "q", scheme="w4a16", group_size=32,
                              symmetric=True, num_samples=4, seq_len=32))
    result = export_gguf(tmp_path / "q", tmp_path / f"{architecture}.gguf")
    assert result.summary() == {"exact Q4_0": 14}
    reader = GGUFReader(result.out)
    assert reader.fields["general.architecture"].contents() == architecture
    assert reader.fields[f"{architecture}.attention.sliding_window"].contents() == 8
    pattern = [kind == "sliding_attention" for kind in defaults["layer_types"]]
    assert reader.fields[f"{architecture}.attention.sliding_window_pattern"].contents() == pattern
    tensors = tensors_by_name(result.out)
    assert "blk.0.post_ffw_norm.weight" in tensors and "output.weight" not in tensors
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    # llama.cpp computes x * w: the file holds 1 + w of the (1 + w) norms
    stored = torch.from_numpy(tensors["blk.1.ffn_norm.weight"].data.copy())
    torch.testing.assert_close(stored, quantized.model.layers[1].pre_feedforward_layernorm.weight.float() + 1)
    windows = eval_windows(Checkpoint(source_dir).tokenizer(), tiny_text(2000, seed=7), 32, 2)
    assert max_logit_difference(load_gguf(result.out), quantized, windows) < 1e-4


@pytest.mark.parametrize("fixture", FAMILIES)
def test_compressed_tensors_loads_in_transformers(fixture, tmp_path, request, monkeypatch):
    from test_export_compressed_tensors import consumer_fake_quantize, load_export
    from test_export_gguf import max_logit_difference

    directory = request.getfixturevalue(fixture)
    calibrate(CalibrateConfig(model=str(directory), out=tmp_path / "q", scheme="w8a8_dynamic", num_samples=4, seq_len=32))
    result = export_compressed_tensors(tmp_path / "q", tmp_path / "ct")
    model = load_export(result.out)
    reference = load_quantized(tmp_path / "q", dtype=torch.float32)
    monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert max_logit_difference(model, reference, _ids(reference.config.vocab_size)) < 1e-4


def test_gguf_refuses_what_llama_cpp_does_not_compute(tmp_path):
    from quantkit.errors import QuantkitError

    for architecture, change, message in (("gemma3", dict(query_pre_attn_scalar=32), "query_pre_attn_scalar"),
                                          ("gemma2", dict(tie_word_embeddings=False), "separate lm_head")):
        source_dir = make_checkpoint(tmp_path / architecture, architecture, **change)
        with pytest.raises(QuantkitError, match=message):
            export_gguf(source_dir, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------ the text tower of multimodal Gemma 3


@pytest.fixture(scope="module")
def gemma3_multimodal(tmp_path_factory):
    """A multimodal checkpoint as transformers saves it (language_model.model.*, vision_tower.*, ...)."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    directory = make_checkpoint(tmp_path_factory.mktemp("g3mm") / "model", "gemma3_multimodal", seed=11,
                                vocab_size=VOCAB, outlier_channels=0, head_dim=256, query_pre_attn_scalar=256,
                                layer_types=["sliding_attention", "sliding_attention"])
    save_byte_level_bpe(directory)
    return directory


def test_multimodal_text_tower_is_quantized_and_the_vision_tower_kept(gemma3_multimodal, tmp_path):
    from safetensors import safe_open

    result, reloaded = calibrate_and_reload(gemma3_multimodal, tmp_path / "out", scheme="w4a16", algorithm="gptq",
                                            group_size=32)
    assert set(result.manifest.layers) == {f"model.language_model.layers.{b}.{linear}" for b in range(2)
                                           for linear in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                          "mlp.down_proj")}
    source = AutoModelForCausalLM.from_pretrained(gemma3_multimodal, dtype=torch.float32).eval()
    vision = reloaded.model.vision_tower.state_dict()
    assert all(torch.equal(v, source.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    with safe_open(str(gemma3_multimodal / "model.safetensors"), "pt") as handle:
        assert any(k.startswith("language_model.model.layers.") for k in handle.keys())   # stored names differ


def test_multimodal_exports(gemma3_multimodal, tmp_path, monkeypatch):
    """GGUF: the text model (vision tower left to llama.cpp's mmproj, noted), read back by transformers;
    compressed-tensors: the checkpoint's own names, loaded by transformers as the multimodal model."""
    from test_export_compressed_tensors import consumer_fake_quantize, load_export
    from test_export_gguf import load_gguf, max_logit_difference

    calibrate(CalibrateConfig(model=str(gemma3_multimodal), out=tmp_path / "q", scheme="w4a16", group_size=32,
                              symmetric=True, num_samples=4, seq_len=32))
    quantized = load_quantized(tmp_path / "q", dtype=torch.float32)
    windows = eval_windows(Checkpoint(gemma3_multimodal).tokenizer(), tiny_text(2000, seed=7), 32, 2)
    result = export_gguf(tmp_path / "q", tmp_path / "g3.gguf")
    assert result.summary() == {"exact Q4_0": 14} and any("mmproj" in note for note in result.notes)
    assert max_logit_difference(load_gguf(result.out), quantized, windows) < 1e-4
    calibrate(CalibrateConfig(model=str(gemma3_multimodal), out=tmp_path / "w8", scheme="w8a8_dynamic",
                              num_samples=4, seq_len=32))
    exported = export_compressed_tensors(tmp_path / "w8", tmp_path / "ct")
    model = load_export(exported.out)
    monkeypatch.setattr(primitives, "fake_quantize_activation", consumer_fake_quantize)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert max_logit_difference(model, load_quantized(tmp_path / "w8", dtype=torch.float32), windows) < 1e-4
