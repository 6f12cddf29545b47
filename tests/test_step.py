"""`adello::flexda_step` on the CPU (adello_kernels/ops/step.py, csrc/cpu/flexda_step_cpu.cpp,
csrc/flexda_step_autograd.cpp): one whole training step as one op, its autograd in C++.

The numerics of every backend's step against the float64 reference live in tests/test_contract.py;
here is what is particular to the op's mechanics:
- it is the prologue + the row op + the epilogue: identical bits to `flexda_fwd` called with the
  adjustments built by the documented precision rule, and the state update of `update_prior_`;
- `update=False` touches no state; the update bumps the state tensors' version counters;
- the C++ autograd: float64 gradcheck, an incoming grad != 1 (in place and with retain_graph),
  one input alone, `.backward()` accumulation, create_graph refused; opcheck;
- `scale_grads_`: in place, a no-op for grad 1, empty tensors skipped.
"""
import pytest
import torch

from adello_kernels import backends
from adello_kernels.functional import _hparams
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.ops.state import update_prior_
from adello_kernels.ops.step import flexda_step, scale_grads_
from adello_kernels.reference import adjustments, alpha_schedule

from utils import make_inputs

pytestmark = pytest.mark.skipif(
    not (backends._load_extension() and flexda_ops.has_kernel("flexda_step", "CPU")),
    reason="adello_kernels._C is not built with the CPU kernels")


def step_args(b, n, c, dtype=torch.float32, *, seed=0, step=300, total_steps=1000,
              distill_start=100, temperature=1.0, flexda=True, threshold=0.95, lambda_u=0.8,
              lambda_d=1.3, momentum=0.9, update=True, scale=5.0):
    """The op's twenty arguments (non-unit lambdas so that a swapped weight shows)."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale)
    return [z_l, y, z_w, z_s, p_l, q, torch.tensor(step), torch.tensor(0),
            torch.tensor(float(temperature)), total_steps, 0.1, 2.0, distill_start, lambda_u,
            lambda_d, 1e-9, flexda, threshold, momentum, update]


def same(x, y):
    """Equal up to the last bit of the adjustments: the C++ prologue's vectorised pow/log and
    torch's may differ by an ulp in float64 (which rounding to fp32 almost always hides)."""
    if x.dtype != y.dtype:
        return False
    if not x.is_floating_point():
        return torch.equal(x, y)
    tol = 1e-12 if x.dtype == torch.float64 else 4e-7
    return torch.allclose(x, y, rtol=tol, atol=tol * 1e-2, equal_nan=True)


def row_op(args):
    """What the step must equal: `flexda_fwd` on the adjustments of the documented rule."""
    (z_l, y, z_w, z_s, p_l, q, step, _skipped, temperature, total_steps, alpha_min, power,
     distill_start, lambda_u, lambda_d, eps, flexda, threshold, _m, _update) = args
    acc = torch.float64 if z_l.dtype == torch.float64 else torch.float32
    if flexda:
        ds, du = adjustments(p_l, q, alpha_schedule(step, total_steps, alpha_min, power), eps,
                             acc)
    else:
        ds = du = torch.zeros(q.shape, dtype=acc)
    hp = _hparams(lambda_u, lambda_d, step >= distill_start, temperature, z_l.device, acc)
    return torch.ops.adello.flexda_fwd(z_l.detach(), y, z_w, z_s.detach(), ds, du, hp, threshold)


