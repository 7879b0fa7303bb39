"""classification_evaluation.py against an independent computation: the accuracy, per-class
accuracy, macro F1 and confusion matrix it prints, the submission and logits it writes, flip TTA,
the course's `get_label` hook, the explanation maps (`--explain`), and the errors a bad checkpoint
gives.

"Independent" means a per-class loop written here: run the model once per class c with every label
set to c, take `discretized_mix_logistic_loss(..., reduction="none")`, argmax over classes of the
negative NLL, and count with numpy. The checkpoint is a tiny PixelCNN with perturbed weights saved
as a plain state_dict, the format pcnn_train.py writes. The script runs in a fresh process on 16
real CPEN455 validation and 16 test images. The shipped model, models/conditional_pixelcnn.pth,
classifies 32 validation images as its record says it should:

    python -m pytest tests/test_classification_evaluation.py -q --durations=5
"""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import classification_evaluation as ce
from dataset import load_dataset
from model import DEFAULT_CHECKPOINT, PixelCNN, load_model
from utils import bf16_autocast, dataset_log_likelihoods

TINY = dict(nr_filters=4)         # of conftest's tiny model: a CLI run is mostly its imports
NUM_CLASSES = 4
LL_ATOL = 1e-2                    # nats, on log-likelihoods of thousands of nats per image
# bf16 autocast moves the tiny model's log p(x | c) (about -19,500 nats an image) by up to 3.5
# nats on the validation images; the classes of an image lie a median 136 nats apart.
AMP_ATOL = 10.0


# ------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def evaluate(run_script, request):
    """evaluate(checkpoint, out_dir, *flags, data=tiny_data): classification_evaluation.py in a
    fresh process on the CPU."""
    def run(checkpoint, out_dir, *extra, data=None):
        data = data or request.getfixturevalue("tiny_data")
        return run_script("classification_evaluation.py", "--checkpoint", checkpoint, "-i", data,
                          "--out_dir", out_dir, "--device", "cpu", *extra)
    return run


