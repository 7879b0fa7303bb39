"""The fast paths on a CUDA device, against the straightforward ones there and against the CPU.
Skipped without CUDA; tests/test_fast.py checks the same paths on a CPU.

Sections: sampling (the cached sampler, eager and replayed from CUDA graphs), classification
(log-likelihoods and bf16 predictions), training (the guarded step eager and replayed from a
CUDA graph, a skipped step inside the graph, resume on CUDA).
"""

import warnings

import pytest
import torch

import pcnn_train
import utils
from layers import DownRightShiftedDeconv2d
from model import PixelCNN
from training import standalone_step
from test_fast import tiny_model
from utils import (bayes_predictions, bf16_autocast, class_log_likelihoods, complete,
                   dataset_log_likelihoods, discretized_mix_logistic_loss, sample, sample_fast)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture
def float32_math():
    """Float32 convolutions and matrix products (no TF32, which cuDNN uses by default and
    training.py turns on for both): the samplers below must agree to float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_model(fusion="joint", channels=3, nr_resnet=1):
    return tiny_model(fusion, channels, nr_resnet).to(CUDA)


def seeded(seed=7):
    return torch.Generator(CUDA).manual_seed(seed)


def four_labels():
    return torch.arange(4, device=CUDA)


# --- sampling ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("float32_math")
@pytest.mark.parametrize("channels", [3, 1])
def test_fast_sampler_draws_the_naive_samplers_samples(channels):
    """The eager cached sampler against a full forward pass per pixel, bit for bit as on a CPU.
    Their outputs differ by float32 rounding, so a sub-pixel within that of a bin's edge could
    in principle differ; on a CPU they agree on these draws."""
    model, labels, obs = cuda_model(channels=channels), four_labels(), (channels, 8, 12)
    slow = sample(model, labels, obs, generator=seeded())
    assert torch.equal(sample_fast(model, labels, obs, generator=seeded(), cuda_graph=False), slow)


@pytest.mark.usefixtures("float32_math")
@pytest.mark.parametrize("channels", [3, 1])
def test_graph_sampler_draws_the_eager_samplers_samples(channels, monkeypatch):
    """sample_fast's default on CUDA captures each of the twelve kinds of step once (no fallback
    warning) and replays them: the same samples and completions as the same steps run eagerly
    (the same kernels, so bit for bit) and as the sliced steps (cuda_graph=False)."""
    model, labels, obs = cuda_model(channels=channels), four_labels(), (channels, 8, 12)
    captures, capture = [], utils._capture_graph
    monkeypatch.setattr(utils, "_capture_graph",
                        lambda step: captures.append(step) or capture(step))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "sampling without CUDA graphs")   # a failed capture
        graphed = sample_fast(model, labels, obs, generator=seeded())
    assert len(captures) == 12
    with torch.inference_mode():
        u_mix, u_val = utils._sampling_noise(4, model.nr_logistic_mix, obs, seeded(), CUDA)
        eager = utils._sample_cached(model, torch.zeros(4, *obs, device=CUDA), labels, 0, u_mix,
                                     u_val, 1.0, False, step="indexed")
    assert torch.equal(graphed, eager)
    sliced = sample_fast(model, labels, obs, generator=seeded(), cuda_graph=False)
    assert torch.equal(graphed, sliced)
    x = torch.rand(4, *obs, device=CUDA) * 2 - 1
    assert torch.equal(complete(model, x, labels, 5, generator=seeded()),
                       complete(model, x, labels, 5, generator=seeded(), cuda_graph=False))


# --- classification ----------------------------------------------------------------------------

def test_deconv_forward_is_the_transposed_convolution():
    layer = DownRightShiftedDeconv2d(6, 5).to(CUDA)
    x = torch.randn(2, 6, 5, 7, device=CUDA)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.reference_forward(x))
        torch.testing.assert_close(layer.matrix_product_forward(x), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("float32_math")
@torch.no_grad()
def test_class_log_likelihoods_agree_with_the_cpu():
    """log p(x | c) of 8 x 8 images (about -1800 nats) on CUDA and on a CPU: the same to 1e-5
    relative, about 0.02 nats, float32 rounding of sums taken in another order (and on the CPU
    the upsampling layers' matrix product instead of the transposed convolution)."""
    model = tiny_model("joint")
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    on_cpu = class_log_likelihoods(model, x, 4)                                   # (6, 4)
    on_cuda = class_log_likelihoods(model.to(CUDA), x.to(CUDA), 4).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-5, atol=1e-3)


