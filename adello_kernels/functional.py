"""`flexda_loss`: one ADELLO step on given logits, validated, on the chosen backend."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import backends
from .ops.flexda import (
    HP_GATE,
    HP_LAMBDA_D,
    HP_LAMBDA_U,
    HP_PRIOR_EM,
    HP_TEMPERATURE,
    NUM_HPARAMS,
    FusedStep,
)
from .reference import FlexDAOutput, Scalar, accumulate_dtype, adjustments, flexda_reference

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PRIOR_ESTIMATORS = ("raw", "em")
PRIOR_SUM_TOL = 1e-3


# --------------------------------------------------------------------------------------------
# Validation. Shape/dtype/device checks read metadata only; value checks (label range, priors,
# tensor hyperparameters) read device memory, i.e. a host sync on a GPU: `validate=False` skips
# them for a captured or compiled hot path.
# --------------------------------------------------------------------------------------------

def _check_logits(name: str, x, rows_name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-d [{rows_name}, C] tensor, got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch ({rows_name} = 0); the step's losses need at "
                         "least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: no classes (C = 0)")


def check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, validate: bool = True) -> None:
    """Shapes, dtypes and devices of the four batch tensors; the label range if `validate`."""
    _check_logits("logits_lb", logits_lb, "B")
    _check_logits("logits_ulb_w", logits_ulb_w, "N")
    _check_logits("logits_ulb_s", logits_ulb_s, "N")
    c = logits_lb.shape[1]
    for name, x in (("logits_ulb_w", logits_ulb_w), ("logits_ulb_s", logits_ulb_s)):
        if x.shape[1] != c:
            raise ValueError(f"{name}: has {x.shape[1]} classes but logits_lb has {c}")
        if x.dtype != logits_lb.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} differs from logits_lb's {logits_lb.dtype}")
        if x.device != logits_lb.device:
            raise ValueError(f"{name}: on {x.device} but logits_lb is on {logits_lb.device}")
    if logits_ulb_s.shape != logits_ulb_w.shape:
        raise ValueError(f"logits_ulb_s: shape {tuple(logits_ulb_s.shape)} differs from "
                         f"logits_ulb_w's {tuple(logits_ulb_w.shape)} (rows must pair up)")
    if not isinstance(labels_lb, torch.Tensor):
        raise ValueError(f"labels_lb: expected a tensor, got {type(labels_lb).__name__}")
    if labels_lb.dim() != 1 or labels_lb.shape[0] != logits_lb.shape[0]:
        raise ValueError(f"labels_lb: expected shape ({logits_lb.shape[0]},), got "
                         f"{tuple(labels_lb.shape)}")
    if labels_lb.dtype != torch.int64:
        raise ValueError(f"labels_lb: expected int64, got {labels_lb.dtype}")
    if labels_lb.device != logits_lb.device:
        raise ValueError(f"labels_lb: on {labels_lb.device} but logits_lb is on "
                         f"{logits_lb.device}")
    if validate:
        lo, hi = torch.aminmax(labels_lb)
        if bool(lo < 0) or bool(hi >= c):
            raise ValueError(f"labels_lb: labels must lie in [0, {c}), got range "
                             f"[{int(lo)}, {int(hi)}]")


def check_prior(name: str, prior, num_classes: int, device: torch.device,
                validate: bool = True) -> None:
    """A [C] float distribution: finite, non-negative, summing to 1 within 1e-3."""
    if not isinstance(prior, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(prior).__name__}")
    if prior.dim() != 1 or prior.shape[0] != num_classes:
        raise ValueError(f"{name}: expected shape ({num_classes},), got {tuple(prior.shape)}")
    if not prior.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor, got {prior.dtype}")
    if prior.device != device:
        raise ValueError(f"{name}: on {prior.device} but the logits are on {device}")
    if validate:
        p = prior.detach().to(torch.float64)
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{name}: has non-finite entries")
        if bool((p < 0).any()):
            raise ValueError(f"{name}: has negative entries")
        total = float(p.sum())
        if abs(total - 1.0) > PRIOR_SUM_TOL:
            raise ValueError(f"{name}: must sum to 1 (within {PRIOR_SUM_TOL}), sums to {total:.6g}")


def check_prior_weight(weight, n: int, device: torch.device, validate: bool = True) -> None:
    """[N] float per-row weights of the batch prior: finite and >= 0 (values if `validate`)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"prior_weight: expected a tensor, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"prior_weight: expected shape ({n},) (one weight per unlabeled row), "
                         f"got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"prior_weight: expected a float tensor, got {weight.dtype} (for a "
                         "mask, pass mask.float())")
    if weight.device != device:
        raise ValueError(f"prior_weight: on {weight.device} but the logits are on {device}")
    if validate:
        w = weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("prior_weight: has non-finite entries")
        if bool((w < 0).any()):
            raise ValueError("prior_weight: has negative entries")


