"""Sample the trained conditional PixelCNN++ class by class and score the samples with FID against
the CPEN455 test images, with the course's interface (`my_sample`) and grading (pytorch-fid,
batch 128, 192-dimensional Inception features).

    python generation_evaluation.py                  # models/conditional_pixelcnn.pth -> samples/
    python generation_evaluation.py --fid_weights pt_inception-2015-12-05-6726825d.pth
    python generation_evaluation.py --skip_fid --n_per_class 8 --seed 1
    python generation_evaluation.py --temperature 0.8       # sharper, less varied samples
    python generation_evaluation.py --completions 4         # figures only: no samples for FID
    python generation_evaluation.py --temperature_sweep     # figures only: T = 1.0, 0.9, 0.8, 0.7

It writes `--n_per_class` PNGs per class into `--gen_data_dir` (`Class0_00.png`, ...), a grid
with one row per class next to that folder (`samples_grid.png`), and prints

    #generated images: 100, #reference images: 519
    Average fid score: <float>

FID needs pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth, 96 MB). With
internet they are downloaded once into the torch hub cache; on a machine without it (a cluster
node), fetch the file elsewhere and pass `--fid_weights PATH`. Exit codes: 1 bad input found
before sampling (a missing checkpoint or reference folder, --fid_weights that are not the
weights), 2 bad flags (before anything else) or, after sampling, no Inception weights in the hub
cache, 3 FID undefined for this many samples; after 2 and 3 the samples are kept.

Two figures instead of the samples and FID (both go in `<gen_data_dir>/grids/`, a subfolder, so
FID never reads them):
- `--completions K`: the first K reference images with their top half kept, completed under every
  class (`completions.png`);
- `--temperature_sweep [T ...]`: `--n_per_class` samples per class at each temperature, written to
  `<gen_data_dir>/temperature_<T>/`, a grid per temperature (`temperature_sweep.png`), the share
  of them the model's own Bayes classifier assigns to the class they were drawn for and the median
  margin of that class's log-likelihood over the next; FID per temperature where the Inception
  weights are at hand, and a line saying why not where they are not.
"""

import argparse
import hashlib
import math
import pickle
import re
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_fid.fid_score import (IMAGE_EXTENSIONS, calculate_activation_statistics,
                                   calculate_frechet_distance)
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torchvision.utils import make_grid, save_image

from cli import COUNT, POSITIVE_INT, check_output_dirs, errors_in_one_line
from dataset import CLASS_NAMES, my_bidict, one_line, rescaling_inv, resize_and_rescale
from model import DEFAULT_CHECKPOINT, load_model
from utils import (bayes_predictions, check_temperature, class_log_posterior, complete,
                   dataset_log_likelihoods,
                   line_buffered_stdout, pick_device, progress_bar, sample_fast)

IMAGE_SIZE = 32                 # the course samples and grades 32x32 images
SAMPLES_PER_CLASS = 25          # the course's sample_batch_size: 4 x 25 = 100 generated images
FID_BATCH_SIZE = 128            # the course's BATCH_SIZE for pytorch-fid
FID_DIMS = 192                  # the course's dims: Inception features after the second max-pool
FID_WEIGHTS_NAME = FID_WEIGHTS_URL.rsplit("/", 1)[1]    # pt_inception-2015-12-05-6726825d.pth
FID_WEIGHTS_SHA256_PREFIX = torch.hub.HASH_REGEX.search(FID_WEIGHTS_NAME).group(1)
EXIT_NO_WEIGHTS = 2
EXIT_FID_UNDEFINED = 3
SWEEP_TEMPERATURES = (1.0, 0.9, 0.8, 0.7)
SWEEP_GRID_COLUMNS = 6          # samples per class shown in the sweep figure (all are classified;
                                # noisy samples barely compress: at 6, 4 temperatures take 370 KB)
NO_WEIGHTS_TEXT = "needs the Inception weights"
SAMPLE_NAME = re.compile(rf"^(?:{'|'.join(map(re.escape, my_bidict))})_\d+\.png$")


class FIDWeightsError(Exception):
    """The FID Inception weights could be neither found nor downloaded (or are not valid)."""


class FIDUndefinedError(Exception):
    """The Fréchet distance of these statistics is not a real number."""


# ------------------------------------------------------------------------------------- sampling

