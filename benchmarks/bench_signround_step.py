"""What a SignRound step costs against the samples it takes: one SmolLM2 block in bf16, its seven Linears on
learned int4 grids (`LearnedGrid`, ranges learned), forward and backward of the block's squared output error and
the signed update, on 8, 4, 2 and 1 calibration samples of 512 tokens.

    python benchmarks/bench_signround_step.py [--block 5] [--group-size 64] [--reps 8] [--rounds 2]

Prints ms per step for each batch size (rounds alternate, so a drifting machine weighs on all alike) and the grids'
own forward and backward. A step whose cost falls in proportion to its samples has no fixed cost worth cutting:
only fewer tokens or cheaper tokens make SignRound faster.
"""
import argparse
import time

import common
import torch
import torch.nn.functional as F
from probe_logit_sensitivity import block_input_capture
from torch import nn

from quantkit.algorithms.rtn import quantize_rtn
from quantkit.algorithms.signround import LearnedGrid
from quantkit.calibrate.hooks import forward_hooks
from quantkit.formats.schemes import WeightSpec

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


class GridLinear(nn.Module):
    def __init__(self, grid: LearnedGrid):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.grid.weight(x.dtype))


def learned_block(block: nn.Module, group_size: int) -> tuple[nn.Module, list[LearnedGrid]]:
    """``block`` in bf16 with its Linears replaced by learned int4 symmetric grids started from RTN."""
    block = block.to(torch.bfloat16)
    for param in block.parameters():
        param.requires_grad_(False)
    spec = WeightSpec(4, "group", True, group_size)
    grids = []
    for name in LINEARS:
        parent, child = name.rsplit(".", 1)
        weight = block.get_submodule(name).weight.float()
        grids.append(LearnedGrid(quantize_rtn(weight, spec), weight, learn_range=True))
        setattr(block.get_submodule(parent), child, GridLinear(grids[-1]))
    return block, grids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = common.float_model().float()
    ids = common.calibration_ids()[:8]
    captured: list[dict[int, tuple]] = [{}]
    layer = model.model.layers[args.block]
    with torch.no_grad(), forward_hooks({str(args.block): layer}, block_input_capture(captured), pre=True,
                                        with_kwargs=True):
        model(ids)
    hidden, kwargs = captured[-1][args.block]
    cos, sin = kwargs["position_embeddings"]
    block, grids = learned_block(layer, args.group_size)
    target = torch.randn_like(hidden)

    def step(samples: int) -> None:
        embeddings = tuple(t[:samples].to(torch.bfloat16) if t.shape[0] > 1 else t.to(torch.bfloat16)
                           for t in (cos, sin))
        output = block(hidden[:samples].to(torch.bfloat16), position_embeddings=embeddings,
                       position_ids=kwargs.get("position_ids"), attention_mask=None)
        output = output[0] if isinstance(output, tuple) else output
        F.mse_loss(output.float(), target[:samples], reduction="sum").backward()
        with torch.no_grad():
            for grid in grids:
                for param in grid.parameters():
                    param.add_(param.grad.sign(), alpha=-0.01)
                    param.grad = None
                grid.clamp_()

    for _ in range(args.rounds):
        for samples in (8, 4, 2, 1):
            for _ in range(2):      # warm-up
                step(samples)
            start = time.perf_counter()
            for _ in range(args.reps):
                step(samples)
            print(f"{samples} samples x 512 tokens: {(time.perf_counter() - start) / args.reps * 1e3:.0f} ms/step",
                  flush=True)
    start = time.perf_counter()
    for _ in range(args.reps):
        for grid in grids:
            grid.weight(torch.bfloat16).float().sum().backward()
    print(f"the seven grids alone, forward and backward: {(time.perf_counter() - start) / args.reps * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
