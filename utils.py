"""The discretized logistic mixture likelihood of PixelCNN++, its sampler, bits/dim and the class
log-likelihoods of the Bayes classifier.

Images are in [-1, 1] on the grid of 256 levels {2v/255 - 1}. Each sub-pixel's probability is the
mass a logistic puts on its bin of width 2/255, with the bins at the two ends stretched to
infinity (Salimans et al., 2017, eq. 2). Colours depend linearly on the colours before them in the
same pixel: mean_g += c0 * r, mean_b += c1 * r + c2 * g.

One computation, `pixel_log_likelihoods`, serves training (mean bits/dim over a batch),
classification (argmax over classes of log p(x | c)) and the per-pixel explanation maps:
`discretized_mix_logistic_loss(..., reduction="none")`, the per-image NLL, is its negated sum.
"""

import functools
import math
import sys
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm import tqdm

HALF_BIN = 1.0 / 255.0      # half the width of one of the 256 bins on [-1, 1]
EDGE = 0.999                # x below -EDGE is level 0, above EDGE is level 255
MIN_LOG_SCALE = -7.0        # the reference clamps log-scales here to keep the CDFs finite
MIN_CDF_DELTA = 1e-5        # below this bin mass, use the density at the bin centre instead
UNIFORM_EPS = 1e-5          # keep uniform noise off 0 and 1 so log(u) and log(1 - u) stay finite


def _log_bin_probs(x, means, log_scales):
    """log P(x) of each sub-pixel under each logistic component, float32.

    x: (B, C, 1, H, W); means, log_scales: (B, C, K, H, W). Returns (B, C, K, H, W).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + HALF_BIN)
    min_in = inv_stdv * (centered - HALF_BIN)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)             # log sigmoid(plus_in): level 0
    log_one_minus_cdf_min = -F.softplus(min_in)              # log (1 - sigmoid(min_in)): level 255
    mid_in = inv_stdv * centered
    # log density at the bin centre times the bin width 2/255, for bins too thin to difference
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in) - math.log(127.5)
    log_mid = torch.where(cdf_delta > MIN_CDF_DELTA,
                          torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    return torch.where(x < -EDGE, log_cdf_plus,
                       torch.where(x > EDGE, log_one_minus_cdf_min, log_mid))


def unpack_mixture(l, nr_mix, channels):
    """Split network output into mixture parameters, float32.

    l: (B, 10K, H, W) for RGB or (B, 3K, H, W) for one channel. Returns
    logit_probs (B, K, H, W), means (B, C, K, H, W), log_scales (B, C, K, H, W) clamped at
    MIN_LOG_SCALE, and coeffs (B, 3, K, H, W) in (-1, 1) for RGB, None for one channel.
    """
    l = l.float()
    B, _, H, W = l.shape
    logit_probs = l[:, :nr_mix]                                          # (B, K, H, W)
    per_channel = 3 if channels == 3 else 2
    p = l[:, nr_mix:].reshape(B, channels, per_channel * nr_mix, H, W)   # (B, C, 3K or 2K, H, W)
    means = p[:, :, :nr_mix]                                             # (B, C, K, H, W)
    log_scales = p[:, :, nr_mix:2 * nr_mix].clamp(min=MIN_LOG_SCALE)
    coeffs = torch.tanh(p[:, :, 2 * nr_mix:]) if channels == 3 else None
    return logit_probs, means, log_scales, coeffs


def pixel_log_likelihoods(x, l):
    """log p(x_ij | x_<ij, c) in nats of every pixel of x, its channels together, float32.

    x: (B, C, H, W) in [-1, 1], C = 3 or 1; l: (B, 10K or 3K, H, W), any float dtype (computed in
    float32). Returns (B, H, W); its sum over each image is log p(x | c).
    """
    B, C, H, W = x.shape
    per_mix = 10 if C == 3 else 3
    assert l.shape[0] == B and l.shape[2:] == (H, W) and l.shape[1] % per_mix == 0, (x.shape, l.shape)
    nr_mix = l.shape[1] // per_mix
    logit_probs, means, log_scales, coeffs = unpack_mixture(l, nr_mix, C)
    x = x.float().unsqueeze(2)                                           # (B, C, 1, H, W)
    if C == 3:
        r, g = x[:, 0], x[:, 1]                                          # (B, 1, H, W)
        means = torch.stack([means[:, 0],
                             means[:, 1] + coeffs[:, 0] * r,
                             means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g], dim=1)
    log_probs = _log_bin_probs(x, means, log_scales).sum(dim=1)         # (B, K, H, W)
    log_probs = log_probs + F.log_softmax(logit_probs, dim=1)
    return torch.logsumexp(log_probs, dim=1)                             # (B, H, W)


def discretized_mix_logistic_loss(x, l, reduction="sum"):
    """Negative log-likelihood in nats of images x under the mixture l: the negated sum of
    `pixel_log_likelihoods` over each image.

    x: (B, C, H, W) in [-1, 1], C = 3 or 1; l: (B, 10K or 3K, H, W), any float dtype (computed in
    float32). reduction="sum": the batch total, as the reference code returns; "none": the
    per-image NLL, shape (B,).
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    nll = -pixel_log_likelihoods(x, l).sum(dim=(1, 2))                  # (B,)
    return nll.sum() if reduction == "sum" else nll


