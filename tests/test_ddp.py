"""pcnn_train.py under torchrun on a few hundred of the real CPEN455 images: two CPU processes
(gloo), each training on half of every global batch, log the same per-step losses as one process
on the whole batch; only rank 0 writes; a global batch that does not split evenly over the
processes is an error."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "cpen455"
pytestmark = [
    pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CPEN455 data at {DATA}"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]

# --dropout 0: each process draws its own dropout masks, so only without dropout do the runs agree.
TINY = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--dropout", "0",
        "--device", "cpu", "--sampling_interval", "0", "--flip", "--fit_prior", "false"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def train(small_data):
    """train(run_dir, nproc, *extra): run pcnn_train.py on the small data in nproc fresh processes
    (torchrun when nproc > 1)."""
    def run(run_dir, nproc, *extra):
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                         f"--master_port={free_port()}"]
        cmd = [*launcher, "pcnn_train.py", *TINY, "--data_dir", str(small_data), "--run_dir",
               str(run_dir), "--save_dir", str(run_dir), "--sample_dir", str(run_dir / "samples"),
               *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}   # the processes share a few busy cores
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    return run


def steps(run_dir):
    """steps.csv as rows (step, epoch, batch_bpd, objective, learning rate)."""
    return [(int(s), int(e), float(bpd), float(obj), float(lr)) for s, e, bpd, obj, lr in
            (line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train):
    """The same 4 steps of global batch 8, in one process and in two. The high learning rate makes
    a step on one process's gradient alone visible in the next step's loss. A checkpoint after
    every step: the processes must write it together, at the same steps, and train on after it.
    A cooldown over the last half of the run, which --max_steps ends first: --max_minutes makes
    every step read rank 0's clock as well."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    flags = ["--batch_size", "8", "--max_steps", "4", "--lr", "5e-3", "--checkpoint_minutes", "1e-9",
             "--lr_decay", "1", "--lr_cooldown", "0.5", "--max_minutes", "600"]
    return {1: (one, train(one, 1, *flags)), 2: (two, train(two, 2, *flags))}


def test_two_processes_train_like_one(runs, small_data):
    (one, proc1), (two, proc2) = runs[1], runs[2]
    assert proc1.returncode == 0, proc1.stderr
    assert proc2.returncode == 0, proc2.stderr
    rows1, rows2 = steps(one), steps(two)
    assert [r[:2] for r in rows2] == [r[:2] for r in rows1] == [(s, 1) for s in range(1, 5)]
    assert [r[4] for r in rows2] == [r[4] for r in rows1] == [5e-3, 5e-3, 5e-3, 2.5e-3]
    # Summing in another order moves these by ~1e-7; without DDP's gradient averaging (each process
    # stepping on its own half batch) they move by ~5e-4 from step 2 on.
    for r1, r2 in zip(rows1, rows2):
        assert r2[2:] == pytest.approx(r1[2:], rel=1e-5)
    # The epoch's train bits/dim is global too, and validation split over the processes agrees.
    rec1, rec2 = (json.loads((d / "log.jsonl").read_text()) for d in (one, two))
    for key in ("train_bpd", "val_bpd"):
        assert rec2[key] == pytest.approx(rec1[key], rel=1e-5)
    n_val = len((small_data / "validation.csv").read_text().splitlines())
    assert rec2["val_acc"] == pytest.approx(rec1["val_acc"], abs=2 / n_val)


def test_only_rank_zero_writes(runs):
    two, proc = runs[2]
    assert proc.returncode == 0, proc.stderr
    assert len(steps(two)) == 4   # one writer: two would append 8 rows
    assert len((two / "log.jsonl").read_text().splitlines()) == 1
    assert proc.stdout.count("training PixelCNN") == 1 and "x 2 processes" in proc.stdout
    assert proc.stdout.count("done: reached --max_steps 4") == 1
    assert {p.name for p in two.iterdir()} == {"steps.csv", "log.jsonl", "curves.png", "resume.pt",
                                              "conditional_pixelcnn.pth", "samples"}


def test_batch_must_split_over_processes(tmp_path, train):
    proc = train(tmp_path, 2, "--batch_size", "7", "--max_steps", "1")
    assert proc.returncode != 0
    assert "--batch_size 7 is the global batch and must be divisible by the 2 processes" \
        in proc.stderr
    assert not (tmp_path / "steps.csv").exists()


def test_resume_under_ddp_is_exact(tmp_path, train):
    """2 steps, stop, resume to 4 == 4 steps straight, in two processes, with dropout and the
    hybrid term on bands of rows: every process gets back its own generator, which draws both."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--batch_size", "8", "--dropout", "0.5", "--fusion", "gated_last",
             "--disc_weight", "1e-3", "--disc_rows", "4"]
    for run_dir, extra in ((straight, ["--max_steps", "4"]), (split, ["--max_steps", "2"])):
        proc = train(run_dir, 2, *flags, *extra)
        assert proc.returncode == 0, proc.stderr
    proc = train(split, 2, *flags, "--max_steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("resumed from") == 1
    assert steps(split) == steps(straight)
