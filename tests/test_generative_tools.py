"""The generative classifier's tools in `utils.py`, each against an independent computation:
per-pixel log-likelihoods, of one mixture and of every class at once, against a float64 brute
force over the 256 bins; class-conditional completion against the slow sampler's images and a loop
of full forward passes on the same noise; and sampling temperature
against a frozen copy of the sampler's formula as it was before temperature existed (T = 1 must
draw those samples bit for bit) and against what T should do to one logistic and to the mixture
weights. Tiny eval-mode models on 8x8 images; the file takes a few seconds:

    python -m pytest tests/test_generative_tools.py -q --durations=5
"""

import math

import pytest
import torch
import torch.nn.functional as F

from utils import (class_log_likelihoods, class_pixel_log_likelihoods, complete,
                   pixel_log_likelihoods, quantize, sample,
                   sample_fast, sample_from_discretized_mix_logistic)

MIN_LOG_SCALE = -7.0                  # the paper's clamp, part of the likelihood
UNIFORM_EPS = 1e-5                    # the sampler keeps its uniforms in [eps, 1 - eps]


# ------------------------------------------------------------------------------------- helpers

def sampler_before_temperature(l, nr_mix, u_mix, u_val):
    """A frozen copy of utils.sample_from_discretized_mix_logistic as it was before it took a
    temperature: today's samples, which T = 1 must reproduce bit for bit."""
    B, n, H, W = l.shape
    channels = 3 if n == 10 * nr_mix else 1
    l = l.float()
    logit_probs = l[:, :nr_mix]
    per_channel = 3 if channels == 3 else 2
    p = l[:, nr_mix:].reshape(B, channels, per_channel * nr_mix, H, W)
    means = p[:, :, :nr_mix]
    log_scales = p[:, :, nr_mix:2 * nr_mix].clamp(min=MIN_LOG_SCALE)
    coeffs = torch.tanh(p[:, :, 2 * nr_mix:]) if channels == 3 else None
    gumbel = -torch.log(-torch.log(u_mix.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)))
    pick = F.one_hot((logit_probs + gumbel).argmax(dim=1), nr_mix)
    pick = pick.permute(0, 3, 1, 2).unsqueeze(1).float()
    mean = (means * pick).sum(dim=2)
    log_scale = (log_scales * pick).sum(dim=2)
    u = u_val.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
    x = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    if channels == 1:
        return x.clamp(-1, 1)
    coeff = (coeffs * pick).sum(dim=2)
    r = x[:, 0].clamp(-1, 1)
    g = (x[:, 1] + coeff[:, 0] * r).clamp(-1, 1)
    b = (x[:, 2] + coeff[:, 1] * r + coeff[:, 2] * g).clamp(-1, 1)
    return torch.stack([r, g, b], dim=1)


@torch.no_grad()
def complete_by_full_passes(model, x, labels, rows, generator, temperature):
    """The straightforward reference for `complete`: the whole image's uniforms drawn up front
    (u_mix, then u_val, as the samplers draw them), then one full forward pass per pixel below
    the kept rows, in raster order."""
    B, C, H, W = x.shape
    K = model.nr_logistic_mix
    u_mix = torch.rand(B, K, H, W, generator=generator)
    u_val = torch.rand(B, C, H, W, generator=generator)
    x = x.clone()
    for i in range(rows, H):
        for j in range(W):
            l = model(x, labels)[:, :, i:i + 1, j:j + 1]                 # (B, 10K, 1, 1)
            pixel = sample_from_discretized_mix_logistic(
                l, K, u_mix[:, :, i:i + 1, j:j + 1], u_val[:, :, i:i + 1, j:j + 1], temperature)
            x[:, :, i:i + 1, j:j + 1] = quantize(pixel)
    return x


# ---------------------------------------------------------------------- per-pixel likelihoods

@pytest.mark.parametrize("channels", [3, 1])
def test_pixel_log_likelihoods_match_brute_force(channels, grid, brute_force):
    torch.manual_seed(0)
    K, B, H, W = 3, 2, 4, 8
    l = torch.randn(B, (10 if channels == 3 else 3) * K, H, W) * 0.5
    x = grid(B, channels, H, W)
    x[:, :, 0, :4], x[:, :, 0, 4:] = -1.0, 1.0                           # both edge bins
    per_pixel = pixel_log_likelihoods(x, l)
    assert per_pixel.shape == (B, H, W) and per_pixel.dtype == torch.float32
    torch.testing.assert_close(per_pixel.double(), brute_force.pixel_log_likelihoods(x, l, K),
                               rtol=1e-4, atol=1e-4)
    # bf16 network output is computed in float32 as well
    assert pixel_log_likelihoods(x, l.bfloat16()).dtype == torch.float32


