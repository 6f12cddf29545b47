"""adello_kernels.integrations.usb: the released ADELLO code's arguments -> ADELLOLoss, for every
released config, the train_step outputs in the released format, and the README's drop-in snippet
run as printed."""
import argparse
import os
import re

import pytest
import torch

import adello_kernels as ak
from adello_kernels.integrations import usb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The released configs, emasa/ADELLO-LTSSL config/classic_cv_imb/fixmatch_adello/ (commit
# b5f6013), as data: the keys the mapping reads. Every file has p_cutoff 0.95, ulb_loss_ratio
# 1.0, num_train_iter 262144, adello_alpha_min 0.1, adello_k 2.0, adello_alpha_from_epoch False,
# distill_complement True, imbalance_distill_with_warmup True, and sets none of lambda_distill,
# distill_T, distill_all, adello_mode, adello_ema_p, return_lb_in_ulb_mask (argparse defaults).
SHARED = {"p_cutoff": 0.95, "ulb_loss_ratio": 1.0, "num_train_iter": 262144,
          "adello_alpha_min": 0.1, "adello_k": 2.0, "adello_alpha_from_epoch": False,
          "distill_complement": True, "imbalance_distill_with_warmup": True}
# file (prefix fixmatch_adello_, suffix .yaml): (num_classes, num_labels N1, lb_imb_ratio,
# distill_start_iter, nominal labeled total)
CONFIGS = {
    "cifar100_lb150_100_ulb300_100_0": (100, 150, 100, 50000, 3218),
    "cifar100_lb150_10_ulb300_-10_0": (100, 150, 10, 50000, 5835),
    "cifar100_lb150_10_ulb300_10_0": (100, 150, 10, 50000, 5835),
    "cifar100_lb150_15_ulb300_15_0": (100, 150, 15, 50000, 5153),
    "cifar100_lb150_20_ulb300_20_0": (100, 150, 20, 50000, 4741),
    "cifar100_lb150_50_ulb300_-50_0": (100, 150, 50, 50000, 3751),
    "cifar100_lb150_50_ulb300_100_0": (100, 150, 50, 50000, 3751),
    "cifar100_lb150_50_ulb300_1_0": (100, 150, 50, 50000, 3751),
    "cifar100_lb150_50_ulb300_50_0": (100, 150, 50, 50000, 3751),
    "cifar100_lb50_10_ulb400_10_0": (100, 50, 10, 50000, 1911),
    "cifar100_lb50_20_ulb400_20_0": (100, 50, 20, 50000, 1545),
    "cifar100_lb50_50_ulb400_50_0": (100, 50, 50, 50000, 1219),
    "cifar10_lb1500_100_ulb3000_-100_0": (10, 1500, 100, 50000, 3720),
    "cifar10_lb1500_100_ulb3000_100_0": (10, 1500, 100, 50000, 3720),
    "cifar10_lb1500_100_ulb3000_150_0": (10, 1500, 100, 50000, 3720),
    "cifar10_lb1500_100_ulb3000_1_0": (10, 1500, 100, 50000, 3720),
    "cifar10_lb1500_150_ulb3000_150_0": (10, 1500, 150, 50000, 3496),
    "cifar10_lb500_100_ulb4000_-100_0": (10, 500, 100, 50000, 1236),
    "cifar10_lb500_100_ulb4000_100_0": (10, 500, 100, 50000, 1236),
    "cifar10_lb500_100_ulb4000_150_0": (10, 500, 100, 50000, 1236),
    "cifar10_lb500_100_ulb4000_1_0": (10, 500, 100, 50000, 1236),
    "cifar10_lb500_150_ulb4000_150_0": (10, 500, 150, 50000, 1162),
    "eurosat_lb700_100_ulb1400_-100_0": (10, 700, 100, 50000, 1733),
    "eurosat_lb700_100_ulb1400_100_0": (10, 700, 100, 50000, 1733),
    "eurosat_lb700_100_ulb1400_1_0": (10, 700, 100, 50000, 1733),
    "stl10_lb150_10_ulbNone_1.0_0": (10, 150, 10, 0, 609),
    "stl10_lb150_20_ulbNone_1.0_0": (10, 150, 20, 0, 507),
    "stl10_lb450_10_ulbNone_1.0_0": (10, 450, 10, 0, 1835),
    "stl10_lb450_20_ulbNone_1.0_0": (10, 450, 20, 0, 1528),
    "tissuemnist_lb6500_100_ulb13000_-100_0": (8, 6500, 100, 50000, 13411),
    "tissuemnist_lb6500_100_ulb13000_100_0": (8, 6500, 100, 50000, 13411),
    "tissuemnist_lb6500_100_ulb13000_1_0": (8, 6500, 100, 50000, 13411),
}


def released_lb_counts(n1: int, imb: float, c: int) -> list[int]:
    """The released make_imbalance_data labeled counts: N_c = int(N1 * imb^(-c / (C - 1)))."""
    return [int(n1 * imb ** (-k / (c - 1))) for k in range(c)]


def test_the_config_table_has_every_released_file():
    assert len(CONFIGS) == 32


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_released_config_maps_to_the_same_method(name):
    c, n1, imb, start, total = CONFIGS[name]
    counts = released_lb_counts(n1, imb, c)
    assert sum(counts) == total, "the config table or the count formula is mistyped"
    args = argparse.Namespace(**SHARED, distill_start_iter=start, num_classes=c)
    crit = usb.adello_loss_from_args(args, counts)
    assert (crit.threshold, crit.lambda_u, crit.lambda_d) == (0.95, 1.0, 1.0)
    assert (crit.alpha_min, crit.power, crit.prior_momentum) == (0.1, 2.0, 0.999)
    assert crit.total_steps == 262144 and crit.distill_start == start
    assert float(crit.temperature) == 1.0 and not crit.imbalance_aware  # distill_T is None
    assert crit.flexda and crit.num_classes == c
    want = torch.tensor(counts, dtype=torch.float64) / total
    torch.testing.assert_close(crit.prior_lb.double(), want, rtol=1e-6, atol=1e-7)


def test_temperature_and_distillation_switches():
    base = dict(SHARED, distill_start_iter=None)
    assert usb.adello_loss_kwargs(base)["distill_start"] == 0          # None = from step 0
    kw = usb.adello_loss_kwargs({**base, "distill_T": 0.5})             # no start: warm-up unused
    assert kw["temperature"] == 0.5
    kw = usb.adello_loss_kwargs({**base, "distill_T": 0.5, "distill_start_iter": 10})
    assert kw["temperature"] == "imbalance_aware" and kw["distill_start"] == 10
    kw = usb.adello_loss_kwargs({**base, "distill_T": 2.0, "distill_start_iter": 10,
                                 "imbalance_distill_with_warmup": False})
    assert kw["temperature"] == 2.0
    assert usb.adello_loss_kwargs({**base, "distill_complement": False})["lambda_d"] == 0.0
    assert usb.adello_loss_kwargs({**base, "lambda_distill": 0.3})["lambda_d"] == 0.3


@pytest.mark.parametrize("key,value", [("adello_mode", "udal")])
def test_options_not_supported_yet_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"^{key}"):
        usb.adello_loss_kwargs({**SHARED, key: value})


