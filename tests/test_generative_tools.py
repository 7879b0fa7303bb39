"""The generative classifier's tools in `utils.py`, each against an independent computation:
per-pixel log-likelihoods against a float64 brute force over the 256 bins and the per-class
pixel log-likelihoods against a loop over classes. Tiny eval-mode models on 8x8 images; the file
takes a few seconds:

    python -m pytest tests/test_generative_tools.py -q --durations=5
"""

import pytest
import torch

from model import PixelCNN
from utils import (class_log_likelihoods, class_pixel_log_likelihoods,
                   discretized_mix_logistic_loss, pixel_log_likelihoods)

NUM_LEVELS = 256
LEVELS = torch.arange(NUM_LEVELS, dtype=torch.float64) * 2 / 255 - 1   # bin centres
HALF_BIN = 1 / 255
MIN_LOG_SCALE = -7.0                  # the paper's clamp, part of the likelihood


# ------------------------------------------------------------------------------------- helpers

def tiny_model(channels=3, seed=0):
    """An eval-mode PixelCNN with every parameter moved off its initialisation."""
    torch.manual_seed(seed)
    model = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=3, input_channels=channels).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def grid_images(b, c, h, w, seed=0):
    """Random images on the 256-level grid, float32."""
    v = torch.randint(0, NUM_LEVELS, (b, c, h, w), generator=torch.Generator().manual_seed(seed))
    return (v.double() * 2 / 255 - 1).float()


def brute_force_pixel_log_likelihoods(x, l, nr_mix):
    """log p(pixel) of every pixel from the 256-way categorical of each sub-pixel, float64:
    (B, C, H, W), (B, 10K or 3K, H, W) -> (B, H, W).

    l is laid out as [K logits | per colour: K means, K log-scales (, K raw coefficients)]; the
    coefficients of the red, green and blue blocks are c0, c1, c2 in mean_g += c0 r,
    mean_b += c1 r + c2 g. Bin v spans b_v +- 1/255, except that bin 0 reaches to -inf and bin
    255 to +inf.
    """
    x, l, K = x.double(), l.double(), nr_mix
    C = x.shape[1]
    per_colour = 3 * K if C == 3 else 2 * K
    blocks = [l[:, K + per_colour * c:K + per_colour * (c + 1)] for c in range(C)]
    level = torch.round((x + 1) * 127.5).long()                          # (B, C, H, W)
    likelihood = torch.softmax(l[:, :K], dim=1)                          # (B, K, H, W)
    for c, block in enumerate(blocks):
        mean = block[:, :K]                                              # (B, K, H, W)
        if c == 1:
            mean = mean + torch.tanh(blocks[0][:, 2 * K:]) * x[:, :1]
        if c == 2:
            mean = (mean + torch.tanh(blocks[1][:, 2 * K:]) * x[:, :1]
                    + torch.tanh(blocks[2][:, 2 * K:]) * x[:, 1:2])
        scale = block[:, K:2 * K].clamp(min=MIN_LOG_SCALE).exp()[..., None]
        upper = torch.sigmoid((LEVELS + HALF_BIN - mean[..., None]) / scale)
        lower = torch.sigmoid((LEVELS - HALF_BIN - mean[..., None]) / scale)
        upper[..., -1], lower[..., 0] = 1.0, 0.0
        masses = upper - lower                                           # (B, K, H, W, 256)
        observed = masses.gather(-1, level[:, c:c + 1].expand_as(mean)[..., None])[..., 0]
        assert observed.min() > 1e-5, "stay off the loss's density fallback for thin bins"
        likelihood = likelihood * observed
    return likelihood.sum(dim=1).log()                                   # (B, H, W)


# ---------------------------------------------------------------------- per-pixel likelihoods

@pytest.mark.parametrize("channels", [3, 1])
def test_pixel_log_likelihoods_match_brute_force_and_sum_to_the_loss(channels):
    torch.manual_seed(0)
    K, B, H, W = 3, 2, 4, 8
    l = torch.randn(B, (10 if channels == 3 else 3) * K, H, W) * 0.5
    x = grid_images(B, channels, H, W)
    x[:, :, 0, :4], x[:, :, 0, 4:] = -1.0, 1.0                           # both edge bins
    per_pixel = pixel_log_likelihoods(x, l)
    assert per_pixel.shape == (B, H, W) and per_pixel.dtype == torch.float32
    torch.testing.assert_close(per_pixel.double(), brute_force_pixel_log_likelihoods(x, l, K),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_pixel.sum(dim=(1, 2)),
                               -discretized_mix_logistic_loss(x, l, reduction="none"))
    # bf16 network output is computed in float32 as well
    assert pixel_log_likelihoods(x, l.bfloat16()).dtype == torch.float32


@torch.no_grad()
def test_class_pixel_log_likelihoods_match_a_loop_over_classes():
    model = tiny_model()
    x = grid_images(3, 3, 8, 8, seed=1)
    per_pixel = class_pixel_log_likelihoods(model, x, 4)                 # (3, 4, 8, 8)
    assert per_pixel.shape == (3, 4, 8, 8)
    for c in range(4):
        expected = pixel_log_likelihoods(x, model(x, torch.full((3,), c)))
        torch.testing.assert_close(per_pixel[:, c], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(class_log_likelihoods(model, x, 4), per_pixel.sum(dim=(2, 3)),
                               rtol=1e-5, atol=1e-3)
