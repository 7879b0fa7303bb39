"""pcnn_train.py end to end with tiny models on a few dozen of the real CPEN455 images (and on
stand-ins for MNIST and CIFAR-10): the loss goes down and the log scores the checkpoint it keeps;
resume is exact, from a stop, across epoch boundaries, or from a mid-epoch checkpoint after
kill -9, with steps.csv cut back and the run's time carried over, and it refuses a model of other
flags; result lines start their own line in a shared log; sample grids and numbered checkpoints
come on schedule from the averaged weights; --compile, --amp and --grad_clip 0 train as they
should; checkpoints rebuild the model in a fresh process; flags are real booleans; non-finite
losses are skipped and rolled back.

The runs go through pcnn_train.main in this process; only what needs a process of its own (a kill,
a shell's buffering, a fresh import, wandb, a C++ compile) runs in one. An epoch of the tiny data
is 3 steps:

    python -m pytest tests/test_train.py -q --durations=5
"""

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

import numpy as np
import pytest
import torch
from PIL import Image

import pcnn_train
import training
from dataset import load_dataset
from model import CHECKPOINT_NAME, DEFAULT_CHECKPOINT, PixelCNN, load_model
from utils import bf16_pays, discretized_mix_logistic_loss, sample_fast

UNIFORM_BPD = 8.0          # bits/dim of the uniform distribution over 256 levels
LEARNT_BPD = 7.5           # a model that learnt something is this far below it (the run: 6.92)


def step_rows(run_dir):
    """steps.csv as rows [step, epoch, batch_bpd, loss, lr, skipped], as text."""
    header, *lines = (run_dir / "steps.csv").read_text().splitlines()
    assert header == "step,epoch,batch_bpd,loss,lr,skipped"
    return [line.split(",") for line in lines]


def step_losses(run_dir):
    """Per-step objective values from steps.csv: {step: loss}."""
    return {int(r[0]): float(r[3]) for r in step_rows(run_dir)}


def log_records(run_dir):
    """The records of log.jsonl."""
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def load_resume_file(run_dir):
    return torch.load(run_dir / "resume.pt", weights_only=True)


def assert_same_training_state(a, b):
    """Two resume.pt contents hold the same weights, optimizer, EMA, guard statistics and data
    order, bit for bit."""
    for key in ("model", "ema"):
        assert (a[key] is None) == (b[key] is None)
        assert a[key] is None or a[key].keys() == b[key].keys()
        for name in a[key] or {}:
            if torch.is_tensor(a[key][name]):
                assert torch.equal(a[key][name], b[key][name]), (key, name)
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for name in p:
            assert torch.equal(p[name], q[name]), ("optimizer", name)
    assert torch.equal(a["data_gen"], b["data_gen"]), "the data order's generator"
    assert (a["perm"] is None) == (b["perm"] is None)
    assert a["perm"] is None or torch.equal(a["perm"], b["perm"])
    for name in a["guard"]:                     # the spike guard's running statistics
        assert torch.equal(a["guard"][name], b["guard"][name]), ("guard", name)
    assert (a["step"], a["epoch"], a["batch_index"]) == (b["step"], b["epoch"], b["batch_index"])


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[name]), name


def independent_scores(model, images, labels, class_loop, clear_margins):
    """Bits/dim under the true labels and the Bayes classifier's accuracy of `model` on the images,
    from the plain loop over classes."""
    ll = class_loop(model, images)                                        # (N, classes)
    clear_margins(ll + model.class_log_prior.double())
    nll = -ll.gather(1, labels[:, None]).squeeze(1)
    bpd = nll.mean().item() / (images[0].numel() * math.log(2))
    accuracy = ((ll + model.class_log_prior.double()).argmax(1) == labels).double().mean().item()
    return bpd, accuracy


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train):
    """One short run that later tests share: 40 steps (13 epochs of the tiny data) at a high
    learning rate, the last EMA weights kept."""
    run = train(tmp_path_factory.mktemp("run"), "--max_steps", "40", "--lr", "5e-3", "--ema",
                "0.9", "--dropout", "0", "--keep", "last", "--eval_interval", "0")
    return run


