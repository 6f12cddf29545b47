"""`ADELLOLoss`: the multi-step semantics of docs/method.md (prior update after the losses,
alpha schedule, distillation gate, imbalance-aware temperature), state, errors and the NaN guard."""
import copy
import math

import pytest
import torch

import adello_kernels as ak
from adello_kernels.reference import alpha_schedule, flexda_reference

from utils import make_inputs


def batches(steps, b, n, c, seed=0, dtype=torch.float32, scale=4.0):
    return [make_inputs(b, n, c, dtype=dtype, seed=seed + s, scale=scale)[:4]
            for s in range(steps)]


def manual_loop(prior_lb, data, total_steps, *, distill_start=0, temperature=1.0, flexda=True,
                momentum=0.999, alpha_epoch_steps=1, weights=None, **kw):
    """docs/method.md step by step in float64, written independently of ADELLOLoss."""
    target = kw.pop("prior_target", None)
    c = prior_lb.shape[0]
    q = torch.full((c,), 1.0 / c, dtype=torch.float64)
    uniform = q.clone()
    t_frozen = None
    outs = []
    for t, (z_l, y, z_w, z_s) in enumerate(data):
        gate = t >= distill_start
        u, epochs = t // alpha_epoch_steps, total_steps // alpha_epoch_steps
        alpha = 1.0 - 0.9 * min(u / epochs, 1.0) ** 2 if flexda else 1.0
        p_l, p_u = (prior_lb.double(), q) if flexda else (uniform, uniform)
        r = target.double() if (flexda and target is not None) else p_u   # Qa's source
        pw = torch.softmax(z_w.double(), -1)
        if kw.get("prior_estimator") == "em":
            # the posteriors adjusted from the target prior Qa to Q (Saerens et al. 2002):
            # reweighted per class by (Q + eps) / (Qa + eps), renormalised per row
            qa = r.pow(alpha) / r.pow(alpha).sum()
            pw = pw * ((p_u + 1e-9) / (qa + 1e-9))
            pw = pw / pw.sum(-1, keepdim=True)
        if weights is None:
            pb = pw.mean(0)
            q_next = momentum * q + (1 - momentum) * pb
        else:   # the weighted mean over the rows of positive weight; none: Q stays
            w = weights[t].double()
            pb = (pw * w[:, None])[w > 0].sum(0) / w.sum()
            q_next = momentum * q + (1 - momentum) * pb if bool((w > 0).any()) else q
        if temperature == "imbalance_aware":
            if gate and t_frozen is None:  # frozen from the prior after this step's update
                t_frozen = math.exp(float(((1 / c) * torch.log((1 / c) / q_next)).sum()))
            temp = t_frozen if t_frozen is not None else 1.0
        else:
            temp = temperature
        a, s = z_l.double().requires_grad_(), z_s.double().requires_grad_()
        out = flexda_reference(a, y, z_w.double(), s, p_l, p_u, alpha, distill=gate,
                               temperature=temp, prior_target=r,
                               prior_weight=None if weights is None else weights[t], **kw)
        outs.append((out, torch.autograd.grad(out.loss, (a, s))))
        q = q_next
    return outs, q, t_frozen


