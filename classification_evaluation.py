"""Validation accuracy of the Bayes classifier argmax_c log p(x | c) + log pi(c) of a trained
conditional PixelCNN++ (pi: the class prior the checkpoint holds), with the course's interface.

    python classification_evaluation.py                          # validation split, models/conditional_pixelcnn.pth
    python classification_evaluation.py --tta flip               # average with log p(mirror(x) | c)
    python classification_evaluation.py --prior uniform          # ignore the fitted class prior
    python classification_evaluation.py --prior fit --save_checkpoint M.pth   # fit it on train
    python classification_evaluation.py -m test                  # writes submission.csv and logits.npy
    python classification_evaluation.py -m test --fid VALUE      # ... with the row fid,VALUE last
    python classification_evaluation.py --explain 4              # also explain_validation.png

It first says which checkpoint it scores, its model configuration and the class prior it adds.
For a labelled split it prints `Accuracy: <float>` (the line the course grades), then per-class
accuracy, macro F1 and the confusion matrix, and saves the matrix as a PNG. For the unlabelled
test split it writes `submission.csv` in one of the course's two forms (SUBMISSION_FORMATS) and
`logits.npy` (N x classes log p(x | c)), both in test.csv's order. Files go to --out_dir
(runs/classification, which git ignores). `--explain K` draws, for K images (misclassified ones
first), how much more likely each pixel is under each class than under the average class.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from cli import POSITIVE_INT, check_output_dirs, errors_in_one_line, unwritable
from dataset import DatasetError, check_splits, load_dataset, rescaling_inv
from model import DEFAULT_CHECKPOINT, load_model
from training import atomic_save
from utils import (AMP_RECHECK_NATS, GPU_AMP_RECHECK_NATS, bayes_predictions, bf16_autocast,
                   class_log_likelihoods, class_pixel_log_likelihoods, dataset_log_likelihoods,
                   line_buffered_stdout, pick_device, set_fitted_class_prior)

# The two forms of submission.csv the course's terms took, by --submission_format.
SUBMISSION_FORMATS = {
    "id_label": "header `id,label`, rows `0000021.jpg,2`, and a last row `fid,<value>` when "
                "--fid is given",
    "test_csv": "no header, rows `test/0000021.jpg,2`: test.csv with the labels filled in",
}
EXPLAIN_MAP_PERCENTILE = 99.5   # the shared colour scale ends here, so a few extreme pixels do
                                # not wash out the rest of every map


@torch.no_grad()
def get_label(model, model_input, device):
    """The course's hook: predicted labels, int64 (B,), for images (B, C, H, W) in [-1, 1]."""
    ll = class_log_likelihoods(model, model_input.to(device), model.num_classes)   # (B, classes)
    return bayes_predictions(model, ll)


