"""bench.py's three sections on tiny models: classification reads its data from --data_dir and its
model from --checkpoint, names what it read, and changes none of the predictions of the course's
pattern where float32 (or bf16 with its recheck) cannot; sampling and training print figures that
are sane (positive times, ratios that are the quotients of the times printed, the fast sampler
faster than a full pass per pixel). The timings themselves are the machine's."""

import math
import re
from argparse import Namespace

import pytest
import torch

import bench
from dataset import load_dataset
from utils import bayes_predictions, bf16_autocast, bf16_pays, dataset_log_likelihoods

TINY = dict(nr_resnet=1, nr_filters=4, nr_logistic_mix=2)
NUMBER = r"([\d.]+)"
REPORT = re.compile(rf"^(.+?) +straightforward +{NUMBER} (\S+) +fast +{NUMBER} \S+ +"
                    rf"{NUMBER}x +peak mem +{NUMBER} MB$", re.M)


def reports(out):
    """The lines `report` printed: (name, straightforward, fast, ratio, peak memory in MB)."""
    return [(name.strip(), float(slow), float(fast), float(ratio), float(mem))
            for name, slow, _, fast, ratio, mem in REPORT.findall(out)]


def assert_sane(rows):
    """Times not negative, ratios and memory positive; each ratio the quotient of its two times
    where they are printed with enough digits to tell (two decimals: from 0.1 on, to 5%)."""
    assert rows
    for name, slow, fast, ratio, mem in rows:
        assert slow >= 0 and fast >= 0 and ratio > 0 and mem > 0, name
        if min(slow, fast) >= 0.1:
            assert ratio == pytest.approx(slow / fast, rel=0.05, abs=0.05), name


def test_classification_reads_data_dir_and_checkpoint(tmp_path, subset, tiny_model, run_script,
                                                      class_loop, clear_margins):
    data = subset({"validation": 2})                                     # 8 images
    checkpoint = tmp_path / "tiny.pth"
    model = tiny_model(**TINY)
    torch.save(model.state_dict(), checkpoint)

    proc = run_script("bench.py", "--device", "cpu", "--only", "classification", "--data_dir",
                      data, "--checkpoint", checkpoint, "--rounds", "1")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^classify 8 validation images, 4/1/2 ", out, re.M), out
    assert_sane(reports(out))
    # The course pattern's predictions are the independent loop's; float32 changes none of them,
    # and neither does bf16 with its recheck, which scores every close call again in float32.
    images = load_dataset("cpen455", data, "validation").images
    ll = class_loop(model, images)
    clear_margins(ll)
    changed = dict(fp32=0)
    if bf16_pays(torch.device("cpu")):
        rounded = dataset_log_likelihoods(model, images, 4, autocast=bf16_autocast(
            torch.device("cpu")), recheck=0)
        changed |= {"bf16": 0, "bf16 without recheck":
                    (bayes_predictions(model, rounded) != ll.argmax(dim=1)).sum().item()}
    else:
        assert "bf16 autocast skipped" in out
    printed = dict(re.findall(rf"^  (.+) changes (\d+) of 8 predictions of the course pattern "
                              rf"\({re.escape(str(checkpoint))}\)$", out, re.M))
    assert {k: int(v) for k, v in printed.items()} == changed, out
    gflop = float(re.search(r"one pass of 8 images x 4 classes: ([\d.]+) GFLOP", out).group(1))
    assert gflop >= 0


def test_missing_data_dir_is_a_one_line_error_before_any_timing(tmp_path, run_script):
    missing = tmp_path / "nowhere"
    proc = run_script("bench.py", "--device", "cpu", "--data_dir", missing)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(missing) in proc.stderr
    assert proc.stdout == ""


def run_section(section, monkeypatch, capsys, tmp_path):
    """bench.main for one section, in this process, with every model tiny: SIZES and the presets'
    models, and torch.compile a no-op (a real compile costs minutes of C++ on a CPU)."""
    monkeypatch.setattr(bench, "SIZES", {"40/1/5": TINY})
    monkeypatch.setattr(bench, "PRESETS", {name: preset | TINY | dict(batch_size=2)
                                           for name, preset in bench.PRESETS.items()})
    monkeypatch.setattr(bench.torch, "compile", lambda model, **kwargs: model)
    bench.main(Namespace(device="cpu", only=section, data_dir=tmp_path, checkpoint=tmp_path,
                         slow_pixels=1, rows=4, train_steps=1, rounds=1))
    return capsys.readouterr().out


def test_sampling_figures_are_sane(monkeypatch, capsys, tmp_path):
    """The fast sampler's estimate beats a full pass per pixel (by 85x here: the margin is wide),
    and each images/s figure is the batch over the seconds printed beside it."""
    out = run_section("sampling", monkeypatch, capsys, tmp_path)
    rows = reports(out)
    assert len(rows) == 1 and rows[0][0].startswith("sample 100 images, 40/1/5")
    assert_sane(rows)
    assert rows[0][3] > 1, "the cached sampler is slower than a full pass per pixel"
    rates = re.findall(rf"sample_fast 40/1/5, batch +(\d+): +{NUMBER} images/s \({NUMBER} s\)", out)
    assert [int(batch) for batch, _, _ in rates] == [1, 16, 100]
    for batch, rate, seconds in rates:
        assert float(rate) > 0 and math.isclose(float(rate) * float(seconds), int(batch),
                                                rel_tol=0.06 / float(seconds) + 1e-3, abs_tol=0.06)


def test_training_figures_are_sane(monkeypatch, capsys, tmp_path):
    """Every mode of the training step, the guarded step and Adam's step print positive rates,
    and the comparisons between them are the quotients of those rates."""
    out = run_section("training", monkeypatch, capsys, tmp_path)
    steps = dict(re.findall(rf"^  train step (.+?) +{NUMBER} images/s", out, re.M))
    expected = ({"fp32 eager", "bf16 eager", "bf16 compile", "bf16 F.dropout"}
                if bf16_pays(torch.device("cpu")) else {"fp32 eager"})
    assert steps.keys() == expected and all(float(v) > 0 for v in steps.values()), out
    guarded = re.findall(rf"^  guarded step 4/1/2, (.+?): +{NUMBER} images/s", out, re.M)
    assert len(guarded) == 1 and guarded[0][0].startswith("eager") and float(guarded[0][1]) > 0, \
        out                                                  # CUDA graphs on CUDA only
    rows = reports(out)
    assert_sane(rows)
    assert any(name.startswith("Adam step on") for name, *_ in rows)
    # The comparisons print seconds per image (0.00 at these sizes); their ratios are those of the
    # rates printed above: (slower mode, faster mode) by the report's name.
    pairs = {"train 40/1/5, batch 32, fp32 eager vs bf16 eager": ("fp32 eager", "bf16 eager"),
             "train 40/1/5, batch 32, fp32 eager vs bf16 compile": ("fp32 eager", "bf16 compile"),
             "train 40/1/5, batch 32, bf16 eager: nn.Dropout vs layers.Dropout":
                 ("bf16 F.dropout", "bf16 eager")}
    compared = {name: ratio for name, _, _, ratio, _ in rows if name.startswith("train 40/1/5")}
    assert compared.keys() == (pairs.keys() if bf16_pays(torch.device("cpu")) else set())
    for name, ratio in compared.items():
        slow, fast = pairs[name]
        assert ratio == pytest.approx(float(steps[fast]) / float(steps[slow]), rel=0.05,
                                      abs=0.05), name
