"""utils.choose_class_log_prior: a fitted class prior is kept only where cross-validation says it
classifies more images correctly than the uniform prior."""

import math

import torch

from utils import choose_class_log_prior, fit_class_log_prior


def labelled(n_per_class=40, classes=4, offset=None, noise=1.0, seed=0):
    """log p(x | c) of n_per_class images of each class: the true class 2 nats above the others,
    plus noise, plus offset[c] nats on every image's class c (a per-class bias)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    ll = noise * torch.randn(len(labels), classes, generator=g) - 100.0
    ll[torch.arange(len(labels)), labels] += 2.0
    if offset is not None:
        ll += torch.tensor(offset)
    return ll, labels


def test_a_per_class_bias_is_corrected_and_kept():
    ll, labels = labelled(offset=[6.0, 0.0, 0.0, 0.0])    # class 0 wins far too often
    prior, info = choose_class_log_prior(ll, labels)
    assert info["prior"] == "fitted" and info["correct_fitted"] > info["correct_uniform"]
    assert info["correct_uniform"] == int((ll.argmax(1) == labels).sum())
    torch.testing.assert_close(prior, fit_class_log_prior(ll, labels))
    assert prior[0] < prior[1:].min() - 3                  # it takes the bias back out
    assert info["reason"].startswith("fitted: ")


def test_uniform_is_kept_when_the_fit_cannot_do_better():
    """Every image right under the uniform prior: no fitted prior can do better, so uniform."""
    ll, labels = labelled(noise=0.1)
    prior, info = choose_class_log_prior(ll, labels)
    assert info["correct_uniform"] == len(labels)
    assert info["prior"] == "uniform" and "does not pay" in info["reason"]
    torch.testing.assert_close(prior, torch.full((4,), -math.log(4)))


def test_folds_cover_every_image_once():
    ll, labels = labelled(n_per_class=3, offset=[6.0, 0.0, 0.0, 0.0])
    _, info = choose_class_log_prior(ll, labels, folds=5)
    assert info["images"] == 12 and 0 <= info["correct_fitted"] <= 12