BACKENDS = [b for b in ak.available_backends() if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [
    dict(),
    dict(distill_start=3, temperature=0.5),
    dict(distill_start=2, temperature="imbalance_aware"),
    dict(flexda=False),
    dict(momentum=0.9, threshold=0.7, lambda_u=2.0, lambda_d=0.5),
    dict(momentum=0.5, prior_estimator="em"),
    dict(momentum=0.5, prior_estimator="em", distill_start=2, temperature="imbalance_aware"),
    dict(momentum=0.5, prior_estimator="em", flexda=False),
    # the released options: a fixed target prior (adello_gt), alpha by epoch
    dict(momentum=0.8, gt=True),
    dict(momentum=0.8, alpha_epoch_steps=3, distill_start=2, temperature=0.7),
    dict(momentum=0.5, gt=True, alpha_epoch_steps=2, prior_estimator="em", distill_start=2,
         temperature="imbalance_aware"),
    dict(gt=True, flexda=False),
    # per-row prior weights (the released lb_in_ulb_mask), one step with every weight 0
    dict(momentum=0.7, weighted=True),
    dict(momentum=0.7, weighted=True, prior_estimator="em", distill_start=2,
         temperature="imbalance_aware"),
    # distillation on every row (the released distill_all)
    dict(distill_all=True, threshold=0.6),
    dict(distill_all=True, threshold=0.6, temperature=0.5, distill_start=2, weighted=True),
])
def test_steps_match_manual_loop(kw, backend):
    kw = dict(kw)
    momentum = kw.pop("momentum", 0.999)
    c, total = 13, 8
    gen = torch.Generator().manual_seed(1)
    prior_lb = torch.rand(c, generator=gen) + 0.1
    prior_lb /= prior_lb.sum()
    if kw.pop("gt", False):
        target = torch.rand(c, generator=gen) ** 4
        kw["prior_target"] = target / target.sum()
    data = batches(6, 7, 11, c, scale=6.0)
    weights = None
    if kw.pop("weighted", False):
        weights = [(torch.rand(11, generator=gen) < 0.6).float() for _ in data]
        weights[2].zero_()
    crit = ak.ADELLOLoss(prior_lb, total, prior_momentum=momentum, backend=backend, **kw)
    want, q, t_frozen = manual_loop(prior_lb, data, total, momentum=momentum, weights=weights,
                                    **kw)
    for step, (args, (w, w_grads)) in enumerate(zip(data, want)):
        z_l, y, z_w, z_s = args
        z_l, z_s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        got = crit(z_l, y, z_w, z_s,
                   **({} if weights is None else {"prior_weight": weights[step]}))
        for name in ("loss", "loss_sup", "loss_unsup", "loss_distill", "prior_batch"):
            torch.testing.assert_close(getattr(got, name).double(), getattr(w, name).double(),
                                       rtol=1e-5, atol=1e-6, equal_nan=name == "prior_batch",
                                       msg=f"step {step} {name}")
        assert torch.equal(got.pseudo_labels, w.pseudo_labels)
        for g, wg in zip(torch.autograd.grad(got.loss, (z_l, z_s)), w_grads):
            torch.testing.assert_close(g.double(), wg, rtol=0, atol=1e-6, msg=f"step {step} grad")
    torch.testing.assert_close(crit.prior_ulb.double(), q, rtol=1e-6, atol=1e-7)
    assert int(crit.step) == 6
    assert int(crit.skipped_updates) == 0   # (an all-zero-weight step is not a skipped update)
    if kw.get("temperature") == "imbalance_aware":
        assert bool(crit.temperature_frozen)
        assert float(crit.temperature) == pytest.approx(t_frozen, rel=1e-5)


def test_imbalance_aware_temperature_freezes_once():
    c = 6
    prior_lb = torch.full((c,), 1.0 / c)
    crit = ak.ADELLOLoss(prior_lb, 100, distill_start=2, temperature="imbalance_aware",
                         prior_momentum=0.5, backend="reference")
    data = batches(5, 4, 8, c, scale=8.0)
    temps = []
    for args in data:
        crit(*args)
        temps.append((float(crit.temperature), bool(crit.temperature_frozen)))
    assert temps[0] == (1.0, False) and temps[1] == (1.0, False)
    assert temps[2][1] and temps[2][0] > 1.0  # KL(U || Q) > 0 once Q is not uniform
    assert temps[3] == temps[2] and temps[4] == temps[2]  # frozen while Q keeps moving