@torch.no_grad()
def test_class_pixel_log_likelihoods_match_brute_force_class_by_class(tiny_model, grid,
                                                                      brute_force):
    """Column c of class_pixel_log_likelihoods, and of class_log_likelihoods summed over the
    pixels, is the brute force on a pass with every label c. The classes are far enough apart
    that columns in another order would show."""
    model = tiny_model()
    x = grid(3, 3, 8, 8, seed=1)
    per_pixel = class_pixel_log_likelihoods(model, x, 4)                 # (3, 4, 8, 8)
    per_image = class_log_likelihoods(model, x, 4)                       # (3, 4)
    assert per_pixel.shape == (3, 4, 8, 8) and per_image.shape == (3, 4)
    expected = torch.stack([brute_force.pixel_log_likelihoods(
        x, model(x, torch.full((3,), c)), model.nr_logistic_mix) for c in range(4)], dim=1)
    torch.testing.assert_close(per_pixel.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_image.double(), expected.sum(dim=(2, 3)), rtol=1e-5, atol=1e-2)
    gaps = expected.sum(dim=(2, 3))[:, :, None] - expected.sum(dim=(2, 3))[:, None, :]
    assert gaps[:, ~torch.eye(4, dtype=torch.bool)].abs().min() > 1, "classes too alike to tell"


# ---------------------------------------------------------------------------------- temperature

@pytest.mark.parametrize("channels", [3, 1])
def test_temperature_one_draws_todays_samples_bit_for_bit(channels):
    torch.manual_seed(0)
    K = 4
    l = torch.randn(3, (10 if channels == 3 else 3) * K, 8, 8) * 2
    u_mix, u_val = torch.rand(3, K, 8, 8), torch.rand(3, channels, 8, 8)
    today = sampler_before_temperature(l, K, u_mix, u_val)
    assert torch.equal(sample_from_discretized_mix_logistic(l, K, u_mix, u_val), today)
    assert torch.equal(sample_from_discretized_mix_logistic(l, K, u_mix, u_val, 1.0), today)
    assert not torch.equal(sample_from_discretized_mix_logistic(l, K, u_mix, u_val, 0.7), today)


def test_temperature_scales_each_logistic():
    """One component, one channel, means near 0 and small scales (nothing clamps): with the same
    uniforms, a draw's distance from its mean is T times the distance at T = 1."""
    torch.manual_seed(0)
    l = torch.stack([torch.zeros(16, 16), torch.rand(16, 16) * 0.2 - 0.1,
                     torch.full((16, 16), -4.0)])[None]                  # (1, 3, 16, 16): K = 1
    u_val = torch.rand(1, 1, 16, 16)
    mean = l[:, 1:2]
    at_one = sample_from_discretized_mix_logistic(l, 1, u_val=u_val)
    for t in (0.5, 0.7, 1.3):
        at_t = sample_from_discretized_mix_logistic(l, 1, u_val=u_val, temperature=t)
        torch.testing.assert_close(at_t - mean, t * (at_one - mean), rtol=1e-5, atol=1e-6)


def test_temperature_sharpens_the_mixture_weights():
    """Weights 1/4 and 3/4 become 1 : 3^(1/T) at temperature T: at T = 1/2, 1/10 and 9/10."""
    torch.manual_seed(0)
    n = 64
    l = torch.tensor([0.0, math.log(3.0), -0.5, 0.5, MIN_LOG_SCALE, MIN_LOG_SCALE])
    x = sample_from_discretized_mix_logistic(l.view(1, 6, 1, 1).expand(4, 6, n, n), 2,
                                             temperature=0.5)
    fraction = (x > 0).double().mean().item()
    assert abs(fraction - 0.9) < 4 * math.sqrt(0.9 * 0.1 / x.numel())


