"""pcnn_train.py under torchrun on a few dozen of the real CPEN455 images: two CPU processes
(gloo), each training on half of every global batch, log the same per-step losses as one process
on the whole batch, across an epoch boundary; only rank 0 writes; a resume is exact in two
processes, and a resume under another process count continues the data order; a global batch that
does not split evenly over the processes is an error."""

import json
import socket

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# --dropout 0: each process draws its own dropout masks, so only without dropout do the runs agree.
SAME_IN_ANY_PROCESS_COUNT = ["--dropout", "0", "--flip"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch(run_script, train_command):
    """launch(run_dir, nproc, *flags): pcnn_train.py's tiny run (SAME_IN_ANY_PROCESS_COUNT, then
    flags) in nproc fresh processes under torchrun, one thread each."""
    def run(run_dir, nproc, *flags):
        return run_script("-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                          f"--master_port={free_port()}", "pcnn_train.py",
                          *train_command(run_dir, *SAME_IN_ANY_PROCESS_COUNT, *flags))
    return run


def steps(run_dir):
    """steps.csv as rows (step, epoch, batch_bpd, loss, learning rate, skipped)."""
    return [(int(s), int(e), float(bpd), float(obj), float(lr), int(k)) for s, e, bpd, obj, lr, k in
            (line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines()[1:])]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_steps_agree(rows, expected):
    """Summing in another order moves the losses by ~1e-7; without DDP's gradient averaging (each
    process stepping on its own half batch) they move by ~5e-4 from step 2 on."""
    assert [r[:2] for r in rows] == [r[:2] for r in expected]
    assert [r[4] for r in rows] == [r[4] for r in expected]
    for r, e in zip(rows, expected, strict=True):
        assert r[2:] == pytest.approx(e[2:], rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, launch, train):
    """The same 4 steps of global batch 8 over an epoch boundary (3 steps an epoch), in one process
    (this one) and in two. The high learning rate makes a step on one process's gradient alone
    visible in the next step's loss. A checkpoint after every step: the processes must write it
    together, at the same steps, and train on after it. A cooldown over the last half of the run,
    which --max_steps ends first, and --max_minutes, which every process must read as rank 0
    does."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    flags = ["--batch_size", "8", "--max_steps", "4", "--lr", "5e-3", "--checkpoint_minutes", "1e-9",
             "--lr_decay", "1", "--lr_cooldown", "0.5", "--max_minutes", "600"]
    train(one, *SAME_IN_ANY_PROCESS_COUNT, *flags)
    return {1: one, 2: (two, launch(two, 2, *flags))}


def test_two_processes_train_like_one(runs, tiny_data):
    one, (two, proc) = runs[1], runs[2]
    assert proc.returncode == 0, proc.stderr
    rows1, rows2 = steps(one), steps(two)
    assert [r[:2] for r in rows1] == [(1, 1), (2, 1), (3, 1), (4, 2)]
    assert [r[4] for r in rows1] == [5e-3, 5e-3, 5e-3, 2.5e-3]
    assert_steps_agree(rows2, rows1)
    # The train bits/dim is global too, and validation split over the processes agrees.
    n_val = len((tiny_data / "validation.csv").read_text().splitlines())
    for rec1, rec2 in zip(records(one), records(two), strict=True):
        assert (rec2["epoch"], rec2["step"]) == (rec1["epoch"], rec1["step"])
        for key in ("train_bpd", "val_bpd"):
            assert rec2[key] == pytest.approx(rec1[key], rel=1e-5)
        assert rec2["val_acc"] == pytest.approx(rec1["val_acc"], abs=1.5 / n_val)


def test_only_rank_zero_writes(runs):
    two, proc = runs[2]
    assert proc.returncode == 0, proc.stderr
    assert len(steps(two)) == 4   # one writer: two would append 8 rows
    assert [r["step"] for r in records(two)] == [3, 4]
    assert proc.stdout.count("training PixelCNN") == 1 and "x 2 processes" in proc.stdout
    assert proc.stdout.count("done: reached --max_steps 4") == 1
    assert {p.name for p in two.iterdir()} == {"steps.csv", "log.jsonl", "curves.png", "resume.pt",
                                              "conditional_pixelcnn.pth", "samples"}


def test_batch_must_split_over_processes(tmp_path, launch):
    proc = launch(tmp_path, 2, "--batch_size", "7", "--max_steps", "1")
    assert proc.returncode != 0
    assert "--batch_size 7 is the global batch and must be divisible by the 2 processes" \
        in proc.stderr
    assert not (tmp_path / "steps.csv").exists()


def test_resume_under_ddp_is_exact(tmp_path, launch):
    """2 steps, stop, resume to 4 == 4 steps straight, in two processes, with dropout and the EMA:
    every process gets back its own generator, which draws its dropout masks."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--batch_size", "8", "--dropout", "0.5", "--fusion", "gated_last", "--ema", "0.9"]
    for run_dir, extra in ((straight, ["--max_steps", "4"]), (split, ["--max_steps", "2"])):
        proc = launch(run_dir, 2, *flags, *extra)
        assert proc.returncode == 0, proc.stderr
    proc = launch(split, 2, *flags, "--max_steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("resumed from") == 1
    assert steps(split) == steps(straight)


def test_resume_under_another_process_count_continues_the_data_order(tmp_path, runs, train,
                                                                     launch):
    """2 steps in one process, then --resume in two to step 4, over the epoch boundary: a note says
    that the dropout masks cannot continue, but the data order and the flips do, so without
    dropout the steps are those of the one-process run, to float rounding."""
    flags = ["--batch_size", "8", "--lr", "5e-3", "--checkpoint_minutes", "1e-9", "--lr_decay", "1",
             "--lr_cooldown", "0.5", "--max_minutes", "600"]             # the runs fixture's
    split = tmp_path / "split"
    train(split, *SAME_IN_ANY_PROCESS_COUNT, *flags, "--max_steps", "2")
    proc = launch(split, 2, *flags, "--max_steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "written by 1 processes, this run has 2: the data order continues exactly, the " \
           "dropout masks do not" in proc.stdout
    assert_steps_agree(steps(split), steps(runs[1]))
