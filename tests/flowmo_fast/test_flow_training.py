"""What training draws and computes around the decoder, checked against upstream's definitions
(`flowmo/models.py` `rf_loss` and `FlowMo.forward`): the fat-lognormal time mixture, the one-step estimate
`x_pred` the pre-training perceptual loss sees, and guidance dropout."""

from __future__ import annotations

import torch

import flowmo_fast
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.model import ModelOutput
from flowmo_fast.flowmo.quantizers import QuantizerOutput

N_TIMES = 400_000  # the empirical CDF is then within ~0.002 of the true one (KS, p < 1e-3)


def fat_lognormal_cdf(t: torch.Tensor) -> torch.Tensor:
    """Upstream's fat lognormal: sigmoid(N(0, 1)) with probability 0.9, U(0, 1) with probability 0.1."""
    return 0.9 * torch.special.ndtr(torch.logit(t.double())) + 0.1 * t.double()


def empirical_cdf(samples: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    return (samples.double()[None, :] <= at.double()[:, None]).double().mean(dim=1)


def test_fat_lognormal_is_upstreams_ninety_ten_mixture():
    t = flow.sample_times("fat_lognormal", N_TIMES, generator=torch.Generator().manual_seed(0))
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    gap = (empirical_cdf(t, grid) - fat_lognormal_cdf(grid)).abs().max().item()
    # A 10/90 mix is off by 0.095 somewhere, an 80/20 one by 0.012 (this seed).
    assert gap < 0.005, gap
    # Each tail (t < 0.02, t > 0.98): ~0.2% of samples, nearly all of them from the uniform part; a uniform
    # share of 20% doubles it, none leaves 2%.
    expected = fat_lognormal_cdf(torch.tensor([0.02])).item()
    for tail in ((t < 0.02).double().mean().item(), (t > 0.98).double().mean().item()):
        assert abs(tail / expected - 1) < 0.15, (tail, expected)
    # The middle third: mostly the lognormal's mass.
    middle = ((t > 1 / 3) & (t < 2 / 3)).double().mean().item()
    expected_middle = (fat_lognormal_cdf(torch.tensor([2 / 3])) - fat_lognormal_cdf(torch.tensor([1 / 3]))).item()
    assert abs(middle - expected_middle) < 0.005, (middle, expected_middle)


def test_lognormal_is_the_sigmoid_of_a_standard_normal():
    t = flow.sample_times("lognormal", N_TIMES, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    gap = (empirical_cdf(t, grid) - torch.special.ndtr(torch.logit(grid))).abs().max().item()
    assert gap < 0.005, gap


class ExactVelocity(torch.nn.Module):
    """A 'model' whose velocity is exactly noise - image for the noise it is told about (the flow's target)."""

    def __init__(self, noise: torch.Tensor):
        super().__init__()
        self.noise = noise

    def forward(self, images, noised_images, timesteps, enable_cfg=True, generator=None) -> ModelOutput:
        zero = images.new_zeros(())
        quantizer = QuantizerOutput(images.new_zeros(1, 1, 1), None, zero, {})
        return ModelOutput(self.noise - images, images.new_zeros(1, 1, 1), quantizer, images.new_zeros(1, 1, 2))


def test_one_step_estimate_recovers_the_image_at_every_time():
    g = torch.Generator().manual_seed(0)
    images = torch.rand((8, 3, 8, 8), generator=g) * 2 - 1
    noise = torch.randn((8, 3, 8, 8), generator=g)
    t = torch.tensor([0.02, 0.1, 0.25, 0.4, 0.6, 0.75, 0.9, 0.98])
    out = flow.rectified_flow_loss(ExactVelocity(noise), images, t=t, noise=noise)
    assert out.diffusion_loss.item() < 1e-12
    assert torch.allclose(out.x_pred, images, atol=1e-5), (out.x_pred - images).abs().amax(dim=(1, 2, 3))
    # and the noised input itself follows upstream's convention z_t = (1 - t) x + t z1
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(out.x_pred + tb * (noise - images), (1 - tb) * images + tb * noise, atol=1e-5)


def test_guidance_dropout_zeroes_a_tenth_of_whole_codes_mask_included():
    code = torch.randn((20_000, 4, 5), generator=torch.Generator().manual_seed(0))
    code[..., -1] = 1.0  # the mask channel
    dropped = flow.guidance_dropout(code, torch.Generator().manual_seed(1))
    zeroed = (dropped == 0).all(dim=(1, 2))
    assert abs(zeroed.double().mean().item() - 0.1) < 0.01  # binomial sd 0.002
    assert torch.equal(dropped[~zeroed], code[~zeroed])  # the rest untouched


def classify(velocity: torch.Tensor, conditional: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
    """Per sample: True where `velocity` is the unconditional one, False where the conditional; each must be one."""
    far_c = (velocity - conditional).abs().amax(dim=(1, 2, 3))
    far_u = (velocity - unconditional).abs().amax(dim=(1, 2, 3))
    apart = (conditional - unconditional).abs().amax(dim=(1, 2, 3))
    assert (apart > 1e-3).all()  # the code matters to the decoder: the two are told apart
    assert (torch.minimum(far_c, far_u) < 1e-5).all(), torch.minimum(far_c, far_u).max()
    return far_u < far_c


@torch.no_grad()
def test_training_forward_decodes_about_a_tenth_of_the_batch_without_its_code():
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.dec_depth=1", "model.enc_depth=1"], preset="tiny"))
    b = 256
    images = torch.rand((b, 3, 16, 16)) * 2 - 1
    zt, t = torch.randn((b, 3, 16, 16)), torch.rand((b,))
    out = model(images, zt, t, generator=torch.Generator().manual_seed(2))
    conditional = model.decode(zt, out.code_with_mask, t)
    unconditional = model.decode(zt, out.code_with_mask * 0, t)  # upstream: code * mask, the mask channel too
    null = classify(out.velocity, conditional, unconditional)
    assert abs(null.double().mean().item() - 0.1) < 0.05, null.double().mean().item()  # binomial sd 0.019
    # no dropout when asked for none (evaluation passes) or when the config turns guidance off
    off = model(images, zt, t, enable_cfg=False, generator=torch.Generator().manual_seed(2))
    assert not classify(off.velocity, conditional, unconditional).any()
    model.config.model.enable_cfg = False
    off = model(images, zt, t, generator=torch.Generator().manual_seed(2))
    assert not classify(off.velocity, conditional, unconditional).any()
