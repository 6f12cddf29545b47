"""The shared `adello::` op schemas: fake (meta) outputs agree with the op contract, every op
the package defines has a kernel where the extension is built, the hparams slots agree between
Python and C++, opcheck on every op with a kernel here, and the autograd wrapper's behaviour."""
import os
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.ops import flexda
from adello_kernels.ops.snapshot import snapshot
from adello_kernels.reference import flexda_fwd_reference, logit_adjustments

from utils import make_inputs


def op_args(b=5, n=7, c=9, dtype=torch.float32, temperature=1.5):
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=4)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ds, du = logit_adjustments(p_l, q, 0.5, dtype=acc)
    hp = torch.tensor([1.0, 0.5, 1.0, temperature, 0.0], dtype=acc)  # slots: ops/flexda.py
    return [z_l, y, z_w, z_s, ds, du, hp, 0.95]


HPARAMS_HEADER = os.path.join(os.path.dirname(__file__), "..", "csrc", "adello_hparams.h")


def parse_hparams_header(text: str) -> dict:
    """{Python slot name: value} from the C++ enum: kHpLambdaU = 0 -> HP_LAMBDA_U: 0, and
    kNumHParams -> NUM_HPARAMS."""
    body = re.search(r"enum\s+HParam\b[^{]*\{(.*?)\}", text, re.S)
    assert body, "no `enum HParam { ... }` in csrc/adello_hparams.h"
    out = {}
    for name, value in re.findall(r"\b(k\w+)\s*=\s*(\d+)", body.group(1)):
        if name == "kNumHParams":
            out["NUM_HPARAMS"] = int(value)
        else:
            assert name.startswith("kHp"), name
            out["HP_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name[3:]).upper()] = int(value)
    return out


def python_hparams() -> dict:
    return {k: getattr(flexda, k) for k in dir(flexda) if k.startswith("HP_") or
            k == "NUM_HPARAMS"}


def test_hparams_slots_agree_between_python_and_cpp():
    """A slot renumbered on one side only would make every C++/CUDA kernel read the wrong
    hyperparameter (e.g. lambda_d as the gate) while the Python side writes the right one."""
    with open(HPARAMS_HEADER) as f:
        cpp = parse_hparams_header(f.read())
    py = python_hparams()
    assert cpp == py, f"csrc/adello_hparams.h {cpp} vs adello_kernels/ops/flexda.py {py}"
    slots = sorted(v for k, v in py.items() if k.startswith("HP_"))
    assert slots == list(range(py["NUM_HPARAMS"])), "slots must number 0 .. NUM_HPARAMS - 1"
    assert sorted(flexda.HPARAM_SLOTS.values()) == slots
    for name, slot in flexda.HPARAM_SLOTS.items():
        assert py["HP_" + name.upper()] == slot, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fake_outputs_match_the_contract(dtype):
    args = op_args(dtype=dtype)
    want = flexda_fwd_reference(*args)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        got = flexda._fake(*fake_args)
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device


def fused_backends():
    return [b for b in ak.available_backends() if b in ("cpu", "cuda")]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(backend, dtype):
    device = "cuda" if backend == "cuda" else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in op_args(dtype=dtype)]
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(torch.ops.adello.flexda_fwd.default, args)


def test_opcheck_snapshot():
    torch.library.opcheck(snapshot, (torch.randn(5),))
    torch.library.opcheck(snapshot, (torch.tensor(3),))


def extension_ops() -> list:
    """The ops the compiled extension must implement: every op of the cpu backend's row in the
    backend table, and the step op's helper scale_grads_ (all defined in adello_kernels/ops)."""
    row = backends.TABLE["cpu"]
    return [row.fwd_op, row.step_op, "scale_grads_"]


@pytest.mark.skipif(not backends._load_extension(), reason="adello_kernels._C is not built")
@pytest.mark.parametrize("op", extension_ops())
def test_the_extension_registers_a_cpu_kernel_for_every_op(op):
    """A schema defined in Python but never implemented in C++ (or a registration dropped from
    csrc/) leaves the cpu backend half built; `available_backends` would then hide it."""
    assert flexda.has_kernel(op, "CPU"), f"adello::{op} has no CPU kernel in adello_kernels._C"
    if op == backends.TABLE["cpu"].step_op:
        assert flexda.has_kernel(op, "Autograd"), \
            f"adello::{op} has no Autograd kernel (csrc/flexda_step_autograd.cpp)"


def test_snapshot_has_cpu_and_cuda_kernels():
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("adello::snapshot", key), key


@pytest.mark.parametrize("backend", fused_backends())
def test_backward_scales_saved_gradients(backend):
    # The op's backward is grad_out * saved gradient: check it against the reference with a
    # non-unit incoming gradient, and that terms/mask/prior are non-differentiable.
    z_l, y, z_w, z_s, p_l, q = make_inputs(6, 8, 10, seed=9)
    z_l.requires_grad_()
    z_s.requires_grad_()
    z_w.requires_grad_()
    out = ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.5, backend=backend)
    ref = ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.5, backend="reference")
    for o in (out, ref):
        assert not o.loss_sup.requires_grad and not o.prior_batch.requires_grad
    g = torch.autograd.grad(out.loss * 3.0, (z_l, z_s, z_w), allow_unused=True)
    r = torch.autograd.grad(ref.loss * 3.0, (z_l, z_s, z_w), allow_unused=True)
    torch.testing.assert_close(g[0], r[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], r[1], rtol=1e-5, atol=1e-6)
    assert g[2] is None or float(g[2].abs().max()) == 0.0  # the weak view gets no gradient


@pytest.mark.parametrize("backend", fused_backends())
def test_higher_order_gradients_are_refused(backend):
    # The fused forward's gradients are values: differentiating them again would silently give 0.
    z_l, y, z_w, z_s, p_l, q = make_inputs(4, 5, 6, seed=1)
    z_l.requires_grad_()
    out = ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out.loss, (z_l,), create_graph=True)
