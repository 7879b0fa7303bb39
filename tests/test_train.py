"""pcnn_train.py end to end with tiny models on a few hundred of the real CPEN455 images: the loss
goes down; resume is exact, from a stop or from a mid-epoch checkpoint after kill -9, with
steps.csv cut back and the run's time carried over; result lines start their own line in a shared
log; checkpoints rebuild the model in a fresh process; flags are real booleans; a non-finite loss
stops the run."""

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pcnn_train
from model import CHECKPOINT_NAME, DEFAULT_CHECKPOINT, PixelCNN, load_model
from utils import bf16_pays, class_log_likelihoods, class_pixel_log_likelihoods, \
    discretized_mix_logistic_loss

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "cpen455"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CPEN455 data at {DATA}")

TINY = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--batch_size", "8",
        "--sampling_interval", "0", "--dropout", "0.5", "--device", "cpu",
        "--fit_prior", "false"]   # test_class_prior.py runs the fit on a few images


@pytest.fixture(scope="session")
def train_command(small_data):
    """command(tmp, *extra): the command line of a tiny run on the small data that writes
    everything under tmp."""
    def command(tmp, *extra):
        return [sys.executable, "pcnn_train.py", *TINY, "--data_dir", str(small_data),
                "--run_dir", str(tmp), "--save_dir", str(tmp), "--sample_dir", str(tmp / "samples"),
                *map(str, extra)]
    return command


@pytest.fixture(scope="session")
def train(train_command):
    """train(tmp, *extra): run pcnn_train.py in a fresh process; returns the completed process."""
    def run(tmp, *extra):
        return subprocess.run(train_command(tmp, *extra), cwd=REPO, capture_output=True,
                              text=True, timeout=600)
    return run


def step_losses(run_dir):
    """Per-step objective values from steps.csv: {step: loss}."""
    rows = (line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines())
    return {int(r[0]): float(r[3]) for r in rows}


def log_records(run_dir):
    """The records of log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def load_resume_file(run_dir):
    return torch.load(run_dir / "resume.pt", weights_only=True)


def assert_same_training_state(a, b):
    """Two resume.pt contents hold the same weights, optimizer, EMA and data order, bit for bit."""
    for key in ("model", "ema"):
        assert (a[key] is None) == (b[key] is None)
        assert a[key] is None or a[key].keys() == b[key].keys()
        for name in a[key] or {}:
            if torch.is_tensor(a[key][name]):
                assert torch.equal(a[key][name], b[key][name]), (key, name)
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for name in p:
            assert torch.equal(p[name], q[name]), ("optimizer", name)
    assert torch.equal(a["data_gen"], b["data_gen"]) and torch.equal(a["perm"], b["perm"])
    assert (a["step"], a["epoch"], a["batch_index"]) == (b["step"], b["epoch"], b["batch_index"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train):
    """One short run that later tests share: 40 steps at a high learning rate."""
    run = tmp_path_factory.mktemp("run")
    proc = train(run, "--max_steps", "40", "--lr", "5e-3", "--ema", "0.9")
    assert proc.returncode == 0, proc.stderr
    return run, proc


def test_loss_goes_down(trained):
    run, proc = trained
    losses = [v for _, v in sorted(step_losses(run).items())]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"train_bpd", "val_bpd", "val_acc", "images_per_s"} <= record.keys()
    assert 0 <= record["val_acc"] <= 1 and record["val_bpd"] < 9
    assert (run / "curves.png").stat().st_size > 0
    assert "val acc" in proc.stdout


def test_result_lines_start_their_own_line_in_one_log(tmp_path, train_command):
    """`python pcnn_train.py ... > log 2>&1` from a plain shell (stdout block-buffered): the
    epoch's progress bar shares the file, and every line the run prints is a line of its own
    there."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(tmp_path / "log", "w") as f:
        proc = subprocess.run(train_command(tmp_path, "--max_steps", "3"), cwd=REPO,
                              env=env | {"OMP_NUM_THREADS": "1"}, stdout=f,
                              stderr=subprocess.STDOUT, timeout=600)
    code, log = proc.returncode, (tmp_path / "log").read_bytes().decode()
    assert code == 0, log
    assert "epoch 1:" in log and "\r" in log, "the progress bar is not in the log"
    lines = log.split("\n")
    best = tmp_path / CHECKPOINT_NAME
    for pattern in [r"training PixelCNN\(.*\) on cpu, [\d.]+M parameters",
                    r"epoch 0\.\d+ step 3: train [\d.]+ bpd, val [\d.]+ bpd, val acc [\d.]+%, .*",
                    rf"  new best validation accuracy -> {re.escape(str(best))}",
                    rf"done: reached --max_steps 3; best checkpoint kept, validation accuracy "
                    rf"[\d.]+% -> {re.escape(str(best))}",
                    rf"training curves -> {re.escape(str(tmp_path / 'curves.png'))}"]:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, log)