def evaluate_in_process(checkpoint, tmp_path):
    """main() of the script on a bad checkpoint: returns the message it exits with. Any other
    exception escapes, which on the command line is a traceback."""
    args = ce.build_parser().parse_args(["--checkpoint", str(checkpoint), "-i", str(tmp_path),
                                         "--out_dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        ce.main(args)
    return str(exit_info.value.code)


def assert_one_line_error(message, *needles):
    assert "\n" not in message.strip() and message.startswith("error: "), message
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def numpy_report(labels, predictions, num_classes):
    """Accuracy, recall per class, macro F1 (0 where precision + recall is 0) and confusion."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    tp = np.diag(confusion).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.nan_to_num(tp / confusion.sum(axis=1))
        precision = np.nan_to_num(tp / confusion.sum(axis=0))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return (labels == predictions).mean(), recall, f1.mean(), confusion


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("ckpt") / "conditional_pixelcnn.pth"
    torch.save(tiny_model(**TINY).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    """The checkpoint loaded without model.load_model."""
    return PixelCNN.from_state_dict(torch.load(checkpoint)).eval()


@pytest.fixture(scope="module")
def validation(tiny_data):
    """The 16 validation images of the tiny folder, 4 of each class."""
    return load_dataset("cpen455", tiny_data, "validation")


# --------------------------------------------------------------------------- labelled split

def test_validation_report_matches_independent_count(checkpoint, model, validation, tmp_path,
                                                     evaluate, class_loop, clear_margins):
    proc = evaluate(checkpoint, tmp_path, "-m", "validation")
    assert proc.returncode == 0, proc.stderr

    ll = class_loop(model, validation.images)                            # (16, 4)
    clear_margins(ll)
    labels, predictions = validation.labels.numpy(), ll.argmax(dim=1).numpy()
    assert len(set(predictions)) > 1, "a model that predicts one class tests little"
    accuracy, recall, macro_f1, confusion = numpy_report(labels, predictions, NUM_CLASSES)

    printed = float(re.search(r"^Accuracy: (\S+)$", proc.stdout, re.M).group(1))
    assert round(printed * len(labels)) == (labels == predictions).sum()
    assert printed == pytest.approx(accuracy, rel=1e-12)

    for name, r in zip(validation.class_names, recall):
        shown = float(re.search(rf"^\s*{name}: ([\d.]+)%$", proc.stdout, re.M).group(1))
        assert shown == pytest.approx(100 * r, abs=0.0051)
    shown_f1 = float(re.search(r"^macro F1: ([\d.]+)$", proc.stdout, re.M).group(1))
    assert shown_f1 == pytest.approx(macro_f1, abs=5.1e-5)

    block = proc.stdout.split("confusion matrix (rows: true, columns: predicted):")[1]
    block = block.split("confusion matrix ->")[0]
    shown_confusion = np.array([int(v) for v in re.findall(r"\d+", block)]).reshape(4, 4)
    assert shown_confusion.sum() == len(labels)
    np.testing.assert_array_equal(shown_confusion, confusion)

    png = tmp_path / "confusion_validation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in proc.stdout


def test_result_lines_start_their_own_line_in_one_log(checkpoint, model, validation, tmp_path,
                                                      run_script, tiny_data, class_loop,
                                                      clear_margins):
    """`python classification_evaluation.py > log 2>&1` on 16 real validation images: the progress
    bar shares the file, and every result line, `Accuracy:` first, is a line of its own there
    (as grep reads lines), with the accuracy of an independent count."""
    proc = run_script("classification_evaluation.py", "--checkpoint", checkpoint, "-i", tiny_data,
                      "--out_dir", tmp_path, "--device", "cpu", log=tmp_path / "log")
    text = proc.log
    assert proc.returncode == 0, text
    assert "log p(x|c)" in text and "\r" in text, "the progress bar is not in the log"
    lines = text.split("\n")
    ll = class_loop(model, validation.images)                            # (16, 4)
    clear_margins(ll)
    accuracy = (ll.argmax(dim=1) == validation.labels).double().mean().item()
    assert f"Accuracy: {accuracy}" in lines, text
    for pattern in [r"\s*(hamburger|panda|koala|pizza): [\d.]+%", r"macro F1: [\d.]+",
                    r"confusion matrix \(rows: true, columns: predicted\):",
                    r"confusion matrix -> \S+\.png"]:
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, text)


# ------------------------------------------------------------------------- unlabelled split

def read_test_csv(folder):
    """test.csv's rows as (path, label): the real test split's first rows, every label -1
    (hidden)."""
    with open(folder / "test.csv", newline="") as f:
        rows = [(path, int(label)) for path, label in csv.reader(f)]
    assert len(rows) > 1 and {label for _, label in rows} == {-1}
    return rows


def test_test_split_writes_submission_and_flip_logits(checkpoint, model, tmp_path, evaluate,
                                                      tiny_data, class_loop):
    """--mode test --tta flip --fid: the id_label submission, its rows in test.csv order and the
    fid row last; logits = log p(x|c) + log p(mirror(x)|c), labels = their argmax."""
    proc = evaluate(checkpoint, tmp_path, "-m", "test", "--tta", "flip", "--fid", "23.4")
    assert proc.returncode == 0, proc.stderr

    rows = read_test_csv(tiny_data)
    expected_ids = [path.removeprefix("test/") for path, _ in rows]
    lines = (tmp_path / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == len(rows) + 2
    assert lines[-1] == "fid,23.4"
    ids, labels = zip(*(line.split(",") for line in lines[1:-1]))
    assert list(ids) == expected_ids
    labels = np.array([int(v) for v in labels])
    assert set(labels) <= set(range(NUM_CLASSES))

    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (len(rows), NUM_CLASSES)
    np.testing.assert_array_equal(logits.argmax(axis=1), labels)

    images = load_dataset("cpen455", tiny_data, "test").images
    expected = (class_loop(model, images) + class_loop(model, images.flip(dims=[3]))) / 2
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-5, atol=LL_ATOL)


def test_test_csv_submission_is_test_csv_with_the_predictions(checkpoint, tmp_path, evaluate,
                                                              tiny_data):
    """--submission_format test_csv: no header, no fid row, test.csv's paths in its order, each
    with the argmax of its log p(x|c) where test.csv has -1."""
    proc = evaluate(checkpoint, tmp_path, "-m", "test", "--submission_format", "test_csv")
    assert proc.returncode == 0, proc.stderr
    assert "(test_csv form)" in proc.stdout
    predictions = np.load(tmp_path / "logits.npy").argmax(axis=1)
    assert len(set(predictions)) > 1, "a model that predicts one class tests little"
    expected = [f"{path},{label}" for (path, _), label in zip(read_test_csv(tiny_data),
                                                               predictions, strict=True)]
    assert (tmp_path / "submission.csv").read_text() == "\n".join(expected) + "\n"
    assert expected[0].startswith("test/") and expected[0].endswith(".jpg," + str(predictions[0]))


def test_id_label_submission_has_a_fid_row_only_when_given(tmp_path, tiny_data):
    """write_submission on the real test split's paths: the id_label form without a FID value
    ends at the last image; the test_csv form has no fid row to fill."""
    rows = read_test_csv(tiny_data)
    paths, labels = [path for path, _ in rows], [k % NUM_CLASSES for k in range(len(rows))]
    ce.write_submission(tmp_path / "a.csv", paths, labels)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == len(rows) + 1
    assert lines[1:] == [f"{Path(p).name},{c}" for p, c in zip(paths, labels)]
    with pytest.raises(ValueError, match="no fid row"):
        ce.write_submission(tmp_path / "b.csv", paths, labels, "test_csv", fid=1.0)


@pytest.mark.parametrize("flags, needle", [
    (["-m", "test", "--submission_format", "test_csv", "--fid", "3.5"], "--fid"),
    (["-m", "validation", "--fid", "3.5"], "-m test"),
    (["-m", "test", "--fid", "nan"], "finite"),
])
def test_fid_where_it_cannot_go_is_a_one_line_error(checkpoint, tmp_path, flags, needle):
    args = ce.build_parser().parse_args(["--checkpoint", str(checkpoint), "--out_dir",
                                         str(tmp_path), *flags])
    with pytest.raises(SystemExit) as exit_info:
        ce.main(args)
    assert_one_line_error(str(exit_info.value.code), needle)
    assert not (tmp_path / "submission.csv").exists()


def test_amp_rounds_the_log_likelihoods(checkpoint, model, tmp_path, evaluate, tiny_data,
                                        class_loop):
    """--amp without the recheck: bf16 autocast moves log p(x|c) off the float32 values, by
    rounding only: by far less than the classes of an image lie apart, so that each column is
    its own class's."""
    proc = evaluate(checkpoint, tmp_path, "-m", "test", "--amp", "--amp_recheck", "0")
    assert proc.returncode == 0, proc.stderr
    logits = np.load(tmp_path / "logits.npy")
    expected = class_loop(model, load_dataset("cpen455", tiny_data, "test").images).numpy()
    assert not np.array_equal(logits, expected)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=AMP_ATOL)
    # columns in another order would move each image's scores by the gaps between its classes
    gaps = np.abs(expected[:, :, None] - expected[:, None, :])[:, ~np.eye(NUM_CLASSES, dtype=bool)]
    assert (gaps.max(axis=0) > 2 * AMP_ATOL).all()


@pytest.mark.parametrize("prior", [None, [0.0, 1.3, -0.7, 0.4]])
def test_amp_recheck_scores_the_close_calls_in_float32(prior, tiny_model):
    """Under autocast, in the images where a second class lies less than `recheck` nats below the
    best in bf16, exactly the classes within `recheck` of the best get their float32 scores; every
    other score keeps its bf16 value. Close is measured in log p(x | c) + log pi(c), with the
    model's class prior (`prior`, in units of the median gap to the best class)."""
    model = tiny_model(**TINY)
    torch.manual_seed(1)
    x = torch.rand(12, 3, 8, 8) * 2 - 1
    bf16 = bf16_autocast(torch.device("cpu"))
    fp32 = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4)               # (12, 4)
    rounded = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, autocast=bf16,
                                      recheck=0)
    if prior is not None:
        gap = (rounded.max(dim=1, keepdim=True).values - rounded).median()
        model.class_log_prior.copy_(torch.log_softmax(torch.tensor(prior) * gap, dim=0))
    posterior = rounded + model.class_log_prior
    below_best = posterior.max(dim=1, keepdim=True).values - posterior                # (12, 4)
    second = below_best.sort(dim=1).values[:, 1]                                      # (12,)
    recheck = second.median().item()
    close = torch.zeros_like(rounded, dtype=torch.bool)
    for i in range(len(x)):
        near = [c for c in range(NUM_CLASSES) if below_best[i, c] < recheck]
        if len(near) > 1:
            close[i, near] = True
    assert 0 < close.any(dim=1).sum() < len(x)          # images with and without a close call
    assert (close.sum(dim=1) < NUM_CLASSES).any() and close.any()   # not every class of them
    assert not torch.equal(rounded, fp32)               # autocast really rounded
    mixed = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, autocast=bf16,
                                    recheck=recheck)
    torch.testing.assert_close(mixed[close], fp32[close], rtol=0, atol=LL_ATOL)
    assert torch.equal(mixed[~close], rounded[~close])
    # with flips too, the rechecked classes get the float32 mean of both passes
    flip_fp32 = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, tta="flip")
    flip_mixed = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, tta="flip",
                                         autocast=bf16, recheck=1e9)
    torch.testing.assert_close(flip_mixed, flip_fp32, rtol=0, atol=2 * LL_ATOL)
    # without autocast there is nothing to recheck: float32 throughout
    torch.testing.assert_close(dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4,
                                                       recheck=1e9), fp32, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_amp_recheck_needs_finite_nats(value, capsys):
    with pytest.raises(SystemExit):
        ce.parse_args(["--amp_recheck", value])
    assert "error: --amp_recheck needs a number of nats >= 0" in capsys.readouterr().err


