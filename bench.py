"""Speed of the fast paths against this project's own straightforward ones, measured in one run.

    python bench.py                       # CPU, a few minutes on 2 cores
    python bench.py --device cuda         # the same figures on a GPU
    python bench.py --only sampling       # one section
    python bench.py --data_dir ../shared/cpen455 --only classification   # the data elsewhere

Each line prints the straightforward time, the fast time and their ratio, plus peak memory.
1. Sampling 100 images (25 per class) at 32x32: `utils.sample` (one full forward pass per pixel)
   against `utils.sample_fast` (each layer computed once per position, from a cache). The slow path
   is timed on a few full passes, scaled to the 1024 pixels; the fast path on the first `--rows`
   rows of an image, scaled to 32 rows (every row costs about the same). On CUDA also
   `sample_fast`'s default there, its steps replayed from CUDA graphs, timed on whole images (the
   graphs' capture included), against the naive sampler and against the eager steps. Then images/s
   of the whole `sample_fast` at 40/1/5, batch 1, 16 and 100 (on CUDA with and without the graphs).
   The tests prove that the samplers draw identical samples.
2. Classifying the 519 validation images: the course's pattern (a forward pass per class per
   batch of 32 and a Python loop over images in the loss) against `dataset_log_likelihoods` with
   its defaults (8 images per batch on a CPU, weight norm computed once), in float32 and under
   bf16 autocast (with and without the float32 recheck of close calls), on the validation split
   in --data_dir. Then it prints the largest move bf16 makes in the gap between two classes'
   log-likelihoods, and counts the predictions of each that differ from the course pattern's,
   with --checkpoint (the shipped model, models/conditional_pixelcnn.pth, by default) when it is
   there. The paths run in turn, --rounds times, and each one's fastest round counts. Then the
   GFLOP of one pass, and one upsampling layer's transposed convolution against its
   matrix-product forward (the layer's forward takes the latter on a CPU only).
3. Training step at 40 filters, 1 resnet, 5 mixtures, batch 32: float32 eager against bf16
   autocast (the loss in float32), eager and under torch.compile; on a CPU, bf16 eager also with
   nn.Dropout (F.dropout's draw per element) against `layers.Dropout` (a quarter of the draws).
   Then the step pcnn_train.py runs (training.GuardedStep) at the preset's model and batch
   (training.PRESETS: "gpu" on CUDA, "cpu" elsewhere): eager, and on CUDA also replayed from a
   CUDA graph at 1, 2 and 4 times the preset's batch, with the time of the first steps (the
   capture included).
   Last, Adam's step on the CPU preset's tensors: the loop over them against
   training.make_optimizer's (fused where this torch has the kernel).
Speed does not depend on the weights, so the other models are random.
"""

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dataset import DatasetError, load_dataset
from layers import GatedResNet
from model import DEFAULT_CHECKPOINT, PixelCNN, load_model
from training import GRAPH_WARMUP_STEPS, PRESETS, make_optimizer, standalone_step
from utils import (amp_recheck_nats, bayes_predictions, bf16_autocast, bf16_pays,
                   class_log_likelihoods, dataset_log_likelihoods, discretized_mix_logistic_loss,
                   pick_device, sample_fast)

NO_BF16 = "this CPU has no bf16 instructions, and PyTorch's emulation is slower than float32"
SIZES = {"40/1/5": dict(nr_resnet=1, nr_filters=40, nr_logistic_mix=5),
         "160/5/10": dict(nr_resnet=5, nr_filters=160, nr_logistic_mix=10)}
