"""Issue 15 diagnostic: which streaming-measurable error of a Linear predicts its measured KL at the logits.

    python benchmarks/probe_streaming_proxies.py --probe klce.json [--grid int4-g128-sym] [--samples 2]

--probe: `probe_logit_sensitivity.py --out`'s file (per Linear, its KL with only that Linear on --grid). Here,
per Linear on the same grid (imatrix's search, importance E[x^2] over the protocol's 64 calibration samples),
on calibration samples 0..N-1 of the float SmolLM2 in float32 (eager attention, for its weights), with dh_t the
change of its block's output h_t at token t:

    B      E_t[||dh_t||^2 / ||h_t||^2]                    the allocation's block sensitivity (`run.allocate`)
    N      the same after the next reader's RMSNorm (the next block's input norm; the final norm after the last)
    L1     E_t[||dh'_t||^2 / ||h'_t||^2] one block later: the next float block run on the changed stream
    F      KL at the logits with dh added to the float model's last hidden state (later blocks as identity)
    FN     the same with dh_t scaled by ||H_t|| / ||h_t|| (residual-relative error carried to the end)
    B_w    sum_t w_t ||dh_t||^2 / ||h_t||^2 / T, w_t = 1 + the attention mass token t receives (column sums of
           the head-averaged attention weights) in later blocks (mean over them), in the next block only, or in
           every block
    N_w    the same weighting of N's per-token errors

Prints each proxy's Spearman rank correlation with the KL over all Linears, the spread of log(KL / proxy), and
KL / proxy (over its median) for the four down_proj the block sensitivity underrates most, and for those
down_proj where in the tokens their output error sits.
"""
import argparse
import json
import math
import statistics
from pathlib import Path

import common
import torch
from probe_logit_sensitivity import block_input_capture, importance

WATCHED = [f"model.layers.{b}.mlp.down_proj" for b in (2, 9, 10, 11, 28, 29)]


def measure(grid: str, samples: int) -> tuple[dict[str, dict], dict[str, torch.Tensor], torch.Tensor]:
    """-> per Linear {B, N, L1, F, FN}, per Linear the per-token relative error [S, T], attention received
    [S, L, T]."""
    from transformers import AutoModelForCausalLM

    from quantkit.algorithms.imatrix import quantize_imatrix
    from quantkit.calibrate.hooks import forward_hooks
    from quantkit.run.budget import parse_candidates

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(common.demo_model(), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = common.calibration_ids()
    layers = model.model.layers
    depth = len(layers)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    weights = importance(model, ids, names)
    captured: list[dict[int, tuple]] = []
    finals, received = [], []

    capture = block_input_capture(captured)
    with forward_hooks({str(i): layer for i, layer in enumerate(layers)}, capture, pre=True, with_kwargs=True), \
            forward_hooks({"norm": model.model.norm}, lambda _: lambda m, args: finals.append(args[0]), pre=True):
        for s in range(samples):
            captured.append({})
            out = model(ids[s:s + 1], use_cache=False, output_attentions=True)
            received.append(torch.stack([a[0].mean(0).sum(0) for a in out.attentions]))   # [L, T]

    def output_of(block, s):
        return captured[s][block + 1][0] if block + 1 < depth else finals[s]

    def run(block, hidden, s):
        result = layers[block](hidden, **captured[s][block][1])
        return result[0] if isinstance(result, tuple) else result

    def kl(p, q):
        return float((p.exp() * (p - q)).sum(-1).mean())

    def log_probs(hidden):
        return model.lm_head(model.model.norm(hidden)).log_softmax(-1)

    base = [log_probs(finals[s]) for s in range(samples)]
    spec = parse_candidates(grid, "w4a16", None)[0].scheme().weight
    proxies, per_token, shares = {}, {}, {}
    for name in names:
        block = int(name.split(".")[2])
        reader = layers[block + 1].input_layernorm if block + 1 < depth else model.model.norm
        linear = model.get_submodule(name)
        original = linear.weight.data.clone()
        quantized = quantize_imatrix(original, spec, weights[name]).dequantize().float()
        sums = dict.fromkeys(("B", "N", "L1", "F", "FN"), 0.0)
        rows, absolute, normed_rows = [], [], []
        for s in range(samples):
            linear.weight.data = quantized
            target, changed = output_of(block, s), run(block, captured[s][block][0], s)
            linear.weight.data = original
            delta, energy = changed - target, target.pow(2).sum(-1)
            rows.append((delta.pow(2).sum(-1) / energy)[0])
            absolute.append(delta.pow(2).sum(-1)[0])
            sums["B"] += float(rows[-1].mean())
            normed = reader(target)
            normed_rows.append(((reader(changed) - normed).pow(2).sum(-1) / normed.pow(2).sum(-1))[0])
            sums["N"] += float(normed_rows[-1].mean())
            if block + 1 < depth:
                later = output_of(block + 1, s)
                sums["L1"] += float(((run(block + 1, changed, s) - later).pow(2).sum(-1)
                                     / later.pow(2).sum(-1)).mean())
            last = finals[s]
            sums["F"] += kl(base[s], log_probs(last + delta))
            carried = (last.pow(2).sum(-1, keepdim=True) / energy[..., None]).sqrt()
            sums["FN"] += kl(base[s], log_probs(last + delta * carried))
        proxies[name] = {k: (None if k == "L1" and block + 1 >= depth else v / samples) for k, v in sums.items()}
        per_token[name] = (torch.stack(rows), torch.stack(normed_rows))
        if name in WATCHED:
            shares[name] = round(float(torch.stack(absolute)[:, 0].sum() / torch.stack(absolute).sum()), 3)
        print(json.dumps({"linear": name, **proxies[name]}), flush=True)
    return proxies, per_token, torch.stack(received), shares


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=xs.__getitem__)
        out = [0] * len(xs)
        for rank, i in enumerate(order):
            out[i] = rank
        return out
    ra, rb, mid = ranks(a), ranks(b), (len(a) - 1) / 2
    return sum((x - mid) * (y - mid) for x, y in zip(ra, rb)) / sum((x - mid) ** 2 for x in ra)


