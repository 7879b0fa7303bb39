"""What training shares with the other scripts: the presets, checkpoint files, the optimizer and
its schedule, the weights' moving average, the guarded training step (eager, or captured in a
CUDA graph), evaluation during training, and resume. `pcnn_train.py` is the script on top.

The step never reads a number back from the device: the loss, the spike guard's decision and its
counters stay there, and the loop reads them every `readback_steps` steps (every step on a CPU,
where a read costs nothing). That is what lets a CUDA graph replay the whole step.
"""

import argparse
import json
import math
import os
import pickle
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dataset import DatasetError, TensorImageDataset, load_dataset, one_line, rescaling_inv
from model import CHECKPOINT_NAME, PixelCNN, load_model
from utils import bayes_predictions, bf16_autocast, bf16_pays, bits_per_dim, \
    choose_class_log_prior, dataset_log_likelihoods, discretized_mix_logistic_loss, eval_batch_size, \
    pick_device, progress_bar, sample_fast

# The presets: pcnn_train.py's parser defaults are "cpu"'s, and --preset gpu replaces them; flags
# given on the command line win over both. The reasons and the runs behind them: docs/.
PRESETS = {
    "cpu": dict(
        nr_resnet=1, nr_filters=40, nr_logistic_mix=5,   # the most accuracy per CPU-minute measured
        fusion="gated_last",          # the label enters the last stage only: as accurate, cheaper
        batch_size=8,                 # 2.6-2.8x the optimizer steps of batch 32 in 30 minutes
        lr=3e-3, warmup_steps=100,    # the best rate at batch 32, kept at batch 8
        lr_decay=0.9998, lr_cooldown=0.5,   # fall to zero over the last half of the budget
        ema=0.999, dropout=0.1, flip=True,  # short runs underfit: little dropout, flips for free
        amp=True,                     # bf16 where the CPU has the instructions, else float32
        keep="last", eval_interval=4, max_minutes=30.0, max_epochs=1000, sampling_interval=0,
        block_init_scale=1.0, cuda_graph=False),
    "gpu": dict(
        nr_resnet=5, nr_filters=160, nr_logistic_mix=10,   # the paper's model
        fusion="gated",
        batch_size=64,
        lr=5e-4,                      # 1e-3 blew up right after its warm-up on an H200 (98f7474)
        warmup_steps=500,
        lr_decay=0.99995, lr_cooldown=0.3,
        ema=0.999, dropout=0.5, flip=True, amp=True,
        block_init_scale=0.1,         # each block starts near the identity, as the reference does
        cuda_graph=True,              # the eager step was launch-bound: ~6,400 kernels per step
        keep="last", max_minutes=25.0, max_epochs=1000, sampling_interval=10,
        eval_interval=5),             # each validation writes the 228 MB checkpoint
}
# --fit_prior scores at most this many training images (all of CPEN455's 4159; a fixed sample of
# CIFAR-10's 50000): one number per class is fitted, and every image costs a pass per class.
# Under --max_minutes it scores as many as the time left allows (Clock), and fits nothing on
# fewer than PRIOR_FIT_MIN_IMAGES: a prior fitted on a handful of images is more noise than
# correction.
PRIOR_FIT_IMAGES = 5000
PRIOR_FIT_MIN_IMAGES = 32

# The spike guard. A step whose loss is not finite, or lies more than --spike_sigmas standard
# deviations above the running mean of the accepted steps' losses, is skipped: no weight, Adam
# moment or average moves. The statistics are exponential averages over about 1 / (1 - beta)
# steps, and the guard judges only after GUARD_WARMUP_STEPS accepted steps.
GUARD_BETA = 0.98
GUARD_WARMUP_STEPS = 20
# After --rollback_after skipped steps in a row the run goes back to its last good state (a copy
# taken every SNAPSHOT_STEPS steps, kept once the next SNAPSHOT_STEPS steps were all accepted) and
# multiplies its learning rate by ROLLBACK_LR_FACTOR.
SNAPSHOT_STEPS = 100
ROLLBACK_LR_FACTOR = 0.5
# How often the loop reads the step losses back from a CUDA device (every step elsewhere).
CUDA_READBACK_STEPS = 32
# Eager steps before a CUDA graph is captured: the first steps allocate the gradients and the
# optimizer's state, and the allocator must have settled before capture.
GRAPH_WARMUP_STEPS = 3
STEPS_CSV_HEADER = "step,epoch,batch_bpd,loss,lr,skipped"


