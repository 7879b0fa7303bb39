"""Tests for dataset.py: loading checked against independent decodes (on a sample of the real
images, the grayscale ones included), every bad-input error, stand-ins for MNIST and CIFAR-10, and
the download/install path. CPU only, about 15 s.

    python -m pytest tests/test_dataset.py -q
"""

import csv
import http.server
import io
import threading
import zipfile
from argparse import Namespace
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import (
    CLASS_NAMES, NUM_CLASSES, SPLIT_SIZES, CPEN455Dataset, DatasetError, TensorImageDataset,
    download_cpen455, load_dataset, my_bidict, rescaling, rescaling_inv,
)

# PIL's resize rounds to uint8 where dataset.py's stays float: allow a couple of levels in [0, 1].
PIXEL_TOL = 2 / 255


def read_csv_rows(path):
    with open(path, newline="") as f:
        return [(p, int(label)) for p, label in csv.reader(f)]


def pil_reference(path, size):
    """The course pipeline, independently: PIL decode -> RGB -> bilinear resize -> [-1, 1]."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, S, S)
    return pixels * 2 - 1


def image_mode(path):
    with Image.open(path) as image:
        return image.mode


def jpeg_bytes(seed, size=64):
    """A random-noise RGB JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_split(root, mode, rows):
    """Write `<root>/<mode>.csv` with the given raw lines; create a JPEG for each path row."""
    root.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(rows):
        rel_path = line.split(",")[0]
        if rel_path.endswith(".jpg"):
            (root / rel_path).parent.mkdir(parents=True, exist_ok=True)
            (root / rel_path).write_bytes(jpeg_bytes(seed=i))
    (root / f"{mode}.csv").write_text("".join(line + "\n" for line in rows))


def make_archive(zip_path, sizes, top="CPEN455HW-2023W2-main", classes=1):
    """A small zip laid out like the course archive, with `sizes[split]` images per split, the
    labelled ones of classes 0, 1, ..., classes - 1 in turn."""
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr(f"{top}/README.md", "not part of the data\n")
        for split, n in sizes.items():
            labels = [-1 if split == "test" else i % classes for i in range(n)]
            names = [f"{split}/{i:07d}.jpg" for i in range(n)]
            zf.writestr(f"{top}/data/{split}.csv",
                        "".join(f"{p},{label}\n" for p, label in zip(names, labels)))
            for i, name in enumerate(names):
                zf.writestr(f"{top}/data/{name}", jpeg_bytes(seed=i))
    return zip_path


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def grayscale_rows(data_dir):
    """The rows of train.csv whose JPEGs are grayscale (a handful; reading headers only)."""
    rows = read_csv_rows(data_dir / "train.csv")
    return [i for i, (path, _) in enumerate(rows) if image_mode(data_dir / path) == "L"]


@pytest.fixture(scope="module")
def sample_folder(subset, grayscale_rows):
    """A folder of the real data's first 4 training images of each class and every grayscale one,
    the first 8 validation images of each class and the first 8 test rows, their CSV lines as
    they are: decoding it takes a fraction of a second, all 5197 images seconds."""
    return subset({"train": 4, "validation": 8, "test": 8}, {"train": grayscale_rows})


@pytest.fixture(scope="module")
def real_splits(sample_folder):
    return {split: CPEN455Dataset(sample_folder, split) for split in SPLIT_SIZES}


def test_real_data_has_the_course_split_sizes(data_dir):
    """SPLIT_SIZES, which the download checks an archive against, is the real data's: rows in
    each CSV and JPEGs in each folder; the training classes are balanced as the course's are."""
    for split, size in SPLIT_SIZES.items():
        assert len(read_csv_rows(data_dir / f"{split}.csv")) == size
        assert sum(1 for _ in (data_dir / split).glob("*.jpg")) == size
    labels = [label for _, label in read_csv_rows(data_dir / "train.csv")]
    assert [labels.count(c) for c in range(NUM_CLASSES)] == [1040, 1039, 1040, 1040]
    assert {label for _, label in read_csv_rows(data_dir / "test.csv")} == {-1}