def test_loss_goes_down_and_the_log_scores_the_kept_model(trained, tiny_data, class_loop,
                                                          clear_margins):
    """The last 5 steps' loss is below the first 5's; the record's validation bits/dim and
    accuracy are those of the checkpoint kept, by the plain loop over classes, and a model that
    learnt something beats the uniform distribution's 8 bits/dim by a clear margin."""
    losses = [v for _, v in sorted(step_losses(trained).items())]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    (record,) = log_records(trained)
    assert record["step"] == 40 and record["epoch"] == pytest.approx(40 / 3)
    val = load_dataset("cpen455", tiny_data, "validation")
    bpd, accuracy = independent_scores(load_model(trained / CHECKPOINT_NAME), val.images,
                                       val.labels, class_loop, clear_margins)
    assert record["val_bpd"] == pytest.approx(bpd, rel=1e-5)
    assert record["val_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert record["val_bpd"] < LEARNT_BPD < UNIFORM_BPD
    assert record["train_bpd"] < UNIFORM_BPD
    assert (trained / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_result_lines_start_their_own_line_in_one_log(tmp_path, run_script, train_command):
    """`python pcnn_train.py ... > log 2>&1` from a plain shell (stdout block-buffered), over an
    epoch boundary: the progress bars share the file, every line the run prints is a line of its
    own there, the epoch ends after its 3 steps and the next starts."""
    proc = run_script("pcnn_train.py", *train_command(tmp_path, "--max_steps", "4"),
                      log=tmp_path / "log")
    assert proc.returncode == 0, proc.log
    log = proc.log
    assert "epoch 1:" in log and "epoch 2:" in log and "\r" in log, "no progress bars in the log"
    lines = log.split("\n")
    best = tmp_path / CHECKPOINT_NAME
    for pattern in [r"training PixelCNN\(.*\) on cpu, [\d.]+M parameters",
                    r"epoch 1\.00 step 3: train [\d.]+ bpd, val [\d.]+ bpd, val acc [\d.]+%, .*",
                    r"epoch 1\.33 step 4: train [\d.]+ bpd, val [\d.]+ bpd, val acc [\d.]+%, .*",
                    rf"  new best validation accuracy -> {re.escape(str(best))}",
                    rf"done: reached --max_steps 4; best checkpoint kept, validation accuracy "
                    rf"[\d.]+% -> {re.escape(str(best))}",
                    rf"training curves -> {re.escape(str(tmp_path / 'curves.png'))}"]:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, log)
    assert [int(r[1]) for r in step_rows(tmp_path)] == [1, 1, 1, 2]
    ckpt = load_resume_file(tmp_path)
    assert (ckpt["epoch"], ckpt["batch_index"], ckpt["step"]) == (1, 1, 4)


def test_resume_across_epoch_boundaries_continues_exactly_and_cuts_steps_csv_back(tmp_path,
                                                                                  train):
    """2 steps, stop, resume to 7 == 7 steps straight (dropout, flips and the EMA included) over
    two epoch ends, whose new data orders come from the saved generator; also when the run had
    gone on to step 5 past its step-2 checkpoint (as a killed run does): steps.csv and log.jsonl
    are cut back to step 2 on resume, so each step appears once."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = ["--flip", "--ema", "0.9"]
    train(straight, "--max_steps", "7", *flags)
    train(split, "--max_steps", "2", *flags)
    shutil.copy(split / "resume.pt", tmp_path / "step2.pt")
    train(split, "--max_steps", "5", *flags, "--resume")
    assert [r["step"] for r in log_records(split)] == [2, 3, 5]
    shutil.copy(tmp_path / "step2.pt", split / "resume.pt")     # steps 3 to 5 were never saved
    train(split, "--max_steps", "7", *flags, "--resume")
    assert (split / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    assert [r["step"] for r in log_records(split)] == [2, 3, 6, 7]
    assert_same_training_state(load_resume_file(split), load_resume_file(straight))
    # The record at step 3 trained since the resumed run's record at step 2; the later ones match
    # the straight run's in full.
    for record, expected in zip(log_records(split)[1:], log_records(straight), strict=True):
        for key in ("epoch", "step", "val_bpd", "val_acc", "lr"):
            assert record[key] == expected[key], key
        assert record["step"] == 3 or record["train_bpd"] == expected["train_bpd"]


def test_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
        tmp_path, train, train_command, small_data, repo):
    """kill -9 in the first epoch (64 steps here), a few steps after a --checkpoint_minutes
    checkpoint: --resume continues from that checkpoint and ends with the weights, optimizer,
    EMA, steps.csv and log record of a run that was never stopped."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    flags = ["--flip", "--ema", "0.9", "--checkpoint_minutes", 0.005]   # every 0.3 s: steps apart
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "pcnn_train.py",
                             *map(str, train_command(killed, *flags, data=small_data))],
                            cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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

    train(killed, *flags, "--max_steps", end, "--resume", data=small_data)
    train(straight, *flags, "--max_steps", end, data=small_data)
    assert_same_training_state(load_resume_file(killed), load_resume_file(straight))
    assert (killed / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    (record,), (expected,) = log_records(killed), log_records(straight)
    for key in ("epoch", "step", "train_bpd", "val_bpd", "val_acc", "lr"):
        assert record[key] == expected[key], key


def test_elapsed_time_and_max_minutes_count_the_time_before_a_resume(tmp_path, train, capsys):
    """A checkpoint that says the run has trained 10 minutes: after --resume, elapsed_min goes on
    from 10, and --max_minutes 10 stops the run before it trains another step."""
    train(tmp_path, "--max_steps", "2")

    def set_elapsed_minutes(minutes):
        ckpt = load_resume_file(tmp_path)
        ckpt["elapsed_s"] = 60.0 * minutes
        torch.save(ckpt, tmp_path / "resume.pt")

    set_elapsed_minutes(10)
    capsys.readouterr()
    train(tmp_path, "--max_steps", "3", "--resume")
    assert "10.0 min into the run" in capsys.readouterr().out
    first, second = log_records(tmp_path)
    assert first["elapsed_min"] < 2 and 10 < second["elapsed_min"] < 12
    assert 10 < load_resume_file(tmp_path)["elapsed_s"] / 60 < 12

    set_elapsed_minutes(10)
    train(tmp_path, "--max_steps", "6", "--max_minutes", "10", "--resume")
    assert "done: reached --max_minutes 10.0" in capsys.readouterr().out
    assert max(step_losses(tmp_path)) == 3


def test_atomic_save_keeps_the_old_file_when_killed_mid_write(tmp_path, monkeypatch):
    """A write that dies halfway (here torch.save raising after half the bytes) leaves the last
    complete resume.pt in place."""
    path = tmp_path / "resume.pt"
    training.atomic_save({"step": 1}, path)
    real_save = torch.save

    def dies_halfway(obj, f):
        real_save(obj, f)
        Path(f).write_bytes(Path(f).read_bytes()[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(training.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        training.atomic_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_keep_last_writes_the_last_ema_weights_and_best_the_best(tmp_path, train, capsys):
    """--keep last: the checkpoint holds the EMA weights of the run's end, also across a resume;
    --keep best: the weights of the record with the best validation accuracy."""
    last, best = tmp_path / "last", tmp_path / "best"
    for run, keep in ((last, "last"), (best, "best")):
        for steps in ("2", "4", "6"):
            train(run, "--max_steps", steps, "--ema", "0.5", "--keep", keep, "--lr", "5e-3",
                  *(["--resume"] if steps != "2" else []))
        assert f"done: reached --max_steps 6; {keep} checkpoint kept" in capsys.readouterr().out
    kept, ema = torch.load(last / CHECKPOINT_NAME), load_resume_file(last)["ema"]
    for name, value in ema.items():
        assert torch.equal(kept[name], value), name
    assert all(r["kept"] for r in log_records(last))
    # Under --keep best the records marked kept are the strict new bests, and the checkpoint is
    # the run's last EMA weights only if the last record is one.
    records = log_records(best)
    accs = [r["val_acc"] for r in records]
    assert [r["kept"] for r in records] == [a > max(accs[:i], default=-1) for i, a in enumerate(accs)]
    assert any(not r["kept"] for r in records), "every record a new best tests little"
    kept, ema_end = torch.load(best / CHECKPOINT_NAME), load_resume_file(best)["ema"]
    same = all(torch.equal(kept[n], v) for n, v in ema_end.items())
    assert same == records[-1]["kept"]


def test_resume_without_state_is_an_error(tmp_path, train):
    with pytest.raises(SystemExit, match="does not exist"):
        train(tmp_path, "--resume")


@pytest.mark.parametrize("flags", [["--nr_filters", "12"], ["--fusion", "film"],
                                   ["--nr_logistic_mix", "3"]])
def test_resume_with_other_architecture_flags_names_both_and_keeps_the_files(tmp_path, train,
                                                                           flags):
    """A resume.pt of another model than the flags build: one error naming both, and the run's
    files as they were."""
    train(tmp_path, "--max_steps", "1")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, "--max_steps", "2", "--resume", *flags)
    message = str(exit_info.value.code)
    key, value = flags[0].removeprefix("--"), flags[1]
    saved = load_resume_file(tmp_path)["model"]["_extra_state"]
    assert message.startswith("error: ") and "\n" not in message
    assert f"'{key}': {saved[key]!r}" in message and re.search(rf"'{key}': '?{value}'?", message)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_checkpoint_rebuilds_in_fresh_process(trained, tmp_path, run_script):
    """The kept checkpoint rebuilds with no flags in a new process and gives the same outputs;
    the course's own loading (build the model, then load_state_dict(torch.load(path))) works."""
    ckpt = trained / CHECKPOINT_NAME
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 2, 3])
    torch.save({"x": x, "labels": labels}, tmp_path / "inputs.pt")
    code = (f"import torch; from model import load_model; m = load_model({str(ckpt)!r}); "
            f"d = torch.load({str(tmp_path / 'inputs.pt')!r}); "
            f"torch.save(m(d['x'], d['labels']), {str(tmp_path / 'out.pt')!r})")
    proc = run_script("-c", code)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        here = load_model(ckpt)(x, labels)
        course = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2)
        course.load_state_dict(torch.load(ckpt))
        course.eval()
        assert torch.equal(course(x, labels), here)
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
    assert args.nr_resnet == training.PRESETS["cpu"]["nr_resnet"]