def remove_old_samples(gen_data_dir):
    """Delete the PNGs an earlier run wrote (`<class>_<index>.png`), so FID never counts stale
    images; every other file stays. Returns how many were removed."""
    old = [p for p in Path(gen_data_dir).glob("*.png") if SAMPLE_NAME.match(p.name)]
    for p in old:
        p.unlink()
    return len(old)


def my_sample(model, gen_data_dir, sample_batch_size=SAMPLES_PER_CLASS,
              obs=(3, IMAGE_SIZE, IMAGE_SIZE), sample_op=None, temperature=1.0):
    """The course's hook: `sample_batch_size` images of every class in my_bidict, saved as 8-bit
    PNGs `<class>_<index>.png` (Class0_00.png, ...) in gen_data_dir, after removing that folder's
    old samples.

    sample_op(model, labels, obs) -> (B, *obs) in [-1, 1] draws one image per label (int64 (B,)
    on the model's device); the default is utils.sample_fast with a progress bar, called once for
    all classes together, at `temperature` (a sample_op of your own takes no temperature from
    here). The model is sampled in eval mode (dropout off) and left in the mode it came in.
    Returns all images, (classes * sample_batch_size, *obs) in [-1, 1] on the CPU, one class after
    another.
    """
    check_temperature(temperature)
    if sample_op is not None and temperature != 1.0:
        raise ValueError("temperature applies to the default sampler; give your sample_op its own")
    sample_op = sample_op or partial(sample_fast, progress=True, temperature=temperature)
    gen_data_dir = Path(gen_data_dir)
    gen_data_dir.mkdir(parents=True, exist_ok=True)
    remove_old_samples(gen_data_dir)
    device = next(model.parameters()).device
    digits = max(2, len(str(sample_batch_size - 1)))
    was_training = model.training
    model.eval()
    print(f"sampling {sample_batch_size} images of each of {', '.join(CLASS_NAMES)}")
    labels = torch.arange(len(my_bidict), device=device).repeat_interleave(sample_batch_size)
    images = sample_op(model, labels, obs).detach().cpu()               # (B, C, H, W) in [-1, 1]
    assert images.shape == (labels.shape[0], *obs), (images.shape, obs)
    model.train(was_training)
    for k, image in enumerate(rescaling_inv(images)):
        name = my_bidict.inverse[k // sample_batch_size]
        save_image(image, gen_data_dir / f"{name}_{k % sample_batch_size:0{digits}d}.png")
    return images


def grid_path(gen_data_dir):
    """The grid goes in a subfolder: FID reads every image directly in gen_data_dir."""
    return Path(gen_data_dir) / "grids" / "generated_grid.png"


def figure_path(gen_data_dir, name):
    """Where a figure goes: next to the grid, out of FID's way. Makes the folder."""
    path = Path(gen_data_dir) / "grids" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------- figures

def load_reference_images(folder, k, image_size):
    """The first k images of a folder, in the order FID reads them: (k, 3, S, S) in [-1, 1],
    resized as the dataset resizes. Raises ValueError when the folder holds fewer than k."""
    files = image_files(folder)[:k]
    if len(files) < k:
        raise ValueError(f"{k} images asked for, but {folder} holds {len(files)}")
    images = []
    for f in files:
        with Image.open(f) as image:
            pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
        images.append(resize_and_rescale(pixels.float() / 255.0, image_size))
    return torch.stack(images)                                            # (k, 3, S, S)


def complete_under_every_class(model, images, rows, generator=None, temperature=1.0):
    """Keep the first `rows` rows of each image and complete it under every class:
    (K, C, H, W) -> (K, classes, C, H, W), on the model's device."""
    k, n = images.shape[0], model.num_classes
    device = next(model.parameters()).device
    x = images.to(device).repeat_interleave(n, dim=0)                    # (K*n, C, H, W)
    labels = torch.arange(n, device=device).repeat(k)                    # (K*n,): 0..n-1 per image
    completed = complete(model, x, labels, rows, generator, temperature, progress=True)
    return completed.view(k, n, *images.shape[1:])


def _show(ax, image):
    """Draw one (C, H, W) image in [-1, 1] without axes ticks."""
    ax.imshow(rescaling_inv(image).clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
              interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])


