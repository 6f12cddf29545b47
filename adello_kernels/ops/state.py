"""The prior update of an `ADELLOLoss` step in plain PyTorch (docs/method.md, Prior update).

The fused backends do this update inside their step op (adello::flexda_step's epilogue,
ops/step.py); these functions are what the reference backend uses, and what every backend uses
when the batch prior is first all-reduced across ranks (the op then runs with update=False).

    momentum_update(Q, prior_batch, m) -> (Q_t, ok)
        Q_t = m Q + (1 - m) prior_batch, or Q itself when prior_batch has a non-finite entry.
    update_prior_(Q!, step!, skipped_updates!, prior_batch, m, has_rows=None)
        Q <- Q_t in place; skipped_updates += 1 when the update was skipped; step += 1. With
        `has_rows` (a 0-d bool: the batch had a row of positive prior weight) False, only
        step += 1: nothing to estimate from, nothing counted.
All decided on the device (no host sync).
"""
from __future__ import annotations

import torch


def momentum_update(prior_ulb: torch.Tensor, prior_batch: torch.Tensor, momentum: float):
    """(Q_t, ok): m Q + (1 - m) prior_batch, or Q itself when prior_batch is not finite."""
    ok = torch.isfinite(prior_batch).all()
    new = momentum * prior_ulb + (1.0 - momentum) * prior_batch.to(prior_ulb.dtype)
    return torch.where(ok, new, prior_ulb), ok


def update_prior_(prior_ulb: torch.Tensor, step: torch.Tensor, skipped_updates: torch.Tensor,
                  prior_batch: torch.Tensor, momentum: float,
                  has_rows: torch.Tensor | None = None) -> None:
    """The epilogue of a step in place: Q <- momentum_update(...), skipped count, step += 1."""
    new, ok = momentum_update(prior_ulb, prior_batch, momentum)
    if has_rows is not None:
        new = torch.where(has_rows, new, prior_ulb)
        ok = ok | ~has_rows
    prior_ulb.copy_(new)
    skipped_updates.add_((~ok).to(skipped_updates.dtype))
    step.add_(1)