def test_flip_tta_averages_in_the_mirror_image(model, validation, class_loop):
    x = validation.images[:6]
    plain = class_loop(model, x)
    mirrored = class_loop(model, x.flip(dims=[3]))
    tta = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, tta="flip")
    torch.testing.assert_close(tta.double(), (plain + mirrored) / 2, rtol=1e-5, atol=LL_ATOL)
    none = dataset_log_likelihoods(model, x, NUM_CLASSES, batch_size=4, tta="none")
    torch.testing.assert_close(none.double(), plain, rtol=1e-5, atol=LL_ATOL)
    assert (mirrored - plain).abs().max() > 1, "the mirror images scored like the originals"
    # on the scale of one image: a mirror-symmetric image scores as itself
    half = x[:, :, :, : x.shape[3] // 2]
    symmetric = torch.cat([half, half.flip(dims=[3])], dim=3)
    torch.testing.assert_close(
        dataset_log_likelihoods(model, symmetric, NUM_CLASSES, batch_size=4, tta="flip").double(),
        class_loop(model, symmetric), rtol=1e-5, atol=LL_ATOL)


def test_get_label_is_the_independent_argmax(model, validation, class_loop, clear_margins):
    x = validation.images[:10]
    ll = class_loop(model, x)
    clear_margins(ll)
    labels = ce.get_label(model, x, "cpu")
    assert labels.dtype == torch.int64 and labels.shape == (10,)
    assert torch.equal(labels, ll.argmax(dim=1))


def test_classification_report_by_hand():
    """confusion (rows: truth) [[1,1,0,0],[0,2,0,0],[0,0,0,1],[0,0,0,1]]: recall 1/2, 1, 0, 1;
    precision 1, 2/3, 0 (nothing predicted), 1/2; F1 2/3, 4/5, 0, 2/3; macro F1 8/15."""
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    predictions = torch.tensor([0, 1, 1, 1, 3, 3])
    report = ce.classification_report(labels, predictions, NUM_CLASSES)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"] == pytest.approx([1 / 2, 1, 0, 1])
    assert report["macro_f1"] == pytest.approx(8 / 15)
    assert report["confusion"].tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]

    _, recall, macro_f1, _ = numpy_report(labels.numpy(), predictions.numpy(), NUM_CLASSES)
    assert report["per_class"] == pytest.approx(recall)
    assert report["macro_f1"] == pytest.approx(macro_f1)