def test_lr_schedule_is_per_step():
    decay = 0.99
    assert training.lr_factor(10, 0, decay) == pytest.approx(decay ** 10)
    assert training.lr_factor(0, 4, 1.0) == pytest.approx(0.25)
    assert training.lr_factor(3, 4, 1.0) == pytest.approx(1.0)
    # The cooldown multiplies: over the last fifth of the budget the rate falls linearly to zero.
    for used, cool in ((0.0, 1.0), (0.8, 1.0), (0.9, 0.5), (0.95, 0.25), (1.0, 0.0), (1.2, 0.0)):
        assert training.lr_factor(10, 4, decay, used, 0.2) == pytest.approx(decay ** 10 * cool)


def test_lr_cooldown_falls_linearly_over_the_end_of_the_run(tmp_path, train):
    """--lr_cooldown 0.5 of --max_steps 8: steps.csv logs the rate of each step, --lr for steps
    1-5 (step 5 starts with half the budget left), then 3/4, 1/2 and 1/4 of it."""
    train(tmp_path, "--max_steps", "8", "--lr", "1e-3", "--lr_decay", "1", "--lr_cooldown", "0.5")
    rows = step_rows(tmp_path)
    assert [int(r[0]) for r in rows] == list(range(1, 9))
    expected = [1e-3] * 5 + [0.75e-3, 0.5e-3, 0.25e-3]
    assert [float(r[4]) for r in rows] == pytest.approx(expected)
    assert log_records(tmp_path)[-1]["lr"] == pytest.approx(0.25e-3)


