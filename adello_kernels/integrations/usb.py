"""`ADELLOLoss` inside the released ADELLO code (emasa/ADELLO-LTSSL, a fork of Microsoft USB
0.3.0) and USB-style `train_step`s: the argument mapping and the step's outputs in their format.

    crit = usb.adello_loss_from_args(args, lb_class_counts).to(device)   # args: their argparse
    out_dict, log_dict = usb.train_step_outputs(crit, outputs, y_lb)      # outputs: model(x)

Nothing here imports USB (`semilearn`): the functions take the released code's `args` (an
argparse Namespace or a dict) and its model outputs, and return its shapes of results.

The released algorithm is `imb_algorithm: adello` over `algorithm: fixmatch_distill`; its loss
per step (its `FixMatchDistill.train_step` with the ADELLO losses and `ADELLOHook`) is what
`ADELLOLoss` computes, with these arguments:

| released argument (default) | ADELLOLoss |
|---|---|
| `p_cutoff` (0.95) | `threshold` |
| `ulb_loss_ratio` (1.0) | `lambda_u` |
| `lambda_distill` (1.0) | `lambda_d` (0 when neither `distill_complement` nor `distill_all`) |
| `distill_complement` (True) | distillation on the rows below the threshold |
| `distill_all` (False) | `distill_all=True` (every row distils) without `distill_complement` |
| `distill_start_iter` (None = 0) | `distill_start` |
| `distill_T` (None = 1), `imbalance_distill_with_warmup` (True) | `temperature` (below) |
| `adello_alpha_min` (0.1), `adello_k` (2.0) | `alpha_min`, `power` |
| `adello_alpha_from_epoch` (False) | `alpha_epoch_steps`: `num_train_iter // epoch` if True |
| `adello_mode` ("adello") | "adello_gt": `prior_target` = the unlabeled class counts' prior |
| `adello_ema_p` (0.999) | `prior_momentum` |
| `num_train_iter` | `total_steps` |
| labeled class counts (`lb_class_dist`) | `prior_lb` = counts / sum |

`temperature` is 1.0 when `distill_T` is None (the released code then never reaches its
imbalance-aware branch, whatever the warm-up flag says); "imbalance_aware" (T = exp(KL(U || Q))
frozen at the first distilling step) when `distill_T` is set, the warm-up flag is on and
`distill_start_iter` is set; else `distill_T`.

`adello_mode="adello_gt"` needs the unlabeled class counts (`ulb_class_counts`, what the
released `compute_unlabeled_prior` counts from `dataset_dict['train_ulb'].targets`); without
them the released code falls back to the labeled prior as the target, and so does this (with a
warning). With `return_lb_in_ulb_mask=True` the released `train_step` receives
`lb_in_ulb_mask` ([N], 1 where an unlabeled row is a labeled image) and estimates the prior
from the other rows only: pass it on, `train_step_outputs(crit, outputs, y_lb,
lb_in_ulb_mask=lb_in_ulb_mask)` (the criterion's `prior_weight`). Options of the released code
and values it does not know are refused with a ValueError naming them (never silently
dropped).

Two things the released code does differently, on purpose (docs/method.md, Deliberate
differences): its prior `p_hat` is not in its checkpoints (a resumed run restarts it at uniform),
while `crit.state_dict()` holds the prior, step and temperature -- put it into the released
`get_save_dict()` and back with `crit.load_state_dict` in `load_model`, or a resumed run
restarts alpha at 1 and the prior at uniform; and under DDP the batch prior is all-reduced.
"""
from __future__ import annotations

import argparse
import math
import warnings
from typing import Any, Mapping, Union

import torch

from ..module import ADELLOLoss

# The released argparse defaults (fixmatch_distill.py and adello.py get_argument()) of every
# key the mapping reads; a config file or the command line overrides them.
RELEASED_DEFAULTS = {
    "p_cutoff": 0.95, "ulb_loss_ratio": 1.0, "lambda_distill": 1.0,
    "distill_complement": True, "distill_all": False, "distill_start_iter": None,
    "distill_T": None, "imbalance_distill_with_warmup": True,
    "adello_mode": "adello", "adello_alpha_from_epoch": False, "adello_alpha_min": 0.1,
    "adello_k": 2.0, "adello_ema_p": 0.999, "return_lb_in_ulb_mask": False,
}

