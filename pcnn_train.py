"""Train the conditional PixelCNN++ on CPEN455 (or CIFAR-10 / MNIST), on a GPU box or a laptop.

    python pcnn_train.py --preset cpu                       # 2-core laptop, 30 minutes
    python pcnn_train.py --preset gpu                       # one CUDA GPU, bf16 autocast
    python pcnn_train.py --preset cpu --resume              # continue exactly where it stopped
    torchrun --nproc_per_node=8 pcnn_train.py --preset gpu  # 8 GPUs, DistributedDataParallel

Every --eval_interval epochs, and when the run ends, it prints train bits/dim, validation
bits/dim, the validation accuracy of the Bayes classifier argmax_c log p(x | c) + log pi(c) (pi
uniform unless --prior_lr trains it), wall time and images/s, and appends the same to
`<run_dir>/log.jsonl`. The best model by validation
accuracy (EMA weights when --ema is on) goes to `<save_dir>/conditional_pixelcnn.pth`;
`<run_dir>/resume.pt`, written at every epoch end and every --checkpoint_minutes of training,
holds everything --resume needs to continue exactly, mid-epoch too: a killed run loses at most
those minutes. At the end `<run_dir>/curves.png` plots the training curves, and (--fit_prior)
the kept model gets the class prior log pi(c) that fits its training images best, written into
the checkpoint and `<run_dir>/class_prior.json`.

Under torchrun each process (one per GPU with NCCL, or on the CPU with gloo) trains on its own
slice of every global batch of --batch_size images and DDP averages the gradients, so steps.csv
matches a one-process run up to float rounding when --dropout and --disc_weight are 0 (each process
draws its own dropout masks and takes the hybrid term on the first --disc_fraction of its slice,
on a band of --disc_rows rows it draws itself).
Validation is split over the processes; rank 0 alone prints and writes files.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dataset import DatasetError, TensorImageDataset, load_dataset, rescaling_inv
from model import CHECKPOINT_NAME, DEFAULT_CHECKPOINT, FUSION_MODES, PixelCNN, load_model
from utils import bayes_predictions, bf16_autocast, bf16_pays, bits_per_dim, \
    dataset_log_likelihoods, discretized_mix_logistic_loss, line_buffered_stdout, pick_device, \
    pixel_log_likelihoods, progress_bar, sample_fast, set_fitted_class_prior

# Presets set defaults; any flag given on the command line still wins.
PRESETS = {
    "cpu": dict(nr_resnet=1, nr_filters=40, nr_logistic_mix=5, fusion="gated_last", batch_size=8,
                lr=3e-3, warmup_steps=100, lr_decay=0.9998, lr_cooldown=0.5, ema=0.999,
                dropout=0.1, flip=True, amp=True, keep="last", eval_interval=4,
                max_minutes=30.0, max_epochs=1000, sampling_interval=0),
    "gpu": dict(nr_resnet=5, nr_filters=160, nr_logistic_mix=10, batch_size=64, lr=1e-3,
                warmup_steps=200, lr_decay=0.99995, ema=0.999, dropout=0.5, flip=True, amp=True,
                keep="last", max_minutes=25.0, max_epochs=1000, sampling_interval=10),
}
# --fit_prior scores at most this many training images (all of CPEN455's 4159; a fixed sample of
# CIFAR-10's 50000): one number per class is fitted, and every image costs a pass per class.
PRIOR_FIT_IMAGES = 5000


def str2bool(value):
    """argparse type for real booleans: `--en_wandb False` is off (the course's type=bool is not)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_lines(lines, path):
    """Write text lines to a temporary file, then rename, as atomic_save does."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


class EMA:
    """Exponential moving average of the model's floating-point state (weights and buffers).

    The decay warms up as min(decay, (1 + step) / (10 + step)), as TensorFlow's
    ExponentialMovingAverage does with num_updates: with a fixed 0.999 a 30-minute CPU run of
    ~2000 steps would still hold a seventh of its random initialisation. The warm-up reaches
    0.999 only at step 8990, so in shorter runs it alone sets the average, over roughly the last
    ninth of the steps (a longer window, the last third, measured worse: docs/experiments.md).
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if torch.is_tensor(v) and v.is_floating_point()}

    @torch.no_grad()
    def update(self, model, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.state:
                self.state[k].lerp_(v, 1 - decay)

    def state_dict_of(self, model):
        """The model's state_dict with the averaged tensors swapped in."""
        return {k: self.state.get(k, v) for k, v in model.state_dict().items()}


def make_optimizer(params, lr, device):
    """Adam, fused into one kernel per step where this torch has one for the device (CUDA; the CPU
    from torch 2.4): the update of the step-by-step loop over the tensors, within float rounding,
    at about a quarter of its time on the CPU preset's 180 small tensors (`bench.py --only
    training`)."""
    fused = device.type == "cuda" or (device.type == "cpu" and torch.__version__ >= "2.4")
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def lr_factor(step, warmup_steps, lr_decay, budget_used=0.0, cooldown=0.0):
    """The learning rate of optimizer step `step` (0-based), as a fraction of --lr: a linear
    warm-up over `warmup_steps` steps, times lr_decay ** step, times a cooldown that falls
    linearly to zero over the last `cooldown` fraction of the run's budget, of which
    `budget_used` (in [0, 1]) is spent (0: no cooldown). Ending at zero is what budgeted training
    gains from most (Li et al. 2020; Hägele et al. 2024)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cool = min(1.0, max(0.0, (1.0 - budget_used) / cooldown)) if cooldown > 0 else 1.0
    return warm * lr_decay ** step * cool


def training_pass(model, x, y, num_classes, m, label_only_model=None, rows=None):
    """The network outputs the training loss needs.

    Returns nll (b,): -log p(x | y) in nats of every image under its own label, and logits
    (m, num_classes): log p(x | c) of the first m images under every class, for the hybrid term
    (None when m is 0). The true-label column of the logits comes from the nll pass, so the
    hybrid term costs m * (num_classes - 1) extra image-label pairs, not m * num_classes, and
    less where the label enters late (PixelCNN.forward shares the layers before it).

    rows: (r0, r1), or None for the whole image: the logits then sum the log-likelihoods of
    image rows r0..r1 only, and where the label enters in the last stage the other labels' pairs
    run that stage on those rows (and a few above) only.

    label_only_model: the bare PixelCNN behind `model`. When given, the passes under the other
    labels see every parameter but the label's (PixelCNN.label_parameter_names) detached, so the
    cross-entropy pushes those likelihoods down through the label pathway alone; the pass under
    the true label trains everything. Otherwise one call computes every pair.
    """
    if m == 0:
        return discretized_mix_logistic_loss(x, model(x, y), reduction="none"), None
    others = (y[:m, None] + torch.arange(1, num_classes, device=y.device)) % num_classes  # (m, C-1)
    r0, r1 = rows if rows is not None else (0, x.shape[2] - 1)
    x_other = x[:m, :, r0:r1 + 1].repeat(num_classes - 1, 1, 1, 1)     # ((C-1)m, C, R, W)
    if label_only_model is None:
        out, out_other = model(x, y, others=others, rows=rows)
    else:
        out = model(x, y)
        keep = set(label_only_model.label_parameter_names())
        params = {name: p if name in keep else p.detach()
                  for name, p in label_only_model.named_parameters()}
        out_other = torch.func.functional_call(
            label_only_model, params, (x[:m].repeat(num_classes - 1, 1, 1, 1),
                                       others.t().reshape(-1)))[:, :, r0:r1 + 1]
    pixels = pixel_log_likelihoods(x, out)                                 # (b, H, W)
    nll = -pixels.sum(dim=(1, 2))                                          # (b,)
    ll_true = pixels[:m, r0:r1 + 1].sum(dim=(1, 2))                        # (m,)
    ll_other = pixel_log_likelihoods(x_other, out_other).sum(dim=(1, 2))   # ((C-1)m,)
    ll = torch.cat([ll_true[:, None], ll_other.view(num_classes - 1, m).t()], dim=1)  # (m, C)
    columns = torch.cat([y[:m, None], others], dim=1)                      # class of each column
    logits = torch.zeros_like(ll).scatter(1, columns, ll)                  # (m, C) in class order
    return nll, logits


def evaluate(model, data, args, device, autocast, rank, world_size):
    """Validation bits/dim (under the true label) and Bayes-classifier accuracy, in one pass.

    Each of the world_size processes scores a contiguous share of the images; every process gets
    the joined log-likelihoods, so all of them return the same numbers."""
    model.eval()
    share = data.images.tensor_split(world_size)[rank]
    ll = dataset_log_likelihoods(model, share, data.num_classes, args.eval_batch_size,
                                 device, autocast=autocast)                       # (n, classes)
    if world_size > 1:
        shares = [None] * world_size
        dist.all_gather_object(shares, ll)
        ll = torch.cat(shares)                                                    # (N, classes)
    labels = data.labels
    nll_true = -ll.gather(1, labels[:, None].clamp(min=0)).squeeze(1)
    model.train()
    return dict(val_bpd=bits_per_dim(nll_true.mean().item(), data.images[0].numel()),
                val_acc=(bayes_predictions(model, ll) == labels).float().mean().item())


def kept_acc(progress):
    """Validation accuracy, as training logged it, of the checkpoint kept: the last record marked
    `kept` (-1 before any)."""
    kept = [r["val_acc"] for r in progress.log if r.get("kept")]
    return kept[-1] if kept else -1.0


def fit_prior(run, progress):
    """Fit the kept model's class prior (utils.fit_class_log_prior) on up to PRIOR_FIT_IMAGES
    training images, unflipped, and write it into the checkpoint and <run_dir>/class_prior.json.
    Returns the json's dict. Rank 0 only: the other processes have finished."""
    args, start = run.args, time.time()
    model = load_model(run.best_path, run.device)
    n = min(PRIOR_FIT_IMAGES, run.train.images.shape[0])
    pick = torch.randperm(run.train.images.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    set_fitted_class_prior(model, run.train.images[pick], run.train.labels[pick],
                           args.eval_batch_size, run.device, run.autocast)
    val_acc = evaluate(model, run.val, args, run.device, run.autocast, 0, 1)["val_acc"]
    atomic_save(model.state_dict(), run.best_path)
    result = dict(class_log_prior=model.class_log_prior.tolist(), train_images=n,
                  val_acc_before_fit=kept_acc(progress), val_acc=val_acc,
                  seconds=time.time() - start)
    (run.run_dir / "class_prior.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def save_sample_grid(model, num_classes, n_per_class, obs, path, device, class_names):
    """Sample n_per_class images of every class and save them as one PNG, a row per class."""
    import torchvision.utils as vutils
    model.eval()
    labels = torch.arange(num_classes, device=device).repeat_interleave(n_per_class)
    gen = torch.Generator(device=device).manual_seed(0)
    images = sample_fast(model, labels, obs, generator=gen, progress=True)
    model.train()
    vutils.save_image(rescaling_inv(images), path, nrow=n_per_class, padding=1)
    print(f"samples ({', '.join(class_names)}, one row each) -> {path}")


def plot_curves(log, path):
    """Train/validation bits/dim and validation accuracy against epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_bpd"] for r in log], label="train")
    ax1.plot(epochs, [r["val_bpd"] for r in log], label="validation")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("bits/dim"), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * r["val_acc"] for r in log], color="C2")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("validation accuracy (%)"), ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Run:
    """What one training process sets up once and every step reads: its place among the
    processes, the device, the data, the model with its optimizer and EMA, and the files
    it writes."""
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    autocast: Callable              # zero-argument factory of the forward pass's autocast context
    train: TensorImageDataset
    val: TensorImageDataset
    model: PixelCNN                 # the bare model: EMA, checkpoints and evaluation use it
    fwd_model: torch.nn.Module      # what the training step calls: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    data_gen: torch.Generator       # epoch order and flips, saved on resume
    run_dir: Path
    best_path: Path
    wandb: Any = None               # the wandb module on rank 0 with --en_wandb, else None

    @property
    def master(self):
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def resume_path(self):
        return self.run_dir / "resume.pt"

    @property
    def batches_per_epoch(self):
        return self.train.images.shape[0] // self.args.batch_size   # drop the ragged last batch

    @property
    def num_dims(self):
        return math.prod(self.train.images.shape[1:])                 # C * H * W

    @property
    def shard(self):
        """This process's rows of every global batch."""
        local_batch = self.args.batch_size // self.world_size
        return slice(self.rank * local_batch, (self.rank + 1) * local_batch)


@dataclass
class Progress:
    """Where the run stands. With the weights, optimizer, EMA and random generators it
    is what resume.pt holds."""
    epoch: int = 0                  # epochs finished
    batch_index: int = 0            # batches of the current epoch finished
    step: int = 0                   # optimizer steps taken
    best_acc: float = -1.0          # best validation accuracy so far
    log: list = field(default_factory=list)   # the records of log.jsonl
    perm: torch.Tensor | None = None          # the current epoch's image order, (N,)
    # What the steps since the last record of log.jsonl trained, for the next record.
    trained_nll: float = 0.0        # summed nll in nats
    trained_images: int = 0
    trained_seconds: float = 0.0
    elapsed_s: float = 0.0          # the run's time, over all its sessions, at the last save


def setup(args):
    """Processes, device, data, model, optimizer, EMA, output folders and wandb: the Run
    the other steps share. Bad flags and bad data exit with a one-line error."""
    # torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without it this is the only process.
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    ddp, master = world_size > 1, rank == 0
    if args.batch_size % world_size:
        sys.exit(f"error: --batch_size {args.batch_size} is the global batch and must be "
                 f"divisible by the {world_size} processes")
    if ddp and args.disc_weight > 0 and args.disc_params == "label":
        sys.exit("error: --disc_params label runs its wrong-label passes outside DDP; it is "
                 "one-process only (use --disc_params all under torchrun)")
    # Each process draws its own dropout masks; DDP gives every process rank 0's initial weights.
    torch.manual_seed(args.seed + rank)
    device = pick_device(args.device)
    if ddp and device.type == "cuda":   # one GPU per process
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif ddp and device.type == "cpu":
        dist.init_process_group("gloo")
    elif ddp:
        sys.exit(f"error: multi-process training runs on cuda or cpu, not {device}")
    use_amp = args.amp and bf16_pays(device)
    if args.amp and not use_amp and master:
        print(f"note: --amp needs cuda or a CPU with bfloat16 instructions; training on {device} "
              f"in float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if ddp and not master:
        dist.barrier()   # rank 0 downloads the data if it is missing; the others read it after
    try:
        train = load_dataset(args.dataset, args.data_dir, "train", download=master)
        val = load_dataset(args.dataset, args.data_dir, "validation")
    except DatasetError as err:
        sys.exit(f"error: {err}")
    if ddp and master:
        dist.barrier()
    if args.disc_rows > train.images.shape[2]:
        sys.exit(f"error: --disc_rows {args.disc_rows} exceeds the image height "
                 f"{train.images.shape[2]}")
    if train.images.shape[0] < args.batch_size:
        sys.exit(f"error: --batch_size {args.batch_size} exceeds the {train.images.shape[0]} "
                 f"training images")

    model = PixelCNN(nr_resnet=args.nr_resnet, nr_filters=args.nr_filters,
                     nr_logistic_mix=args.nr_logistic_mix, input_channels=train.images.shape[1],
                     num_classes=train.num_classes, fusion=args.fusion,
                     dropout=args.dropout).to(device)
    fwd_model = torch.compile(model) if args.compile else model
    if ddp:   # before the EMA copies the weights: wrapping broadcasts rank 0's
        fwd_model = DDP(fwd_model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters(), args.lr, device)

    run_dir, save_dir = Path(args.run_dir), Path(args.save_dir)
    for folder in (run_dir, save_dir, Path(args.sample_dir)):
        folder.mkdir(parents=True, exist_ok=True)
    wandb = None
    if args.en_wandb and master:
        import wandb
        wandb.init(project="cpen455-pixelcnn", config=vars(args), name=args.tag, resume="allow")
    return Run(args=args, rank=rank, world_size=world_size, device=device,
               autocast=bf16_autocast(device, use_amp), train=train, val=val, model=model,
               fwd_model=fwd_model, optimizer=optimizer,
               ema=EMA(model, args.ema) if args.ema > 0 else None,
               data_gen=torch.Generator().manual_seed(args.seed), run_dir=run_dir,
               best_path=save_dir / CHECKPOINT_NAME, wandb=wandb)


def load_resume(run):
    """Put the weights, optimizer, EMA, data order and random generators back as
    <run_dir>/resume.pt holds them; returns the Progress it holds."""
    path = run.resume_path
    if not path.exists():
        sys.exit(f"error: --resume given but {path} does not exist")
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if ckpt["model"]["_extra_state"] != run.model.config:
        sys.exit(f"error: {path} holds PixelCNN({ckpt['model']['_extra_state']}), "
                 f"but the flags build PixelCNN({run.model.config})")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.ema is not None:
        run.ema.state = {k: v.to(run.device) for k, v in ckpt["ema"].items()}
    run.data_gen.set_state(ckpt["data_gen"])
    if len(ckpt["rng"]) == run.world_size:
        torch.set_rng_state(ckpt["rng"][run.rank])
        if run.device.type == "cuda" and ckpt["cuda_rng"][run.rank] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"][run.rank])
    elif run.master:
        print(f"note: {path} was written by {len(ckpt['rng'])} processes, this run has "
              f"{run.world_size}: the data order continues exactly, the dropout masks do not")
    # A resume.pt written before a field existed leaves that field at its default.
    progress = Progress(**{f.name: ckpt[f.name] for f in fields(Progress) if f.name in ckpt})
    if run.master:
        cut_back_run_files(run, progress)
        print(f"resumed from {path}: epoch {progress.epoch}, batch {progress.batch_index}, "
              f"step {progress.step}, {progress.elapsed_s / 60:.1f} min into the run")
    return progress


def cut_back_run_files(run, progress):
    """Drop the rows of steps.csv after the checkpoint's step, and rewrite log.jsonl from the
    checkpoint's records: the steps a killed run took after its last checkpoint are trained again,
    and must not appear twice."""
    steps = run.run_dir / "steps.csv"
    if steps.exists():
        rows = steps.read_text().splitlines()
        atomic_write_lines([r for r in rows if int(r.split(",")[0]) <= progress.step], steps)
    atomic_write_lines([json.dumps(record) for record in progress.log], run.run_dir / "log.jsonl")


def save_resume(run, progress, start_time):
    """Write <run_dir>/resume.pt (atomically, on rank 0): everything `load_resume` restores,
    with the run's time since start_time."""
    progress.elapsed_s = time.time() - start_time
    # Every process's dropout generators, by rank; everything else is the same on all of them.
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if run.device.type == "cuda" else None)
    rngs = [rng] * run.world_size
    if run.ddp:
        dist.all_gather_object(rngs, rng)
    if run.master:
        atomic_save(dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                         ema=run.ema.state if run.ema is not None else None,
                         data_gen=run.data_gen.get_state(), rng=[r for r, _ in rngs],
                         cuda_rng=[c for _, c in rngs], **asdict(progress), args=vars(run.args)),
                    run.resume_path)


def next_batch(run, perm, i):
    """Batch i of the epoch's order perm, flipped at random with --flip: this process's slice,
    (b, C, H, W) and (b,), on the device. Every process draws the same global batch and flips."""
    args = run.args
    idx = perm[i * args.batch_size:(i + 1) * args.batch_size][run.shard]
    x, y = run.train.images[idx], run.train.labels[idx]                     # (b, C, H, W), (b,)
    if args.flip:
        mirror = (torch.rand(args.batch_size, generator=run.data_gen) < 0.5)[run.shard]
        x = torch.where(mirror[:, None, None, None], x.flip(dims=[3]), x)
    return x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def train_step(run, x, y, progress):
    """One optimizer step on the batch (x, y): forward, loss, backward, clip, step, the class
    prior's step (--prior_lr), EMA.

    Returns the global batch's (mean nll, objective, summed nll), the same on every process.
    A non-finite objective exits naming the step."""
    args = run.args
    with run.autocast():
        m = hybrid_count(args.disc_fraction, x.shape[0]) if args.disc_weight > 0 else 0
        nll, logits = training_pass(run.fwd_model, x, y, run.train.num_classes, m,  # (b,), (m, C)
                                    run.model if args.disc_params == "label" else None,
                                    hybrid_rows(args.disc_rows, x.shape[2]) if m else None)
        # The mean over the local batch: DDP averages the gradients over the processes.
        loss = nll.mean() / run.num_dims                                     # nats/dim
        if logits is not None:
            prior = run.model.class_log_prior               # (C,), uniform unless --prior_lr
            loss = loss + args.disc_weight * F.cross_entropy(logits + prior, y[:m])
    # Global numbers on every process, so the log shows the whole batch and a non-finite loss
    # stops all of them at the same step.
    stats = torch.stack([nll.mean(), loss, nll.sum()]).detach()
    if run.ddp:
        dist.all_reduce(stats)
        stats[:2] /= run.world_size
    mean_nll, loss_value, sum_nll = stats.tolist()
    if not math.isfinite(loss_value):
        sys.exit(f"error: non-finite loss ({loss_value}) at step {progress.step + 1} (epoch "
                 f"{progress.epoch + 1}); stopping. The last good checkpoints are "
                 f"{run.best_path} and {run.resume_path}")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    if logits is not None and args.prior_lr > 0:
        step_class_prior(run, logits.detach().float(), y[:m])
    if run.ema is not None:
        run.ema.update(run.model, progress.step)
    return mean_nll, loss_value, sum_nll


def hybrid_count(disc_fraction, batch):
    """How many of a batch's images the hybrid term scores: its first --disc_fraction, at least 1."""
    return max(1, int(disc_fraction * batch))


def hybrid_rows(disc_rows, height):
    """The band (r0, r1) of `disc_rows` image rows the hybrid term compares this step, at a
    uniformly random height, drawn from the process's generator (saved on resume, as dropout's
    masks are); None for the whole image."""
    if disc_rows in (0, height):
        return None
    r0 = int(torch.randint(height - disc_rows + 1, ()))
    return r0, r0 + disc_rows - 1


@torch.no_grad()
def step_class_prior(run, logits, y):
    """One gradient step of --prior_lr nats on the model's class prior log pi, on the hybrid
    term's cross-entropy of softmax_c(log p(x | c) + log pi(c)) (logits (m, C), labels (m,)):
    the prior takes up what is constant per class, so the term need not move whole class
    densities for it. The gradient, softmax - onehot, is averaged over the processes."""
    prior = run.model.class_log_prior
    grad = (torch.softmax(logits + prior, dim=1) - F.one_hot(y, prior.shape[0])).mean(dim=0)
    if run.ddp:
        dist.all_reduce(grad)
        grad /= run.world_size
    prior.copy_(torch.log_softmax(prior - run.args.prior_lr * grad, dim=0))


def rank0_value(run, value):
    """Rank 0's value of a number that reads the clock, on every process: clocks differ between
    processes, and all of them must stop, checkpoint and set the learning rate alike."""
    if not run.ddp:
        return value
    value = torch.tensor(float(value), device=run.device)
    dist.broadcast(value, src=0)
    return value.item()


def rank0_decides(run, flag):
    """Rank 0's value of a flag that reads the clock, on every process (see rank0_value)."""
    return bool(rank0_value(run, bool(flag)))


def budget_used(run, step, start_time):
    """The fraction of the run spent after `step` optimizer steps: of --max_steps, of
    --max_minutes since start_time, or of --max_epochs, whichever ends the run first."""
    args = run.args
    used = step / (args.max_epochs * run.batches_per_epoch)
    if args.max_steps:
        used = max(used, step / args.max_steps)
    if args.max_minutes:
        used = max(used, rank0_value(run, (time.time() - start_time) / (60 * args.max_minutes)))
    return used


def set_learning_rate(run, step, start_time):
    """Set the optimizer's rate for step `step` (0-based) by lr_factor; returns it."""
    args = run.args
    used = budget_used(run, step, start_time) if args.lr_cooldown > 0 else 0.0
    lr = args.lr * lr_factor(step, args.warmup_steps, args.lr_decay, used, args.lr_cooldown)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def stop_reason_after(run, step, start_time):
    """Why the run stops after `step`, or None: --max_steps, or --max_minutes since start_time."""
    args = run.args
    if args.max_steps and step >= args.max_steps:
        return f"reached --max_steps {args.max_steps}"
    if args.max_minutes and rank0_decides(run, time.time() - start_time >= 60 * args.max_minutes):
        return f"reached --max_minutes {args.max_minutes}"
    return None


def train_epoch(run, progress, start_time):
    """Train from progress.batch_index to the end of the epoch, or until a stop condition, writing
    resume.pt every --checkpoint_minutes. Returns the stop reason, None when the epoch ran out."""
    args = run.args
    if progress.perm is None:
        progress.perm = torch.randperm(run.train.images.shape[0], generator=run.data_gen)
    last_save = time.time()   # end_epoch saved just before, or the run has just started
    stop_reason = None
    with progress_bar(range(progress.batch_index, run.batches_per_epoch),
                      f"epoch {progress.epoch + 1}", run.master) as bar:
        for i in bar:
            step_start = time.time()
            x, y = next_batch(run, progress.perm, i)
            lr = set_learning_rate(run, progress.step, start_time)
            mean_nll, loss_value, sum_nll = train_step(run, x, y, progress)
            progress.step, progress.batch_index = progress.step + 1, i + 1

            batch_bpd = bits_per_dim(mean_nll, run.num_dims)
            progress.trained_nll += sum_nll
            progress.trained_images += args.batch_size
            progress.trained_seconds += time.time() - step_start
            bar.set_postfix(bpd=f"{batch_bpd:.3f}", lr=f"{lr:.2e}")
            if run.master:
                with open(run.run_dir / "steps.csv", "a") as f:
                    f.write(f"{progress.step},{progress.epoch + 1},{batch_bpd:.6f},"
                            f"{loss_value:.8f},{lr:.6e}\n")
            stop_reason = stop_reason_after(run, progress.step, start_time)
            if stop_reason:
                break
            if args.checkpoint_minutes and rank0_decides(
                    run, time.time() - last_save >= 60 * args.checkpoint_minutes):
                save_resume(run, progress, start_time)
                last_save = time.time()
    return stop_reason


def log_validation(run, progress, start_time, model, finished_epoch):
    """Validate `model`, append a record of it and of what the steps since the last record
    trained to log.jsonl, and write it as the checkpoint when --keep says so."""
    args = run.args
    metrics = evaluate(model, run.val, args, run.device, run.autocast, run.rank, run.world_size)
    epoch = (progress.epoch if finished_epoch
             else progress.epoch + progress.batch_index / run.batches_per_epoch)
    images, seconds = progress.trained_images, progress.trained_seconds
    new_best = metrics["val_acc"] > progress.best_acc
    progress.best_acc = max(progress.best_acc, metrics["val_acc"])
    keep = args.keep == "last" or new_best
    record = dict(epoch=epoch, step=progress.step,
                  train_bpd=bits_per_dim(progress.trained_nll / max(images, 1), run.num_dims),
                  **metrics, lr=run.optimizer.param_groups[0]["lr"], train_seconds=seconds,
                  images_per_s=images / seconds,
                  elapsed_min=(time.time() - start_time) / 60, kept=keep)
    progress.log.append(record)
    progress.trained_nll, progress.trained_images, progress.trained_seconds = 0.0, 0, 0.0
    if run.master:   # the other processes hold the same numbers and weights
        print(f"epoch {epoch:.2f} step {progress.step}: train {record['train_bpd']:.4f} bpd, "
              f"val {metrics['val_bpd']:.4f} bpd, val acc {100 * metrics['val_acc']:.2f}%, "
              f"{seconds:.1f}s, {record['images_per_s']:.1f} img/s")
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.wandb is not None:
            run.wandb.log(record, step=progress.step)
        if keep:
            atomic_save(model.state_dict(), run.best_path)
            if args.keep == "best":
                print(f"  new best validation accuracy -> {run.best_path}")


def end_epoch(run, progress, start_time, final):
    """After an epoch, or the part of one a stop left (final: the run ends there): every
    --eval_interval epochs and at the end, validate and log (log_validation; the EMA weights when
    EMA is on: they are what gets saved); save numbered checkpoints and samples on schedule; write
    resume.pt."""
    args = run.args
    finished_epoch = progress.batch_index == run.batches_per_epoch
    if finished_epoch:
        progress.epoch, progress.batch_index, progress.perm = progress.epoch + 1, 0, None

    def due(interval):
        return finished_epoch and interval > 0 and progress.epoch % interval == 0

    model, ema = run.model, run.ema
    live = copy.deepcopy(model.state_dict()) if ema is not None else None
    if ema is not None:
        model.load_state_dict(ema.state_dict_of(model))
    if final or progress.epoch >= args.max_epochs or due(args.eval_interval):
        log_validation(run, progress, start_time, model, finished_epoch)
    if run.master:
        if due(args.save_interval):
            atomic_save(model.state_dict(), run.best_path.parent /
                        f"pcnn_{args.dataset}_epoch_{progress.epoch}.pth")
        if due(args.sampling_interval):
            n = max(1, args.sample_batch_size // run.train.num_classes)
            save_sample_grid(model, run.train.num_classes, n, tuple(run.train.images.shape[1:]),
                             Path(args.sample_dir) / f"{args.tag}_epoch_{progress.epoch}.png",
                             run.device, run.train.class_names)
    if live is not None:
        model.load_state_dict(live)
    save_resume(run, progress, start_time)


def main(args):
    run = setup(args)
    progress = load_resume(run) if args.resume else Progress()
    if run.master:
        print(f"training PixelCNN({run.model.config}) on {run.device}"
              f"{f' x {run.world_size} processes' if run.ddp else ''}, "
              f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters")
    # The run's clock: --max_minutes and elapsed_min count the earlier sessions' time too.
    start_time = time.time() - progress.elapsed_s
    stop_reason = stop_reason_after(run, progress.step, start_time)   # a resume may have no time left
    while progress.epoch < args.max_epochs and stop_reason is None:
        stop_reason = train_epoch(run, progress, start_time)
        end_epoch(run, progress, start_time, final=stop_reason is not None)
    if run.master:
        print(f"done: {stop_reason or f'{args.max_epochs} epochs'}; {args.keep} checkpoint kept, "
              f"validation accuracy {100 * kept_acc(progress):.2f}% -> {run.best_path}")
        if progress.log:
            plot_curves(progress.log, run.run_dir / "curves.png")
            print(f"training curves -> {run.run_dir / 'curves.png'}")
        if args.fit_prior and run.best_path.is_file():
            print("fitting the class prior log pi(c) on the training images")
            fit = fit_prior(run, progress)
            print(f"class prior fitted on {fit['train_images']} training images in "
                  f"{fit['seconds']:.0f}s: log pi = "
                  f"[{', '.join(f'{v:.2f}' for v in fit['class_log_prior'])}]; validation accuracy "
                  f"{100 * fit['val_acc_before_fit']:.2f}% -> {100 * fit['val_acc']:.2f}% "
                  f"-> {run.best_path}, {run.run_dir / 'class_prior.json'}")
    if run.wandb is not None:
        run.wandb.finish()
    if run.ddp:   # leave together: no process closes its connections while rank 0 still works
        dist.barrier()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="tuned defaults for a CPU laptop or a CUDA GPU; flags given still win")
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
    p.add_argument("-q", "--nr_resnet", type=int, default=1, help="gated blocks per stage")
    p.add_argument("-n", "--nr_filters", type=int, default=40, help="channels of each stream")
    p.add_argument("-m", "--nr_logistic_mix", type=int, default=5, help="logistic mixture components")
    p.add_argument("--fusion", choices=sorted(FUSION_MODES), default="gated",
                   help="where the class embedding enters the network")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout in the gated blocks")
    # optimisation
    p.add_argument("-b", "--batch_size", type=int, default=64,
                   help="images per optimizer step, over all processes under torchrun")
    p.add_argument("-l", "--lr", type=float, default=2e-4, help="Adam learning rate")
    p.add_argument("-e", "--lr_decay", type=float, default=0.999995,
                   help="learning rate multiplied by this after every optimizer step (not epoch)")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="linear learning-rate warm-up over this many optimizer steps")
    p.add_argument("--lr_cooldown", type=float, default=0.0,
                   help="fraction of the run (of --max_minutes, --max_steps or --max_epochs, "
                        "whichever ends it first) over whose end the learning rate falls "
                        "linearly to zero (0: off)")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of the weights' exponential moving average (0: off)")
    p.add_argument("--prior_lr", type=float, default=0.0,
                   help="train the class prior log pi(c) inside the hybrid term's posterior "
                        "softmax_c(log p(x | c) + log pi(c)), by gradient steps of this many nats "
                        "(0: the prior stays uniform during training)")
    p.add_argument("--fit_prior", type=str2bool, nargs="?", const=True, default=True,
                   help="after training, fit the kept model's class prior log pi(c) on the "
                        "training images (the Bayes classifier becomes argmax_c log p(x | c) + "
                        "log pi(c)) and write it into the checkpoint")
    p.add_argument("--flip", type=str2bool, nargs="?", const=True, default=False,
                   help="random horizontal flips of training images")
    p.add_argument("--disc_weight", type=float, default=0.0,
                   help="hybrid objective: weight of the cross-entropy of softmax_c log p(x|c)")
    p.add_argument("--disc_params", choices=("all", "label"), default="all",
                   help="what the hybrid term's passes under the wrong labels train: every "
                        "parameter, or only the label's embedding and projections")
    p.add_argument("--disc_fraction", type=float, default=0.25,
                   help="fraction of each batch the hybrid term is computed on (each of those "
                        "images costs one more pass per other class)")
    p.add_argument("--disc_rows", type=int, default=0,
                   help="the hybrid term compares the classes' log-likelihoods of a band of this "
                        "many image rows, drawn at random each step, instead of the whole image "
                        "(0: the whole image); where the class enters in the last stage "
                        "(--fusion gated_last, late), the other classes' passes run that stage "
                        "on the band only")
    # length of the run
    p.add_argument("-x", "--max_epochs", type=int, default=5000, help="epochs to train")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: off)")
    p.add_argument("--max_minutes", type=float, default=0.0,
                   help="stop after this much training time, counting the time before every "
                        "--resume (0: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from <run_dir>/resume.pt, mid-epoch too")
    p.add_argument("--checkpoint_minutes", type=float, default=5.0,
                   help="also write resume.pt every this many minutes of training, mid-epoch, so a "
                        "killed run loses at most that much (0: at epoch ends only)")
    # evaluation, sampling and checkpoints
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="validation images per batch (times the number of classes per pass); "
                        "default: 8 on a CPU, 32 elsewhere")
    p.add_argument("--eval_interval", type=int, default=1,
                   help="validate, log and write the --keep checkpoint every this many epochs, "
                        "and when the run ends (0: at the end only); a record of log.jsonl "
                        "covers the epochs since the last")
    p.add_argument("-c", "--sampling_interval", type=int, default=5,
                   help="write a sample grid every this many epochs (0: never)")
    p.add_argument("-sb", "--sample_batch_size", type=int, default=16,
                   help="images in each sample grid, split evenly over the classes")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="the checkpoint written to --save_dir: the one of best validation "
                        "accuracy (as training evaluates it, with the class prior trained so "
                        "far), or the last one (the validation images then choose nothing)")
    p.add_argument("-st", "--save_interval", type=int, default=0,
                   help="also keep a checkpoint every this many epochs (0: only the one --keep "
                        "names)")
    # machine
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--amp", type=str2bool, nargs="?", const=True, default=False,
                   help="bf16 autocast (the loss stays in float32) on CUDA, and on a CPU that "
                        "has bfloat16 instructions (AVX512_BF16 or AMX); float32 elsewhere")
    p.add_argument("--compile", type=str2bool, nargs="?", const=True, default=False,
                   help="torch.compile the model")
    p.add_argument("-s", "--seed", type=int, default=1, help="random seed")
    p.add_argument("-w", "--en_wandb", type=str2bool, nargs="?", const=True, default=False,
                   help="log to Weights & Biases (WANDB_MODE=offline works without network)")
    return p


def parse_args(argv=None):
    """Parse flags; a --preset replaces the defaults, and flags given on the command line win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    if args.eval_interval < 0:
        parser.error(f"--eval_interval counts epochs (0: at the end only), got {args.eval_interval}")
    if not 0 <= args.lr_cooldown <= 1:
        parser.error(f"--lr_cooldown is a fraction of the run in [0, 1], got {args.lr_cooldown}")
    if args.disc_rows < 0:
        parser.error(f"--disc_rows counts image rows (0: the whole image), got {args.disc_rows}")
    if not 0 <= args.prior_lr < math.inf:
        parser.error(f"--prior_lr needs a step in nats >= 0, got {args.prior_lr}")
    return args


if __name__ == "__main__":
    line_buffered_stdout()
    try:
        main(parse_args())
    finally:
        if dist.is_initialized():   # also after an error exit, which every process takes together
            dist.destroy_process_group()
