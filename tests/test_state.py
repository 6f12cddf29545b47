"""adello_kernels/ops/state.py: the prologue/epilogue ops of an ADELLOLoss step. The C++ CPU
kernels must agree with the PyTorch implementations (which the other devices run)."""
import math

import pytest
import torch

from adello_kernels.ops import flexda
from adello_kernels.ops.state import (_prepare_torch, adello_prepare, adello_update_,
                                      update_prior_)

needs_cpp = pytest.mark.skipif(not flexda.has_kernel("adello_prepare", "CPU"),
                               reason="adello_kernels._C is not built")


def priors(c, seed=0, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    p_l, q = torch.rand(2, c, generator=gen) ** 3 + 1e-4
    if zeros and c > 2:
        q[: c // 2] = 0.0
    return p_l / p_l.sum(), q / q.sum()


def prepare_args(c, step, seed=0, zeros=False, flexda_on=True, dtype=torch.float32):
    p_l, q = priors(c, seed, zeros)
    return (p_l, q, torch.tensor(step), torch.tensor(1.7), 1000, 0.1, 2.0, 300, 1.3, 0.7, 1e-9,
            flexda_on, dtype)


@needs_cpp
@pytest.mark.parametrize("c,step,zeros,flexda_on,dtype", [
    (1, 0, False, True, torch.float32), (10, 0, False, True, torch.float32),
    (127, 299, True, True, torch.float32), (127, 300, False, True, torch.float64),
    (4097, 999, False, True, torch.float32), (50, 5000, True, True, torch.float32),
    (33, 400, False, False, torch.float32)])
def test_prepare_cpp_matches_torch(c, step, zeros, flexda_on, dtype):
    args = prepare_args(c, step, zeros=zeros, flexda_on=flexda_on, dtype=dtype)
    got = adello_prepare(*args)
    want = _prepare_torch(*args)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, rtol=2e-7 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert got[2][2].item() == float(step >= 300)  # the distillation gate


@needs_cpp
@pytest.mark.parametrize("bad", [False, True])
def test_update_cpp_matches_torch(bad):
    _, q = priors(20, 1)
    pb, _ = priors(20, 2)
    if bad:
        pb[3] = math.nan
    states = []
    for fn in (adello_update_, update_prior_):
        state = (q.clone(), torch.tensor(7), torch.tensor(2))
        fn(*state, pb, 0.9)
        states.append(state)
    (q1, s1, k1), (q2, s2, k2) = states
    torch.testing.assert_close(q1, q2)
    assert int(s1) == int(s2) == 8 and int(k1) == int(k2) == 2 + bad
    if bad:
        assert torch.equal(q1, q)


@needs_cpp
def test_opcheck_state_ops():
    torch.library.opcheck(adello_prepare, prepare_args(12, 100))
    _, q = priors(6)
    torch.library.opcheck(adello_update_, (q.clone(), torch.tensor(3), torch.tensor(0),
                                           q.clone(), 0.99))


def test_state_ops_have_cuda_kernels():
    for name in ("adello_prepare", "adello_update_"):
        assert flexda.has_kernel(name, "CUDA")
