"""The pure-PyTorch reference against hand-worked cases, autograd against the closed-form
gradients of docs/method.md (Gradients), and the edge cases every kernel must match."""
import math

import pytest
import torch

from adello_kernels.reference import (
    alpha_schedule,
    flexda_fwd_reference,
    flexda_reference,
    logit_adjustments,
)

from utils import make_inputs, reference_op_outputs

F64 = dict(dtype=torch.float64)


def t(*rows):
    return torch.tensor(rows, **F64)


def test_hand_worked_uniform_priors():
    # C = 2, B = 1, N = 2, P_L = Q = [.5, .5] -> Qa = uniform, ds = du = 0 for every alpha.
    # labeled: z_l = [0, 0], y = 0: softmax = [.5, .5], L_s = log 2, dL/dz_l = [-.5, .5].
    # weak row 0 = [log 99, 0]: pw = [.99, .01] -> M = 1 (>= .95), yhat = 0.
    # weak row 1 = [0, 0]:      pw = [.5, .5]   -> M = 0, yhat = 0 (first index on the tie).
    # strong row 0 = [0, 0]: CE(0, [.5, .5]) = log 2 -> L_u = log 2 / N = log 2 / 2.
    # strong row 1 = [0, log 3]: p = [.25, .75]; H([.5, .5], p) = -.5 log .25 - .5 log .75
    #   -> L_d = H / 2 = (log 4 + log 4/3) / 4.
    # prior_batch = mean([.99, .01], [.5, .5]) = [.745, .255].
    # dL/dz_s row 0 = (1/2)([.5, .5] - [1, 0]) = [-.25, .25]; row 1 = (1/2)(p - q) = [-.125, .125].
    z_l = t([0.0, 0.0]).requires_grad_()
    z_w = t([math.log(99.0), 0.0], [0.0, 0.0])
    z_s = t([0.0, 0.0], [0.0, math.log(3.0)]).requires_grad_()
    half = t(0.5, 0.5)
    out = flexda_reference(z_l, torch.tensor([0]), z_w, z_s, half, half, 0.3)
    l_d = (math.log(4.0) + math.log(4.0 / 3.0)) / 4.0
    assert out.loss_sup.item() == pytest.approx(math.log(2.0), abs=1e-12)
    assert out.loss_unsup.item() == pytest.approx(math.log(2.0) / 2.0, abs=1e-12)
    assert out.loss_distill.item() == pytest.approx(l_d, abs=1e-12)
    assert out.loss.item() == pytest.approx(1.5 * math.log(2.0) + l_d, abs=1e-12)
    assert out.mask.tolist() == [1.0, 0.0]
    assert out.pseudo_labels.tolist() == [0, 0]
    torch.testing.assert_close(out.prior_batch, t(0.745, 0.255))
    g_l, g_s = torch.autograd.grad(out.loss, (z_l, z_s))
    torch.testing.assert_close(g_l, t([-0.5, 0.5]))
    torch.testing.assert_close(g_s, t([-0.25, 0.25], [-0.125, 0.125]))


def test_hand_worked_adjustments_and_temperature():
    # P_L = Q = [.8, .2], alpha = 0 -> Qa = [.5, .5]; ds = du = [log 1.6, log .4] (eps ~1e-9).
    # labeled z_l = [0, 0], y = 1: softmax(ds) = [.8, .2] -> L_s = log 5, dL/dz_l = [.8, -.8].
    # weak z_w = [0, 2 log 3]: pw = [.1, .9] -> M = 0, yhat = 1, so only distillation acts.
    # T = 2: q = softmax([0, log 3]) = [.25, .75]; strong z_s = -du so a = 0, softmax(a/T) = .5s:
    #   H = log 2 -> L_d = log 2; dL/dz_s = (1/T)(softmax(a/T) - q) = [.125, -.125].
    p = t(0.8, 0.2)
    ds, du = logit_adjustments(p, p, 0.0)
    torch.testing.assert_close(ds, t(math.log(1.6), math.log(0.4)))
    torch.testing.assert_close(du, ds)
    z_l = t([0.0, 0.0]).requires_grad_()
    z_s = (-du).reshape(1, 2).clone().requires_grad_()
    z_w = t([0.0, 2 * math.log(3.0)])
    out = flexda_reference(z_l, torch.tensor([1]), z_w, z_s, p, p, 0.0, temperature=2.0)
    assert out.loss_sup.item() == pytest.approx(math.log(5.0), abs=1e-8)
    assert out.loss_unsup.item() == 0.0
    assert out.loss_distill.item() == pytest.approx(math.log(2.0), abs=1e-8)
    assert out.mask.tolist() == [0.0] and out.pseudo_labels.tolist() == [1]
    g_l, g_s = torch.autograd.grad(out.loss, (z_l, z_s))
    torch.testing.assert_close(g_l, t([0.8, -0.8]))
    torch.testing.assert_close(g_s, t([0.125, -0.125]))
    # alpha = 1: Qa = Q, so du = 0 and ds = log P_L - log Q = 0 here.
    ds1, du1 = logit_adjustments(p, p, 1.0)
    assert ds1.abs().max() < 1e-12 and du1.abs().max() < 1e-12


