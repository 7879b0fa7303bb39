"""Tests for generation_evaluation.py: the Fréchet distance against closed forms and an independent
eigendecomposition, the whole pipeline against pytorch-fid's own `calculate_fid_given_paths` (the
course's grading call), `my_sample`'s files, and the script end to end offline, including every
way FID can fail; `--temperature` against the cached sampler, `--completions`, and
`--temperature_sweep`'s samples, class agreement and FID per temperature against the sampler, an
independent classifier and pytorch-fid; the errors a checkpoint of other classes and bad flags
give. pytorch-fid's Inception architecture with random weights stands in for the real weights (no
internet here); a tiny PixelCNN samples with the cached sampler. The Inception passes dominate the
time, about 90 ms an image at 299x299 on one core:

    python -m pytest tests/test_generation_evaluation.py -q --durations=5
"""

import math
import re
import shutil
from argparse import Namespace
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_fid_given_paths

import generation_evaluation as ge
from dataset import my_bidict
from model import PixelCNN
from utils import sample_fast

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"   # pytorch-fid's official file name
SMALL_DIMS = 64            # Inception block 0 only: the cheapest features, for the unit tests
SIZE = 32                  # side of sampled images in the script runs: the course's size


# ------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """pytorch-fid's FID Inception with random weights, saved as the official file name.

    fid_inception_v3() builds the architecture, then loads the downloaded weights; with the
    download and the load stubbed out, its own construction is all that runs.
    """
    with mock.patch.object(fid_inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict",
                              lambda self, state_dict: None):
        torch.manual_seed(0)
        net = fid_inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("fid") / WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    """A tiny PixelCNN saved the way pcnn_train.py saves models: a plain state_dict."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(tiny_model(perturb=False, nr_filters=4).state_dict(), path)
    return path


def copy_images(src, dst, n):
    """The first n JPEGs of a CPEN455 split folder, copied into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.jpg"))[:n]:
        shutil.copy(f, dst / f.name)
    return dst


def script_args(**overrides):
    """The script's flags as main() receives them, with the defaults of its parser."""
    args = dict(checkpoint=ge.DEFAULT_CHECKPOINT, gen_data_dir="samples", ref_data_dir="data/test",
                n_per_class=ge.SAMPLES_PER_CLASS, image_size=ge.IMAGE_SIZE, dims=ge.FID_DIMS,
                batch_size=ge.FID_BATCH_SIZE, fid_weights=None, skip_fid=False, seed=0,
                device="cpu", temperature=1.0, completions=None, temperature_sweep=None)
    return Namespace(**(args | overrides))


def sample_names(n_per_class):
    return sorted(f"{name}_{i:02d}.png" for name in my_bidict for i in range(n_per_class))


def read_levels(folder, n_per_class):
    """The 8-bit levels of the PNGs my_sample wrote, one class after another: (4 n, 3, H, W)."""
    images = [torch.from_numpy(np.array(Image.open(folder / f"{name}_{i:02d}.png")))
              for name in my_bidict for i in range(n_per_class)]
    return torch.stack(images).permute(0, 3, 1, 2).long()


def levels(images):
    """Images in [-1, 1] on the 256-level grid -> their levels 0..255."""
    return torch.round((images + 1) * 127.5).long()


def drawn_labels(n_per_class):
    return torch.arange(len(my_bidict)).repeat_interleave(n_per_class)


def load_tiny(checkpoint):
    return PixelCNN.from_state_dict(torch.load(checkpoint)).eval()


def course_hub(fid_weights, monkeypatch):
    """Point torch hub at a folder holding `fid_weights` under the official name, as TORCH_HOME
    would, so that pytorch-fid's own calls load them."""
    hub = fid_weights.parent / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (hub / "checkpoints" / WEIGHTS_NAME).exists():
        (hub / "checkpoints" / WEIGHTS_NAME).symlink_to(fid_weights)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))


def independent_frechet(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) by symmetric eigendecompositions: the trace
    of (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(middle, 0, None))))