def test_alpha_from_epoch_maps_to_the_epoch_schedule():
    """adello_alpha_from_epoch=True: alpha from it // n over num_train_iter // n with
    n = num_train_iter // epoch (USB's num_iter_per_epoch), constant within an epoch."""
    args = dict(SHARED, num_train_iter=100, epoch=7, adello_alpha_from_epoch=True)
    kw = usb.adello_loss_kwargs(args)
    assert kw["alpha_epoch_steps"] == 14
    assert usb.adello_loss_kwargs(SHARED)["alpha_epoch_steps"] == 1
    crit = usb.adello_loss_from_args(args, [3, 2, 1])
    for t in (0, 13, 14, 27, 28, 97, 98, 99):
        crit.step.fill_(t)
        want = 1.0 - 0.9 * ((t // 14) / (100 // 14)) ** 2        # the released formula
        assert float(crit.alpha()) == pytest.approx(want, abs=1e-12), t
    for bad in (0, 101, 2.5, None):
        with pytest.raises(ValueError, match="^epoch"):
            usb.adello_loss_kwargs({**args, "epoch": bad})


def test_adello_gt_takes_the_unlabeled_class_counts_as_target():
    args = dict(SHARED, adello_mode="adello_gt")
    crit = usb.adello_loss_from_args(args, [6, 3, 1], ulb_class_counts=[1, 1, 2])
    torch.testing.assert_close(crit.prior_target, torch.tensor([0.25, 0.25, 0.5]))
    with pytest.warns(UserWarning, match="labeled prior"):      # the released fallback
        crit = usb.adello_loss_from_args(args, [6, 3, 1])
    torch.testing.assert_close(crit.prior_target, crit.prior_lb)
    assert usb.adello_loss_from_args(SHARED, [6, 3, 1]).prior_target is None
    with pytest.raises(ValueError, match="^ulb_class_counts"):
        usb.adello_loss_from_args(SHARED, [6, 3, 1], ulb_class_counts=[1, 1, 1])
    with pytest.raises(ValueError, match="^ulb_class_counts"):
        usb.adello_loss_from_args(args, [6, 3, 1], ulb_class_counts=[1, 1])
    with pytest.raises(ValueError, match="^ulb_class_counts"):
        usb.adello_loss_from_args(args, [6, 3, 1], ulb_class_counts=[0, 0, 0])


@pytest.mark.parametrize("backend", [b for b in ak.available_backends() if b != "triton"])
def test_lb_in_ulb_mask_estimates_the_prior_from_truly_unlabeled_rows(backend):
    """The released compute_prob with lb_in_ulb_mask: delta_p = mean of probs[mask < 1], and no
    update when no row qualifies (p_hat = m p_hat + (1 - m) p_hat)."""
    c, b, n = 5, 3, 8
    args = dict(SHARED, num_train_iter=10, return_lb_in_ulb_mask=True, adello_ema_p=0.7)
    crit = usb.adello_loss_from_args(args, [5, 4, 3, 2, 1], backend=backend)
    p_hat = torch.full((c,), 1.0 / c, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    for it in range(4):
        logits = torch.randn(b + 2 * n, c, generator=gen) * 3
        y = torch.randint(0, c, (b,), generator=gen)
        lb_in_ulb = (torch.rand(n, generator=gen) < 0.4).long()
        if it == 2:
            lb_in_ulb.fill_(1)                      # every unlabeled row is a labeled image
        usb.train_step_outputs(crit, logits, y, lb_in_ulb_mask=lb_in_ulb)
        probs = torch.softmax(logits[b:b + n].double(), -1)
        keep = lb_in_ulb < 1
        delta = probs[keep].mean(0) if bool(keep.any()) else p_hat
        p_hat = 0.7 * p_hat + 0.3 * delta
        torch.testing.assert_close(crit.prior_ulb.double(), p_hat, rtol=0, atol=1e-6)
    assert int(crit.skipped_updates) == 0
    with pytest.raises(ValueError, match="^lb_in_ulb_mask"):
        usb.train_step_outputs(crit, logits, y, lb_in_ulb_mask=torch.zeros(n + 1))


def released_step(z_l, y, z_w, z_s, p_data, p_hat, p_target, it, args):
    """One step of the released losses written from their equations in float64 (its
    FlexDASupervisedLoss / FlexDAConsistencyLoss with adello_mode, adello_alpha_from_epoch,
    and fixmatch_distill's complement distillation at T = 1): (total loss, next p_hat)."""
    eps, total = 1e-9, args["num_train_iter"]
    if args.get("adello_alpha_from_epoch"):
        n_ep = total // args["epoch"]
        u, big_u = it // n_ep, total // n_ep
    else:
        u, big_u = it, total
    a = 1.0 - (1.0 - args["adello_alpha_min"]) * (u / big_u) ** args["adello_k"]
    tgt = p_hat if p_target is None else p_target
    tgt = tgt ** a / (tgt ** a).sum()
    sup = torch.nn.functional.cross_entropy(z_l + torch.log((p_data + eps) / (tgt + eps)), y)
    probs = torch.softmax(z_w, -1)
    conf, yhat = probs.max(-1)
    mask = (conf >= args["p_cutoff"]).double()
    adj = z_s + torch.log((p_hat + eps) / (tgt + eps))
    unsup = (torch.nn.functional.cross_entropy(adj, yhat, reduction="none") * mask).mean()
    loss = sup + args["ulb_loss_ratio"] * unsup
    if it >= (args.get("distill_start_iter") or 0):
        soft = -(probs * torch.log_softmax(adj, -1)).sum(-1)
        rows = 1 - mask if args.get("distill_complement", True) else torch.ones_like(mask)
        loss = loss + (soft * rows).mean()
    m = args.get("adello_ema_p", 0.999)
    return loss, m * p_hat + (1 - m) * probs.mean(0)


@pytest.mark.parametrize("backend", [b for b in ak.available_backends() if b != "triton"])
@pytest.mark.parametrize("mode,from_epoch,every_row", [
    ("adello", True, False), ("adello_gt", False, False), ("adello_gt", True, False),
    ("adello", False, True), ("adello_gt", True, True)])
def test_released_options_match_the_released_equations(backend, mode, from_epoch, every_row):
    """adello_gt, adello_alpha_from_epoch and distill_all through the adapter, several steps
    against the released losses written from their equations (float64 loop): loss and prior
    trajectory."""
    c, b, n = 6, 5, 16
    args = dict(SHARED, num_train_iter=12, epoch=4, adello_alpha_from_epoch=from_epoch,
                adello_mode=mode, distill_start_iter=3, adello_ema_p=0.8, p_cutoff=0.6,
                distill_complement=not every_row, distill_all=every_row)
    lb, ulb = [9, 6, 4, 3, 2, 1], [1, 2, 3, 5, 8, 13]
    crit = usb.adello_loss_from_args(args, lb, ulb if mode == "adello_gt" else None,
                                     backend=backend)
    p_data = torch.tensor(lb, dtype=torch.float64) / sum(lb)
    p_target = torch.tensor(ulb, dtype=torch.float64) / sum(ulb) if mode == "adello_gt" else None
    p_hat = torch.full((c,), 1.0 / c, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    for it in range(12):
        z = torch.randn(b + 2 * n, c, generator=gen) * 3
        y = torch.randint(0, c, (b,), generator=gen)
        out = crit(z[:b], y, z[b:b + n], z[b + n:])
        zd = z.double()
        want, p_hat = released_step(zd[:b], y, zd[b:b + n], zd[b + n:], p_data, p_hat,
                                    p_target, it, args)
        assert float(out.loss) == pytest.approx(float(want), rel=2e-5, abs=1e-5), it
        torch.testing.assert_close(crit.prior_ulb.double(), p_hat, rtol=0, atol=2e-6)


def test_distill_all_maps_as_the_released_distill_mask():
    """The released get_distill_mask: 1 - mask with distill_complement (distill_all then has no
    effect), every row with distill_all alone, no distillation with neither."""
    kw = usb.adello_loss_kwargs({**SHARED, "distill_complement": False, "distill_all": True,
                                 "lambda_distill": 0.4})
    assert kw["distill_all"] and kw["lambda_d"] == 0.4
    kw = usb.adello_loss_kwargs({**SHARED, "distill_all": True})
    assert not kw["distill_all"] and kw["lambda_d"] == 1.0
    kw = usb.adello_loss_kwargs({**SHARED, "distill_complement": False})
    assert not kw["distill_all"] and kw["lambda_d"] == 0.0


def test_bad_counts_and_missing_iterations_are_clear_errors():
    with pytest.raises(ValueError, match="^lb_class_counts"):
        usb.adello_loss_from_args(SHARED, [0, 0, 0])
    with pytest.raises(ValueError, match="^num_train_iter"):
        usb.adello_loss_kwargs({k: v for k, v in SHARED.items() if k != "num_train_iter"})


@pytest.mark.parametrize("backend", [b for b in ak.available_backends() if b != "triton"])
def test_train_step_outputs_follow_the_released_split_and_log_keys(backend):
    """From one forward of cat(x_lb, x_ulb_w, x_ulb_s): the same losses and state as calling the
    criterion on the split logits, the feat dict split the same way, the released log keys."""
    c, b, n = 7, 4, 6
    counts = released_lb_counts(50, 10, c)
    args = dict(SHARED, num_train_iter=20, distill_start_iter=2)
    crit = usb.adello_loss_from_args(args, counts, backend=backend)
    twin = usb.adello_loss_from_args(args, counts, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        logits = torch.randn(b + 2 * n, c, generator=gen) * 4
        feat = torch.randn(b + 2 * n, 3, generator=gen)
        y = torch.randint(0, c, (b,), generator=gen)
        out_dict, log = usb.train_step_outputs(crit, {"logits": logits, "feat": feat}, y)
        want = twin(logits[:b], y, logits[b:b + n], logits[b + n:])
        torch.testing.assert_close(out_dict["loss"], want.loss)
        assert torch.equal(out_dict["feat"]["x_ulb_s"], feat[b + n:])
        assert log["train/sup_loss"] == pytest.approx(float(want.loss_sup))
        assert log["train/util_ratio"] == pytest.approx(float(want.mask.mean()))
        assert log["train/distill_loss"] == pytest.approx(float(want.loss_distill))
        assert log["train/cte_alpha"] == pytest.approx(ak.alpha_schedule(step, 20))
        assert set(log) == {"train/sup_loss", "train/unsup_loss", "train/total_loss",
                            "train/util_ratio", "train/distill_loss",
                            "train/distill_util_ratio", "train/distill_temperature",
                            "train/cte_alpha"}
    torch.testing.assert_close(crit.prior_ulb, twin.prior_ulb)
    assert int(crit.step) == 4
    with pytest.raises(ValueError, match="^outputs"):
        usb.train_step_outputs(crit, torch.randn(b + 3, c), y)


def test_readme_drop_in_snippet_runs_as_printed():
    """Every ```python block of the README's drop-in section, executed in order as printed."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("### Drop-in: the released ADELLO code and USB", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    runnable = [blk for blk in blocks if "# runs as printed" in blk]
    assert runnable, "the drop-in section has no runnable snippet"
    scope: dict = {}
    for blk in runnable:
        exec(compile(blk, "README.md", "exec"), scope)
    assert int(scope["crit"].step) == 3
