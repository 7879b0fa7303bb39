"""Train candidate GPU recipes for a fixed number of minutes each and tabulate what each reached:
validation accuracy with the fitted and the uniform class prior, validation bits/dim, images/s,
epochs, skipped steps and the largest rise of the training bits/dim above its best so far.

    python gpu_sweep.py --minutes 4 --parallel                # every candidate at once, one GPU
    python gpu_sweep.py --only preset --minutes 8             # the GPU preset's record run
    python gpu_sweep.py --only small --minutes 1 --device cpu --data_dir ../shared/cpen455

Each candidate is `pcnn_train.py --preset gpu` plus the flags in CANDIDATES, run in its own
process (--parallel: all of them at once, sharing the GPU: their images/s then count for the
comparison of the recipes' accuracy within one command, not as each recipe's speed alone). Each
run's log.jsonl, steps.csv, curves.png and class_prior.json go to `<out>/<name>/` (its resume.pt
is deleted), its checkpoint to a temporary folder (the GPU preset's is 228 MB); the table goes to
`<out>/sweep.md` and `<out>/sweep.json`, and the first candidate's 100 samples (25 per class) to
`<out>/<name>_samples.png`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Candidate recipes: flags on top of `--preset gpu` (training.PRESETS["gpu"]). The GPU preset's
# model costs about 80 times the 40/1/5 model per image; with the step captured in a CUDA graph a
# smaller model sees many more epochs in the same minutes. The CPU runs (docs/experiments.md)
# show the 40/1/5 model still underfitting after 20 epochs with dropout 0.1, and the paper's
# model needing dropout 0.5 over hundreds of epochs.
CANDIDATES = {
    "preset": [],
    "mid": ["--nr_resnet", "3", "--nr_filters", "96", "--nr_logistic_mix", "10",
            "--batch_size", "32", "--lr", "1e-3", "--dropout", "0.3"],
    "small": ["--nr_resnet", "1", "--nr_filters", "40", "--nr_logistic_mix", "5",
              "--fusion", "gated_last", "--batch_size", "16", "--lr", "2e-3", "--dropout", "0.2"],
    "wide_shallow": ["--nr_resnet", "2", "--nr_filters", "160", "--nr_logistic_mix", "10",
                     "--batch_size", "64", "--lr", "7e-4", "--dropout", "0.5"],
}
REPO = Path(__file__).resolve().parent
SAMPLES_PER_CLASS = 25              # the course's 100 samples
STARTUP_SLACK_S = 120               # past --max_minutes: Python and torch start-up, a late end


def train_command(name, args, run_dir, save_dir):
    return [sys.executable, "pcnn_train.py", "--preset", "gpu", *CANDIDATES[name],
            "--max_minutes", str(args.minutes), "--data_dir", str(Path(args.data_dir).resolve()),
            "--device", args.device, "--run_dir", str(run_dir), "--save_dir", str(save_dir),
            "--sampling_interval", "0", "--checkpoint_minutes", "0", "--tag", name]


def largest_rise(train_bpd):
    """The most the training bits/dim of a record lies above the best of the records before it."""
    best, rise = float("inf"), 0.0
    for value in train_bpd:
        rise = max(rise, value - best)
        best = min(best, value)
    return rise


def summarise(name, run_dir, returncode, seconds):
    """One row of the table from the run's files; the numbers are None where a file is missing."""
    row = dict(name=name, flags=" ".join(CANDIDATES[name]) or "(the preset)",
               exit=returncode, wall_s=round(seconds))
    log = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if records:
        last = records[-1]
        images = sum(r["images_per_s"] * r["train_seconds"] for r in records)
        row |= dict(acc_uniform=last["val_acc"], val_bpd=last["val_bpd"], epochs=last["epoch"],
                    images_per_s=images / max(sum(r["train_seconds"] for r in records), 1e-9),
                    skipped=last.get("skipped_steps", 0), rollbacks=last.get("rollbacks", 0),
                    rise=largest_rise([r["train_bpd"] for r in records]))
    prior = run_dir / "class_prior.json"
    if prior.exists():
        fit = json.loads(prior.read_text())
        row |= dict(acc_fitted=fit["val_acc"], prior=fit.get("prior", "fitted"))
    return row


def table(rows):
    """The rows as a Markdown table."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    lines = ["| recipe | flags on `--preset gpu` | acc, kept prior | acc, uniform prior | "
             "val bits/dim | images/s | epochs | skipped | largest rise | exit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['flags']}` | {fmt(r.get('acc_fitted'), '.2%')} "
            f"| {fmt(r.get('acc_uniform'), '.2%')} | {fmt(r.get('val_bpd'), '.3f')} "
            f"| {fmt(r.get('images_per_s'), '.0f')} | {fmt(r.get('epochs'), '.1f')} "
            f"| {fmt(r.get('skipped'), 'd')} | {fmt(r.get('rise'), '.3f')} | {r['exit']} |")
    return "\n".join(lines) + "\n"


def main(args):
    names = args.only or list(CANDIDATES)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Path(tempfile.mkdtemp(prefix="gpu_sweep_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    limit = 60 * args.minutes + STARTUP_SLACK_S
    batches = [names] if args.parallel else [[n] for n in names]
    rows = []
    for batch in batches:
        start, procs = time.time(), {}
        for name in batch:
            run_dir = out / name
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            log = open(run_dir / "train.log", "w")
            procs[name] = (subprocess.Popen(train_command(name, args, run_dir, ckpts / name),
                                            stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=REPO), log)
            print(f"started {name}: {' '.join(CANDIDATES[name]) or '(the preset)'}", flush=True)
        for name, (proc, log) in procs.items():
            try:
                code = proc.wait(timeout=max(1, limit - (time.time() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "timeout"
            log.close()
            (out / name / "resume.pt").unlink(missing_ok=True)   # the preset's is 0.9 GB
            rows.append(summarise(name, out / name, code, time.time() - start))
            print(f"{name}: exit {code}, {rows[-1].get('acc_fitted', 'no')} accuracy", flush=True)
    first = ckpts / names[0] / "conditional_pixelcnn.pth"
    if args.samples and first.exists():
        gen = ckpts / "samples"
        proc = subprocess.run([sys.executable, "generation_evaluation.py", "--checkpoint",
                               str(first), "--gen_data_dir", str(gen), "--skip_fid",
                               "--n_per_class", str(SAMPLES_PER_CLASS), "--device", args.device],
                              env=env, capture_output=True, text=True, cwd=REPO)
        grid = gen / "grids" / "generated_grid.png"
        if proc.returncode == 0 and grid.exists():
            shutil.copy(grid, out / f"{names[0]}_samples.png")
            print(f"samples of {names[0]} -> {out / f'{names[0]}_samples.png'}")
        else:
            print(f"sampling {names[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "sweep.md").write_text(table(rows))
    print(table(rows))
    shutil.rmtree(ckpts, ignore_errors=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes of each recipe")
    p.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), default=None,
                   help="these candidates (default: all, in the order of CANDIDATES)")
    p.add_argument("--parallel", action="store_true",
                   help="run the candidates at once on the one GPU instead of one after another")
    p.add_argument("--samples", action=argparse.BooleanOptionalAction, default=True,
                   help="sample 25 images per class from the first candidate")
    p.add_argument("-i", "--data_dir", default="data", help="folder holding the dataset")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", default="results/gpu", help="folder of the logs and the table")
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 60:
        p.error(f"--minutes must be in (0, 60], got {args.minutes}")
    return args


if __name__ == "__main__":
    main(parse_args())