def bits_per_dim(nll_nats, num_dims):
    """Convert an NLL in nats over `num_dims` sub-pixels to bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))


def check_temperature(temperature):
    """Raise ValueError unless `temperature` is a finite number above 0."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def sample_from_discretized_mix_logistic(l, nr_mix, u_mix=None, u_val=None, temperature=1.0):
    """Draw one image from the mixture l: (B, 10K or 3K, H, W) -> (B, C, H, W) in [-1, 1].

    u_mix (B, K, H, W) and u_val (B, C, H, W) are optional uniform(0, 1) draws; pass the same ones
    to get the same sample (the fast and the straightforward sampler share draws this way).
    temperature T sharpens (T < 1) or flattens (T > 1) the mixture: the mixture logits are divided
    by T and every logistic scale is multiplied by T. At T = 1 both are exact no-ops.
    """
    check_temperature(temperature)
    B, n, H, W = l.shape
    if n not in (10 * nr_mix, 3 * nr_mix):
        raise ValueError(f"{n} channels is not a mixture of {nr_mix} components")
    channels = 3 if n == 10 * nr_mix else 1
    logit_probs, means, log_scales, coeffs = unpack_mixture(l, nr_mix, channels)
    if u_mix is None:
        u_mix = torch.rand_like(logit_probs)
    if u_val is None:
        u_val = torch.rand(B, channels, H, W, device=l.device)
    # Gumbel-max picks component k with probability softmax(logit_probs / T)_k.
    gumbel = -torch.log(-torch.log(u_mix.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)))
    pick = F.one_hot((logit_probs / temperature + gumbel).argmax(dim=1), nr_mix)   # (B, H, W, K)
    pick = pick.permute(0, 3, 1, 2).unsqueeze(1).float()                 # (B, 1, K, H, W)
    mean = (means * pick).sum(dim=2)                                     # (B, C, H, W)
    scale = temperature * torch.exp((log_scales * pick).sum(dim=2))      # (B, C, H, W)
    u = u_val.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
    x = mean + scale * (torch.log(u) - torch.log1p(-u))                  # logistic inverse CDF
    if channels == 1:
        return x.clamp(-1, 1)
    coeff = (coeffs * pick).sum(dim=2)                                   # (B, 3, H, W)
    r = x[:, 0].clamp(-1, 1)
    g = (x[:, 1] + coeff[:, 0] * r).clamp(-1, 1)
    b = (x[:, 2] + coeff[:, 1] * r + coeff[:, 2] * g).clamp(-1, 1)
    return torch.stack([r, g, b], dim=1)


def quantize(x):
    """Snap values in [-1, 1] to the nearest of the 256 levels the model was trained on."""
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def _sampling_noise(B, nr_mix, obs, generator, device):
    """All uniform draws of one sampling run, made up front: u_mix (B, K, H, W), u_val (B, C, H, W).

    Any sampler that consumes them pixel by pixel produces the same images."""
    C, H, W = obs
    u_mix = torch.rand(B, nr_mix, H, W, generator=generator, device=device)
    u_val = torch.rand(B, C, H, W, generator=generator, device=device)
    return u_mix, u_val


def _sample_pixel(l, nr_mix, u_mix, u_val, temperature):
    """Draw a pixel from its mixture parameters l (B, 10K, 1, 1) and its uniform draws u_mix
    (B, K, 1, 1) and u_val (B, C, 1, 1), on the 256-level grid."""
    pixel = sample_from_discretized_mix_logistic(l, nr_mix, u_mix, u_val, temperature)
    return quantize(pixel)                                               # (B, C, 1, 1)