def test_fast_and_straightforward_samplers_agree_at_temperature(tiny_model):
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 3])
    obs = (3, 8, 8)
    slow = sample(model, labels, obs, generator=torch.Generator().manual_seed(3), temperature=0.7)
    fast = sample_fast(model, labels, obs, generator=torch.Generator().manual_seed(3),
                       temperature=0.7)
    assert torch.equal(slow, fast)
    at_one = sample_fast(model, labels, obs, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(fast, at_one)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "0.7"])
def test_bad_temperature_is_a_clear_error(bad, tiny_model):
    model = tiny_model()
    labels, x = torch.tensor([0]), torch.zeros(1, 3, 4, 4)
    for call in (lambda: sample_fast(model, labels, (3, 4, 4), temperature=bad),
                 lambda: sample(model, labels, (3, 4, 4), temperature=bad),
                 lambda: complete(model, x, labels, 2, temperature=bad),
                 lambda: sample_from_discretized_mix_logistic(torch.zeros(1, 30, 1, 1), 3,
                                                              temperature=bad)):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()


# ----------------------------------------------------------------------------------- completion

@pytest.mark.parametrize("channels, rows, temperature", [(3, 3, 1.0), (3, 4, 0.7), (1, 5, 1.0)])
def test_complete_matches_full_forward_passes(channels, rows, temperature, tiny_model):
    """Kept rows off the 256-level grid stay exactly as given; the rows below x's kept rows hold
    other content, which neither sampler may read."""
    model = tiny_model(input_channels=channels)
    torch.manual_seed(1)
    x = torch.rand(4, channels, 8, 8) * 2 - 1
    labels = torch.tensor([3, 2, 1, 0])
    done = complete(model, x, labels, rows, torch.Generator().manual_seed(5), temperature)
    assert torch.equal(done[:, :, :rows], x[:, :, :rows])
    reference = complete_by_full_passes(model, x, labels, rows, torch.Generator().manual_seed(5),
                                        temperature)
    assert torch.equal(done, reference)
    other = complete(model, x, labels.flip(0), rows, torch.Generator().manual_seed(5), temperature)
    assert not torch.equal(done[:, :, rows:], other[:, :, rows:]), "labels must steer the rest"


@pytest.mark.parametrize("channels, rows, temperature", [(3, 0, 1.0), (3, 3, 0.7), (1, 5, 1.0)])
def test_complete_draws_the_rest_of_the_slow_samplers_image(channels, rows, temperature,
                                                            tiny_model):
    """complete(rows=k) on an image `sample` drew, its rows from k on overwritten: the first k
    rows come back bit for bit, and the cached sampler, given the same generator (so the same
    noise, drawn for the whole image up front), draws the slow sampler's rows k..H-1 again. A
    sampler that reads a row too early or too late, or takes another pixel's noise, draws
    others."""
    model = tiny_model(input_channels=channels)
    labels, obs = torch.tensor([0, 1, 2, 3]), (channels, 8, 8)
    drawn = sample(model, labels, obs, torch.Generator().manual_seed(9), temperature=temperature)
    scrambled = drawn.clone()
    scrambled[:, :, rows:] = torch.rand_like(scrambled[:, :, rows:])
    done = complete(model, scrambled, labels, rows, torch.Generator().manual_seed(9), temperature)
    assert torch.equal(done[:, :, :rows], drawn[:, :, :rows])
    assert torch.equal(done, drawn)
    other = complete(model, scrambled, labels, rows, torch.Generator().manual_seed(10),
                     temperature)
    assert not torch.equal(other[:, :, rows:], drawn[:, :, rows:]), "the noise must steer it"


def test_complete_keeping_every_row_returns_the_image(tiny_model):
    model = tiny_model()
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(complete(model, x, torch.tensor([0, 1]), 8), x)


@pytest.mark.parametrize("rows", [-1, 9, 2.0])
def test_complete_rejects_rows_out_of_range(rows, tiny_model):
    with pytest.raises(ValueError, match="rows must be an integer from 0 to the image height 8"):
        complete(tiny_model(), torch.zeros(1, 3, 8, 8), torch.tensor([0]), rows)


def test_complete_rejects_mismatched_labels_and_training_mode(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="one per image"):
        complete(model, torch.zeros(2, 3, 8, 8), torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="eval"):
        complete(model.train(), torch.zeros(1, 3, 8, 8), torch.tensor([0]), 4)
