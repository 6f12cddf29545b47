"""The gradient noise scale B_simple = tr(S) / |G|^2 of a run at its current weights (McCandlish,
Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"), measured with the
driver's own batches, augmentations and loss (benchmarks/noise_scale.py prints it along a run).

G is the expected gradient of the training loss per labeled image's share of a step (L_s + L_u
+ L_d of ADELLOLoss; weight decay excluded), S the covariance of one image's gradient. A batch of
B has E|g_B|^2 = |G|^2 + tr(S) / B, so two batch sizes give both (their Appendix A):

    |G|^2 ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(S) ~ (|g_small|^2 - |g_big|^2) / (1 / B_small - 1 / B_big)

with B_small = the run's B and B_big = k B the mean of k independent batches of B (BatchNorm in
ghost batches of B, as under --grad-accum k). Both are unbiased; their ratio is taken after
averaging each over the draws. In that model a step at batch B makes 1 / (1 + B_noise / B) of
a noiseless step's progress: B << B_simple is the linear-scaling regime (a batch kappa times
larger with kappa times the lr does the work of kappa steps), B >> B_simple is step-limited.
"""
from __future__ import annotations

import copy
import math

import torch


def estimate(sq_small: float, sq_big: float, b_small: int, b_big: int) -> dict:
    """|G|^2, tr(S) and B_simple from the mean squared gradient norms at two batch sizes.

    sq_small: mean of |g|^2 over batches of b_small; sq_big: the same for b_big > b_small.
    B_simple is inf when the |G|^2 estimate is not positive (noise-dominated: too few draws)."""
    if not (isinstance(b_small, int) and isinstance(b_big, int) and 0 < b_small < b_big):
        raise ValueError(f"b_small, b_big: expected integers 0 < b_small < b_big, got "
                         f"{b_small!r}, {b_big!r}")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return {"g2": g2, "trace": trace, "b_simple": trace / g2 if g2 > 0 else math.inf}


def step_efficiency(b: int, b_noise: float) -> float:
    """Progress of one step at batch b relative to a noiseless step: 1 / (1 + b_noise / b)."""
    return 1.0 / (1.0 + b_noise / b)


def sample_efficiency(b: int, b_ref: int, b_noise: float) -> float:
    """Progress per sample of batch b relative to batch b_ref: (1 + b_ref/Bn) / (1 + b/Bn)."""
    if math.isinf(b_noise):
        return 1.0
    return (1.0 + b_ref / b_noise) / (1.0 + b / b_noise)


def _grad(tr, params: list[torch.Tensor]) -> torch.Tensor:
    """Flattened float64 loss gradient of one freshly drawn batch of the run's B (criterion
    called with update=False; the caller restores everything the draw and forward touch)."""
    run = tr.runner
    args = run.micro_slices(run.draw(), 0)
    loss, _ = run._micro(*args, False)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def measure(tr, k: int = 8, draws: int = 4) -> dict:
    """estimate() at the trainer's current weights from `draws` x `k` fresh batches of B.

    `tr` is a one-process `Trainer` with --grad-accum 1. The model (BatchNorm statistics),
    criterion state, generators and samplers are restored afterwards, so training continues
    exactly as if nothing had been measured."""
    if tr.runner.k != 1 or tr.dist.active:
        raise ValueError("measure: needs a one-process trainer without --grad-accum")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k: expected an integer >= 2, got {k!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws: expected an integer >= 1, got {draws!r}")
    saved = (copy.deepcopy(tr.model.state_dict()),
             copy.deepcopy(tr.crit.state_dict()) if tr.crit is not None else None,
             tr.gen_data.get_state(), tr.gen_aug.get_state(),
             tr.lb_sampler.state_dict(), tr.ulb_sampler.state_dict())
    params = [p for p in tr.model.parameters() if p.requires_grad]
    small = big = 0.0
    try:
        for _ in range(draws):
            gs = torch.stack([_grad(tr, params) for _ in range(k)])
            small += float((gs * gs).sum()) / k
            mean = gs.mean(0)
            big += float(mean.dot(mean))
    finally:
        tr.model.load_state_dict(saved[0])
        if saved[1] is not None:
            tr.crit.load_state_dict(saved[1])
        tr.gen_data.set_state(saved[2])
        tr.gen_aug.set_state(saved[3])
        tr.lb_sampler.load_state_dict(saved[4])
        tr.ulb_sampler.load_state_dict(saved[5])
    return estimate(small / draws, big / draws, tr.b, k * tr.b)