def _pixel_noise(u, i, j):
    """Pixel (i, j) of the draws u (B, K, H, W): (B, K, 1, 1)."""
    return u[:, :, i:i + 1, j:j + 1]


def progress_bar(iterable, desc, enabled=True):
    """A tqdm progress bar on stderr that ends with a newline when it closes (leave=True), so
    what is printed after it starts a line of its own: with stdout and stderr in one log
    (`> log 2>&1`), a cleared bar would leave a carriage return, not a newline, before it."""
    return tqdm(iterable, desc=desc, disable=not enabled, leave=True)


def line_buffered_stdout():
    """Flush stdout at every newline, as on a terminal: in one log with stderr, each printed line
    then lands between the progress bars where it happened, not in a block at exit."""
    sys.stdout.reconfigure(line_buffering=True)


@torch.inference_mode()
def sample(model, labels, obs=(3, 32, 32), generator=None, progress=False, temperature=1.0):
    """Class-conditional autoregressive sampling, the straightforward way: one full forward pass
    per pixel, in raster order. labels: int64 (B,). Returns (B, *obs) in [-1, 1] on the 256-level
    grid. The reference for `sample_fast`; call model.eval() first, or dropout stays on.
    temperature: see `sample_from_discretized_mix_logistic`.
    """
    check_temperature(temperature)
    C, H, W = obs
    nr_mix = model.nr_logistic_mix
    u_mix, u_val = _sampling_noise(labels.shape[0], nr_mix, obs, generator, labels.device)
    x = torch.zeros(labels.shape[0], C, H, W, device=labels.device)
    for i in progress_bar(range(H), "sampling rows", progress):
        for j in range(W):
            l = model(x, labels)[:, :, i:i + 1, j:j + 1]                 # (B, 10K, 1, 1)
            x[:, :, i:i + 1, j:j + 1] = _sample_pixel(l, nr_mix, _pixel_noise(u_mix, i, j),
                                                      _pixel_noise(u_val, i, j), temperature)
    return x


def _sample_cached(model, x, labels, first_row, u_mix, u_val, temperature, progress,
                   step="slice"):
    """Keep rows 0..first_row-1 of x (B, C, H, W) and sample rows first_row..H-1 in raster order
    with the cached region pass; returns a new tensor (x is not written). What x holds from
    first_row on is never read: the cache starts those rows at zero, as `sample_fast` starts its
    canvas, so first_row = 0 draws exactly what `sample_fast` draws from the same noise.

    Instead of a full forward pass per pixel, every layer computes only the positions the new pixel
    can change, reading the rest from a cache (`PixelCNN.forward_region`, after Ramachandran et
    al., 2017, "Fast Generation for Convolutional Autoregressive Models"): the kept rows once, as
    one band through both streams; then the `u` stream, which sees only the rows above, once per
    row; the `ul` stream once per pixel at full resolution, and at 1/2 and 1/4 resolution only on
    the pixels where a coarser position gets its last input.

    step: "slice", forward_region's steps, the position sliced by Python ints (the reference);
    "indexed", the same steps as `PixelCNN.forward_step` takes them, the position in index tensors
    on the device; "graph", those steps replayed from CUDA graphs (`_sample_indexed`).
    """
    if model.training:
        raise ValueError("the cached sampler needs model.eval(): its region pass has no dropout")
    if step != "slice":
        return _sample_indexed(model, x, labels, first_row, u_mix, u_val, temperature, progress,
                               capture=step == "graph")
    from model import LayerCache   # utils stays importable without the model module's layers
    C, H, W = x.shape[1:]
    nr_mix = model.nr_logistic_mix
    cache = LayerCache(model, x, labels)
    cache.x[:, :C, first_row:] = 0
    with parametrize.cached():   # the weight-norm weights, computed once instead of per step
        if first_row > 0:
            model.forward_region(cache, (0, first_row - 1), (0, W - 1))
        for i in progress_bar(range(first_row, H), "sampling rows", progress):
            model.forward_region(cache, (i, i), (0, W - 1), streams=("u",))
            for j in range(W):
                l = model.forward_region(cache, (i, i), (j, j), streams=("ul",))   # (B, 10K, 1, 1)
                cache.x[:, :C, i:i + 1, j:j + 1] = _sample_pixel(
                    l, nr_mix, _pixel_noise(u_mix, i, j), _pixel_noise(u_val, i, j), temperature)
    return cache.x[:, :C].clone()


