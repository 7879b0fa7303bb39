"""Property and equivalence tests for the core of the conditional PixelCNN++: `layers.py`,
`model.py` and `utils.py`.

In the manner of minGPT's tests, each check compares the code with something computed
independently of it: causality by gradients and by perturbing the future, the mixture loss with a
float64 brute force over all 256 bins, the pixel-by-pixel sampler with one forward pass over its
own output, the batched class log-likelihoods with a per-class loop, a rebuilt checkpoint with the
model it came from. Tiny models on images of at most 16x16 keep the whole file to seconds on two
CPU cores:

    python -m pytest tests/test_core.py -q --durations=5
"""

import math

import pytest
import torch
import torch.nn.functional as F

from layers import NIN, Dropout, GatedResNet, _ShiftedConv2d, _ShiftedDeconv2d
from model import FUSION_MODES, PixelCNN
from utils import (bits_per_dim, class_log_likelihoods, discretized_mix_logistic_loss, quantize,
                   sample, sample_from_discretized_mix_logistic)

NUM_LEVELS = 256
LEVELS = torch.arange(NUM_LEVELS, dtype=torch.float64) * 2 / 255 - 1   # bin centres b_v
MIN_LOG_SCALE = -7.0                                  # the paper's clamp, part of the likelihood
CONDITIONAL = [f for f in FUSION_MODES if f != "none"]


# ------------------------------------------------------------------------------------- helpers

def peaked_mixture(modes, nr_mix, pick, raw_coeffs):
    """Mixture parameters (B, 10K, H, W) whose component `pick` dominates (logit 100, log-scale
    at the clamp) and whose sampled colours, after the linear colour dependence, sit at `modes`
    (B, 3, H, W). The other components have their means at -modes."""
    K = nr_mix
    B, _, H, W = modes.shape
    coeff = torch.tanh(raw_coeffs)
    r, g, b = modes.unbind(dim=1)
    # the sampler adds coeff * (earlier colours) to the mean, so subtract it here
    means = [r, g - coeff[0] * r, b - coeff[1] * r - coeff[2] * g]
    l = torch.zeros(B, 10 * K, H, W)
    l[:, pick] = 100.0
    for c in range(3):
        start = K + 3 * K * c
        l[:, start:start + K] = -modes[:, c:c + 1]
        l[:, start + pick] = means[c]
        l[:, start + K:start + 2 * K] = MIN_LOG_SCALE
        l[:, start + 2 * K:start + 3 * K] = raw_coeffs[c]
    return l


# --------------------------------------------------------------------------------- causality

@pytest.mark.parametrize("fusion,channels", [(f, 3) for f in FUSION_MODES] + [("gated", 1)])
def test_output_depends_only_on_earlier_pixels(fusion, channels, tiny_model):
    model = tiny_model(fusion=fusion, input_channels=channels)
    H, W = 8, 12                                      # non-square, so a transposed mask shows
    x = torch.randn(2, channels, H, W, requires_grad=True)
    labels = torch.tensor([1, 2])
    out = model(x, labels)
    raster = torch.arange(H * W).view(H, W)
    for i, j in [(0, 0), (0, 7), (3, 0), (4, 5), (7, 11)]:
        grad, = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        future = raster >= i * W + j                  # (i, j) itself and everything after it
        assert torch.all(grad[1] == 0), "output of image 0 depends on image 1"
        assert torch.all(grad[0][:, future] == 0), f"output at {(i, j)} sees the future"
        # and it does see its causal neighbours: the pixel to the left and the one above
        if j > 0:
            assert grad[0, :, i, j - 1].abs().sum() > 0
        if i > 0:
            assert grad[0, :, i - 1, j].abs().sum() > 0

    # Independently of autograd: rewrite every pixel after (i, j). The outputs up to (i, j + 1),
    # which see (i, j) at most, stay bitwise the same; every output after that changes (the
    # U-Net's receptive field covers the whole past even in this tiny model).
    i, j = 4, 5
    later = raster > i * W + j
    x2 = x.detach().clone()
    x2[:, :, later] = torch.rand(2, channels, int(later.sum())) * 2 - 1
    with torch.no_grad():
        changed = (model(x2, labels) != out).any(dim=1)                 # (B, H, W)
    assert torch.equal(changed, (raster > i * W + j + 1).expand_as(changed))