def test_state_dict_round_trip_continues_identically():
    c = 9
    prior_lb = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(0)), 0)
    kw = dict(distill_start=2, temperature="imbalance_aware", backend="reference")
    a = ak.ADELLOLoss(prior_lb, 50, **kw)
    data = batches(6, 5, 7, c)
    for args in data[:3]:
        a(*args)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"prior_lb", "prior_ulb", "step", "temperature", "temperature_frozen",
                          "skipped_updates"}
    b = ak.ADELLOLoss(torch.full((c,), 1.0 / c), 50, **kw)
    b.load_state_dict(state)
    for args in data[3:]:
        oa, ob = a(*args), b(*args)
        assert torch.equal(oa.loss, ob.loss)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_weak_logits_leave_prior_unchanged_and_are_counted(backend):
    c = 5
    crit = ak.ADELLOLoss(torch.full((c,), 0.2), 10, backend=backend)
    z_l, y, z_w, z_s = batches(1, 3, 4, c)[0]
    crit(z_l, y, z_w, z_s)
    before = crit.prior_ulb.clone()
    bad = z_w.clone()
    bad[1, 3] = math.nan
    out = crit(z_l, y, bad, z_s)
    assert not bool(torch.isfinite(out.prior_batch).all())
    assert torch.equal(crit.prior_ulb, before)
    assert int(crit.skipped_updates) == 1 and int(crit.step) == 2
    crit(z_l, y, z_w, z_s)  # a finite step updates again
    assert not torch.equal(crit.prior_ulb, before) and int(crit.skipped_updates) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_strong_logits_give_nan_loss_but_finite_prior_update(backend):
    c = 5
    crit = ak.ADELLOLoss(torch.full((c,), 0.2), 10, backend=backend)
    z_l, y, z_w, z_s = batches(1, 3, 4, c)[0]
    z_s = z_s.clone()
    z_s[0, 0] = math.inf
    out = crit(z_l, y, z_w, z_s)
    assert not bool(torch.isfinite(out.loss))
    assert bool(torch.isfinite(crit.prior_ulb).all()) and int(crit.skipped_updates) == 0


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad", ["labels", "classes", "dtype", "rows", "empty", "device_less"])
def test_failed_call_leaves_state_unchanged(bad):
    c = 4
    crit = ak.ADELLOLoss(torch.full((c,), 0.25), 10, backend="reference")
    z_l, y, z_w, z_s = batches(1, 3, 4, c)[0]
    crit(z_l, y, z_w, z_s)
    before = snapshot(crit)
    args = [z_l, y, z_w, z_s]
    if bad == "labels":
        args[1] = torch.tensor([0, 1, 4])
    elif bad == "classes":
        args = [a[:, :3] if a.dim() == 2 else a for a in args]
    elif bad == "dtype":
        args[3] = z_s.double()
    elif bad == "rows":
        args[3] = z_s[:2]
    elif bad == "empty":
        args[2], args[3] = z_w[:0], z_s[:0]
    else:
        args[0] = [[0.0] * c] * 3
    with pytest.raises(ValueError):
        crit(*args)
    after = snapshot(crit)
    for k in before:
        assert torch.equal(before[k], after[k]), k


BAD_CONSTRUCTOR = [
    ("prior_lb", dict(prior_lb=torch.tensor([0.5, 0.6]))),
    ("prior_lb", dict(prior_lb=torch.tensor([1.5, -0.5]))),
    ("prior_lb", dict(prior_lb=torch.tensor([[0.5, 0.5]]))),
    ("prior_lb", dict(prior_lb=torch.tensor([math.nan, 1.0]))),
    ("total_steps", dict(total_steps=0)),
    ("total_steps", dict(total_steps=1.5)),
    ("alpha_min", dict(alpha_min=1.5)),
    ("power", dict(power=0.0)),
    ("threshold", dict(threshold=0.0)),
    ("threshold", dict(threshold=1.2)),
    ("prior_momentum", dict(prior_momentum=1.0)),
    ("distill_start", dict(distill_start=-1)),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature="paper")),
    ("lambda_u", dict(lambda_u=-1.0)),
    ("lambda_d", dict(lambda_d=math.inf)),
    ("backend", dict(backend="fast")),
    ("prior_estimator", dict(prior_estimator="EM")),
    ("prior_estimator", dict(prior_estimator=None)),
    ("prior_target", dict(prior_target=torch.tensor([0.7, 0.7]))),
    ("prior_target", dict(prior_target=torch.tensor([1.0]))),
    ("prior_target", dict(prior_target=[0.5, 0.5])),
    ("alpha_epoch_steps", dict(alpha_epoch_steps=0)),
    ("alpha_epoch_steps", dict(alpha_epoch_steps=11)),
    ("alpha_epoch_steps", dict(alpha_epoch_steps=2.0)),
    ("distill_all", dict(distill_all=1)),
]