def _sample_indexed(model, x, labels, first_row, u_mix, u_val, temperature, progress, capture):
    """`_sample_cached` with the steps of `PixelCNN.forward_step`, whose position is in index
    tensors on the device (`model.IndexedCache`): the same samples from the same draws. With
    capture (CUDA only), each of the twelve kinds of step (`model.position_class` of the row, and
    of the column for a pixel) runs eagerly the first time, is then captured in a CUDA graph, and
    every later step of its kind replays that graph (`_StepGraphs`), so that a step costs the
    GPU's work rather than the launches of its few hundred small kernels. Graphs per kind rather
    than per position (forward_step says why a step can be replayed elsewhere): 12 captures, each
    the cost of an eager step, instead of H * (W + 1), each replayed up to H * W / 4 times."""
    from model import IndexedCache, position_class
    C, H, W = x.shape[1:]
    nr_mix = model.nr_logistic_mix
    cache = IndexedCache(model, x, labels)
    cache.x[:, :C, first_row:] = 0
    steps = _StepGraphs(capture)

    def pixel_step(ci, cj):
        l = model.forward_step(cache, ci, cj)                            # (B, 10K, 1, 1)
        pixel = _sample_pixel(l, nr_mix, cache.noise(u_mix), cache.noise(u_val), temperature)
        cache.put("x", 1, pixel, row=False)

    with parametrize.cached():   # the weight-norm weights, computed once; the graphs read them
        if first_row > 0:
            model.forward_region(cache, (0, first_row - 1), (0, W - 1))
        for i in progress_bar(range(first_row, H), "sampling rows", progress):
            ci = position_class(i)
            cache.move_to(i)
            steps(("row", ci), functools.partial(model.forward_step, cache, ci))
            for j in range(W):
                cj = position_class(j)
                cache.move_to(i, j)
                steps(("pixel", ci, cj), functools.partial(pixel_step, ci, cj))
    return cache.x[:, :C].clone()


class _StepGraphs:
    """Runs the cached sampler's steps by kind: a kind's first step eagerly (it also makes every
    buffer the kind writes, which a capture must find in place), then, with capture on, captures
    it in a CUDA graph and replays the graph for every later step of the kind. A failed capture
    warns once and leaves every later step eager; the eager step is the same computation."""

    def __init__(self, capture):
        self.capture, self.replays = capture, {}

    def __call__(self, kind, step):
        if kind in self.replays:
            self.replays[kind]()
            return
        step()
        if not self.capture:
            return
        stream = torch.cuda.current_stream()
        try:
            self.replays[kind] = _capture_graph(step)
        except RuntimeError as err:
            torch.cuda.set_stream(stream)     # a failed capture can leave its side stream current
            torch.cuda.synchronize()
            self.capture = False
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"sampling without CUDA graphs: capturing a step failed: {message}",
                          stacklevel=2)


def _capture_graph(step):
    """step() captured in a CUDA graph (on the current CUDA device): returns the graph's replay,
    which launches step's kernels again on the tensors they used, without Python."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.inference_mode()
def sample_fast(model, labels, obs=(3, 32, 32), generator=None, progress=False, temperature=1.0,
                cuda_graph=None):
    """The same samples as `sample`, given the same generator and temperature, in about one forward
    pass of compute (the cached region pass of `_sample_cached`). Needs model.eval().

    cuda_graph: None (the default) replays each step from a CUDA graph on a CUDA device and takes
    the plain steps elsewhere; True takes the graphs' steps (`PixelCNN.forward_step`), captured on
    CUDA, eager elsewhere (how the tests check them on a CPU); False the plain steps
    (`PixelCNN.forward_region`, the reference), which on a CPU are faster. A failed capture falls
    back to eager steps with a warning. All give the same samples from the same generator.
    """
    check_temperature(temperature)
    u_mix, u_val = _sampling_noise(labels.shape[0], model.nr_logistic_mix, obs, generator,
                                   labels.device)
    x = torch.zeros(labels.shape[0], *obs, device=labels.device)
    return _sample_cached(model, x, labels, 0, u_mix, u_val, temperature, progress,
                          _cached_step(cuda_graph, labels.device))


def _cached_step(cuda_graph, device):
    """The `step` of `_sample_cached` for sample_fast's `cuda_graph` on `device`."""
    if cuda_graph is False:
        return "slice"
    if device.type == "cuda":
        return "graph"
    return "indexed" if cuda_graph else "slice"


