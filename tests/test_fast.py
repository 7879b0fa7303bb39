"""The fast paths equal the straightforward ones: the cached row forward against the full forward
(all rows at once, and teacher-forced pixel by pixel), and sample_fast against sample with the same
random draws."""

import pytest
import torch

from model import FUSION_MODES, PixelCNN, RowCache
from utils import sample, sample_fast


def tiny_model(fusion="gated", input_channels=3, nr_resnet=2, seed=0):
    """A small eval-mode model with perturbed weights, so every path carries signal."""
    torch.manual_seed(seed)
    model = PixelCNN(nr_resnet=nr_resnet, nr_filters=8, nr_logistic_mix=3,
                     input_channels=input_channels, fusion=fusion).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("fusion", sorted(FUSION_MODES))
@torch.no_grad()
def test_all_rows_at_once_equal_forward(fusion):
    model = tiny_model(fusion)
    x, labels = torch.rand(3, 3, 12, 16) * 2 - 1, torch.tensor([0, 2, 3])
    rows = model.forward_rows(RowCache(model, x, labels), 0, 11)
    torch.testing.assert_close(rows, model(x, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion, channels", [("gated", 3), ("joint", 3), ("film", 3), ("none", 3),
                                              ("gated", 1)])
@torch.no_grad()
def test_teacher_forced_rows_match_full_forward(fusion, channels):
    """Fed a real image pixel by pixel on the sampler's schedule, the cached path's output at every
    position equals the full forward pass on the finished image there."""
    model = tiny_model(fusion, channels)
    H, W = 12, 8
    x, labels = torch.rand(2, channels, H, W) * 2 - 1, torch.tensor([1, 3])
    full = model(x, labels)                                                 # (B, out, H, W)
    cache = RowCache(model, torch.zeros_like(x), labels)
    for i in range(H):
        for j in range(W):
            lo = i - 1 if (j == 0 and i > 0) else i
            out = model.forward_rows(cache, lo, i, u_cached=j > 0)[:, :, -1, j]   # (B, out)
            torch.testing.assert_close(out, full[:, :, i, j], atol=1e-4, rtol=1e-4)
            cache.x[:, :channels, i, j] = x[:, :, i, j]


@pytest.mark.parametrize("channels", [3, 1])
def test_fast_sampler_draws_the_same_samples(channels):
    model = tiny_model("joint", channels, nr_resnet=1)
    labels = torch.tensor([0, 1, 2, 3])
    obs = (channels, 8, 8)
    slow = sample(model, labels, obs, generator=torch.Generator().manual_seed(7))
    fast = sample_fast(model, labels, obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(slow, fast)
    other = sample_fast(model, labels, obs, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(fast, other)


def test_fast_sampler_refuses_training_mode():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="eval"):
        sample_fast(model, torch.tensor([0]), (3, 4, 4))
