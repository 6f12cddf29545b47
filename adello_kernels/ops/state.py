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


# Defined with the low-level Library API rather than torch.library.custom_op: the latter adds
# Python kernels at the Autograd / ADInplaceOrView keys (~25 us a call), as much as the work.
_lib = torch.library.Library("adello", "FRAGMENT")  # noqa: kept alive for the process
_lib.define("adello_prepare(Tensor prior_lb, Tensor prior_ulb, Tensor step, Tensor temperature, "
            "int total_steps, float alpha_min, float power, int distill_start, float lambda_u, "
            "float lambda_d, float eps, bool flexda, ScalarType dtype) -> "
            "(Tensor adj_lb, Tensor adj_ulb, Tensor hparams)")
_lib.define("adello_update_(Tensor(a!) prior_ulb, Tensor(b!) step, Tensor(c!) skipped_updates, "
            "Tensor prior_batch, float momentum) -> ()")
adello_prepare = torch.ops.adello.adello_prepare.default
adello_update_ = torch.ops.adello.adello_update_.default


def momentum_update(prior_ulb, prior_batch, momentum):
    """(Q_t, ok): m Q + (1 - m) prior_batch, or Q itself when prior_batch is not finite."""
    ok = torch.isfinite(prior_batch).all()
    new = momentum * prior_ulb + (1.0 - momentum) * prior_batch.to(prior_ulb.dtype)
    return torch.where(ok, new, prior_ulb), ok


def update_prior_(prior_ulb, step, skipped_updates, prior_batch, momentum):
    """`adello_update_` in plain PyTorch (the reference path and non-CPU devices)."""
    new, ok = momentum_update(prior_ulb, prior_batch, momentum)
    prior_ulb.copy_(new)
    skipped_updates.add_((~ok).to(skipped_updates.dtype))
    step.add_(1)


@torch.library.register_fake("adello::adello_prepare")
def _(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power, distill_start,
      lambda_u, lambda_d, eps, flexda, dtype):
    c = prior_ulb.shape[0]
    new = prior_ulb.new_empty
    return new((c,), dtype=dtype), new((c,), dtype=dtype), new((4,), dtype=dtype)


@torch.library.register_fake("adello::adello_update_")
def _(prior_ulb, step, skipped_updates, prior_batch, momentum):
    return None


# The PyTorch kernels: CUDA always (an explicit CUDA-key kernel); CPU only when the C++ ones are
# not built (backends._load_extension registers them then).
_lib.impl("adello_prepare", _prepare_torch, "CUDA")
_lib.impl("adello_update_", update_prior_, "CUDA")


def register_cpu_fallbacks() -> None:
    """Register the PyTorch kernels for CPU (call when adello_kernels._C is unavailable)."""
    _lib.impl("adello_prepare", _prepare_torch, "CPU")
    _lib.impl("adello_update_", update_prior_, "CPU")
