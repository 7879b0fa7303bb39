"""Train the conditional PixelCNN++ on CPEN455 (or CIFAR-10 / MNIST), on a GPU box or a laptop.

    python pcnn_train.py                                    # the CPU preset: 2-core laptop, 30 min
    python pcnn_train.py --preset gpu                       # one CUDA GPU: bf16, CUDA graph
    python pcnn_train.py --resume                           # continue exactly where it stopped
    torchrun --nproc_per_node=8 pcnn_train.py --preset gpu  # 8 GPUs, DistributedDataParallel

Every --eval_interval epochs and at the end it logs train and validation bits/dim, the Bayes
classifier's validation accuracy and images/s to `<run_dir>/log.jsonl` (every step to
`steps.csv`), writes the --keep checkpoint (EMA weights with --ema) to
`<save_dir>/conditional_pixelcnn.pth` and `<run_dir>/resume.pt` (every --checkpoint_minutes and
at the end) for an exact --resume; at the end it plots `curves.png` and (--fit_prior)
chooses the kept model's class prior log pi(c) (`class_prior.json`).

A step whose loss is not finite or spikes far above the recent steps' (--spike_sigmas) is
skipped, counted in steps.csv and log.jsonl; --rollback_after skipped steps in a row take the run
back to its last good state at half the learning rate, and it says so.

Under torchrun each process (one per GPU with NCCL, or on the CPU with gloo) trains on its own
slice of every global batch of --batch_size images and DDP averages the gradients, so steps.csv
matches a one-process run up to float rounding when --dropout is 0 (each process draws its own
dropout masks). Validation is split over the processes; rank 0 alone prints and writes files.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cli import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, \
    PROBABILITY_BELOW_1, Number, check_output_dirs, errors_in_one_line, str2bool
from dataset import DatasetError, check_splits
from model import DEFAULT_CHECKPOINT, FUSION_MODES
from training import AFTER_FIT_SECONDS, PRESETS, ROLLBACK_LR_FACTOR, STEPS_CSV_HEADER, Clock, \
    Progress, Snapshots, StopSignals, atomic_save, checkpoint_due, evaluate, fit_prior, kept_acc, \
    learning_rate, load_resume, next_batch, plot_curves, report_prior_fit, save_resume, \
    save_sample_grid, setup, stop_reason_after
from utils import bits_per_dim, line_buffered_stdout, progress_bar


def record_steps(run, step_fn, snapshots, progress, queued, bar):
    """Read back the steps queued since the last call, (step, epoch, lr) each: write their rows of
    steps.csv, add them to the next log.jsonl record, and roll back after --rollback_after skipped
    steps in a row. Every process reads the same rows, so all of them roll back together."""
    args = run.args
    rows = step_fn.readback()                                     # one read of the device
    lines = []
    for (step, epoch, lr), (mean_nll, loss, sum_nll, skipped, in_a_row) in zip(queued, rows):
        if skipped:
            progress.skipped_steps += 1
        else:
            progress.trained_nll += sum_nll
            progress.scored_images += args.batch_size
        progress.trained_images += args.batch_size
        lines.append(f"{step},{epoch},{bits_per_dim(mean_nll, run.num_dims):.6f},{loss:.8f},"
                     f"{lr:.6e},{int(skipped)}")
    if run.master:
        steps_csv = run.run_dir / "steps.csv"
        with open(steps_csv, "a") as f:
            if f.tell() == 0:
                f.write(STEPS_CSV_HEADER + "\n")
            f.write("".join(line + "\n" for line in lines))
    bar.set_postfix(bpd=f"{bits_per_dim(rows[-1][0], run.num_dims):.3f}", lr=f"{queued[-1][2]:.2e}",
                    skipped=progress.skipped_steps)
    in_a_row = int(rows[-1][4])
    if args.rollback_after and in_a_row >= args.rollback_after:
        back_to = snapshots.restore()
        progress.rollbacks += 1
        progress.lr_scale *= ROLLBACK_LR_FACTOR
        if run.master:
            print(f"step {progress.step}: {in_a_row} steps skipped in a row; weights, optimizer "
                  f"and average back to step {back_to}, learning rate now x{progress.lr_scale:g}")
    else:
        snapshots.observe(progress.step, any(r[3] for r in rows))


def train_epoch(run, step_fn, snapshots, progress, clock, signals):
    """Train from progress.batch_index to the end of the epoch, or until a stop condition (a
    signal among them), writing resume.pt every --checkpoint_minutes. Returns the stop reason,
    None when the epoch ran out."""
    if progress.perm is None:
        progress.perm = torch.randperm(run.train.images.shape[0], generator=run.data_gen)
    span_start = time.time()
    stop_reason, queued = None, []
    with progress_bar(range(progress.batch_index, run.batches_per_epoch),
                      f"epoch {progress.epoch + 1}", run.master) as bar:
        for i in bar:
            x, y = next_batch(run, progress.perm, i)
            lr = learning_rate(run, progress)
            step_fn(x, y, lr, run.ema.weight(progress.step) if run.ema is not None else 0.0)
            progress.step, progress.batch_index = progress.step + 1, i + 1
            queued.append((progress.step, progress.epoch + 1, lr))
            stop_reason = stop_reason_after(run, progress, clock, read_clock=False)
            if len(queued) < step_fn.readback_steps and not stop_reason and \
                    i + 1 < run.batches_per_epoch:
                continue
            # At a read-back, where the device is read anyway: what every process must agree on
            # (under DDP the clock and the signals are rank 0's, broadcast).
            stop_reason = (stop_reason or stop_reason_after(run, progress, clock)
                           or signals.reason(run))
            record_steps(run, step_fn, snapshots, progress, queued, bar)
            queued = []
            clock.plan(progress)
            progress.trained_seconds += time.time() - span_start
            if stop_reason:
                break
            if checkpoint_due(run, clock):
                save_resume(run, step_fn, progress, clock)
            span_start = time.time()
    return stop_reason


def log_validation(run, step_fn, progress, clock, model, finished_epoch):
    """Validate `model`, append a record of it and of what the steps since the last record
    trained to log.jsonl, and write it as the checkpoint when --keep says so. Returns its
    validation log p(x | c) (N, classes)."""
    args = run.args
    metrics, ll = evaluate(model, run.val, args, run.device, run.autocast, run.rank,
                           run.world_size)
    epoch = (progress.epoch if finished_epoch
             else progress.epoch + progress.batch_index / run.batches_per_epoch)
    images, seconds = progress.trained_images, progress.trained_seconds
    new_best = metrics["val_acc"] > progress.best_acc
    progress.best_acc = max(progress.best_acc, metrics["val_acc"])
    keep = args.keep == "last" or new_best
    record = dict(epoch=epoch, step=progress.step,
                  train_bpd=bits_per_dim(progress.trained_nll / max(progress.scored_images, 1),
                                         run.num_dims),
                  **metrics, lr=step_fn.last_lr, train_seconds=seconds,
                  images_per_s=images / max(seconds, 1e-9),
                  elapsed_min=clock.elapsed() / 60, skipped_steps=progress.skipped_steps,
                  rollbacks=progress.rollbacks, kept=keep)
    progress.log.append(record)
    progress.trained_nll, progress.trained_seconds = 0.0, 0.0
    progress.trained_images, progress.scored_images = 0, 0
    if run.master:   # the other processes hold the same numbers and weights
        print(f"epoch {epoch:.2f} step {progress.step}: train {record['train_bpd']:.4f} bpd, "
              f"val {metrics['val_bpd']:.4f} bpd, val acc {100 * metrics['val_acc']:.2f}%, "
              f"{seconds:.1f}s, {record['images_per_s']:.1f} img/s"
              + (f", {progress.skipped_steps} steps skipped" if progress.skipped_steps else ""))
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.wandb is not None:
            run.wandb.log(record, step=progress.step)
        if keep:
            atomic_save(model.state_dict(), run.kept_path)
            if args.keep == "best":
                print(f"  new best validation accuracy -> {run.kept_path}")
    return ll


def end_epoch(run, step_fn, progress, clock, final):
    """After an epoch, or the part of one a stop left (final: the run ends there): every
    --eval_interval epochs and at the end, validate and log (log_validation; the EMA weights when
    EMA is on: they are what gets saved); save numbered checkpoints and samples on schedule; write
    resume.pt at the end, when --checkpoint_minutes are due, or every epoch when it is 0. Returns
    the validation log p(x | c) when it validated, else None."""
    args = run.args
    finished_epoch = progress.batch_index == run.batches_per_epoch
    if finished_epoch:
        progress.epoch, progress.batch_index, progress.perm = progress.epoch + 1, 0, None

    def due(interval):
        return finished_epoch and interval > 0 and progress.epoch % interval == 0

    validate = final or progress.epoch >= args.max_epochs or due(args.eval_interval)
    val_ll = None
    save, sample = run.master and due(args.save_interval), run.master and due(args.sampling_interval)
    if validate or save or sample:
        model, ema = run.model, run.ema
        live = copy.deepcopy(model.state_dict()) if ema is not None else None
        if ema is not None:
            model.load_state_dict(ema.state_dict_of(model))
        if validate:
            val_ll = log_validation(run, step_fn, progress, clock, model, finished_epoch)
        if save:
            atomic_save(model.state_dict(), run.kept_path.parent /
                        f"pcnn_{args.dataset}_epoch_{progress.epoch}.pth")
        if sample:
            n = max(1, args.sample_batch_size // run.train.num_classes)
            save_sample_grid(model, run.train.num_classes, n, tuple(run.train.images.shape[1:]),
                             Path(args.sample_dir) / f"{args.tag}_epoch_{progress.epoch}.png",
                             run.device, run.train.class_names)
        if live is not None:
            model.load_state_dict(live)
    if final or not args.checkpoint_minutes or checkpoint_due(run, clock):
        save_resume(run, step_fn, progress, clock)
    return val_ll


def main(args):
    session_start = time.time()   # loading the data counts too: the user waits for it
    run, step_fn = setup(args)
    progress = load_resume(run, step_fn) if args.resume else Progress()
    snapshots = Snapshots(step_fn)
    if progress.step:   # the resumed state: what a rollback returns to until a later copy is good
        snapshots.observe(progress.step, skipped=False)
    # The run's clock: --max_minutes and elapsed_min count the earlier sessions' time too.
    clock = Clock(run, session_start - progress.elapsed_s)
    if run.master:
        print(f"training PixelCNN({run.model.config}) on {run.device}"
              f"{f' x {run.world_size} processes' if run.ddp else ''}"
              f"{', CUDA graph' if step_fn.cuda_graph else ''}, "
              f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters")
        if clock.reserve:
            print(f"--max_minutes {args.max_minutes}: training until minute "
                  f"{(clock.train_end - clock.start_time) / 60:.1f}, then up to "
                  f"{clock.reserve:.0f}s for the final validation"
                  f"{' and the class prior fit' if args.fit_prior else ''}")
    stop_reason = stop_reason_after(run, progress, clock)   # a resume may have no time left
    val_ll = None                   # of the last validation, for the prior fit
    with StopSignals() as signals:
        while progress.epoch < args.max_epochs and stop_reason is None:
            stop_reason = train_epoch(run, step_fn, snapshots, progress, clock, signals)
            if signals.stopped:     # the step under way has finished: keep it and leave at once
                save_resume(run, step_fn, progress, clock)
                break
            ll = end_epoch(run, step_fn, progress, clock, final=stop_reason is not None)
            val_ll = ll if ll is not None else val_ll
    if signals.stopped:
        if run.master:
            print(f"{stop_reason} at step {progress.step}: {run.resume_path} holds the run, "
                  f"continue it with --resume", file=sys.stderr)
        if run.ddp:
            dist.barrier()
        sys.exit(128 + signals.signum)   # the shell's code for a process ended by that signal
    if run.master:
        print(f"done: {stop_reason or f'{args.max_epochs} epochs'}; {args.keep} checkpoint kept, "
              f"validation accuracy {100 * kept_acc(progress):.2f}% -> {run.kept_path}"
              + (f"; {progress.skipped_steps} steps skipped, {progress.rollbacks} rollbacks"
                 if progress.skipped_steps else ""))
        if progress.log:
            plot_curves(progress.log, run.run_dir / "curves.png")
            print(f"training curves -> {run.run_dir / 'curves.png'}")
        if args.fit_prior and run.kept_path.is_file():
            print("fitting the class prior log pi(c) on the training images")
            kept_ll = val_ll if val_ll is not None and progress.log[-1]["kept"] else None
            report_prior_fit(run, fit_prior(run, progress, kept_ll,
                                            deadline=clock.end - AFTER_FIT_SECONDS))
        if args.max_minutes:
            print(f"finished {clock.elapsed() / 60:.2f} min into the run "
                  f"(--max_minutes {args.max_minutes})")
    if run.wandb is not None:
        run.wandb.finish()
    if run.ddp:   # leave together: no process closes its connections while rank 0 still works
        dist.barrier()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="tuned defaults for a CPU laptop or a CUDA GPU (training.PRESETS); flags "
                        "given still win")
    # data and outputs
    p.add_argument("-d", "--dataset", choices=("cpen455", "cifar10", "mnist"), default="cpen455",
                   help="dataset; CPEN455 is downloaded into --data_dir when missing")
    p.add_argument("-i", "--data_dir", default="data", help="folder holding the dataset")
    p.add_argument("-o", "--save_dir", default=os.path.dirname(DEFAULT_CHECKPOINT),
                   help="where the best model is written")
    p.add_argument("-sd", "--sample_dir", default="samples/training",
                   help="where sample grids are written (a subfolder: FID reads samples/ itself)")
    p.add_argument("--run_dir", default="runs/default",
                   help="log.jsonl, steps.csv, curves.png and resume.pt of this run")
    p.add_argument("-t", "--tag", default="default", help="run name for sample files and wandb")
    # model
    p.add_argument("-q", "--nr_resnet", type=POSITIVE_INT, help="gated blocks per stage")
    p.add_argument("-n", "--nr_filters", type=POSITIVE_INT, help="channels of each stream")
    p.add_argument("-m", "--nr_logistic_mix", type=POSITIVE_INT, help="logistic mixture components")
    p.add_argument("--fusion", choices=sorted(FUSION_MODES),
                   help="where the class embedding enters the network")
    p.add_argument("--dropout", type=PROBABILITY_BELOW_1, help="dropout in the gated blocks")
    # optimisation
    p.add_argument("-b", "--batch_size", type=POSITIVE_INT,
                   help="images per optimizer step, over all processes under torchrun")
    p.add_argument("-l", "--lr", type=POSITIVE, help="Adam learning rate")
    p.add_argument("-e", "--lr_decay", type=Number(float, above=0, high=1),
                   help="learning rate multiplied by this after every optimizer step (not epoch)")
    p.add_argument("--warmup_steps", type=COUNT,
                   help="linear learning-rate warm-up over this many optimizer steps")
    p.add_argument("--lr_cooldown", type=FRACTION,
                   help="fraction of the run (of --max_minutes, --max_steps or --max_epochs, "
                        "whichever ends it first) over whose end the learning rate falls "
                        "linearly to zero (0: off)")
    p.add_argument("--grad_clip", type=NON_NEGATIVE, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--ema", type=PROBABILITY_BELOW_1,
                   help="decay of the weights' exponential moving average (0: off)")
    p.add_argument("--fit_prior", type=str2bool, nargs="?", const=True, default=True,
                   help="after training, fit the kept model's class prior log pi(c) on the "
                        "training images (the Bayes classifier becomes argmax_c log p(x | c) + "
                        "log pi(c)) and write it into the checkpoint")
    p.add_argument("--flip", type=str2bool, nargs="?", const=True,
                   help="random horizontal flips of training images")
    p.add_argument("--block_init_scale", type=POSITIVE,
                   help="multiply the initial gain of every gated block's output convolution by "
                        "this, so that blocks start near the identity (1: PyTorch's default)")
    p.add_argument("--spike_sigmas", type=NON_NEGATIVE, default=6.0,
                   help="skip a step whose loss lies more than this many standard deviations "
                        "above the running mean of the accepted steps' (0: skip only non-finite "
                        "losses)")
    p.add_argument("--rollback_after", type=COUNT, default=16,
                   help="after this many skipped steps in a row, go back to the last good state "
                        "and halve the learning rate (0: never); seen at the next read-back of "
                        "the losses (every step on a CPU, every 32 on CUDA)")
    # length of the run
    p.add_argument("-x", "--max_epochs", type=POSITIVE_INT, help="epochs to train")
    p.add_argument("--max_steps", type=COUNT, default=0, help="stop after this many steps (0: off)")
    p.add_argument("--max_minutes", type=NON_NEGATIVE,
                   help="the whole run's time, counting the time before every --resume: training "
                        "stops early enough that the final validation and the prior fit end "
                        "within it too (0: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from <run_dir>/resume.pt, mid-epoch too")
    p.add_argument("--checkpoint_minutes", type=NON_NEGATIVE, default=5.0,
                   help="also write resume.pt every this many minutes of training, mid-epoch, so a "
                        "killed run loses at most that much (0: at epoch ends only)")
    # evaluation, sampling and checkpoints
    p.add_argument("--eval_batch_size", type=POSITIVE_INT, default=None,
                   help="validation images per batch (times the number of classes per pass); "
                        "default: 8 on a CPU, 32 elsewhere")
    p.add_argument("--eval_interval", type=COUNT,
                   help="validate, log and write the --keep checkpoint every this many epochs, "
                        "and when the run ends (0: at the end only); a record of log.jsonl "
                        "covers the epochs since the last")
    p.add_argument("-c", "--sampling_interval", type=COUNT,
                   help="write a sample grid every this many epochs (0: never)")
    p.add_argument("-sb", "--sample_batch_size", type=POSITIVE_INT, default=16,
                   help="images in each sample grid, split evenly over the classes")
    p.add_argument("--keep", choices=("best", "last"),
                   help="the checkpoint written to --save_dir: the one of best validation "
                        "accuracy (as training evaluates it, with the class prior trained so "
                        "far), or the last one (the validation images then choose nothing)")
    p.add_argument("-st", "--save_interval", type=COUNT, default=0,
                   help="also keep a checkpoint every this many epochs (0: only the one --keep "
                        "names)")
    # machine
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--amp", type=str2bool, nargs="?", const=True,
                   help="bf16 autocast (the loss stays in float32) on CUDA, and on a CPU that "
                        "has bfloat16 instructions (AVX512_BF16 or AMX); float32 elsewhere")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile the model")
    p.add_argument("--cuda_graph", type=str2bool, nargs="?", const=True,
                   help="capture the whole training step in a CUDA graph and replay it (one "
                        "process, CUDA, without --compile; elsewhere the eager step runs)")
    p.add_argument("-s", "--seed", type=COUNT, default=1, help="random seed")
    p.add_argument("-w", "--en_wandb", type=str2bool, nargs="?", const=True, default=False,
                   help="log to Weights & Biases (WANDB_MODE=offline works without network)")
    p.set_defaults(**PRESETS["cpu"])
    return p


def parse_args(argv=None):
    """Parse flags: the defaults are --preset's (the CPU preset's unless given), and flags given
    on the command line win. A number out of its range, an output folder that cannot be written
    or a data folder without a split is a one-line usage error (docs/errors.md)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset != "cpu":
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    # Paths too fail here, in a second: not after minutes of loading and training.
    check_output_dirs(parser, args, "run_dir", "save_dir", "sample_dir")
    try:
        check_splits(args.dataset, args.data_dir, ("train", "validation"), download=True)
    except DatasetError as err:
        parser.error(str(err))
    return args


if __name__ == "__main__":
    line_buffered_stdout()
    try:
        with errors_in_one_line():
            main(parse_args())
    finally:
        if dist.is_initialized():   # also after an error exit, which every process takes together
            dist.destroy_process_group()