def _atomic_write(path, write):
    """write(tmp) to `path` + ".tmp", then rename it to `path`: a kill mid-write leaves the old file
    intact (and a .tmp that the next run removes: remove_stale_temporaries). A write that fails (a
    full disk) or is interrupted removes its .tmp; the failure is an OSError naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):   # torch.save reports a failed write as either
            raise OSError(f"could not write {path} ({one_line(err)}); the file there before, if "
                          f"any, is unchanged: free some space or choose another folder") from err
        raise


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename (see _atomic_write)."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_lines(lines, path):
    """Write text lines to a temporary file, then rename (see _atomic_write)."""
    _atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines)))


class EMA:
    """Exponential moving average of the model's floating-point state (weights and buffers).

    The decay warms up as min(decay, (1 + step) / (10 + step)), as TensorFlow's
    ExponentialMovingAverage does with num_updates: with a fixed 0.999 a run of ~2000 steps
    would still hold a seventh of its random initialisation. The warm-up reaches 0.999 only at
    step 8990, so in shorter runs it alone sets the average, over roughly the last ninth of the
    steps (a longer window, the last third, measured worse: docs/experiments.md).

    The averaged tensors are made once and updated in place (three foreach calls per step, no
    state_dict), so a CUDA graph can capture the update.
    """

    def __init__(self, model, decay):
        self.decay = decay
        live = model.state_dict(keep_vars=True)
        self.names = [k for k, v in live.items() if torch.is_tensor(v) and v.is_floating_point()]
        self.live = [live[k].detach() for k in self.names]       # the model's own storage
        self.state = {k: v.clone() for k, v in zip(self.names, self.live)}

    def weight(self, step):
        """1 - decay at optimizer step `step` (0-based): the new weights' share."""
        return 1.0 - min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, weight):
        """average += weight * (live - average); weight: a float or a 0-dim tensor."""
        average = [self.state[k] for k in self.names]
        delta = torch._foreach_sub(self.live, average)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(average, delta)

    def load(self, state):
        """Copy a saved average in place (a captured graph keeps reading the same tensors)."""
        for k in self.names:
            self.state[k].copy_(state[k])

    def state_dict_of(self, model):
        """The model's state_dict with the averaged tensors swapped in."""
        return {k: self.state.get(k, v) for k, v in model.state_dict().items()}


def fused_adam_available(device):
    """Whether this torch has Adam's fused kernel for the device (CUDA; the CPU from torch 2.4)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def make_optimizer(params, lr, device, capturable=False):
    """Adam, fused into one kernel per step where this torch has one for the device: the update
    of the step-by-step loop over the tensors, within float rounding, at about a quarter of its
    time on the CPU preset's 180 small tensors (`bench.py --only training`). The fused kernel
    also skips a step on the device when told to (`found_inf`), which the spike guard uses.
    capturable: the optimizer's step may be captured in a CUDA graph."""
    fused = fused_adam_available(device)
    return torch.optim.Adam(params, lr=lr, fused=fused or None,
                            capturable=capturable and device.type == "cuda")


def lr_factor(step, warmup_steps, lr_decay, budget_used=0.0, cooldown=0.0):
    """The learning rate of optimizer step `step` (0-based), as a fraction of --lr: a linear
    warm-up over `warmup_steps` steps, times lr_decay ** step, times a cooldown that falls
    linearly to zero over the last `cooldown` fraction of the run's budget, of which
    `budget_used` (in [0, 1]) is spent (0: no cooldown). Ending at zero is what budgeted training
    gains from most (Li et al. 2020; Hägele et al. 2024)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cool = min(1.0, max(0.0, (1.0 - budget_used) / cooldown)) if cooldown > 0 else 1.0
    return warm * lr_decay ** step * cool


def scale_block_init(model, scale):
    """Multiply the weight-norm gain of every gated block's output convolution by `scale`, so that
    each residual block starts near the identity (openai/pixel-cnn initialises that convolution
    with init_scale=0.1). 1 leaves PyTorch's initialisation."""
    if scale == 1:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".conv_out." in name and name.endswith("original0"):      # g of g * v / |v|
                p.mul_(scale)


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
    kept_path: Path                 # the checkpoint --keep writes
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
    """Where the run stands. With the weights, optimizer, EMA, the guard's statistics and the
    random generators it is what resume.pt holds."""
    epoch: int = 0                  # epochs finished
    batch_index: int = 0            # batches of the current epoch finished
    step: int = 0                   # optimizer steps taken (skipped ones too)
    best_acc: float = -1.0          # best validation accuracy so far
    log: list = field(default_factory=list)   # the records of log.jsonl
    perm: torch.Tensor | None = None          # the current epoch's image order, (N,)
    # What the steps since the last record of log.jsonl trained, for the next record.
    trained_nll: float = 0.0        # summed nll in nats of the accepted steps
    trained_images: int = 0         # images of all steps, skipped ones too (for images/s)
    scored_images: int = 0          # images of the accepted steps (for train bits/dim)
    trained_seconds: float = 0.0
    skipped_steps: int = 0          # steps the spike guard skipped, over the whole run
    rollbacks: int = 0              # times the run went back to its last good state
    lr_scale: float = 1.0           # ROLLBACK_LR_FACTOR ** rollbacks
    elapsed_s: float = 0.0          # the run's time, over all its sessions, at the last save
    planned_steps: int = 0          # the steps --max_minutes buys, fixed when the cooldown starts
                                    # (Clock.plan; 0: not yet, or no --max_minutes)