# --------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    """For diagonal covariances FID = ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    v1, v2 = rng.uniform(0.1, 2, 16), rng.uniform(0.1, 2, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert ge.frechet_distance((mu1, np.diag(v1)), (mu2, np.diag(v2))) == pytest.approx(expected,
                                                                                          rel=1e-9)


def test_frechet_distance_matches_independent_eigendecomposition():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) + 0.5
    stats_a = (a.mean(0), np.cov(a, rowvar=False))
    stats_b = (b.mean(0), np.cov(b, rowvar=False))
    assert ge.frechet_distance(stats_a, stats_b) == pytest.approx(
        independent_frechet(*stats_a, *stats_b), rel=1e-6)
    assert abs(ge.frechet_distance(stats_a, stats_a)) < 1e-6


def test_imaginary_square_root_raises_a_clear_error():
    """A covariance with a negative eigenvalue makes sqrtm(S1 S2) imaginary (1j on the diagonal);
    pytorch-fid's ValueError becomes FIDUndefinedError. Other ValueErrors are not swallowed."""
    with pytest.raises(ge.FIDUndefinedError, match="Imaginary component"):
        ge.frechet_distance((np.zeros(2), np.diag([1.0, -1.0])), (np.zeros(2), np.eye(2)))
    with pytest.raises(AssertionError):   # pytorch-fid asserts on mismatched shapes
        ge.frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(3), np.eye(3)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_dir):
    """Two small folders of real images: 16 test and 16 validation JPEGs."""
    root = tmp_path_factory.mktemp("folders")
    return (copy_images(data_dir / "test", root / "a", 16),
            copy_images(data_dir / "validation", root / "b", 16))


def test_pipeline_equals_pytorch_fid_calculate_fid_given_paths(fid_weights, folders, monkeypatch):
    """The script's --fid_weights path (hub redirect, file listing, statistics, distance) gives
    what the course's call gives when torch hub holds the same weights file. The distance also
    matches the independent formula on these statistics, and a folder against itself is 0."""
    net = ge.build_fid_inception(SMALL_DIMS, "cpu", fid_weights)
    files_a, files_b = ge.image_files(folders[0]), ge.image_files(folders[1])
    assert len(files_a) == len(files_b) == 16
    stats_a = ge.folder_statistics(files_a, net, SMALL_DIMS, 128, "cpu")
    stats_b = ge.folder_statistics(files_b, net, SMALL_DIMS, 128, "cpu")
    ours = ge.frechet_distance(stats_a, stats_b)

    course_hub(fid_weights, monkeypatch)
    course = calculate_fid_given_paths([str(f) for f in folders], 128, "cpu", dims=SMALL_DIMS,
                                       num_workers=0)
    assert math.isfinite(ours) and ours > 0
    assert ours == pytest.approx(course, rel=1e-6)
    assert ours == pytest.approx(independent_frechet(*stats_a, *stats_b), rel=1e-4)
    assert abs(ge.frechet_distance(stats_a, stats_a)) < 1e-3


