"""The gradient noise scale (adello_kernels/train/noise_scale.py): the two-batch estimators
recover |G|^2 and tr(S) of a known gradient distribution, the efficiency formulas match the
model of McCandlish et al., and measuring inside a run leaves the run exactly as it would have
been (a measurement that moved a sampler, a generator, BatchNorm or the criterion's pending
prior would change every later step)."""
import math

import pytest
import torch
from test_train_scaling import _trainer

from adello_kernels.train import noise_scale


def test_estimators_recover_the_mean_gradient_and_the_noise_trace():
    # Per-image gradients g_i = G + e_i, e_i ~ N(0, diag(s^2)); a batch of b averages b of them.
    torch.manual_seed(0)
    d, b_small, k, draws = 50, 16, 8, 4000
    G = torch.randn(d, dtype=torch.float64) * 0.3
    s = torch.rand(d, dtype=torch.float64) + 0.5
    trace, g2 = float((s * s).sum()), float(G.dot(G))
    small = G + torch.randn(draws, k, d, dtype=torch.float64) * s / math.sqrt(b_small)
    sq_small = float((small * small).sum(-1).mean())
    big = small.mean(1)
    sq_big = float((big * big).sum(-1).mean())
    est = noise_scale.estimate(sq_small, sq_big, b_small, k * b_small)
    assert est["g2"] == pytest.approx(g2, rel=0.05)
    assert est["trace"] == pytest.approx(trace, rel=0.05)
    assert est["b_simple"] == pytest.approx(trace / g2, rel=0.1)


def test_noise_dominated_estimate_reports_an_infinite_noise_scale():
    # |g_big|^2 at 8x the batch exactly 1/8 of |g_small|^2: pure noise, |G|^2 = 0.
    est = noise_scale.estimate(8.0, 1.0, 4, 32)
    assert est["g2"] == pytest.approx(0.0, abs=1e-12)
    assert est["b_simple"] == math.inf
    with pytest.raises(ValueError, match="b_small, b_big"):
        noise_scale.estimate(1.0, 0.5, 32, 32)


def test_efficiencies_follow_the_empirical_model():
    assert noise_scale.step_efficiency(100, 100.0) == pytest.approx(0.5)
    # E(B) = E_min (1 + B / B_noise): batch 512 vs 64 at B_noise = 64 needs 9 / 2 the samples.
    assert noise_scale.sample_efficiency(512, 64, 64.0) == pytest.approx(2 / 9)
    assert noise_scale.sample_efficiency(512, 64, math.inf) == 1.0


def test_measuring_leaves_the_run_exactly_as_it_was(data_root, tmp_path):
    runs = []
    for name, every in (("plain", 0), ("measured", 1)):
        tr = _trainer(data_root, tmp_path / name, batch=8)
        found = []
        for _ in range(3):
            if every:
                found.append(noise_scale.measure(tr, k=2, draws=2))
            tr.train_step()
        runs.append((tr, found))
    (a, _), (b, found) = runs
    assert all(math.isfinite(m["trace"]) and m["trace"] > 0 for m in found)
    for x, y in zip(list(a.model.state_dict().values()) + list(a.crit.state_dict().values()),
                    list(b.model.state_dict().values()) + list(b.crit.state_dict().values())):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    for x, y in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert torch.equal(a.gen_aug.get_state(), b.gen_aug.get_state())


def test_measure_refuses_a_trainer_it_cannot_restore(data_root, tmp_path):
    tr = _trainer(data_root, tmp_path / "acc", "--grad-accum", "2", batch=8)
    with pytest.raises(ValueError, match="--grad-accum"):
        noise_scale.measure(tr)
    tr = _trainer(data_root, tmp_path / "k", batch=8)
    with pytest.raises(ValueError, match="k: expected"):
        noise_scale.measure(tr, k=1)
