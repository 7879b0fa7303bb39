"""The class prior log pi(c) of the Bayes classifier argmax_c log p(x | c) + log pi(c):
`utils.fit_class_log_prior` against a brute-force search and its optimality condition, the model's
`class_log_prior` buffer through saving and loading (old checkpoints without it included), the
predictions of `bayes_predictions` and the course's `get_label` against an independent loop, and
the prior's way through classification_evaluation.py (`--prior`) and pcnn_train.py (`--fit_prior`).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import classification_evaluation as ce
import training
from dataset import load_dataset
from model import PixelCNN, load_model
from utils import bayes_predictions, choose_class_log_prior, fit_class_log_prior

NUM_CLASSES = 4
UNIFORM = -math.log(NUM_CLASSES)


def planted_scores(n=2000, offsets=(0.0, -30.0, 10.0, 25.0), seed=0):
    """log p(x | c) of a 4-class problem whose classifier is right 90% of the time, then shifted
    by a constant per class: (n, 4) scores, (n,) labels, the offsets."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    scores = torch.randn(n, NUM_CLASSES, generator=g) * 20
    scores[torch.arange(n), labels] += 40
    scores = scores - 3000 + torch.randn(n, 1, generator=g) * 100    # per-image totals differ
    return scores + torch.tensor(offsets), labels, torch.tensor(offsets)


# ------------------------------------------------------------------------ fit_class_log_prior

def test_fit_is_the_brute_force_optimum_for_two_classes():
    """With two classes the objective depends on one number, b1 - b0: a fine grid finds it."""
    scores, labels, _ = planted_scores()
    scores, keep = scores[:, :2], labels < 2
    scores, labels = scores[keep], labels[keep]
    prior = fit_class_log_prior(scores, labels)
    grid = torch.linspace(-100, 100, 20001, dtype=torch.float64)              # 0.01 nats apart
    shift = torch.stack([torch.zeros_like(grid), grid], dim=1)                # (G, 2)
    ll = scores.double()[None] + shift[:, None]                               # (G, n, 2)
    cost = F.cross_entropy(ll.reshape(-1, 2), labels.repeat(len(grid)), reduction="none")
    best = grid[cost.view(len(grid), -1).sum(dim=1).argmin()]
    assert abs((prior[1] - prior[0]).item() - best.item()) < 0.02


def test_fit_matches_the_label_counts_and_is_a_distribution():
    """At the optimum of a convex objective in the biases, the posterior's expected count of each
    class equals its count among the labels; and pi sums to one."""
    scores, labels, _ = planted_scores()
    prior = fit_class_log_prior(scores, labels)
    assert prior.shape == (NUM_CLASSES,) and prior.dtype == torch.float32
    assert abs(torch.logsumexp(prior.double(), 0).item()) < 1e-5
    expected = torch.softmax(scores.double() + prior.double(), dim=1).sum(dim=0)
    counts = torch.bincount(labels, minlength=NUM_CLASSES).double()
    torch.testing.assert_close(expected, counts, rtol=0, atol=0.05)


def test_fit_undoes_planted_offsets():
    """Scores shifted by a constant per class: the fitted prior takes the shift back (up to the
    noise of 2000 images) and wins back the accuracy the shift cost."""
    scores, labels, offsets = planted_scores()
    prior = fit_class_log_prior(scores, labels)
    recovered = prior - prior.mean()
    torch.testing.assert_close(recovered, -(offsets - offsets.mean()), rtol=0, atol=3.0)
    clean = (scores - offsets).argmax(1).eq(labels).float().mean()
    shifted = scores.argmax(1).eq(labels).float().mean()
    fitted = (scores + prior).argmax(1).eq(labels).float().mean()
    assert shifted < clean - 0.05 and abs(fitted - clean) < 0.01


def test_fit_ignores_what_every_class_shares():
    """A constant per image changes no posterior, so it changes no fitted prior; a prior that is
    already right is left alone."""
    scores, labels, offsets = planted_scores()
    prior = fit_class_log_prior(scores, labels)
    moved = fit_class_log_prior(scores + torch.randn(len(scores), 1) * 1e3, labels)
    torch.testing.assert_close(moved, prior, rtol=0, atol=1e-3)
    again = fit_class_log_prior(scores + prior, labels)
    torch.testing.assert_close(again, torch.full_like(again, UNIFORM), rtol=0, atol=1e-3)


@pytest.mark.parametrize("ll, labels, needle", [
    (torch.zeros(5, 4), torch.zeros(4, dtype=torch.int64), "labels"),
    (torch.zeros(5), torch.zeros(5, dtype=torch.int64), "ll"),
    (torch.tensor([[0.0, math.nan]]), torch.zeros(1, dtype=torch.int64), "non-finite"),
])
def test_fit_rejects_bad_input(ll, labels, needle):
    with pytest.raises(ValueError, match=needle):
        fit_class_log_prior(ll, labels)


# ---------------------------------------------------------------------- the model's buffer

def test_prior_is_uniform_by_default_and_old_checkpoints_load(tmp_path, tiny_model):
    """A checkpoint saved before the buffer existed loads with the uniform prior, through
    load_model and through the course's load_state_dict; a fitted prior survives both."""
    model = tiny_model()
    assert torch.equal(model.class_log_prior, torch.full((NUM_CLASSES,), UNIFORM))
    old = {k: v for k, v in model.state_dict().items() if k != "class_log_prior"}
    torch.save(old, tmp_path / "old.pth")
    assert torch.equal(load_model(tmp_path / "old.pth").class_log_prior, model.class_log_prior)
    course = PixelCNN(**model.config)
    course.class_log_prior.fill_(0.0)
    course.load_state_dict(torch.load(tmp_path / "old.pth"))
    assert torch.equal(course.class_log_prior, model.class_log_prior)

    fitted = torch.log_softmax(torch.tensor([3.0, -40.0, 0.5, 12.0]), 0)
    model.class_log_prior.copy_(fitted)
    torch.save(model.state_dict(), tmp_path / "new.pth")
    assert torch.equal(load_model(tmp_path / "new.pth").class_log_prior, fitted)
    course.load_state_dict(torch.load(tmp_path / "new.pth"))
    assert torch.equal(course.class_log_prior, fitted)


