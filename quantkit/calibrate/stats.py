"""Running per-input-channel statistics of a Linear's input, updated one batch at a time.

No activation tensor is kept: each statistic folds a batch [..., C] into fixed-size state (a batch's
sums in fp32, accumulated across batches in fp64), so memory is O(C) (O(C^2) for the Hessian) whatever
the number of tokens.
Each statistic can be merged across processes (`all_reduce`) with the collective that makes every
rank hold the statistic one process would have computed over all samples.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.distributed as dist

from quantkit.matmuls import bf16_matmuls, bf16_supported


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [tokens, C] float32."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def _gram(x: torch.Tensor, bf16_values: bool = False) -> torch.Tensor:
    """x^T x: [tokens, C] float32 -> [C, C] float32, fp32 accumulation.

    When every value of x is a bf16 number (the block ran in bf16) and oneDNN runs bf16 matmuls on this CPU,
    its bf16 path computes the same sums: a product of two bf16 numbers is exact in fp32 and the accumulation
    stays fp32 (only the summation order differs, and bf16 subnormals, below 1e-38, count as 0), about 2x
    faster than fp32 inputs where the CPU has bf16 units (AMX, AVX512-BF16)."""
    fast = bf16_values and x.device.type == "cpu" and bf16_supported()
    return _symmetric_gram(x, bf16_matmuls if fast else nullcontext)


GRAM_BLOCK = 512     # columns per block of `_symmetric_gram`


def _symmetric_gram(x: torch.Tensor, precision: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
    """x^T x of x [tokens, C] from its upper blocks (columns in k = C // GRAM_BLOCK blocks): block (i, j), j >= i,
    is x_i^T x_j, the lower ones their transposes, so (k + 1) / 2k of the products (2/3 at 1536 columns) and an
    exactly symmetric result. The same sums, each over the tokens (bit for bit on oneDNN's bf16 path in our
    tests; float32 GEMMs may order a sum differently); 1.5x faster at 1536 columns on one or two CPU threads,
    1.7x at 4096. Each product runs in its own ``precision()`` block: `bf16_matmuls` holds a lock that the
    quantize lane's float32 GEMMs wait for, and a block product is a short wait (a whole x^T x cost the lane
    2.6 s of waits on SmolLM2)."""
    columns = x.shape[1]
    k = columns // GRAM_BLOCK
    if k < 2 or x.device.type != "cpu":
        with precision():
            return x.t() @ x
    bounds = [(i * columns // k, (i + 1) * columns // k) for i in range(k)]
    parts = [x[:, start:end].contiguous() for start, end in bounds]
    out = torch.empty((columns, columns), dtype=x.dtype)
    for i, (row_start, row_end) in enumerate(bounds):
        for j in range(i, k):
            col_start, col_end = bounds[j]
            with precision():
                block = parts[i].t() @ parts[j]
            out[row_start:row_end, col_start:col_end] = block
            if j != i:
                out[col_start:col_end, row_start:row_end] = block.t()
    return out


class ChannelRange:
    """Running per-channel min and max: min_j = min over tokens of x_j (likewise max)."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    @staticmethod
    def contribution(x: torch.Tensor) -> tuple:
        """What one batch [tokens, C] adds; computed once for Linears that share an input."""
        return x.amin(dim=0), x.amax(dim=0)

    def add(self, part: tuple) -> None:
        lo, hi = part
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def update(self, x: torch.Tensor) -> None:
        self.add(self.contribution(_tokens(x)))

    @property
    def absmax(self) -> torch.Tensor:
        """[C] max over tokens of |x_j|."""
        return torch.maximum(-self.min, self.max)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.min).all() and torch.isfinite(self.max).all())

    def scale_channels(self, divisor: torch.Tensor) -> None:
        """The statistic of x / divisor (divisor > 0 per channel): exact, no new pass needed."""
        self.min, self.max = self.min / divisor, self.max / divisor

    def all_reduce(self) -> None:
        dist.all_reduce(self.max, op=dist.ReduceOp.MAX)
        negated_min = -self.min
        dist.all_reduce(negated_min, op=dist.ReduceOp.MAX)
        self.min = -negated_min


class _ChannelSum:
    """A running per-channel sum over tokens (fp64) and the token count; subclasses say what is summed."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def add(self, part: tuple) -> None:
        total, count = part
        self.total = total.clone() if self.total is None else self.total + total
        self.count += count

    def update(self, x: torch.Tensor) -> None:
        self.add(self.contribution(_tokens(x)))

    def all_reduce(self) -> None:
        dist.all_reduce(self.total)
        dist.all_reduce(self.count)


class ChannelMeanAbs(_ChannelSum):
    """Running per-channel mean of |x_j| (AWQ's activation statistic)."""

    @staticmethod
    def contribution(x: torch.Tensor) -> tuple:
        return x.abs().sum(dim=0).double(), x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / self.count).float()

    def scale_channels(self, divisor: torch.Tensor) -> None:
        self.total = self.total / divisor.double()


