"""Image datasets for the conditional PixelCNN++: CPEN455 (4 classes), CIFAR-10 and MNIST.

The CPEN455 data is the `data/` folder of the course repository DSL-Lab/CPEN455HW-2023W2:
`train.csv`, `validation.csv`, `test.csv` (headerless rows `<split>/<file>.jpg,<label>`, paths
relative to the folder; test labels are -1) next to the 64x64 JPEGs they name. Every dataset here
decodes all images once, at construction, into one float tensor `images` (N, C, H, W) in [-1, 1]
with `labels` (N,) int64, so the training loop never touches JPEG decoding.

Fetch the dataset into ./data (about 10 MB) and print a summary of each split:

    python dataset.py --download --data_dir data

Summarise a folder that already holds it:

    python dataset.py --data_dir ../shared/cpen455
"""

import argparse
import csv
import http.client
import os
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from bidict import bidict
from PIL import Image
from tqdm import tqdm

my_bidict = bidict({'Class0': 0, 'Class1': 1, 'Class2': 2, 'Class3': 3})
CLASS_NAMES = ("hamburger", "panda", "koala", "pizza")  # index = label
NUM_CLASSES = len(my_bidict)
UNLABELLED = -1  # the label every row of test.csv carries: the course hides the test labels

DEFAULT_URL = "https://github.com/DSL-Lab/CPEN455HW-2023W2/archive/refs/heads/main.zip"
SPLIT_SIZES = {"train": 4159, "validation": 519, "test": 519}
DATASETS = ("cpen455", "cifar10", "mnist")
DOWNLOAD_CHUNK_BYTES = 1 << 20


class DatasetError(Exception):
    """Bad input data (missing folder or file, malformed CSV row, undecodable image, bad archive).

    The message is one line naming the offending file or row, fit to print as `error: <msg>`.
    """


def rescaling(x):
    """Map pixel values from [0, 1] to [-1, 1], the range the model sees."""
    return x * 2.0 - 1.0


def rescaling_inv(x):
    """Map model-range values from [-1, 1] back to [0, 1] pixels."""
    return (x + 1.0) * 0.5


def resize_and_rescale(x, image_size):
    """Default CPEN455 transform: (3, H, W) in [0, 1] -> (3, S, S) in [-1, 1].

    Antialiased bilinear matches the course pipeline's PIL `Resize` to within JPEG noise.
    """
    x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear",
                      antialias=True, align_corners=False)[0]  # (3, S, S)
    return rescaling(x)


def one_line(err):
    """First line of an exception's message, so errors print as a single `error:` line."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory as one tensor.

    images: (N, C, H, W) float32 in [-1, 1]; labels: (N,) int64 (-1 = unlabelled).
    Indexing returns (image (C, H, W), int label).
    """

    def __init__(self, images, labels, class_names):
        assert images.ndim == 4 and labels.shape == (images.shape[0],), (images.shape, labels.shape)
        self.images = images
        self.labels = labels
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    @classmethod
    def from_torchvision(cls, tv_dataset):
        """Convert a torchvision CIFAR10/MNIST dataset (uint8 `.data`, `.targets`, `.classes`)."""
        data = torch.as_tensor(tv_dataset.data)
        if data.ndim == 3:
            data = data[:, None]  # (N, H, W) grayscale -> (N, 1, H, W)
        else:
            data = data.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        images = rescaling(data.contiguous().float() / 255.0)
        labels = torch.as_tensor(tv_dataset.targets, dtype=torch.int64)
        return cls(images, labels, tv_dataset.classes)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def missing_split(data_dir, mode):
    """The one-line message for a CPEN455 folder without the CSV of split `mode`."""
    return (f"{Path(data_dir) / f'{mode}.csv'} not found: {data_dir} holds no {mode} split. Pass "
            f"--data_dir a folder with {', '.join(f'{m}.csv' for m in SPLIT_SIZES)} and their "
            f"images, or fetch one with `python dataset.py --download --data_dir DIR`")


def check_splits(name, data_dir, modes, download=False):
    """Raise DatasetError at once, before any image is decoded, when the CPEN455 folder data_dir
    lacks the CSV of one of `modes`. With `download`, a folder without train.csv is fine:
    load_dataset fetches every split into it. CIFAR-10 and MNIST are left to torchvision."""
    data_dir = Path(data_dir)
    if name != "cpen455" or (download and not (data_dir / "train.csv").is_file()):
        return
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder")
    for mode in modes:
        if not (data_dir / f"{mode}.csv").is_file():
            raise DatasetError(missing_split(data_dir, mode))