def test_threshold_is_inclusive_on_the_probability():
    # weak probabilities [.5, .25, .25] are exact in binary: threshold .5 must mask the row
    # (>=, inclusive), .5 + 1e-7 must not.
    z_w = torch.log(t([0.5, 0.25, 0.25]))
    args = (t([0.0, 0.0, 0.0]), torch.tensor([0]), z_w, t([0.0, 0.0, 0.0]),
            t(1 / 3, 1 / 3, 1 / 3), t(1 / 3, 1 / 3, 1 / 3), 1.0)
    assert flexda_reference(*args, threshold=0.5).mask.item() == 1.0
    assert flexda_reference(*args, threshold=0.5 + 1e-7).mask.item() == 0.0


def test_alpha_schedule_points():
    T = 1000
    assert alpha_schedule(0, T) == 1.0
    assert alpha_schedule(T // 2, T) == pytest.approx(1 - 0.9 * 0.25)
    assert alpha_schedule(T - 1, T) == pytest.approx(1 - 0.9 * ((T - 1) / T) ** 2)
    assert alpha_schedule(5 * T, T) == pytest.approx(0.1)  # clamped past T_max
    assert alpha_schedule(T // 2, T, alpha_min=0.5, power=1.0) == pytest.approx(0.75)
    step = torch.tensor(T // 2)
    assert float(alpha_schedule(step, T)) == pytest.approx(1 - 0.9 * 0.25)


@pytest.mark.parametrize("b,n,c,temperature,distill", [
    (3, 5, 7, 1.0, True), (1, 1, 2, 0.5, True), (16, 9, 33, 2.5, True), (4, 6, 10, 1.0, False),
    (2, 3, 1, 1.7, True)])
def test_gradcheck_reference(b, n, c, temperature, distill):
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, scale=3.0, dtype=torch.float64, seed=c)
    z_l.requires_grad_()
    z_s.requires_grad_()

    def f(zl, zs):
        return flexda_reference(zl, y, z_w, zs, p_l, q, 0.6, temperature=temperature,
                                distill=distill).loss

    # The large case checks a random projection of the Jacobian (fast_mode): the full one costs
    # ~800 reference evaluations for little more coverage.
    assert torch.autograd.gradcheck(f, (z_l, z_s), fast_mode=(b + n) * c > 200)


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_matches_autograd(seed):
    gen = torch.Generator().manual_seed(seed)
    b, n = (int(v) for v in torch.randint(1, 60, (2,), generator=gen))
    c = int(torch.randint(1, 300, (1,), generator=gen))
    scale = float(torch.empty(1).uniform_(1, 30, generator=gen))
    temperature = [1.0, 0.7, 2.0][seed % 3]
    distill = seed % 4 != 3
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, scale=scale, dtype=torch.float64, seed=seed)
    z_l.requires_grad_()
    z_s.requires_grad_()
    kw = dict(threshold=0.9, lambda_u=1.3, lambda_d=0.7, distill=distill, temperature=temperature)
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.4, **kw)
    g_l, g_s = torch.autograd.grad(out.loss, (z_l, z_s))
    loss, terms, mask, pl, prior, cg_l, cg_s = reference_op_outputs(
        z_l.detach(), y, z_w, z_s.detach(), p_l, q, 0.4, **kw)
    torch.testing.assert_close(loss, out.loss.detach())
    torch.testing.assert_close(terms, torch.stack([out.loss_sup, out.loss_unsup,
                                                   out.loss_distill]))
    assert torch.equal(mask, out.mask) and torch.equal(pl, out.pseudo_labels)
    torch.testing.assert_close(prior, out.prior_batch)
    torch.testing.assert_close(cg_l, g_l)
    torch.testing.assert_close(cg_s, g_s)


def test_single_class_is_trivial():
    # C = 1: every softmax is 1, every row is confident, every CE is 0, every gradient 0.
    z_l, y, z_w, z_s, p_l, q = make_inputs(3, 4, 1, dtype=torch.float64)
    z_l.requires_grad_()
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5)
    assert out.loss.item() == 0.0 and out.mask.tolist() == [1.0] * 4
    assert out.pseudo_labels.tolist() == [0] * 4 and out.prior_batch.tolist() == [1.0]
    assert torch.autograd.grad(out.loss, z_l)[0].abs().max() == 0.0


