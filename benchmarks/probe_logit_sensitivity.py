"""Issue 15 diagnostic: each block Linear's measured effect at the logits, against the block sensitivity.

    python benchmarks/probe_logit_sensitivity.py --grid int4-g128-sym --out klce.json [--samples 4]
    python benchmarks/probe_logit_sensitivity.py --resolve ALLOCATED_DIR --probe klce.json --measure kl \
        --budgets 3.0 3.5 4.25 5.0 --recipes DIR

Probe (not streaming: the float SmolLM2 in float32, in memory): per Linear, with only that Linear on --grid by
imatrix's search (importance E[x^2] over the protocol's 64 calibration samples), [KL(float || quantized) of the
next-token distributions, change of the label cross-entropy], on calibration samples 0..N-1; each Linear's block
is run onward from its captured inputs. Resolve: the allocation.json of a `--target-bits` run, each Linear's
losses rescaled by (its probe measure / its block loss on --grid), solved at each budget with quantkit's solver;
writes one recipe per budget (rerun them with `quantkit calibrate smollm2-135m --recipe R`).
"""
import argparse
import json
from pathlib import Path

import common
import torch


def importance(model, ids, names) -> dict[str, torch.Tensor]:
    """E[x^2] per input column of each Linear over the calibration samples (quantkit's own statistic)."""
    from quantkit.calibrate.hooks import observe_inputs

    with observe_inputs({name: model.get_submodule(name) for name in names}, frozenset({"sum_sq"})) as stats:
        for i in range(ids.shape[0]):
            model(ids[i:i + 1], use_cache=False)
    return {name: stats[name].sum_sq.mean for name in names}


def block_input_capture(captured: list[dict[int, tuple]]):
    """A `forward_hooks(..., pre=True, with_kwargs=True)` factory keyed by block index: each block's input hidden
    state and its other keyword arguments (no cache, no attention-weights flag) into ``captured[-1][index]``, so
    the block can be rerun from there."""
    def capture(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[-1][int(index)] = (hidden, {k: v for k, v in kwargs.items()
                                                 if k not in ("hidden_states", "past_key_values", "output_attentions")})
        return hook
    return capture


def probe(grid: str, samples: int) -> dict[str, list[float]]:
    from quantkit.algorithms.imatrix import quantize_imatrix
    from quantkit.calibrate.hooks import forward_hooks
    from quantkit.run.budget import parse_candidates

    torch.set_grad_enabled(False)
    model = common.float_model().float()
    ids = common.calibration_ids()
    layers = model.model.layers
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    weights = importance(model, ids, names)
    tokens = ids[:samples]
    captured: list[dict[int, tuple]] = []

    capture = block_input_capture(captured)
    base = []
    with forward_hooks({str(i): layer for i, layer in enumerate(layers)}, capture, pre=True, with_kwargs=True):
        for s in range(samples):
            captured.append({})
            base.append(model(tokens[s:s + 1], use_cache=False).logits.float().log_softmax(-1))

    def log_probs_from(block: int) -> list[torch.Tensor]:
        out = []
        for s in range(samples):
            hidden, kwargs = captured[s][block]
            for layer in layers[block:]:
                result = layer(hidden, **kwargs)
                hidden = result[0] if isinstance(result, tuple) else result
            out.append(model.lm_head(model.model.norm(hidden)).float().log_softmax(-1))
        return out

    def nll(log_probs, s):
        return float(-log_probs[0, :-1].gather(-1, tokens[s, 1:, None]).mean())

    base_nll = [nll(p, s) for s, p in enumerate(base)]
    spec = parse_candidates(grid, "w4a16", None)[0].scheme().weight
    result = {}
    for name in names:
        linear = model.get_submodule(name)
        original = linear.weight.data.clone()
        linear.weight.data = quantize_imatrix(original, spec, weights[name]).dequantize().float()
        quantized = log_probs_from(int(name.split(".")[2]))
        linear.weight.data = original
        kl = sum(float((p.exp() * (p - q)).sum(-1).mean()) for p, q in zip(base, quantized)) / samples
        ce = sum(nll(q, s) - before for s, (q, before) in enumerate(zip(quantized, base_nll))) / samples
        result[name] = [kl, ce]
        print(json.dumps({"linear": name, "kl": kl, "ce_change": ce}), flush=True)
    return result


def resolve(allocated: Path, measured: dict, measure: str, grid: str, budgets: list[float], recipes: Path) -> None:
    import yaml

    from quantkit.run import allocate
    from quantkit.run.budget import parse_candidates

    data = json.loads((allocated / "allocation.json").read_text())
    labels = data["candidates"]
    candidates = parse_candidates(",".join(labels), "w4a16", None)
    reference = labels.index(grid)
    column = {"kl": 0, "ce": 1}[measure]
    layers = {}
    for name, layer in data["layers"].items():
        sizes = [layer["candidates"][c]["bytes"] for c in labels]
        record = allocate.LayerSensitivity(layer["weights"], sizes, sizes,
                                           [layer["candidates"][c]["error"] for c in labels],
                                           [tuple(p) for p in layer["gains"]], layer["inverse_energy"])
        losses = record.loss("block")
        factor = max(measured[name][column], 1e-6) / losses[reference]
        # loss = factor * e * g(e): the errors and the gain's measured points scaled alike
        record.error = [None if e is None else e * factor for e in record.error]
        record.gains = [(e * factor, g) for e, g in record.gains]
        layers[name] = record
    weights = sum(layer.weights for layer in layers.values())
    recipes.mkdir(parents=True, exist_ok=True)
    for bits in budgets:
        allocation = allocate.choose(layers, candidates, "block", {"bits": bits}, int(bits * weights) // 8)
        path = recipes / f"{measure}_{bits}.yaml"
        path.write_text(yaml.safe_dump(allocation.recipe("imatrix", {}), sort_keys=False))
        print(json.dumps({"budget": bits, "planned_bits": round(allocation.planned_bits, 4),
                          "chosen": allocation.counts(), "recipe": str(path)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="int4-g128-sym")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resolve", type=Path, help="a --target-bits output directory (its allocation.json)")
    parser.add_argument("--probe", type=Path, help="the probe's --out file")
    parser.add_argument("--measure", choices=["kl", "ce"], default="kl")
    parser.add_argument("--budgets", nargs="*", type=float, default=[3.0, 3.5, 4.25, 5.0])
    parser.add_argument("--recipes", type=Path, default=Path("recipes"))
    args = parser.parse_args()
    if args.resolve:
        resolve(args.resolve, json.loads(args.probe.read_text()), args.measure, args.grid, args.budgets, args.recipes)
    else:
        args.out.write_text(json.dumps(probe(args.grid, args.samples), indent=1) + "\n")


if __name__ == "__main__":
    main()