def test_eval_interval_validates_every_few_epochs_and_at_the_end_and_trains_the_same(
        tmp_path, train):
    """Epochs of 3 steps, a stop after 8: --eval_interval 2 logs epochs 2 and 2 2/3, the first
    record covering the 6 steps since the start; the training itself is that of a run that
    validates every epoch, bit for bit, down to the checkpoint it keeps."""
    every, second = tmp_path / "every", tmp_path / "second"
    for run_dir, interval in ((every, "1"), (second, "2")):
        train(run_dir, "--max_steps", "8", "--ema", "0.9", "--keep", "last", "--eval_interval",
              interval)
    assert [(r["epoch"], r["step"]) for r in log_records(every)] == [(1, 3), (2, 6), (8 / 3, 8)]
    first, last = log_records(second)
    assert (first["epoch"], first["step"], last["epoch"], last["step"]) == (2, 6, 8 / 3, 8)
    assert first["images_per_s"] * first["train_seconds"] == pytest.approx(6 * 8)
    assert_same_training_state(load_resume_file(second), load_resume_file(every))
    assert last["val_bpd"] == log_records(every)[-1]["val_bpd"]
    assert_same_weights(*(torch.load(d / CHECKPOINT_NAME, weights_only=True)
                          for d in (second, every)))


