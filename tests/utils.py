"""Shared test helpers: random step inputs and the SPEC.md section 6 comparison against the
float64 reference."""
from __future__ import annotations

import torch

from adello_kernels.reference import flexda_fwd_reference, logit_adjustments

TOL = {  # (loss rel. err, gradient err relative to max(1, max|grad|) / max|grad|)
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-10, 1e-12),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (1e-2, 2e-2),
}


def random_prior(c: int, gen: torch.Generator, zeros: bool = False) -> torch.Tensor:
    """A long-tailed [C] distribution (fp32), optionally with zero entries."""
    p = torch.rand(c, generator=gen, dtype=torch.float64).pow(3) + 1e-3
    if zeros and c > 2:
        p[torch.randperm(c, generator=gen)[: c // 3]] = 0.0
    return (p / p.sum()).float()


def make_inputs(b: int, n: int, c: int, *, scale: float = 5.0, dtype=torch.float32,
                seed: int = 0, device="cpu", confident_frac: float = 0.5):
    """Logits of one step. A fraction of the weak rows gets a dominant class so that both masked
    and unmasked rows occur."""
    gen = torch.Generator().manual_seed(seed)
    z_l = torch.randn(b, c, generator=gen, dtype=torch.float64) * scale
    z_w = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    z_s = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    if c > 1:
        rows = torch.rand(n, generator=gen) < confident_frac
        cls = torch.randint(0, c, (n,), generator=gen)
        z_w[rows, cls[rows]] += 10.0 + scale * 2
    y = torch.randint(0, c, (b,), generator=gen)
    prior_lb = random_prior(c, gen)
    prior_ulb = random_prior(c, gen)
    to = dict(device=device, dtype=dtype)
    return (z_l.to(**to), y.to(device), z_w.to(**to), z_s.to(**to), prior_lb.to(device),
            prior_ulb.to(device))


def reference_op_outputs(z_l, y, z_w, z_s, prior_lb, prior_ulb, alpha, *, threshold=0.95,
                         lambda_u=1.0, lambda_d=1.0, distill=True, temperature=1.0, eps=1e-9):
    """The fused op's seven outputs from the float64 closed-form reference."""
    ds, du = logit_adjustments(prior_lb, prior_ulb, alpha, eps, dtype=torch.float64)
    hp = torch.tensor([lambda_u, lambda_d, float(bool(distill)), float(temperature)],
                      dtype=torch.float64, device=z_l.device)
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds, du, hp,
                                threshold)


def excused_rows(z_w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Rows whose mask / pseudo-label may legitimately differ (SPEC.md section 6): weak max
    probability within 1e-5 of tau, or top-two weak logits within 1e-5."""
    z = z_w.double()
    pmax = torch.softmax(z, -1).max(-1).values
    near_tau = (pmax - threshold).abs() <= 1e-5
    if z.shape[1] < 2:
        return near_tau
    top2 = z.topk(2, dim=-1).values
    return near_tau | ((top2[:, 0] - top2[:, 1]).abs() <= 1e-5)


def assert_outputs_close(got, want, z_w, dtype, threshold=0.95, what=""):
    """Compare the seven op outputs (or a FlexDAOutput-like tuple of the first five entries
    loss, terms/..., mask, pseudo_labels, prior_batch) at the SPEC.md tolerances."""
    loss_rtol, grad_tol = TOL[dtype]
    loss, terms, mask, pl, prior, g_lb, g_s = got
    w_loss, w_terms, w_mask, w_pl, w_prior, w_g_lb, w_g_s = want
    ok = ~excused_rows(z_w, threshold)
    assert torch.equal(mask.double()[ok], w_mask[ok]), f"{what}: mask differs"
    assert torch.equal(pl[ok], w_pl[ok]), f"{what}: pseudo-labels differ"
    if not bool(ok.all()):
        return  # an excused row changes the losses legitimately; the rest was compared exactly
    for name, a, b in (("loss", loss, w_loss), ("terms", terms, w_terms)):
        a, b = a.double(), b.double()
        bound = loss_rtol * b.abs().clamp_min(1e-3) + 1e-8
        assert bool(((a - b).abs() <= bound).all()), f"{what}: {name} {a.tolist()} vs {b.tolist()}"
    p_err = float((prior.double() - w_prior).abs().max())
    assert p_err <= (1e-6 if dtype in (torch.float32, torch.float64) else 1e-2), \
        f"{what}: prior_batch err {p_err}"
    for name, a, b in (("grad_lb", g_lb, w_g_lb), ("grad_ulb_s", g_s, w_g_s)):
        scale = float(b.abs().max())
        bound = grad_tol * (max(1.0, scale) if dtype in (torch.float32, torch.float64) else scale)
        err = float((a.double() - b.double()).abs().max())
        assert err <= bound + 1e-12, f"{what}: {name} max err {err} > {bound}"


def step_without_host_sync(crit, z_l, y, z_w, z_s):
    """One ADELLOLoss step + backward on CUDA under torch.cuda.set_sync_debug_mode("error"),
    after a warm-up step (lazy initialisation and compilation may synchronise). Returns its
    output; any host sync inside raises."""
    crit(z_l, y, z_w, z_s).loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = crit(z_l, y, z_w, z_s)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return out