def test_all_masked_and_none_masked():
    z_l, y, z_w, z_s, p_l, q = make_inputs(4, 8, 5, dtype=torch.float64, seed=3)
    confident = z_w.clone()
    confident[:, 2] += 100.0
    out = flexda_reference(z_l, y, confident, z_s, p_l, q, 0.5)
    assert out.mask.tolist() == [1.0] * 8 and out.loss_distill.item() == 0.0
    assert out.pseudo_labels.tolist() == [2] * 8
    flat = torch.zeros_like(z_w)
    out = flexda_reference(z_l, y, flat, z_s, p_l, q, 0.5)
    assert out.mask.tolist() == [0.0] * 8 and out.loss_unsup.item() == 0.0
    assert out.pseudo_labels.tolist() == [0] * 8  # ties: first index
    assert out.loss_distill.item() > 0.0


def test_extreme_logits_stay_finite():
    gen = torch.Generator().manual_seed(0)
    z = (torch.randint(0, 2, (3, 6, 11), generator=gen) * 2 - 1).double() * 1e4
    z_l, z_w, z_s = z.unbind()
    z_l = z_l[:4]
    prior = torch.full((11,), 1 / 11, **F64)
    for temperature in (1.0, 0.3, 4.0):
        out = flexda_reference(z_l, torch.arange(4), z_w, z_s, prior, prior, 0.5,
                               temperature=temperature)
        for v in out:
            assert bool(torch.isfinite(v.double()).all())


def test_zero_prior_entries_keep_logs_finite():
    z_l, y, z_w, z_s, _, _ = make_inputs(4, 6, 6, dtype=torch.float64)
    p = t(0.5, 0.5, 0.0, 0.0, 0.0, 0.0)
    for alpha in (0.0, 0.5, 1.0):
        ds, du = logit_adjustments(p, p, alpha)
        assert bool(torch.isfinite(ds).all() and torch.isfinite(du).all())
        assert bool(torch.isfinite(flexda_reference(z_l, y, z_w, z_s, p, p, alpha).loss))


def test_distill_off_matches_lambda_d_zero():
    z_l, y, z_w, z_s, p_l, q = make_inputs(5, 7, 9, dtype=torch.float64, seed=5)
    off = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, distill=False, temperature=2.0)
    zero = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, lambda_d=0.0, temperature=2.0)
    assert off.loss_distill.item() == 0.0 and zero.loss_distill.item() > 0.0
    torch.testing.assert_close(off.loss, zero.loss)
    gate = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, distill=torch.tensor(False))
    assert gate.loss_distill.item() == 0.0


def test_low_precision_inputs_accumulate_in_fp32():
    z_l, y, z_w, z_s, p_l, q = make_inputs(8, 8, 17, dtype=torch.bfloat16, seed=2)
    z_l.requires_grad_()
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5)
    assert out.loss.dtype == torch.float32 and out.prior_batch.dtype == torch.float32
    assert torch.autograd.grad(out.loss, z_l)[0].dtype == torch.bfloat16
    ref = flexda_reference(z_l.double(), y, z_w.double(), z_s.double(), p_l, q, 0.5)
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * abs(ref.loss.item())


def test_closed_form_reference_runs_in_input_dtype():
    z_l, y, z_w, z_s, p_l, q = make_inputs(3, 4, 5, dtype=torch.float16)
    ds, du = logit_adjustments(p_l, q, 0.5, dtype=torch.float32)
    hp = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # hparams slots: ops/flexda.py
    out = flexda_fwd_reference(z_l, y, z_w, z_s, ds, du, hp, 0.95)
    assert out[0].dtype == torch.float32 and out[5].dtype == torch.float16