def test_sample_grids_and_numbered_checkpoints_come_on_schedule_from_the_average(tmp_path, train):
    """--sampling_interval 2 and --save_interval 2 over 6 steps (2 epochs): a sample grid and a
    checkpoint after epoch 2 only, both of the EMA weights the run keeps then; the grid's row c
    holds sample_fast's images of class c from seed 0, level for level; neither disturbs the
    training."""
    sampled, saved = tmp_path / "sampled", tmp_path / "saved"
    flags = ["--max_steps", "6", "--ema", "0.9", "--keep", "last"]
    train(sampled, *flags, "--sampling_interval", "2", "--sample_batch_size", "8")
    train(saved, *flags, "--save_interval", "2")
    assert (sampled / "steps.csv").read_text() == (saved / "steps.csv").read_text()
    kept = torch.load(saved / CHECKPOINT_NAME, weights_only=True)
    assert sorted(p.name for p in saved.glob("pcnn_*.pth")) == ["pcnn_cpen455_epoch_2.pth"]
    assert_same_weights(torch.load(saved / "pcnn_cpen455_epoch_2.pth", weights_only=True), kept)
    assert not torch.equal(kept["nin_out.conv.bias"],
                           load_resume_file(saved)["model"]["nin_out.conv.bias"]), \
        "the EMA weights and the live ones should differ"

    assert sorted(p.name for p in (sampled / "samples").iterdir()) == ["default_epoch_2.png"]
    grid = np.asarray(Image.open(sampled / "samples" / "default_epoch_2.png"))   # (H, W, 3)
    model, n, size = load_model(sampled / CHECKPOINT_NAME), 2, 32
    assert_same_weights(model.state_dict(), kept)
    labels = torch.arange(4).repeat_interleave(n)
    images = sample_fast(model, labels, (3, size, size), generator=torch.Generator().manual_seed(0))
    levels = torch.round((images + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert grid.shape == (4 * (size + 1) + 1, n * (size + 1) + 1, 3)          # padding 1
    for k, label in enumerate(labels.tolist()):
        top, left = 1 + label * (size + 1), 1 + (k % n) * (size + 1)
        np.testing.assert_array_equal(grid[top:top + size, left:left + size], levels[k])


def test_grad_clip_zero_turns_clipping_off(tmp_path, train):
    """--grad_clip 0 trains as a clip too loose to act, bit for bit; a tight clip moves the
    losses from step 2 on, so the flag is read."""
    runs = {clip: train(tmp_path / clip, "--max_steps", "3", "--lr", "5e-3", "--grad_clip", clip)
            for clip in ("0", "1e9", "1e-3")}
    off, loose, tight = (step_losses(runs[clip]) for clip in ("0", "1e9", "1e-3"))
    assert off == loose
    assert tight[1] == off[1] and tight[2] != off[2] and tight[3] != off[3]


def test_compile_trains_the_compiled_model_as_eager(tmp_path, train, monkeypatch):
    """--compile: the step runs the graphs torch.compile traced (here handed to a backend that
    runs them as they are, so no C++ compiler is needed) and trains as the eager model does,
    loss for loss (without dropout, whose masks the traced graphs draw otherwise); the checkpoint
    holds the bare model's names, which load_model reads."""
    import torch._dynamo
    graphs, real_compile = [], torch.compile

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(training.torch, "compile",
                        lambda model, **kwargs: real_compile(model, backend=backend))
    try:
        train(tmp_path / "compiled", "--max_steps", "2", "--dropout", "0", "--compile")
    finally:
        torch._dynamo.reset()
    train(tmp_path / "eager", "--max_steps", "2", "--dropout", "0")
    assert graphs, "the compiled model never ran"
    compiled, eager = step_losses(tmp_path / "compiled"), step_losses(tmp_path / "eager")
    assert compiled.keys() == eager.keys() == {1, 2}
    assert list(compiled.values()) == pytest.approx(list(eager.values()), rel=1e-5)
    state = torch.load(tmp_path / "compiled" / CHECKPOINT_NAME, weights_only=True)
    assert not any(name.startswith("_orig_mod") for name in state)
    load_model(tmp_path / "compiled" / CHECKPOINT_NAME)


COMPILE_BUDGET_S = 60      # a warm inductor cache compiles the tiny model in ~5 s; a cold one
                           # took 2 minutes on two cores


def test_compile_with_inductor(tmp_path, train_command, repo):
    """--compile with torch's default backend, which writes and compiles C++ kernels: the run
    trains and the checkpoint loads. Skipped without a C++ compiler, and where the compile takes
    longer than COMPILE_BUDGET_S (an empty inductor cache)."""
    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        pytest.skip("torch.compile's inductor backend needs a C++ compiler")
    cmd = [sys.executable, "pcnn_train.py",
           *map(str, train_command(tmp_path, "--max_steps", "2", "--compile"))]
    # A session of its own: a timeout ends the compile workers too.
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=COMPILE_BUDGET_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.skip(f"torch.compile took over {COMPILE_BUDGET_S} s here (an empty inductor "
                    f"cache); the next run finds the kernels compiled so far")
    assert proc.returncode == 0, err[-3000:]
    assert len(step_losses(tmp_path)) == 2 and math.isfinite(step_losses(tmp_path)[2])
    load_model(tmp_path / CHECKPOINT_NAME)


def test_budget_used_is_the_part_of_the_run_that_ends_it_first():
    """Of --max_steps, of --max_epochs, or of the steps --max_minutes buys once they are planned
    (Progress.planned_steps): the largest."""
    def budget(step, planned=0, **flags):
        args = SimpleNamespace(**dict(max_steps=0, max_minutes=0.0, max_epochs=10) | flags)
        run = SimpleNamespace(args=args, batches_per_epoch=100, ddp=False)
        return training.budget_used(run, training.Progress(step=step, planned_steps=planned))

    assert budget(250) == pytest.approx(0.25)                         # of 10 epochs of 100
    assert budget(250, max_steps=500) == pytest.approx(0.5)
    assert budget(250, planned=400, max_steps=500) == pytest.approx(250 / 400)
    assert budget(250, planned=800, max_steps=500) == pytest.approx(0.5)
    with pytest.raises(SystemExit):
        pcnn_train.parse_args(["--lr_cooldown", "1.5"])


def poison_losses(monkeypatch, calls_to_poison):
    """Make the training loss NaN at the given calls (1-based)."""
    real_loss = training.discretized_mix_logistic_loss
    calls = {"n": 0}

    def poisoned(x, l, reduction="sum"):
        calls["n"] += 1
        nll = real_loss(x, l, reduction)
        return nll * float("nan") if calls["n"] in calls_to_poison else nll

    monkeypatch.setattr(training, "discretized_mix_logistic_loss", poisoned)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch, train):
    """Poison the loss at the third step: that step is skipped (its row in steps.csv says so) and
    counted in log.jsonl, and the run goes on to its end."""
    poison_losses(monkeypatch, {3})
    train(tmp_path, "--max_steps", "5", "--eval_interval", "0")
    rows = step_rows(tmp_path)
    assert [(r[0], r[5]) for r in rows] == [("1", "0"), ("2", "0"), ("3", "1"), ("4", "0"),
                                            ("5", "0")]
    assert rows[2][3] == "nan"
    record = log_records(tmp_path)[-1]
    assert record["skipped_steps"] == 1 and record["rollbacks"] == 0
    assert math.isfinite(record["train_bpd"])


def test_skipped_steps_in_a_row_roll_back_and_resume_keeps_the_counters(tmp_path, monkeypatch,
                                                                       train, capsys):
    """Non-finite losses at steps 4-6 with --rollback_after 3: the run goes back to the state of
    step 1 (its only copy so far) and halves its learning rate, says so, and counts it; a resume
    keeps the counters and the halved rate."""
    poison_losses(monkeypatch, {4, 5, 6})
    flags = ["--rollback_after", "3", "--lr", "1e-3", "--lr_decay", "1", "--eval_interval", "0"]
    train(tmp_path, *flags, "--max_steps", "8")
    assert "step 6: 3 steps skipped in a row; weights, optimizer and average back to step 1, " \
           "learning rate now x0.5" in capsys.readouterr().out
    train(tmp_path, *flags, "--max_steps", "10", "--resume")
    rows = step_rows(tmp_path)
    assert [int(r[5]) for r in rows] == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert [float(r[4]) for r in rows] == [1e-3] * 6 + [5e-4] * 4
    record = log_records(tmp_path)[-1]
    assert (record["step"], record["skipped_steps"], record["rollbacks"]) == (10, 3, 1)


def test_wandb_offline(tmp_path, run_script, train_command):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = run_script("pcnn_train.py", *train_command(tmp_path, "--max_steps", "2", "--en_wandb",
                                                      "True"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_ema_decay_warms_up():
    """EMA = decay * EMA + (1 - decay) * weights with decay = min(0.999, (1 + step) / (10 + step))."""
    model = PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
    ema = training.EMA(model, 0.999)
    start = model.nin_out.conv.bias.detach().clone()
    for step, expected_decay in ((0, 0.1), (2000, 2001 / 2010), (10_000, 0.999)):
        before = ema.state["nin_out.conv.bias"].clone()
        with torch.no_grad():
            model.nin_out.conv.bias.add_(1.0)
        ema.update(ema.weight(step))
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

    def assert_close_weights(a, b):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    # In float64, where the two orders of the same arithmetic agree far below a step's size.
    fast = PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0).double()
    loop = copy.deepcopy(fast)
    start = fast.nin_out.conv.bias.detach().clone()
    fast_adam = training.make_optimizer(fast.parameters(), 1e-2, torch.device("cpu"))
    loop_adam = torch.optim.Adam(loop.parameters(), lr=1e-2, foreach=False)
    steps(fast, fast_adam, range(3))
    steps(loop, loop_adam, range(3))
    assert_close_weights(fast, loop)
    assert not torch.equal(fast.nin_out.conv.bias, start)          # the steps moved the weights

    resumed = copy.deepcopy(loop)
    resumed_adam = training.make_optimizer(resumed.parameters(), 1e-2, torch.device("cpu"))
    resumed_adam.load_state_dict(copy.deepcopy(loop_adam.state_dict()))     # as from a file
    steps(resumed, resumed_adam, range(3, 6))
    steps(loop, loop_adam, range(3, 6))
    assert_close_weights(resumed, loop)


def test_amp_autocasts_on_a_bf16_cpu(tmp_path, train, capsys):
    """--amp on a CPU with bf16 instructions trains under bf16 autocast: the first loss (same
    weights, same batch) moves off the float32 value by bf16 rounding, and no further. On a CPU
    without them it says so and trains in float32."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(fp32, "--max_steps", "1", "--eval_interval", "0")
    capsys.readouterr()
    train(bf16, "--max_steps", "1", "--eval_interval", "0", "--amp")
    first, first_amp = step_losses(fp32)[1], step_losses(bf16)[1]
    if bf16_pays(torch.device("cpu")):
        assert first_amp != first
        assert abs(first_amp - first) < 0.02 * first
    else:
        assert "in float32" in capsys.readouterr().out and first_amp == first


# -------------------------------------------------------------------- MNIST and CIFAR-10 paths

@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_mnist_and_cifar10_train_and_score_their_own_images(dataset, tmp_path, train, request,
                                                            class_loop, clear_margins):
    """--dataset mnist (one channel, 28x28) and cifar10 (32x32), ten classes each, on stand-ins in
    torchvision's file layouts: the model takes the data's channels and classes, and the logged
    validation bits/dim (over C*H*W sub-pixels) and accuracy are the kept model's on the split's
    images, decoded here from the raw arrays."""
    root, arrays = request.getfixturevalue(f"{dataset}_stand_in")
    run = train(tmp_path / "run", "--dataset", dataset, "--max_steps", "3", "--lr", "5e-3",
                "--keep", "last", data=root)
    model = load_model(run / CHECKPOINT_NAME)
    channels = 1 if dataset == "mnist" else 3
    assert (model.input_channels, model.num_classes) == (channels, 10)
    assert len(step_rows(run)) == 3
    pixels, labels = arrays["validation"]
    images = torch.from_numpy(pixels).float().view(len(labels), channels, *pixels.shape[-2:])
    images = images / 255 * 2 - 1
    bpd, accuracy = independent_scores(model, images, torch.from_numpy(labels).long(), class_loop,
                                       clear_margins)
    record = log_records(run)[-1]                       # epochs of 2 steps: the end of the run
    assert record["step"] == 3
    assert record["val_bpd"] == pytest.approx(bpd, rel=1e-5)
    assert record["val_acc"] == pytest.approx(accuracy, abs=1e-6)