class GuardedStep:
    """The training step: forward, loss, backward, clip, Adam, EMA, with the spike guard, all on
    the device. `__call__(x, y, lr, ema_weight)` queues one step and returns nothing; `readback()`
    returns the rows of the steps queued since the last call:
    (mean nll, loss in nats/dim, summed nll, skipped, skipped in a row), the same on every process.

    The guard (see GUARD_BETA) turns a bad step into a skipped one through fused Adam's
    `found_inf`, and the EMA's weight is zeroed with it, so nothing moves. With cuda_graph, the
    step is captured once after GRAPH_WARMUP_STEPS eager steps and replayed: the batch, the
    learning rate and the EMA weight are copied into the graph's input tensors first. Without it,
    or where fused Adam is missing (the guard then reads its decision back), the same code runs
    eagerly.
    """

    def __init__(self, run, cuda_graph=False):
        self.run, args, device = run, run.args, run.device
        self.fused = bool(run.optimizer.defaults.get("fused"))
        self.cuda_graph = cuda_graph
        self.readback_steps = CUDA_READBACK_STEPS if device.type == "cuda" else 1
        self.params = [p for p in run.model.parameters()]
        zero = torch.zeros((), device=device)
        # The guard's statistics: running mean and variance of accepted losses, accepted steps,
        # skipped steps in a row.
        self.guard = dict(mean=zero.clone(), var=zero.clone(), seen=zero.clone(),
                          in_a_row=zero.clone())
        self.lr = torch.full((), args.lr, device=device)
        self.ema_weight = zero.clone()
        self.row = torch.zeros(5, device=device)
        self.rows = []
        self.static_batch = None
        self.graph = None
        self.eager_steps = 0
        self.last_lr = args.lr
        if self.fused:
            for group in run.optimizer.param_groups:
                group["lr"] = self.lr

    def _body(self, x, y):
        """One step on the device, reading self.lr and self.ema_weight, writing self.row."""
        run, args = self.run, self.run.args
        with run.autocast():
            nll = discretized_mix_logistic_loss(x, run.fwd_model(x, y), reduction="none")  # (b,)
        loss = nll.mean() / x[0].numel()            # nats/dim; DDP averages the gradients
        stats = torch.stack([nll.mean(), loss, nll.sum()]).detach().float()
        if run.ddp:   # global numbers, so every process takes the same decision
            dist.all_reduce(stats)
            stats[:2] /= run.world_size
        g = self.guard
        value = stats[1]
        limit = g["mean"] + args.spike_sigmas * g["var"].sqrt()
        judged = (g["seen"] >= GUARD_WARMUP_STEPS) & (args.spike_sigmas > 0)
        skip = ~torch.isfinite(value) | (judged & (value > limit))
        run.optimizer.zero_grad(set_to_none=not self.cuda_graph)
        loss.backward()
        # The norm also tells a finite loss with non-finite gradients (a bf16 overflow): skipped too.
        norm = torch.nn.utils.clip_grad_norm_(self.params, args.grad_clip or math.inf)
        skip = skip | ~torch.isfinite(norm)
        skip_f = skip.float()
        if self.fused:
            run.optimizer.found_inf = skip_f
            run.optimizer.step()
        elif not skip.item():   # no device-side skip without the fused kernel: read it back
            run.optimizer.step()
        if run.ema is not None:
            run.ema.update(self.ema_weight * (1 - skip_f))
        # The statistics move with accepted steps only; the warm-up averages the first ones.
        beta = torch.clamp(g["seen"] / (g["seen"] + 1), max=GUARD_BETA)
        delta = torch.where(skip, 0.0, value - g["mean"])
        g["mean"].add_((1 - beta) * delta)
        g["var"].copy_(torch.where(skip, g["var"], beta * (g["var"] + (1 - beta) * delta ** 2)))
        g["seen"].add_(1 - skip_f)
        g["in_a_row"].copy_((g["in_a_row"] + 1) * skip_f)
        self.row.copy_(torch.cat([stats, skip_f[None], g["in_a_row"][None]]))

    def __call__(self, x, y, lr, ema_weight):
        self.last_lr = lr
        self.lr.fill_(lr)                      # what fused Adam reads
        self.ema_weight.fill_(ema_weight)
        if not self.fused:
            for group in self.run.optimizer.param_groups:
                group["lr"] = lr
        if not self.cuda_graph:
            self._body(x, y)
        elif self.graph is None and self.eager_steps < GRAPH_WARMUP_STEPS:
            self._warmup_step(x, y)
        else:
            if self.graph is None:
                self._capture(x, y)
            self.static_batch[0].copy_(x)
            self.static_batch[1].copy_(y)
            self.graph.replay()
        self.rows.append(self.row.clone())

    def _warmup_step(self, x, y):
        """An eager step on a side stream, as torch.cuda.graphs asks before a capture."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(x, y)
        torch.cuda.current_stream().wait_stream(side)
        self.eager_steps += 1

    def _capture(self, x, y):
        """Record the step once; it runs only when replayed."""
        self.static_batch = (x.clone(), y.clone())
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            self._body(*self.static_batch)

    def readback(self):
        """The queued steps' rows, as Python lists (one device read for all of them)."""
        if not self.rows:
            return []
        rows = torch.stack(self.rows).tolist()
        self.rows = []
        return rows

    def tensors(self):
        """Everything a step changes, in a fixed order: weights and buffers, Adam's state, the
        EMA, the guard's statistics. The snapshot and the rollback copy these in place."""
        run = self.run
        out = list(run.model.state_dict(keep_vars=True).values())
        for p in self.params:
            out += [v for v in run.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        if run.ema is not None:
            out += [run.ema.state[k] for k in run.ema.names]
        return [t.detach() for t in out if torch.is_tensor(t)] + list(self.guard.values())

    def guard_state(self):
        return {k: v.detach().cpu() for k, v in self.guard.items()}

    def load_guard_state(self, state):
        for k, v in self.guard.items():
            v.copy_(state[k])


def standalone_step(model, lr, ema_decay=0.0, autocast=None, cuda_graph=False, grad_clip=1.0,
                    spike_sigmas=6.0):
    """A GuardedStep on `model` outside a training run (for bench.py and the tests): the
    optimizer of make_optimizer, an EMA when ema_decay > 0, one process."""
    device = next(model.parameters()).device
    args = SimpleNamespace(lr=lr, grad_clip=grad_clip, spike_sigmas=spike_sigmas)
    run = SimpleNamespace(
        args=args, model=model, fwd_model=model, device=device, ddp=False,
        world_size=1, optimizer=make_optimizer(model.parameters(), lr, device, cuda_graph),
        ema=EMA(model, ema_decay) if ema_decay > 0 else None,
        autocast=autocast or bf16_autocast(device, False))
    return GuardedStep(run, cuda_graph)


class Snapshots:
    """The last good state of a run, in memory, for the spike guard's rollback: a copy is taken
    every SNAPSHOT_STEPS steps and becomes the good state once the next SNAPSHOT_STEPS steps were
    all accepted, so that a state that led to a blow-up is not the one returned to (unless no copy
    has earned that yet: then the only one held)."""

    def __init__(self, step_fn):
        self.step_fn = step_fn
        self.pending, self.pending_step, self.good, self.good_step = None, 0, None, 0
        self.clean_since_pending = True

    def observe(self, step, skipped):
        """After reading back the rows up to `step`; skipped: whether any of them was skipped."""
        self.clean_since_pending &= not skipped
        if self.pending is None or step - self.pending_step >= SNAPSHOT_STEPS:
            if self.pending is not None and self.clean_since_pending:
                self.good, self.good_step = self.pending, self.pending_step
            self.pending = [t.clone() for t in self.step_fn.tensors()]
            self.pending_step, self.clean_since_pending = step, True

    def restore(self):
        """Copy the good state (else the only copy held) back in place; returns its step."""
        if self.good is not None:
            self.pending, self.pending_step = self.good, self.good_step
        if self.pending is None:
            sys.exit("error: every step so far was skipped (non-finite or spiking losses); "
                     "there is no good state to go back to: check the data and --lr")
        torch._foreach_copy_(self.step_fn.tensors(), self.pending)
        self.good, self.clean_since_pending = None, True
        return self.pending_step


def evaluate(model, data, args, device, autocast, rank, world_size):
    """Validation bits/dim (under the true label) and Bayes-classifier accuracy, in one pass:
    returns (metrics, log p(x | c) (N, classes)).

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
                val_acc=bayes_accuracy(model, ll, labels)), ll


def bayes_accuracy(model, ll, labels):
    """The share of images whose Bayes prediction under the model's prior is their label."""
    return (bayes_predictions(model, ll) == labels).float().mean().item()


def kept_acc(progress):
    """Validation accuracy, as training logged it, of the checkpoint kept: the last record marked
    `kept` (-1 before any)."""
    kept = [r["val_acc"] for r in progress.log if r.get("kept")]
    return kept[-1] if kept else -1.0


def fit_prior(run, progress, val_ll=None, deadline=math.inf):
    """Choose the kept model's class prior (utils.choose_class_log_prior: the prior fitted on the
    training images where cross-validation on them says it pays, else uniform) from up to
    PRIOR_FIT_IMAGES training images in a fixed random order, unflipped, as many as can be scored before
    `deadline` (a time.time(): the end of --max_minutes), and write it into the checkpoint and
    <run_dir>/class_prior.json. val_ll: the kept model's validation log p(x | c) (N, classes)
    when the run's last validation scored it, else None, and they are scored here for the
    accuracy after the fit. Returns the json's dict, or None when the time left scored fewer than
    PRIOR_FIT_MIN_IMAGES (the checkpoint keeps its prior then). Rank 0 only: the other processes
    have finished."""
    args, start = run.args, time.time()
    model = load_model(run.kept_path, run.device)
    n_train = run.train.images.shape[0]
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))[:PRIOR_FIT_IMAGES]
    picked, ll = score_before(run, model, run.train.images, order, deadline)     # (n, classes)
    if len(picked) < PRIOR_FIT_MIN_IMAGES:
        return None
    prior, choice = choose_class_log_prior(ll, run.train.labels[picked])
    model.class_log_prior.copy_(prior)
    if val_ll is None:
        val_ll = evaluate(model, run.val, args, run.device, run.autocast, 0, 1)[1]
    atomic_save(model.state_dict(), run.kept_path)
    result = dict(class_log_prior=model.class_log_prior.tolist(), prior=choice["prior"],
                  reason=choice["reason"], train_images=len(picked),
                  of_train_images=min(PRIOR_FIT_IMAGES, n_train),
                  val_acc_before_fit=kept_acc(progress),
                  val_acc=bayes_accuracy(model, val_ll, run.val.labels),
                  seconds=time.time() - start)
    atomic_write_lines([json.dumps(result, indent=1)], run.run_dir / "class_prior.json")
    return result


