"""`adello::flexda_step` (adello_kernels/ops/step.py, csrc/cpu/flexda_step_cpu.cpp): the CPU
forward of an ADELLOLoss step as one op, with its autograd in C++.

- its outputs are exactly those of `adello_prepare` + `flexda_fwd` (same kernel, same bits), and
  every one of them, both gradients included, matches the float64 reference (SPEC.md section 6);
- the C++ autograd: float64 gradcheck, an incoming grad != 1, only one input differentiable,
  retain_graph (fresh gradients each time), `.backward()` accumulation, non-differentiable
  outputs, create_graph refused; opcheck (fake, autograd registration, AOT dispatch).
"""
import pytest
import torch

from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.ops.state import adello_prepare
from adello_kernels.ops.step import flexda_step
from adello_kernels.reference import alpha_schedule, flexda_reference
from utils import TOL, excused_rows, make_inputs

pytestmark = pytest.mark.skipif(
    not (backends._load_extension() and flexda_ops.has_kernel("flexda_step", "CPU")),
    reason="adello_kernels._C is not built with the CPU kernels")

NAMES = ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask", "pseudo_labels",
         "prior_batch")


def step_args(b, n, c, dtype=torch.float32, *, seed=0, step=300, total_steps=1000,
              distill_start=100, temperature=1.0, flexda=True, threshold=0.95, lambda_u=0.8,
              lambda_d=1.3, scale=5.0):
    """The op's seventeen arguments (non-unit lambdas so that a swapped weight shows)."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale)
    return [z_l, y, z_w, z_s, p_l, q, torch.tensor(step), torch.tensor(float(temperature)),
            total_steps, 0.1, 2.0, distill_start, lambda_u, lambda_d, 1e-9, flexda, threshold]


def reference(args):
    """The float64 reference (autograd oracle) on the same inputs: outputs and both gradients."""
    (z_l, y, z_w, z_s, p_l, q, step, temperature, total_steps, alpha_min, power, distill_start,
     lambda_u, lambda_d, eps, flexda, threshold) = args
    c = z_l.shape[1]
    if flexda:
        alpha = alpha_schedule(int(step), total_steps, alpha_min, power)
        p_l, q = p_l.double(), q.double()
    else:
        alpha, p_l = 1.0, torch.full((c,), 1.0 / c, dtype=torch.float64)
        q = p_l
    a = z_l.detach().double().requires_grad_()
    s = z_s.detach().double().requires_grad_()
    out = flexda_reference(a, y, z_w.detach().double(), s, p_l, q, alpha, threshold=threshold,
                           lambda_u=lambda_u, lambda_d=lambda_d,
                           distill=int(step) >= distill_start, temperature=float(temperature),
                           eps=eps)
    return out, torch.autograd.grad(out.loss, (a, s))


@pytest.mark.parametrize("b,n,c,dtype,kw", [
    (5, 7, 9, torch.float32, {}),
    (1, 1, 1, torch.float32, {}),
    (33, 65, 127, torch.float32, dict(temperature=0.6)),
    (16, 40, 100, torch.float32, dict(step=50)),                # before distill_start
    (12, 30, 257, torch.float32, dict(flexda=False, threshold=0.7)),
    (9, 14, 31, torch.bfloat16, dict(temperature=1.7)),
    (9, 14, 31, torch.float16, {}),
    (20, 25, 64, torch.float64, dict(temperature=0.8, step=999)),
], ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_matches_reference_and_the_two_op_path(b, n, c, dtype, kw):
    args = step_args(b, n, c, dtype, seed=b + n + c, **kw)
    args[0].requires_grad_()
    args[3].requires_grad_()
    got = flexda_step(*args)
    assert len(got) == 9 and got[0].requires_grad
    assert not any(t.requires_grad for t in got[1:])
    grads = torch.autograd.grad(got[0], (args[0], args[3]))

    # The same kernel as prepare + flexda_fwd: identical bits.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    adj_lb, adj_ulb, hp = adello_prepare(*args[4:8], *args[8:16], acc)
    two = torch.ops.adello.flexda_fwd(args[0].detach(), args[1], args[2], args[3].detach(),
                                      adj_lb, adj_ulb, hp, args[16])
    pairs = [(got[0], two[0]), (torch.stack(got[1:4]), two[1])] + list(zip(got[4:], two[2:]))
    for x, y in pairs:
        assert x.dtype == y.dtype and torch.equal(x.detach(), y)
    assert torch.equal(grads[0], two[5]) and torch.equal(grads[1], two[6])

    # Against the float64 reference (SPEC.md section 6).
    ref, ref_grads = reference(args)
    loss_tol, grad_tol = TOL[dtype]
    for name, x in zip(NAMES, got[:7]):
        want = getattr(ref, name)
        if name in ("mask", "pseudo_labels"):
            ok = ~excused_rows(args[2], args[16])
            assert torch.equal(x[ok].to(want.dtype), want[ok]), name
        else:
            torch.testing.assert_close(x.double(), want.double(), rtol=loss_tol,
                                       atol=loss_tol * 1e-2, msg=name)
    for g, w in zip(grads, ref_grads):
        assert g.dtype == dtype
        scale = max(1.0, float(w.abs().max())) if dtype in (torch.float32, torch.float64) \
            else float(w.abs().max())
        assert float((g.double() - w).abs().max()) <= grad_tol * scale


@pytest.mark.parametrize("distill,temperature", [(True, 1.0), (True, 0.6), (False, 1.0)])
def test_gradcheck_float64(distill, temperature):
    args = step_args(4, 6, 9, torch.float64, seed=4, temperature=temperature,
                     step=300 if distill else 0)

    def f(a, s):
        return flexda_step(a, args[1], args[2], s, *args[4:])[0]

    assert torch.autograd.gradcheck(f, (args[0].requires_grad_(), args[3].requires_grad_()))


def test_incoming_grad_scales_and_one_input_alone():
    args = step_args(6, 8, 10, seed=9)
    a, s = args[0].requires_grad_(), args[3].requires_grad_()
    g1 = torch.autograd.grad(flexda_step(*args)[0], (a, s))
    g3 = torch.autograd.grad(flexda_step(*args)[0] * -2.5, (a, s))
    torch.testing.assert_close(g3[0], -2.5 * g1[0])
    torch.testing.assert_close(g3[1], -2.5 * g1[1])
    s.requires_grad_(False)
    (ga,) = torch.autograd.grad(flexda_step(*args)[0], (a,))
    assert torch.equal(ga, g1[0])
    a.requires_grad_(False)
    assert not flexda_step(*args)[0].requires_grad
    with torch.inference_mode():
        assert torch.equal(flexda_step(*args)[0], flexda_step(*args)[0])


def test_retain_graph_and_backward_accumulation():
    args = step_args(6, 8, 10, seed=5)
    a, s = args[0].requires_grad_(), args[3].requires_grad_()
    loss = flexda_step(*args)[0]
    g1 = torch.autograd.grad(loss, (a, s), retain_graph=True)
    g2 = torch.autograd.grad(loss, (a, s), retain_graph=True)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    # With retain_graph the gradients are fresh tensors: changing one in place changes neither
    # the other nor what the next backward through the same graph returns.
    g2[0].add_(1.0)
    g3 = torch.autograd.grad(loss, (a, s))
    assert torch.equal(g3[0], g1[0]) and not torch.equal(g2[0], g1[0])
    # .backward() on one retained graph three times, then on a fresh graph: .grad accumulates.
    loss = flexda_step(*args)[0]
    for _ in range(3):
        loss.backward(retain_graph=True)
    flexda_step(*args)[0].backward()
    torch.testing.assert_close(a.grad, 4 * g1[0])
    torch.testing.assert_close(s.grad, 4 * g1[1])
    # the weak view gets no gradient, even when it requires one
    w = args[2].clone().requires_grad_()
    out = flexda_step(args[0], args[1], w, *args[3:])[0]
    assert torch.autograd.grad(out, (w,), allow_unused=True) == (None,)


def test_higher_order_gradients_are_refused():
    # The forward's gradients are values: differentiating them again would silently give 0.
    args = step_args(6, 8, 10, seed=2)
    a = args[0].requires_grad_()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(flexda_step(*args)[0], (a,), create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    args = step_args(5, 7, 19, dtype, temperature=0.7)
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(flexda_step, args)


def test_registered_for_cpu_and_its_autograd_key_only():
    assert flexda_ops.has_kernel("flexda_step", "CPU")
    assert flexda_ops.has_kernel("flexda_step", "AutogradCPU")
    assert not flexda_ops.has_kernel("flexda_step", "CUDA")
