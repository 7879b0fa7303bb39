"""pcnn_train.py end to end on the real CPEN455 data with tiny models: the loss goes down, resume is
exact, checkpoints rebuild the model in a fresh process, flags are real booleans, a non-finite loss
stops the run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcnn_train
from classification_evaluation import load_model
from model import PixelCNN

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "cpen455"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the CPEN455 data at {DATA}")

TINY = ["--data_dir", str(DATA), "--nr_resnet", "1", "--nr_filters", "8", "--nr_logistic_mix", "2",
        "--batch_size", "8", "--sampling_interval", "0", "--dropout", "0.5", "--device", "cpu"]


def train(tmp, *extra):
    """Run pcnn_train.py in a fresh process; returns the completed process."""
    cmd = [sys.executable, "pcnn_train.py", *TINY, "--run_dir", str(tmp), "--save_dir", str(tmp),
           "--sample_dir", str(tmp / "samples"), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def step_losses(run_dir):
    """Per-step objective values from steps.csv: {step: loss}."""
    rows = (line.split(",") for line in (run_dir / "steps.csv").read_text().splitlines())
    return {int(r[0]): float(r[3]) for r in rows}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
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


def test_resume_continues_exactly(tmp_path):
    """3 steps, stop, resume to 6 == 6 steps straight (dropout and flips included)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, "--max_steps", "6", "--flip").returncode == 0
    assert train(split, "--max_steps", "3", "--flip").returncode == 0
    proc = train(split, "--max_steps", "6", "--flip", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    assert step_losses(split) == step_losses(straight)


def test_resume_without_state_is_an_error(tmp_path):
    proc = train(tmp_path, "--resume")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_checkpoint_rebuilds_in_fresh_process(trained, tmp_path):
    """The best checkpoint rebuilds with no flags in a new process and gives the same outputs;
    the course's own loading (build the model, then load_state_dict(torch.load(path))) works."""
    run, _ = trained
    ckpt = run / pcnn_train.BEST_NAME
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 2, 3])
    torch.save({"x": x, "labels": labels}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch; from classification_evaluation import load_model; "
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


def test_preset_sets_defaults_and_flags_win():
    args = pcnn_train.parse_args(["--preset", "cpu", "--nr_filters", "12"])
    assert args.nr_filters == 12
    assert args.nr_resnet == pcnn_train.PRESETS["cpu"]["nr_resnet"]


def test_lr_schedule_is_per_step():
    decay = 0.99
    assert pcnn_train.lr_factor(10, 0, decay) == pytest.approx(decay ** 10)
    assert pcnn_train.lr_factor(0, 4, 1.0) == pytest.approx(0.25)
    assert pcnn_train.lr_factor(3, 4, 1.0) == pytest.approx(1.0)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    """Poison the loss at the third step: the run exits naming step 3 and keeps its files."""
    real_loss = pcnn_train.discretized_mix_logistic_loss
    calls = {"n": 0}

    def poisoned(x, l, reduction="sum"):
        calls["n"] += 1
        nll = real_loss(x, l, reduction)
        return nll * float("nan") if calls["n"] == 3 else nll

    monkeypatch.setattr(pcnn_train, "discretized_mix_logistic_loss", poisoned)
    args = pcnn_train.parse_args([*TINY, "--run_dir", str(tmp_path), "--save_dir", str(tmp_path),
                                  "--max_steps", "5"])
    with pytest.raises(SystemExit) as exit_info:
        pcnn_train.main(args)
    assert "non-finite loss" in str(exit_info.value) and "step 3" in str(exit_info.value)
    assert len(step_losses(tmp_path)) == 2


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true"}
    cmd = [sys.executable, "pcnn_train.py", *TINY, "--run_dir", str(tmp_path),
           "--save_dir", str(tmp_path), "--max_steps", "2", "--en_wandb", "True"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def test_ema_decay_warms_up():
    """EMA = decay * EMA + (1 - decay) * weights with decay = min(0.999, (1 + step) / (10 + step))."""
    model = PixelCNN(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
    ema = pcnn_train.EMA(model, 0.999)
    start = model.nin_out.conv.bias.detach().clone()
    for step, expected_decay in ((0, 0.1), (10_000, 0.999)):
        before = ema.state["nin_out.conv.bias"].clone()
        with torch.no_grad():
            model.nin_out.conv.bias.add_(1.0)
        ema.update(model, step)
        torch.testing.assert_close(ema.state["nin_out.conv.bias"],
                                   expected_decay * before + (1 - expected_decay) * model.nin_out.conv.bias)
    assert not torch.equal(ema.state["nin_out.conv.bias"], start)