def score_before(run, model, images, order, deadline):
    """log p(x | c) of images[order], a batch at a time, while the next batch (timed as the last
    one) ends before `deadline`: returns (the indices scored, a prefix of order; their
    log-likelihoods (n, classes))."""
    batch = run.args.eval_batch_size or eval_batch_size(run.device)
    out, last = [], 0.0
    model.eval()
    with progress_bar(order.split(batch), "prior fit: log p(x|c)") as bar:
        for chunk in bar:
            started = time.time()
            if started + last > deadline:
                break
            out.append(dataset_log_likelihoods(model, images[chunk], model.num_classes, batch,
                                               run.device, autocast=run.autocast))
            last = time.time() - started
    ll = torch.cat(out) if out else torch.zeros(0, model.num_classes)
    return order[:ll.shape[0]], ll


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
    cuda_graph = args.cuda_graph and device.type == "cuda" and not ddp and not args.compile
    if args.cuda_graph and not cuda_graph and master and device.type == "cuda":
        print("note: --cuda_graph runs in one process without --compile; training eagerly")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True    # the shapes are static: every batch is full

    run_dir, save_dir = Path(args.run_dir), Path(args.save_dir)
    for folder in (run_dir, save_dir, Path(args.sample_dir)):   # before minutes of work, not after
        folder.mkdir(parents=True, exist_ok=True)
    if master:
        remove_stale_temporaries(run_dir, save_dir)
    if ddp and not master:
        dist.barrier()   # rank 0 downloads the data if it is missing; the others read it after
    try:
        train = load_dataset(args.dataset, args.data_dir, "train", download=master)
        val = load_dataset(args.dataset, args.data_dir, "validation")
    except DatasetError as err:
        sys.exit(f"error: {err}")
    if ddp and master:
        dist.barrier()
    if train.images.shape[0] < args.batch_size:
        sys.exit(f"error: --batch_size {args.batch_size} exceeds the {train.images.shape[0]} "
                 f"training images")
    if device.type == "cuda":   # a few tens of MB: batches are cut on the device, no copies
        train.images, train.labels = train.images.to(device), train.labels.to(device)

    model = PixelCNN(nr_resnet=args.nr_resnet, nr_filters=args.nr_filters,
                     nr_logistic_mix=args.nr_logistic_mix, input_channels=train.images.shape[1],
                     num_classes=train.num_classes, fusion=args.fusion,
                     dropout=args.dropout).to(device)
    scale_block_init(model, args.block_init_scale)
    fwd_model = torch.compile(model) if args.compile else model
    if ddp:   # before the EMA copies the weights: wrapping broadcasts rank 0's
        fwd_model = DDP(fwd_model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters(), args.lr, device, capturable=cuda_graph)

    wandb = None
    if args.en_wandb and master:
        import wandb
        wandb.init(project="cpen455-pixelcnn", config=vars(args), name=args.tag, resume="allow")
    autocast = bf16_autocast(device, use_amp, cache_enabled=not cuda_graph)
    run = Run(args=args, rank=rank, world_size=world_size, device=device, autocast=autocast,
              train=train, val=val, model=model, fwd_model=fwd_model, optimizer=optimizer,
              ema=EMA(model, args.ema) if args.ema > 0 else None,
              data_gen=torch.Generator().manual_seed(args.seed), run_dir=run_dir,
              kept_path=save_dir / CHECKPOINT_NAME, wandb=wandb)
    return run, GuardedStep(run, cuda_graph)