def test_real_splits_shapes_and_range(real_splits, sample_folder):
    for split, ds in real_splits.items():
        size = len(read_csv_rows(sample_folder / f"{split}.csv"))
        assert len(ds) == size
        assert ds.images.shape == (size, 3, 32, 32) and ds.images.dtype == torch.float32
        assert ds.labels.shape == (size,) and ds.labels.dtype == torch.int64
        assert ds.images.min() >= -1 and ds.images.max() <= 1
        # not a constant or [0, 1] tensor: both ends of the range are used
        assert ds.images.min() < -0.9 and ds.images.max() > 0.9


def test_real_labels_and_paths_follow_the_csv(real_splits, sample_folder):
    for split in SPLIT_SIZES:
        rows = read_csv_rows(sample_folder / f"{split}.csv")
        assert real_splits[split].paths == [p for p, _ in rows]
        assert real_splits[split].labels.tolist() == [label for _, label in rows]
    assert (real_splits["test"].labels == -1).all()


def test_real_images_match_independent_decode(real_splits, data_dir, grayscale_rows):
    ds = real_splits["validation"]
    for i, rel_path in enumerate(ds.paths):
        expected = pil_reference(data_dir / rel_path, 32)
        assert (ds.images[i] - expected).abs().max() <= 2 * PIXEL_TOL, rel_path
    # the grayscale JPEGs of train (a handful) go through the same check
    train = real_splits["train"]
    gray = [i for i, p in enumerate(train.paths) if image_mode(data_dir / p) == "L"]
    assert len(gray) == len(grayscale_rows) > 0, "expected some grayscale JPEGs in train"
    for i in gray:
        expected = pil_reference(data_dir / train.paths[i], 32)
        assert (train.images[i] - expected).abs().max() <= 2 * PIXEL_TOL, train.paths[i]
        assert torch.equal(train.images[i][0], train.images[i][1])


def test_image_size_and_custom_transform(sample_folder):
    full = CPEN455Dataset(sample_folder, "validation", image_size=64)
    first = sample_folder / full.paths[0]
    with Image.open(first) as image:
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1) / 255
    # resizing 64 -> 64 is the identity, so this is exactly the decoded image in [-1, 1]
    torch.testing.assert_close(full.images[0], pixels * 2 - 1)
    raw = CPEN455Dataset(sample_folder, "validation", transform=lambda x: x)
    assert raw.images.shape == (len(full), 3, 64, 64)
    torch.testing.assert_close(raw.images[0], pixels)


def test_root_dir_is_used(tmp_path, real_splits, sample_folder, data_dir, monkeypatch):
    rows = read_csv_rows(sample_folder / "validation.csv")[:5][::-1]
    root = tmp_path / "mini"
    (root / "validation").mkdir(parents=True)
    for rel_path, _ in rows:
        (root / rel_path).write_bytes((data_dir / rel_path).read_bytes())
    (root / "validation.csv").write_text("".join(f"{p},{label}\n" for p, label in rows))
    monkeypatch.chdir(tmp_path)  # relative paths must resolve against root_dir, not the cwd

    ds = CPEN455Dataset(root, "validation")
    assert ds.paths == [p for p, _ in rows]
    assert ds.labels.tolist() == [label for _, label in rows]
    real = real_splits["validation"]
    for i, rel_path in enumerate(ds.paths):
        assert torch.equal(ds.images[i], real.images[real.paths.index(rel_path)])
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and label == rows[0][1]


# ------------------------------------------------------------ synthetic data

def test_rescaling_maps_unit_interval_to_model_range():
    x = torch.linspace(0, 1, 11)
    torch.testing.assert_close(rescaling(x), torch.linspace(-1, 1, 11))
    torch.testing.assert_close(rescaling_inv(rescaling(x)), x)


def test_class_tables_agree():
    assert NUM_CLASSES == len(CLASS_NAMES) == 4
    assert sorted(my_bidict.values()) == list(range(NUM_CLASSES))
    assert my_bidict.inverse[2] == "Class2"


