"""Bad input never hangs or dumps a traceback, and budgets hold (docs/errors.md, one test per row).

Every numeric flag of the three scripts, given 0, a negative number or a non-number, is a one-line
usage error that names the flag, from parse_args, before any data or torch work; so is an output
folder no one can write and a data folder without a split. A truncated or foreign checkpoint or
resume.pt, a full disk while saving, and Ctrl-C or SIGTERM during training each end with one line
and leave no temporary file. --max_minutes bounds the whole run, the final validation and the
prior fit included, and the learning rate follows the steps, not the clock, so a resume repeats it.
"""

import errno
import json
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import classification_evaluation
import cli
import dataset
import generation_evaluation
import pcnn_train
import training
from model import CHECKPOINT_NAME, PixelCNN

REPO = Path(__file__).resolve().parents[1]
PARSE_SECONDS = 2.0     # the bound on an answer to bad input
TINY = ["--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2", "--device", "cpu",
        "--amp", "false"]
SCRIPTS = {"pcnn_train": pcnn_train, "classification_evaluation": classification_evaluation,
           "generation_evaluation": generation_evaluation}


def usage_error(capsys, script, argv):
    """script.parse_args(argv) must fail: returns its one error line, checking exit code 2, no
    traceback, one `error:` line, and an answer within PARSE_SECONDS."""
    started = time.time()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args(argv)
    assert time.time() - started < PARSE_SECONDS
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def one_line_exit(exit_info, *needles):
    """The message of a SystemExit that must be one `error:` line holding every needle."""
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def no_temporaries(*folders):
    return not [p for folder in folders for p in Path(folder).rglob("*.tmp")]


@pytest.fixture
def splits(tmp_path):
    """A folder with every split's CSV (empty): what the parse-time checks look for."""
    folder = tmp_path / "splits"
    folder.mkdir()
    for split in dataset.SPLIT_SIZES:
        (folder / f"{split}.csv").touch()
    return folder


def base_argv(script, tmp_path, splits):
    """Flags that make parse_args of `script` succeed, writing under tmp_path."""
    run = str(tmp_path / "run")
    return {"pcnn_train": ["--data_dir", str(splits), "--run_dir", run, "--save_dir", run,
                           "--sample_dir", str(tmp_path / "s")],
            "classification_evaluation": ["-i", str(splits), "--out_dir", str(tmp_path / "out")],
            "generation_evaluation": ["--gen_data_dir", str(tmp_path / "gen")]}[script]


# ------------------------------------------------------------------------ numbers, at parse time

# (script, flag, whether 0 is allowed): every numeric flag of the three scripts.
NUMERIC_FLAGS = [
    *[("pcnn_train", flag, False) for flag in (
        "--nr_resnet", "--nr_filters", "--nr_logistic_mix", "--batch_size", "--lr", "--lr_decay",
        "--block_init_scale", "--max_epochs", "--eval_batch_size", "--sample_batch_size")],
    *[("pcnn_train", flag, True) for flag in (
        "--dropout", "--warmup_steps", "--lr_cooldown", "--grad_clip", "--ema", "--spike_sigmas",
        "--rollback_after", "--max_steps", "--max_minutes", "--checkpoint_minutes",
        "--eval_interval", "--sampling_interval", "--save_interval", "--seed")],
    ("classification_evaluation", "--batch_size", False),
    ("classification_evaluation", "--explain", False),
    ("classification_evaluation", "--amp_recheck", True),
    *[("generation_evaluation", flag, False) for flag in (
        "--n_per_class", "--image_size", "--batch_size", "--temperature", "--completions",
        "--temperature_sweep")],
    ("generation_evaluation", "--seed", True),
]


@pytest.mark.parametrize("script, flag, zero_ok", NUMERIC_FLAGS,
                         ids=[f"{s}{f}" for s, f, _ in NUMERIC_FLAGS])