def remove_stale_temporaries(run_dir, save_dir):
    """Delete the .tmp files a run killed mid-write left (_atomic_write's: the file each was to
    replace is intact), saying so."""
    for tmp in sorted([*Path(run_dir).glob("*.tmp"), *Path(save_dir).glob("*.pth.tmp")]):
        tmp.unlink(missing_ok=True)
        print(f"removed {tmp}, left by a run killed while writing it")


def load_resume(run, step_fn):
    """Put the weights, optimizer, EMA, the guard's statistics, data order and random generators
    back as <run_dir>/resume.pt holds them; returns the Progress it holds. A file that is not a
    resume.pt of these flags (truncated, another file, another architecture or dataset) is a
    one-line error."""
    path = run.resume_path
    if not path.exists():
        sys.exit(f"error: --resume given but {path} does not exist")
    try:
        progress = restore_resume(run, step_fn, path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError,
            TypeError, AttributeError, IndexError) as err:
        sys.exit(f"error: {path} cannot be resumed from: it is truncated, or not a resume.pt "
                 f"of this code ({type(err).__name__}: {one_line(err)}); delete it to start "
                 f"afresh, or pass another --run_dir")
    if run.master:
        cut_back_run_files(run, progress)
        print(f"resumed from {path}: epoch {progress.epoch}, batch {progress.batch_index}, "
              f"step {progress.step}, {progress.elapsed_s / 60:.1f} min into the run")
    return progress