# ---------------------------------------------------------------------------------- explain

def test_explanation_order_puts_misclassified_first():
    labels = torch.tensor([0, 1, 2, 3, 1, -1])
    predictions = torch.tensor([0, 2, 2, 1, 1, 0])
    assert ce.explanation_order(labels, predictions).tolist() == [1, 3, 5, 0, 2, 4]


def test_explanation_maps_add_up_to_the_class_log_likelihoods(model, class_loop):
    """Each class's pixel log-likelihoods sum to log p(x | c) of the per-class loop; each map sums
    to log p(x | c) minus its mean over classes, and the maps cancel at every pixel."""
    x = (torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0))
         .float() / 127.5 - 1)
    pixel_ll, maps = ce.explanation_maps(model, x)
    assert pixel_ll.shape == maps.shape == (3, NUM_CLASSES, 16, 16)
    ll = class_loop(model, x)                                             # (3, classes)
    torch.testing.assert_close(pixel_ll.sum(dim=(2, 3)).double(), ll, rtol=1e-5, atol=LL_ATOL)
    torch.testing.assert_close(maps.sum(dim=(2, 3)).double(), ll - ll.mean(dim=1, keepdim=True),
                               rtol=1e-5, atol=LL_ATOL)
    torch.testing.assert_close(maps.sum(dim=1), torch.zeros(3, 16, 16), rtol=0, atol=1e-5)