STEPS_PER_CALL = 10            # guarded training steps per timed call


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1, warmup=True):
    """Seconds per call of fn, after one warm-up call (for runs of many seconds, none)."""
    if warmup:
        fn()
        sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def interleaved(paths, device, rounds):
    """Seconds of each of `paths` (name -> fn), the fastest of `rounds` rounds in which every path
    runs once, in turn. The first round is the warm-up. On a shared machine a slow spell then
    slows one call of every path alike rather than all calls of one path, and the fastest call is
    the one least disturbed."""
    seconds = {name: float("inf") for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            seconds[name] = min(seconds[name], timed(fn, device, warmup=False))
    return seconds


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024    # Linux: KiB


def report(name, slow, fast, device, unit="s"):
    print(f"{name:<48} straightforward {slow:9.2f} {unit}   fast {fast:8.2f} {unit}   "
          f"{slow / fast:6.1f}x   peak mem {peak_memory_mb(device):7.0f} MB", flush=True)


@torch.inference_mode()
def bench_sampling(device, slow_pixels, rows):
    """The naive sampler against sample_fast's eager steps (cuda_graph=False; the default on a
    CPU) and, on CUDA, against its steps replayed from CUDA graphs (the default there)."""
    labels = torch.arange(4, device=device).repeat_interleave(25)          # 25 per class
    H = W = 32
    cuda = device.type == "cuda"
    for name, size in SIZES.items():
        model = PixelCNN(**size).to(device).eval()
        x = torch.zeros(100, 3, H, W, device=device)
        slow = timed(lambda: model(x, labels), device, repeat=slow_pixels) * H * W
        eager = timed(lambda: sample_fast(model, labels, (3, rows, W), cuda_graph=False), device,
                      warmup=False) / rows * H
        report(f"sample 100 images, {name} (est. from {slow_pixels} px / {rows} rows)", slow,
               eager, device)
        if cuda:
            graphs = timed(lambda: sample_fast(model, labels, (3, H, W), cuda_graph=True), device,
                           warmup=False)
            report(f"  the same, steps replayed from CUDA graphs (all {H} rows)", slow, graphs,
                   device)
            print(f"  CUDA graphs: {eager / graphs:.1f}x the eager steps", flush=True)
    model = PixelCNN(**SIZES["40/1/5"]).to(device).eval()
    for batch in (1, 16, 100):
        labels = torch.arange(batch, device=device) % 4
        for cuda_graph in ((True, False) if cuda else (False,)):
            seconds = timed(lambda: sample_fast(model, labels, (3, H, W), cuda_graph=cuda_graph),
                            device, warmup=False)
            how = ", CUDA graphs" if cuda_graph else ""
            print(f"  sample_fast 40/1/5{how}, batch {batch:>3}: {batch / seconds:7.2f} images/s "
                  f"({seconds:.1f} s)", flush=True)


@torch.inference_mode()
def bench_classification(device, val, model, model_name, rounds):
    """val: the validation split; model: the classifier whose predictions bf16 may change, named
    model_name in the output; rounds: see `interleaved`."""

    scores = {}

    def course_pattern():
        """One pass per class per batch of 32, a Python loop over images in the loss."""
        nll = torch.zeros(len(val.images), val.num_classes)                 # (N, classes)
        for s in range(0, len(val.images), 32):
            x = val.images[s:s + 32].to(device)
            for c in range(val.num_classes):
                out = model(x, torch.full((x.shape[0],), c, device=device))
                for i in range(x.shape[0]):
                    nll[s + i, c] = discretized_mix_logistic_loss(x[i:i + 1], out[i:i + 1]).item()
        scores["course"] = -nll

    def batched(precision, autocast, **kwargs):
        """dataset_log_likelihoods, keeping its scores for the comparisons below."""
        scores[precision] = dataset_log_likelihoods(model, val.images, val.num_classes,
                                                    device=device, autocast=autocast, **kwargs)

    paths = {"course": course_pattern,
             "fp32": lambda: batched("fp32", bf16_autocast(device, False))}
    if bf16_pays(device):
        paths["bf16"] = lambda: batched("bf16", bf16_autocast(device))
        paths["bf16 without recheck"] = lambda: batched("bf16 without recheck",
                                                        bf16_autocast(device), recheck=0)
    seconds = interleaved(paths, device, rounds)
    slow = seconds["course"]
    size = "/".join(str(model.config[k]) for k in ("nr_filters", "nr_resnet", "nr_logistic_mix"))
    report(f"classify {len(val.images)} validation images, {size}", slow, seconds["fp32"], device)
    if bf16_pays(device):
        report(f"  the same under bf16 autocast ({amp_recheck_nats(device):g}-nat recheck)", slow,
               seconds["bf16"], device)
        report("  the same, bf16 without the float32 recheck", slow,
               seconds["bf16 without recheck"], device)
        move = scores["bf16 without recheck"] - scores["fp32"]                     # (N, classes)
        gap_move = (move[:, :, None] - move[:, None, :]).abs().max().item()
        print(f"  bf16 moves the gap between two classes' log p(x|c) by up to {gap_move:.1f} nats",
              flush=True)
    else:
        print(f"  bf16 autocast skipped: {NO_BF16}", flush=True)
    bench_pass_work(device, model, val.images, val.num_classes)
    # The predictions of the Bayes classifier, the model's class prior added to each path's scores.
    course = bayes_predictions(model, scores["course"])                          # (N,)
    for precision in sorted(scores.keys() - {"course"}):
        changed = (bayes_predictions(model, scores[precision]) != course).sum().item()
        print(f"  {precision} changes {changed} of {len(val.images)} predictions of the course "
              f"pattern ({model_name})", flush=True)


@torch.inference_mode()
def bench_pass_work(device, model, images, num_classes):
    """What one classification pass costs: its GFLOP (8 images under every class; the layers
    before the label enters run once per image), and the time of one upsampling layer as the
    transposed convolution (`reference_forward`) against its matrix-product forward (which the
    layer's forward takes on a CPU only)."""
    x = images[:8].to(device)
    # FlopCounterMode fails on weight-normalised layers under inference mode (the parametrized
    # weight cannot be computed there); no_grad is enough for counting.
    with torch.inference_mode(False), torch.no_grad(), FlopCounterMode(display=False) as flops:
        class_log_likelihoods(model, x, num_classes)
    print(f"  one pass of 8 images x {num_classes} classes: {flops.get_total_flops() / 1e9:.1f} "
          f"GFLOP ({model.config['fusion']} fusion)", flush=True)
    deconv = model.upsize_u[0]
    h = torch.randn(8 * num_classes, model.config["nr_filters"], 16, 16, device=device)
    precisions = {"fp32": bf16_autocast(device, False)}
    if bf16_pays(device):
        precisions["bf16"] = bf16_autocast(device)
    for precision, autocast in precisions.items():
        with autocast():
            slow = timed(lambda: deconv.reference_forward(h), device, repeat=20)
            fast = timed(lambda: deconv.matrix_product_forward(h), device, repeat=20)
        report(f"  deconvolution {tuple(h.shape)}, {precision}", slow * 1e3, fast * 1e3, device,
               unit="ms")


def bench_training(device, steps):
    torch.manual_seed(0)
    x = torch.rand(32, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 4, (32,), device=device)
    results = {}
    modes = ("fp32 eager", "bf16 eager", "bf16 compile") if bf16_pays(device) else ("fp32 eager",)
    if not bf16_pays(device):
        print(f"  bf16 training skipped: {NO_BF16}", flush=True)
    elif device.type == "cpu":
        modes = modes + ("bf16 F.dropout",)
    for mode in modes:
        model = PixelCNN(**SIZES["40/1/5"], dropout=0.5).to(device)
        if "F.dropout" in mode:
            for block in model.modules():
                if isinstance(block, GatedResNet):
                    block.dropout = nn.Dropout(block.dropout.p)
        forward = torch.compile(model) if "compile" in mode else model
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        autocast = bf16_autocast(device, "bf16" in mode)

        def step():
            with autocast():
                loss = discretized_mix_logistic_loss(x, forward(x, y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        start = time.perf_counter()
        step()                                        # compiles, for torch.compile
        sync(device)
        warmup = time.perf_counter() - start
        results[mode] = 32 / timed(step, device, repeat=steps)
        print(f"  train step {mode:<12} {results[mode]:8.1f} images/s  (first step {warmup:.1f} s)",
              flush=True)
    for mode in ("bf16 eager", "bf16 compile"):
        if mode in results:
            report(f"train 40/1/5, batch 32, fp32 eager vs {mode}", 1 / results["fp32 eager"],
                   1 / results[mode], device, unit="s/img")
    if "bf16 F.dropout" in results:
        report("train 40/1/5, batch 32, bf16 eager: nn.Dropout vs layers.Dropout",
               1 / results["bf16 F.dropout"], 1 / results["bf16 eager"], device, unit="s/img")


def bench_guarded_step(device, rounds):
    """The training step as pcnn_train.py runs it (training.GuardedStep: forward, loss, backward,
    clip, fused Adam, EMA, spike guard) at a preset's model, bf16 where it pays: eager at the
    preset's batch, and on CUDA also captured in a CUDA graph at that batch and at twice and four
    times it. The modes run in turn, `rounds` timed calls of STEPS_PER_CALL steps each, the
    fastest counting. (Not torch.compile: compiling the GPU preset's whole model takes minutes.)"""
    preset = PRESETS["gpu" if device.type == "cuda" else "cpu"]
    batch = preset["batch_size"]
    modes = {f"eager, batch {batch}": (False, batch)}
    if device.type == "cuda":
        modes |= {f"graph, batch {b}": (True, b) for b in (batch, 2 * batch, 4 * batch)}
    torch.manual_seed(0)
    model = PixelCNN(nr_resnet=preset["nr_resnet"], nr_filters=preset["nr_filters"],
                     nr_logistic_mix=preset["nr_logistic_mix"], fusion=preset["fusion"],
                     dropout=preset["dropout"]).to(device)
    steps = {}
    for mode, (graph, b) in modes.items():
        x = torch.rand(b, 3, 32, 32, device=device) * 2 - 1
        y = torch.randint(0, 4, (b,), device=device)
        # A model of its own: the eager step frees the gradients a captured graph writes.
        step = standalone_step(copy.deepcopy(model), preset["lr"], preset["ema"], cuda_graph=graph,
                               autocast=bf16_autocast(device, bf16_pays(device),
                                                      cache_enabled=not graph))
        start = time.perf_counter()
        for _ in range(GRAPH_WARMUP_STEPS + 1):      # eager warm-up, then the capture
            step(x, y, 1e-9, 0.0)
        step.readback()
        print(f"  {mode}: first {GRAPH_WARMUP_STEPS + 1} steps {time.perf_counter() - start:.1f} s",
              flush=True)

        def call(step=step, x=x, y=y):
            for _ in range(STEPS_PER_CALL):
                step(x, y, 1e-9, 0.0)
            step.readback()
        steps[mode] = (call, b)
    seconds = interleaved({mode: call for mode, (call, _) in steps.items()}, device, rounds)
    size = f"{preset['nr_filters']}/{preset['nr_resnet']}/{preset['nr_logistic_mix']}"
    for mode, s in seconds.items():
        print(f"  guarded step {size}, {mode}: {steps[mode][1] * STEPS_PER_CALL / s:8.1f} images/s",
              flush=True)
    eager = next(iter(seconds))
    for mode in list(seconds)[1:]:
        report(f"train {size}, images/s of {eager} vs {mode}", seconds[eager] / batch,
               seconds[mode] / steps[mode][1], device, unit="s/img")


def bench_adam(device, rounds):
    """Adam's step on the CPU preset's tensors: the loop over them against make_optimizer's."""
    preset = PRESETS["cpu"]
    model = PixelCNN(nr_resnet=preset["nr_resnet"], nr_filters=preset["nr_filters"],
                     nr_logistic_mix=preset["nr_logistic_mix"], fusion=preset["fusion"]).to(device)
    optimizer = make_optimizer(model.parameters(), 2e-4, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    loop = torch.optim.Adam(model.parameters(), lr=2e-4, foreach=False)
    n = 20                                                 # steps per timed call
    seconds = interleaved({"loop": lambda: [loop.step() for _ in range(n)],
                           "fast": lambda: [optimizer.step() for _ in range(n)]}, device, rounds)
    tensors, fused = len(list(model.parameters())), optimizer.defaults["fused"]
    report(f"Adam step on {tensors} tensors, loop vs fused={fused}", seconds["loop"] / n * 1e3,
           seconds["fast"] / n * 1e3, device, unit="ms")


def main(args):
    device = pick_device(args.device)
    sections = ("sampling", "classification", "training") if args.only is None else (args.only,)
    if "classification" in sections:   # bad input fails here, not after minutes of sampling
        trained = Path(args.checkpoint).is_file()
        try:
            val = load_dataset("cpen455", args.data_dir, "validation")
            model = (load_model(args.checkpoint, device) if trained
                     else PixelCNN(**SIZES["40/1/5"]).to(device).eval())
        except (DatasetError, ValueError) as err:
            sys.exit(f"error: {err}")
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "sampling" in sections:
        bench_sampling(device, args.slow_pixels, args.rows)
    if "classification" in sections:
        bench_classification(device, val, model, args.checkpoint if trained else "random weights",
                             args.rounds)
    if "training" in sections:
        bench_training(device, args.train_steps)
        bench_guarded_step(device, args.train_steps)
        bench_adam(device, args.train_steps)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="cpu",
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--only", choices=("sampling", "classification", "training"), default=None,
                   help="run one section")
    p.add_argument("-i", "--data_dir", default="data",
                   help="folder holding the CPEN455 dataset (the classification section reads "
                        "its validation split)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="model for the classification section; random weights when missing")
    p.add_argument("--slow_pixels", type=int, default=2,
                   help="full forward passes timed for the straightforward sampler")
    p.add_argument("--rows", type=int, default=4,
                   help="rows sampled by the fast sampler for its estimate (a multiple of 4)")
    p.add_argument("--train_steps", type=int, default=5, help="timed training steps per mode")
    p.add_argument("--rounds", type=int, default=3,
                   help="classification: rounds of every path in turn; each path's fastest "
                        "round counts (the first is the warm-up)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds needs at least 1, got {args.rounds}")
    main(args)