def restore_resume(run, step_fn, path):
    """load_resume's reading of the file into the run; returns its Progress. Any error here means
    the file is not a resume.pt of this run."""
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    if ckpt["model"]["_extra_state"] != run.model.config:
        sys.exit(f"error: {path} holds PixelCNN({ckpt['model']['_extra_state']}), "
                 f"but the flags build PixelCNN({run.model.config}); pass the flags it was "
                 f"trained with (--nr_resnet, --nr_filters, --nr_logistic_mix, --fusion, "
                 f"--dataset), or another --run_dir")
    run.model.load_state_dict(ckpt["model"])
    for group in ckpt["optimizer"]["param_groups"]:   # the file's settings, this run's kernel:
        group.update(fused=run.optimizer.defaults["fused"],   # set before the load, which places
                     capturable=run.optimizer.defaults["capturable"])   # Adam's step count by them
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if step_fn.fused:   # the step's own rate tensor, not the file's copy
        for group in run.optimizer.param_groups:
            group["lr"] = step_fn.lr
    if run.ema is not None:
        run.ema.load(ckpt["ema"])
    if "guard" in ckpt:
        step_fn.load_guard_state(ckpt["guard"])
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
    if progress.planned_steps and ckpt["args"]["max_minutes"] != run.args.max_minutes:
        progress.planned_steps = 0      # planned for another budget: the new one plans again
    return progress


def cut_back_run_files(run, progress):
    """Drop the rows of steps.csv after the checkpoint's step, and rewrite log.jsonl from the
    checkpoint's records: the steps a killed run took after its last checkpoint are trained again,
    and must not appear twice."""
    steps = run.run_dir / "steps.csv"
    if steps.exists():
        rows = [r for r in steps.read_text().splitlines()[1:] if int(r.split(",")[0]) <= progress.step]
        atomic_write_lines([STEPS_CSV_HEADER, *rows], steps)
    atomic_write_lines([json.dumps(record) for record in progress.log], run.run_dir / "log.jsonl")


def save_resume(run, step_fn, progress, clock):
    """Write <run_dir>/resume.pt (atomically, on rank 0): everything `load_resume` restores,
    with the run's time on `clock` (a Clock), which notes when it was written."""
    progress.elapsed_s = clock.elapsed()
    clock.last_save = time.time()
    # Every process's dropout generators, by rank; everything else is the same on all of them.
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state() if run.device.type == "cuda" else None)
    rngs = [rng] * run.world_size
    if run.ddp:
        dist.all_gather_object(rngs, rng)
    if run.master:
        atomic_save(dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                         ema=run.ema.state if run.ema is not None else None,
                         guard=step_fn.guard_state(), data_gen=run.data_gen.get_state(),
                         rng=[r for r, _ in rngs], cuda_rng=[c for _, c in rngs],
                         **asdict(progress), args=vars(run.args)),
                    run.resume_path)