def test_bf16_with_the_recheck_keeps_the_float32_predictions():
    """Under bf16 autocast with the default recheck (utils.amp_recheck_nats: wider on a GPU) the
    Bayes classifier predicts what it predicts in float32; bf16 did round the scores."""
    model = cuda_model(nr_resnet=2)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fp32 = dataset_log_likelihoods(model, images, 4, device=CUDA)                 # (16, 4)
    bf16 = dataset_log_likelihoods(model, images, 4, device=CUDA, autocast=bf16_autocast(CUDA))
    rounded = dataset_log_likelihoods(model, images, 4, device=CUDA, autocast=bf16_autocast(CUDA),
                                      recheck=0)
    assert not torch.equal(rounded, fp32)
    assert torch.equal(bayes_predictions(model, bf16), bayes_predictions(model, fp32))


# --- training ----------------------------------------------------------------------------------

def tiny_trainer(seed=0):
    torch.manual_seed(seed)
    return PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0)


def smooth_batch(seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    return x.to(device), torch.arange(8).remainder(4).to(device)


@pytest.mark.usefixtures("float32_math")
def test_cpu_and_cuda_losses_agree():
    """The same weights and batch: the float32 loss on CUDA equals the CPU's within 1e-5 relative
    (the kernels sum in other orders)."""
    model = tiny_trainer()
    x, y = smooth_batch(0, "cpu")
    cpu = discretized_mix_logistic_loss(x, model(x, y))
    gpu = discretized_mix_logistic_loss(x.cuda(), model.cuda()(x.cuda(), y.cuda()))
    assert abs(gpu.item() - cpu.item()) <= 1e-5 * abs(cpu.item())


@pytest.mark.parametrize("amp", [False, True])
def test_graphed_step_equals_the_eager_step(amp):
    """Eight steps, the last five replayed from a CUDA graph, against eight eager steps from the
    same weights: the same weights within float rounding (Adam's normalised update amplifies
    rounding in parameters of tiny gradients, hence atol 1e-4 after eight steps of lr 2e-3)."""
    eager_model, graph_model = tiny_trainer().cuda(), tiny_trainer().cuda()
    device = torch.device("cuda")
    steps = [standalone_step(m, 2e-3, 0.9, cuda_graph=g,
                             autocast=bf16_autocast(device, amp, cache_enabled=not g))
             for m, g in ((eager_model, False), (graph_model, True))]
    for i in range(8):
        x, y = smooth_batch(i, device)
        for step in steps:
            step(x, y, 2e-3, step.run.ema.weight(i))
    assert steps[1].graph is not None
    rows = [step.readback() for step in steps]
    torch.testing.assert_close(torch.tensor(rows[1]), torch.tensor(rows[0]), rtol=1e-3, atol=1e-4)
    for p, q in zip(graph_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


def test_graphed_step_skips_a_nonfinite_batch():
    """A NaN batch copied into the graph's input: the replayed step moves no weight."""
    model = tiny_trainer().cuda()
    step = standalone_step(model, 2e-3, cuda_graph=True)
    for i in range(5):
        step(*smooth_batch(i, "cuda"), 2e-3, 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = smooth_batch(9, "cuda")
    step(torch.full_like(x, float("nan")), y, 2e-3, 0.0)
    assert step.readback()[-1][3] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("graph", ["false", "true"])
def test_resume_on_cuda_continues_the_run(tmp_path, small_data, graph):
    """6 steps straight against 3, stop, --resume to 6, on CUDA: the same losses in steps.csv
    (within 1e-5: cuDNN may pick other algorithms in another process)."""
    flags = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--batch_size",
             "8", "--device", "cuda", "--data_dir", str(small_data), "--fit_prior", "false",
             "--eval_interval", "0", "--cuda_graph", graph, "--dropout", "0.5"]

    def run(name, *extra):
        folder = tmp_path / name
        pcnn_train.main(pcnn_train.parse_args([*flags, "--run_dir", str(folder), "--save_dir",
                                               str(folder), *extra]))
        return folder

    straight = run("straight", "--max_steps", "6")
    run("split", "--max_steps", "3")
    split = run("split", "--max_steps", "6", "--resume")

    def losses(folder):
        return [float(r.split(",")[3]) for r in (folder / "steps.csv").read_text().splitlines()[1:]]
    assert losses(split) == pytest.approx(losses(straight), rel=1e-5)
