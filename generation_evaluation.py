"""Sample the trained conditional PixelCNN++ class by class and score the samples with FID against
the CPEN455 test images, with the course's interface (`my_sample`) and grading (pytorch-fid,
batch 128, 192-dimensional Inception features).

    python generation_evaluation.py                  # models/conditional_pixelcnn.pth -> samples/
    python generation_evaluation.py --fid_weights pt_inception-2015-12-05-6726825d.pth
    python generation_evaluation.py --skip_fid --n_per_class 8 --seed 1

It writes `--n_per_class` PNGs per class into `--gen_data_dir` (`Class0_00.png`, ...), a grid
with one row per class next to that folder (`samples_grid.png`), and prints

    #generated images: 100, #reference images: 519
    Average fid score: <float>

FID needs pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth, 96 MB). With
internet they are downloaded once into the torch hub cache; on a machine without it (a cluster
node), fetch the file elsewhere and pass `--fid_weights PATH`. Exit codes: 1 bad input (missing
checkpoint or reference folder, found before sampling), 2 the Inception weights are unavailable,
3 FID undefined for this many samples; after 2 and 3 the samples are kept.
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

import torch
from pytorch_fid.fid_score import (IMAGE_EXTENSIONS, calculate_activation_statistics,
                                   calculate_frechet_distance)
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from torchvision.utils import save_image

from dataset import CLASS_NAMES, my_bidict, one_line, rescaling_inv
from model import DEFAULT_CHECKPOINT, load_model
from utils import line_buffered_stdout, pick_device, sample_fast

IMAGE_SIZE = 32                 # the course samples and grades 32x32 images
SAMPLES_PER_CLASS = 25          # the course's sample_batch_size: 4 x 25 = 100 generated images
FID_BATCH_SIZE = 128            # the course's BATCH_SIZE for pytorch-fid
FID_DIMS = 192                  # the course's dims: Inception features after the second max-pool
FID_WEIGHTS_NAME = FID_WEIGHTS_URL.rsplit("/", 1)[1]    # pt_inception-2015-12-05-6726825d.pth
FID_WEIGHTS_SHA256_PREFIX = torch.hub.HASH_REGEX.search(FID_WEIGHTS_NAME).group(1)
EXIT_NO_WEIGHTS = 2
EXIT_FID_UNDEFINED = 3
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
              obs=(3, IMAGE_SIZE, IMAGE_SIZE), sample_op=None):
    """The course's hook: `sample_batch_size` images of every class in my_bidict, saved as 8-bit
    PNGs `<class>_<index>.png` (Class0_00.png, ...) in gen_data_dir, after removing that folder's
    old samples.

    sample_op(model, labels, obs) -> (B, *obs) in [-1, 1] draws one image per label (int64 (B,)
    on the model's device); the default is utils.sample_fast with a progress bar, called once for
    all classes together. The model is sampled in eval mode (dropout off) and left in the mode it
    came in. Returns all images, (classes * sample_batch_size, *obs) in [-1, 1] on the CPU, one
    class after another.
    """
    sample_op = sample_op or partial(sample_fast, progress=True)
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

    # Everything that can fail fast does so before the long sampling step.
    net, weights_error = None, None
    if not args.skip_fid:
        ref_files = image_files(args.ref_data_dir)
        if not ref_files:
            sys.exit(f"error: no reference images in {args.ref_data_dir}; fetch the data with "
                     f"`python dataset.py --download` or pass --ref_data_dir")
        try:
            net = build_fid_inception(args.dims, device, args.fid_weights)
        except FIDWeightsError as err:
            weights_error = err
            print(f"warning: {err}. Sampling anyway; FID will be skipped.")

    gen_dir = Path(args.gen_data_dir)
    torch.manual_seed(args.seed)   # after the Inception build, whose init draws from the same RNG
    images = my_sample(model, gen_dir, args.n_per_class,
                       (model.input_channels, args.image_size, args.image_size))
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


if __name__ == "__main__":
    line_buffered_stdout()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model to sample")
    p.add_argument("--gen_data_dir", default="samples",
                   help="where the PNGs go (its old <class>_<index>.png files are removed first)")
    p.add_argument("--ref_data_dir", default="data/test", help="reference images for FID")
    p.add_argument("--n_per_class", type=int, default=SAMPLES_PER_CLASS,
                   help="images sampled per class")
    p.add_argument("--image_size", type=int, default=IMAGE_SIZE,
                   help="side of the sampled images (divisible by 4); the course grades 32")
    p.add_argument("--dims", type=int, default=FID_DIMS,
                   choices=sorted(InceptionV3.BLOCK_INDEX_BY_DIM),
                   help="Inception feature size for FID; the course uses 192")
    p.add_argument("--batch_size", type=int, default=FID_BATCH_SIZE,
                   help="images per Inception forward pass")
    p.add_argument("--fid_weights", default=None,
                   help=f"local copy of {FID_WEIGHTS_NAME}, for machines without internet; "
                        f"without it the torch hub cache is used, downloading into it if missing")
    p.add_argument("--skip_fid", action="store_true", help="only sample, no FID")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    args = p.parse_args()
    if args.n_per_class < 1 or args.image_size < 4 or args.image_size % 4:
        p.error("--n_per_class must be >= 1 and --image_size a positive multiple of 4")
    main(args)
