"""SmoothQuant folding leaves the float model's function unchanged."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.algorithms import smoothquant
from quantkit.model.architectures import architecture_for, channel_map
from quantkit.calibrate.hooks import observe_inputs
from quantkit.model.checkpoint import split_moe_experts


def _smooth_all_blocks(model, alpha, inputs):
    """Smooth every group of every block (MoE experts split into Linears first, as the pipeline does)."""
    arch = architecture_for(model.config)
    split_moe_experts(model, model.config)
    blocks = model.get_submodule(arch.blocks)
    observed = {f"{i}.{g.observed}": block.get_submodule(g.observed) for i, block in enumerate(blocks)
                for g in arch.smooth}
    with torch.no_grad(), observe_inputs(observed, frozenset({"range"})) as stats:
        model(inputs)
    for i, block in enumerate(blocks):
        # an expert no token was routed to has no statistics (the pipeline leaves it unscaled too)
        groups = tuple(g for g in arch.smooth if stats[f"{i}.{g.observed}"].tokens > 0)
        assert len(groups) >= len(arch.smooth) - 4
        maps = {g.prev: channel_map(g, model.config, block.get_submodule(g.consumers[0]).in_features) for g in groups}
        absmax = {g.observed: stats[f"{i}.{g.observed}"].range.absmax for g in groups}
        factors = smoothquant.search(block, groups, absmax, alpha, maps)
        smoothquant.apply(block, groups, factors, maps, arch.norm_offset)
        # the factors are far from 1, so an unchanged output is a real test of the folds
        assert max(float((f.log().abs()).max()) for f in factors.values()) > 0.5
    return arch


@pytest.mark.parametrize("fixture", ["llama_dir", "mistral_dir", "qwen2_dir", "qwen3_dir", "qwen3_moe_dir",
                                     "qwen2_moe_dir", "mixtral_dir", "gemma2_dir", "gemma3_dir"])
@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_preserves_logits(fixture, alpha, request):
    # MoE: transformers' fused experts in eager mode (its grouped_mm has no float64); ours are split
    eager = {"experts_implementation": "eager"} if "moe" in fixture or "mixtral" in fixture else {}
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float64, **eager).eval()
    inputs = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(inputs).logits
    arch = _smooth_all_blocks(model, alpha, inputs)
    assert any(g.gqa_shared for g in arch.smooth)  # v -> o under GQA is exercised
    with torch.no_grad():
        after = model(inputs).logits
    # Gemma's norms compute in float32 even in a float64 model: the fold is exact, the norm is not
    # (a wrong norm offset moves the logits by ~1)
    tolerance = 1e-4 if "gemma" in fixture else 1e-9
    assert torch.allclose(before, after, rtol=tolerance, atol=tolerance)


def test_gqa_channel_map_follows_repeat_kv(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    group = next(g for g in architecture_for(model.config).smooth if g.gqa_shared)
    mapping = channel_map(group, model.config, 64)  # 4 heads x 16 dims, 2 kv heads
    assert mapping[:16].tolist() == list(range(16))      # head 0 -> kv head 0
    assert mapping[16:32].tolist() == list(range(16))    # head 1 -> kv head 0
    assert mapping[32:48].tolist() == list(range(16, 32))  # head 2 -> kv head 1


def test_dead_channel_gets_no_scaling():
    act = torch.tensor([0.0, 4.0])
    weight = torch.tensor([[1.0, 1.0]])
    factors = smoothquant.smoothing_factors(act, [weight], 0.5)
    assert factors[0].item() == 1.0
    assert factors[1].item() == pytest.approx(2.0)  # sqrt(4) / sqrt(1)
