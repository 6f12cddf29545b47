"""adello_kernels/ops/state.py: the prior update in plain PyTorch (the reference backend's, and
every backend's when the batch prior is all-reduced first), against the equation written out in
float64 (docs/method.md, Prior update)."""
import math

import pytest
import torch

from adello_kernels.ops.state import momentum_update, update_prior_


def priors(c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p, q = torch.rand(2, c, generator=gen, dtype=torch.float64) ** 3 + 1e-4
    return (p / p.sum()).float(), (q / q.sum()).float()


@pytest.mark.parametrize("m", [0.0, 0.5, 0.999])
def test_momentum_update_is_the_ema(m):
    q, pb = priors(17, 3)
    new, ok = momentum_update(q, pb, m)
    want = m * q.double() + (1 - m) * pb.double()
    assert bool(ok) and new.dtype == q.dtype
    torch.testing.assert_close(new.double(), want, rtol=0, atol=2e-8)
    # the weight goes on the old prior: swapping the two would move Q by (2m - 1)(Q - pb)
    if m != 0.5:
        assert not torch.allclose(new, (1 - m) * q + m * pb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_batch_prior_is_skipped_and_counted(bad):
    q, pb = priors(20, 1)
    pb[3] = bad
    state = (q.clone(), torch.tensor(7), torch.tensor(2))
    update_prior_(*state, pb, 0.9)
    assert torch.equal(state[0], q)                      # unchanged, not poisoned
    assert int(state[1]) == 8 and int(state[2]) == 3     # the step still advances


def test_update_in_place_advances_step_only_once():
    q, pb = priors(9, 2)
    state = (q.clone(), torch.tensor(0), torch.tensor(0))
    update_prior_(*state, pb, 0.25)
    torch.testing.assert_close(state[0], momentum_update(q, pb, 0.25)[0], rtol=0, atol=0)
    assert int(state[1]) == 1 and int(state[2]) == 0