def test_explain_shows_misclassified_images_first(checkpoint, model, validation, tmp_path,
                                                  evaluate, data_dir, class_loop):
    """--explain 5 on a validation split of 6 real images, 3 that the independent classifier gets
    right followed by 3 it gets wrong: the wrong ones come first, then the first 2 right ones, each
    printed with its true and predicted class and log p(x | c)."""
    ll = class_loop(model, validation.images)                             # (16, 4)
    right = (ll.argmax(dim=1) == validation.labels).nonzero()[:, 0]
    wrong = (ll.argmax(dim=1) != validation.labels).nonzero()[:, 0]
    assert len(right) >= 3 and len(wrong) >= 3, "the tiny model needs both kinds; reseed"
    rows = torch.cat([right[:3], wrong[:3]])                              # split order
    data = tmp_path / "data"
    data.mkdir()
    (data / "validation").symlink_to(data_dir / "validation")
    (data / "validation.csv").write_text("".join(
        f"{validation.paths[i]},{validation.labels[i]}\n" for i in rows.tolist()))
    proc = evaluate(checkpoint, tmp_path, "--explain", "5", data=data)
    assert proc.returncode == 0, proc.stderr

    names = validation.class_names
    shown = re.findall(r"^explained validation image (\d+): true (\w+), predicted (\w+); "
                       r"log p\(x\|c\): (.*)$", proc.stdout, re.M)
    assert [int(index) for index, *_ in shown] == [3, 4, 5, 0, 1]
    for index, truth, predicted, values in shown:
        i = rows[int(index)]
        assert truth == names[validation.labels[i]] and predicted == names[ll[i].argmax()]
        printed = [float(v.split()[1]) for v in values.split(", ")]
        np.testing.assert_allclose(printed, ll[i].numpy(), rtol=0, atol=0.05 + LL_ATOL)
    png = tmp_path / "explain_validation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in proc.stdout