def test_fid_weights_of_another_architecture_are_rejected(tmp_path):
    bad = tmp_path / WEIGHTS_NAME
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ge.FIDWeightsError, match="not a valid copy"):
        ge.build_fid_inception(SMALL_DIMS, "cpu", bad)
    with pytest.raises(ge.FIDWeightsError, match=re.escape(ge.FID_WEIGHTS_URL)):
        ge.build_fid_inception(SMALL_DIMS, "cpu", tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------- my_sample

def test_my_sample_writes_named_8bit_pngs_per_class(tmp_path):
    """A fake sampler: one call for all classes, 25 labels each in class order, the default 32x32
    shape; every image comes back from its PNG exactly (8-bit, no rounding) under its class's
    name. Old samples are removed first; other files stay."""
    gen = tmp_path / "samples"
    gen.mkdir()
    for keep in ("README.md", "notes.png", "Class0_grid.png"):
        (gen / keep).write_text("keep")
    (gen / "Class3_99.png").write_text("stale")
    model = PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
    calls = []

    def fake_sample_op(model_, labels, obs):
        levels = torch.randint(0, 256, (labels.shape[0], *obs), dtype=torch.int64)
        calls.append((model_, labels.clone(), obs, levels))
        return levels.float() / 127.5 - 1                               # the 256-level grid

    images = ge.my_sample(model, gen, sample_op=fake_sample_op)
    assert len(calls) == 1
    model_, labels, obs, levels = calls[0]
    assert model_ is model and obs == (3, 32, 32)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [label for label in my_bidict.values() for _ in range(25)]
    made = {label: levels[25 * k:25 * (k + 1)] for k, label in enumerate(my_bidict.values())}
    assert images.shape == (100, 3, 32, 32)
    kept = ["README.md", "notes.png", "Class0_grid.png"]
    assert sorted(p.name for p in gen.iterdir()) == sorted(sample_names(25) + kept)
    for name, label in my_bidict.items():
        for i in (0, 24):
            png = np.asarray(Image.open(gen / f"{name}_{i:02d}.png"))      # (H, W, 3) uint8
            assert png.shape == (32, 32, 3)
            np.testing.assert_array_equal(png, made[label][i].permute(1, 2, 0).numpy())


def test_my_sample_takes_no_temperature_for_a_sampler_of_its_own(tmp_path):
    model = PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
    with pytest.raises(ValueError, match="temperature applies to the default sampler"):
        ge.my_sample(model, tmp_path, 1, (3, 8, 8), sample_op=lambda *a: None, temperature=0.5)


# ------------------------------------------------------------------------------- script runs

def test_end_to_end_offline(tmp_path, checkpoint, fid_weights, data_dir, run_script):
    """32 samples at the course's size and FID dimensions, the course's two output lines and a
    grid, against 32 of the real test images (the course's 100 against 519 would make the
    Inception passes 20 times as long)."""
    gen, ref = tmp_path / "samples", copy_images(data_dir / "test", tmp_path / "ref", 32)
    # Small Inception batches: the statistics do not depend on them, and on one CPU thread they
    # spare most of the page faults of 128 images' 300 MB activations. Both streams go to one log,
    # as graders run it: the result lines must be lines of their own there.
    proc = run_script("generation_evaluation.py", "--checkpoint", checkpoint, "--gen_data_dir",
                      gen, "--ref_data_dir", ref, "--fid_weights", fid_weights, "--n_per_class", 8,
                      "--image_size", SIZE, "--batch_size", 8, "--device", "cpu",
                      log=tmp_path / "log")
    log = proc.log
    assert proc.returncode == 0, log[-3000:]
    assert sorted(p.name for p in gen.glob("*.png")) == sample_names(8)
    assert Image.open(gen / "Class2_07.png").size == (SIZE, SIZE)
    lines = log.split("\n")
    assert "#generated images: 32, #reference images: 32" in lines, log[-2000:]
    scores = [line for line in lines if line.startswith("Average fid score: ")]
    assert len(scores) == 1 and math.isfinite(float(scores[0].split(": ")[1])), log[-2000:]
    grid = Image.open(ge.grid_path(gen))                   # one row per class, padding 1
    assert grid.size == (8 * (SIZE + 1) + 1, len(my_bidict) * (SIZE + 1) + 1)


def test_result_lines_start_their_own_line_in_one_log(tmp_path, checkpoint, run_script):
    """--skip_fid > log 2>&1: the sampler's progress bar shares the file, and the lines printed
    before and after it are lines of their own there."""
    gen = tmp_path / "samples"
    proc = run_script("generation_evaluation.py", "--checkpoint", checkpoint, "--gen_data_dir",
                      gen, "--n_per_class", 1, "--image_size", 8, "--skip_fid", "--device", "cpu",
                      log=tmp_path / "log")
    log = proc.log
    assert proc.returncode == 0, log
    assert "sampling rows" in log and "\r" in log, "the progress bar is not in the log"
    lines = log.split("\n")
    assert "sampling 1 images of each of hamburger, panda, koala, pizza" in lines, log
    grid = ge.grid_path(gen)
    assert f"4 samples -> {gen}/, grid (hamburger, panda, koala, pizza, one row each) -> {grid}" \
        in lines, log


def test_without_weights_exits_2_naming_the_file_and_keeps_samples(tmp_path, checkpoint,
                                                                   run_script):
    """An empty torch hub cache and a proxy that refuses connections: no download is possible,
    with or without internet."""
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(ref / "a.png")
    gen = tmp_path / "samples"
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    r = run_script("generation_evaluation.py", "--checkpoint", checkpoint, "--gen_data_dir", gen,
                   "--ref_data_dir", ref, "--n_per_class", 1, "--image_size", SIZE, "--device",
                   "cpu", env=offline)
    assert r.returncode == ge.EXIT_NO_WEIGHTS, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    expected_place = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_NAME
    assert ge.FID_WEIGHTS_URL in r.stderr and str(expected_place) in r.stderr
    assert "--fid_weights" in r.stderr
    assert sorted(p.name for p in gen.glob("*.png")) == sample_names(1)
    assert "Average fid score" not in r.stdout


def test_undefined_fid_exits_3_with_a_clear_message(tmp_path, checkpoint, fid_weights, capsys,
                                                    monkeypatch):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (60 * i, 0, 0)).save(ref / f"{i}.png")
    gen = tmp_path / "samples"

    def imaginary(*args, **kwargs):
        raise ValueError("Imaginary component 1.0")

    monkeypatch.setattr(ge, "calculate_frechet_distance", imaginary)
    with pytest.raises(SystemExit) as exit_info:
        ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, ref_data_dir=ref,
                            n_per_class=2, image_size=SIZE, dims=SMALL_DIMS,
                            fid_weights=fid_weights))
    assert exit_info.value.code == ge.EXIT_FID_UNDEFINED
    out, err = capsys.readouterr()
    assert "FID is undefined here (Imaginary component 1.0)" in err
    assert "8 generated images for 64 feature dimensions" in err and "--dims" in err
    assert "Average fid score" not in out
    assert sorted(p.name for p in gen.glob("*.png")) == sample_names(2)