def test_grayscale_jpeg_loads_as_three_identical_channels(tmp_path):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # (64, 64)
    (tmp_path / "train").mkdir()
    Image.fromarray(gradient).save(tmp_path / "train" / "g.jpg", quality=95)
    (tmp_path / "train.csv").write_text("train/g.jpg,-1\n")
    ds = CPEN455Dataset(tmp_path, "train")
    image = ds.images[0]  # (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert (image - pil_reference(tmp_path / "train" / "g.jpg", 32)).abs().max() <= 2 * PIXEL_TOL
    assert image[0, :, -1].mean() - image[0, :, 0].mean() > 1.5  # the gradient survived
    assert ds.labels.tolist() == [-1]


BAD_INPUTS = {
    "missing folder": (None, None, r"nope.* not found.*--download"),
    "missing csv": ([], "absent", r"train\.csv not found"),
    "missing file": (["train/a.jpg,0", "train/gone.jpg,1"], "drop gone", r"train\.csv:2: .*gone\.jpg not found"),
    "corrupt image": (["train/a.jpg,0", "train/bad.jpg,1"], "garble bad", r"train\.csv:2: cannot decode .*bad\.jpg"),
    "truncated image": (["train/a.jpg,0", "train/cut.jpg,1"], "truncate cut", r"train\.csv:2: cannot decode .*cut\.jpg"),
    "label 7": (["train/a.jpg,0", "train/b.jpg,7"], None, r"train\.csv:2: label 7 not in"),
    "no label": (["train/a.jpg"], None, r"train\.csv:1: malformed row"),
    "extra field": (["train/a.jpg,1,2"], None, r"train\.csv:1: malformed row"),
    "label not int": (["train/a.jpg,cat"], None, r"train\.csv:1: malformed row.*'cat'"),
    "blank line": (["train/a.jpg,0", "", "train/b.jpg,1"], None, r"train\.csv:2: malformed row"),
    "empty csv": ([], None, r"train\.csv has no rows"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_dataset_error(tmp_path, case):
    rows, damage, pattern = BAD_INPUTS[case]
    root = tmp_path / "nope"
    if rows is not None:
        write_split(root, "train", rows)
    if damage == "absent":
        (root / "train.csv").unlink()
    elif damage == "drop gone":
        (root / "train" / "gone.jpg").unlink()
    elif damage == "garble bad":
        (root / "train" / "bad.jpg").write_bytes(b"this is not a jpeg" * 10)
    elif damage == "truncate cut":
        cut = root / "train" / "cut.jpg"
        cut.write_bytes(cut.read_bytes()[:-200])
    with pytest.raises(DatasetError, match=pattern) as info:
        CPEN455Dataset(root, "train")
    assert "\n" not in str(info.value)


def test_cli_missing_folder_exits_1_with_one_line_error(tmp_path, run_script):
    result = run_script("dataset.py", "--data_dir", tmp_path / "nope")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"python dataset\.py --download"):
        load_dataset("cpen455", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="cifar10"):
        load_dataset("cifar10", tmp_path, "train", download=False)
    with pytest.raises(ValueError):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(ValueError):
        load_dataset("cpen455", tmp_path, "valid")


def test_load_dataset_mnist_keeps_one_channel_and_maps_splits(mnist_stand_in):
    root, arrays = mnist_stand_in
    for mode, split in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        ds = load_dataset("mnist", root, mode)
        pixels, labels = arrays[split]
        assert isinstance(ds, TensorImageDataset)
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.float32
        expected = torch.from_numpy(pixels).float()[:, None] / 255 * 2 - 1
        torch.testing.assert_close(ds.images, expected)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert ds.num_classes == len(ds.class_names) == 10


def test_load_dataset_cifar10_reads_the_pickled_batches_in_order(cifar10_stand_in):
    """The five training batches one after another, the test batch for "validation" and "test",
    each image (3, 32, 32) as the batch's row of 3072 bytes lays it out, and the class names of
    batches.meta."""
    root, arrays = cifar10_stand_in
    for mode, split in (("train", "train"), ("validation", "validation"), ("test", "validation")):
        ds = load_dataset("cifar10", root, mode)
        pixels, labels = arrays[split]
        assert ds.images.shape == (len(labels), 3, 32, 32) and ds.images.dtype == torch.float32
        torch.testing.assert_close(ds.images, torch.from_numpy(pixels).float() / 255 * 2 - 1)
        assert ds.labels.tolist() == labels.tolist()
        assert ds.class_names == tuple(f"class{k}" for k in range(10)) and ds.num_classes == 10


# ----------------------------------------------------------------- download

@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, archive):
    """The real archive installed through a file:// URL into a folder that has a README."""
    data_dir = tmp_path_factory.mktemp("download") / "data"
    data_dir.mkdir()
    (data_dir / "README.md").write_text("mine\n")
    download_cpen455(data_dir, url="file://" + str(archive))
    return data_dir


