"""HQQ: Half-Quadratic Quantization (Badri & Shaji 2023; mobiusml/hqq). Calibration-free.

Per group, with w_hat(z) = (clamp(round(w / s + z)) - z) * s, HQQ minimises the sparsity-promoting
    phi(z) = sum |w - w_hat(z)|^p,   p = 0.7
by half-quadratic splitting: an auxiliary error e ~ w - w_hat is updated by the generalised
soft-threshold (proximal operator of |.|^p)
    e <- sign(r) * relu(|r| - |r|^(p-1) / beta),  r = w - w_hat(z)
and the zero point in closed form
    z <- mean(q - (w - e) / s)
with beta <- beta * kappa after each of at most ``iterations`` rounds. The scale stays the min/max one.
Unlike the reference, each group keeps the zero point with the lowest mean |w - w_hat| seen so far
(the reference stops the whole tensor at the first worsening step but keeps the updated zero), so
the result is never worse than the min/max initialisation on that measure. Zero points are floats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, option, parse_options, register
from quantkit.errors import QuantkitError
from quantkit.formats import primitives
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def shrink_lp(residual: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal step of (1/beta) * |e|^p (in-place temporaries: this
    runs on every weight in every round)."""
    magnitude = residual.abs()
    threshold = magnitude.clamp(min=1e-12).pow_(p - 1).div_(beta)
    return magnitude.sub_(threshold).relu_().mul_(residual.sign())


def _codes(scaled: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """HQQ's rounding q = clamp(round(w / s + z)), given scaled = w / s: the zero point is added
    before rounding."""
    qmin, qmax = primitives.signed_range(bits)
    return (scaled + zero).round_().clamp_(qmin, qmax)


def _group_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dim counting only the real columns (a ragged group's padding excluded)."""
    if valid is None:
        return values.mean(dim=-1)
    return (values * valid).sum(dim=-1) / valid.sum(dim=-1)


def _padding_mask(num_groups: int, group_size: int, in_features: int) -> torch.Tensor | None:
    """[G, g] 1.0 on real columns, 0.0 on the padding of a ragged last group; None when nothing is padded."""
    if num_groups * group_size == in_features:
        return None
    return (torch.arange(num_groups * group_size) < in_features).reshape(num_groups, group_size).float()


def hqq_group_error(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean |w - w_hat| per group: [out, G, g] weights, [out, G, 1] params -> [out, G]."""
    codes = _codes(groups / scale, zero, bits)
    return _group_mean((groups - (codes - zero) * scale).abs(), valid)


def check_spec(spec: WeightSpec) -> None:
    if spec.k_format is not None:
        raise QuantkitError(f"HQQ's fractional zero points do not fit {spec.k_format.name}'s integer mins "
                            "(use rtn, imatrix, gptq or awq)")
    if spec.format != "int":
        raise QuantkitError(f"HQQ optimises an integer grid's zero point; {spec.format} grids have none "
                            "(use rtn, gptq or awq)")
    if spec.symmetric:
        raise QuantkitError("HQQ optimises the zero point: use an asymmetric grid (--asym)")
    if spec.granularity == "tensor":
        raise QuantkitError("HQQ works per channel or per group, not per tensor")


def hqq_quantize(weight: torch.Tensor, spec: WeightSpec, *, iterations: int = 20, p: float = 0.7,
                 beta: float = 10.0, kappa: float = 1.01) -> tuple[QuantTensor, dict[str, torch.Tensor]]:
    """weight [out, in] float -> (QuantTensor with float zero points, {"error_init", "error_final"})."""
    check_spec(spec)
    w = weight.float()
    out_features, in_features = w.shape
    group_size = primitives.group_size_for(spec, in_features)
    groups = primitives.to_groups(w, group_size)           # [out, G, g]
    valid = _padding_mask(groups.shape[1], group_size, in_features)
    scale, zero = primitives.weight_qparams(w, spec)       # [out, G] min/max initialisation
    s, z = scale[..., None], zero[..., None].clone()
    scaled = groups / s                                    # w / s, fixed: the scale is not optimised
    # Each round's codes and residual r = w - w_hat(z) serve both its error and the next round's step.
    codes = _codes(scaled, z, spec.bits)
    residual = groups - (codes - z) * s
    best_error = _group_mean(residual.abs(), valid)
    initial_error = best_error.clone()
    best_zero = z.clone()
    for _ in range(iterations):
        step = shrink_lp(residual, beta, p).div_(s).add_(codes).sub_(scaled)  # q - (w - e) / s
        z = _group_mean(step, valid)[..., None]                                # z = mean(q - (w - e) / s)
        beta *= kappa
        codes = _codes(scaled, z, spec.bits)
        residual = (codes - z).mul_(s).neg_().add_(groups)                     # w - (q - z) * s
        error = _group_mean(residual.abs(), valid)
        improved = error < best_error
        if not bool(improved.any()):  # the reference's early stop, applied per group
            break
        best_zero = torch.where(improved[..., None], z, best_zero)
        best_error = torch.minimum(error, best_error)
    codes = _codes(scaled, best_zero, spec.bits).reshape(out_features, -1)[:, :in_features]
    quant = QuantTensor(codes.to(torch.int8), scale, best_zero[..., 0], spec)
    return quant, {"error_init": initial_error.mean(), "error_final": best_error.mean()}


@register("hqq")
class HQQ:
    """Options: iterations (20), p (0.7), beta (10), kappa (1.01)."""

    @dataclass(frozen=True)
    class Options:
        iterations: int = option(20, minimum=1)
        p: float = option(0.7, above=0.0)
        beta: float = option(10.0, above=0.0)
        kappa: float = option(1.01, minimum=1.0)

    statistics: frozenset[str] = frozenset()
    sequential = False

    def validate(self, spec: WeightSpec) -> None:
        check_spec(spec)

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        options = parse_options(self.name, context.options)
        return hqq_quantize(weight, spec, iterations=options.iterations, p=options.p, beta=options.beta,
                            kappa=options.kappa)