class StopSignals:
    """While training: Ctrl-C (SIGINT) or SIGTERM ends the run after the step under way, with
    resume.pt written and no temporary file left; a second signal stops at once. Before and after
    the `with` block the default handlers stop at once (errors_in_one_line says so in one line)."""

    def __enter__(self):
        self.received, self.signum, self.stopped = None, 0, False
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received, self.signum = signal.Signals(signum).name, signum
        print(f"\n{self.received}: stopping after this step and writing resume.pt (again: stop "
              f"at once)", file=sys.stderr)

    def reason(self, run):
        """The stop reason once rank 0 received a signal, on every process alike, else None."""
        if rank0_decides(run, self.received is not None):
            self.stopped = True
            return f"stopped by {self.received}"
        return None


def checkpoint_due(run, clock):
    """Whether --checkpoint_minutes (0: off) have passed since resume.pt was last written, on
    rank 0's clock: the GPU preset's resume.pt is 0.9 GB, too much to write at every epoch end."""
    minutes = run.args.checkpoint_minutes
    return bool(minutes) and rank0_decides(run, time.time() - clock.last_save >= 60 * minutes)


def report_prior_fit(run, fit):
    """Print what fit_prior did (its dict, or None when there was no time to fit)."""
    args = run.args
    if fit is None:
        print(f"no class prior fitted: the time --max_minutes {args.max_minutes} left scored fewer "
              f"than {PRIOR_FIT_MIN_IMAGES} training images, so {run.kept_path} keeps its prior; "
              f"fit it with `python classification_evaluation.py --prior fit --checkpoint "
              f"{run.kept_path} --save_checkpoint {run.kept_path}`")
        return
    cut = (f" of {fit['of_train_images']} (the time --max_minutes {args.max_minutes} left)"
           if fit["train_images"] < fit["of_train_images"] else "")
    print(f"class prior chosen on {fit['train_images']}{cut} training images in "
          f"{fit['seconds']:.0f}s, {fit['reason']}: log pi = "
          f"[{', '.join(f'{v:.2f}' for v in fit['class_log_prior'])}]; validation accuracy "
          f"{100 * fit['val_acc_before_fit']:.2f}% -> {100 * fit['val_acc']:.2f}% "
          f"-> {run.kept_path}, {run.run_dir / 'class_prior.json'}")


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


def budget_used(run, progress):
    """The fraction of the run spent after progress.step optimizer steps: of --max_steps, of
    --max_epochs, or of the steps --max_minutes buys once they are fixed (Progress.planned_steps),
    whichever ends the run first. It reads no clock, so a resumed run repeats it step for step."""
    args, step = run.args, progress.step
    used = step / (args.max_epochs * run.batches_per_epoch)
    for total in (args.max_steps, progress.planned_steps):
        if total:
            used = max(used, step / total)
    return used


def learning_rate(run, progress):
    """The rate of step progress.step (0-based): --lr by lr_factor, times the rollbacks' scale.
    The cooldown follows budget_used: the steps, not the clock."""
    args = run.args
    used = budget_used(run, progress) if args.lr_cooldown > 0 else 0.0
    return (args.lr * progress.lr_scale
            * lr_factor(progress.step, args.warmup_steps, args.lr_decay, used, args.lr_cooldown))


def stop_reason_after(run, progress, clock, read_clock=True):
    """Why the run stops after progress.step steps, or None: --max_steps, the steps --max_minutes
    buys, or (read_clock) the clock reaching the end of training under --max_minutes
    (Clock.train_end), rank 0's clock under DDP: a broadcast, so the loop reads it at read-backs."""
    args = run.args
    if args.max_steps and progress.step >= args.max_steps:
        return f"reached --max_steps {args.max_steps}"
    if progress.planned_steps and progress.step >= progress.planned_steps:
        return (f"reached --max_minutes {args.max_minutes}: the {progress.planned_steps} steps "
                f"it buys")
    if read_clock and args.max_minutes and rank0_decides(run, time.time() >= clock.train_end):
        return f"reached --max_minutes {args.max_minutes}"
    return None


# Under --max_minutes the end of the run happens inside the budget: training stops early enough for
# the final validation and the prior fit. The fit takes at most PRIOR_FIT_SHARE of the budget (all
# of CPEN455's training images in the CPU preset's 30 minutes, a few hundred in 2).
# END_SLACK_SECONDS cover the rest: the curves (matplotlib's import) and the writes,
# AFTER_FIT_SECONDS of them after the fit (the checkpoint, class_prior.json).
PRIOR_FIT_SHARE = 0.1
END_SLACK_SECONDS = 3.0
AFTER_FIT_SECONDS = 1.0
# The validation's time is reserved at twice its timing, for the ordinary swings of a shared
# machine's speed; the time it leaves goes to the prior fit, which scores until the budget ends.
# Another user's process competing for the cores throughout can slow scoring tenfold (the CPU
# preset's final validation on 2 cores: 11 s alone, 125 s beside a test run): no margin covers
# that, and the run then ends late.
SCORE_TIME_MARGIN = 2.0
# Training keeps at least half of any budget: where the end needs more, the budget is too short
# for it or the timing was off, and the prior fit then scores what time is left.
MAX_END_SHARE = 0.5
# The pace that plans the steps --max_minutes buys is measured over at least this many steps.
PACE_STEPS = 20


