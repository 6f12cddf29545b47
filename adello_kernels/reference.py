"""Pure-PyTorch reference of one ADELLO step: the oracle every fused kernel is tested against.

Written for clarity, not speed: each line is an equation of docs/method.md, and autograd gives
the gradients of its Gradients section. It runs on any device and in any float dtype; bf16/fp16
logits are upcast to fp32 (the numerics contract: accumulate in fp32), fp64 stays fp64, so
calling it on float64 copies of the inputs gives the exact answer the kernels are compared with.

Notation (docs/method.md, Notation):
    z_l [B, C], y [B]       labeled logits and labels
    z_w [N, C], z_s [N, C]  weak- and strong-view logits of the same N unlabeled images
    P_L [C], Q [C]          labeled prior (fixed) and running unlabeled-prior estimate
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .ops.flexda import HP_GATE, HP_LAMBDA_D, HP_LAMBDA_U, HP_PRIOR_EM, HP_TEMPERATURE

Scalar = Union[float, int, bool, torch.Tensor]


class FlexDAOutput(NamedTuple):
    """What one ADELLO step returns (docs/contract.md, Public API).

    loss          0-d fp32, differentiable w.r.t. logits_lb and logits_ulb_s
    loss_sup      0-d fp32, detached: L_s
    loss_unsup    0-d fp32, detached: L_u (unweighted)
    loss_distill  0-d fp32, detached: L_d (unweighted; 0 when distillation is off)
    mask          [N] fp32 of 0/1: max weak probability >= threshold
    pseudo_labels [N] int64: first-index argmax of the weak probabilities
    prior_batch   [C] fp32: mean over the N rows of softmax(logits_ulb_w) (prior_estimator
                  "raw"), or of softmax(logits_ulb_w + du) ("em"); with prior_weight w the
                  w-weighted mean (rows of weight 0 left out; NaN when every weight is 0)
    (fp64 in place of fp32 when the logits are fp64.)
    """

    loss: torch.Tensor
    loss_sup: torch.Tensor
    loss_unsup: torch.Tensor
    loss_distill: torch.Tensor
    mask: torch.Tensor
    pseudo_labels: torch.Tensor
    prior_batch: torch.Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def alpha_schedule(step, total_steps: int, alpha_min: float = 0.1, power: float = 2.0,
                   epoch_steps: int = 1):
    """Progressive exponent alpha_t = 1 - (1 - alpha_min) * (u / U) ** power, with
    u = floor(t / n) and U = floor(T_max / n) for n = `epoch_steps` (docs/method.md, Alpha
    schedule): n = 1 is the per-step schedule u / U = t / T_max; n = the iterations per epoch is
    the released `adello_alpha_from_epoch=True` schedule, constant within an epoch.

    `step` may be a Python number (returns a float) or a tensor (returns a tensor on its device,
    no host sync). u / U is clamped to [0, 1], so training past T_max keeps alpha_min.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if epoch_steps < 1 or epoch_steps > total_steps:
        raise ValueError(f"epoch_steps must lie in [1, total_steps = {total_steps}], got "
                         f"{epoch_steps}")
    epochs = total_steps // epoch_steps
    if isinstance(step, torch.Tensor):
        u = step if epoch_steps == 1 else torch.div(step, epoch_steps, rounding_mode="floor")
        frac = (u.to(torch.float64) / epochs).clamp(0.0, 1.0)
        return 1.0 - (1.0 - alpha_min) * frac.pow(power)
    u = float(step) if epoch_steps == 1 else float(math.floor(float(step) / epoch_steps))
    frac = min(max(u / epochs, 0.0), 1.0)
    return 1.0 - (1.0 - alpha_min) * frac**power


def logit_adjustments(prior_lb: torch.Tensor, prior_ulb: torch.Tensor, alpha: Scalar,
                      eps: float = 1e-9, dtype: torch.dtype = torch.float64,
                      prior_target: Optional[torch.Tensor] = None):
    """The two [C] adjustment vectors of one step, computed in `dtype` from the prior before
    this step's update (Q_{t-1}):

        Qa = R**alpha / sum(R**alpha)                 the flexible target prior
        ds = log(P_L + eps) - log(Qa + eps)           added to the labeled logits
        du = log(Q + eps)   - log(Qa + eps)           added to the strong-view logits

    R is the prior the target is flattened from: Q itself (the default, the released "adello"
    mode), or a fixed `prior_target` (e.g. the ground-truth unlabeled prior: the released
    "adello_gt" mode; Q stays the numerator of du). R**alpha follows torch.pow: 0**0 = 1, so
    alpha = 0 gives the uniform target even where R has zero entries.
    """
    p_l = prior_lb.to(dtype)
    q = prior_ulb.to(dtype)
    r = q if prior_target is None else prior_target.to(device=q.device, dtype=dtype)
    a = alpha.to(device=q.device, dtype=dtype) if isinstance(alpha, torch.Tensor) else float(alpha)
    q_alpha = r.pow(a)
    qa = q_alpha / q_alpha.sum()
    log_qa = torch.log(qa + eps)
    ds = torch.log(p_l + eps) - log_qa
    du = torch.log(q + eps) - log_qa
    return ds, du


