"""Recipes: per-layer schemes and algorithms by pattern, priorities, and every error before work."""
import pytest
import torch

from quantkit import load_quantized
from quantkit.errors import QuantkitError
from quantkit.native.manifest import Manifest
from quantkit.run.pipeline import CalibrateConfig, calibrate
from quantkit.run.recipe import Recipe, pattern_matches
from quantkit.model.qlinear import QuantLinear

LAYERS = [f"model.layers.{i}.{n}" for i in range(2) for n in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_pattern_kinds():
    assert pattern_matches("model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj")
    assert not pattern_matches("model.layers.0.mlp.down", "model.layers.0.mlp.down_proj")
    assert pattern_matches("*.down_proj", "model.layers.1.mlp.down_proj")
    assert pattern_matches("re:.*layers\\.1\\..*_proj", "model.layers.1.mlp.up_proj")
    assert not pattern_matches("re:layers\\.1", "model.layers.1.mlp.up_proj")  # regexes match the whole name


def test_rules_default_ignore_and_priority():
    recipe = Recipe.from_dict({
        "default": {"scheme": "w4a16", "algorithm": "rtn", "group_size": 32},
        "ignore": ["model.layers.0.self_attn.q_proj"],
        "rules": [
            {"match": "*.down_proj", "scheme": "w8a8_dynamic", "algorithm": "gptq"},
            {"match": ["re:.*layers\\.1\\.mlp\\..*"], "scheme": "w8a16", "priority": 5},
        ],
    })
    plan, ignored = recipe.plan(LAYERS)
    assert plan["model.layers.0.self_attn.q_proj"] is None and "ignore" in ignored["model.layers.0.self_attn.q_proj"]
    assert plan["model.layers.0.mlp.down_proj"].scheme.name == "w8a8_dynamic"
    assert plan["model.layers.0.mlp.down_proj"].algorithm == "gptq"
    assert plan["model.layers.1.mlp.down_proj"].scheme.name == "w8a16"  # priority 5 beats the unranked rule
    assert "rule 2" in plan["model.layers.1.mlp.down_proj"].rule
    default = plan["model.layers.0.self_attn.k_proj"]
    assert default.scheme.weight.group_size == 32 and default.rule == "recipe default"


@pytest.mark.parametrize("data, fragment", [
    ({"default": {"scheme": "w4a16"}, "rules": [{"match": "*.nothing", "scheme": "w8a16"}]}, "matches no quantizable layer"),
    ({"default": {"scheme": "w4a16"}, "ignore": ["lm_head"]}, "'lm_head' matches no quantizable layer"),
    ({"rules": [{"match": "*.down_proj", "scheme": "w8a16"}, {"match": "*mlp*", "scheme": "w4a16"}]},
     "matched by rule 1 (match: *.down_proj) and rule 2 (match: *mlp*) with no higher priority"),
    ({"default": {"scheme": "w4a17"}}, "unknown scheme 'w4a17'"),
    ({"default": {"scheme": "w4a16", "algorithm": "awk"}}, "unknown algorithm 'awk'"),
    ({"default": {"scheme": "w4a16", "algorithm": "hqq", "symmetric": True}}, "asymmetric"),
    ({"default": {"scheme": "w4a16", "grup_size": 32}}, "unknown key 'grup_size'"),
    ({"defaults": {"scheme": "w4a16"}}, "unknown key 'defaults'"),
    ({"default": {"scheme": "w4a16", "algorithm": "awq", "options": {"sample": 8}}},
     "algorithm 'awq' has no option 'sample'; did you mean samples?"),
])
def test_recipe_errors(data, fragment):
    with pytest.raises(QuantkitError, match=fragment.replace("(", "\\(").replace(")", "\\)").replace("*", "\\*")):
        Recipe.from_dict(data).plan(LAYERS)


def test_mixed_recipe_end_to_end(llama_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "default: {scheme: w4a16, algorithm: awq, group_size: 32}\n"
        "ignore: ['model.layers.0.self_attn.q_proj']\n"
        "rules:\n"
        "  - match: '*.down_proj'\n"
        "    scheme: w8a8_dynamic\n"
        "    algorithm: gptq\n"
    )
    result = calibrate(CalibrateConfig(model=str(llama_dir), recipe=path, num_samples=8, seq_len=32,
                                       out=tmp_path / "out", keep_model=True))
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.layers["model.layers.1.mlp.down_proj"].scheme.name == "w8a8_dynamic"
    assert manifest.layers["model.layers.1.mlp.down_proj"].rule == "recipe rule 1 (match: *.down_proj)"
    assert manifest.layers["model.layers.1.mlp.up_proj"].algorithm == "awq"
    assert "model.layers.0.self_attn.q_proj" in manifest.ignored
    assert manifest.recipe["rules"][0]["algorithm"] == "gptq"
    reloaded = load_quantized(tmp_path / "out")
    assert not isinstance(reloaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(reloaded.model.layers[1].self_attn.q_proj, QuantLinear)
    tokens = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(result.model(tokens).logits, reloaded(tokens).logits)


def test_awq_options_apply_per_layer(llama_dir, tmp_path):
    # one set of AWQ options used to win for the whole block (in set order); each layer now gets its own
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("default: {scheme: w4a16, algorithm: awq, group_size: 32}\n"
                      "rules:\n  - match: '*.mlp.down_proj'\n    scheme: w4a16\n    algorithm: awq\n"
                      "    group_size: 32\n    options: {clip: false}\n")
    calibrate(CalibrateConfig(model=str(llama_dir), recipe=recipe, out=tmp_path / "out", num_samples=4, seq_len=32,
                              batch_size=4))
    from safetensors.torch import load_file

    clipped = {k.removesuffix(".awq_clip") for k in load_file(tmp_path / "out" / "search_results.safetensors")
               if k.endswith(".awq_clip")}
    for block in range(2):
        prefix = f"model.layers.{block}"
        assert f"{prefix}.mlp.down_proj" not in clipped
        assert {f"{prefix}.mlp.up_proj", f"{prefix}.mlp.gate_proj", f"{prefix}.self_attn.o_proj",
                f"{prefix}.self_attn.v_proj"} <= clipped
        assert f"{prefix}.self_attn.q_proj" not in clipped   # the architecture's no-clip layers
