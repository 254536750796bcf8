"""Running statistics equal the statistic over all samples at once."""
import torch

from quantkit.calibrate.stats import ChannelMeanAbs, ChannelRange, Hessian, LayerStats


def _batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 17, 24, generator=generator) * (1 + i) for i in range(5)]


def test_running_absmax_equals_absmax_over_everything():
    batches = _batches()
    running = ChannelRange()
    for batch in batches:
        running.update(batch)
    everything = torch.cat([b.reshape(-1, 24) for b in batches])
    assert torch.equal(running.absmax, everything.abs().amax(dim=0))
    assert torch.equal(running.min, everything.amin(dim=0))
    assert torch.equal(running.max, everything.amax(dim=0))


def test_running_mean_abs_and_hessian():
    batches = _batches(1)
    mean_abs, hessian = ChannelMeanAbs(), Hessian()
    for batch in batches:
        mean_abs.update(batch)
        hessian.update(batch)
    everything = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert torch.allclose(mean_abs.mean.double(), everything.abs().mean(dim=0), rtol=1e-6)
    expected = 2.0 / everything.shape[0] * everything.t() @ everything
    assert torch.allclose(hessian.matrix.double(), expected, rtol=1e-5, atol=1e-5)


def test_statistics_of_scaled_input_need_no_new_pass():
    batches = _batches(2)
    factors = torch.rand(24) + 0.5
    direct, rescaled = (ChannelRange(), Hessian()), (ChannelRange(), Hessian())
    for batch in batches:
        for stat in direct:
            stat.update(batch / factors)
        for stat in rescaled:
            stat.update(batch)
    for stat in rescaled:
        stat.scale_channels(factors)
    assert torch.allclose(direct[0].absmax, rescaled[0].absmax)
    assert torch.allclose(direct[1].matrix, rescaled[1].matrix, rtol=1e-4, atol=1e-5)


def test_bf16_inputs_give_the_fp32_hessian_of_their_values():
    """A bf16 forward's inputs take oneDNN's bf16 product path where the CPU has one: the sums of exact
    products must equal fp32 x^T x of the same values (only the summation order may differ)."""
    batches = [b.bfloat16() for b in _batches(3)]
    fast, reference = Hessian(), Hessian()
    for batch in batches:
        fast.update(batch)
        reference.add(Hessian.contribution(batch.reshape(-1, 24).float(), bf16_values=False))
    exact = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    expected = 2.0 / exact.shape[0] * exact.t() @ exact
    assert torch.allclose(fast.matrix.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast.matrix, reference.matrix, rtol=1e-5, atol=1e-5)
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if hasattr(matmul, "fp32_precision"):           # the bf16 path is switched on for x^T x only
        assert matmul.fp32_precision in ("none", "ieee")


def test_sum_of_squares_is_read_from_the_hessian_and_outlives_it():
    batches = _batches(4)
    both, alone = LayerStats(frozenset({"sum_sq", "hessian", "range"})), LayerStats(frozenset({"sum_sq", "range"}))
    for batch in batches[:3]:
        both.update(batch)
        alone.update(batch)
    assert "sum_sq" not in both.items            # not summed twice
    assert torch.allclose(both.sum_sq.total, alone.sum_sq.total, rtol=1e-6)
    for batch in batches[3:]:                     # once taken, it keeps up with later batches
        both.update(batch)
        alone.update(batch)
    both.release("hessian")
    assert set(both.items) == {"range", "sum_sq"}
    everything = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert torch.allclose(both.sum_sq.mean.double(), everything.pow(2).mean(dim=0), rtol=1e-6)
    assert float(both.sum_sq.count) == everything.shape[0]


def test_sum_of_squares_taken_at_release_when_never_read():
    batches = _batches(6)
    stats = LayerStats(frozenset({"sum_sq", "hessian"}))
    for batch in batches:
        stats.update(batch)
    stats.release("hessian")
    assert set(stats.items) == {"sum_sq"}
    everything = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    assert torch.allclose(stats.sum_sq.total, everything.pow(2).sum(dim=0), rtol=1e-6)


def test_blocked_gram_is_x_transpose_x():
    """The Hessian's x^T x from its upper column blocks (1536 columns: 3 blocks, 6 of 9 products) equals the
    float64 product to float32 accuracy on both paths (bf16 products, float32 GEMM) and is exactly symmetric."""
    from quantkit.calibrate.stats import GRAM_BLOCK, _gram

    generator = torch.Generator().manual_seed(4)
    for columns in (3 * GRAM_BLOCK, 2 * GRAM_BLOCK + 7):       # ragged blocks too
        x = torch.randn(300, columns, generator=generator).bfloat16().float()
        ours = _gram(x, bf16_values=True)
        reference = x.double().t() @ x.double()
        assert torch.equal(ours, ours.t())
        assert torch.allclose(ours.double(), reference, rtol=1e-5, atol=1e-3)
        assert torch.allclose(_gram(x), reference.float(), rtol=1e-5, atol=1e-3)