class CPEN455Dataset(TensorImageDataset):
    """One split of the CPEN455 dataset, decoded once into memory.

    Reads `<root_dir>/<mode>.csv` and the JPEGs it names (relative to root_dir), in file order.
    Grayscale JPEGs become 3 identical channels. Each image, as float (3, H, W) in [0, 1], goes
    through `transform` once, at load; the default resizes to image_size x image_size and rescales
    to [-1, 1] (image_size is ignored when a transform is given). Because the results are stored,
    the transform must be deterministic and return tensors of one shape: random augmentation
    belongs on batches, in the trainer.

    Attributes: images (N, 3, S, S) float32, labels (N,) int64 with -1 for unlabelled rows,
    paths (the CSV's relative paths, in file order). Raises DatasetError on any bad input;
    no row is ever skipped.
    """

    def __init__(self, root_dir, mode="train", transform=None, image_size=32):
        self.root_dir = Path(root_dir)
        self.mode = mode
        if not self.root_dir.is_dir():
            raise DatasetError(f"dataset folder {self.root_dir} not found; run "
                               f"`python dataset.py --download --data_dir {self.root_dir}`")
        csv_path = self.root_dir / f"{mode}.csv"
        if not csv_path.is_file():
            raise DatasetError(missing_split(self.root_dir, mode))
        if transform is None:
            transform = partial(resize_and_rescale, image_size=image_size)

        rows = _read_rows(csv_path)
        images = []
        for line, rel_path, _ in tqdm(rows, desc=f"decoding {mode}", unit="img", disable=None):
            image = _decode_rgb(self.root_dir / rel_path, f"{csv_path}:{line}")  # (3, H, W)
            images.append(transform(image.float() / 255.0))
        self.paths = [rel_path for _, rel_path, _ in rows]
        labels = torch.tensor([label for _, _, label in rows], dtype=torch.int64)
        super().__init__(torch.stack(images).to(torch.float32), labels, CLASS_NAMES)


def _read_rows(csv_path):
    """Parse a split CSV into [(line number, relative path, label)], validating every row."""
    valid_labels = {UNLABELLED, *my_bidict.values()}
    rows = []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        for fields in reader:
            where = f"{csv_path}:{reader.line_num}"
            if len(fields) != 2 or not fields[0].strip():
                raise DatasetError(f"{where}: malformed row {','.join(fields)!r}, "
                                   f"expected `<split>/<file>.jpg,<label>`")
            rel_path, label_text = fields[0].strip(), fields[1].strip()
            try:
                label = int(label_text)
            except ValueError:
                raise DatasetError(f"{where}: malformed row, label {label_text!r} is not an integer")
            if label not in valid_labels:
                raise DatasetError(f"{where}: label {label} not in {sorted(valid_labels)}")
            rows.append((reader.line_num, rel_path, label))
    if not rows:
        raise DatasetError(f"{csv_path} has no rows")
    return rows


def _decode_rgb(path, where):
    """Decode an image file to uint8 (3, H, W); `where` names the CSV row for error messages."""
    if not path.is_file():
        raise DatasetError(f"{where}: image file {path} not found")
    # PIL reports a bad file as OSError (truncated, unidentified), some decoders as
    # SyntaxError or ValueError, an absurd size as DecompressionBombError
    try:
        with Image.open(path) as image:
            pixels = np.array(image.convert("RGB"))  # (H, W, 3); grayscale -> 3 equal channels
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{where}: cannot decode image {path}: {one_line(err)}") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W)


def _layout_problem(folder):
    """Why `folder` is not a complete CPEN455 dataset (names relative to it), or None if it is."""
    for split, size in SPLIT_SIZES.items():
        csv_path = folder / f"{split}.csv"
        if not csv_path.is_file():
            return f"{split}.csv not found"
        split_dir = folder / split
        n_images = sum(1 for _ in split_dir.glob("*.jpg")) if split_dir.is_dir() else 0
        if n_images != size:
            return f"{split}/ holds {n_images} images, expected {size}"
        with open(csv_path) as f:
            n_rows = sum(1 for line in f if line.strip())
        if n_rows != size:
            return f"{split}.csv has {n_rows} rows, expected {size}"
    return None