# ------------------------------------------------------------------------------------ the loss

@pytest.mark.parametrize("channels", [3, 1])
def test_loss_matches_brute_force(channels, grid, brute_force):
    torch.manual_seed(0)
    K, B, H, W = 3, 2, 8, 8
    x = grid(B, channels, H, W)
    x[:, :, 0, :4] = -1.0                             # both edge bins, in every colour
    x[:, :, 0, 4:] = 1.0
    x[1, 0, 3] = -1.0                                 # an edge first colour, free others
    per_pixel = 10 if channels == 3 else 3
    l = torch.randn(B, per_pixel * K, H, W) * 0.5
    nll = discretized_mix_logistic_loss(x, l, reduction="none")
    assert nll.shape == (B,) and nll.dtype == torch.float32
    torch.testing.assert_close(nll.double(), brute_force.nll(x, l, K), rtol=1e-4, atol=0)


@pytest.mark.parametrize("mean,log_scale", [
    (0.1, 0.3),                                       # broad: every bin has mass
    (0.3, -3.0),                                      # narrow, in the middle
    (1 / 255, MIN_LOG_SCALE),                         # a spike on a bin centre (level 128)
    (0.0, MIN_LOG_SCALE),                             # a spike on a bin boundary (127 | 128)
    (-1.0, -5.0),                                     # on the lowest level
    (1.0, -5.0),                                      # on the highest level
    (-1.3, -4.0),                                     # beyond either end
    (1.3, -4.0),
    (0.5, 6.0),                                       # so broad that inner bins are < 1e-5
    (0.3, -9.0),                                      # below the clamp: as narrow as -7
])
def test_probabilities_of_all_256_levels_sum_to_one(mean, log_scale, brute_force):
    # A single grayscale sub-pixel and one component: p(x) over the 256 values is a distribution.
    l = torch.tensor([0.0, mean, log_scale]).view(1, 3, 1, 1).expand(NUM_LEVELS, 3, 1, 1)
    x = LEVELS.float().view(NUM_LEVELS, 1, 1, 1)
    p = torch.exp(-discretized_mix_logistic_loss(x, l, reduction="none")).double()
    assert abs(p.sum().item() - 1) < 1e-5
    # and it is the brute-force categorical, mass by mass; masses below 1e-5 the loss replaces by
    # the density at the bin centre (as the reference code does), hence the absolute tolerance
    exact = brute_force.bin_masses(torch.tensor(mean, dtype=torch.float64),
                                   torch.tensor(log_scale, dtype=torch.float64))
    torch.testing.assert_close(p, exact, rtol=1e-3, atol=1e-5)


def test_loss_of_a_mixture_over_all_levels_sums_to_one():
    torch.manual_seed(0)
    l = (torch.randn(1, 3 * 4, 1, 1) * 2).expand(NUM_LEVELS, -1, -1, -1)
    x = LEVELS.float().view(NUM_LEVELS, 1, 1, 1)
    p = torch.exp(-discretized_mix_logistic_loss(x, l, reduction="none")).double()
    assert abs(p.sum().item() - 1) < 1e-5