@torch.inference_mode()
def complete(model, x, labels, rows, generator=None, temperature=1.0, progress=False,
             cuda_graph=None):
    """Class-conditional completion: keep the first `rows` rows of x (B, C, H, W) exactly and
    sample the rest under `labels` (int64 (B,)) with the cached sampler. Returns (B, C, H, W).

    The noise is drawn for the whole image, as `sample_fast` draws it, so rows=0 gives exactly
    the images `sample_fast` gives from the same generator. Needs model.eval(). cuda_graph: as
    in `sample_fast`.
    """
    check_temperature(temperature)
    B, C, H, W = x.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), one per image, got {tuple(labels.shape)}")
    if not (isinstance(rows, int) and 0 <= rows <= H):
        raise ValueError(f"rows must be an integer from 0 to the image height {H}, got {rows!r}")
    u_mix, u_val = _sampling_noise(B, model.nr_logistic_mix, (C, H, W), generator, x.device)
    return _sample_cached(model, x, labels, rows, u_mix, u_val, temperature, progress,
                          _cached_step(cuda_graph, x.device))


def class_pixel_log_likelihoods(model, x, num_classes):
    """log p(x_ij | x_<ij, c) in nats of every pixel under every class:
    (B, C, H, W) -> (B, num_classes, H, W).

    One network pass over the B * num_classes image-class pairs, class-major, in which the layers
    before the class first enters run once per image (PixelCNN.forward). Gradients flow.
    """
    B, _, H, W = x.shape
    labels = torch.arange(num_classes, device=x.device).repeat_interleave(B)   # (num_classes*B,)
    per_pixel = pixel_log_likelihoods(x.repeat(num_classes, 1, 1, 1),
                                      model(x, labels))                        # (num_classes*B, H, W)
    return per_pixel.view(num_classes, B, H, W).transpose(0, 1)                # (B, num_classes, H, W)


def class_log_likelihoods(model, x, num_classes):
    """log p(x | c) in nats for every class: (B, C, H, W) -> (B, num_classes), the per-image sums
    of `class_pixel_log_likelihoods`.

    The Bayes classifier is `bayes_predictions(model, class_log_likelihoods(...))`. Gradients flow;
    wrap it in `torch.no_grad()` to evaluate.
    """
    return class_pixel_log_likelihoods(model, x, num_classes).sum(dim=(2, 3))


def class_log_posterior(model, ll):
    """log p(x | c) + log pi(c) under the model's class prior (`PixelCNN.class_log_prior`, uniform
    unless fitted): the Bayes classifier's scores, ll (N, num_classes) -> (N, num_classes)."""
    return ll + model.class_log_prior.to(ll)


def bayes_predictions(model, ll):
    """The classes argmax_c log p(x | c) + log pi(c): ll (N, num_classes) -> int64 (N,)."""
    return class_log_posterior(model, ll).argmax(dim=1)