def test_resume_continues_exactly_and_cuts_steps_csv_back(tmp_path, train):
    """3 steps, stop, resume to 6 == 6 steps straight (dropout and flips included), also when the
    run had gone on to step 5 past its step-3 checkpoint (as a killed run does): steps.csv and
    log.jsonl are cut back to step 3 on resume, so each step appears once."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    hybrid = ["--flip", "--disc_weight", "1e-3", "--prior_lr", "1"]   # the prior moves too
    assert train(straight, "--max_steps", "6", *hybrid).returncode == 0
    assert train(split, "--max_steps", "3", *hybrid).returncode == 0
    shutil.copy(split / "resume.pt", tmp_path / "step3.pt")
    assert train(split, "--max_steps", "5", *hybrid, "--resume").returncode == 0
    assert [r["step"] for r in log_records(split)] == [3, 5]
    shutil.copy(tmp_path / "step3.pt", split / "resume.pt")     # steps 4 and 5 were never saved
    proc = train(split, "--max_steps", "6", *hybrid, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    assert (split / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    assert [r["step"] for r in log_records(split)] == [3, 6]
    assert_same_training_state(load_resume_file(split), load_resume_file(straight))
    prior = load_resume_file(straight)["model"]["class_log_prior"]
    assert not torch.allclose(prior, torch.full_like(prior, -math.log(4)))


def test_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, train,
                                                                         train_command):
    """kill -9 in the first epoch, a few steps after a --checkpoint_minutes checkpoint: --resume
    continues from that checkpoint and ends with the weights, optimizer, EMA, steps.csv and log
    record of a run that was never stopped."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    flags = ["--flip", "--ema", "0.9", "--checkpoint_minutes", 0.005]   # every 0.3 s: steps apart
    killed.mkdir()
    proc = subprocess.Popen(train_command(killed, *flags), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "resume.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        saved = load_resume_file(killed)["step"]
        while (len(step_losses(killed)) < saved + 2 and proc.poll() is None
               and time.time() < deadline):
            time.sleep(0.01)
    finally:
        proc.kill()                                                  # SIGKILL, as kill -9
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    ckpt = load_resume_file(killed)
    assert ckpt["epoch"] == 0 and 0 < ckpt["batch_index"] == ckpt["step"], "not mid-epoch"
    assert not (killed / "log.jsonl").exists(), "no epoch end or stop before the kill"
    end = ckpt["step"] + 3

    resumed = train(killed, *flags, "--max_steps", end, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train(straight, *flags, "--max_steps", end).returncode == 0
    assert_same_training_state(load_resume_file(killed), load_resume_file(straight))
    assert (killed / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    (record,), (expected,) = log_records(killed), log_records(straight)
    for key in ("epoch", "step", "train_bpd", "val_bpd", "val_acc", "lr"):
        assert record[key] == expected[key], key


def test_elapsed_time_and_max_minutes_count_the_time_before_a_resume(tmp_path, train):
    """A checkpoint that says the run has trained 10 minutes: after --resume, elapsed_min goes on
    from 10, and --max_minutes 10 stops the run before it trains another step."""
    assert train(tmp_path, "--max_steps", "2").returncode == 0

    def set_elapsed_minutes(minutes):
        ckpt = load_resume_file(tmp_path)
        ckpt["elapsed_s"] = 60.0 * minutes
        torch.save(ckpt, tmp_path / "resume.pt")

    set_elapsed_minutes(10)
    proc = train(tmp_path, "--max_steps", "3", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "10.0 min into the run" in proc.stdout
    first, second = log_records(tmp_path)
    assert first["elapsed_min"] < 2 and 10 < second["elapsed_min"] < 12
    assert 10 < load_resume_file(tmp_path)["elapsed_s"] / 60 < 12

    set_elapsed_minutes(10)
    proc = train(tmp_path, "--max_steps", "6", "--max_minutes", "10", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "done: reached --max_minutes 10.0" in proc.stdout
    assert max(step_losses(tmp_path)) == 3


def test_atomic_save_keeps_the_old_file_when_killed_mid_write(tmp_path, monkeypatch):
    """A write that dies halfway (here torch.save raising after half the bytes) leaves the last
    complete resume.pt in place."""
    path = tmp_path / "resume.pt"
    pcnn_train.atomic_save({"step": 1}, path)
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(pcnn_train.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        pcnn_train.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_keep_last_writes_the_last_ema_weights_and_best_the_best(tmp_path, train):
    """--keep last: the checkpoint holds the EMA weights of the run's end, also across a resume;
    --keep best: the weights of the record with the best validation accuracy."""
    last, best = tmp_path / "last", tmp_path / "best"
    for run, keep in ((last, "last"), (best, "best")):
        for steps in ("2", "4", "6"):
            proc = train(run, "--max_steps", steps, "--ema", "0.5", "--keep", keep, "--lr", "5e-3",
                         *(["--resume"] if steps != "2" else []))
            assert proc.returncode == 0, proc.stderr
        assert f"done: reached --max_steps 6; {keep} checkpoint kept" in proc.stdout
    kept, ema = torch.load(last / CHECKPOINT_NAME), load_resume_file(last)["ema"]
    for name, value in ema.items():
        assert torch.equal(kept[name], value), name
    assert all(r["kept"] for r in log_records(last))
    # Under --keep best the records marked kept are the strict new bests, and the checkpoint is
    # the run's last EMA weights only if the last record is one.
    records = log_records(best)
    accs = [r["val_acc"] for r in records]
    assert [r["kept"] for r in records] == [a > max(accs[:i], default=-1) for i, a in enumerate(accs)]
    kept, ema_end = torch.load(best / CHECKPOINT_NAME), load_resume_file(best)["ema"]
    same = all(torch.equal(kept[n], v) for n, v in ema_end.items())
    assert same == records[-1]["kept"]


def test_resume_without_state_is_an_error(tmp_path, train):
    proc = train(tmp_path, "--resume")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_checkpoint_rebuilds_in_fresh_process(trained, tmp_path):
    """The best checkpoint rebuilds with no flags in a new process and gives the same outputs;
    the course's own loading (build the model, then load_state_dict(torch.load(path))) works."""
    run, _ = trained
    ckpt = run / CHECKPOINT_NAME
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 2, 3])
    torch.save({"x": x, "labels": labels}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch; from model import load_model; "
        f"m = load_model({str(ckpt)!r}); d = torch.load({str(tmp_path / 'inputs.pt')!r}); "
        f"torch.save(m(d['x'], d['labels']), {str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=120)
    with torch.no_grad():
        here = load_model(ckpt)(x, labels)
        course = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2)
        course.load_state_dict(torch.load(ckpt))
        course.eval()
        assert torch.equal(course(x, labels), here)
    # A fresh process may use another thread count, which reorders float sums.
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), here, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("0", False),
                                         ("True", True), ("yes", True)])
def test_booleans_are_real(text, value):
    args = pcnn_train.parse_args(["--en_wandb", text, "--amp", text])
    assert args.en_wandb is value and args.amp is value
    assert pcnn_train.parse_args(["--en_wandb"]).en_wandb is True
    assert pcnn_train.parse_args([]).en_wandb is False


def test_training_writes_where_evaluation_reads():
    """One default checkpoint path: pcnn_train.py's output is the evaluation scripts' input."""
    import classification_evaluation
    assert Path(pcnn_train.parse_args([]).save_dir) / CHECKPOINT_NAME == Path(DEFAULT_CHECKPOINT)
    assert classification_evaluation.build_parser().parse_args([]).checkpoint == DEFAULT_CHECKPOINT


def test_preset_sets_defaults_and_flags_win():
    args = pcnn_train.parse_args(["--preset", "cpu", "--nr_filters", "12"])
    assert args.nr_filters == 12
    assert args.nr_resnet == pcnn_train.PRESETS["cpu"]["nr_resnet"]


def test_lr_schedule_is_per_step():
    decay = 0.99
    assert pcnn_train.lr_factor(10, 0, decay) == pytest.approx(decay ** 10)
    assert pcnn_train.lr_factor(0, 4, 1.0) == pytest.approx(0.25)
    assert pcnn_train.lr_factor(3, 4, 1.0) == pytest.approx(1.0)
    # The cooldown multiplies: over the last fifth of the budget the rate falls linearly to zero.
    for used, cool in ((0.0, 1.0), (0.8, 1.0), (0.9, 0.5), (0.95, 0.25), (1.0, 0.0), (1.2, 0.0)):
        assert pcnn_train.lr_factor(10, 4, decay, used, 0.2) == pytest.approx(decay ** 10 * cool)


def test_lr_cooldown_falls_linearly_over_the_end_of_the_run(tmp_path, train):
    """--lr_cooldown 0.5 of --max_steps 8: steps.csv logs the rate of each step, --lr for steps
    1-5 (step 5 starts with half the budget left), then 3/4, 1/2 and 1/4 of it."""
    proc = train(tmp_path, "--max_steps", "8", "--lr", "1e-3", "--lr_decay", "1",
                 "--warmup_steps", "0", "--lr_cooldown", "0.5")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(",") for line in (tmp_path / "steps.csv").read_text().splitlines()]
    assert [int(r[0]) for r in rows] == list(range(1, 9))
    expected = [1e-3] * 5 + [0.75e-3, 0.5e-3, 0.25e-3]
    assert [float(r[4]) for r in rows] == pytest.approx(expected)
    assert log_records(tmp_path)[-1]["lr"] == pytest.approx(0.25e-3)