def save_completions_png(originals, completed, rows, class_names, path, temperature):
    """One row per image: the original, the part kept (the rest grey), and its completion under
    every class, with a dashed line where the kept rows end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k, n = completed.shape[:2]
    fig, axes = plt.subplots(k, n + 2, figsize=(1.3 * (n + 2), 1.35 * k + 0.6), squeeze=False)
    kept = originals.clone()
    kept[:, :, rows:] = 0.0                                              # grey in [-1, 1]
    for row in range(k):
        _show(axes[row, 0], originals[row])
        _show(axes[row, 1], kept[row])
        for c in range(n):
            _show(axes[row, c + 2], completed[row, c])
            axes[row, c + 2].axhline(rows - 0.5, color="white", lw=0.8, ls="--")
    for col, name in enumerate(["original", "kept"] + list(class_names)):
        axes[0, col].set_title(name, fontsize=9)
    fig.suptitle(f"top {rows} rows kept, the rest sampled under each class (T = {temperature})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def completions(model, args, images, device):
    """The --completions figure: each image's top half kept and completed under every class."""
    rows = args.image_size // 2
    generator = torch.Generator(device=device).manual_seed(args.seed)
    completed = complete_under_every_class(model, images, rows, generator, args.temperature)
    path = figure_path(args.gen_data_dir, "completions.png")
    save_completions_png(images, completed.cpu(), rows, CLASS_NAMES, path, args.temperature)
    print(f"{images.shape[0]} images from {args.ref_data_dir}, top {rows} rows kept, completed "
          f"under {', '.join(CLASS_NAMES)} -> {path}")


def class_evidence(model, images, labels, device):
    """How the model's own Bayes classifier sees images drawn for `labels` (N,): the share it
    assigns to their label, and the median margin in nats of log p(x | label) + log pi(label) over
    the likeliest other class (the lower median for even N)."""
    ll = dataset_log_likelihoods(model, images, model.num_classes, device=device,
                                 progress=True)                           # (N, classes)
    posterior = class_log_posterior(model, ll)                            # (N, classes)
    own = posterior.gather(1, labels[:, None])[:, 0]                      # (N,)
    best_other = posterior.scatter(1, labels[:, None], -math.inf).amax(dim=1)   # (N,)
    share = (bayes_predictions(model, ll) == labels).double().mean().item()
    return share, (own - best_other).median().item()


def save_sweep_png(results, n_per_class, class_names, path):
    """A grid per temperature, two to a row (a row per class, up to SWEEP_GRID_COLUMNS samples
    each), titled with the share classified as drawn, the median margin and the FID where there
    is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns, n = min(n_per_class, SWEEP_GRID_COLUMNS), len(class_names)
    panels_across = min(2, len(results))
    panels_down = -(-len(results) // panels_across)
    inch_per_image = 0.5          # about 1.5 screen pixels per image pixel at dpi 100
    fig, axes = plt.subplots(panels_down, panels_across, squeeze=False,
                             figsize=(panels_across * (inch_per_image * columns + 1.0),
                                      panels_down * (inch_per_image * n + 0.7)))
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, result in zip(axes.flat, results):
        shown = result["images"].view(n, n_per_class, *result["images"].shape[1:])[:, :columns]
        grid = make_grid(rescaling_inv(shown.flatten(0, 1)), nrow=columns, padding=1)   # (3, h, w)
        ax.imshow(grid.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        side = grid.shape[1] / n
        ax.set_yticks([side * (c + 0.5) for c in range(n)], class_names, fontsize=8)
        ax.set_xticks([])
        fid = f", FID {result['fid']:.1f}" if result["fid"] is not None else ""
        ax.set_title(f"T = {result['temperature']}: {100 * result['share']:.0f}% classified as "
                     f"drawn\nmedian margin {result['margin']:.0f} nats{fid}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def temperature_sweep(model, args, temperatures, fid, no_fid_text, device):
    """The --temperature_sweep figure and numbers: for each temperature, the same seed's samples,
    the share classified as drawn, the median margin and, when `fid` = (net, reference
    statistics) is given, FID; without it each temperature's line ends in `no_fid_text`."""
    obs = (model.input_channels, args.image_size, args.image_size)
    labels = torch.arange(model.num_classes).repeat_interleave(args.n_per_class)
    results = []
    for temperature in progress_bar(temperatures, "temperatures"):
        folder = Path(args.gen_data_dir) / f"temperature_{temperature}"
        torch.manual_seed(args.seed)           # the same noise at every temperature
        images = my_sample(model, folder, args.n_per_class, obs, temperature=temperature)
        share, margin = class_evidence(model, images, labels, device)
        result = dict(temperature=temperature, images=images, folder=folder, share=share,
                      margin=margin, fid=None, fid_text=f"; FID {no_fid_text}")
        if fid is not None:
            net, stats_ref = fid
            stats = folder_statistics(image_files(folder), net, args.dims, args.batch_size, device)
            try:
                result["fid"] = frechet_distance(stats, stats_ref)
                result["fid_text"] = f"; FID {result['fid']}"
            except FIDUndefinedError as err:
                result["fid_text"] = f"; FID undefined ({err})"
        results.append(result)
    path = figure_path(args.gen_data_dir, "temperature_sweep.png")
    save_sweep_png(results, args.n_per_class, CLASS_NAMES, path)
    for r in results:
        agreed = round(r["share"] * labels.shape[0])
        print(f"T={r['temperature']}: {agreed} of {labels.shape[0]} samples "
              f"({100 * r['share']:.1f}%) classified as the class they were drawn for, median "
              f"margin {r['margin']:.1f} nats over the next class{r['fid_text']} -> {r['folder']}/")
    print(f"temperature sweep -> {path}")