def compare(label: str, proxy: dict[str, float], measured: dict[str, float]) -> dict:
    names = [n for n in measured if proxy.get(n) is not None]
    ratio = {n: measured[n] / max(proxy[n], 1e-15) for n in names}
    median = statistics.median(ratio.values())
    spread = math.sqrt(sum(math.log(ratio[n] / median) ** 2 for n in names) / len(names))
    row = {"proxy": label, "linears": len(names),
           "spearman": round(spearman([proxy[n] for n in names], [measured[n] for n in names]), 3),
           "log_ratio_rms": round(spread, 3),
           "kl_over_proxy": {n.split(".")[2] + ".down_proj": round(ratio[n] / median, 2)
                             for n in WATCHED if n in ratio}}
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", type=Path, required=True, help="probe_logit_sensitivity.py's --out file")
    parser.add_argument("--grid", default="int4-g128-sym")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the proxies and comparisons here (JSON)")
    args = parser.parse_args()
    measured = {n: (v[0] if isinstance(v, list) else v) for n, v in json.loads(args.probe.read_text()).items()}
    proxies, per_token, received, shares = measure(args.grid, args.samples)
    depth = received.shape[1]
    rows = [compare(key, {n: p[key] for n, p in proxies.items()}, measured) for key in ("B", "N", "L1", "F", "FN")]

    def attention_weighted(weight_of, which=0):
        return {n: float((per_token[n][which] * weight_of(int(n.split(".")[2]))).mean()) for n in per_token}

    def later(block):
        return 1 + (received[:, block + 1:].mean(1) if block + 1 < depth else 0)

    def following(block):
        return 1 + (received[:, block + 1] if block + 1 < depth else 0)

    rows += [compare("B_w later blocks", attention_weighted(later), measured),
             compare("B_w next block", attention_weighted(following), measured),
             compare("B_w every block", attention_weighted(lambda b: 1 + received.mean(1)), measured),
             compare("N_w later blocks", attention_weighted(later, 1), measured),
             compare("N_w next block", attention_weighted(following, 1), measured)]
    where = {n.split(".")[2] + ".down_proj": {"relative": round(float(per_token[n][0][:, 0].sum()
                                                                       / per_token[n][0].sum()), 3),
                                               "after_norm": round(float(per_token[n][1][:, 0].sum()
                                                                         / per_token[n][1].sum()), 3),
                                               "absolute": shares[n]} for n in WATCHED}
    print(json.dumps({"relative_error_share_of_token_0": where,
                      "attention_received_by_token_0": [round(float(x)) for x in received[0, :, 0]]}))
    if args.out:
        args.out.write_text(json.dumps({"proxies": proxies, "comparisons": rows, "where": where}, indent=1) + "\n")


if __name__ == "__main__":
    main()