def test_imports_neither_evaluation_script(run_script):
    """The model and its loader come from model.py: sampling does not load the classifier's
    script (a fresh process, since other tests import it here)."""
    probe = "import sys, generation_evaluation; print('classification_evaluation' in sys.modules)"
    proc = run_script("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_missing_checkpoint_is_one_line_without_traceback(tmp_path, run_script):
    r = run_script("generation_evaluation.py", "--checkpoint", tmp_path / "nope.pth",
                   "--gen_data_dir", tmp_path / "s", "--skip_fid")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: no checkpoint at") and "nope.pth" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_reference_fails_before_sampling(tmp_path, checkpoint):
    gen = tmp_path / "samples"
    with pytest.raises(SystemExit) as exit_info:
        ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen,
                            ref_data_dir=tmp_path / "no_such_dir", image_size=SIZE))
    assert str(exit_info.value.code).startswith("error: no reference images in")
    assert "no_such_dir" in exit_info.value.code
    assert not gen.exists()


def test_skip_fid_only_samples_and_the_seed_makes_it_reproducible(tmp_path, checkpoint):
    def run(gen, seed):
        ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, n_per_class=1,
                            image_size=8, skip_fid=True, seed=seed))
        return {p.name: p.read_bytes() for p in gen.glob("*.png")}

    first, again, other = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    assert sorted(first) == sample_names(1) and first == again and first != other


# ------------------------------------------------------------------- temperature and figures

def test_temperature_flag_reaches_the_samples(tmp_path, checkpoint):
    """main at --temperature 0.7 writes what sample_fast draws at T = 0.7 from the seed."""
    gen = tmp_path / "samples"
    ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, n_per_class=2, image_size=8,
                        skip_fid=True, seed=4, temperature=0.7))
    model, labels = load_tiny(checkpoint), drawn_labels(2)
    torch.manual_seed(4)
    expected = sample_fast(model, labels, (3, 8, 8), temperature=0.7)
    assert torch.equal(read_levels(gen, 2), levels(expected))
    torch.manual_seed(4)
    assert not torch.equal(expected, sample_fast(model, labels, (3, 8, 8)))