@pytest.mark.parametrize("value", ["0", "-4", "abc"])
def test_numeric_flag_out_of_range_is_a_usage_error(script, flag, zero_ok, value, capsys,
                                                    tmp_path, splits):
    argv = base_argv(script, tmp_path, splits) + [flag, value]
    if value == "0" and zero_ok:
        assert getattr(SCRIPTS[script].parse_args(argv), flag[2:]) == 0
        return
    line = usage_error(capsys, script, argv)
    assert flag in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_a_range_error_says_the_range(capsys):
    line = usage_error(capsys, "pcnn_train", ["--batch_size", "-4"])
    assert line.endswith("error: argument -b/--batch_size: must be an integer >= 1, got -4")
    line = usage_error(capsys, "pcnn_train", ["--lr_decay", "nan"])
    assert line.endswith("argument -e/--lr_decay: must be a number in (0, 1], got nan")


def test_a_negative_batch_size_ends_at_once_from_the_shell(tmp_path):
    """`pcnn_train.py --batch_size -4` hung for 9 minutes: now it is a usage error before any
    data is read (the time is mostly the imports)."""
    proc = subprocess.run([sys.executable, "pcnn_train.py", "--batch_size", "-4", "--data_dir",
                           str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].endswith("must be an integer >= 1, got -4")
    assert "Traceback" not in proc.stderr and not (tmp_path / "nowhere").exists()


# --------------------------------------------------------------------------- paths, at parse time

OUTPUT_FLAGS = [("pcnn_train", "--run_dir"), ("pcnn_train", "--save_dir"),
                ("pcnn_train", "--sample_dir"), ("classification_evaluation", "--out_dir"),
                ("classification_evaluation", "--save_checkpoint"),
                ("generation_evaluation", "--gen_data_dir")]


@pytest.mark.parametrize("script, flag", OUTPUT_FLAGS, ids=[f"{s}{f}" for s, f in OUTPUT_FLAGS])
@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_output_is_a_usage_error_that_creates_nothing(script, flag, where, capsys,
                                                                 tmp_path, splits):
    """/proc takes no new folders, even from root; nor does a path through a regular file."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    path = "/proc/no_such_dir/out" if where == "proc" else str(a_file / "out")
    extra = ["--prior", "fit"] if flag == "--save_checkpoint" else []
    if flag == "--save_checkpoint":
        path += "/model.pth"
    before = sorted(tmp_path.rglob("*"))
    line = usage_error(capsys, script, base_argv(script, tmp_path, splits) + extra + [flag, path])
    assert flag in line and ("/proc" in line or "is not a folder" in line), line
    assert sorted(tmp_path.rglob("*")) == before


def test_unwritable_checks_leave_nothing_behind(tmp_path):
    assert cli.unwritable(tmp_path / "new" / "deeper") is None and list(tmp_path.iterdir()) == []
    assert cli.unwritable(tmp_path) is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, flag, present, missing", [
    ("pcnn_train", "--data_dir", "train", "validation"),
    ("classification_evaluation", "-i", "train", "validation"),
])
def test_a_data_folder_without_a_split_is_a_usage_error(script, flag, present, missing, capsys,
                                                        tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / f"{present}.csv").touch()
    argv = base_argv(script, tmp_path, data)
    line = usage_error(capsys, script, argv)
    assert f"{missing}.csv not found" in line and "--data_dir" in line, line


def test_offline_first_run_says_how_to_point_at_the_data(tmp_path):
    """A refused connection stands in for no network: the error says what to pass, and the
    half-made download is gone."""
    with pytest.raises(dataset.DatasetError) as err:
        dataset.download_cpen455(tmp_path / "data", "http://127.0.0.1:9/cpen455.zip")
    message = str(err.value)
    assert "could not install" in message and "--data_dir FOLDER" in message
    assert "\n" not in message and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- checkpoints and resume.pt

def tiny_model(num_classes=4):
    return PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, input_channels=3,
                    num_classes=num_classes)


def truncated(path):
    torch.save(tiny_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])


def not_a_checkpoint(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


def another_dataset(path):
    torch.save(tiny_model(num_classes=10).state_dict(), path)


CHECKPOINT_KINDS = {"truncated": (truncated, "not a readable PyTorch checkpoint"),
                    "not_a_checkpoint": (not_a_checkpoint, "not a readable PyTorch checkpoint"),
                    "another_dataset": (another_dataset, "10 classes")}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_KINDS))
@pytest.mark.parametrize("script", ["classification_evaluation", "generation_evaluation"])
def test_a_bad_checkpoint_is_one_line_and_writes_nothing(script, kind, tmp_path, small_data):
    make, needle = CHECKPOINT_KINDS[kind]
    path = tmp_path / "bad.pth"
    make(path)
    argv = ({"classification_evaluation": ["-i", str(small_data)],
             "generation_evaluation": ["--skip_fid"]}[script]
            + base_argv(script, tmp_path, small_data) + ["--checkpoint", str(path)])
    started = time.time()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(SCRIPTS[script].parse_args(argv))
    one_line_exit(exit_info, needle, str(path))
    assert time.time() - started < PARSE_SECONDS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_truncated_fid_weights_fail_before_sampling(tmp_path):
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    truncated(weights)
    ref = tmp_path / "ref"
    ref.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(ref / "a.png")
    checkpoint = tmp_path / "model.pth"
    torch.save(tiny_model().state_dict(), checkpoint)
    args = generation_evaluation.parse_args(["--checkpoint", str(checkpoint), "--fid_weights",
                                             str(weights), "--ref_data_dir", str(ref),
                                             "--gen_data_dir", str(tmp_path / "gen")])
    with pytest.raises(SystemExit) as exit_info:
        generation_evaluation.main(args)
    one_line_exit(exit_info, "--fid_weights", str(weights))
    assert not (tmp_path / "gen").exists()


def train_argv(small_data, run_dir, *extra):
    return [*TINY, "--data_dir", str(small_data), "--run_dir", str(run_dir), "--save_dir",
            str(run_dir), "--sample_dir", str(run_dir / "samples"), "--fit_prior", "false",
            *map(str, extra)]


RESUME_KINDS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:5000]),
    "empty": lambda path: path.write_bytes(b""),
    "a_model_checkpoint": lambda path: torch.save(tiny_model().state_dict(), path),
    "another_architecture": lambda path: torch.save(
        dict(model=PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2).state_dict()), path),
}


@pytest.fixture(scope="module")
def resumable(tmp_path_factory, small_data):
    """A run of 2 steps: its run folder, with resume.pt."""
    run_dir = tmp_path_factory.mktemp("resumable")
    pcnn_train.main(pcnn_train.parse_args(train_argv(small_data, run_dir, "--max_steps", 2)))
    return run_dir


@pytest.mark.parametrize("kind", sorted(RESUME_KINDS))
def test_a_bad_resume_file_is_one_line(kind, tmp_path, small_data, resumable):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resume.pt").write_bytes((resumable / "resume.pt").read_bytes())
    RESUME_KINDS[kind](run_dir / "resume.pt")
    args = pcnn_train.parse_args(train_argv(small_data, run_dir, "--max_steps", 4, "--resume"))
    with pytest.raises(SystemExit) as exit_info:
        pcnn_train.main(args)
    message = one_line_exit(exit_info, str(run_dir / "resume.pt"))
    assert "--run_dir" in message and "Traceback" not in message


def test_a_full_disk_while_saving_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "resume.pt"
    training.atomic_save({"step": 1}, path)

    def disk_full(obj, f):
        Path(f).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save = torch.save
    torch.save = disk_full
    try:
        with pytest.raises(OSError) as err:
            training.atomic_save({"step": 2}, path)
    finally:
        torch.save = real_save
    assert "could not write" in str(err.value) and "No space left on device" in str(err.value)
    assert torch.load(path, weights_only=True) == {"step": 1} and no_temporaries(tmp_path)


def test_a_full_disk_ends_training_with_one_line(tmp_path, small_data, resumable):
    """A real failed write: files over 500 kB may not be written (RLIMIT_FSIZE; Python ignores
    SIGXFSZ), so the tiny run's resume.pt (900 kB) cannot be saved. The previous resume.pt stays
    as it was, and no .tmp is left."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resume.pt").write_bytes((resumable / "resume.pt").read_bytes())
    size = 500_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    proc = subprocess.run([sys.executable, "pcnn_train.py",
                           *train_argv(small_data, run_dir, "--max_steps", 4, "--resume")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "resume.pt" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert torch.load(run_dir / "resume.pt", weights_only=True)["step"] == 2
    assert no_temporaries(run_dir)


def test_any_other_failed_write_or_ctrl_c_is_one_line(capsys):
    """What errors_in_one_line does around each script's main: an OSError (a log that cannot be
    appended to, a PNG that cannot be written) is `error: <file>: <reason>`; Ctrl-C outside the
    training steps is `interrupted`, exit code 130."""
    with pytest.raises(SystemExit) as exit_info, cli.errors_in_one_line():
        open("/proc/no_such_dir/log.jsonl", "a")
    assert exit_info.value.code == "error: /proc/no_such_dir/log.jsonl: No such file or directory"
    with pytest.raises(SystemExit) as exit_info, cli.errors_in_one_line():
        raise KeyboardInterrupt
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


# ------------------------------------------------------------------------------------ interrupts

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_training_writes_resume_pt_and_leaves_no_tmp(sig, tmp_path, small_data):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pcnn_train.py",
                             *train_argv(small_data, run_dir, "--max_steps", 10_000)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = run_dir / "steps.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not steps.exists() or len(steps.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    step = torch.load(run_dir / "resume.pt", weights_only=True)["step"]
    assert err.strip().splitlines()[-1] == (
        f"stopped by {sig.name} at step {step}: {run_dir / 'resume.pt'} holds the run, continue "
        f"it with --resume")
    assert no_temporaries(run_dir)
    pcnn_train.main(pcnn_train.parse_args(train_argv(small_data, run_dir, "--max_steps", step + 2,
                                                     "--resume")))
    assert [int(r.split(",")[0]) for r in steps.read_text().splitlines()[1:]] == \
        list(range(1, step + 3))


# ------------------------------------------------------------------------------------------ budget

def test_max_minutes_bounds_the_whole_run_and_stale_tmp_files_go(tmp_path, small_data, capsys):
    """--max_minutes 0.15 (9 s): training, the final validation and the prior fit all end within
    it; the .tmp files a killed run left are removed first."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [run_dir / "resume.pt.tmp", run_dir / f"{CHECKPOINT_NAME}.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"")
    args = pcnn_train.parse_args(train_argv(small_data, run_dir, "--max_minutes", 0.15,
                                            "--fit_prior", "true", "--checkpoint_minutes", 0))
    started = time.time()
    pcnn_train.main(args)
    seconds = time.time() - started
    out = capsys.readouterr().out
    assert seconds < 0.15 * 60 + 1.0, out
    assert all(f"removed {tmp}" in out for tmp in stale) and no_temporaries(run_dir)
    assert "done: reached --max_minutes 0.15" in out
    fit = json.loads((run_dir / "class_prior.json").read_text())
    assert training.PRIOR_FIT_MIN_IMAGES <= fit["train_images"] <= fit["of_train_images"]


def test_the_prior_fit_scores_what_the_time_allows():
    model = tiny_model().eval()
    run = SimpleNamespace(args=SimpleNamespace(eval_batch_size=4), device=torch.device("cpu"),
                          autocast=training.bf16_autocast(torch.device("cpu"), False))
    images, order = torch.rand(12, 3, 8, 8) * 2 - 1, torch.tensor([5, 3, 11, 0, 1, 2, 4, 6])
    picked, ll = training.score_before(run, model, images, order, deadline=float("inf"))
    assert torch.equal(picked, order) and ll.shape == (8, 4)
    picked, ll = training.score_before(run, model, images, order, deadline=time.time() - 1)
    assert picked.numel() == 0 and ll.shape == (0, 4)


def fake_run(**flags):
    args = SimpleNamespace(**dict(max_steps=0, max_epochs=1000, max_minutes=1.0, lr=1e-3,
                                  warmup_steps=0, lr_decay=1.0, lr_cooldown=0.5) | flags)
    return SimpleNamespace(args=args, batches_per_epoch=100, ddp=False)


def test_the_plan_fixes_the_steps_the_budget_buys_when_the_cooldown_starts(monkeypatch):
    """At one step a second with 100 s to train, the budget buys 100 steps: they are fixed at
    step 50, where --lr_cooldown 0.5 starts, and the rate then falls linearly to zero at 100."""
    now = [1000.0]
    monkeypatch.setattr(training.time, "time", lambda: now[0])
    run = fake_run()
    clock = SimpleNamespace(run=run, train_end=now[0] + 100, paced_from=None)
    progress = training.Progress()
    for step in range(100):
        progress.step = step
        training.Clock.plan(clock, progress)
        assert progress.planned_steps == (0 if step < 50 else 100), step
        now[0] += 1.0
    rates = [training.learning_rate(run, training.Progress(step=s, planned_steps=100))
             for s in (0, 50, 75, 100)]
    assert rates == pytest.approx([1e-3, 1e-3, 0.5e-3, 0.0])


def test_the_learning_rate_reads_no_clock(monkeypatch):
    def no_clock():
        raise AssertionError("the learning rate read the clock")

    monkeypatch.setattr(training.time, "time", no_clock)
    assert training.learning_rate(fake_run(), training.Progress(step=90, planned_steps=100)) == \
        pytest.approx(0.2e-3)


def test_a_resume_follows_the_planned_steps(tmp_path, small_data, resumable):
    """resume.pt holds the plan: a resume under the same --max_minutes takes the rate of every
    step from it, and stops at the planned step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = torch.load(resumable / "resume.pt", weights_only=True)
    ckpt["planned_steps"] = 6
    ckpt["args"]["max_minutes"] = 30.0
    torch.save(ckpt, run_dir / "resume.pt")
    flags = ["--max_minutes", 30, "--lr", 1e-3, "--lr_decay", 1, "--warmup_steps", 0,
             "--lr_cooldown", 0.5]
    pcnn_train.main(pcnn_train.parse_args(train_argv(small_data, run_dir, *flags, "--resume")))
    rows = [r.split(",") for r in (run_dir / "steps.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [3, 4, 5, 6]
    # step s (1-based) runs at budget_used (s - 1) / 6: the cooldown's second half of the plan
    assert [float(r[4]) for r in rows] == pytest.approx([1e-3, 1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3])
    assert torch.load(run_dir / "resume.pt", weights_only=True)["planned_steps"] == 6


# --------------------------------------------------------------------------- outputs say what

def test_classification_says_what_it_scored_and_writes_into_out_dir(tmp_path, small_data, capsys,
                                                                    resumable):
    args = classification_evaluation.parse_args([
        "--checkpoint", str(resumable / CHECKPOINT_NAME), "-i", str(small_data), "--out_dir",
        str(tmp_path / "out"), "--device", "cpu"])
    classification_evaluation.main(args)
    first = capsys.readouterr().out.splitlines()[0]
    assert re.match(rf"classifying the validation split of {re.escape(str(small_data))} \(64 "
                    rf"images\) with {re.escape(str(resumable / CHECKPOINT_NAME))}: "
                    rf"PixelCNN\(\{{'nr_resnet': 1, .*\}}\); class prior: the checkpoint's "
                    rf"\(uniform: none fitted\), log pi = \[-1.39, -1.39, -1.39, -1.39\]$",
                    first), first
    assert (tmp_path / "out" / "confusion_validation.png").is_file()


def test_classification_writes_where_git_ignores_by_default():
    out_dir = classification_evaluation.build_parser().parse_args([]).out_dir
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{out_dir}/confusion_validation.png"],
                             cwd=REPO)
    assert ignored.returncode == 0


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_torch_cannot_see_is_one_line(device, monkeypatch):
    from utils import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        pick_device(device)
    assert str(stop.value) == (f"error: --device {device}, but this torch sees no {device} "
                               f"device: pass --device cpu or auto")
    assert pick_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------------------- docs/errors.md

def test_every_row_of_docs_errors_md_names_a_test_here():
    rows = [line for line in (REPO / "docs" / "errors.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| case")]
    named = [re.findall(r"`(test_\w+)`", row) for row in rows]
    assert rows and all(named), [row for row, n in zip(rows, named) if not n]
    assert {name for names in named for name in names} <= set(globals())