def test_loss_reductions_and_dtypes(grid, brute_force):
    """reduction="sum" is the batch's NLL, as the reference code returns it (the brute force's,
    to float32 rounding; no mean over images or sub-pixels); a bf16 network output is computed on
    in float32."""
    torch.manual_seed(0)
    x = grid(3, 3, 8, 8)
    l = torch.randn(3, 10 * 2, 8, 8) * 0.5          # no bin thin enough for the density fallback
    total = discretized_mix_logistic_loss(x, l, reduction="sum")
    assert total.shape == () and total.dtype == torch.float32
    torch.testing.assert_close(total.double(), brute_force.nll(x, l, 2).sum(), rtol=1e-5, atol=0)
    # a bfloat16 network output is computed on in float32, exactly as its upcast
    l16 = l.bfloat16()
    loss16 = discretized_mix_logistic_loss(x, l16, reduction="none")
    assert loss16.dtype == torch.float32
    assert torch.equal(loss16, discretized_mix_logistic_loss(x, l16.float(), reduction="none"))
    with pytest.raises(ValueError, match="reduction"):
        discretized_mix_logistic_loss(x, l, reduction="mean")


def test_bits_per_dim_of_uniform_categorical_is_eight():
    num_dims = 3 * 32 * 32
    uniform_nll = num_dims * math.log(NUM_LEVELS)     # -log(1/256) per sub-pixel
    assert bits_per_dim(uniform_nll, num_dims) == 8.0
    assert torch.equal(bits_per_dim(torch.full((4,), uniform_nll, dtype=torch.float64), num_dims),
                       torch.full((4,), 8.0, dtype=torch.float64))


# ------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("channels", [3, 1])
def test_sampler_shape_and_range(channels):
    torch.manual_seed(0)
    K = 3
    l = torch.randn(2, (10 if channels == 3 else 3) * K, 8, 12) * 3   # wide enough to clamp
    x = sample_from_discretized_mix_logistic(l, K)
    assert x.shape == (2, channels, 8, 12)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        sample_from_discretized_mix_logistic(l, K + 1)


def test_sampler_returns_the_mode_of_a_peaked_mixture(grid):
    torch.manual_seed(0)
    K, B, H, W = 3, 2, 8, 8
    modes = grid(B, 3, H, W)
    # With log-scale -7 a logistic draw lands within 0.0105 (u clamped to [1e-5, 1 - 1e-5]) of its
    # mean, so within one level of it once quantised.
    l = peaked_mixture(modes, K, pick=1, raw_coeffs=torch.zeros(3))
    x = sample_from_discretized_mix_logistic(l, K)
    assert (quantize(x) - modes).abs().max() <= 2 / 255 + 1e-6
    # u = 1/2 is the median of every logistic: then the sample is the mode itself, and it must
    # carry the colour dependence (g on r, b on r and g) the way the loss reads it.
    l = peaked_mixture(modes, K, pick=2, raw_coeffs=torch.tensor([0.7, -1.2, 0.4]))
    x = sample_from_discretized_mix_logistic(l, K, u_val=torch.full((B, 3, H, W), 0.5))
    torch.testing.assert_close(x, modes, rtol=0, atol=1e-5)


def test_sampler_is_deterministic_given_its_uniforms():
    torch.manual_seed(0)
    K = 3
    l = torch.randn(2, 10 * K, 8, 8)
    u_mix, u_val = torch.rand(2, K, 8, 8), torch.rand(2, 3, 8, 8)
    first = sample_from_discretized_mix_logistic(l, K, u_mix, u_val)
    again = sample_from_discretized_mix_logistic(l, K, u_mix.clone(), u_val.clone())
    assert torch.equal(first, again)
    assert not torch.equal(first, sample_from_discretized_mix_logistic(l, K, u_mix, 1 - u_val))


def test_sampler_picks_components_by_their_weights():
    # Two well-separated grayscale spikes with weights 1/4 and 3/4: count which one each pixel got.
    torch.manual_seed(0)
    n = 64
    l = torch.tensor([0.0, math.log(3.0), -0.5, 0.5, MIN_LOG_SCALE, MIN_LOG_SCALE])
    x = sample_from_discretized_mix_logistic(l.view(1, 6, 1, 1).expand(4, 6, n, n), 2)
    fraction = (x > 0).double().mean().item()
    assert abs(fraction - 0.75) < 4 * math.sqrt(0.75 * 0.25 / x.numel())