def test_predictions_and_get_label_add_the_prior(tiny_model, tiny_data, class_loop,
                                                 clear_margins):
    """bayes_predictions and the course's get_label against a loop over classes plus the prior,
    with a prior strong enough to change some predictions."""
    model = tiny_model(nr_filters=4)
    x = load_dataset("cpen455", tiny_data, "validation").images
    ll = class_loop(model, x)                                                 # (16, 4)
    clear_margins(ll)
    gaps = (ll.max(dim=1, keepdim=True).values - ll).median().item()
    prior = torch.log_softmax(torch.tensor([0.0, 1.37, -0.81, 0.59]) * gaps, 0)
    model.class_log_prior.copy_(prior)
    expected = (ll + prior.double()).argmax(dim=1)
    clear_margins(ll + prior.double())
    assert not torch.equal(expected, ll.argmax(dim=1))        # the prior changes predictions
    assert torch.equal(bayes_predictions(model, ll.float()), expected)
    assert torch.equal(ce.get_label(model, x, "cpu"), expected)


# --------------------------------------------------------------- classification_evaluation.py

def run_evaluation(monkeypatch, data, checkpoint, out_dir, *flags):
    """classification_evaluation.main in this process on the folder `data`; returns the model it
    classified with."""

    seen = {}
    real_predict = ce.bayes_predictions

    def predict(model, ll):
        seen["model"] = model
        return real_predict(model, ll)

    monkeypatch.setattr(ce, "bayes_predictions", predict)
    args = ce.parse_args(["--checkpoint", str(checkpoint), "-i", str(data), "--out_dir",
                          str(out_dir), "--device", "cpu", *flags])
    ce.main(args)
    return seen["model"]


def test_prior_fit_uniform_and_model(monkeypatch, tiny_data, tmp_path, capsys, tiny_model,
                                     class_loop):
    """--prior fit writes the prior fitted on the training split's scores; --prior model then
    classifies with it, --prior uniform without it."""
    torch.save(tiny_model(nr_filters=4).state_dict(), tmp_path / "m.pth")
    fitted_path = tmp_path / "sub" / "fitted.pth"
    run_evaluation(monkeypatch, tiny_data, tmp_path / "m.pth", tmp_path,
                   "--prior", "fit", "--save_checkpoint", str(fitted_path))
    train = load_dataset("cpen455", tiny_data, "train")
    expected = fit_class_log_prior(class_loop(load_model(tmp_path / "m.pth"), train.images),
                                   train.labels)
    saved = load_model(fitted_path).class_log_prior
    torch.testing.assert_close(saved, expected, rtol=1e-4, atol=1e-2)
    assert f"class prior fitted on {len(train)} training images" in capsys.readouterr().out

    model = run_evaluation(monkeypatch, tiny_data, fitted_path, tmp_path)
    assert torch.equal(model.class_log_prior, saved)
    model = run_evaluation(monkeypatch, tiny_data, fitted_path, tmp_path, "--prior", "uniform")
    assert torch.equal(model.class_log_prior, torch.full((NUM_CLASSES,), UNIFORM))


@pytest.mark.parametrize("flags", [["--prior", "fit"], ["--save_checkpoint", "x.pth"]])
def test_prior_fit_and_save_checkpoint_go_together(flags, capsys):
    with pytest.raises(SystemExit):
        ce.parse_args(flags)
    assert "--prior fit and --save_checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------- pcnn_train.py

def test_training_fits_the_prior_of_the_kept_model(tmp_path, monkeypatch, train, small_data,
                                                   class_loop):
    """After training, the kept checkpoint holds the prior chosen (fitted where cross-validation
    says it pays, else uniform) on the first PRIOR_FIT_IMAGES of a fixed sample of the training
    images, and class_prior.json records it, why, and the validation accuracy before and after."""
    monkeypatch.setattr(training, "PRIOR_FIT_IMAGES", 40)
    train(tmp_path, "--max_steps", "6", "--fit_prior", "true", data=small_data)
    record = json.loads((tmp_path / "class_prior.json").read_text())
    kept = load_model(tmp_path / "conditional_pixelcnn.pth")
    torch.testing.assert_close(kept.class_log_prior, torch.tensor(record["class_log_prior"]))

    images = load_dataset("cpen455", small_data, "train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:40]
    uniform = PixelCNN.from_state_dict({**kept.state_dict(), "class_log_prior":
                                        torch.full((NUM_CLASSES,), UNIFORM)}).eval()
    ll = class_loop(uniform, images.images[pick])
    expected, choice = choose_class_log_prior(ll, images.labels[pick])
    torch.testing.assert_close(kept.class_log_prior, expected.float(), rtol=0, atol=1e-2)
    assert (record["prior"], record["reason"]) == (choice["prior"], choice["reason"])
    assert record["train_images"] == 40
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert record["val_acc_before_fit"] == max(r["val_acc"] for r in logged)
    val = load_dataset("cpen455", small_data, "validation")
    val_ll = class_loop(kept, val.images)
    accuracy = ((val_ll + kept.class_log_prior.double()).argmax(1) == val.labels).double().mean()
    assert abs(record["val_acc"] - accuracy.item()) < 1.5 / len(val)