def _check_scalar(name: str, value, device: torch.device, lo: float, hi: float,
                  lo_open: bool, validate: bool) -> None:
    """`value` in the interval (lo or [lo, hi]; a 0-d tensor on `device` or a Python number."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name}: expected a 0-d tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: on {value.device} but the logits are on {device}")
        if value.is_complex():
            raise ValueError(f"{name}: complex values are not supported")
        if not validate:
            return
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number or a 0-d tensor, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: must lie in {interval}, got {v}")


def check_hyperparameters(*, alpha, threshold, lambda_u, lambda_d, distill, temperature, eps,
                          device: torch.device, validate: bool = True) -> None:
    _check_scalar("alpha", alpha, device, 0.0, 1.0, False, validate)
    if isinstance(threshold, torch.Tensor) or isinstance(threshold, bool):
        raise ValueError("threshold: expected a Python float")
    _check_scalar("threshold", threshold, device, 0.0, 1.0, True, True)
    for name, lam in (("lambda_u", lambda_u), ("lambda_d", lambda_d)):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
                or lam < 0:
            raise ValueError(f"{name}: expected a finite non-negative Python number, got {lam!r}")
    if isinstance(distill, torch.Tensor):
        if distill.dim() != 0 or distill.device != device:
            raise ValueError(f"distill: expected a 0-d tensor on {device}, got shape "
                             f"{tuple(distill.shape)} on {distill.device}")
    elif not isinstance(distill, (bool, int)):
        raise ValueError(f"distill: expected a bool or a 0-d tensor, got {type(distill).__name__}")
    _check_scalar("temperature", temperature, device, 0.0, math.inf, True, validate)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1e-3):
        raise ValueError(f"eps: expected a small positive float, got {eps!r}")


def check_prior_estimator(value) -> str:
    """'raw' or 'em' (docs/method.md, Prior estimator)."""
    if not isinstance(value, str) or value not in PRIOR_ESTIMATORS:
        raise ValueError(f"prior_estimator: expected one of {PRIOR_ESTIMATORS}, got {value!r}")
    return value


def _hparams(lambda_u: float, lambda_d: float, distill: Scalar, temperature: Scalar,
             device: torch.device, dtype: torch.dtype, prior_em: bool = False) -> torch.Tensor:
    """The op's [5] hyperparameter tensor (lambda_u, lambda_d, distill_gate, T, prior_em) on
    `device`, built from fills and device tensors only (no host-to-device copy, so it can be
    captured)."""
    def entry(v, gate=False):
        if isinstance(v, torch.Tensor):
            return ((v != 0) if gate else v).to(dtype).reshape(1)
        return torch.full((1,), float(bool(v)) if gate else float(v), dtype=dtype, device=device)

    slots = {HP_LAMBDA_U: entry(lambda_u), HP_LAMBDA_D: entry(lambda_d),
             HP_GATE: entry(distill, gate=True), HP_TEMPERATURE: entry(temperature),
             HP_PRIOR_EM: entry(float(prior_em))}
    return torch.cat([slots[i] for i in range(NUM_HPARAMS)])


def flexda_loss(logits_lb: torch.Tensor, labels_lb: torch.Tensor, logits_ulb_w: torch.Tensor,
                logits_ulb_s: torch.Tensor, prior_lb: torch.Tensor, prior_ulb: torch.Tensor,
                alpha: Scalar, *, threshold: float = 0.95, lambda_u: float = 1.0,
                lambda_d: float = 1.0, distill: Scalar = True, temperature: Scalar = 1.0,
                eps: float = 1e-9, prior_estimator: str = "raw",
                prior_target: Optional[torch.Tensor] = None,
                prior_weight: Optional[torch.Tensor] = None, distill_all: bool = False,
                backend: str = "auto", validate: bool = True) -> FlexDAOutput:
    """One ADELLO step (FlexDA + complementary consistency distillation), docs/method.md.

    Args:
        logits_lb:    [B, C] labeled logits (fp32, bf16, fp16 or fp64)
        labels_lb:    [B] int64 labels in [0, C)
        logits_ulb_w: [N, C] weak-view unlabeled logits (no gradient flows into them)
        logits_ulb_s: [N, C] strong-view logits of the same N images
        prior_lb:     [C] labeled class distribution P_L
        prior_ulb:    [C] current unlabeled prior estimate Q (read, never written)
        alpha:        flattening exponent in [0, 1] (number or 0-d tensor, see `alpha_schedule`)
        threshold:    confidence threshold tau in (0, 1]
        distill:      include the distillation term (bool or 0-d tensor)
        temperature:  distillation temperature T > 0 (number or 0-d tensor)
        prior_estimator: what `prior_batch` averages: "raw" softmax(logits_ulb_w) (the released
                      method) or "em" softmax(logits_ulb_w + du), the weak posteriors adjusted
                      from the target prior Qa to Q (docs/method.md, Prior estimator)
        prior_target: [C] fixed prior the target Qa is flattened from (the released
                      "adello_gt" mode: the ground-truth unlabeled prior), or None (the
                      default): Qa is flattened from prior_ulb (docs/method.md, Target prior)
        prior_weight: [N] finite non-negative weights of the rows in `prior_batch`, or None
                      (every row 1): prior_batch = sum_{w_i > 0} w_i p_i / sum_i w_i, NaN when
                      every weight is 0 (the released lb_in_ulb_mask: w = truly unlabeled rows)
        distill_all:  distil every row (the released distill_all), not only those below the
                      threshold (the default: complementary distillation)
        backend:      'auto', 'reference', 'cpu', 'cuda' or 'triton'
        validate:     also check values (label range, priors, tensor hyperparameters); each is a
                      host sync on a GPU, so pass False inside a captured/compiled step
    Returns:
        FlexDAOutput(loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch)
    Raises:
        ValueError naming the argument for any malformed input.
    """
    # Value checks need the data on the host: impossible inside a compiled graph, so they are
    # skipped there (shape, dtype and device checks still run at trace time).
    validate = validate and not torch.compiler.is_compiling()
    check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, validate)
    c, device = logits_lb.shape[1], logits_lb.device
    check_prior("prior_lb", prior_lb, c, device, validate)
    check_prior("prior_ulb", prior_ulb, c, device, validate)
    if prior_target is not None:
        check_prior("prior_target", prior_target, c, device, validate)
    if prior_weight is not None:
        check_prior_weight(prior_weight, logits_ulb_w.shape[0], device, validate)
    if not isinstance(distill_all, bool):
        raise ValueError(f"distill_all: expected a bool, got {type(distill_all).__name__}")
    check_hyperparameters(alpha=alpha, threshold=threshold, lambda_u=lambda_u, lambda_d=lambda_d,
                          distill=distill, temperature=temperature, eps=eps, device=device,
                          validate=validate)
    check_prior_estimator(prior_estimator)
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a string, got {type(backend).__name__}")
    name = backends.resolve_backend(backend, device)

    if name == "reference":
        return flexda_reference(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                                prior_ulb, alpha, threshold=threshold, lambda_u=lambda_u,
                                lambda_d=lambda_d, distill=distill, temperature=temperature,
                                eps=eps, prior_estimator=prior_estimator,
                                prior_target=prior_target, prior_weight=prior_weight,
                                distill_all=distill_all)

    acc = accumulate_dtype(logits_lb.dtype)
    ds, du = adjustments(prior_lb, prior_ulb, alpha, eps, acc, prior_target)
    hparams = _hparams(float(lambda_u), float(lambda_d), distill, temperature, device, acc,
                       prior_em=prior_estimator == "em")
    weight = None if prior_weight is None else prior_weight.detach().to(acc).contiguous()
    return fused_step(name, logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, ds, du, hparams,
                      float(threshold), weight, distill_all)


def fused_step(backend: str, logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb, adj_ulb,
               hparams, threshold: float, prior_weight=None,
               distill_all: bool = False) -> FlexDAOutput:
    """Call a fused backend's op (no validation) and package its outputs."""
    loss, terms, mask, pseudo_labels, prior_batch, _, _ = FusedStep.apply(
        backends.fused_op(backend), logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb,
        adj_ulb, hparams, threshold, prior_weight, distill_all)
    loss_sup, loss_unsup, loss_distill = terms.unbind()
    return FlexDAOutput(loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels,
                        prior_batch)