def test_eval_interval_validates_every_few_epochs_and_at_the_end_and_trains_the_same(
        tmp_path, monkeypatch, small_data):
    """Epochs cut to 3 steps, a stop after 8: --eval_interval 2 logs epochs 2 and 2 2/3, the
    first record covering the 6 steps since the start; the training itself is that of a run that
    validates every epoch, bit for bit, down to the checkpoint it keeps."""
    monkeypatch.setattr(pcnn_train.Run, "batches_per_epoch", property(lambda run: 3))
    every, second = tmp_path / "every", tmp_path / "second"
    for run_dir, interval in ((every, "1"), (second, "2")):
        pcnn_train.main(pcnn_train.parse_args([
            *TINY, "--data_dir", str(small_data), "--run_dir", str(run_dir), "--save_dir",
            str(run_dir), "--max_steps", "8", "--ema", "0.9", "--keep", "last", "--eval_interval",
            interval]))
    assert [(r["epoch"], r["step"]) for r in log_records(every)] == [(1, 3), (2, 6), (8 / 3, 8)]
    first, last = log_records(second)
    assert (first["epoch"], first["step"], last["epoch"], last["step"]) == (2, 6, 8 / 3, 8)
    assert first["images_per_s"] * first["train_seconds"] == pytest.approx(6 * 8)
    assert_same_training_state(load_resume_file(second), load_resume_file(every))
    assert last["val_bpd"] == log_records(every)[-1]["val_bpd"]
    kept = [torch.load(d / CHECKPOINT_NAME, weights_only=True) for d in (second, every)]
    assert all(torch.equal(v, kept[1][k]) for k, v in kept[0].items() if torch.is_tensor(v))


