"""llama.cpp's importance-weighted K-quant search (``llama-quantize --imatrix``), on our calibration.

The importance of input column j is E[x_j^2] over the calibration tokens that reached the Linear
(llama-imatrix's in_sum2 / counts); each weight's is importance_j * sqrt(sigma2 + w^2) (Q2_K-Q5_K) or
importance_j (Q6_K), and every sub-block's scale and min and every super-block's d and dmin are fitted by
weighted least squares under it (`kquants.quantize_weighted`, bit-identical to ggml's quantize_q*_K for
the same importance values). Codes are then rounded to nearest on that grid, as llama.cpp does. The
32-value fallback types Q4_0, Q5_0, Q4_1 and Q5_1 get llama.cpp's weighted search for them
(`quantize_weighted_blocks`; Q4_1/Q5_1's float16 minimum becomes a fractional zero point). Any other
symmetric integer grid (any bits, group size or per channel) gets the same least-squares scale search per group
(`weighted_search.weighted_symmetric`): what AutoRound's iters=0 ("opt_rtn") does for its int grids; an
asymmetric one the search with an integer zero point per group (`weighted_search.weighted_asymmetric`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.registry import LayerContext, register
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_blocks, kquants, weighted_search
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import WeightSpec


def quantize_imatrix(weight: torch.Tensor, spec: WeightSpec, importance: torch.Tensor) -> QuantTensor:
    """weight [out, in] float, importance [in] float32 (E[x^2] per input column) -> the QuantTensor of llama.cpp's
    weighted search on ``spec``: a K grid, a searched 32-value block type (Q4_0, Q5_0, Q4_1, Q5_1), or another
    integer group grid (`weighted_search`)."""
    if spec.k_format is not None:
        return QuantTensor.from_k_blocks(kquants.quantize_weighted(weight.float(), spec.k_format.name,
                                                                   importance.float()), spec)
    block_type = ggml_blocks.searched_type(spec)
    if block_type is None and not spec.symmetric:
        return weighted_search.weighted_asymmetric(weight, spec, importance)
    if block_type is None:
        return weighted_search.weighted_symmetric(weight, spec, importance)
    blocks = ggml_blocks.quantize_weighted_blocks(weight.float(), block_type, importance.float())
    return QuantTensor.from_ggml_blocks(blocks, spec)


def searches(spec: WeightSpec) -> bool:
    """Whether `quantize_imatrix` has a search for ``spec`` (Q8_0's 32-value blocks are rounded to nearest)."""
    return spec.k_format is not None or ggml_blocks.searched_type(spec) is not None or (
        ggml_blocks.symmetric_type(spec) != "Q8_0" and weighted_search.supports(spec, asymmetric=True))


@register("imatrix")
class ImportanceMatrix:
    """No options: llama.cpp's search has none."""

    @dataclass(frozen=True)
    class Options:
        pass

    statistics = frozenset({"sum_sq"})
    sequential = False

    def validate(self, spec: WeightSpec) -> None:
        if not searches(spec):
            raise QuantkitError(f"imatrix is llama.cpp's search for K-quant grids (q2_k ... q6_k, the gguf:* file "
                                f"types), the q4_0/q5_0/q4_1/q5_1 blocks and integer group grids, not for "
                                f"{spec.describe()}; use rtn, gptq or awq")

    def quantize(self, weight: torch.Tensor, spec: WeightSpec, context: LayerContext) -> tuple[QuantTensor, dict]:
        return quantize_imatrix(weight, spec, context.stats.sum_sq.mean), {}