def adjustments(prior_lb: torch.Tensor, prior_ulb: torch.Tensor, alpha: Scalar, eps: float,
                dtype: torch.dtype, prior_target: Optional[torch.Tensor] = None):
    """(ds, du) as every path of the project builds them (docs/contract.md, Precision): computed
    in float64 from the priors, then rounded once to `dtype` (the accumulate dtype)."""
    ds, du = logit_adjustments(prior_lb, prior_ulb, alpha, eps, dtype=torch.float64,
                               prior_target=prior_target)
    return ds.to(dtype), du.to(dtype)


def _safe_labels(labels: torch.Tensor, num_classes: int):
    """(labels with out-of-range entries replaced by 0, [B] bool: label in [0, C))."""
    valid = (labels >= 0) & (labels < num_classes)
    return torch.where(valid, labels, torch.zeros_like(labels)), valid


def _as_tensor(x: Scalar, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(x), device=like.device, dtype=like.dtype)


def flexda_reference(logits_lb: torch.Tensor, labels_lb: torch.Tensor,
                     logits_ulb_w: torch.Tensor, logits_ulb_s: torch.Tensor,
                     prior_lb: torch.Tensor, prior_ulb: torch.Tensor, alpha: Scalar, *,
                     threshold: float = 0.95, lambda_u: float = 1.0, lambda_d: float = 1.0,
                     distill: Scalar = True, temperature: Scalar = 1.0,
                     eps: float = 1e-9, prior_estimator: str = "raw",
                     prior_target: Optional[torch.Tensor] = None,
                     prior_weight: Optional[torch.Tensor] = None,
                     distill_all: bool = False) -> FlexDAOutput:
    """One ADELLO step in plain PyTorch (no input validation: see `flexda_loss`).

    Args: as `adello_kernels.flexda_loss`. Returns a `FlexDAOutput` whose `loss` is
    differentiable through autograd w.r.t. logits_lb and logits_ulb_s (never logits_ulb_w).
    """
    acc = accumulate_dtype(logits_lb.dtype)
    z_l = logits_lb.to(acc)
    z_w = logits_ulb_w.detach().to(acc)            # stop-gradient on the weak view
    z_s = logits_ulb_s.to(acc)
    ds, du = adjustments(prior_lb, prior_ulb, alpha, eps, acc, prior_target)

    # Supervised loss, generalised logit adjustment: L_s = mean_b CE(y_b, softmax(z_l[b] + ds)).
    x = z_l + ds
    safe, valid = _safe_labels(labels_lb, x.shape[1])
    ce = F.cross_entropy(x, safe, reduction="none")
    # A label outside [0, C) (validation off): that row's CE is NaN and so is its gradient row
    # (x.sum * NaN has a NaN derivative for every logit), the chosen behaviour of every backend.
    # (x * 0 elsewhere, so valid rows keep their value and gradient.)
    nan_rows = torch.where(valid, 0.0, float("nan")).to(x.dtype)
    ce = torch.where(valid, ce, 0.0) + (x * nan_rows[:, None]).sum(-1)
    loss_sup = ce.mean()

    # Weak view, raw logits: pw = softmax(z_w); M = [max pw >= tau] (inclusive, on the probability
    # in the accumulate dtype); yhat = argmax pw (torch.max returns the first index on ties).
    pw = torch.softmax(z_w, dim=-1)
    max_pw, pseudo_labels = pw.max(dim=-1)
    mask = (max_pw >= threshold).to(acc)

    # Strong view, adjusted: a = z_s + du.
    # L_u = (1/N) sum_i M_i CE(yhat_i, softmax(a_i))   (divided by N, not by sum M)
    a = z_s + du
    loss_unsup = (F.cross_entropy(a, pseudo_labels, reduction="none") * mask).mean()

    # Distillation on the low-confidence rows, soft targets q = softmax(z_w / T) (no gradient):
    # L_d = (1/N) sum_i (1 - M_i) H(q_i, softmax(a_i / T)),  H(q, p) = -sum_c q_c log p_c, no T**2
    # (on every row, weight 1, with distill_all: the released distill_all option).
    t = _as_tensor(temperature, a)
    q = torch.softmax(z_w / t, dim=-1)
    h = -(q * torch.log_softmax(a / t, dim=-1)).sum(dim=-1)
    loss_distill_raw = (h if distill_all else h * (1.0 - mask)).mean()
    # Off (distill False / step < t0): the term is left out entirely, as the released code does.
    gate = _as_tensor(distill, a) != 0
    loss_distill = torch.where(gate, loss_distill_raw, torch.zeros_like(loss_distill_raw))

    loss = loss_sup + lambda_u * loss_unsup + lambda_d * loss_distill
    # prior_batch: mean over the N weak rows of the soft probabilities, no mask (docs/method.md,
    # Prior estimator): "raw" the weak softmax itself (the released method); "em" the weak
    # posteriors adjusted from the training prior the logits are pulled to (Qa) to the current
    # estimate Q, softmax(z_w + log(Q + eps) - log(Qa + eps)) = softmax(z_w + du): one EM step
    # of Saerens, Latinne and Decaestecker (2002) per batch.
    rows = torch.softmax(z_w + du, dim=-1) if prior_estimator == "em" else pw
    prior_batch = weighted_prior(rows, prior_weight)
    return FlexDAOutput(loss, loss_sup.detach(), loss_unsup.detach(), loss_distill.detach(),
                        mask, pseudo_labels, prior_batch)