@pytest.mark.parametrize("name,kw", BAD_CONSTRUCTOR)
def test_bad_constructor_argument_raises_value_error_naming_it(name, kw):
    args = dict(prior_lb=torch.tensor([0.5, 0.5]), total_steps=10)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{name}"):
        ak.ADELLOLoss(args.pop("prior_lb"), args.pop("total_steps"), **args)


def test_alpha_follows_the_schedule():
    crit = ak.ADELLOLoss(torch.tensor([0.5, 0.5]), 10, backend="reference")
    assert float(crit.alpha()) == 1.0
    crit.step.fill_(5)
    assert float(crit.alpha()) == pytest.approx(alpha_schedule(5, 10))


def test_alpha_by_epoch_is_constant_within_an_epoch():
    """alpha_epoch_steps = 4 over 10 steps: epochs of 4 steps, U = 2; alpha_min from step 8 on."""
    crit = ak.ADELLOLoss(torch.tensor([0.5, 0.5]), 10, alpha_epoch_steps=4, backend="reference")
    got = []
    for t in range(12):
        crit.step.fill_(t)
        got.append(float(crit.alpha()))
    want = [1.0] * 4 + [1.0 - 0.9 * 0.25] * 4 + [0.1] * 4
    assert got == pytest.approx(want, abs=1e-12)
    assert alpha_schedule(torch.tensor(5), 10, epoch_steps=4).item() == pytest.approx(want[5])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, "imbalance_aware"])
def test_compile_fullgraph_module_step(backend, temperature):
    # Guards against the compiled backward recomputing values from buffers the step has already
    # updated in place (ops/snapshot.py): gradients must equal eager ones step after step.
    c = 11
    prior_lb = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(3)), 0)
    crit = ak.ADELLOLoss(prior_lb, 20, distill_start=1, temperature=temperature,
                         prior_momentum=0.5, backend=backend)
    eager = copy.deepcopy(crit)
    compiled = torch.compile(crit, fullgraph=True)
    for args in batches(3, 6, 8, c):
        z_l = args[0].clone().requires_grad_()
        out = compiled(z_l, *args[1:])
        grad = torch.autograd.grad(out.loss, z_l)[0]
        z_l2 = args[0].clone().requires_grad_()
        want = eager(z_l2, *args[1:])
        torch.testing.assert_close(out.loss, want.loss)
        torch.testing.assert_close(grad, torch.autograd.grad(want.loss, z_l2)[0])
    torch.testing.assert_close(crit.prior_ulb, eager.prior_ulb)
    assert int(crit.step) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prior_estimator", ["raw", "em"])