def test_budget_used_is_the_part_of_the_run_that_ends_it_first():
    """Of --max_steps, of --max_minutes on the clock, or of --max_epochs: the largest."""
    def budget(step, minutes_ago=0.0, **flags):
        args = SimpleNamespace(**dict(max_steps=0, max_minutes=0.0, max_epochs=10) | flags)
        run = SimpleNamespace(args=args, batches_per_epoch=100, ddp=False)
        return pcnn_train.budget_used(run, step, time.time() - 60 * minutes_ago)

    assert budget(250) == pytest.approx(0.25)                         # of 10 epochs of 100
    assert budget(250, max_steps=500) == pytest.approx(0.5)
    assert budget(250, minutes_ago=3, max_steps=500, max_minutes=4) == pytest.approx(0.75, abs=0.01)
    assert budget(250, minutes_ago=1, max_steps=500, max_minutes=4) == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        pcnn_train.parse_args(["--lr_cooldown", "1.5"])


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch, small_data):
    """Poison the loss at the third step: the run exits naming step 3 and keeps its files."""
    real_loss = pcnn_train.discretized_mix_logistic_loss
    calls = {"n": 0}

    def poisoned(x, l, reduction="sum"):
        calls["n"] += 1
        nll = real_loss(x, l, reduction)
        return nll * float("nan") if calls["n"] == 3 else nll

    monkeypatch.setattr(pcnn_train, "discretized_mix_logistic_loss", poisoned)
    args = pcnn_train.parse_args([*TINY, "--data_dir", str(small_data), "--run_dir", str(tmp_path),
                                  "--save_dir", str(tmp_path), "--max_steps", "5"])
    with pytest.raises(SystemExit) as exit_info:
        pcnn_train.main(args)
    assert "non-finite loss" in str(exit_info.value) and "step 3" in str(exit_info.value)
    assert len(step_losses(tmp_path)) == 2