@pytest.mark.parametrize("label", [-1, 5, 1000])
def test_label_outside_the_classes_gives_a_nan_row(label):
    """The chosen behaviour every backend copies (validation off): a label outside [0, C) makes
    that row's CE NaN and its gradient row all NaN, in autograd and in the closed form alike;
    every other row, the unlabeled terms and grad_ulb_s are those of the batch with a valid
    label there."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(4, 6, 5, dtype=torch.float64, seed=2)
    bad = y.clone()
    bad[2] = label
    kw = dict(temperature=0.7, lambda_u=1.3, threshold=0.9)
    outs = []
    for labels in (bad, y):
        a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = flexda_reference(a, labels, z_w, s, p_l, q, 0.5, **kw)
        outs.append((out, *torch.autograd.grad(out.loss, (a, s))))
    (out, g_l, g_s), (clean, c_l, c_s) = outs
    assert math.isnan(out.loss.item()) and math.isnan(out.loss_sup.item())
    assert torch.equal(out.loss_unsup, clean.loss_unsup)
    assert torch.equal(out.loss_distill, clean.loss_distill)
    rows = torch.isnan(g_l).all(1)
    assert rows.tolist() == [False, False, True, False]
    torch.testing.assert_close(g_l[~rows], c_l[~rows], rtol=0, atol=0)
    torch.testing.assert_close(g_s, c_s, rtol=0, atol=0)
    # the closed form (the fused op's contract) agrees, NaN pattern included
    loss, terms, _, _, _, cg_l, cg_s = reference_op_outputs(z_l, bad, z_w, z_s, p_l, q, 0.5, **kw)
    assert math.isnan(loss.item()) and math.isnan(terms[0].item())
    torch.testing.assert_close(terms[1:], torch.stack([out.loss_unsup, out.loss_distill]))
    torch.testing.assert_close(cg_l, g_l, equal_nan=True)
    torch.testing.assert_close(cg_s, g_s)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_em_prior_is_the_raw_posterior_reweighted_to_the_estimate(alpha):
    """prior_estimator="em": mean_i of softmax(z_w[i]) reweighted per class by
    (Q + eps) / (Qa + eps) and renormalised per row (Saerens et al. 2002, one EM step), written
    here from the priors, independently of du; at alpha = 1 (Qa = Q) it is the raw prior."""
    z_l, y, z_w, z_s, p_l, q = (x.double() if x.is_floating_point() else x
                                for x in make_inputs(6, 40, 9, seed=5, scale=4.0))
    raw = flexda_reference(z_l, y, z_w, z_s, p_l, q, alpha).prior_batch
    em = flexda_reference(z_l, y, z_w, z_s, p_l, q, alpha, prior_estimator="em").prior_batch
    qa = q.pow(alpha) / q.pow(alpha).sum()
    w = torch.softmax(z_w, -1) * ((q + 1e-9) / (qa + 1e-9))
    torch.testing.assert_close(em, (w / w.sum(-1, keepdim=True)).mean(0), rtol=1e-12, atol=1e-14)
    assert float(em.sum()) == pytest.approx(1.0, abs=1e-12)
    if alpha == 1.0:
        torch.testing.assert_close(em, raw, rtol=1e-12, atol=1e-14)
    else:  # the two estimators differ: the test above could fail
        assert float((em - raw).abs().max()) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distill_all_closed_form_matches_autograd_and_adds_the_masked_rows(temperature):
    """distill_all: the closed-form op reference equals autograd of flexda_reference, and L_d is
    the complementary L_d plus (1/N) sum over the rows with M = 1 of H(q, softmax(a / T))."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(6, 20, 9, scale=2.0, dtype=torch.float64, seed=3)
    kw = dict(threshold=0.6, lambda_u=1.3, lambda_d=0.7, temperature=temperature)
    zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
    out = flexda_reference(zl, y, z_w, zs, p_l, q, 0.4, distill_all=True, **kw)
    g_l, g_s = torch.autograd.grad(out.loss, (zl, zs))
    ds, du = logit_adjustments(p_l, q, 0.4)
    hp = torch.tensor([1.3, 0.7, 1.0, temperature, 0.0], **F64)
    loss, terms, mask, _, _, cg_l, cg_s = flexda_fwd_reference(z_l, y, z_w, z_s, ds, du, hp, 0.6,
                                                               distill_all=True)
    torch.testing.assert_close(loss, out.loss.detach())
    torch.testing.assert_close(terms[2], out.loss_distill)
    torch.testing.assert_close(cg_l, g_l)
    torch.testing.assert_close(cg_s, g_s)
    m = out.mask
    assert 0 < float(m.sum()) < m.numel(), "the case needs rows on both sides of the threshold"
    comp = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.4, **kw)
    a = (z_s + du) / temperature
    h = -(torch.softmax(z_w / temperature, -1) * torch.log_softmax(a, -1)).sum(-1)
    torch.testing.assert_close(out.loss_distill, comp.loss_distill + (h * m).sum() / m.numel())


def test_prior_weights_select_rows_and_leave_out_weight_zero_nans():
    """prior_weight: the weighted mean over the rows of positive weight; a NaN row of weight 0
    does not reach the prior, one of weight 1 does; all weights 0: NaN (no estimate)."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(2, 5, 4, dtype=torch.float64, seed=1)
    w = t(2.0, 0.0, 1.0, 0.0, 0.5)
    pw = torch.softmax(z_w, -1)
    want = (2 * pw[0] + pw[2] + 0.5 * pw[4]) / 3.5
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, prior_weight=w)
    torch.testing.assert_close(out.prior_batch, want)
    z_w[1, 2] = math.nan
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, prior_weight=w)
    torch.testing.assert_close(out.prior_batch, want)
    w[1] = 1.0
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, prior_weight=w)
    assert bool(torch.isnan(out.prior_batch).all())
    out = flexda_reference(z_l, y, z_w, z_s, p_l, q, 0.5, prior_weight=torch.zeros(5, **F64))
    assert bool(torch.isnan(out.prior_batch).all())
