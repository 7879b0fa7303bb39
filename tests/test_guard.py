"""The guarded training step (training.GuardedStep) on the CPU: without spikes it is the plain
step (forward, loss, backward, clip, Adam, EMA) computed the straightforward way; a spiking or
non-finite loss moves nothing; a run of them rolls back to the last good state."""

import copy

import torch

import training
from model import PixelCNN
from training import GUARD_WARMUP_STEPS, SNAPSHOT_STEPS, Snapshots, make_optimizer, \
    standalone_step
from utils import discretized_mix_logistic_loss

LR, EMA_DECAY, CLIP = 2e-3, 0.9, 1.0


def tiny():
    torch.manual_seed(0)
    return PixelCNN(nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0)


def batch(seed):
    """(x, y): 4 smooth 8x8 images, a gradient and a level per image."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.5, 0.5, 8)
    x = (ramp[None, None, :, None] * torch.rand(4, 3, 1, 1, generator=g)
         + 0.2 * torch.rand(4, 1, 1, 1, generator=g)).expand(4, 3, 8, 8).contiguous()
    return x, torch.arange(4)


NAN_BATCH = (torch.full((4, 3, 8, 8), float("nan")), torch.arange(4))


def spiking_loss(monkeypatch, factor):
    """Make the step's loss `factor` times what it is (a spike that no data need produce)."""
    real = training.discretized_mix_logistic_loss
    monkeypatch.setattr(training, "discretized_mix_logistic_loss",
                        lambda x, l, reduction="sum": factor * real(x, l, reduction))


def state_of(step):
    """Copies of everything a step may change."""
    return [t.clone() for t in step.tensors()]


def assert_same(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


def test_guarded_step_is_the_plain_step_when_nothing_spikes():
    """Six steps of GuardedStep against the step written out: same weights, Adam moments and EMA
    to float rounding (the fused kernel reads the rate from a tensor; the EMA is a foreach lerp)."""
    model, reference = tiny(), tiny()
    step = standalone_step(model, LR, EMA_DECAY, grad_clip=CLIP)
    adam = make_optimizer(reference.parameters(), LR, torch.device("cpu"))
    ema = {k: v.clone() for k, v in reference.state_dict().items() if torch.is_tensor(v)}
    for i in range(6):
        x, y = batch(i)
        step(x, y, LR, step.run.ema.weight(i))
        loss = discretized_mix_logistic_loss(x, reference(x, y)) / x.numel()
        adam.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        adam.step()
        decay = min(EMA_DECAY, (1 + i) / (10 + i))
        for k, v in reference.state_dict().items():
            if k in ema:
                ema[k] = decay * ema[k] + (1 - decay) * v
    rows = step.readback()
    assert len(rows) == 6 and not any(r[3] for r in rows)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)   # Adam amplifies rounding
    for k, v in step.run.ema.state.items():
        torch.testing.assert_close(v, ema[k], rtol=1e-4, atol=1e-5)


def warmed_step():
    """A GuardedStep past the guard's warm-up on the smooth batches."""
    step = standalone_step(tiny(), LR, EMA_DECAY)
    for i in range(GUARD_WARMUP_STEPS + 5):
        step(*batch(i % 4), LR, 0.1)
    assert not any(r[3] for r in step.readback())
    return step


def test_a_spike_and_a_nonfinite_loss_move_nothing(monkeypatch):
    step = warmed_step()
    for bad in ("spike", "nan"):
        before = state_of(step)
        with monkeypatch.context() as m:
            if bad == "spike":
                spiking_loss(m, 3.0)
                step(*batch(0), LR, 0.1)
            else:
                step(*NAN_BATCH, LR, 0.1)
        (row,) = step.readback()
        assert row[3] == 1.0, (bad, row)                  # skipped
        after = state_of(step)
        # Everything but the guard's count of skips in a row is as it was.
        in_a_row = len(after) - 1
        assert_same(before[:in_a_row], after[:in_a_row])
    assert row[4] == 2.0                                  # two in a row
    step(*batch(1), LR, 0.1)
    (row,) = step.readback()
    assert row[3] == 0.0 and row[4] == 0.0


def test_the_guard_judges_nothing_before_its_warm_up_or_when_off(monkeypatch):
    step = standalone_step(tiny(), LR)
    off = warmed_step()
    off.run.args.spike_sigmas = 0
    step(*batch(0), LR, 0.0)
    spiking_loss(monkeypatch, 3.0)
    step(*batch(0), LR, 0.0)                               # the second step: no statistics yet
    off(*batch(0), LR, 0.0)
    assert not any(r[3] for r in step.readback() + off.readback())


def test_rollback_returns_to_a_state_followed_by_clean_steps():
    """Snapshots: the copy taken at step s becomes the good state once SNAPSHOT_STEPS clean steps
    followed it; restore() copies it back in place (the step's own tensors, as a CUDA graph
    needs) and returns s."""
    step = warmed_step()
    snapshots = Snapshots(step)
    snapshots.observe(0, skipped=False)                         # pending copy at step 0
    at_0 = state_of(step)
    step(*batch(2), LR, 0.1)
    snapshots.observe(SNAPSHOT_STEPS, skipped=False)            # step 0's copy is now good
    at_s = copy.deepcopy(state_of(step))
    tensors = step.tensors()
    for _ in range(3):
        step(torch.full((4, 3, 8, 8), float("nan")), torch.arange(4), LR, 0.1)
    assert step.readback()[-1][4] == 3.0
    assert snapshots.restore() == 0
    assert [t.data_ptr() for t in tensors] == [t.data_ptr() for t in step.tensors()]
    assert_same(state_of(step), at_0)
    assert any(not torch.equal(a, b) for a, b in zip(at_s, at_0))


def test_a_finite_loss_with_nonfinite_gradients_moves_nothing():
    """A bf16 overflow can leave the loss finite and a gradient infinite: the gradient norm tells
    it, and the step is skipped (clipping would have spread NaN into every weight)."""
    step = warmed_step()
    param = next(step.run.model.parameters())
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    before = state_of(step)
    step(*batch(0), LR, 0.1)
    hook.remove()
    (row,) = step.readback()
    assert row[3] == 1.0 and all(map(lambda v: v == v, row[:3]))   # skipped; the loss finite
    after = state_of(step)
    assert_same(before[:-1], after[:-1])