def _fetch(url, dest):
    """Stream an http(s) URL into the file `dest` with a byte progress bar."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = response.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                  unit_divisor=1024, desc="downloading", disable=None) as bar:
            while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))


def _extract_data(archive, dest):
    """Extract `<top>/data/{split, split.csv}` members of a zip into `dest`, prefix stripped."""
    wanted = {*SPLIT_SIZES, *(f"{split}.csv" for split in SPLIT_SIZES)}
    root = dest.resolve()
    found = False
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if len(parts) < 3 or parts[1] != "data":
                continue
            rel = parts[2:]
            if rel[0] not in wanted:
                continue
            found = True
            target = dest.joinpath(*rel)
            if not target.resolve().is_relative_to(root):  # e.g. "top/data/train/../../x"
                raise DatasetError(f"archive {archive} has an unsafe member path {info.filename!r}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not found:
        raise DatasetError(f"archive {archive} has no <top>/data/ folder with the CPEN455 splits")


def download_cpen455(data_dir, url=DEFAULT_URL):
    """Fetch the course archive and install its `data/` folder as `data_dir`; return data_dir.

    url: http(s) URL, file:// URL, or a plain path to a local zip. Only the split folders and
    CSVs move into data_dir, so other files there (a README, say) stay. Everything is extracted
    and checked against SPLIT_SIZES in a temporary folder next to data_dir first, so a failed
    download leaves no half-written dataset. Returns at once if data_dir is already complete.
    """
    data_dir = Path(data_dir)
    if data_dir.is_dir() and _layout_problem(data_dir) is None:
        print(f"{data_dir} already holds the complete CPEN455 dataset; nothing to download")
        return data_dir
    parent = data_dir.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-partial-", dir=parent))
    try:
        scheme = urllib.parse.urlparse(url).scheme
        if scheme in ("http", "https"):
            archive = staging / "archive.zip"
            _fetch(url, archive)
        elif scheme == "file":
            archive = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        elif "://" in url:
            raise DatasetError(f"unsupported URL {url}: use http(s)://, file:// or a local path")
        else:
            archive = Path(url)
        if not archive.is_file():
            raise DatasetError(f"archive {archive} not found")
        extracted = staging / "data"
        _extract_data(archive, extracted)
        problem = _layout_problem(extracted)
        if problem is not None:
            raise DatasetError(f"archive from {url} is not the CPEN455 dataset: {problem}")

        # Renames within one filesystem: each is atomic, so data_dir never holds a partial split.
        data_dir.mkdir(exist_ok=True)
        replaced = staging / "replaced"
        replaced.mkdir()
        for name in sorted(os.listdir(extracted)):
            if (data_dir / name).exists():
                os.replace(data_dir / name, replaced / name)
            os.replace(extracted / name, data_dir / name)
    except (OSError, zipfile.BadZipFile, http.client.HTTPException) as err:
        raise DatasetError(f"could not install the CPEN455 dataset from {url}: {one_line(err)}. "
                           f"Without internet, copy a folder that holds train.csv, "
                           f"validation.csv, test.csv and their images from a machine that has "
                           f"it, and pass --data_dir FOLDER") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"installed the CPEN455 dataset in {data_dir}")
    return data_dir


def load_dataset(name, data_dir, mode, download=False, image_size=32):
    """Load one split of `name` in ("cpen455", "cifar10", "mnist") as a TensorImageDataset.

    data_dir: for cpen455 the folder holding train.csv etc.; for cifar10/mnist the torchvision
    root. mode: "train", "validation" or "test"; cifar10/mnist have no validation split, so
    "validation" and "test" both give their test split. MNIST stays (1, 28, 28). image_size
    applies to cpen455 only. download=True fetches the data first if it is missing: for cpen455,
    when data_dir has no CSV for `mode`. A folder that holds one is read as it is, even with other
    split sizes than the course's (a subset, say): the download would replace its files.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if mode not in SPLIT_SIZES:
        raise ValueError(f"mode must be one of {tuple(SPLIT_SIZES)}, got {mode!r}")
    if name == "cpen455":
        if download and not (Path(data_dir) / f"{mode}.csv").is_file():
            download_cpen455(data_dir)
        return CPEN455Dataset(data_dir, mode, image_size=image_size)
    import torchvision  # only CIFAR-10/MNIST need it, and it adds seconds to every startup

    builder = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.MNIST
    try:
        tv_dataset = builder(root=str(data_dir), train=mode == "train", download=download)
    except (RuntimeError, OSError) as err:
        raise DatasetError(f"cannot load {name} from {data_dir}: {one_line(err)}") from None
    return TensorImageDataset.from_torchvision(tv_dataset)


def main(args):
    """Optionally download, then load every split and print its size and class counts."""
    if args.download:
        download_cpen455(args.data_dir, args.url)
    for split in SPLIT_SIZES:
        ds = CPEN455Dataset(args.data_dir, split)
        labelled = ds.labels[ds.labels != UNLABELLED]
        counts = torch.bincount(labelled, minlength=NUM_CLASSES).tolist()
        per_class = ", ".join(f"{label} {name}: {n}" for label, (name, n)
                              in enumerate(zip(CLASS_NAMES, counts)) if n > 0)
        print(f"{split:<10} {len(ds):>5} images, {len(ds) - len(labelled):>3} unlabelled"
              + (f"; {per_class}" if per_class else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Download or summarise the CPEN455 dataset.")
    parser.add_argument("--download", action="store_true",
                        help="fetch the course archive into --data_dir before summarising")
    parser.add_argument("--data_dir", default="data",
                        help="folder holding train.csv, validation.csv, test.csv and the images")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help="archive to fetch: http(s) URL, file:// URL, or a local zip path")
    try:
        main(parser.parse_args())
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