@pytest.mark.parametrize("channels", [3, 1])
def test_autoregressive_sample(channels, tiny_model):
    model = tiny_model(fusion="gated", input_channels=channels)
    labels = torch.tensor([0, 3])
    obs = (channels, 8, 8)
    x = sample(model, labels, obs=obs, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, *obs)
    assert x.min() >= -1 and x.max() <= 1
    levels = (x + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    again = sample(model, labels, obs=obs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert x.unique().numel() > 10                    # not stuck on one value

    # Fast path: by causality one forward pass over the finished image gives every pixel the
    # same mixture it was drawn from, so the same uniforms (drawn up front: u_mix, then u_val)
    # redraw the whole image at once.
    g = torch.Generator().manual_seed(0)
    u_mix = torch.rand(2, model.nr_logistic_mix, 8, 8, generator=g)
    u_val = torch.rand(2, channels, 8, 8, generator=g)
    with torch.no_grad():
        l = model(x, labels)
    redrawn = quantize(sample_from_discretized_mix_logistic(l, model.nr_logistic_mix, u_mix, u_val))
    assert torch.equal(redrawn, x)


# ---------------------------------------------------------------------------------- conditioning

@pytest.mark.parametrize("fusion", CONDITIONAL)
def test_labels_change_the_output(fusion, tiny_model, grid):
    model = tiny_model(fusion=fusion)
    x = grid(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor([0, 1]))
        b = model(x, torch.tensor([2, 1]))
    assert (a[0] - b[0]).abs().max() > 1e-3
    assert torch.equal(a[1], b[1])                    # image 1 kept its label


def test_unconditional_model_ignores_labels(tiny_model, grid):
    model = tiny_model(fusion="none")
    x = grid(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([0, 1])), model(x, torch.tensor([3, 2])))


def test_film_starts_as_the_identity(tiny_model, grid):
    model = tiny_model(fusion="film", perturb=False)
    x = grid(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([0, 1])), model(x, torch.tensor([3, 2])))


# -------------------------------------------------------------------------------------- batching