@pytest.mark.parametrize("b,n,c,dtype,kw", [
    (5, 7, 9, torch.float32, {}),
    (1, 1, 1, torch.float32, {}),
    (33, 65, 127, torch.float32, dict(temperature=0.6)),
    (16, 40, 100, torch.float32, dict(step=50)),                # before distill_start
    (12, 30, 257, torch.float32, dict(flexda=False, threshold=0.7)),
    (9, 14, 31, torch.bfloat16, dict(temperature=1.7)),
    (20, 25, 64, torch.float64, dict(temperature=0.8, step=999)),
], ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_step_is_prologue_row_op_and_update(b, n, c, dtype, kw):
    args = step_args(b, n, c, dtype, seed=b + n + c, **kw)
    want = row_op(args)                          # from the state before the step
    q0, t0 = args[5].clone(), args[6].clone()
    args[0].requires_grad_()
    args[3].requires_grad_()
    got = flexda_step(*args)
    assert len(got) == 9 and got[0].requires_grad
    assert not any(t.requires_grad for t in got[1:])
    pairs = [(got[0], want[0]), (torch.stack(got[1:4]), want[1])] + list(zip(got[4:], want[2:]))
    for x, y in pairs:
        assert same(x.detach(), y)
    grads = torch.autograd.grad(got[0], (args[0], args[3]))
    assert same(grads[0], want[5]) and same(grads[1], want[6])
    # The epilogue: the prior EMA of update_prior_ (same fp32 arithmetic), step + 1.
    q, step, skipped = q0.clone(), t0.clone(), torch.tensor(0)
    update_prior_(q, step, skipped, want[4], args[18])
    torch.testing.assert_close(args[5], q, rtol=0, atol=1e-7)
    assert int(args[6]) == int(t0) + 1 and int(args[7]) == 0


def test_several_steps_follow_the_state():
    # Each call reads the state the previous one left: alpha_t, Q_{t-1}, the gate at t0 and a
    # skipped update for a non-finite weak row.
    args = step_args(6, 10, 12, seed=3, step=98, distill_start=100, momentum=0.5)
    for t in range(98, 104):
        args[2] = make_inputs(6, 10, 12, seed=t)[2]
        if t == 101:
            args[2][3, 4] = float("nan")
        want = row_op(args)
        q_before = args[5].clone()
        got = flexda_step(*args)
        assert same(got[0].detach(), want[0]) and same(got[6], want[4])
        assert (float(got[3]) != 0.0) == (t >= 100)          # distillation from step t0 on
        if t == 101:
            assert torch.equal(args[5], q_before)             # skipped: prior unchanged
        else:
            assert not torch.equal(args[5], q_before)
        assert int(args[6]) == t + 1
    assert int(args[7]) == 1


def test_update_false_touches_no_state():
    args = step_args(4, 6, 9, seed=1, update=False)
    state = [x.clone() for x in args[5:8]]
    versions = [x._version for x in args[5:8]]
    out = flexda_step(*args)
    assert all(torch.equal(x, y) for x, y in zip(args[5:8], state))
    assert [x._version for x in args[5:8]] == versions
    assert same(out[6], row_op(args)[4])


def test_update_bumps_the_version_of_the_state():
    # A graph that saved the prior before the step must notice that the step changed it.
    args = step_args(4, 6, 9, seed=1)
    versions = [x._version for x in args[5:8]]
    flexda_step(*args)
    assert all(x._version > v for x, v in zip(args[5:8], versions))


@pytest.mark.parametrize("distill,temperature", [(True, 1.0), (True, 0.6), (False, 1.0)])
def test_gradcheck_float64(distill, temperature):
    args = step_args(4, 6, 9, torch.float64, seed=4, temperature=temperature,
                     step=300 if distill else 0, update=False)

    def f(a, s):
        return flexda_step(a, args[1], args[2], s, *args[4:])[0]

    assert torch.autograd.gradcheck(f, (args[0].requires_grad_(), args[3].requires_grad_()))


def test_incoming_grad_scales_in_place_and_one_input_alone():
    args = step_args(6, 8, 10, seed=9, update=False)
    a, s = args[0].requires_grad_(), args[3].requires_grad_()
    g1 = torch.autograd.grad(flexda_step(*args)[0], (a, s))
    g3 = torch.autograd.grad(flexda_step(*args)[0] * -2.5, (a, s))      # the in-place path
    torch.testing.assert_close(g3[0], -2.5 * g1[0])
    torch.testing.assert_close(g3[1], -2.5 * g1[1])
    s.requires_grad_(False)
    (ga,) = torch.autograd.grad(flexda_step(*args)[0] * 3.0, (a,))
    torch.testing.assert_close(ga, 3.0 * g1[0])
    a.requires_grad_(False)
    assert not flexda_step(*args)[0].requires_grad
    with torch.inference_mode():
        assert torch.equal(flexda_step(*args)[0], flexda_step(*args)[0])


def test_retain_graph_gives_fresh_gradients_and_backward_accumulates():
    args = step_args(6, 8, 10, seed=5, update=False)
    a, s = args[0].requires_grad_(), args[3].requires_grad_()
    loss = flexda_step(*args)[0] * 2.0
    g1 = torch.autograd.grad(loss, (a, s), retain_graph=True)
    g2 = torch.autograd.grad(loss, (a, s), retain_graph=True)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    # With retain_graph the saved gradients must not be scaled in place (a second backward
    # would then see 2 * 2 * grad) and the results are fresh tensors.
    g2[0].add_(1.0)
    g3 = torch.autograd.grad(loss, (a, s))
    assert torch.equal(g3[0], g1[0]) and not torch.equal(g2[0], g1[0])
    loss = flexda_step(*args)[0]
    for _ in range(3):
        loss.backward(retain_graph=True)
    flexda_step(*args)[0].backward()
    torch.testing.assert_close(a.grad, 2 * g1[0])
    torch.testing.assert_close(s.grad, 2 * g1[1])
    w = args[2].clone().requires_grad_()                # the weak view gets no gradient
    out = flexda_step(args[0], args[1], w, *args[3:])[0]
    assert torch.autograd.grad(out, (w,), allow_unused=True) == (None,)


def test_higher_order_gradients_are_refused():
    # The forward's gradients are values: differentiating them again would silently give 0.
    args = step_args(6, 8, 10, seed=2)
    a = args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(flexda_step(*args)[0], (a,), create_graph=True)


def test_scale_grads_in_place():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    a0, b0 = a.clone(), b.clone()
    scale_grads_(a, b, torch.tensor(1.0))
    assert torch.equal(a, a0) and torch.equal(b, b0)
    scale_grads_(a, b, torch.tensor(-2.5, dtype=torch.float64))
    assert torch.equal(a, a0 * -2.5) and torch.equal(b, b0 * -2.5)
    empty = torch.empty(0)
    scale_grads_(empty, b, torch.tensor(2.0))
    assert torch.equal(b, b0 * -5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    args = step_args(5, 7, 19, dtype, temperature=0.7)
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(flexda_step, args)


def test_registered_kernels():
    for key in ("CPU", "Autograd"):
        assert flexda_ops.has_kernel("flexda_step", key)
    assert flexda_ops.has_kernel("scale_grads_", "CPU")