class Clock:
    """The run's time over all its sessions (from start_time), and the --max_minutes budget:
    training ends at `train_end`, early enough that the final validation and the prior fit end by
    `end` too (end_seconds). `plan` fixes the steps the budget buys once the cooldown starts, so
    that the learning rate follows the steps, and a resume repeats it."""

    def __init__(self, run, start_time):
        self.run, self.start_time = run, start_time
        self.end = self.train_end = math.inf
        self.reserve = 0.0
        if run.args.max_minutes:
            budget = 60 * run.args.max_minutes
            self.end = start_time + budget
            self.reserve = min(end_seconds(run, seconds_per_scored_image(run)),
                               MAX_END_SHARE * budget)
            self.train_end = self.end - self.reserve
        self.paced_from = None          # (time, step) of this session's first step
        self.last_save = time.time()    # when resume.pt was last written (or the session began)

    def elapsed(self):
        return time.time() - self.start_time

    def plan(self, progress):
        """After progress.step steps (at a read-back of their losses): once the steps the rest of
        training buys at this session's pace put the next step into the cooldown
        (--lr_cooldown), fix their total in progress.planned_steps. Rank 0's numbers, on every
        process."""
        args = self.run.args
        if progress.planned_steps or not args.max_minutes or not args.lr_cooldown:
            return
        now = time.time()
        if self.paced_from is None:
            self.paced_from = (now, progress.step)
        since, first = self.paced_from
        if progress.step - first < PACE_STEPS:
            return
        pace = (progress.step - first) / (now - since)                          # steps per second
        buys = rank0_value(self.run, progress.step + max(0.0, self.train_end - now) * pace)
        if progress.step >= (1 - args.lr_cooldown) * buys:
            progress.planned_steps = math.ceil(buys)


def seconds_per_scored_image(run):
    """Seconds to score one image under every class: a batch of validation images warms up, the
    next two are timed, and the faster counts (another user's threads can slow one down tenfold
    on a shared machine; SCORE_TIME_MARGIN covers the usual swings). Timed without the float32
    recheck of close calls under --amp: the untrained model's classes all lie close, so it would
    score every image twice over, which a trained model's validation does not (0.043 s against
    0.022 s an image for the CPU preset's model on 2 cores); the margin covers a partly trained
    one's."""
    batch = run.args.eval_batch_size or eval_batch_size(run.device)
    run.model.eval()
    times = []
    for images in run.val.images[:3 * batch].split(batch):
        started = time.time()
        dataset_log_likelihoods(run.model, images, run.val.num_classes, batch, run.device,
                                autocast=run.autocast, recheck=0)
        times.append((time.time() - started) / images.shape[0])
    run.model.train()
    return min(times[1:] or times)


def end_seconds(run, per_image):
    """Seconds the end of a run under --max_minutes takes after training, at `per_image` seconds
    an image: the final validation (split over the processes) and, with --keep best, a second
    scoring of it for the prior fit (the kept model need not be the one validated last), both
    SCORE_TIME_MARGIN times as long as timed; with --fit_prior the fit's share of the budget; and
    END_SLACK_SECONDS."""
    args = run.args
    n_val = run.val.images.shape[0]
    validations = 1 / run.world_size + (args.fit_prior and args.keep == "best")
    seconds = SCORE_TIME_MARGIN * per_image * n_val * validations + END_SLACK_SECONDS
    if args.fit_prior:
        fit_all = per_image * min(PRIOR_FIT_IMAGES, run.train.images.shape[0])
        seconds += min(fit_all, PRIOR_FIT_SHARE * 60 * args.max_minutes)
    return seconds


def next_batch(run, perm, i):
    """Batch i of the epoch's order perm, flipped at random with --flip: this process's slice,
    (b, C, H, W) and (b,), on the device. Every process draws the same global batch and flips."""
    args = run.args
    idx = perm[i * args.batch_size:(i + 1) * args.batch_size][run.shard]
    images, labels = run.train.images, run.train.labels
    idx = idx.to(images.device, non_blocking=True)
    x, y = images[idx], labels[idx]                                         # (b, C, H, W), (b,)
    if args.flip:
        mirror = (torch.rand(args.batch_size, generator=run.data_gen) < 0.5)[run.shard]
        mirror = mirror.to(images.device, non_blocking=True)
        x = torch.where(mirror[:, None, None, None], x.flip(dims=[3]), x)
    return x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