def test_completions_figure(tmp_path, checkpoint, capsys, data_dir):
    """--completions 2 writes the figure under grids/, and neither samples nor FID."""
    gen = tmp_path / "samples"
    ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, ref_data_dir=data_dir / "test",
                        completions=2, image_size=16))
    out = capsys.readouterr().out
    png = gen / "grids" / "completions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    assert not list(gen.glob("*.png")) and "fid" not in out.lower()


def test_complete_under_every_class_keeps_each_images_top(checkpoint, data_dir):
    model = load_tiny(checkpoint)
    images = ge.load_reference_images(data_dir / "test", 2, 16)           # (2, 3, 16, 16)
    done = ge.complete_under_every_class(model, images, 8, torch.Generator().manual_seed(0))
    assert done.shape == (2, len(my_bidict), 3, 16, 16)
    assert torch.equal(done[:, :, :, :8], images[:, None, :, :8].expand(-1, 4, -1, -1, -1))
    assert not torch.equal(done[:, 0, :, 8:], done[:, 1, :, 8:])


def test_completions_needs_enough_reference_images(tmp_path, checkpoint):
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(ref / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        ge.main(script_args(checkpoint=checkpoint, gen_data_dir=tmp_path / "g", ref_data_dir=ref,
                            completions=3))
    assert exit_info.value.code == f"error: --completions: 3 images asked for, but {ref} holds 1"


@pytest.mark.parametrize("flags, message", [
    (["--completions", "0"], "--completions K needs K >= 1 images, got 0"),
    (["--temperature", "0"], "temperatures must be finite and > 0, got 0.0"),
    (["--temperature_sweep", "1.0", "-0.5"], "temperatures must be finite and > 0, got -0.5"),
])
def test_bad_figure_and_temperature_flags_are_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ge.parse_args(flags)
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["30", "6"])
def test_a_side_the_model_cannot_halve_twice_is_a_usage_error(size, capsys):
    """The image side must be a multiple of 4 (two downsamplings); counts out of range
    (--n_per_class 0 and the like) are tests/test_cli_errors.py's."""
    with pytest.raises(SystemExit) as exit_info:
        ge.parse_args(["--image_size", size])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: " in err and "--image_size" in err, err


@pytest.mark.parametrize("figure", [{}, {"temperature_sweep": [1.0]}, {"completions": 1}],
                         ids=["samples", "sweep", "completions"])
def test_a_checkpoint_of_other_classes_is_an_error_before_sampling(figure, tmp_path, tiny_model):
    """The script samples the four CPEN455 classes: a model of ten (trained on CIFAR-10, say)
    stops with one line naming the file and both counts, for the samples and for either figure,
    and writes nothing."""
    path = tmp_path / "ten_classes.pth"
    torch.save(tiny_model(num_classes=10, nr_filters=4).state_dict(), path)
    with pytest.raises(SystemExit) as exit_info:
        ge.main(script_args(checkpoint=path, gen_data_dir=tmp_path / "g", ref_data_dir=tmp_path,
                            n_per_class=1, image_size=8, skip_fid=True, **figure))
    assert exit_info.value.code == (f"error: {path} knows 10 classes; this script samples the "
                                    f"{len(my_bidict)} CPEN455 classes")
    assert not (tmp_path / "g").exists()


def test_sweep_flag_alone_samples_the_temperatures_the_docstring_gives(tmp_path, checkpoint,
                                                                       capsys):
    """`--temperature_sweep` without values sweeps the temperatures the script's docstring
    promises, in its order, each into a folder of its own; without the flag there is no sweep."""
    promised = re.search(r"--temperature_sweep +# figures only: T = ([\d., ]+)\n", ge.__doc__)
    promised = [float(t) for t in promised.group(1).split(", ")]
    assert ge.parse_args([]).temperature_sweep is None
    args = ge.parse_args(["--temperature_sweep", "--checkpoint", str(checkpoint),
                          "--gen_data_dir", str(tmp_path / "g"), "--n_per_class", "1",
                          "--image_size", "4", "--skip_fid", "--device", "cpu"])
    ge.main(args)
    swept = [float(t) for t in re.findall(r"^T=([\d.]+): ", capsys.readouterr().out, re.M)]
    assert swept == promised
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == sorted(
        ["grids"] + [f"temperature_{t}" for t in promised])


