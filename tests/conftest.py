"""What the tests share: where the CPEN455 data lives, small folders of it, a tiny model, the
independent references the code is checked against (a float64 brute force over the 256 bins of
each sub-pixel, a plain loop over classes), and runners for the scripts, in this process or in a
fresh one.

The data folder is $CPEN455_DATA; without it, `data/` in the repository if it holds the dataset
(`python dataset.py --download` puts it there), else `../shared/cpen455` beside the repository.
Tests that read it skip where it is absent:

    CPEN455_DATA=/path/to/cpen455 python -m pytest -q
"""

import csv
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def default_data_dir():
    """data/ in the repository if it holds the dataset, else ../shared/cpen455 beside it."""
    local = REPO / "data"
    return local if (local / "train.csv").is_file() else REPO.parent / "shared" / "cpen455"


DATA = Path(os.environ.get("CPEN455_DATA") or default_data_dir())
ARCHIVE = DATA.parent / "cpen455-archive.zip"      # the course's zip, where the data came from
SPLITS = ("train", "validation", "test")

# The flags every tiny training run shares: a model of 40k weights, one record per epoch, the
# best checkpoint kept, float32, no warm-up (a few steps must move the weights), no clock in the
# schedule, no sampling, no prior fit. pcnn_train.py's own defaults are the CPU preset's
# (training.PRESETS["cpu"]); these pin what the tests rely on.
TINY = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--batch_size", "8",
        "--sampling_interval", "0", "--dropout", "0.5", "--device", "cpu", "--fit_prior", "false",
        "--eval_interval", "1", "--keep", "best", "--amp", "false", "--max_minutes", "0",
        "--warmup_steps", "0", "--lr_cooldown", "0", "--ema", "0", "--flip", "false",
        "--fusion", "gated"]
SMALL_PER_CLASS = {"train": 128, "validation": 16}  # 64 steps an epoch at batch 8
TINY_PER_CLASS = {"train": 6, "validation": 4, "test": 16}   # 3 steps an epoch; test: 16 rows
SCRIPT_TIMEOUT = 600   # seconds; the longest script run here takes under 30 on two busy cores

NUM_LEVELS = 256
HALF_BIN = 1 / 255                                    # the 256 bins of width 2/255 tile [-1, 1]
LEVELS = torch.arange(NUM_LEVELS, dtype=torch.float64) * 2 / 255 - 1   # bin centres b_v
MIN_LOG_SCALE = -7.0                                  # the paper's clamp, part of the likelihood
MIN_MARGIN = 1e-2     # nats; batching moves log p(x | c) by far less than this


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: they gain nothing from threads, and on a busy two-core machine
    the thread handoffs made each forward pass ten to twenty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ data

@pytest.fixture(scope="session")
def data_dir():
    """The CPEN455 folder (see the module docstring); the test skips without it."""
    if not all((DATA / f"{split}.csv").is_file() for split in SPLITS):
        pytest.skip(f"needs the CPEN455 data at {DATA} (set CPEN455_DATA)")
    return DATA


@pytest.fixture(scope="session")
def archive():
    """The course's zip next to the data folder; the test skips without it."""
    if not ARCHIVE.is_file():
        pytest.skip(f"needs the CPEN455 archive at {ARCHIVE}")
    return ARCHIVE


