"""Shared test settings and the small CPEN455 folder that short training runs read."""

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "cpen455"
SMALL_PER_CLASS = {"train": 128, "validation": 16}   # images of each class in the small folder


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' models are tiny: they gain nothing from threads, and on a busy two-core machine
    the thread handoffs made each forward pass ten to twenty times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A CPEN455 folder of the real data's first rows: 128 training and 16 validation images of
    each class (training reads no test split), in the CSVs' order, the split folders linked to the
    real ones. A tiny training run on the whole data spent most of its time decoding all 4678
    training and validation images and validating on 519; on these 576 it is mostly the imports."""
    if not DATA.is_dir():
        pytest.skip(f"needs the CPEN455 data at {DATA}")
    small = tmp_path_factory.mktemp("cpen455_small")
    for split, per_class in SMALL_PER_CLASS.items():
        with open(DATA / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        per_label, keep = Counter(), []
        for row in rows:
            per_label[row[1].strip()] += 1
            if per_label[row[1].strip()] <= per_class:
                keep.append(row)
        with open(small / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(keep)
        (small / split).symlink_to(DATA / split, target_is_directory=True)
    return small
