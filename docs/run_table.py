"""One table row per training run, read from its log: images/s over its training time, epochs,
the accuracy of the checkpoint it kept as training logged it (EMA weights, bf16 evaluation) and
its epoch, the validation bits/dim there and at the end, and the accuracy with the class prior
fitted after training where <name>_class_prior.json lies beside <name>_log.jsonl. With --out it
also plots each run's kept checkpoint, accuracy against bits/dim, into one PNG:

    python docs/run_table.py results/cpu_preset/*_log.jsonl
    python docs/run_table.py results/*/*_log.jsonl --out runs/all_runs.png
"""

import argparse
import json
from pathlib import Path


def read_log(log_path):
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]


def kept_checkpoint(log_path):
    """The record of the checkpoint a run kept: the last one marked `kept`; in logs written before
    records said so, the first with the best validation accuracy (pcnn_train.py kept a new best
    only when strictly better)."""
    records = read_log(log_path)
    if any("kept" in r for r in records):
        return [r for r in records if r.get("kept")][-1]
    best = max(r["val_acc"] for r in records)
    return next(r for r in records if r["val_acc"] == best)


def fitted_prior_accuracy(log_path):
    """The validation accuracy with the fitted class prior, from the <name>_class_prior.json beside
    <name>_log.jsonl (pcnn_train.py's class_prior.json), or None where there is none."""
    path = Path(str(log_path).removesuffix("_log.jsonl") + "_class_prior.json")
    return json.loads(path.read_text())["val_acc"] if path.is_file() else None


def table_row(log_path, name):
    """The run's row: | `name` | images/s | epochs | accuracy (epoch) | bits/dim kept | at the end |
    with the fitted prior |."""
    records, kept = read_log(log_path), kept_checkpoint(log_path)
    seconds = sum(r["train_seconds"] for r in records)
    images_per_s = sum(r["images_per_s"] * r["train_seconds"] for r in records) / seconds
    fitted = fitted_prior_accuracy(log_path)
    return (f"| `{name}` | {images_per_s:.1f} | {records[-1]['epoch']:.1f} | "
            f"{100 * kept['val_acc']:.2f}% ({kept['epoch']:.1f}) | {kept['val_bpd']:.3f} | "
            f"{records[-1]['val_bpd']:.3f} | {'-' if fitted is None else f'{100 * fitted:.2f}%'} |")


def plot(logs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    placed = []                                           # (bits/dim, accuracy) of each point
    for path in logs:
        record, fitted = kept_checkpoint(path), fitted_prior_accuracy(path)
        name = Path(path).name.removesuffix("_log.jsonl")
        point = (record["val_bpd"], 100 * (record["val_acc"] if fitted is None else fitted))
        ax.scatter(*point, color="C0", marker="o" if fitted is None else "s")
        # a label goes below its point when an earlier point sits close by at the same height or
        # above, where this label would run into that one
        crowded = any(abs(point[0] - b) < 0.05 and 0 <= a - point[1] < 1.0 for b, a in placed)
        ax.annotate(name, point, fontsize=8, xytext=(4, -10 if crowded else 3),
                    textcoords="offset points")
        placed.append(point)
    ax.set_xlabel("validation bits/dim of the kept checkpoint (lower is better)")
    ax.set_ylabel("validation accuracy (%): squares with the fitted class prior")
    ax.set_title("30-minute CPU runs")
    ax.grid(alpha=0.3)
    ax.margins(x=0.2, y=0.1)          # room for the labels
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(args):
    print("| run | images/s | epochs | accuracy (epoch) | bits/dim there | bits/dim at the end "
          "| with the fitted prior |")
    print("|---|---|---|---|---|---|---|")
    for path in args.logs:
        print(table_row(path, Path(path).name.removesuffix("_log.jsonl")))
    if args.out:
        plot(args.logs, args.out)
        print(f"{len(args.logs)} runs -> {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl files of pcnn_train.py runs")
    p.add_argument("--out", default=None, help="also plot the runs into this PNG")
    main(p.parse_args())
