"""The O(C) prologue and epilogue of an `ADELLOLoss` step as two ops, so that a fused step is a
handful of calls instead of ~35 small tensor ops (which cost more than the fused kernel itself at
CIFAR shapes on a CPU).

    adello_prepare(prior_lb, prior_ulb, step, temperature, ...) -> (adj_lb, adj_ulb, hparams)
        alpha_t from the step, then ds, du (SPEC.md section 1) and the fused op's hparams
        (lambda_u, lambda_d, [step >= distill_start], T), in `dtype`.
    adello_update_(prior_ulb!, step!, skipped_updates!, prior_batch, momentum) -> ()
        Q <- m Q + (1 - m) prior_batch unless prior_batch has a non-finite entry (then
        skipped_updates += 1); step += 1. In place, decided on the device.

Kernels: C++ for CPU (csrc/cpu/adello_{prepare,update}_cpu.cpp); the PyTorch implementations
below run everywhere else (registered explicitly for CUDA, and as the default).
"""
from __future__ import annotations

import torch

from ..reference import alpha_schedule, logit_adjustments


def _prepare_torch(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power,
                   distill_start, lambda_u, lambda_d, eps, flexda, dtype):
    if flexda:
        alpha = alpha_schedule(step, total_steps, alpha_min, power)
        ds, du = logit_adjustments(prior_lb, prior_ulb, alpha, eps, dtype=torch.float64)
        ds, du = ds.to(dtype), du.to(dtype)
    else:
        ds = torch.zeros(prior_ulb.shape, dtype=dtype, device=prior_ulb.device)
        du = torch.zeros_like(ds)
    # torch.full launches a fill; torch.tensor([...], device=cuda) would be a host-to-device copy
    # (a sync, and not capturable in a CUDA graph).
    full = dict(dtype=dtype, device=prior_ulb.device)
    hparams = torch.cat([torch.full((1,), lambda_u, **full), torch.full((1,), lambda_d, **full),
                         (step >= distill_start).to(dtype).reshape(1),
                         temperature.to(dtype).reshape(1)])
    return ds, du, hparams


@torch.library.custom_op("adello::adello_prepare", mutates_args=())
def adello_prepare(prior_lb: torch.Tensor, prior_ulb: torch.Tensor, step: torch.Tensor,
                   temperature: torch.Tensor, total_steps: int, alpha_min: float, power: float,
                   distill_start: int, lambda_u: float, lambda_d: float, eps: float,
                   flexda: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """Returns (adj_lb [C], adj_ulb [C], hparams [4]) in `dtype` for the step held in `step`."""
    return _prepare_torch(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power,
                          distill_start, lambda_u, lambda_d, eps, flexda, dtype)


@adello_prepare.register_fake
def _(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power, distill_start,
      lambda_u, lambda_d, eps, flexda, dtype):
    c = prior_ulb.shape[0]
    new = prior_ulb.new_empty
    return new((c,), dtype=dtype), new((c,), dtype=dtype), new((4,), dtype=dtype)


@torch.library.custom_op("adello::adello_update_",
                         mutates_args=("prior_ulb", "step", "skipped_updates"))
def adello_update_(prior_ulb: torch.Tensor, step: torch.Tensor, skipped_updates: torch.Tensor,
                   prior_batch: torch.Tensor, momentum: float) -> None:
    """The prior's momentum update with the non-finite guard, then step += 1 (all in place)."""
    update_prior_(prior_ulb, step, skipped_updates, prior_batch, momentum)


def update_prior_(prior_ulb, step, skipped_updates, prior_batch, momentum):
    """`adello_update_` in plain PyTorch (the reference path and non-CPU devices)."""
    ok = torch.isfinite(prior_batch).all()
    new = momentum * prior_ulb + (1.0 - momentum) * prior_batch.to(prior_ulb.dtype)
    prior_ulb.copy_(torch.where(ok, new, prior_ulb))
    skipped_updates.add_((~ok).to(skipped_updates.dtype))
    step.add_(1)


@adello_update_.register_fake
def _(prior_ulb, step, skipped_updates, prior_batch, momentum):
    return None


# An explicit CUDA-key kernel for each op (custom_op's default registration is the composite key).
adello_prepare.register_kernel("cuda")(_prepare_torch)
adello_update_.register_kernel("cuda")(update_prior_)