def test_image_alone_equals_image_in_batch(tiny_model, grid):
    model = tiny_model(fusion="joint")
    x = grid(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        batched = model(x, labels)
        alone = model(x[2:3], labels[2:3])
    torch.testing.assert_close(alone, batched[2:3], rtol=0, atol=1e-5)


def test_shapes_in_sequence_leave_no_state(tiny_model, grid):
    model = tiny_model(fusion="joint", nr_logistic_mix=3)
    shapes = [(1, 8, 12), (3, 12, 8), (2, 16, 4), (1, 8, 12)]
    outputs = []
    with torch.no_grad():
        for seed, (b, h, w) in enumerate(shapes):
            x = grid(b, 3, h, w, seed=seed % 3)   # the first and last input are the same
            out = model(x, torch.arange(b) % 4)
            assert out.shape == (b, 30, h, w)
            outputs.append(out)
    assert torch.equal(outputs[0], outputs[-1])


def test_class_log_likelihoods_match_per_class_loop(tiny_model, grid, class_loop):
    num_classes = 3
    model = tiny_model(fusion="gated", num_classes=num_classes)
    x = grid(2, 3, 8, 8)
    loop = class_loop(model, x)                                          # (B, num_classes)
    with torch.no_grad():
        ll = class_log_likelihoods(model, x, num_classes)
    columns = loop[:, :, None] - loop[:, None, :]                        # (B, classes, classes)
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    assert columns[:, off_diagonal].abs().min() > 1e-2   # classes differ, so a mix-up shows
    assert (loop[0] - loop[1]).abs().min() > 1e-2         # and so do the images
    assert ll.shape == (2, num_classes) and ll.dtype == torch.float32
    torch.testing.assert_close(ll.double(), loop, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("fusion", sorted(FUSION_MODES))
def test_every_class_at_once_equals_repeated_images(fusion, tiny_model, grid):
    """forward(x, K labels per image) shares the work before the label enters between the
    classes, and gives what the repeated images give, in values and in gradients."""
    model = tiny_model(fusion=fusion, num_classes=3)
    x = grid(2, 3, 8, 8)
    labels = torch.arange(3).repeat_interleave(2)                           # (6,) class-major
    batches = []
    hook = model.u_init.register_forward_hook(lambda m, inp, out: batches.append(inp[0].shape[0]))
    shared = model(x, labels)
    hook.remove()
    repeated = model(x.repeat(3, 1, 1, 1), labels)
    assert batches == [2]                                   # the first layer saw each image once
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
             for out in (model(x, labels), model(x.repeat(3, 1, 1, 1), labels))]
    for g_shared, g_repeated in zip(*grads):
        if g_repeated is not None:
            torch.testing.assert_close(g_shared, g_repeated, rtol=1e-4, atol=1e-4)


def test_gated_last_runs_every_layer_before_the_last_stage_once_per_image(tiny_model, grid):
    """With fusion gated_last, only the blocks of the down pass's last stage (and the output
    layer) see the K image-label pairs of each image; every layer before them sees each image
    once, and only those blocks take the label."""
    model = tiny_model(fusion="gated_last", num_classes=3)
    x = grid(2, 3, 8, 8)
    rows = {}                                   # layer name -> rows of its output
    layers = {name: module for name, module in model.named_modules()
              if name.count(".") <= 2 and isinstance(module, (GatedResNet, NIN, _ShiftedConv2d,
                                                              _ShiftedDeconv2d))}
    hooks = [module.register_forward_hook(
        lambda m, inp, out, name=name: rows.update({name: out.shape[0]}))
        for name, module in layers.items()]
    model(x, torch.arange(3).repeat_interleave(2))
    for hook in hooks:
        hook.remove()
    last_stage = {f"{s}.2.{i}" for s in ("down_u", "down_ul") for i in range(len(model.down_u[2]))}
    assert rows.keys() == layers.keys() and len(rows) == 3 + 6 + 4 + 10 + 4 + 1
    assert {name for name, n in rows.items() if n == 6} == last_stage | {"nin_out"}
    assert all(n == 2 for name, n in rows.items() if name not in last_stage | {"nin_out"})
    conditioned = {name.removesuffix(".cond_proj") for name, _ in model.named_modules()
                   if name.endswith("cond_proj")}
    assert conditioned == last_stage


def test_labels_not_a_multiple_of_the_images_is_an_error(tiny_model, grid):
    model = tiny_model(num_classes=3)
    with pytest.raises(ValueError, match="multiple of the images"):
        model(grid(2, 3, 8, 8), torch.arange(3))


# ----------------------------------------------------------------------------------- checkpoints

def test_from_state_dict_rebuilds_the_model(tmp_path, tiny_model, grid):
    model = tiny_model(fusion="film", nr_filters=12, nr_logistic_mix=3, embed_dim=6, dropout=0.2)
    x, labels = grid(2, 3, 8, 8), torch.tensor([0, 3])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    for state in (model.state_dict(), torch.load(path, weights_only=True)):
        rebuilt = PixelCNN.from_state_dict(state).eval()
        assert rebuilt.config == model.config
        with torch.no_grad():
            assert torch.equal(rebuilt(x, labels), model(x, labels))


@pytest.mark.parametrize("change", [dict(nr_filters=12), dict(fusion="film"),
                                    dict(input_channels=1), dict(nr_logistic_mix=3),
                                    dict(num_classes=5)])
def test_loading_another_architecture_names_both(change, tiny_model):
    saved = tiny_model(perturb=False)
    other = tiny_model(perturb=False, **change)
    (key, value), = change.items()
    with pytest.raises(ValueError) as error:
        other.load_state_dict(saved.state_dict())
    message = str(error.value)
    assert f"{key}={saved.config[key]!r}" in message and f"{key}={value!r}" in message


def test_dropout_is_not_architecture(tiny_model, grid):
    saved = tiny_model(dropout=0.5)
    other = tiny_model(seed=1, perturb=False, dropout=0.0)
    other.load_state_dict(saved.state_dict())
    x = grid(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(other(x, torch.tensor([2])), saved(x, torch.tensor([2])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_draws_what_f_dropout_draws(p, dtype):
    """The CPU mask (four 16-bit uniforms per 64-bit draw) against F.dropout's distribution: each
    of the four lanes of a draw drops at rate p, and neighbours (3 in 4 within a draw, 1 in 4
    across) both drop at rate p^2, within 5 standard errors; the kept elements are x / (1 - p) to
    the dtype's rounding, as F.dropout's are where both keep; the gradient is the mask; the same
    seed draws the same mask."""
    n = 4 * 100_000 + 3                                  # not a multiple of the four lanes
    x = (torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    x.requires_grad_()
    layer = Dropout(p).train()
    torch.manual_seed(0)
    out = layer(x)
    dropped = out == 0
    lanes = dropped[:n // 4 * 4].view(-1, 4).double().mean(dim=0)          # (4,)
    assert ((lanes - p).abs() < 5 * math.sqrt(p * (1 - p) / (n // 4))).all(), lanes
    both = (dropped[:-1] & dropped[1:]).double().mean()
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n - 1)), both
    reference = F.dropout(x.detach(), p)                 # F.dropout's scale of the kept elements
    tol = dict(rtol=1e-2, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=0)
    torch.testing.assert_close(out[~dropped], (x / (1 - p))[~dropped].detach(), **tol)
    both_kept = ~dropped & (reference != 0)
    torch.testing.assert_close(out[both_kept].detach(), reference[both_kept], **tol)
    out.sum().backward()
    assert torch.equal(x.grad == 0, dropped)
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], 1 / (1 - p)), **tol)
    torch.manual_seed(0)
    assert torch.equal(layer(x.detach()), out.detach())
    assert layer(x.detach().view(1, -1)).shape == (1, n)
    assert torch.equal(layer.eval()(x.detach()), x.detach())


@pytest.mark.parametrize("bad", [dict(fusion="concat"), dict(input_channels=2)])
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, **bad)


def test_from_state_dict_needs_a_config(tiny_model):
    state = tiny_model(perturb=False).state_dict()
    del state["_extra_state"]
    with pytest.raises(ValueError, match="config"):
        PixelCNN.from_state_dict(state)


# ----------------------------------------------------------------------------- mixed precision

def test_bfloat16_autocast_close_to_float32(tiny_model, grid):
    model = tiny_model(fusion="joint")
    x, labels = grid(2, 3, 8, 8), torch.tensor([1, 2])
    hidden = []
    model.up_ul[0][0].register_forward_hook(lambda module, args, out: hidden.append(out.dtype))
    with torch.no_grad():
        l_fp32 = model(x, labels)
        reference = discretized_mix_logistic_loss(x, l_fp32, reduction="none")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l = model(x, labels)
            loss = discretized_mix_logistic_loss(x, l, reduction="none")
    assert hidden == [torch.float32, torch.bfloat16]  # autocast really took over the convolutions
    assert l.dtype == torch.float32                   # ... but not the output layer
    assert not torch.equal(l, l_fp32)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)


def test_output_layer_runs_in_float32_under_autocast(tiny_model):
    """PixelCNN.mixture, the output layer of the full and of the cached pass, on bf16 features
    under autocast: the output layer applied to the same features in float32, autocast off."""
    model = tiny_model()
    ul = torch.randn(2, model.config["nr_filters"], 4, 4).bfloat16()
    with torch.no_grad():
        expected = model.nin_out(torch.nn.functional.elu(ul.float()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.nin_out(ul).dtype == torch.bfloat16      # what autocast alone would do
            out = model.mixture(ul)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
