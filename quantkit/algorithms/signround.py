"""SignRound (Cheng et al. 2023, arXiv 2309.05516; intel/auto-round): block-wise learned rounding.

Every Linear of the block is first quantized by an initial algorithm (``init``: auto, rtn, gptq, awq or imatrix);
then the block's rounding is learned against its float outputs, all its SignRound Linears together:

    code  = clamp(round((w0 + off) / s + V) + z, qmin, qmax),     w_hat = (code - z) * s - off
    V     [out, in] in [-0.5, 0.5]: a learned rounding offset per weight, 0 at the start
    w0    the weight the initial algorithm rounded (GPTQ: each column as its error feedback left it), so
          V = 0 gives the initial codes exactly
    s, z  the initial grid. Where its group scale is a free float (integer grids, not K-quants or Q4_1/Q5_1's
          searched minimums), the group's
          range is learned too: symmetric s = s0 * f_hi; asymmetric [lo0 * f_lo, hi0 * f_hi] with
          lo0 = (qmin - z0) * s0, hi0 = (qmax - z0) * s0, s = (hi - lo) / (qmax - qmin),
          z = clamp(qmin - round(lo / s)); factors in [0.5, 1], 1 at the start (AutoRound's min/max tuning)
    off   K-quants with mins: dmin * m of the sub-block (the sub-block scales d * sc stay as searched);
          llama.cpp's searched Q4_1/Q5_1 (imatrix, gptq llama_cpp): -m of the block (d and m stay as searched)

Loss: mean squared error of the block's outputs, run on the quantized model's inputs, against the float
model's block outputs (the float stream), so each block also compensates the error of the blocks before it.
Update: signed gradient descent with straight-through rounding, p -= lr_t * sign(dL/dp), lr_t falling
linearly from lr (default 1 / iters) to 0; one calibration batch per step, batches in a seeded random order.
The parameters with the lowest batch loss relative to that batch's initial loss are kept; when they do not
lower the loss over the whole calibration set, the initial codes are kept (the pipeline measures that loss on
the pass that propagates the block's outputs to the next block: `Refined.loss_after`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.algorithms.awq import AWQ
from quantkit.algorithms.gptq import GPTQ, k_step, minimum_step
from quantkit.algorithms.registry import (
    LayerContext,
    RefineContext,
    Refined,
    get_algorithm,
    option,
    parse_options,
    register,
)
from quantkit.calibrate.hooks import run_block
from quantkit.errors import QuantkitError, first_line
from quantkit.formats import ggml_blocks, primitives
from quantkit.formats.numbers import scale_format
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec
from quantkit.model.qlinear import QuantLinear, set_submodule

INITS = ("auto", "rtn", "gptq", "awq", "imatrix")
OFFSET_BOUND = 0.5           # |V| <= 0.5: a code moves at most one step from nearest rounding
FACTOR_RANGE = (0.5, 1.0)    # the learned range shrinks a group's range at most to half


def default_init(spec: WeightSpec) -> str:
    """init=auto: imatrix (llama.cpp's importance-weighted scale search) on the grids it searches (integer groups,
    symmetric or with a zero point, K-quants, Q4_0/Q5_0, Q4_1/Q5_1), rtn elsewhere (Q8_0). Measured on SmolLM2
    (docs/benchmarks.md, issue 16): int4 g64 sym with 50 steps 25.24 from imatrix against 25.95 from rtn and 27.48
    from gptq; on Q4_K_M's grids imatrix and gptq tie (18.84) in llama.cpp; int3 g64 asym 29.93 from imatrix with
    70 steps against 30.24 from awq with 80 and 61.13 from rtn; int4 g128 asym with 40 steps 25.64 from imatrix
    against 26.24 from awq; int2 g64 asym 74.11 from imatrix with 70 steps against 88.65 from awq with 80, though
    one pass of awq (1193) is far ahead of the search's (3491)."""
    try:
        get_algorithm("imatrix").validate(spec)
    except QuantkitError:
        return "rtn"
    return "imatrix"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _column_groups(param_shape: torch.Size, quant: QuantTensor) -> bool:
    """Whether [R, G] group parameters of ``quant`` cover its columns in order, G = ceil(in / group), one row of
    parameters per output row (no act-order); the last group may be ragged (shorter)."""
    out_features, in_features = quant.shape
    return (quant.g_idx is None and param_shape[0] == out_features
            and param_shape[1] == primitives.group_count(in_features, quant.group_size))