def assert_real_dataset(data_dir, real_dir, load_splits=()):
    """data_dir holds the same files as the real copy, and `load_splits` load at full size."""
    for split in SPLIT_SIZES:
        assert (data_dir / f"{split}.csv").read_bytes() == (real_dir / f"{split}.csv").read_bytes()
        names = sorted(p.name for p in (data_dir / split).iterdir())
        assert names == sorted(p.name for p in (real_dir / split).iterdir())
    for split in load_splits:
        ds = CPEN455Dataset(data_dir, split)
        assert len(ds) == SPLIT_SIZES[split] and ds.images.shape == (SPLIT_SIZES[split], 3, 32, 32)


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_download_file_url_installs_and_keeps_other_files(downloaded, data_dir):
    assert_real_dataset(downloaded, data_dir)
    assert (downloaded / "README.md").read_text() == "mine\n"
    assert leftovers(downloaded.parent, keep={"data"}) == []  # no temporary files left


def test_download_plain_path(tmp_path, archive, data_dir):
    installed = download_cpen455(tmp_path / "nested" / "data", url=str(archive))
    assert installed == tmp_path / "nested" / "data"
    assert_real_dataset(installed, data_dir, load_splits=("validation",))
    assert leftovers(installed.parent, keep={"data"}) == []


def test_download_skips_complete_dataset(downloaded, capsys):
    # an unreachable URL proves nothing is fetched
    download_cpen455(downloaded, url="file:///nonexistent/archive.zip")
    assert "already holds" in capsys.readouterr().out
    ds = load_dataset("cpen455", downloaded, "validation", download=True)
    assert len(ds) == SPLIT_SIZES["validation"]
    assert ds.num_classes == NUM_CLASSES and ds.class_names == CLASS_NAMES


def test_download_wrong_counts_leaves_nothing_behind(tmp_path):
    archive = make_archive(tmp_path / "small.zip", {"train": 3, "validation": 2, "test": 2})
    parent = tmp_path / "parent"
    with pytest.raises(DatasetError, match=r"train/ holds 3 images, expected 4159") as info:
        download_cpen455(parent / "data", url=str(archive))
    assert "\n" not in str(info.value)
    assert leftovers(parent, keep=set()) == []

    data_dir = parent / "data"  # an existing folder keeps what it had and gains nothing
    data_dir.mkdir()
    (data_dir / "README.md").write_text("mine\n")
    with pytest.raises(DatasetError):
        download_cpen455(data_dir, url="file://" + str(archive))
    assert leftovers(parent, keep=set()) == ["data"]
    assert leftovers(data_dir, keep=set()) == ["README.md"]


BAD_SOURCES = {
    "{tmp}/missing.zip": "missing.zip not found",
    "file://{tmp}/missing.zip": "missing.zip not found",
    "{tmp}/not_a_zip.zip": "not a zip file",
    "{tmp}/no_data.zip": "no <top>/data/ folder",
    "{tmp}/evil.zip": "unsafe member path",
    "ftp://example.com/a.zip": "unsupported URL",
}


@pytest.mark.parametrize("url", BAD_SOURCES)
def test_download_bad_source_raises(tmp_path, url):
    (tmp_path / "not_a_zip.zip").write_bytes(b"garbage" * 100)
    with zipfile.ZipFile(tmp_path / "no_data.zip", "w") as zf:
        zf.writestr("top/README.md", "no data folder here\n")
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        # from <staging>/data/train, four levels up is tmp_path
        zf.writestr("top/data/train/../../../../escaped.txt", "outside the target\n")
    parent = tmp_path / "parent"
    with pytest.raises(DatasetError, match=BAD_SOURCES[url]) as info:
        download_cpen455(parent / "data", url=url.format(tmp=tmp_path))
    assert "\n" not in str(info.value)
    assert not (parent / "data").exists() and not (tmp_path / "escaped.txt").exists()
    assert leftovers(parent, keep=set()) == []