def test_wandb_offline(tmp_path, train_command):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true"}
    cmd = train_command(tmp_path, "--max_steps", "2", "--en_wandb", "True")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_ema_decay_warms_up():
    """EMA = decay * EMA + (1 - decay) * weights with decay = min(0.999, (1 + step) / (10 + step))."""
    model = PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
    ema = pcnn_train.EMA(model, 0.999)
    start = model.nin_out.conv.bias.detach().clone()
    for step, expected_decay in ((0, 0.1), (2000, 2001 / 2010), (10_000, 0.999)):
        before = ema.state["nin_out.conv.bias"].clone()
        with torch.no_grad():
            model.nin_out.conv.bias.add_(1.0)
        ema.update(model, step)
        torch.testing.assert_close(ema.state["nin_out.conv.bias"],
                                   expected_decay * before + (1 - expected_decay) * model.nin_out.conv.bias)
    assert not torch.equal(ema.state["nin_out.conv.bias"], start)


def test_make_optimizer_steps_as_adams_loop_and_takes_its_state():
    """make_optimizer's Adam (fused where torch has the kernel) moves the weights as Adam's loop
    over the tensors does, within float rounding, and continues from the loop's state_dict (a
    checkpoint written before it) as the loop itself would."""
    def steps(model, optimizer, seeds):
        for seed in seeds:
            torch.manual_seed(seed)
            x = torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1             # (4, 3, 8, 8)
            loss = discretized_mix_logistic_loss(x, model(x, torch.arange(4)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def assert_same_weights(a, b):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    # In float64, where the two orders of the same arithmetic agree far below a step's size.
    fast = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0).double()
    loop = copy.deepcopy(fast)
    start = fast.nin_out.conv.bias.detach().clone()
    fast_adam = pcnn_train.make_optimizer(fast.parameters(), 1e-2, torch.device("cpu"))
    loop_adam = torch.optim.Adam(loop.parameters(), lr=1e-2, foreach=False)
    steps(fast, fast_adam, range(3))
    steps(loop, loop_adam, range(3))
    assert_same_weights(fast, loop)
    assert not torch.equal(fast.nin_out.conv.bias, start)          # the steps moved the weights

    resumed = copy.deepcopy(loop)
    resumed_adam = pcnn_train.make_optimizer(resumed.parameters(), 1e-2, torch.device("cpu"))
    resumed_adam.load_state_dict(copy.deepcopy(loop_adam.state_dict()))     # as from a file
    steps(resumed, resumed_adam, range(3, 6))
    steps(loop, loop_adam, range(3, 6))
    assert_same_weights(resumed, loop)


def test_training_pass_matches_a_pass_per_class():
    """The hybrid term's shared pass (true label once, the other labels appended) gives the same
    nll, logits and loss gradient as a separate nll pass plus one pass per class."""
    torch.manual_seed(0)
    model = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, input_channels=3,
                     num_classes=4, dropout=0.0).double()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([3, 0, 2, 1, 1, 0])
    nll, logits = pcnn_train.training_pass(model, x, y, 4, 4)
    ref_nll = discretized_mix_logistic_loss(x, model(x, y), reduction="none")
    ref_logits = class_log_likelihoods(model, x[:4], 4)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(logits, ref_logits)
    params = list(model.parameters())
    grads = torch.autograd.grad(nll.mean() + 0.1 * F.cross_entropy(logits, y[:4]), params)
    ref_grads = torch.autograd.grad(ref_nll.mean() + 0.1 * F.cross_entropy(ref_logits, y[:4]), params)
    for g, r in zip(grads, ref_grads):   # the loss computes in float32, hence float32 tolerances
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    nll_all, logits_all = pcnn_train.training_pass(model, x, y, 4, 6)   # every image hybrid
    torch.testing.assert_close(nll_all, ref_nll)
    torch.testing.assert_close(logits_all, class_log_likelihoods(model, x, 4))
    nll_only, none = pcnn_train.training_pass(model, x, y, 4, 0)
    assert none is None
    torch.testing.assert_close(nll_only, ref_nll)


