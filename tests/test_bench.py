"""bench.py reads its data from --data_dir and its model from --checkpoint: a folder of 8 real
validation images and a tiny model make the classification section a few seconds' work, and its
output names what it read."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import PixelCNN
from utils import bf16_pays

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "cpen455"
N_IMAGES = 8


def bench(*args):
    """Run bench.py in a fresh process on one CPU thread."""
    return subprocess.run([sys.executable, "bench.py", "--device", "cpu", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CPEN455 data at {DATA}")
def test_classification_reads_data_dir_and_checkpoint(tmp_path):
    data = tmp_path / "data"
    (data / "validation").mkdir(parents=True)
    rows = (DATA / "validation.csv").read_text().splitlines()[:N_IMAGES]
    (data / "validation.csv").write_text("\n".join(rows) + "\n")
    for row in rows:
        shutil.copy(DATA / row.split(",")[0], data / row.split(",")[0])
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2).state_dict(), checkpoint)

    proc = bench("--only", "classification", "--data_dir", data, "--checkpoint", checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"^classify {N_IMAGES} validation images, 4/1/2 ", proc.stdout, re.M)
    # bf16 is timed only where it pays; elsewhere the line says why it was skipped
    assert bf16_pays(torch.device("cpu")) or "bf16 autocast skipped" in proc.stdout
    for precision in ("fp32", "bf16") if bf16_pays(torch.device("cpu")) else ("fp32",):
        assert re.search(rf"^  {precision} changes \d+ of {N_IMAGES} predictions of the course "
                         rf"pattern \({re.escape(str(checkpoint))}\)$", proc.stdout, re.M), \
            proc.stdout


def test_missing_data_dir_is_a_one_line_error_before_any_timing(tmp_path):
    missing = tmp_path / "nowhere"
    proc = bench("--data_dir", missing)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(missing) in proc.stderr
    assert proc.stdout == ""