def test_explain_needs_a_positive_count(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ce.parse_args(["--explain", "0"])
    assert exit_info.value.code == 2
    assert "error: --explain K needs K >= 1 images, got 0" in capsys.readouterr().err


# -------------------------------------------------------------------------- the shipped model

SHIPPED_RECORD = "results/shipped_model/epyc_at_1ece6c4_class_prior.json"   # its prior, kept
SHIPPED_BPD = 3.916          # on all 519 validation images (results/shipped_model/README.md)


def test_the_shipped_model_classifies_as_its_record_says(subset, tmp_path, monkeypatch, capsys,
                                                         repo, class_loop, clear_margins):
    """The first command a user runs, `python classification_evaluation.py`, with its default
    checkpoint models/conditional_pixelcnn.pth, on 32 validation images (8 of each class): the
    model holds the class prior its record gives, the printed accuracy is that of the independent
    classifier with that prior, and the model is the trained one the record describes: far above
    chance (82.66% of all 519 images; 25 of these 32) and near its 3.916 bits/dim."""
    monkeypatch.chdir(repo)                             # the default path is relative to it
    if not Path(DEFAULT_CHECKPOINT).is_file():
        pytest.skip(f"no shipped model at {DEFAULT_CHECKPOINT}")
    data = subset({"validation": 8})
    ce.main(ce.parse_args(["-i", str(data), "-m", "validation", "--out_dir", str(tmp_path),
                           "--device", "cpu"]))
    printed = float(re.search(r"^Accuracy: (\S+)$", capsys.readouterr().out, re.M).group(1))

    model = load_model(DEFAULT_CHECKPOINT)
    record = json.loads(Path(SHIPPED_RECORD).read_text())
    torch.testing.assert_close(model.class_log_prior, torch.tensor(record["class_log_prior"]))
    val = load_dataset("cpen455", data, "validation")
    ll = class_loop(model, val.images)                                   # (32, 4)
    posterior = ll + model.class_log_prior.double()
    clear_margins(posterior)
    accuracy = (posterior.argmax(dim=1) == val.labels).double().mean().item()
    assert printed == pytest.approx(accuracy, abs=1e-12)
    assert accuracy >= 0.6                                              # chance: 0.25
    bpd = -ll.gather(1, val.labels[:, None]).mean().item() / (val.images[0].numel() * math.log(2))
    assert abs(bpd - SHIPPED_BPD) < 0.15


# ----------------------------------------------------------------------------------- errors

def test_missing_checkpoint_is_a_one_line_error(tmp_path, evaluate):
    missing = tmp_path / "nowhere.pth"
    proc = evaluate(missing, tmp_path)
    assert proc.returncode != 0
    assert_one_line_error(proc.stderr, str(missing))


def test_tensor_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    assert_one_line_error(evaluate_in_process(path, tmp_path), str(path), "state_dict")


def test_state_dict_without_config_is_a_clear_error(checkpoint, tmp_path):
    state = torch.load(checkpoint)
    del state["_extra_state"]
    path = tmp_path / "no_config.pth"
    torch.save(state, path)
    assert_one_line_error(evaluate_in_process(path, tmp_path), "_extra_state")


def test_course_loading_names_both_architectures(checkpoint):
    """The course builds the model by hand, then load_state_dict(torch.load(path))."""
    course = PixelCNN(nr_resnet=1, nr_filters=40, input_channels=3, nr_logistic_mix=5)
    with pytest.raises((ValueError, RuntimeError)) as err:
        course.load_state_dict(torch.load(checkpoint))
    message = str(err.value)
    assert "nr_filters=4," in message and "nr_logistic_mix=2," in message
    assert "nr_filters=40," in message and "nr_logistic_mix=5," in message


def _lfs_pointer(path, _):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


def _truncated(path, checkpoint):
    path.write_bytes(checkpoint.read_bytes()[:20_000])


def _missing_tensor(path, checkpoint):
    state = torch.load(checkpoint)
    del state["embedding.weight"]
    torch.save(state, path)


@pytest.mark.parametrize("make", [
    pytest.param(_lfs_pointer, id="git-lfs-pointer"),
    pytest.param(_truncated, id="truncated-download"),
    pytest.param(_missing_tensor, id="state-dict-missing-a-tensor"),
])
def test_unreadable_checkpoint_is_a_clear_error(make, checkpoint, tmp_path):
    """Files that are not a loadable checkpoint give `error: <path> ...`, not a traceback."""
    path = tmp_path / "bad.pth"
    make(path, checkpoint)
    assert_one_line_error(evaluate_in_process(path, tmp_path), str(path))