def weighted_prior(rows: torch.Tensor, prior_weight: Optional[torch.Tensor]) -> torch.Tensor:
    """The batch prior from the [N, C] per-row distributions: their mean, or with `prior_weight`
    w [N] (finite, >= 0) sum_i w_i rows_i / sum_i w_i over the rows with w_i > 0 only (a row
    of weight 0 is left out entirely, so its NaN cannot reach the prior: the released
    `lb_in_ulb_mask` selection); all NaN when no row has a positive weight (no estimate: the
    step then leaves Q as it is, docs/method.md, Prior update)."""
    if prior_weight is None:
        return rows.mean(dim=0)
    w = prior_weight.to(rows.dtype)
    keep = (w > 0)[:, None]
    total = (torch.where(keep, rows * w[:, None], 0.0)).sum(dim=0)
    return total / w.sum()


def flexda_fwd_reference(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb, adj_ulb,
                         hparams, threshold, prior_weight=None, distill_all=False):
    """The fused op's contract (adello_kernels/ops/flexda.py) written with the closed-form
    gradients of docs/method.md (Gradients) instead of autograd. Tests check it against autograd of
    `flexda_reference`, and every kernel against it, output by output.
    """
    acc = accumulate_dtype(logits_lb.dtype)
    z_l, z_w, z_s = logits_lb.to(acc), logits_ulb_w.to(acc), logits_ulb_s.to(acc)
    ds, du = adj_lb.to(acc), adj_ulb.to(acc)
    hp = hparams.to(acc)
    lambda_u, lambda_d, gate, t = hp[HP_LAMBDA_U], hp[HP_LAMBDA_D], hp[HP_GATE], hp[HP_TEMPERATURE]
    b, n = z_l.shape[0], z_w.shape[0]
    on = gate != 0

    # labeled rows: dL/dz_l = (softmax(z_l + ds) - onehot(y)) / B; a label outside [0, C) gives
    # a NaN CE and a NaN gradient row
    logp_l = torch.log_softmax(z_l + ds, dim=-1)
    safe, valid = _safe_labels(labels_lb, z_l.shape[1])
    nll = torch.where(valid, -logp_l.gather(1, safe[:, None])[:, 0], float("nan"))
    loss_sup = nll.mean()
    grad_lb = (logp_l.exp() - F.one_hot(safe, z_l.shape[1]).to(acc)) / b
    grad_lb = torch.where(valid[:, None], grad_lb, float("nan"))

    # weak rows: pw, M, yhat, the batch prior (raw, or EM: adjusted to Q by du)
    pw = torch.softmax(z_w, dim=-1)
    max_pw, yhat = pw.max(dim=-1)
    mask = (max_pw >= threshold).to(acc)
    prior_batch = weighted_prior(torch.where(hp[HP_PRIOR_EM] != 0, torch.softmax(z_w + du, dim=-1),
                                             pw), prior_weight)

    # strong rows: consistency on M, distillation on 1 - M
    a = z_s + du
    logp_s = torch.log_softmax(a, dim=-1)
    loss_unsup = -(logp_s.gather(1, yhat[:, None])[:, 0] * mask).sum() / n
    q = torch.softmax(z_w / t, dim=-1)
    logp_st = torch.log_softmax(a / t, dim=-1)
    d_rows = torch.ones_like(mask) if distill_all else 1 - mask   # the rows that distil
    loss_distill = torch.where(on, -((q * logp_st).sum(-1) * d_rows).sum() / n, 0.0)
    # dL/dz_s = (lambda_u M (softmax(a) - onehot(yhat))
    #            + g lambda_d D (softmax(a/T) - q) / T) / N,   D = 1 - M, or 1 with distill_all
    g_u = lambda_u * mask[:, None] * (logp_s.exp() - F.one_hot(yhat, z_s.shape[1]).to(acc))
    g_d = torch.where(on, lambda_d * d_rows[:, None] * (logp_st.exp() - q) / t, 0.0)
    grad_s = (g_u + g_d) / n

    loss = loss_sup + lambda_u * loss_unsup + lambda_d * loss_distill
    terms = torch.stack([loss_sup, loss_unsup, loss_distill])
    return (loss, terms, mask, yhat, prior_batch, grad_lb.to(logits_lb.dtype),
            grad_s.to(logits_ulb_s.dtype))