def fit_class_log_prior(ll, labels, max_iter=100):
    """The class prior that maximises the conditional likelihood sum_i log p(labels_i | x_i) of
    labelled images, given their log p(x | c): ll (N, num_classes), labels (N,) -> log pi
    (num_classes,), normalised (logsumexp 0).

    A number per class, not a density: where the class-conditional models are off by a constant
    for a class (one learnt its images' textures better), this corrects the Bayes classifier
    without touching the density. The objective is convex in log pi; at its optimum the posterior's
    expected class counts equal the label counts. Solved by L-BFGS in float64.
    """
    ll, labels = ll.detach().double().cpu(), labels.cpu()
    if ll.ndim != 2 or labels.shape != ll.shape[:1]:
        raise ValueError(f"expected ll (N, classes) and labels (N,), got {tuple(ll.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isfinite(ll).all():
        raise ValueError("the log-likelihoods hold non-finite values")
    # Centre each image's scores: the posterior is unchanged and the numbers stay small.
    ll = ll - ll.mean(dim=1, keepdim=True)
    bias = torch.zeros(ll.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([bias], max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(ll + bias, labels, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(bias.detach(), dim=0).float()


# Folds of the cross-validation that decides whether a fitted class prior is kept.
PRIOR_FOLDS = 5


def choose_class_log_prior(ll, labels, folds=PRIOR_FOLDS):
    """The class prior to keep for labelled images' log p(x | c), ll (N, classes), labels (N,):
    `fit_class_log_prior` of them if, fitted on all folds but one in turn and scored on that one,
    it classifies more of the images correctly than the uniform prior does; else uniform.

    The fit has one number per class, but a model's likelihoods of images it trained on are not
    those of new images, so a prior that fits the training images can cost accuracy elsewhere.
    Returns (log pi (classes,), dict(prior="fitted" or "uniform", reason=..., correct_fitted=...,
    correct_uniform=..., images=N)).
    """
    ll, labels = ll.detach().double().cpu(), labels.cpu()
    n, classes = ll.shape
    uniform = torch.full((classes,), -math.log(classes))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    correct_fitted = 0
    for fold in order.tensor_split(min(folds, n)):
        rest = torch.ones(n, dtype=torch.bool)
        rest[fold] = False
        prior = fit_class_log_prior(ll[rest], labels[rest]).double()
        correct_fitted += int(((ll[fold] + prior).argmax(1) == labels[fold]).sum())
    correct_uniform = int((ll.argmax(1) == labels).sum())
    keep = correct_fitted > correct_uniform
    counts = (f"{correct_fitted} of {n} images right with priors fitted on the other folds, "
              f"{correct_uniform} with the uniform prior ({min(folds, n)}-fold cross-validation)")
    info = dict(prior="fitted" if keep else "uniform", correct_fitted=correct_fitted,
                correct_uniform=correct_uniform, images=n,
                reason=("fitted: " if keep else "uniform: the fit does not pay, ") + counts)
    return (fit_class_log_prior(ll, labels) if keep else uniform), info


def set_fitted_class_prior(model, images, labels, batch_size=None, device="cpu",
                           autocast=nullcontext):
    """Score labelled images (N, C, H, W) under every class (`dataset_log_likelihoods`, with a
    progress bar) and set the model's class prior to `fit_class_log_prior` of them."""
    ll = dataset_log_likelihoods(model, images, model.num_classes, batch_size, device,
                                 progress=True, autocast=autocast)              # (N, classes)
    model.class_log_prior.copy_(fit_class_log_prior(ll, labels))


# Images per batch of dataset_log_likelihoods, by device type. On a CPU a small batch (8 images,
# 32 image-class pairs) keeps a layer's activations near the cache, and one pass of 32 pairs costs
# what the course's pattern pays per class for 32 images; elsewhere 32, the course's batch.
EVAL_BATCH_SIZE = {"cpu": 8}
DEFAULT_EVAL_BATCH_SIZE = 32


def eval_batch_size(device):
    """The default images per batch of `dataset_log_likelihoods` on `device`."""
    return EVAL_BATCH_SIZE.get(torch.device(device).type, DEFAULT_EVAL_BATCH_SIZE)


# Under autocast, dataset_log_likelihoods scores again in float32 the classes within this many nats
# of an image's best, where there are two or more: bf16 rounding moves the gap between two classes'
# log-likelihoods by up to 28.9 nats on the validation images under the model shipped since commit
# 7bc87c4, 22.3 under the `gated_last` model shipped at commit 449654b and 15.6 under the
# gated-fusion model (`python bench.py --only classification` prints the largest move), and a
# smaller gap could flip the prediction. 45 keeps half as much again in hand.
AMP_RECHECK_NATS = 45.0
# The same on other devices. A GPU's bf16 kernels round otherwise: on an NVIDIA H200 (torch
# 2.11+cu130) bf16 moved the gap by up to 45.5 nats under the model shipped since commit 7bc87c4,
# beyond the CPU's 45, and changed 1 of its 519 predictions. Twice that move; bf16 buys no speed
# there anyway (0.42 s against float32's 0.26 s, recheck included), so classification_evaluation.py
# scores in float32 unless asked for --amp.
GPU_AMP_RECHECK_NATS = 91.0


def amp_recheck_nats(device):
    """The default `recheck` of `dataset_log_likelihoods` on `device`: AMP_RECHECK_NATS on a CPU,
    GPU_AMP_RECHECK_NATS elsewhere."""
    return AMP_RECHECK_NATS if torch.device(device).type == "cpu" else GPU_AMP_RECHECK_NATS


@torch.no_grad()
def dataset_log_likelihoods(model, images, num_classes, batch_size=None, device="cpu",
                            tta=None, progress=False, autocast=nullcontext, recheck=None):
    """log p(x | c) for a whole split, in file order: images (N, C, H, W) -> (N, num_classes), on CPU.

    `batch_size` counts images (default: `eval_batch_size(device)`); each batch makes
    batch_size * num_classes network passes at once. The weight-norm weights are computed once for
    the whole split, not once per batch. tta="flip" averages the log-likelihoods of each image and
    its mirror image (still the generative classifier: it scores
    (log p(x | c) + log p(mirror(x) | c)) / 2, on the scale of one image's log-likelihood, so that
    the class prior, fitted on single images, keeps its weight).
    With an `autocast` (a factory such as `bf16_autocast(device)`), wherever a class lies less
    than `recheck` nats below an image's best class (in log p(x | c) + log pi(c), as
    `bayes_predictions` ranks them), that image's classes within `recheck` of its best are scored
    again without it, so that rounding decides no close call; the classes further down keep their
    autocast scores (rounding moves a gap by less than `recheck`, so they stay below). recheck=0
    keeps every autocast score; None (the default) is `amp_recheck_nats(device)`, wider on a GPU.
    """
    if tta not in (None, "none", "flip"):
        raise ValueError(f"tta must be None, 'none' or 'flip', got {tta!r}")
    batch_size = batch_size or eval_batch_size(device)
    recheck = amp_recheck_nats(device) if recheck is None else recheck
    out = []
    with parametrize.cached():
        for s in progress_bar(range(0, images.shape[0], batch_size), "log p(x|c)", progress):
            x = images[s:s + batch_size].to(device)
            with autocast():
                ll = class_log_likelihoods(model, x, num_classes)
                if tta == "flip":
                    ll = (ll + class_log_likelihoods(model, x.flip(dims=[3]), num_classes)) / 2
            out.append(ll.float().cpu())
    ll = torch.cat(out)                                                         # (N, num_classes)
    if autocast is not nullcontext and recheck > 0:
        posterior = class_log_posterior(model, ll)                             # (N, num_classes)
        close = posterior.max(dim=1, keepdim=True).values - posterior < recheck  # (N, num_classes)
        close &= close.sum(dim=1, keepdim=True) > 1            # the best alone is no close call
        pairs = close.nonzero()                                                 # (P, 2): image, class
        if len(pairs):
            ll[close] = _pair_log_likelihoods(model, images, pairs, batch_size * num_classes,
                                              device, tta)
    return ll


def _pair_log_likelihoods(model, images, pairs, batch_size, device, tta):
    """log p(x | c) in float32 of the image-class pairs (P, 2) (image index, class), in the order
    of `pairs`, `batch_size` pairs per network pass. Returns (P,)."""
    out = []
    with parametrize.cached():
        for s in range(0, len(pairs), batch_size):
            index, labels = pairs[s:s + batch_size].unbind(1)
            x, labels = images[index].to(device), labels.to(device)
            ll = -discretized_mix_logistic_loss(x, model(x, labels), reduction="none")
            if tta == "flip":
                x = x.flip(dims=[3])
                ll = (ll - discretized_mix_logistic_loss(x, model(x, labels), reduction="none")) / 2
            out.append(ll.float().cpu())
    return torch.cat(out)


def pick_device(name="auto"):
    """The device a script runs on: `name`, or for "auto" cuda, then mps, then cpu. A device this
    torch cannot see ends the script with one line (scripts alone call this)."""
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name in available and not available[name]():
        sys.exit(f"error: --device {name}, but this torch sees no {name} device: pass --device "
                 f"cpu or auto")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_autocast(device, enabled=True, cache_enabled=True):
    """A zero-argument factory of bf16 autocast contexts on `device` (of nullcontext when not
    enabled): the form the training loop and `dataset_log_likelihoods(autocast=...)` take.
    cache_enabled=False for a step captured in a CUDA graph, which must not keep the casts of one
    capture for later calls (torch.cuda.graphs asks it)."""
    if not enabled:
        return nullcontext
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                             cache_enabled=cache_enabled)


def bf16_pays(device):
    """Whether bf16 autocast speeds `device` up: CUDA, or a CPU with bfloat16 instructions
    (AVX512_BF16 or AMX). Elsewhere PyTorch emulates bf16 on the CPU, which is slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # private: may move
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