@pytest.mark.parametrize("fusion", ["gated_last", "gated"])
def test_training_pass_on_a_band_of_rows_sums_those_rows_of_every_class(fusion):
    """With rows=(r0, r1) the logits are each class's log-likelihood of image rows r0..r1, summed
    from the pixels of a full pass per class; the nll still covers the whole image; the
    gradient is that of those sums."""
    torch.manual_seed(0)
    model = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, input_channels=3,
                     num_classes=4, fusion=fusion, dropout=0.0).double()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([3, 0, 2, 1, 1, 0])
    rows = (2, 4)
    nll, logits = pcnn_train.training_pass(model, x, y, 4, 4, rows=rows)
    ref_nll = discretized_mix_logistic_loss(x, model(x, y), reduction="none")
    ref_logits = class_pixel_log_likelihoods(model, x[:4], 4)[:, :, 2:5].sum(dim=(2, 3))
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(logits, ref_logits)
    assert not torch.allclose(logits, class_log_likelihoods(model, x[:4], 4))
    params = list(model.parameters())
    grads = torch.autograd.grad(nll.mean() + 0.1 * F.cross_entropy(logits, y[:4]), params)
    ref_grads = torch.autograd.grad(ref_nll.mean() + 0.1 * F.cross_entropy(ref_logits, y[:4]), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_hybrid_rows_draws_a_band_inside_the_image():
    torch.manual_seed(0)
    bands = {pcnn_train.hybrid_rows(8, 32) for _ in range(400)}
    assert {r1 - r0 for r0, r1 in bands} == {7}
    assert min(r0 for r0, _ in bands) == 0 and max(r1 for _, r1 in bands) == 31
    assert pcnn_train.hybrid_rows(0, 32) is None and pcnn_train.hybrid_rows(32, 32) is None


def test_disc_rows_trains_and_rejects_a_band_taller_than_the_image(tmp_path, train):
    proc = train(tmp_path / "band", "--max_steps", "3", "--disc_weight", "1e-3", "--disc_rows", "8",
                 "--fusion", "gated_last")
    assert proc.returncode == 0, proc.stderr
    assert len(step_losses(tmp_path / "band")) == 3
    proc = train(tmp_path / "tall", "--max_steps", "1", "--disc_weight", "1e-3", "--disc_rows", "33")
    assert proc.returncode != 0 and "--disc_rows 33 exceeds the image height 32" in proc.stderr


def test_amp_autocasts_on_a_bf16_cpu(tmp_path, train):
    """--amp on a CPU with bf16 instructions trains under bf16 autocast: the first loss (same
    weights, same batch) moves off the float32 value by bf16 rounding, and no further. On a CPU
    without them it says so and trains in float32."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert train(fp32, "--max_steps", "2").returncode == 0
    proc = train(bf16, "--max_steps", "2", "--amp")
    assert proc.returncode == 0, proc.stderr
    first, first_amp = step_losses(fp32)[1], step_losses(bf16)[1]
    if bf16_pays(torch.device("cpu")):
        assert first_amp != first
        assert abs(first_amp - first) < 0.02 * first
    else:
        assert "in float32" in proc.stdout and first_amp == first


def test_label_only_hybrid_trains_the_trunk_on_the_true_label_only():
    """--disc_params label: the label's parameters get the full hybrid gradient; every other
    parameter gets the gradient of a loss whose wrong-label log-likelihoods are constants."""
    torch.manual_seed(0)
    model = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, input_channels=3,
                     num_classes=4, fusion="joint", dropout=0.0).double()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1
    y = torch.tensor([3, 0, 2, 1, 1, 0])
    names, params = zip(*model.named_parameters())
    label = set(model.label_parameter_names())
    assert "embedding.weight" in label and any("cond_proj" in n for n in label)
    assert not any(n.endswith("bias") for n in label)

    def grads(logits_of):
        nll, logits = logits_of()
        return dict(zip(names, torch.autograd.grad(
            nll.mean() + 0.1 * F.cross_entropy(logits, y[:4]), params)))

    def true_label_only():
        nll, logits = pcnn_train.training_pass(model, x, y, 4, 4)
        true = F.one_hot(y[:4], 4).bool()
        return nll, torch.where(true, logits, logits.detach())

    label_only = grads(lambda: pcnn_train.training_pass(model, x, y, 4, 4, model))
    full = grads(lambda: pcnn_train.training_pass(model, x, y, 4, 4))
    trunk = grads(true_label_only)
    for n in names:
        expected = full[n] if n in label else trunk[n]
        torch.testing.assert_close(label_only[n], expected, rtol=1e-4, atol=1e-5, msg=n)
    assert any(not torch.allclose(full[n], trunk[n]) for n in names if n not in label)
