"""Issue 16 probe: does a rotated residual stream give quantkit's weight-only grids a better start on SmolLM2?

QuaRot (arXiv 2404.00456) and SpinQuant (arXiv 2405.16406) rotate the residual stream by an orthogonal R, merged
into the weights, so that outlier channels are spread over all of them. With every RMSNorm gain g folded into the
Linears that read the norm (W <- W diag(g), g <- 1; RMSNorm(x R) = RMSNorm(x) R for an orthogonal R), the model

    embed E -> E R,   readers (q, k, v, gate, up, head) W -> W R,   writers (o, down) W -> R^T W

computes the same function in float. The head's folded gain differs from the embedding's, so the rotated model
unties them (a second [vocab, hidden] float tensor). This probe builds that checkpoint (a seeded random orthogonal
R from a QR decomposition), checks it against the float model, then quantizes the source and the rotated
checkpoint alike and scores both against the float source on the protocol's held-out windows.

    python benchmarks/probe_rotation.py --grid "int4 g64 sym" --variants imatrix
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import common
import torch
from bench_signround import GRIDS, calibrate_flags


def fold_gain(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    """W <- W diag(g) for every reader of the norm, then g <- 1 (float64 products)."""
    gain = norm.weight.data.double()
    for linear in readers:
        linear.weight.data = (linear.weight.data.double() * gain).float()
    norm.weight.data.fill_(1.0)


def rotate_residual(model, rotation: torch.Tensor) -> None:
    """Rotate a Llama-shaped model's residual stream by ``rotation`` [hidden, hidden] float64, in place."""
    def read(linear):                        # y = W x = (W R)(R^T x)
        linear.weight.data = (linear.weight.data.double() @ rotation).float()

    def write(linear):                       # the residual it writes to is rotated: R^T y
        linear.weight.data = (rotation.T @ linear.weight.data.double()).float()

    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.data.clone())
    model.config.tie_word_embeddings = False
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        fold_gain(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj])
        fold_gain(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            read(linear)
        for linear in (attention.o_proj, mlp.down_proj):
            write(linear)
    fold_gain(model.model.norm, [model.lm_head])
    read(model.lm_head)
    embed = model.model.embed_tokens.weight
    embed.data = (embed.data.double() @ rotation).float()


def rotated_checkpoint(out: Path, seed: int, reference, windows) -> dict:
    """Write the rotated SmolLM2 (source tokenizer files copied) to ``out``; its score against the float model."""
    model = common.float_model()
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    rotation = torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64, generator=generator))[0]
    with torch.no_grad():
        rotate_residual(model, rotation)
    check = common.score(model, reference, windows)
    model.save_pretrained(out)
    for path in common.demo_model().iterdir():
        if "token" in path.name or path.suffix == ".jinja":
            shutil.copy(path, out / path.name)
    return check


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default="int4 g64 sym", choices=list(GRIDS))
    parser.add_argument("--variants", nargs="+", default=["imatrix"], help="bench_signround.py's variants")
    parser.add_argument("--seed", type=int, default=0, help="of the random rotation")
    args = parser.parse_args()
    windows, reference = common.eval_windows(), common.float_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rotated = Path(tmp) / "rotated"
        check = rotated_checkpoint(rotated, args.seed, reference, windows)
        print(f"rotated float model against the source: ppl {check['ppl']:.4f} (source {check['float_ppl']:.4f}), "
              f"KL {check['kl']:.2e}, top-1 {check['top1']:.4f}", flush=True)
        for index, variant in enumerate(args.variants):
            for label, model in (("source", "smollm2-135m"), (f"rotated (seed {args.seed})", str(rotated))):
                common.add_quantkit_row(rows, Path(tmp) / f"out{index}-{len(rows)}", f"{args.grid} {variant}, {label}",
                                        calibrate_flags(args.grid, variant), reference, windows, model=model)
    print(common.table(rows, common.QUALITY_COLUMNS))


if __name__ == "__main__":
    main()