def subset_folder(source, dest, per_class, extra_rows=None):
    """A CPEN455 folder at dest whose CSVs hold the first per_class[split] rows of each class of
    `source`'s (of the test split, unlabelled, its first rows), in the CSVs' order, the lines as
    they are there; extra_rows[split]: indices of further rows to keep. The image folders are
    links to source's. Returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, n in per_class.items():
        lines = (source / f"{split}.csv").read_text().splitlines(keepends=True)
        extra = set((extra_rows or {}).get(split, ()))
        seen, keep = Counter(), []
        for i, line in enumerate(lines):
            label = next(csv.reader([line]))[1].strip()
            seen[label] += 1
            if seen[label] <= n or i in extra:
                keep.append(line)
        (dest / f"{split}.csv").write_text("".join(keep))
        (dest / split).symlink_to(source / split, target_is_directory=True)
    return dest


@pytest.fixture(scope="session")
def subset(data_dir, tmp_path_factory):
    """subset(per_class, extra_rows=None) -> a new folder of the first per_class[split] images of
    each class of the CPEN455 data (see subset_folder)."""
    return lambda per_class, extra_rows=None: subset_folder(
        data_dir, tmp_path_factory.mktemp("cpen455"), per_class, extra_rows)


@pytest.fixture(scope="session")
def small_data(data_dir, tmp_path_factory):
    """128 training and 16 validation images of each class (no test split): 64 steps an epoch at
    batch 8, for the runs that must stay inside their first epoch. A tiny run on the whole data
    spent most of its time decoding all 4678 training and validation images."""
    return subset_folder(data_dir, tmp_path_factory.mktemp("cpen455_small"), SMALL_PER_CLASS)


@pytest.fixture(scope="session")
def tiny_data(data_dir, tmp_path_factory):
    """6 training and 4 validation images of each class and the first 16 test rows: an epoch is
    3 steps at batch 8, and the scripts score 16 images where the whole splits hold 519."""
    return subset_folder(data_dir, tmp_path_factory.mktemp("cpen455_tiny"), TINY_PER_CLASS)


def write_idx(path, array):
    """A uint8 array in MNIST's IDX format: magic (0, 0, 0x08 = uint8, ndim), dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_stand_in(tmp_path):
    """A torchvision MNIST root of random digits, 16 training and 8 test images (the
    "validation" split of load_dataset): returns the root and {"train"/"validation": (images
    (N, 28, 28) uint8, labels (N,))}. The real MNIST would cost minutes to validate on."""
    rng, root, arrays = np.random.default_rng(0), tmp_path / "mnist", {}
    for prefix, split, n in (("train", "train", 16), ("t10k", "validation", 8)):
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                         rng.integers(0, 10, n, dtype=np.uint8))
        write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", arrays[split][0])
        write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", arrays[split][1])
    return root, arrays