Args = Union[argparse.Namespace, Mapping[str, Any]]


def _get(args: Args, key: str):
    d = vars(args) if isinstance(args, argparse.Namespace) else args
    if key in d and d[key] is not None:
        return d[key]
    if key in RELEASED_DEFAULTS:
        return RELEASED_DEFAULTS[key]
    if key in d:
        return None
    raise ValueError(f"{key}: missing from args (the released code always sets it)")


def adello_loss_kwargs(args: Args) -> dict:
    """The `ADELLOLoss` keyword arguments (all but `prior_lb`) for the released code's args.
    Raises ValueError naming any option that ADELLOLoss does not support yet."""
    mode = _get(args, "adello_mode")
    if mode not in ("adello", "adello_gt"):
        raise ValueError(f"adello_mode={mode!r}: expected 'adello' or 'adello_gt' (the released "
                         "modes)")
    # the released get_distill_mask: 1 - mask when distill_complement (whatever distill_all
    # says), else every row; no distillation when neither is set
    complement, every_row = bool(_get(args, "distill_complement")), bool(_get(args, "distill_all"))
    total = _get(args, "num_train_iter")
    epoch_steps = 1
    if bool(_get(args, "adello_alpha_from_epoch")):
        # the released schedule: alpha from it // n over num_train_iter // n, n the iterations
        # per epoch as USB's AlgorithmBase counts them (num_train_iter // epoch)
        epochs = _get(args, "epoch")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= total:
            raise ValueError(f"epoch={epochs!r}: adello_alpha_from_epoch=True needs an int "
                             f"number of epochs in [1, num_train_iter = {total}]")
        epoch_steps = int(total) // epochs
    start = _get(args, "distill_start_iter")
    start = 0 if start is None else int(start)
    t = _get(args, "distill_T")
    if t is None:
        temperature = 1.0   # the released code's plain call: no temperature, warm-up flag unused
    elif bool(_get(args, "imbalance_distill_with_warmup")) and \
            _get(args, "distill_start_iter") is not None:
        temperature = "imbalance_aware"
    else:
        temperature = float(t)
    return dict(total_steps=int(total), alpha_min=float(_get(args, "adello_alpha_min")),
                power=float(_get(args, "adello_k")), threshold=float(_get(args, "p_cutoff")),
                prior_momentum=float(_get(args, "adello_ema_p")), distill_start=start,
                alpha_epoch_steps=epoch_steps,
                temperature=temperature, lambda_u=float(_get(args, "ulb_loss_ratio")),
                lambda_d=float(_get(args, "lambda_distill")) if complement or every_row else 0.0,
                distill_all=every_row and not complement)


def _prior_from_counts(name: str, counts) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) \
            or float(counts.sum()) <= 0:
        raise ValueError(f"{name}: expected non-negative finite class counts with a positive sum")
    return (counts / counts.sum()).float()


def adello_loss_from_args(args: Args, lb_class_counts, ulb_class_counts=None,
                          **overrides) -> ADELLOLoss:
    """`ADELLOLoss` configured as the released run `args` with labeled class counts
    `lb_class_counts` ([C] counts or frequencies) and, for `adello_mode="adello_gt"`, the
    unlabeled ones `ulb_class_counts` (the ground-truth target prior; without them the released
    code's fallback, the labeled prior, with a warning). `overrides` go to ADELLOLoss as they
    are (e.g. backend="cpu", flexda=False with lambda_d=0.0 for USB's FixMatch,
    validate=True)."""
    prior_lb = _prior_from_counts("lb_class_counts", lb_class_counts)
    kw = adello_loss_kwargs(args)
    if _get(args, "adello_mode") == "adello_gt":
        if ulb_class_counts is None:
            warnings.warn("adello_mode='adello_gt' without ulb_class_counts: the target prior "
                          "is the labeled prior (the released code's fallback when the "
                          "unlabeled set has no targets)", stacklevel=2)
            kw["prior_target"] = prior_lb
        else:
            kw["prior_target"] = _prior_from_counts("ulb_class_counts", ulb_class_counts)
            if kw["prior_target"].numel() != prior_lb.numel():
                raise ValueError(f"ulb_class_counts: {kw['prior_target'].numel()} classes but "
                                 f"lb_class_counts has {prior_lb.numel()}")
    elif ulb_class_counts is not None:
        raise ValueError("ulb_class_counts: only used with adello_mode='adello_gt' (the "
                         "'adello' mode estimates the unlabeled prior)")
    kw.setdefault("validate", False)
    kw.update(overrides)
    return ADELLOLoss(prior_lb, **kw)


