"""Running statistics equal the statistic over all samples at once."""
import torch

from quantkit.calibrate.stats import ChannelMeanAbs, ChannelRange, Hessian


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
