"""`ADELLOLoss`: the stateful training criterion (prior estimate, step, temperature) around
`flexda_loss`, one call per training step."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import backends
from .functional import (
    check_logits,
    check_prior,
    check_prior_estimator,
    check_prior_weight,
    flexda_loss,
)
from .ops.snapshot import snapshot
from .ops.state import momentum_update, update_prior_
from .reference import (
    FlexDAOutput,
    accumulate_dtype,
    adjustments,
    alpha_schedule,
    weighted_prior,
)


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False,
            hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name}: must lie in {'(' if lo_open else '['}{lo}, {hi}"
                         f"{')' if hi_open else ']'}, got {value}")
    return float(value)


def _weighted(prior_batch: torch.Tensor, count) -> torch.Tensor:
    """count * prior_batch, or 0 where the count is a zero weight sum (whose prior is NaN)."""
    if isinstance(count, torch.Tensor):
        return torch.where(count > 0, prior_batch * count.to(prior_batch.dtype), 0.0)
    return prior_batch * count


class ADELLOLoss(nn.Module):
    """ADELLO criterion: each call computes the step's losses from the current prior estimate at
    the current step, then updates the prior (all-reduced across ranks when `sync_prior` and a
    process group is initialised), then advances the step. No host sync unless `validate`.

    Args:
        prior_lb:       [C] labeled class distribution (finite, non-negative, sums to 1)
        total_steps:    T_max of the alpha schedule
        alpha_min, power: alpha_t = 1 - (1 - alpha_min) * (t / T_max) ** power
        alpha_epoch_steps: n >= 1; alpha advances once every n steps, alpha_t from
                        floor(t / n) / floor(T_max / n) (n = the iterations per epoch is the
                        released `adello_alpha_from_epoch=True`); 1 (default): per step
        threshold:      confidence threshold tau in (0, 1]
        prior_momentum: m in Q_t = m Q_{t-1} + (1 - m) mean_i softmax(z_w[i])
        distill_start:  t0; the distillation term counts from step t0 on
        temperature:    T > 0, or "imbalance_aware": T = exp(KL(U || Q)) frozen at step t0 from
                        the prior after that step's update (that step's loss uses it too)
        lambda_u, lambda_d: loss weights
        distill_all:    distil every row (the released `distill_all` without
                        `distill_complement`); False (default): the rows below the threshold
        flexda:         False turns both logit adjustments off (FixMatch targets)
        prior_target:   [C] fixed prior the target Qa = R^alpha / sum(R^alpha) is flattened
                        from, e.g. the ground-truth unlabeled prior (the released "adello_gt"
                        mode); Q is still estimated and still the numerator of du. None
                        (default): R = Q, the running estimate
        prior_estimator: "raw" (the released method): Q tracks the EMA of softmax(z_w);
                        "em": of softmax(z_w + du), the weak posteriors adjusted from the
                        target prior Qa to Q (docs/method.md, Prior estimator)
        sync_prior:     all-reduce the batch prior across ranks before the update
        backend:        'auto', 'reference', 'cpu', 'cuda' or 'triton'
        validate:       check the label range every call (a host sync on a GPU)
    Buffers (saved in state_dict): prior_lb, prior_ulb [C] fp32; step int64; temperature fp32;
    temperature_frozen bool; skipped_updates int64 (steps whose batch prior was not finite).
    Call: crit(logits_lb [B, C], labels_lb [B], logits_ulb_w [N, C], logits_ulb_s [N, C])
          -> FlexDAOutput
    """

    def __init__(self, prior_lb: torch.Tensor, total_steps: int, *, alpha_min: float = 0.1,
                 power: float = 2.0, threshold: float = 0.95, prior_momentum: float = 0.999,
                 distill_start: int = 0, temperature=1.0, lambda_u: float = 1.0,
                 lambda_d: float = 1.0, flexda: bool = True, prior_estimator: str = "raw",
                 prior_target: Optional[torch.Tensor] = None, alpha_epoch_steps: int = 1,
                 distill_all: bool = False,
                 sync_prior: bool = True, backend: str = "auto", validate: bool = True):
        super().__init__()
        if not isinstance(prior_lb, torch.Tensor) or prior_lb.dim() != 1 or prior_lb.numel() == 0:
            raise ValueError("prior_lb: expected a non-empty 1-d [C] tensor")
        check_prior("prior_lb", prior_lb, prior_lb.shape[0], prior_lb.device)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
        self.total_steps = total_steps
        if isinstance(alpha_epoch_steps, bool) or not isinstance(alpha_epoch_steps, int) \
                or not 1 <= alpha_epoch_steps <= total_steps:
            raise ValueError(f"alpha_epoch_steps: expected an int in [1, total_steps = "
                             f"{total_steps}], got {alpha_epoch_steps!r}")
        self.alpha_epoch_steps = alpha_epoch_steps
        self.alpha_min = _number("alpha_min", alpha_min, 0.0, 1.0)
        self.power = _number("power", power, 0.0, math.inf, lo_open=True)
        self.threshold = _number("threshold", threshold, 0.0, 1.0, lo_open=True)
        self.prior_momentum = _number("prior_momentum", prior_momentum, 0.0, 1.0, hi_open=True)
        if isinstance(distill_start, bool) or not isinstance(distill_start, int) \
                or distill_start < 0:
            raise ValueError(f"distill_start: expected a non-negative int, got {distill_start!r}")
        self.distill_start = distill_start
        self.imbalance_aware = isinstance(temperature, str)
        if self.imbalance_aware and temperature != "imbalance_aware":
            raise ValueError(f"temperature: expected a positive number or 'imbalance_aware', "
                             f"got {temperature!r}")
        t0 = 1.0 if self.imbalance_aware else _number("temperature", temperature, 0.0, math.inf,
                                                       lo_open=True, hi_open=True)
        self.lambda_u = _number("lambda_u", lambda_u, 0.0, math.inf, hi_open=True)
        self.lambda_d = _number("lambda_d", lambda_d, 0.0, math.inf, hi_open=True)
        self.flexda = bool(flexda)
        if not isinstance(distill_all, bool):
            raise ValueError(f"distill_all: expected a bool, got {distill_all!r}")
        self.distill_all = distill_all
        self.prior_estimator = check_prior_estimator(prior_estimator)
        self.sync_prior = bool(sync_prior)
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of "
                             f"{backends.BACKENDS}")
        self.backend = backend
        self.validate = bool(validate)

        c = prior_lb.shape[0]
        dev = prior_lb.device
        if prior_target is not None:
            if not isinstance(prior_target, torch.Tensor):
                raise ValueError(f"prior_target: expected a [C] tensor or None, got "
                                 f"{type(prior_target).__name__}")
            check_prior("prior_target", prior_target, c, dev)
            prior_target = prior_target.detach().to(torch.float32).clone()
        # Configuration, not state: not saved (a resumed run is built with the same arguments).
        self.register_buffer("prior_target", prior_target, persistent=False)
        self.register_buffer("prior_lb", prior_lb.detach().to(torch.float32).clone())
        self.register_buffer("prior_ulb", torch.full((c,), 1.0 / c, device=dev))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=dev))
        self.register_buffer("temperature", torch.tensor(t0, dtype=torch.float32, device=dev))
        self.register_buffer("temperature_frozen", torch.tensor(not self.imbalance_aware,
                                                                device=dev))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.int64, device=dev))
        # flexda=False: uniform P_L and Q make both adjustments exactly 0 (log(1/C+eps) twice).
        self.register_buffer("_uniform", torch.full((c,), 1.0 / c, device=dev), persistent=False)
        # Gradient accumulation (forward(..., update=False)): the row-weighted sum of the batch
        # priors of the micro-batches seen since the last update, on the device, and their row
        # count on the host (shapes are static, so counting them needs no sync). Not saved:
        # checkpoints are taken between optimizer steps, when nothing is pending.
        self.register_buffer("_pending_prior", torch.zeros(c, device=dev), persistent=False)
        # (the micro-batches' weight sums when prior weights are given: a device scalar)
        self.register_buffer("_pending_weight", torch.zeros((), device=dev), persistent=False)
        self._pending_rows = 0
        self._pending_weighted = False

    @property
    def num_classes(self) -> int:
        return self.prior_ulb.shape[0]

    def extra_repr(self) -> str:
        t = "'imbalance_aware'" if self.imbalance_aware else f"{float(self.temperature):g}"
        return (f"num_classes={self.num_classes}, total_steps={self.total_steps}, "
                f"alpha_min={self.alpha_min}, power={self.power}, threshold={self.threshold}, "
                f"prior_momentum={self.prior_momentum}, distill_start={self.distill_start}, "
                f"temperature={t}, flexda={self.flexda}, "
                f"prior_estimator={self.prior_estimator!r}, "
                f"prior_target={'None' if self.prior_target is None else 'fixed'}, "
                f"alpha_epoch_steps={self.alpha_epoch_steps}, distill_all={self.distill_all}, "
                f"backend={self.backend!r}")

    def alpha(self) -> torch.Tensor:
        """alpha_t at the current step (a 0-d tensor on the module's device)."""
        return alpha_schedule(self.step, self.total_steps, self.alpha_min, self.power,
                              self.alpha_epoch_steps)

    def _syncing(self) -> bool:
        """True when the batch prior is all-reduced across ranks before the update."""
        return self.sync_prior and dist.is_available() and dist.is_initialized()

    def _global_mean(self, prior_batch: torch.Tensor, count):
        """(batch prior over all ranks, total count): sum_r W_r mean_r / sum_r W_r with W_r the
        rank's row count N_r (a host int) or prior-weight sum (a 0-d device tensor; a rank whose
        weights are all 0 adds nothing, not its NaN prior). One all-reduce."""
        if not self._syncing():
            return prior_batch, count
        if isinstance(count, torch.Tensor):
            w = count.to(torch.float32).reshape(1)
            part = torch.where(w > 0, prior_batch.float() * w, 0.0)
        else:
            w = prior_batch.new_full((1,), float(count), dtype=torch.float32)
            part = prior_batch.float() * float(count)
        buf = torch.cat([part, w])
        dist.all_reduce(buf)
        return buf[:-1] / buf[-1], buf[-1]

    def _check_prior_weight(self, prior_weight, n: int, device, validate: bool):
        if prior_weight is None:
            return None
        if not isinstance(prior_weight, torch.Tensor):
            raise ValueError(f"prior_weight: expected a [N] tensor or None, got "
                             f"{type(prior_weight).__name__}")
        check_prior_weight(prior_weight, n, device, validate)
        return prior_weight

    def forward(self, logits_lb: torch.Tensor, labels_lb: torch.Tensor,
                logits_ulb_w: torch.Tensor, logits_ulb_s: torch.Tensor, *,
                prior_weight: Optional[torch.Tensor] = None,
                update: bool = True) -> FlexDAOutput:
        """One training step. `prior_weight` [N] (finite, >= 0): per-row weights of the batch
        prior the estimate is updated with (e.g. `lb_in_ulb_mask < 1`: only the rows that are
        truly unlabeled, as the released code's lb_in_ulb_mask); rows of weight 0 are left out
        and a batch whose weights are all 0 leaves the prior as it is (docs/method.md, Prior
        update). The losses do not depend on it.

        With `update=False`, one micro-batch of a step accumulated over
        several (gradient accumulation): its losses use the current state (alpha_t, Q, T) like
        every micro-batch of the step, its batch prior is added to a pending sum, and nothing
        advances. The next call with `update=True` (the step's last micro-batch) updates the
        prior once from the row-weighted mean over all of them and advances the step once, so
        K micro-batches of N rows give the prior and step of one batch of K N rows (the losses
        of equal micro-batches average to the full batch's loss)."""
        # All checks come before any state changes, so a rejected call leaves the module as it was.
        if not isinstance(update, bool):
            raise ValueError(f"update: expected a bool, got {type(update).__name__}")
        if not update and self.imbalance_aware:
            raise ValueError("update: update=False (gradient accumulation) is not supported with "
                             "temperature='imbalance_aware' (its temperature is frozen from the "
                             "prior after a whole step's update, which the first micro-batches "
                             "cannot know); use a fixed temperature or no accumulation")
        compiling = torch.compiler.is_compiling()
        check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s,
                     self.validate and not compiling)
        # The state this step reads (Q_{t-1}, t, T); it is updated in place at the end. (Buffers are
        # read once: each nn.Module attribute lookup of a buffer costs ~1 us on a small CPU.)
        buffers = self._buffers
        prior_ulb, step_buf, temperature_buf = (buffers["prior_ulb"], buffers["step"],
                                                buffers["temperature"])
        if logits_lb.shape[1] != prior_ulb.shape[0]:
            raise ValueError(f"logits_lb: has {logits_lb.shape[1]} classes but prior_lb has "
                             f"{prior_ulb.shape[0]}")
        if logits_lb.device != prior_ulb.device:
            raise ValueError(f"logits_lb: on {logits_lb.device} but the ADELLOLoss state is on "
                             f"{prior_ulb.device} (move the module with .to(device))")
        n = logits_ulb_w.shape[0]
        prior_weight = self._check_prior_weight(prior_weight, n, logits_lb.device,
                                                self.validate and not compiling)
        weighted = prior_weight is not None
        backend = backends.resolve_backend(self.backend, logits_lb.device)
        syncing = self._syncing()
        pending = self._pending_rows
        # The step op updates the state itself unless this call only accumulates, earlier
        # micro-batches are pending, or the batch prior must first be all-reduced.
        fused_update = update and pending == 0 and not syncing
        count = n   # the prior's row count: the weight sum with weights (below)
        if weighted:
            prior_weight = prior_weight.detach().to(accumulate_dtype(logits_lb.dtype))
            if backend == "reference" or not fused_update or self.imbalance_aware:
                # (0-d, on the device; the fused step op sums the weights itself)
                count = torch.where(prior_weight > 0, prior_weight, 0.0).sum().float()
        q_prev, step, temperature = prior_ulb, step_buf, temperature_buf
        snap = compiling  # see ops/snapshot.py
        if snap:
            q_prev, step, temperature = (snapshot(x) for x in (q_prev, step, temperature))

        if self.imbalance_aware:
            # T = exp(KL(U || Q_t)) needs this step's updated prior before the distillation loss,
            # so the batch prior is computed up front (one extra softmax over z_w, this mode only;
            # the EM estimator's adjusted posteriors need du, from the same float64 prologue).
            z_w = logits_ulb_w.detach().float()
            if self.prior_estimator == "em" and self.flexda:
                alpha = alpha_schedule(step, self.total_steps, self.alpha_min, self.power,
                                       self.alpha_epoch_steps)
                z_w = z_w + adjustments(self.prior_lb, q_prev, alpha, 1e-9, torch.float32,
                                        buffers["prior_target"])[1]
            batch_prior, pre_count = self._global_mean(
                weighted_prior(torch.softmax(z_w, dim=-1), prior_weight), count)
            q_new, _ = momentum_update(q_prev, batch_prior, self.prior_momentum)
            if weighted:                        # no row to estimate from: Q stays
                q_new = torch.where(pre_count > 0, q_new, q_prev)
            c = self.num_classes
            kl = ((1.0 / c) * torch.log((1.0 / c) / q_new.clamp_min(1e-30))).sum()
            frozen = buffers["temperature_frozen"]
            if snap:
                frozen = snapshot(frozen)
            freeze_now = (step >= self.distill_start) & ~frozen
            temperature = torch.where(freeze_now, torch.exp(kl).to(temperature.dtype), temperature)

        if backend == "reference":  # plain PyTorch end to end: what users run without kernels
            if self.flexda:
                p_l, q, target = self.prior_lb, q_prev, buffers["prior_target"]
                alpha = alpha_schedule(step, self.total_steps, self.alpha_min, self.power,
                                       self.alpha_epoch_steps)
            else:
                p_l, q, target, alpha = self._uniform, self._uniform, None, 1.0
            out = flexda_loss(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, p_l, q, alpha,
                              threshold=self.threshold, lambda_u=self.lambda_u,
                              lambda_d=self.lambda_d, distill=step >= self.distill_start,
                              temperature=temperature, prior_estimator=self.prior_estimator,
                              prior_target=target, prior_weight=prior_weight,
                              distill_all=self.distill_all, backend=backend, validate=False)
        else:
            # Every fused backend: one op for the whole step (prologue from the state, rows,
            # reduce and, unless the batch prior must first be all-reduced, the prior/step
            # update), differentiable through its own autograd (ops/step.py).
            loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch, _, _ = \
                backends.step_function(backend)(
                    logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, self.prior_lb, prior_ulb,
                    step_buf, buffers["skipped_updates"], temperature, self.total_steps,
                    self.alpha_min, self.power, self.distill_start, self.lambda_u,
                    self.lambda_d, 1e-9, self.flexda, self.threshold, self.prior_momentum,
                    fused_update, self.prior_estimator == "em", buffers["prior_target"],
                    self.alpha_epoch_steps, prior_weight, self.distill_all)
            out = FlexDAOutput(loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels,
                               prior_batch)

        # The update reads only detached values: no autograd recording (and no no_grad context).
        if self.imbalance_aware:
            temperature_buf.copy_(temperature)
            buffers["temperature_frozen"].logical_or_(freeze_now)
        if backend == "reference" or not fused_update:
            acc = buffers["_pending_prior"]
            wacc = buffers["_pending_weight"]
            if not update:                      # a micro-batch: accumulate, advance nothing
                acc.add_(_weighted(out.prior_batch.detach().to(acc.dtype), count))
                wacc.add_(count)
                self._pending_rows = pending + n
                self._pending_weighted = self._pending_weighted or weighted
                return out
            if pending:                         # the step's last micro-batch
                total = acc + _weighted(out.prior_batch.detach().to(acc.dtype), count)
                weighted = weighted or self._pending_weighted
                count = wacc + count if weighted else pending + n
                batch_prior = total / count
                acc.zero_()
                wacc.zero_()
                self._pending_rows = 0
                self._pending_weighted = False
            elif self.imbalance_aware:
                count = pre_count               # the pre-pass's prior, already all-reduced
            else:
                batch_prior = out.prior_batch.detach()
            if not self.imbalance_aware:
                batch_prior, count = self._global_mean(batch_prior, count)
            update_prior_(prior_ulb, step_buf, buffers["skipped_updates"], batch_prior,
                          self.prior_momentum, has_rows=(count > 0) if weighted else None)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Every entry is checked before any is assigned, so a rejected state (another class
        # count, a NaN prior, a negative step, ...) leaves the module exactly as it was; this
        # also holds when the criterion is loaded as part of a larger module.
        errors = self._state_errors(state_dict, prefix)
        if errors:
            error_msgs.extend(errors)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # A loaded state starts between optimizer steps: no micro-batch is pending.
        self._buffers["_pending_prior"].zero_()
        self._buffers["_pending_weight"].zero_()
        self._pending_rows = 0
        self._pending_weighted = False

    def _state_errors(self, state_dict, prefix: str) -> list[str]:
        """What is wrong with this module's entries of `state_dict` (empty: loadable). Reads the
        values (a host sync), as loading a checkpoint does anyway."""
        errors, got = [], {}
        for name, buf in self._buffers.items():
            if buf is None or name in self._non_persistent_buffers_set:
                continue
            key = prefix + name
            if key not in state_dict:
                continue              # a missing key is reported by nn.Module (strict=True)
            v = state_dict[key]
            if not isinstance(v, torch.Tensor):
                errors.append(f"{key}: expected a tensor, got {type(v).__name__}")
                continue
            if v.shape != buf.shape:
                errors.append(f"{key}: shape {tuple(v.shape)} does not match this module's "
                              f"{tuple(buf.shape)} (num_classes={self.num_classes})")
                continue
            kind = ("bool" if buf.dtype == torch.bool else
                    "float" if buf.is_floating_point() else "int")
            v_kind = ("bool" if v.dtype == torch.bool else "float" if v.is_floating_point()
                      else "complex" if v.is_complex() else "int")
            if kind != v_kind:
                errors.append(f"{key}: dtype {v.dtype} where {buf.dtype} is expected")
                continue
            got[name] = v.detach().cpu()
        for name in ("prior_lb", "prior_ulb"):
            v = got.get(name)
            if v is None:
                continue
            v = v.double()
            if not bool(torch.isfinite(v).all()):
                errors.append(f"{prefix}{name}: holds non-finite values")
            elif bool((v < 0).any()):
                errors.append(f"{prefix}{name}: holds negative values")
            elif abs(float(v.sum()) - 1.0) > 1e-3:
                errors.append(f"{prefix}{name}: sums to {float(v.sum()):.6g}, not 1")
        t = got.get("temperature")
        if t is not None and not (math.isfinite(float(t)) and float(t) > 0):
            errors.append(f"{prefix}temperature: must be finite and > 0, got {float(t)}")
        for name in ("step", "skipped_updates"):
            v = got.get(name)
            if v is not None and int(v) < 0:
                errors.append(f"{prefix}{name}: must be >= 0, got {int(v)}")
        return errors
