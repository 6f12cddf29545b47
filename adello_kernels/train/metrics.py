"""Evaluation metrics on raw logits (the EMA model's, no adjustment), docs/training.md.

    top1            fraction of correct top-1 predictions
    balanced_acc    mean over classes (present in the test set) of the per-class recall
    per_class_acc   [C] per-class recall (NaN for classes without test images)
    ece, mce        expected / maximum calibration error of the top-label confidence, 15
                    equal-width bins (torchmetrics `multiclass_calibration_error`, norm l1 / max)
    prior_kl        KL(true unlabeled prior || estimate) = sum_c p_c log(p_c / q_c), over p_c > 0

All values are fractions (0..1), not percentages.
"""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

N_BINS = 15


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> dict:
    """Per-bin count, mean confidence and accuracy of the top label, binned like torchmetrics
    (bin i = [i/n, (i+1)/n), confidence 1 in the last bin)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype, device=conf.device)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(
        0, idx, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(
        0, idx, correct)
    nz = count.clamp_min(1)
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": (conf_sum / nz).tolist(), "accuracy": (acc_sum / nz).tolist()}


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Metrics of logits [N, C] against labels [N] (any device); plus the reliability bins."""
    probs = torch.softmax(logits.float(), dim=1)
    pred = probs.argmax(1)
    correct = pred == labels
    total_c = torch.bincount(labels, minlength=num_classes).double()
    correct_c = torch.bincount(labels[correct], minlength=num_classes).double()
    per_class = torch.where(total_c > 0, correct_c / total_c.clamp_min(1), float("nan"))
    present = total_c > 0
    ece = multiclass_calibration_error(probs, labels, num_classes, n_bins=N_BINS, norm="l1")
    mce = multiclass_calibration_error(probs, labels, num_classes, n_bins=N_BINS, norm="max")
    return {
        "top1": float(correct.double().mean()),
        "balanced_acc": float(per_class[present].mean()),
        "per_class_acc": [None if math.isnan(v) else v for v in per_class.tolist()],
        "ece": float(ece),
        "mce": float(mce),
        "reliability": reliability_bins(probs, labels),
    }


def prior_kl(true_prior, estimate) -> float | None:
    """KL(true || estimate) over the classes with true mass; None when the truth is unknown."""
    if true_prior is None or estimate is None:
        return None
    p = torch.as_tensor(true_prior, dtype=torch.float64).cpu()
    q = torch.as_tensor(estimate, dtype=torch.float64).cpu().clamp_min(1e-12)
    m = p > 0
    return float((p[m] * (p[m] / q[m]).log()).sum())