def test_temperature_sweep_end_to_end(tmp_path, checkpoint, fid_weights, monkeypatch, capsys,
                                      data_dir, class_loop):
    """Two temperatures: the samples are sample_fast's at each T from the same seed, the printed
    share and median margin are an independent classifier's on the PNGs, and the printed FID is
    pytorch-fid's calculate_fid_given_paths on the same folders (checked at one T: its Inception
    passes dominate the time)."""
    gen, ref = tmp_path / "samples", copy_images(data_dir / "test", tmp_path / "ref", 8)
    ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, ref_data_dir=ref,
                        temperature_sweep=[1.0, 0.5], n_per_class=2, image_size=16,
                        fid_weights=fid_weights, dims=SMALL_DIMS, batch_size=8))
    out = capsys.readouterr().out
    assert (gen / "grids" / "temperature_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(gen.glob("*.png")), "the sweep's samples stay out of FID's folder"

    model, labels = load_tiny(checkpoint), drawn_labels(2)
    printed_fid = {}
    for t in (1.0, 0.5):
        folder = gen / f"temperature_{t}"
        images = read_levels(folder, 2)
        torch.manual_seed(0)
        assert torch.equal(images, levels(sample_fast(model, labels, (3, 16, 16), temperature=t)))
        ll = class_loop(model, images.float() / 127.5 - 1)                    # (8, classes)
        agreed = (ll.argmax(dim=1) == labels).sum().item()
        margins = sorted(ll[k, labels[k]].item() - max(ll[k, c].item() for c in range(4)
                                                       if c != labels[k]) for k in range(8))
        line = re.search(rf"^T={t}: (\d+) of 8 samples .* classified as the class they were "
                         rf"drawn for, median margin (\S+) nats over the next class; FID (\S+) -> ",
                         out, re.M)
        assert line and int(line.group(1)) == agreed, out
        assert float(line.group(2)) == pytest.approx(margins[3], abs=0.06)   # the lower median
        printed_fid[t] = float(line.group(3))

    course_hub(fid_weights, monkeypatch)
    course = calculate_fid_given_paths([str(gen / "temperature_0.5"), str(ref)], 8, "cpu",
                                       dims=SMALL_DIMS, num_workers=0)
    assert printed_fid[0.5] == pytest.approx(course, rel=1e-6)
    assert printed_fid[1.0] != printed_fid[0.5]


def test_temperature_sweep_says_why_there_is_no_fid(tmp_path, checkpoint, monkeypatch, capsys):
    """No Inception weights: the sweep still samples, classifies and draws, and every temperature
    says FID needs the weights; with --skip_fid it says FID was not asked for."""
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.new("RGB", (SIZE, SIZE)).save(ref / "a.png")

    def no_weights(*args):
        raise ge.FIDWeightsError("no Inception weights here")

    monkeypatch.setattr(ge, "build_fid_inception", no_weights)
    for skip_fid, fid_text in ((False, "needs the Inception weights"),
                               (True, r"not computed \(--skip_fid\)")):
        gen = tmp_path / f"g_{skip_fid}"
        ge.main(script_args(checkpoint=checkpoint, gen_data_dir=gen, ref_data_dir=ref,
                            n_per_class=1, image_size=8, skip_fid=skip_fid,
                            temperature_sweep=[0.8]))
        out = capsys.readouterr().out
        line = rf"^T=0.8: \d of 4 samples .* over the next class; FID {fid_text} -> "
        assert re.search(line, out, re.M), out
        explained = "FID per temperature needs the Inception weights: no Inception weights here"
        assert (explained in out) is not skip_fid
        assert (gen / "grids" / "temperature_sweep.png").is_file()
        assert sorted(p.name for p in (gen / "temperature_0.8").glob("*.png")) == sample_names(1)