def _whole_groups(param_shape: torch.Size, quant: QuantTensor) -> bool:
    """`_column_groups` with no ragged last group (so they broadcast over [out, G, group])."""
    return _column_groups(param_shape, quant) and quant.shape[1] % quant.group_size == 0


def _expand(param: torch.Tensor, quant: QuantTensor) -> torch.Tensor:
    """[R, G] group parameters -> [out, in]. Whole groups (`_whole_groups`) broadcast, so the backward pass
    sums each group's gradient instead of scattering it by index."""
    if _whole_groups(param.shape, quant):
        return param[:, :, None].expand(-1, -1, quant.group_size).reshape(quant.shape)
    return primitives.expand_params(param, quant.shape, quant.group_size, quant.g_idx, quant.row_block)


class _Rounding(torch.autograd.Function):
    """w_hat = clamp(round(n / s + V), low, high) * s - off in one pass, with the straight-through gradients
    autograd would give the same expression (round's derivative taken as 1, clamp's as 1 inside its bounds):

        dV = g s [inside],  ds = g (c - [inside] n / s),  dlow = g s [r < low],  dhigh = g s [r > high]

    n [out, in] fp32: the weight the codes were rounded from (plus the K-quant offset); V [out, in] fp32;
    s [out, in] fp32 (no zeros); low, high: [out, in] fp32 code bounds (qmin - z, qmax - z) or floats;
    off: [out, in] fp32 or None. Returns w_hat in ``dtype``. Autograd's op-by-op graph of the same expression
    made a CPU step mostly elementwise passes over [out, in] tensors; with this function and broadcast group
    scales a SmolLM2 step fell from about 0.58 s to 0.26 s (docs/benchmarks.md, issue 16)."""

    @staticmethod
    def forward(ctx, numerator, offsets, step, low, high, offset, dtype):
        ratio = numerator / step
        rounded = torch.round(ratio + offsets)
        code = torch.clamp(rounded, low, high)
        below, above = rounded < low, rounded > high
        ctx.save_for_backward(ratio, code, step, below, above)
        value = code * step
        if offset is not None:
            value = value - offset
        return value.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        ratio, code, step, below, above = ctx.saved_tensors
        grad = grad.float()
        outside = below | above
        scaled = grad * step
        grad_offsets = scaled.masked_fill(outside, 0) if ctx.needs_input_grad[1] else None
        grad_step = None
        if ctx.needs_input_grad[2]:
            grad_step = grad * (code - ratio.masked_fill(outside, 0))
        grad_low = scaled.masked_fill(~below, 0) if ctx.needs_input_grad[3] else None
        grad_high = scaled.masked_fill(~above, 0) if ctx.needs_input_grad[4] else None
        return None, grad_offsets, grad_step, grad_low, grad_high, None, None


class _GroupRounding(torch.autograd.Function):
    """`_Rounding` on whole groups with the group scale and zero point given per group, not expanded:

        w_hat = clamp(round(n / s + V), qmin - z, qmax - z) * s     (s, z broadcast over each group's g columns)
        dV = g s [inside],  ds = sum_group g (c - [inside] n / s),  dz = -sum_group g s [outside]

    numerator, offsets: [out, G * g] fp32 (a ragged last group: padded, see `LearnedGrid.weight`); step [out, G]
    fp32 (no zeros); zero [out, G] fp32 or None. The [out, in]
    copies of s, qmin - z and qmax - z, and the autograd sums that gave their gradients back to the groups, cost a
    learned-range step about as much as the rounding itself."""

    @staticmethod
    def forward(ctx, numerator, offsets, step, zero, qmin, qmax, dtype):
        rows, groups = step.shape
        step3 = step[:, :, None]
        ratio = numerator.view(rows, groups, -1) / step3
        rounded = torch.round(ratio + offsets.view_as(ratio))
        if zero is None:
            code = torch.clamp(rounded, qmin, qmax)
        else:
            zero3 = zero[:, :, None]
            code = torch.minimum(torch.maximum(rounded, qmin - zero3), qmax - zero3)
        outside = rounded != code
        ctx.save_for_backward(ratio, code, step3, outside)
        ctx.has_zero = zero is not None
        return (code * step3).to(dtype).view_as(numerator)

    @staticmethod
    def backward(ctx, grad):
        ratio, code, step3, outside = ctx.saved_tensors
        grad = grad.float().view_as(ratio)
        scaled = grad * step3
        inside_scaled = scaled.masked_fill(outside, 0)
        grad_offsets = inside_scaled.view(grad.shape[0], -1) if ctx.needs_input_grad[1] else None
        grad_step = (grad * (code - ratio.masked_fill(outside, 0))).sum(-1) if ctx.needs_input_grad[2] else None
        grad_zero = (inside_scaled - scaled).sum(-1) if ctx.has_zero and ctx.needs_input_grad[3] else None
        return None, grad_offsets, grad_step, grad_zero, None, None, None