def train_step_outputs(crit: ADELLOLoss, outputs, y_lb: torch.Tensor, *, lb_in_ulb_mask=None,
                       sync: bool = True):
    """The released `train_step`'s results from one forward of cat(x_lb, x_ulb_w, x_ulb_s):
    `outputs` is the model's dict (`outputs['logits']` [B + 2N, C], optional `outputs['feat']`)
    or the logits tensor itself; `y_lb` [B]; `lb_in_ulb_mask` [N] (the released train_step's
    argument with `return_lb_in_ulb_mask`): the prior is updated from the rows where it is
    < 1 only, and left as it is when there is none. Runs one `crit` step (its prior update included:
    the released hooks read the prior as `crit.prior_ulb`, e.g. `get_p_hat = lambda:
    crit.prior_ulb`) and returns
    (out_dict, log_dict): out_dict = {'loss', 'feat'} (feat split as the released code does, or
    None) and log_dict with the released keys, as Python floats when `sync` (one host sync, as
    the released logging does) or as 0-d tensors otherwise."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs
    b = y_lb.shape[0]
    if logits.dim() != 2 or (logits.shape[0] - b) <= 0 or (logits.shape[0] - b) % 2:
        raise ValueError(f"outputs: expected logits of B + 2N rows for B = {b} labels, got shape "
                         f"{tuple(logits.shape)}")
    z_lb = logits[:b]
    z_w, z_s = logits[b:].chunk(2)
    alpha = crit.alpha()                      # this step's alpha_t (read before it advances)
    weight = None
    if lb_in_ulb_mask is not None:
        mask = torch.as_tensor(lb_in_ulb_mask, device=z_w.device)
        if mask.shape != (z_w.shape[0],):
            raise ValueError(f"lb_in_ulb_mask: expected shape ({z_w.shape[0]},) (one entry per "
                             f"unlabeled row), got {tuple(mask.shape)}")
        weight = (mask < 1).float()           # the released selection: truly unlabeled rows
    out = crit(z_lb, y_lb, z_w.detach(), z_s, prior_weight=weight)
    feat = outputs.get("feat") if isinstance(outputs, Mapping) else None
    feat_dict = None
    if feat is not None:
        f_w, f_s = feat[b:].chunk(2)
        feat_dict = {"x_lb": feat[:b], "x_ulb_w": f_w, "x_ulb_s": f_s}
    vals = {"train/sup_loss": out.loss_sup, "train/unsup_loss": out.loss_unsup,
            "train/total_loss": out.loss.detach(), "train/util_ratio": out.mask.mean()}
    if crit.lambda_d > 0:  # (0 before distill_start; the released code omits the keys then)
        vals["train/distill_loss"] = out.loss_distill
        vals["train/distill_util_ratio"] = (1.0 - out.mask).mean()
        vals["train/distill_temperature"] = crit.temperature.detach()
    if crit.flexda:
        vals["train/cte_alpha"] = alpha
    if sync:
        keys = list(vals)
        host = torch.stack([v.double().reshape(()) for v in vals.values()]).tolist()
        vals = {k: (float(v) if math.isfinite(v) else v) for k, v in zip(keys, host)}
    return {"loss": out.loss, "feat": feat_dict}, vals