class ChannelSumSquares(_ChannelSum):
    """Running per-channel sum of x_j^2 and the token count: llama.cpp's importance matrix (llama-imatrix's
    in_sum2 and counts; importance_j = sum / count), the K-quant searches' weights."""

    @staticmethod
    def contribution(x: torch.Tensor) -> tuple:
        return x.square().sum(dim=0).double(), x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """[C] float32 E[x_j^2], as llama-quantize --imatrix computes it from the file: the float32 sum over
        the float32 count (so our imatrix search and llama.cpp's on our exported file see the same values)."""
        return self.total.float() / self.count.float()

    def scale_channels(self, divisor: torch.Tensor) -> None:
        """sum (x_j / s_j)^2 = sum x_j^2 / s_j^2."""
        self.total = self.total / divisor.double().pow(2)


class Hessian:
    """GPTQ's H = (2 / n) * sum_t x_t x_t^T over n tokens.

    Each batch's x^T x is computed in fp32 and accumulated in fp64, so the sum hardly depends on the
    order batches arrive in (one process, or several processes summed by all_reduce): GPTQ's error
    feedback amplifies tiny differences of H into flipped codes."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    @staticmethod
    def contribution(x: torch.Tensor, bf16_values: bool = False) -> tuple:
        return _gram(x, bf16_values), x.shape[0]

    def add(self, part: tuple) -> None:
        outer, count = part
        # fp32 -> fp64 is exact: the same sums as an in-place mixed add, in 2/3 of its time
        self.sum = outer.double() if self.sum is None else self.sum.add_(outer.double())
        self.count += count

    def update(self, x: torch.Tensor) -> None:
        self.add(self.contribution(_tokens(x), x.dtype == torch.bfloat16))

    @property
    def matrix(self) -> torch.Tensor:
        """[C, C] float32."""
        return (self.sum * (2.0 / float(self.count))).float()

    def scale_channels(self, divisor: torch.Tensor) -> None:
        """H of x / s is H_ij / (s_i s_j)."""
        d = divisor.double()
        self.sum = self.sum / torch.outer(d, d)

    def all_reduce(self) -> None:
        dist.all_reduce(self.sum)
        dist.all_reduce(self.count)


STATISTICS = {"range": ChannelRange, "mean_abs": ChannelMeanAbs, "sum_sq": ChannelSumSquares, "hessian": Hessian}


class LayerStats:
    """The statistics one Linear's input is observed for (a subset of `STATISTICS`)."""

    def __init__(self, kinds: frozenset[str]) -> None:
        unknown = kinds - STATISTICS.keys()
        assert not unknown, unknown
        # Σx_j² is the Hessian's diagonal: with both asked for, it is taken from there (`sum_sq`)
        self.sum_sq_in_hessian = {"sum_sq", "hessian"} <= kinds
        self.items = {kind: STATISTICS[kind]() for kind in sorted(kinds - {"sum_sq"} if self.sum_sq_in_hessian
                                                                   else kinds)}
        self.tokens = torch.zeros((), dtype=torch.float64)   # rows observed (0: the Linear saw no input)

    def update(self, x: torch.Tensor, shared: dict | None = None) -> None:
        """Fold one batch in. ``shared`` caches each statistic's batch contribution, so Linears
        reading the same tensor (q, k, v; gate, up) compute it once."""
        shared = {} if shared is None else shared
        for kind, stat in self.items.items():
            if kind not in shared:
                if "tokens" not in shared:
                    shared["tokens"] = _tokens(x)
                tokens = shared["tokens"]
                # the Hessian's x^T x takes the fast exact path when x holds bf16 values
                shared[kind] = (stat.contribution(tokens, x.dtype == torch.bfloat16) if isinstance(stat, Hessian)
                                else stat.contribution(tokens))
            stat.add(shared[kind])
        self.tokens += x.numel() // x.shape[-1]

    def release(self, kind: str) -> None:
        """Free a statistic once its Linear is quantized (no-op if it was never collected)."""
        if kind == "hessian" and self.sum_sq_in_hessian and "sum_sq" not in self.items and "hessian" in self.items:
            self.items["sum_sq"] = self._sum_sq_from_hessian()     # its diagonal outlives it
        if kind == "sum_sq":
            self.sum_sq_in_hessian = False
        self.items.pop(kind, None)

    def scale_channels(self, divisor: torch.Tensor) -> None:
        for stat in self.items.values():
            stat.scale_channels(divisor)

    def all_reduce(self) -> None:
        if self.sum_sq_in_hessian and "hessian" in self.items:
            self.items.pop("sum_sq", None)   # taken again from the reduced Hessian: every rank reduces the same list
        for stat in self.items.values():
            stat.all_reduce()
        dist.all_reduce(self.tokens)

    @property
    def range(self) -> ChannelRange:
        return self.items["range"]

    @property
    def mean_abs(self) -> ChannelMeanAbs:
        return self.items["mean_abs"]

    @property
    def sum_sq(self) -> ChannelSumSquares:
        """Collected, or taken from the Hessian's sums: diag(sum_t x_t x_t^T)_j = sum_t x_tj^2, the same
        tokens and count. Once taken it is a statistic of its own, updated, scaled and reduced with the others."""
        if "sum_sq" not in self.items and self.sum_sq_in_hessian:
            self.items["sum_sq"] = self._sum_sq_from_hessian()
        return self.items["sum_sq"]

    def _sum_sq_from_hessian(self) -> ChannelSumSquares:
        hessian, taken = self.items["hessian"], ChannelSumSquares()
        taken.total = None if hessian.sum is None else hessian.sum.diagonal().clone()
        taken.count = hessian.count.clone()
        return taken

    @property
    def hessian(self) -> Hessian:
        return self.items["hessian"]