def test_download_replaces_a_partial_dataset(tmp_path, monkeypatch):
    sizes = {"train": 3, "validation": 2, "test": 2}
    archive = make_archive(tmp_path / "small.zip", sizes)
    monkeypatch.setattr(dataset, "SPLIT_SIZES", sizes)  # a tiny archive stands in for the real one
    data_dir = tmp_path / "data"
    write_split(data_dir, "train", ["train/stale.jpg,1"])
    (data_dir / "README.md").write_text("mine\n")
    download_cpen455(data_dir, url=str(archive))
    assert not (data_dir / "train" / "stale.jpg").exists()
    assert leftovers(data_dir, keep=set()) == ["README.md", "test", "test.csv", "train",
                                               "train.csv", "validation", "validation.csv"]
    assert CPEN455Dataset(data_dir, "train").paths == [f"train/{i:07d}.jpg" for i in range(3)]
    assert leftovers(tmp_path, keep=set()) == ["data", "small.zip"]


def test_load_with_download_fetches_only_a_missing_split(tmp_path, monkeypatch):
    """Training's load (download=True) reads a folder that has the split's CSV as it is, even one
    smaller than the course's, where a download would replace its files; it fetches into a folder
    that lacks it."""
    fetched = []
    monkeypatch.setattr(dataset, "download_cpen455", lambda data_dir: fetched.append(data_dir))
    rows = ["train/a.jpg,0", "train/b.jpg,3"]
    write_split(tmp_path / "mine", "train", rows)
    before = (tmp_path / "mine" / "train.csv").read_bytes()
    assert load_dataset("cpen455", tmp_path / "mine", "train", download=True).paths == \
        ["train/a.jpg", "train/b.jpg"]
    assert fetched == [] and (tmp_path / "mine" / "train.csv").read_bytes() == before
    with pytest.raises(DatasetError):   # the stand-in fetched nothing
        load_dataset("cpen455", tmp_path / "empty", "train", download=True)
    assert fetched == [tmp_path / "empty"]


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve tmp_path/www on localhost; yields its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    thread.join()
    server.server_close()


def test_download_over_http(tmp_path, http_server, monkeypatch):
    base_url, www = http_server
    sizes = {"train": 3, "validation": 2, "test": 2}
    make_archive(www / "main.zip", sizes)
    monkeypatch.setattr(dataset, "SPLIT_SIZES", sizes)  # a tiny archive stands in for the real one
    data_dir = download_cpen455(tmp_path / "out" / "data", url=f"{base_url}/main.zip")
    for split, size in sizes.items():
        assert len(CPEN455Dataset(data_dir, split)) == size
    assert leftovers(data_dir.parent, keep={"data"}) == []
    with pytest.raises(DatasetError, match="404"):
        download_cpen455(tmp_path / "out2" / "data", url=f"{base_url}/missing.zip")
    assert leftovers(tmp_path / "out2", keep=set()) == []


def test_cli_download_installs_and_summarises(tmp_path, monkeypatch, capsys):
    """`python dataset.py --download` (its main) on an archive of 6 training images of classes 0
    and 1, 2 validation and 2 test images: installed, then each split's size and class counts."""
    sizes = {"train": 6, "validation": 2, "test": 2}
    archive = make_archive(tmp_path / "small.zip", sizes, classes=2)
    monkeypatch.setattr(dataset, "SPLIT_SIZES", sizes)  # a tiny archive stands in for the real one
    dataset.main(Namespace(download=True, data_dir=tmp_path / "data", url=str(archive)))
    summary = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
               if line.split() and line.split()[0] in sizes}
    assert summary["train"].split()[1] == "6" and "0 hamburger: 3, 1 panda: 3" in summary["train"]
    assert summary["validation"].split()[1] == "2"
    assert summary["test"].split()[1] == "2" and "2 unlabelled" in summary["test"]