@pytest.fixture
def cifar10_stand_in(tmp_path, monkeypatch):
    """A torchvision CIFAR-10 root of random images in the pickled batches' layout, 5 x 4
    training and 8 test images: returns the root and {"train"/"validation": (images
    (N, 3, 32, 32) uint8, labels (N,))}. torchvision checks the real files' MD5 sums; here it
    checks that they exist."""
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: os.path.isfile(path))
    rng, folder = np.random.default_rng(0), tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 8}
    drawn = {}
    for name, n in batches.items():
        drawn[name] = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                       rng.integers(0, 10, n).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump({"data": drawn[name][0].reshape(n, -1), "labels": drawn[name][1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    train = [drawn[f"data_batch_{i}"] for i in range(1, 6)]
    arrays = {"train": (np.concatenate([images for images, _ in train]),
                        np.concatenate([labels for _, labels in train])),
              "validation": (drawn["test_batch"][0], np.array(drawn["test_batch"][1]))}
    return folder.parent, arrays


# ---------------------------------------------------------------------------------- tiny models

def make_tiny_model(seed=0, perturb=True, **config):
    """A small PixelCNN in eval mode (dropout off). perturb=True moves every parameter off its
    initialisation: FiLM's projection starts at zero, where labels have no effect at all, and the
    classes of an unperturbed model differ little."""
    from model import PixelCNN
    torch.manual_seed(seed)
    model = PixelCNN(**dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, num_classes=4)
                     | config).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(seed=0, perturb=True, **PixelCNN arguments): see make_tiny_model."""
    return make_tiny_model


def grid_images(b, c, h, w, seed=0):
    """Random images on the 256-level grid {2v/255 - 1}, float32: (b, c, h, w)."""
    v = torch.randint(0, NUM_LEVELS, (b, c, h, w), generator=torch.Generator().manual_seed(seed))
    return (v.double() * 2 / 255 - 1).float()


@pytest.fixture(scope="session")
def grid():
    """grid(b, c, h, w, seed=0): random images on the 256-level grid, float32."""
    return grid_images


# ------------------------------------------------------------------------ independent references

def bin_masses(mean, log_scale):
    """Mass of each of the 256 bins under a logistic, float64: (...) -> (..., 256).

    Bin v is [b_v - 1/255, b_v + 1/255], except that bin 0 reaches down to -inf and bin 255 up to
    +inf, so the masses telescope to exactly 1.
    """
    s = log_scale.clamp(min=MIN_LOG_SCALE).exp()[..., None]
    upper = torch.sigmoid((LEVELS + HALF_BIN - mean[..., None]) / s)
    lower = torch.sigmoid((LEVELS - HALF_BIN - mean[..., None]) / s)
    upper[..., -1] = 1.0
    lower[..., 0] = 0.0
    return upper - lower


def brute_force_pixel_log_likelihoods(x, l, nr_mix):
    """log p(pixel) in nats of every pixel from the full 256-way categorical of each sub-pixel,
    float64: x (B, C, H, W) on the grid, l (B, 10K or 3K, H, W) -> (B, H, W).

    l is laid out as [K logits | per colour: K means, K log-scales (, K raw coefficients)]; the
    coefficients of the red, green and blue blocks are c0, c1, c2 in mean_g += c0 r,
    mean_b += c1 r + c2 g.
    """
    x, l, K = x.double(), l.double(), nr_mix
    B, C, H, W = x.shape
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
        masses = bin_masses(mean, block[:, K:2 * K])                     # (B, K, H, W, 256)
        torch.testing.assert_close(masses.sum(-1), torch.ones_like(mean), rtol=0, atol=1e-6)
        observed = masses.gather(-1, level[:, c:c + 1].expand(B, K, H, W)[..., None])[..., 0]
        # keep to bins the loss computes as a CDF difference, not by its density fallback
        assert observed.min() > 1e-5, "a bin below the loss's density fallback threshold"
        likelihood = likelihood * observed
    return likelihood.sum(dim=1).log()                                   # (B, H, W)


@pytest.fixture(scope="session")
def brute_force():
    """.pixel_log_likelihoods(x, l, nr_mix) -> (B, H, W) and .nll(x, l, nr_mix) -> (B,), in nats,
    float64, from the 256 bins of every sub-pixel; .bin_masses(mean, log_scale) -> (..., 256)."""
    def nll(x, l, nr_mix):
        return -brute_force_pixel_log_likelihoods(x, l, nr_mix).sum(dim=(1, 2))
    return SimpleNamespace(pixel_log_likelihoods=brute_force_pixel_log_likelihoods, nll=nll,
                           bin_masses=bin_masses)


@torch.no_grad()
def loop_log_likelihoods(model, images, chunk=64):
    """log p(x | c) by a plain loop over classes, every label of a pass set to c:
    (N, C, H, W) -> (N, classes), float64."""
    from utils import discretized_mix_logistic_loss
    columns = []
    for c in range(model.num_classes):
        nll = [discretized_mix_logistic_loss(x, model(x, torch.full((x.shape[0],), c)),
                                             reduction="none")
               for x in images.split(chunk)]
        columns.append(-torch.cat(nll).double())
    return torch.stack(columns, dim=1)                                    # (N, classes)


@pytest.fixture(scope="session")
def class_loop():
    """class_loop(model, images) -> log p(x | c) (N, classes), float64: loop_log_likelihoods."""
    return loop_log_likelihoods


def assert_clear_margins(ll):
    """The argmax must not hinge on float noise, or a correct script could disagree with us."""
    top2 = ll.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > MIN_MARGIN, f"a near tie ({margin:.2g} nats) makes the check flaky; reseed"


@pytest.fixture(scope="session")
def clear_margins():
    """clear_margins(ll): assert_clear_margins."""
    return assert_clear_margins


# ------------------------------------------------------------------------------------ the scripts

@pytest.fixture(scope="session")
def repo():
    """The repository's root: the scripts' folder, where they run."""
    return REPO


def script(name, *args, env=None, log=None, timeout=SCRIPT_TIMEOUT):
    """`python <name> args` from the repository root in a fresh process, on one thread (small
    tensors gain nothing from threads; on two busy cores two threads made a run 3x slower).

    log: a file that takes stdout and stderr together, as `> log 2>&1` from a plain shell does
    (stdout block-buffered); the returned process then has .log, the file's text with its
    carriage returns. Otherwise .stdout and .stderr hold the streams."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, name, *map(str, args)]
    if log is None:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    env.pop("PYTHONUNBUFFERED", None)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    proc.log = Path(log).read_bytes().decode()    # not read_text: it turns \r into \n
    return proc


@pytest.fixture(scope="session")
def run_script():
    """run_script(name, *args, env=None, log=None): see `script`."""
    return script


@pytest.fixture(scope="session")
def train(request):
    """train(run_dir, *flags, data=None): pcnn_train.main in this process with TINY and `flags`
    (later flags win) on `data` (default: tiny_data), everything written under run_dir. Returns
    run_dir."""
    import pcnn_train

    def run(run_dir, *flags, data=None):
        data = data or request.getfixturevalue("tiny_data")
        pcnn_train.main(pcnn_train.parse_args([
            *TINY, "--data_dir", str(data), "--run_dir", str(run_dir), "--save_dir", str(run_dir),
            "--sample_dir", str(Path(run_dir) / "samples"), *map(str, flags)]))
        return Path(run_dir)
    return run


@pytest.fixture(scope="session")
def train_command(request):
    """train_command(run_dir, *flags, data=None): the arguments of `train`'s run for
    run_script("pcnn_train.py", ...) in a fresh process."""
    def command(run_dir, *flags, data=None):
        data = data or request.getfixturevalue("tiny_data")
        return [*TINY, "--data_dir", data, "--run_dir", run_dir, "--save_dir", run_dir,
                "--sample_dir", Path(run_dir) / "samples", *flags]
    return command