def _minimum_grid(quant: QuantTensor) -> bool:
    """Whether ``quant`` holds llama.cpp's Q4_1/Q5_1 minimums as fractional zero points (imatrix; gptq llama_cpp)."""
    return ggml_blocks.min_type(quant.spec) is not None and not quant.integer_zero


class LearnedGrid(nn.Module):
    """One Linear's learnable rounding on the grid of its initial QuantTensor.

    offsets [out, in] fp32 (V), and with ``learn_range`` the factors [R, G] fp32 of the group ranges."""

    def __init__(self, init: QuantTensor, rounded_from: torch.Tensor, learn_range: bool):
        super().__init__()
        spec = init.spec
        self.init = init
        self.element = spec.element
        # K grids, and llama.cpp's searched Q4_1/Q5_1 (a float16 minimum, held as a fractional zero point): the
        # step and offset stay as searched, w = step * (code + 2^(b-1)) - offset  (or step * code)
        self.k_grid = spec.super_group is not None or _minimum_grid(init)
        self.learn_range = learn_range and self.range_learnable(init) and not self.k_grid
        if self.k_grid:
            step, offset = k_step(init) if spec.super_group is not None else minimum_step(init)
            self.register_buffer("step0", _expand(step, init))
            self.register_buffer("offset", None if offset is None else _expand(offset, init))
            self.shift = None if offset is None else -float(1 << (spec.bits - 1))  # z of the grids with offsets
        else:
            self.register_buffer("step0", primitives.effective_scale(init.scale.float(), init.global_scale))
            self.register_buffer("offset", None)
            self.shift = None
        self.register_buffer("zero0", None if init.zero is None or self.k_grid else init.zero.float())
        self.offsets = nn.Parameter(torch.zeros(init.shape))
        shape = init.scale.shape
        self.factor_lo = nn.Parameter(torch.ones(shape)) if self.learn_range and init.zero is not None else None
        self.factor_hi = nn.Parameter(torch.ones(shape)) if self.learn_range else None
        rounded_from = rounded_from.detach().float().clone()     # an inference tensor cannot join autograd
        with torch.no_grad():
            step, zero = self.grid()
            nearest = self.codes(rounded_from, step, zero, torch.zeros_like(rounded_from))
        self.register_buffer("dead", step == 0)   # a (sub-)block whose step is 0 keeps its initial codes
        self.register_buffer("init_codes", init.codes.float())
        self.register_buffer("init_weight", init.dequantize())
        # Nearest rounding of w0 must give the initial codes: where the initial algorithm rounded otherwise (llama.cpp's
        # Q4_0 reference truncates x/d + 8.5; a least-squares scale stored after its levels were chosen), w0 is moved
        # just inside its code's cell (keeping which side it lies on), or to the cell's centre where that misses.
        with torch.no_grad():
            moved = self.project(rounded_from, step, zero)
            self.replaced = int((nearest != self.init_codes).sum())
            rounded_from = torch.where(nearest == self.init_codes, rounded_from, moved)
            again = self.codes(rounded_from, step, zero, torch.zeros_like(rounded_from))
        self.register_buffer("rounded_from", torch.where(again == self.init_codes, rounded_from, self.init_weight))
        # what `weight` reuses every step: the rounded weight with the K offset, and a fixed grid's step (no
        # zeros: a dead (sub-)block takes its initial weight) and zero point, expanded once
        self.register_buffer("numerator", self.rounded_from if self.offset is None else self.rounded_from + self.offset)
        self.has_dead = bool(self.dead.any())
        self.fixed = self.k_grid or not self.learn_range
        # learned ranges over groups in column order: `_GroupRounding`, a ragged last group padded to full width
        self.grouped = not self.fixed and _column_groups(init.scale.shape, init)
        self.padding = init.scale.shape[1] * init.group_size - init.shape[1] if self.grouped else 0
        self.register_buffer("group_numerator", F.pad(self.numerator, (0, self.padding)) if self.padding else None)
        self.fixed_step = self.fixed_low = self.fixed_high = None
        if self.fixed:
            with torch.no_grad():
                step, zero = self.grid()
            self.fixed_step = torch.where(step == 0, torch.ones_like(step), step)
            self.fixed_low, self.fixed_high = self.code_bounds(zero)

    def position(self, w0: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((w0 + off) / s, s) with a zero step read as 1 (its codes are the initial ones anyway)."""
        safe = torch.where(step == 0, torch.ones_like(step), step)
        return (w0 if self.offset is None else w0 + self.offset) / safe, safe

    def project(self, w0: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """w0 moved into the initial code's rounding cell: position (w0 + off) / s clamped to cell +- 0.45."""
        position, safe = self.position(w0, step)
        cell = self.init_codes if zero is None else self.init_codes - zero
        moved = torch.minimum(torch.maximum(position, cell - 0.45), cell + 0.45) * safe
        return moved if self.offset is None else moved - self.offset

    @staticmethod
    def range_learnable(init: QuantTensor) -> bool:
        """Whether the group scale is a free float the range factors can move: integer grids with a
        float scale format, no K super-blocks, no second-level scale."""
        spec = init.spec
        return (spec.element.kind == "int" and spec.super_group is None and spec.second_scale is None
                and spec.scale_format in ("fp16", "bf16", "fp32"))

    def factors(self) -> list[nn.Parameter]:
        return [p for p in (self.factor_lo, self.factor_hi) if p is not None]

    def grid(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step [out, in], zero [out, in] or None) of the current factors as stored (the final QuantTensor's;
        `weight` differentiates through `group_grid` itself)."""
        init = self.init
        if self.k_grid:    # K grids with mins: code = unsigned level - 2^(b-1), so z = -2^(b-1)
            return self.step0, None if self.shift is None else torch.full_like(self.step0, self.shift)
        if not self.learn_range:
            return _expand(self.step0, init), None if self.zero0 is None else _expand(self.zero0, init)
        scale, zero = self.group_grid(exact=True)
        return _expand(scale, init), None if zero is None else _expand(zero, init)

    def group_grid(self, exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The learned group scale and zero [R, G] (range mode): factors at 1 keep the initial ones exactly."""
        element, storage = self.element, scale_format(self.init.spec.scale_format)
        qmin, qmax = float(element.min), float(element.max)
        rounding = storage.round if exact else (lambda s: s + (storage.round(s.detach()) - s).detach())
        hi_factor = self.factor_hi
        if self.zero0 is None:
            scale = rounding(self.step0 * hi_factor)
            unchanged = hi_factor == 1
            scale = torch.where(unchanged, self.step0, scale) if exact else scale
            return scale, None
        lo = (qmin - self.zero0) * self.step0 * self.factor_lo
        hi = (qmax - self.zero0) * self.step0 * hi_factor
        scale = rounding((hi - lo) / (qmax - qmin))
        zero = ((qmin - (torch.round(lo / scale) if exact else round_ste(lo / scale))).clamp(qmin, qmax))
        if exact:
            unchanged = (self.factor_lo == 1) & (hi_factor == 1)
            scale = torch.where(unchanged, self.step0, scale)
            zero = torch.where(unchanged, self.zero0, zero)
        return scale, zero

    def codes(self, w0: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | None, offsets: torch.Tensor
              ) -> torch.Tensor:
        """[out, in] float codes: clamp(round((w0 + off) / step + V) + z)."""
        code = torch.round(self.position(w0, step)[0] + offsets)
        if zero is not None:
            code = code + zero
        return code.clamp(self.element.min, self.element.max)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [out, in] of the current parameters in ``dtype`` (differentiable)."""
        flat = None
        if self.fixed:
            step, low, high = self.fixed_step, self.fixed_low, self.fixed_high
            value = _Rounding.apply(self.numerator, self.offsets, step, low, high, self.offset, dtype)
        else:
            step_g, zero_g = self.group_grid(exact=False)
            flat = step_g == 0       # a learned scale that rounds to 0 stores 0: its weights are 0
            step_g = torch.where(flat, torch.ones_like(step_g), step_g)
            if self.grouped:
                # a ragged last group is padded with zero weights and offsets (their gradient is 0: sliced off)
                numerator = self.numerator if self.group_numerator is None else self.group_numerator
                offsets = F.pad(self.offsets, (0, self.padding)) if self.padding else self.offsets
                value = _GroupRounding.apply(numerator, offsets, step_g, zero_g, float(self.element.min),
                                             float(self.element.max), dtype)
                value = value[:, :self.offsets.shape[1]] if self.padding else value
            else:
                low, high = self.code_bounds(None if zero_g is None else _expand(zero_g, self.init))
                value = _Rounding.apply(self.numerator, self.offsets, _expand(step_g, self.init), low, high,
                                        self.offset, dtype)
        if flat is not None and bool(flat.any()):
            value = value.masked_fill(_expand(flat, self.init), 0)
        if self.has_dead:
            value = torch.where(self.dead, self.init_weight.to(dtype), value)
        return value

    def code_bounds(self, zero: torch.Tensor | None) -> tuple:
        """(qmin - z, qmax - z): the range of code - z, floats without a zero point."""
        low, high = float(self.element.min), float(self.element.max)
        return (low, high) if zero is None else (low - zero, high - zero)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.offsets.clamp_(-OFFSET_BOUND, OFFSET_BOUND)
        for factor in self.factors():
            factor.clamp_(*FACTOR_RANGE)

    @torch.no_grad()
    def quant_tensor(self) -> QuantTensor:
        """The exact QuantTensor of the current parameters (the initial one's fields, new codes and scales)."""
        init = self.init
        step, zero = self.grid()
        codes = self.codes(self.rounded_from, step, zero, self.offsets)
        codes = torch.where(self.dead | (step == 0), self.init_codes, codes).to(init.codes.dtype)
        if not self.learn_range:
            return dataclasses.replace(init, codes=codes)
        scale, group_zero = self.group_grid(exact=True)
        return dataclasses.replace(init, codes=codes, scale=scale, zero=group_zero)


class LearnedLinear(nn.Module):
    """The training stand-in of one QuantLinear: its learned weight, its activation grid (straight through)
    and its bias."""

    def __init__(self, grid: LearnedGrid, quantized: QuantLinear):
        super().__init__()
        self.grid = grid
        self.quantized = quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized.activation_spec is not None:
            x = x + (self.quantized.quantize_input(x) - x).detach()
        bias = None if self.quantized.bias is None else self.quantized.bias.to(x.dtype)
        return F.linear(x, self.grid.weight(x.dtype), bias)


def _block_loss(block: nn.Module, call, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of ``block``'s output on ``call`` (a BlockInput) against ``target`` [batch, seq,
    hidden] fp32, in fp32."""
    return F.mse_loss(run_block(block, call).float(), target, reduction="sum")


def _trainable(value):
    """A copy of a call's tensors outside inference mode (autograd cannot save inference tensors)."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_trainable(v) for v in value)
    if isinstance(value, dict):
        return {k: _trainable(v) for k, v in value.items()}
    return value


@register("signround")
class SignRound:
    """Options: init (auto: where the codes start, `default_init`: imatrix where it searches the grid, else rtn;
    or rtn, gptq, awq, imatrix), iters (200 steps per block; 0
    keeps the initial codes), lr (0: 1 / iters, AutoRound's default), range_lr (0: lr; of the range factors),
    learn_range (True), patience (0: never stop early; else stop after that many steps without a new
    best), autocast (False: bf16 autocast of the block's forward and backward on CPU), compile (False:
    the steps' forward and backward through torch.compile, inductor's precision emulated; needs a C++
    compiler, about 30 s once per run; on SmolLM2 int4 g64 sym 80 steps took 0.84-0.87x the eager run's time
    for a model within a run's spread, docs/benchmarks.md, issue 16, eighteenth part), and the initial
    algorithm's options (GPTQ's block_size, damp, act_order, static_groups, true_sequential, llama_cpp,
    weighted_grid; AWQ's samples and clip; rtn's llama_cpp), passed to it; AWQ's search takes 8 samples here
    unless told (AWQ alone: 16): the steps that follow learn the rounding anyway, and on SmolLM2 int3 g64 asym
    the half-size search gave the same quality for 100 s less; 4 samples gave a worse model (30.91 against
    30.24; docs/benchmarks.md, issue 16, seventh and eighth parts).
    Block-wide settings (iters, lr, patience, autocast, compile) come from the block's first SignRound Linear in
    name order."""

    @dataclass(frozen=True)
    class Options(GPTQ.Options, AWQ.Options):   # the initial algorithms' options (rtn's llama_cpp is GPTQ's too)
        init: str = option("auto", choices=INITS)
        iters: int = option(200, minimum=0)
        lr: float = option(0.0, minimum=0.0)
        range_lr: float = option(0.0, minimum=0.0)
        learn_range: bool = option(True)
        patience: int = option(0, minimum=0)
        autocast: bool = option(False)
        compile: bool = option(False)
        samples: int = option(8, minimum=1)      # AWQ's search samples under SignRound (AWQ alone: 16)

    # what the pipeline asks of the algorithm itself; its initial algorithm's come through `initial`
    statistics: frozenset[str] = frozenset()
    sequential = False

    def validate(self, spec: WeightSpec) -> None:
        if spec.element.kind != "int":
            raise QuantkitError(f"signround learns offsets on integer grids (int, K-quants); {spec.describe()} "
                                "has a float element grid: use gptq")

    def initial(self, options: dict, spec: WeightSpec) -> tuple[str, dict]:
        parsed = parse_options(self.name, options)
        init = default_init(spec) if parsed.init == "auto" else parsed.init
        known = {f.name for f in fields(get_algorithm(init).Options)}
        chosen = {key: value for key, value in options.items() if key in known}
        if "samples" in known:        # SignRound's own default for AWQ's search
            chosen.setdefault("samples", parsed.samples)
        return init, chosen

    def initialize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext
                   ) -> tuple[QuantTensor, dict, torch.Tensor]:
        name, options = self.initial(context.options, spec)
        algorithm = get_algorithm(name)
        init_context = dataclasses.replace(context, options=options)
        rounding = getattr(algorithm, "rounding", None)
        if rounding is not None:     # GPTQ: the codes come from the error-compensated columns
            return rounding(weight, spec, init_context)
        quant, results = algorithm.quantize(weight, spec, init_context)
        return quant, results, weight.detach().float()

    def refine_block(self, context: RefineContext) -> Refined:
        names = sorted(context.rounded_from)
        options = parse_options(self.name, context.assigned[names[0]].options)
        with torch.inference_mode(False), torch.enable_grad():
            return _Trainer(context, names, options).run()


class _Trainer:
    """The optimisation of one block (see the module docstring)."""

    def __init__(self, context: RefineContext, names: list[str], options):
        self.context, self.options = context, options
        self.block = copy.deepcopy(context.block)      # a copy outside inference mode, in the compute dtype
        for param in self.block.parameters():
            param.data = param.data.to(context.compute_dtype) if param.is_floating_point() else param.data
            param.requires_grad_(False)
        self.grids: dict[str, LearnedGrid] = {}
        for name in names:
            quantized = self.block.get_submodule(name)
            quantized._cached_weight = None     # the copy's dequantized weight cache: not needed for training
            grid = LearnedGrid(quantized.quant_tensor(), context.rounded_from.pop(name), options.learn_range)
            self.grids[name] = grid
            set_submodule(self.block, name, LearnedLinear(grid, quantized))
        self.targets = context.targets
        # torch.compile of the step's forward: its cache lives on `_block_loss`'s code, so every block of the
        # same shapes reuses the first block's compiled graphs (their parameters are graph inputs)
        self.compiled = torch.compile(_block_loss) if options.compile else None

    def loss(self, index: int) -> tuple[torch.Tensor, int]:
        """(sum of squared errors of the block's output on call ``index``, element count)."""
        call = self.context.inputs[index]
        call = dataclasses.replace(call, hidden=call.tensor().clone(), kwargs=_trainable(call.kwargs))
        target = self.targets[index].to(torch.float32, copy=True)
        # a training step through the compiled function; the whole-set passes (no gradients) stay eager
        compiled = self.compiled is not None and torch.is_grad_enabled()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.options.autocast):
            loss = (self.compiled if compiled else _block_loss)(self.block, call, target)
        return loss, target.numel()

    @torch.no_grad()
    def total_loss(self) -> tuple[list[float], float]:
        """Per-call mean squared errors and the mean over every calibration element."""
        sums = [self.loss(i) for i in range(len(self.context.inputs))]
        per_call = [s.item() / max(n, 1) for s, n in sums]
        return per_call, sum(s.item() for s, _ in sums) / max(sum(n for _, n in sums), 1)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for grid in self.grids.values() for p in grid.parameters()]

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        params = [p for grid in self.grids.values() for p in grid.parameters()]
        for param, value in zip(params, values):
            param.copy_(value)

    def run(self) -> Refined:
        if self.compiled is None:
            return self._run()
        # inductor's fused kernels round every bf16 intermediate as eager ops do: without it the compiled steps
        # learn on other numbers than the eager passes that judge and propagate the block, and the models came
        # out worse (SmolLM2 blocks 6-13 KL 0.0344 against 0.0278; with it 0.0283). The backward graph is
        # compiled at the first backward, so the setting covers the whole loop (and is restored after it).
        import torch._dynamo.exc as dynamo_errors
        import torch._inductor.config as inductor_config
        import torch._inductor.exc as inductor_errors
        try:
            with inductor_config.patch(emulate_precision_casts=True):
                return self._run()
        except (dynamo_errors.TorchDynamoException, inductor_errors.InductorError) as error:
            # the backend's own failure (no C++ compiler, an op it cannot lower), forward or backward
            raise QuantkitError(f"signround compile=true: torch.compile failed on {self.context.prefix} "
                                f"({first_line(error, typed=True)}); run without compile=true") from None

    def _run(self) -> Refined:
        options = self.options
        iters = options.iters
        start_per_call, before = self.total_loss()
        initial = self.snapshot()
        best, best_state, best_iteration, done = 1.0, initial, 0, 0
        lr = options.lr or (1.0 / iters if iters else 0.0)
        range_lr = options.range_lr or lr
        offsets = [grid.offsets for grid in self.grids.values()]
        factors = [f for grid in self.grids.values() for f in grid.factors()]
        generator = torch.Generator().manual_seed(self.context.seed)
        order: list[int] = []
        for iteration in range(iters):
            if not order:
                order = torch.randperm(len(self.context.inputs), generator=generator).tolist()
            index = order.pop()
            total, count = self.loss(index)
            relative = total.item() / max(count, 1) / start_per_call[index] if start_per_call[index] > 0 else 0.0
            if relative < best:
                best, best_state, best_iteration = relative, self.snapshot(), iteration
            elif options.patience and iteration - best_iteration >= options.patience:
                break
            self.context.advance(iteration + 1, iters, relative)
            total.backward()
            decay = 1.0 - iteration / iters            # linear schedule from lr to 0
            with torch.no_grad():
                for params, rate in ((offsets, lr), (factors, range_lr)):
                    for param in params:
                        if param.grad is not None:
                            param.add_(param.grad.sign(), alpha=-rate * decay)
                            param.grad = None
                for grid in self.grids.values():
                    grid.clamp_()
            done = iteration + 1
        if best_iteration == 0:
            self.restore(initial)
            return Refined(self.quant_tensors(), before, before, done, 0)
        # The best state was chosen on single calls: whether it helps over the whole calibration set is
        # measured by the pipeline on the pass that propagates the block (one block pass less per block).
        starting = self.quant_tensors_at(initial)
        self.restore(best_state)
        return Refined(self.quant_tensors(), before, None, done, best_iteration, initial=starting)

    def quant_tensors(self) -> dict[str, QuantTensor]:
        return {name: grid.quant_tensor() for name, grid in self.grids.items()}

    def quant_tensors_at(self, values: list[torch.Tensor]) -> dict[str, QuantTensor]:
        """The codes of the parameter state ``values`` (a `snapshot`)."""
        self.restore(values)
        return self.quant_tensors()