def classification_report(labels, predictions, num_classes):
    """Accuracy, per-class accuracy (recall), macro F1 and the confusion matrix (rows: truth)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    true_pos = confusion.diag().double()
    recall = true_pos / confusion.sum(1).clamp(min=1)
    precision = true_pos / confusion.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return dict(accuracy=(labels == predictions).double().mean().item(),
                per_class=recall.tolist(), macro_f1=f1.mean().item(), confusion=confusion)


def write_submission(path, image_paths, labels, form="id_label", fid=None):
    """Write submission.csv in the form `form` (a key of SUBMISSION_FORMATS). image_paths: the
    rows' paths as test.csv names them (`test/0000021.jpg`); labels: the predicted class of each,
    in the same order; fid: the FID value for the last row of the id_label form, or None."""
    if fid is not None and form != "id_label":
        raise ValueError(f"the {form} form has no fid row")
    if form == "id_label":
        rows = ["id,label"] + [f"{Path(p).name},{label}" for p, label in zip(image_paths, labels)]
        rows += [f"fid,{fid}"] if fid is not None else []
    elif form == "test_csv":
        rows = [f"{p},{label}" for p, label in zip(image_paths, labels)]
    else:
        raise ValueError(f"form must be one of {sorted(SUBMISSION_FORMATS)}, got {form!r}")
    Path(path).write_text("\n".join(rows) + "\n")


def save_confusion_png(confusion, class_names, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(confusion, cmap="Blues")
    n = len(class_names)
    ax.set_xticks(range(n), class_names, rotation=30)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def explanation_order(labels, predictions):
    """Indices of the images to explain: the misclassified ones first, then the rest, each group
    in file order. Unlabelled images (label -1) count as misclassified, so they keep file order."""
    wrong = labels != predictions
    return torch.cat([wrong.nonzero()[:, 0], (~wrong).nonzero()[:, 0]])


@torch.no_grad()
def explanation_maps(model, x):
    """Per-pixel evidence for each class: images (B, C, H, W) -> (pixel log-likelihoods, maps),
    both (B, classes, H, W) in nats.

    maps[b, c] = log p_c(x_ij | x_<ij) - the mean of it over classes: how much more likely each
    pixel is under class c than under the average class. A map's sum is log p(x | c) minus the
    mean over classes of log p(x | c'), so the predicted class has the largest sum.
    """
    pixel_ll = class_pixel_log_likelihoods(model, x, model.num_classes)    # (B, classes, H, W)
    return pixel_ll, pixel_ll - pixel_ll.mean(dim=1, keepdim=True)


def save_explanation_png(images, pixel_ll, maps, class_names, truths, predictions, path, title):
    """One row per image: the image, then its map for every class on one symmetric colour scale
    (red: the pixel favours the class, blue: it speaks against it). Titles give log p(x | c) and
    the map's sum; the predicted class is starred.

    images (K, C, H, W) in [-1, 1]; pixel_ll and maps (K, classes, H, W); truths and predictions
    (K,) ints, a truth of -1 meaning unlabelled.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k, n = maps.shape[:2]
    # a floor, so an unconditional model's all-zero maps still get a valid colour range
    limit = max(float(np.percentile(maps.abs().numpy(), EXPLAIN_MAP_PERCENTILE)), 1e-6)
    fig, axes = plt.subplots(k, n + 1, figsize=(1.9 * (n + 1) + 1.0, 2.3 * k + 0.5), squeeze=False)
    for row in range(k):
        truth = class_names[truths[row]] if truths[row] >= 0 else "unlabelled"
        axes[row, 0].imshow(rescaling_inv(images[row]).clamp(0, 1).permute(1, 2, 0).numpy(),
                            interpolation="nearest")
        axes[row, 0].set_title(f"true: {truth}\npredicted: {class_names[predictions[row]]}",
                               fontsize=8)
        for c in range(n):
            shown = axes[row, c + 1].imshow(maps[row, c].numpy(), cmap="RdBu_r", vmin=-limit,
                                            vmax=limit, interpolation="nearest")
            star = "*" if c == predictions[row] else ""
            axes[row, c + 1].set_title(
                f"{star}{class_names[c]}{star}\nlog p(x|c) = {pixel_ll[row, c].sum():.1f}\n"
                f"{maps[row, c].sum():+.1f} vs mean", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.add_axes((0.91, 0.15, 0.015, 0.7))
    fig.colorbar(shown, cax=bar, extend="both").set_label(
        "log p(pixel | class) - mean over classes (nats)", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def explain(model, data, predictions, k, split, path, device):
    """Explain k images of `data`, the split named `split`, misclassified ones first, into the PNG
    at `path`, and print one line per image."""
    chosen = explanation_order(data.labels, predictions)[:k]                    # (k,)
    x = data.images[chosen].to(device)
    pixel_ll, maps = (t.float().cpu() for t in explanation_maps(model, x))    # (k, classes, H, W)
    truths, chosen_predictions = data.labels[chosen].tolist(), predictions[chosen].tolist()
    title = (f"{split}: how much more likely each pixel is under a class than under the average "
             f"class (* = predicted)")
    save_explanation_png(data.images[chosen], pixel_ll, maps, data.class_names, truths,
                         chosen_predictions, path, title)
    names = data.class_names
    for index, truth, prediction, ll in zip(chosen.tolist(), truths, chosen_predictions,
                                            pixel_ll.sum(dim=(2, 3)).tolist()):
        ll_text = ", ".join(f"{names[c]} {v:.1f}" for c, v in enumerate(ll))
        print(f"explained {split} image {index}: true {names[truth] if truth >= 0 else 'unlabelled'}, "
              f"predicted {names[prediction]}; log p(x|c): {ll_text}")
    print(f"explanation maps of {len(truths)} images -> {path}")


def fit_prior_on_train(model, args, device, autocast):
    """Fit the model's class prior on the training split of --data_dir (utils.fit_class_log_prior)
    and write the model with it to --save_checkpoint."""
    try:
        train = load_dataset(args.dataset, args.data_dir, "train")
    except (FileNotFoundError, ValueError, DatasetError) as err:
        sys.exit(f"error: {err}")
    set_fitted_class_prior(model, train.images, train.labels, args.batch_size, device, autocast)
    Path(args.save_checkpoint).parent.mkdir(parents=True, exist_ok=True)
    atomic_save(model.state_dict(), args.save_checkpoint)     # it may be --checkpoint itself
    print(f"class prior fitted on {len(train)} training images: log pi = "
          f"[{', '.join(f'{v:.2f}' for v in model.class_log_prior.tolist())}] "
          f"-> {args.save_checkpoint}")


def describe_prior(model, args):
    """Which class prior the Bayes classifier adds, in words, with its values."""
    values = f"log pi = [{', '.join(f'{v:.2f}' for v in model.class_log_prior.tolist())}]"
    if args.prior == "fit":
        return f"fitted now on the training split, {values}"
    if args.prior == "uniform":
        return f"uniform (--prior uniform), {values}"
    uniform = torch.allclose(model.class_log_prior, model.uniform_log_prior())
    return f"the checkpoint's ({'uniform: none fitted' if uniform else 'fitted'}), {values}"


def main(args):
    # Mistakes in the flags fail here, before minutes of classification.
    if args.fid is not None and not math.isfinite(args.fid):
        sys.exit(f"error: --fid {args.fid} is not a finite number")
    if args.fid is not None and (args.mode != "test" or args.submission_format != "id_label"):
        sys.exit("error: --fid is the last row of the id_label submission: it needs -m test and "
                 "--submission_format id_label")
    device = pick_device(args.device)
    try:
        model = load_model(args.checkpoint, device)
        data = load_dataset(args.dataset, args.data_dir, args.mode)
    except (FileNotFoundError, ValueError, DatasetError) as err:
        sys.exit(f"error: {err}")
    if data.num_classes != model.num_classes:
        sys.exit(f"error: {args.checkpoint} knows {model.num_classes} classes, the "
                 f"{args.dataset} data has {data.num_classes}: pass the checkpoint of a model "
                 f"trained on it (--checkpoint), or the dataset the model was trained on "
                 f"(--dataset)")
    if args.amp and device.type not in ("cuda", "cpu"):
        sys.exit(f"error: --amp runs on cuda or cpu, not {device}")
    autocast = bf16_autocast(device, args.amp)
    if args.prior == "uniform":
        model.class_log_prior.copy_(model.uniform_log_prior())
    elif args.prior == "fit":
        fit_prior_on_train(model, args, device, autocast)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)     # before minutes of classification, not after
    print(f"classifying the {args.mode} split of {args.data_dir} ({len(data)} images) with "
          f"{args.checkpoint}: PixelCNN({model.config}); class prior: "
          f"{describe_prior(model, args)}")
    ll = dataset_log_likelihoods(model, data.images, model.num_classes, args.batch_size, device,
                                 tta=args.tta, progress=True, autocast=autocast,
                                 recheck=args.amp_recheck)                            # (N, classes)
    predictions = bayes_predictions(model, ll)
    explain_png = out_dir / f"explain_{args.mode}.png"

    if (data.labels < 0).all():   # unlabelled (the course's test split): write the submission
        if args.explain:
            explain(model, data, predictions, args.explain, args.mode, explain_png, device)
        np.save(out_dir / "logits.npy", ll.numpy())
        write_submission(out_dir / "submission.csv", data.paths, predictions.tolist(),
                         args.submission_format, args.fid)
        print(f"{len(predictions)} predictions -> {out_dir / 'submission.csv'} "
              f"({args.submission_format} form), log p(x|c) -> {out_dir / 'logits.npy'}")
        return
    if (data.labels < 0).any():
        sys.exit(f"error: the {args.mode} split mixes labelled and unlabelled rows")

    report = classification_report(data.labels, predictions, model.num_classes)
    print(f"Accuracy: {report['accuracy']}")
    names = data.class_names
    for name, acc in zip(names, report["per_class"]):
        print(f"  {name:>10}: {100 * acc:.2f}%")
    print(f"macro F1: {report['macro_f1']:.4f}")
    print("confusion matrix (rows: true, columns: predicted):")
    print(report["confusion"].numpy())
    png = out_dir / f"confusion_{args.mode}.png"
    save_confusion_png(report["confusion"].numpy(), names, png,
                       f"{args.mode}: {100 * report['accuracy']:.2f}% accuracy")
    print(f"confusion matrix -> {png}")
    if args.explain:
        explain(model, data, predictions, args.explain, args.mode, explain_png, device)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--data_dir", default="data", help="folder holding the dataset")
    p.add_argument("-b", "--batch_size", type=POSITIVE_INT, default=None,
                   help="images per batch (each makes one network pass per class); default: "
                        "8 on a CPU, 32 elsewhere")
    p.add_argument("-m", "--mode", choices=("validation", "train", "test"), default="validation",
                   help="split to classify; test is unlabelled and writes a submission")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="model to evaluate")
    p.add_argument("--dataset", choices=("cpen455", "cifar10", "mnist"), default="cpen455",
                   help="dataset the model was trained on")
    p.add_argument("--prior", choices=("model", "uniform", "fit"), default="model",
                   help="the class prior log pi(c) of argmax_c log p(x | c) + log pi(c): the one "
                        "the checkpoint holds (pcnn_train.py fits it after training), uniform, or "
                        "fit it now on the training split and write the model to --save_checkpoint")
    p.add_argument("--save_checkpoint", default=None,
                   help="where --prior fit writes the model with its fitted prior")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average the log-likelihoods of the image and its mirror image")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast: faster on a CPU with bf16 instructions, slower than the "
                        "default float32 on CUDA (an H200), and log-likelihoods rounded (bench.py "
                        "counts the predictions that change)")
    p.add_argument("--amp_recheck", type=float, default=None, metavar="NATS",
                   help="with --amp, score again in float32 the images whose two best classes "
                        f"lie less than NATS apart (0: never; None: {AMP_RECHECK_NATS:g} on a "
                        f"CPU, {GPU_AMP_RECHECK_NATS:g} elsewhere, utils.amp_recheck_nats)")
    p.add_argument("--submission_format", choices=sorted(SUBMISSION_FORMATS), default="id_label",
                   help="form of the test split's submission.csv: "
                        + "; ".join(f"{k}: {v}" for k, v in SUBMISSION_FORMATS.items()))
    p.add_argument("--fid", type=float, default=None,
                   help="FID value (as generation_evaluation.py prints it) for the last row of the "
                        "id_label submission; without it there is no fid row")
    p.add_argument("--explain", type=int, default=None, metavar="K",
                   help="also write explain_<mode>.png: for K images (misclassified ones first) "
                        "how much more likely each pixel is under each class than on average "
                        "(the maps score the image alone, without --tta)")
    p.add_argument("--out_dir", default="runs/classification",
                   help="where submission.csv, logits.npy and the confusion and explanation PNGs "
                        "go (runs/ is git-ignored)")
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    return p


def parse_args(argv=None):
    """The command line, checked: bad values stop with a one-line usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.explain is not None and args.explain < 1:
        parser.error(f"--explain K needs K >= 1 images, got {args.explain}")
    if (args.prior == "fit") != (args.save_checkpoint is not None):
        parser.error("--prior fit and --save_checkpoint PATH go together: the fitted prior is "
                     "written into the model at PATH")
    if args.amp_recheck is not None and not 0 <= args.amp_recheck < math.inf:
        parser.error(f"--amp_recheck needs a number of nats >= 0, got {args.amp_recheck}")
    # Paths too fail here, in a second, not after the whole split was scored.
    check_output_dirs(parser, args, "out_dir")
    if args.save_checkpoint is not None:
        reason = unwritable(Path(args.save_checkpoint).parent)
        if reason:
            parser.error(f"--save_checkpoint {args.save_checkpoint}: {reason}")
    try:
        check_splits(args.dataset, args.data_dir,
                     (args.mode, "train") if args.prior == "fit" else (args.mode,))
    except DatasetError as err:
        parser.error(str(err))
    return args


if __name__ == "__main__":
    line_buffered_stdout()
    with errors_in_one_line():
        main(parse_args())