# ------------------------------------------------------------------------------------------ FID

def image_files(folder):
    """The images pytorch-fid's compute_statistics_of_path reads from a folder, in its order."""
    folder = Path(folder)
    return sorted(f for ext in IMAGE_EXTENSIONS for f in folder.glob(f"*.{ext}"))


def weights_help(reason):
    """What to do when the Inception weights are missing, as a message naming file and place."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME
    return (f"the FID Inception weights are unavailable ({reason}). Fetch {FID_WEIGHTS_URL} on a "
            f"machine with internet and either put it at {cached} or pass --fid_weights PATH")


def _sha256_prefix(path, length):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def build_fid_inception(dims=FID_DIMS, device="cpu", weights=None):
    """pytorch-fid's FID Inception network, returning the `dims`-dimensional features, in eval mode.

    Without `weights`, pytorch-fid fetches its weights through torch.hub: from the hub cache,
    torch.hub.get_dir()/checkpoints/FID_WEIGHTS_NAME, or by downloading FID_WEIGHTS_URL there.
    With `weights` (a local copy of that file), the network is still built by pytorch-fid's own
    code, which patches torchvision's Inception into the TF-FID variant, and only the place the
    weights come from changes: for the duration of the build the hub directory is a temporary
    one whose checkpoints/FID_WEIGHTS_NAME links to `weights`, so torch.hub finds it cached and
    never touches the network. This repeats none of the architecture and monkeypatches nothing;
    the strict load_state_dict still rejects a file of another architecture.

    Raises FIDWeightsError with a one-line reason.
    """
    block = [InceptionV3.BLOCK_INDEX_BY_DIM[dims]]
    if weights is None:
        try:
            net = InceptionV3(block)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            # OSError covers urllib's URLError and timeouts; the rest is a corrupt cached file.
            raise FIDWeightsError(weights_help(one_line(err))) from err
        return net.to(device).eval()

    weights = Path(weights).resolve()
    if not weights.is_file():
        raise FIDWeightsError(weights_help(f"--fid_weights {weights} is not a file"))
    if _sha256_prefix(weights, len(FID_WEIGHTS_SHA256_PREFIX)) != FID_WEIGHTS_SHA256_PREFIX:
        print(f"warning: {weights} is not the official {FID_WEIGHTS_NAME} (its sha256 does not "
              f"start with {FID_WEIGHTS_SHA256_PREFIX}); the score is not comparable with the "
              f"course's")
    previous_hub_dir = torch.hub.get_dir()      # set back below: later hub lookups are unchanged
    with tempfile.TemporaryDirectory() as hub_dir:
        link = Path(hub_dir) / "checkpoints" / FID_WEIGHTS_NAME
        link.parent.mkdir()
        try:
            link.symlink_to(weights)
        except OSError:                          # no symlinks (Windows without developer mode)
            shutil.copyfile(weights, link)
        torch.hub.set_dir(hub_dir)
        try:
            net = InceptionV3(block)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
            raise FIDWeightsError(f"--fid_weights {weights} is not a valid copy of "
                                  f"{FID_WEIGHTS_NAME}: {one_line(err)}") from err
        finally:
            torch.hub.set_dir(previous_hub_dir)
    return net.to(device).eval()


def folder_statistics(files, net, dims=FID_DIMS, batch_size=FID_BATCH_SIZE, device="cpu"):
    """Mean (dims,) and covariance (dims, dims) of the Inception features of image files, computed
    by pytorch-fid (in-process loading: num_workers=0)."""
    # pytorch-fid shrinks a batch larger than the folder itself, with a warning; do it quietly.
    return calculate_activation_statistics(files, net, min(batch_size, len(files)), dims, device,
                                           num_workers=0)


def frechet_distance(stats_gen, stats_ref):
    """pytorch-fid's Fréchet distance of two (mean, covariance) pairs, as a float.

    Raises FIDUndefinedError where pytorch-fid finds an imaginary component in the matrix square
    root: with fewer images than dims the covariances are singular and sqrtm(S1 S2) need not be
    real.
    """
    try:
        fid = float(calculate_frechet_distance(*stats_gen, *stats_ref))
    except ValueError as err:
        if not str(err).startswith("Imaginary component"):
            raise
        raise FIDUndefinedError(one_line(err)) from err
    if not math.isfinite(fid):
        raise FIDUndefinedError(f"the distance is {fid}")
    return fid


# ----------------------------------------------------------------------------------------- main

def prepare_fid(args, device):
    """What FID needs, checked before any long sampling: (reference files, Inception network,
    the FIDWeightsError that kept the network from being built), all None with --skip_fid.
    Exits on a missing reference folder, and on --fid_weights that are not the weights (a
    truncated download): the user named that file. Weights the hub cannot fetch only warn."""
    if args.skip_fid:
        return None, None, None
    ref_files = image_files(args.ref_data_dir)
    if not ref_files:
        sys.exit(f"error: no reference images in {args.ref_data_dir}; fetch the data with "
                 f"`python dataset.py --download` or pass --ref_data_dir")
    try:
        return ref_files, build_fid_inception(args.dims, device, args.fid_weights), None
    except FIDWeightsError as err:
        if args.fid_weights is not None:
            sys.exit(f"error: {err}")
        print(f"warning: {err}. Sampling anyway; FID will be skipped.")
        return ref_files, None, err


def figures(model, args, device):
    """--completions and --temperature_sweep: the figures, instead of the samples and FID. Bad
    input (too few reference images, no reference folder) stops before any sampling."""
    images, sweep = None, args.temperature_sweep is not None
    if args.completions is not None:
        try:
            images = load_reference_images(args.ref_data_dir, args.completions, args.image_size)
        except ValueError as err:
            sys.exit(f"error: --completions: {err}")
    ref_files, net, weights_error = prepare_fid(args, device) if sweep else (None, None, None)
    if images is not None:
        completions(model, args, images, device)
    if not sweep:
        return
    fid, no_fid_text = None, "not computed (--skip_fid)"
    if net is not None:
        fid = (net, folder_statistics(ref_files, net, args.dims, args.batch_size, device))
    elif weights_error is not None:
        no_fid_text = NO_WEIGHTS_TEXT
    temperature_sweep(model, args, args.temperature_sweep or SWEEP_TEMPERATURES, fid, no_fid_text,
                      device)
    if weights_error is not None:
        print(f"FID per temperature {NO_WEIGHTS_TEXT}: {weights_error}")


def main(args):
    device = pick_device(args.device)
    try:
        model = load_model(args.checkpoint, device)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        sys.exit(f"error: cannot load {args.checkpoint}: {one_line(err)}")
    if model.num_classes != len(my_bidict):
        sys.exit(f"error: {args.checkpoint} knows {model.num_classes} classes; this script samples "
                 f"the {len(my_bidict)} CPEN455 classes")

    if args.completions is not None or args.temperature_sweep is not None:
        figures(model, args, device)
        return
    ref_files, net, weights_error = prepare_fid(args, device)

    gen_dir = Path(args.gen_data_dir)
    torch.manual_seed(args.seed)   # after the Inception build, whose init draws from the same RNG
    images = my_sample(model, gen_dir, args.n_per_class,
                       (model.input_channels, args.image_size, args.image_size),
                       temperature=args.temperature)
    grid_path(gen_dir).parent.mkdir(exist_ok=True)
    save_image(rescaling_inv(images), grid_path(gen_dir), nrow=args.n_per_class, padding=1)
    print(f"{images.shape[0]} samples -> {gen_dir}/, grid ({', '.join(CLASS_NAMES)}, one row "
          f"each) -> {grid_path(gen_dir)}")
    if args.skip_fid:
        return
    if weights_error is not None:
        print(f"error: {weights_error}. The samples in {gen_dir}/ are kept.", file=sys.stderr)
        sys.exit(EXIT_NO_WEIGHTS)

    gen_files = image_files(gen_dir)
    print(f"#generated images: {len(gen_files)}, #reference images: {len(ref_files)}")
    stats_gen = folder_statistics(gen_files, net, args.dims, args.batch_size, device)
    stats_ref = folder_statistics(ref_files, net, args.dims, args.batch_size, device)
    try:
        fid = frechet_distance(stats_gen, stats_ref)
    except FIDUndefinedError as err:
        print(f"error: FID is undefined here ({err}): {len(gen_files)} generated images for "
              f"{args.dims} feature dimensions make the covariance singular. Generate more images "
              f"(--n_per_class) or use a smaller --dims. The samples in {gen_dir}/ are kept.",
              file=sys.stderr)
        sys.exit(EXIT_FID_UNDEFINED)
    print(f"Average fid score: {fid}")


def parse_args(argv=None):
    """The command line, checked: bad values stop with a one-line usage error."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model to sample")
    p.add_argument("--gen_data_dir", default="samples",
                   help="where the PNGs go (its old <class>_<index>.png files are removed first)")
    p.add_argument("--ref_data_dir", default="data/test", help="reference images for FID")
    p.add_argument("--n_per_class", type=POSITIVE_INT, default=SAMPLES_PER_CLASS,
                   help="images sampled per class")
    p.add_argument("--image_size", type=int, default=IMAGE_SIZE,
                   help="side of the sampled images (divisible by 4); the course grades 32")
    p.add_argument("--dims", type=int, default=FID_DIMS,
                   choices=sorted(InceptionV3.BLOCK_INDEX_BY_DIM),
                   help="Inception feature size for FID; the course uses 192")
    p.add_argument("--batch_size", type=POSITIVE_INT, default=FID_BATCH_SIZE,
                   help="images per Inception forward pass")
    p.add_argument("--fid_weights", default=None,
                   help=f"local copy of {FID_WEIGHTS_NAME}, for machines without internet; "
                        f"without it the torch hub cache is used, downloading into it if missing")
    p.add_argument("--skip_fid", action="store_true", help="only sample, no FID")
    p.add_argument("--seed", type=COUNT, default=0, help="random seed of the sampler")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature T: mixture logits divided by T, logistic scales "
                        "multiplied by T; below 1 sharper and less varied samples")
    p.add_argument("--completions", type=int, default=None, metavar="K",
                   help="instead of sampling for FID, write grids/completions.png: the first K "
                        "--ref_data_dir images, top half kept, completed under every class")
    p.add_argument("--temperature_sweep", type=float, nargs="*", default=None, metavar="T",
                   help="instead of sampling for FID, sample --n_per_class per class at each T "
                        f"(none given: {' '.join(map(str, SWEEP_TEMPERATURES))}), classify them "
                        "and write grids/temperature_sweep.png; FID per T where the Inception "
                        "weights are at hand")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    args = p.parse_args(argv)
    if args.image_size < 4 or args.image_size % 4:
        p.error(f"--image_size must be a positive multiple of 4, got {args.image_size}")
    if args.completions is not None and args.completions < 1:
        p.error(f"--completions K needs K >= 1 images, got {args.completions}")
    for flag, values in (("--temperature", [args.temperature]),
                         ("--temperature_sweep", args.temperature_sweep or [])):
        for t in values:
            if not 0 < t < math.inf:
                p.error(f"temperatures must be finite and > 0, got {t} ({flag})")
    # Paths too fail here, in a second, not after minutes of sampling.
    check_output_dirs(p, args, "gen_data_dir")
    if args.fid_weights is not None and not Path(args.fid_weights).is_file():
        p.error(f"--fid_weights {args.fid_weights} is not a file")
    return args


if __name__ == "__main__":
    line_buffered_stdout()
    with errors_in_one_line():
        main(parse_args())