def test_gradient_accumulation_equals_the_whole_batch(backend, prior_estimator):
    # K micro-batches with update=False on all but the last must advance alpha, the prior and
    # the step exactly once, from the row-weighted mean of the batch priors: the state of one
    # step on the whole batch; and the micro-batch losses average to the whole batch's.
    k, b, n, c = 4, 3, 5, 9
    prior_lb = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(1)), 0)
    whole = ak.ADELLOLoss(prior_lb, 50, prior_momentum=0.6, prior_estimator=prior_estimator,
                          backend=backend)
    micro = copy.deepcopy(whole)
    for step, args in enumerate(batches(3, k * b, k * n, c, seed=7)):
        z_l = args[0].clone().requires_grad_()
        out = whole(z_l, *args[1:])
        (g_whole,) = torch.autograd.grad(out.loss, z_l)
        losses, grads = [], []
        for j in range(k):
            zl_j = args[0][j * b:(j + 1) * b].clone().requires_grad_()
            o = micro(zl_j, args[1][j * b:(j + 1) * b], args[2][j * n:(j + 1) * n],
                      args[3][j * n:(j + 1) * n], update=j == k - 1)
            if j < k - 1:  # nothing advances before the last micro-batch
                assert int(micro.step) == step
            losses.append(o.loss.detach())
            grads.append(torch.autograd.grad(o.loss / k, zl_j)[0])
        torch.testing.assert_close(torch.stack(losses).mean(), out.loss.detach(), rtol=1e-6,
                                   atol=1e-6)
        torch.testing.assert_close(torch.cat(grads), g_whole, rtol=0, atol=1e-6)
        torch.testing.assert_close(micro.prior_ulb, whole.prior_ulb, rtol=0, atol=1e-6)
        assert int(micro.step) == int(whole.step) == step + 1
        assert micro._pending_rows == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_with_prior_weights_equals_the_whole_batch(backend):
    """Weighted micro-batches: the prior update of the whole batch with its weights (the
    weight sums, not the row counts, weigh the micro-batches; a micro-batch whose weights are
    all 0 adds nothing, and a step whose weights are all 0 leaves Q)."""
    k, b, n, c = 3, 2, 4, 6
    prior_lb = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(2)), 0)
    whole = ak.ADELLOLoss(prior_lb, 50, prior_momentum=0.6, backend=backend)
    micro = copy.deepcopy(whole)
    gen = torch.Generator().manual_seed(5)
    for step, args in enumerate(batches(3, k * b, k * n, c, seed=11)):
        w = torch.rand(k * n, generator=gen) * 2
        w[:n] = 0.0                               # the first micro-batch: no row counts
        if step == 2:
            w.zero_()                             # the whole step: nothing to estimate from
        q_before = whole.prior_ulb.clone()
        whole(*args, prior_weight=w)
        for j in range(k):
            rows = slice(j * n, (j + 1) * n)
            micro(args[0][j * b:(j + 1) * b], args[1][j * b:(j + 1) * b], args[2][rows],
                  args[3][rows], prior_weight=w[rows], update=j == k - 1)
        torch.testing.assert_close(micro.prior_ulb, whole.prior_ulb, rtol=0, atol=1e-6)
        assert int(micro.step) == int(whole.step) == step + 1
        if step == 2:
            assert torch.equal(whole.prior_ulb, q_before)
    assert int(micro.skipped_updates) == int(whole.skipped_updates) == 0


def test_prior_weights_are_validated_by_name():
    crit = ak.ADELLOLoss(torch.full((3,), 1.0 / 3), 10, backend="reference")
    args = make_inputs(2, 4, 3)[:4]
    for bad in (torch.ones(3), torch.ones(4, dtype=torch.int64), torch.tensor([1.0, -1, 1, 1]),
                torch.tensor([1.0, math.nan, 1, 1]), [1.0] * 4):
        with pytest.raises(ValueError, match="^prior_weight"):
            crit(*args, prior_weight=bad)
    assert int(crit.step) == 0


def test_gradient_accumulation_counts_a_non_finite_micro_batch_once():
    c = 7
    crit = ak.ADELLOLoss(torch.full((c,), 1.0 / c), 10, backend=BACKENDS[-1])
    q0 = crit.prior_ulb.clone()
    (args,) = batches(1, 4, 6, c, seed=2)
    bad_w = args[2].clone()
    bad_w[1, 2] = float("nan")
    crit(args[0], args[1], bad_w, args[3], update=False)
    crit(*args, update=True)
    assert torch.equal(crit.prior_ulb, q0) and int(crit.skipped_updates) == 1
    assert int(crit.step) == 1


def test_gradient_accumulation_refuses_imbalance_aware_temperature():
    crit = ak.ADELLOLoss(torch.full((5,), 0.2), 10, temperature="imbalance_aware")
    (args,) = batches(1, 2, 3, 5)
    with pytest.raises(ValueError, match="^update: "):
        crit(*args, update=False)
    with pytest.raises(ValueError, match="^update: expected a bool"):
        crit(*args, update=1)
    assert int(crit.step) == 0
