"""The op contract's test harness, in one place for every backend and every test file
(docs/contract.md, Tolerances): random step inputs, the comparison of a fused backend's outputs
with the float64 reference, and the runner for the Triton interpreter's child process.

    args = fwd_args(b, n, c, dtype, seed=...)        # the 8 arguments of adello::flexda_fwd
    check_outputs(op(*args), args, what="...")      # every output against the fp64 reference

Tolerances, per logits dtype (`g` the reference gradient, `w` the reference loss value):

    losses  |got - w| <= loss_rtol * max(|w|, C * tiny(acc) / loss_rtol)
    grads   max |got - g| <= grad_tol * max(1, max|g|)   (fp32, fp64)
            max |got - g| <= grad_tol * max|g|           (bf16, fp16)
    prior   max |got - want| <= prior_tol

The loss floor: every loss term is a sum of non-negative per-row terms, each formed from
differences to the row maximum, so a correct kernel keeps the relative precision of even tiny
losses, with one exception: an exp(x_c - m) below the smallest normal number of the accumulate
dtype may be flushed to zero by a vectorised exp, and a row whose every other class is that far
below its maximum then loses up to C * tiny of its loss. Since the losses are means over rows,
the whole loss loses at most C * tiny; nothing else justifies an absolute slack.

Masks and pseudo-labels are equal exactly, except on exempt rows (one rule for every backend):
a row whose weak maximum probability is within EXEMPT_WINDOW of tau may have either mask, and a
row whose two largest weak logits are within EXEMPT_WINDOW of each other may take any class
within EXEMPT_WINDOW of its maximum as its pseudo-label. Nothing is skipped for them: the mask is
still 0/1, the pseudo-label still a legitimate class, and where the backend decided differently
from the reference, that row's loss contributions and gradient row are recomputed in float64
with the backend's decision (`unlabeled_row_terms`) and everything is compared at full tolerance.
L_s, grad_lb and prior_batch never depend on a decision and are always compared.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adello_kernels.ops.flexda import (
    HP_GATE,
    HP_LAMBDA_D,
    HP_LAMBDA_U,
    HP_PRIOR_EM,
    HP_TEMPERATURE,
    NUM_HPARAMS,
)
from adello_kernels.reference import (
    accumulate_dtype,
    adjustments,
    alpha_schedule,
    flexda_fwd_reference,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64"}
EXEMPT_WINDOW = 1e-5
# Fresh inputs on demand: ADELLO_TEST_SEED=<int> shifts every seed of the contract cases.
SEED = int(os.environ.get("ADELLO_TEST_SEED", "0"))


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float
    grad_tol: float
    grad_floor_one: bool     # the gradient bound scales with max(1, max|g|) instead of max|g|
    prior_tol: float


TOLERANCES = {
    torch.float32: Tolerance(1e-5, 1e-6, True, 1e-6),
    torch.float64: Tolerance(1e-10, 1e-12, True, 1e-12),
    # bf16/fp16 logits accumulate in fp32 from the already-rounded inputs, so the batch prior (an
    # fp32 quantity that is never rounded to the logits' dtype) keeps the fp32 bound.
    torch.bfloat16: Tolerance(1e-2, 2e-2, False, 1e-6),
    torch.float16: Tolerance(1e-2, 2e-2, False, 1e-6),
}
# The (loss rel., gradient) pairs in the layout older test files index.
TOL = {d: (t.loss_rtol, t.grad_tol) for d, t in TOLERANCES.items()}


# ---------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------

def random_prior(c: int, gen: torch.Generator, zeros: bool = False) -> torch.Tensor:
    """A long-tailed [C] fp32 distribution; with `zeros`, a third of the classes get 0 (then
    |log(P + eps)| reaches ~20 in the adjustments)."""
    p = torch.rand(c, generator=gen, dtype=torch.float64).pow(3) + 1e-3
    if zeros and c > 2:
        p[torch.randperm(c, generator=gen)[: c // 3]] = 0.0
    return (p / p.sum()).float()


def make_inputs(b: int, n: int, c: int, *, scale: float = 5.0, dtype=torch.float32,
                seed: int = 0, device="cpu", confident_frac: float = 0.5,
                prior_zeros: bool = False):
    """(z_l, y, z_w, z_s, prior_lb, prior_ulb) of one step. A fraction of the weak rows gets a
    dominant class so that both masked and unmasked rows occur."""
    gen = torch.Generator().manual_seed(seed)
    z_l = torch.randn(b, c, generator=gen, dtype=torch.float64) * scale
    z_w = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    z_s = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    if c > 1:
        rows = torch.rand(n, generator=gen) < confident_frac
        cls = torch.randint(0, c, (n,), generator=gen)
        z_w[rows, cls[rows]] += 10.0 + scale * 2
    y = torch.randint(0, c, (b,), generator=gen)
    prior_lb = random_prior(c, gen, zeros=prior_zeros)
    prior_ulb = random_prior(c, gen, zeros=prior_zeros)
    to = dict(device=device, dtype=dtype)
    return (z_l.to(**to), y.to(device), z_w.to(**to), z_s.to(**to), prior_lb.to(device),
            prior_ulb.to(device))


def hparams_tensor(lambda_u, lambda_d, gate, temperature, acc, device="cpu",
                   prior_em=False) -> torch.Tensor:
    """The op's [NUM_HPARAMS] hparams, each value in its named slot."""
    hp = torch.zeros(NUM_HPARAMS, dtype=acc, device=device)
    hp[HP_LAMBDA_U], hp[HP_LAMBDA_D] = float(lambda_u), float(lambda_d)
    hp[HP_GATE], hp[HP_TEMPERATURE] = float(bool(gate)), float(temperature)
    hp[HP_PRIOR_EM] = float(bool(prior_em))
    return hp


def random_weights(kind: str, n: int, gen: torch.Generator, acc=torch.float32) -> torch.Tensor:
    """[N] prior weights: "01" (about half the rows), "pos" (in (0.1, 2.1)), "zero"."""
    if kind == "01":
        return (torch.rand(n, generator=gen) < 0.5).to(acc)
    if kind == "pos":
        return (torch.rand(n, generator=gen) * 2 + 0.1).to(acc)
    if kind == "zero":
        return torch.zeros(n, dtype=acc)
    raise KeyError(kind)


def plant_ties(z_w: torch.Tensor, gen: torch.Generator, frac: float = 0.3) -> torch.Tensor:
    """Copies of z_w where a fraction of the rows has its two largest logits exactly tied (in
    z_w's dtype) and another fraction tied to within half the exempt window (representable in
    fp32/fp64 only; bf16/fp16 round it to a tie or to a clear gap)."""
    z = z_w.double().clone()
    n, c = z.shape
    if c < 2:
        return z_w.clone()
    pick = torch.rand(n, generator=gen)
    top2 = z.topk(2, dim=-1).indices
    for i in range(n):
        k1, k2 = int(top2[i, 0]), int(top2[i, 1])
        if pick[i] < frac:
            z[i, k2] = z[i, k1]
        elif pick[i] < 1.5 * frac:
            z[i, k2] = z[i, k1] - EXEMPT_WINDOW / 2
    out = z.to(z_w.dtype)
    # the exact ties must survive the rounding: tie the rounded values
    for i in range(n):
        if pick[i] < frac:
            out[i, int(top2[i, 1])] = out[i, int(top2[i, 0])]
    return out


def fwd_args(b: int, n: int, c: int, dtype=torch.float32, *, seed: int = 0, scale: float = 5.0,
             alpha: float = 0.6, lambda_u: float = 0.8, lambda_d: float = 1.3, gate: bool = True,
             temperature: float = 1.0, threshold: float = 0.95, prior_zeros: bool = False,
             confident_frac: float = 0.5, ties: bool = False, threshold_on_row: bool = False,
             prior_em: bool = False, weights: str = "", distill_all: bool = False,
             device="cpu"):
    """The 8 arguments of adello::flexda_fwd (more with the options below), with ds, du as every
    path builds them (float64, rounded once to the accumulate dtype) and non-unit lambdas so
    that a swapped weight shows.
    `ties` plants exact and near ties in the weak rows; `threshold_on_row` sets tau to one weak
    row's exact maximum probability (the inclusive comparison decides that row); `prior_em`
    asks for the EM batch prior (hparams slot HP_PRIOR_EM); `weights` adds the 9th argument,
    prior_weight: "01" random 0/1 (the released lb_in_ulb_mask), "pos" random positive, "zero"
    all 0 (no row to estimate from: the prior is NaN); `distill_all` the 10th, True (every row
    distils)."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale,
                                           confident_frac=confident_frac,
                                           prior_zeros=prior_zeros)
    gen = torch.Generator().manual_seed(seed + 7919)
    if ties:
        z_w = plant_ties(z_w, gen)
    if threshold_on_row and c > 1:
        pmax = torch.softmax(z_w.double(), -1).amax(-1)
        row = int(torch.randint(0, n, (1,), generator=gen))
        threshold = min(max(float(pmax[row]), 1e-6), 1.0)
    acc = accumulate_dtype(dtype)
    ds, du = adjustments(p_l, q, alpha, 1e-9, acc)
    hp = hparams_tensor(lambda_u, lambda_d, gate, temperature, acc, prior_em=prior_em)
    args = [z_l, y, z_w, z_s, ds, du, hp, float(threshold)]
    if weights or distill_all:
        args.append(random_weights(weights, n, gen, acc) if weights else None)
    if distill_all:
        args.append(True)
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


# ---------------------------------------------------------------------------------------------
# The reference and the comparison
# ---------------------------------------------------------------------------------------------

def reference_outputs(args):
    """The float64 closed-form reference on exactly the kernel's inputs (on the CPU)."""
    z_l, y, z_w, z_s, ds, du, hp, threshold, *rest = (
        a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)
    w = rest[0] if rest else None
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), threshold,
                                None if w is None else w.double(),
                                bool(rest[1]) if len(rest) > 1 else False)


def reference_op_outputs(z_l, y, z_w, z_s, prior_lb, prior_ulb, alpha, *, threshold=0.95,
                         lambda_u=1.0, lambda_d=1.0, distill=True, temperature=1.0, eps=1e-9,
                         prior_estimator="raw"):
    """The fused op's seven outputs from the float64 reference, adjustments built from the
    priors as `flexda_loss` builds them for logits of z_l's dtype."""
    ds, du = adjustments(prior_lb, prior_ulb, alpha, eps, accumulate_dtype(z_l.dtype))
    hp = hparams_tensor(lambda_u, lambda_d, distill, temperature, torch.float64, z_l.device,
                        prior_em=prior_estimator == "em")
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp, threshold)


def exempt_rows(z_w: torch.Tensor, threshold: float):
    """([N] near_tau, [N] near_tie): rows whose weak max probability is within EXEMPT_WINDOW of
    tau (mask may differ), and rows whose two largest weak logits are within EXEMPT_WINDOW of
    each other, exact ties included (pseudo-label may differ)."""
    z = z_w.detach().double().cpu()
    pmax = torch.softmax(z, -1).amax(-1)
    near_tau = (pmax - threshold).abs() <= EXEMPT_WINDOW
    if z.shape[1] < 2:
        return near_tau, torch.zeros_like(near_tau)
    top2 = z.topk(2, dim=-1).values
    return near_tau, (top2[:, 0] - top2[:, 1]) <= EXEMPT_WINDOW


def excused_rows(z_w: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] bool: rows exempt for either reason."""
    near_tau, near_tie = exempt_rows(z_w, threshold)
    return near_tau | near_tie


def unlabeled_row_terms(z_w, z_s, du, hp, mask, yhat, n=None, distill_all=False):
    """Per-row float64 contributions of the unlabeled rows under the given decisions:
    (u [N]: M_i CE(yhat_i, softmax(a_i)) / N, d [N]: [gate] D_i H(q_i, softmax(a_i/T)) / N,
    grad [N, C]: the row's dloss/dlogits_ulb_s), N = `n` (the batch's row count; default: the
    rows given), D_i = 1 - M_i (1 with `distill_all`). Used to re-score exempt rows on which a
    backend decided differently from the reference; test_contract.py checks it against the
    reference."""
    z_w, z_s, du, hp = (x.detach().double().cpu() for x in (z_w, z_s, du, hp))
    m = mask.detach().double().cpu()
    yhat = yhat.detach().cpu()
    c = z_w.shape[1]
    n = z_w.shape[0] if n is None else n
    lu, ld, gate, t = hp[HP_LAMBDA_U], hp[HP_LAMBDA_D], hp[HP_GATE] != 0, hp[HP_TEMPERATURE]
    a = z_s + du
    logp = torch.log_softmax(a, -1)
    u = m * -logp.gather(1, yhat[:, None])[:, 0] / n
    q = torch.softmax(z_w / t, -1)
    logpt = torch.log_softmax(a / t, -1)
    dm = torch.ones_like(m) if distill_all else 1 - m
    d = torch.where(gate, dm * -(q * logpt).sum(-1) / n, 0.0)
    g = lu * m[:, None] * (logp.exp() - F.one_hot(yhat, c).double())
    g = g + torch.where(gate, ld * dm[:, None] * (logpt.exp() - q) / t, 0.0)
    return u, d, g / n


def _close_loss(name, got, want, tol_rel, floor, what):
    got, want = float(got), float(want)
    if math.isnan(want):
        assert math.isnan(got), f"{what}: {name} = {got!r}, the reference is NaN"
        return
    bound = tol_rel * max(abs(want), floor)
    assert abs(got - want) <= bound, \
        f"{what}: {name} = {got!r} vs reference {want!r} (err {abs(got - want):.3g} > {bound:.3g})"


def _close_grad(name, got, want, tol: Tolerance, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), \
        f"{what}: {name} NaN at {nan_g.nonzero()[:5].tolist()}, reference at " \
        f"{nan_w.nonzero()[:5].tolist()}"
    fin = ~nan_w
    if not bool(fin.any()):
        return
    big = float(want[fin].abs().max())
    bound = tol.grad_tol * (max(1.0, big) if tol.grad_floor_one else big)
    err = float((got[fin] - want[fin]).abs().max())
    assert err <= bound, f"{what}: {name} max abs err {err:.3g} > {bound:.3g} (max|g| {big:.3g})"


def check_outputs(got, args, *, what: str = "", want=None) -> dict:
    """Every output of a `flexda_fwd`-schema call against the float64 reference, at the contract
    tolerances, exempt rows re-scored (module docstring). `args`: the 8 arguments exactly as the
    backend got them (9 with prior_weight). Returns counts of what the exemption rule touched,
    for the tests' own checks that the exemption paths are exercised."""
    z_l, y, z_w, z_s, ds, du, hp, threshold = args[:8]
    dtype = z_l.dtype
    acc = accumulate_dtype(dtype)
    tol = TOLERANCES[dtype]
    b, c = z_l.shape
    n = z_w.shape[0]
    if want is None:
        want = reference_outputs(args)
    loss, terms, mask, pl, prior, g_lb, g_s = got
    w_loss, w_terms, w_mask, w_pl, w_prior, w_g_lb, w_g_s = want

    # metadata: shapes, dtypes, the device, dense gradients
    for name, x, shape, dt in (("loss", loss, (), acc), ("terms", terms, (3,), acc),
                               ("mask", mask, (n,), acc), ("pseudo_labels", pl, (n,), torch.int64),
                               ("prior_batch", prior, (c,), acc), ("grad_lb", g_lb, (b, c), dtype),
                               ("grad_ulb_s", g_s, (n, c), dtype)):
        assert tuple(x.shape) == shape and x.dtype == dt, \
            f"{what}: {name} is {tuple(x.shape)} {x.dtype}, the contract says {shape} {dt}"
        assert x.device == z_l.device, f"{what}: {name} on {x.device}, logits on {z_l.device}"
    assert g_lb.is_contiguous() and g_s.is_contiguous(), f"{what}: gradients not contiguous"
    loss, terms, mask, pl, prior = (x.detach().cpu() for x in (loss, terms, mask, pl, prior))

    # decisions: exact outside the exempt rows, legitimate inside them
    near_tau, near_tie = exempt_rows(z_w, threshold)
    w_mask_acc = w_mask.to(acc)
    bad = (mask != w_mask_acc) & ~near_tau
    assert not bool(bad.any()), f"{what}: mask differs on rows {bad.nonzero()[:8, 0].tolist()}"
    assert bool(((mask == 0) | (mask == 1)).all()), f"{what}: mask entries outside {{0, 1}}"
    bad = (pl != w_pl) & ~near_tie
    assert not bool(bad.any()), \
        f"{what}: pseudo-labels differ on rows {bad.nonzero()[:8, 0].tolist()}"
    assert bool(((pl >= 0) & (pl < c)).all()), f"{what}: pseudo-label outside [0, C)"
    zw = z_w.detach().double().cpu()
    chosen = zw.gather(1, pl[:, None])[:, 0]
    legit = chosen >= zw.amax(-1) - EXEMPT_WINDOW
    assert bool(legit[near_tie].all()), \
        f"{what}: an exempt row's pseudo-label is not within {EXEMPT_WINDOW} of its max logit"

    # re-score the exempt rows on which the backend decided differently
    flipped = (mask != w_mask_acc) | (pl != w_pl)
    w_terms, w_loss, w_g_s = w_terms.clone(), w_loss.clone(), w_g_s.clone()
    if bool(flipped.any()):
        rows = flipped.nonzero()[:, 0]
        sub = lambda x: x.detach().cpu()[rows]  # noqa: E731
        dall = len(args) > 9 and bool(args[9])
        u_got, d_got, g_got = unlabeled_row_terms(sub(z_w), sub(z_s), du, hp, mask[rows],
                                                  pl[rows], n, dall)
        u_ref, d_ref, _ = unlabeled_row_terms(sub(z_w), sub(z_s), du, hp, w_mask[rows],
                                              w_pl[rows], n, dall)
        du_sum, dd_sum = float((u_got - u_ref).sum()), float((d_got - d_ref).sum())
        w_terms[1] += du_sum
        w_terms[2] += dd_sum
        hp64 = hp.detach().double().cpu()
        w_loss = w_loss + hp64[HP_LAMBDA_U] * du_sum + hp64[HP_LAMBDA_D] * dd_sum
        w_g_s[rows] = g_got.to(w_g_s.dtype)

    floor = c * torch.finfo(acc).tiny / tol.loss_rtol
    _close_loss("loss", loss, w_loss, tol.loss_rtol, floor, what)
    for k, name in enumerate(("L_s", "L_u", "L_d")):
        _close_loss(name, terms[k], w_terms[k], tol.loss_rtol, floor, what)
    if float(hp[HP_GATE]) == 0:
        assert float(terms[2]) == 0.0, f"{what}: distillation gate off but terms[2] = {terms[2]}"
    nan_got, nan_want = torch.isnan(prior), torch.isnan(w_prior)
    assert torch.equal(nan_got, nan_want), \
        f"{what}: prior_batch NaN at {nan_got.nonzero().flatten().tolist()[:5]}, the reference " \
        f"at {nan_want.nonzero().flatten().tolist()[:5]}"
    p_err = float((prior.double() - w_prior.double()).nan_to_num(0.0).abs().max())
    assert p_err <= tol.prior_tol, f"{what}: prior_batch err {p_err:.3g} > {tol.prior_tol:.3g}"
    _close_grad("grad_lb", g_lb, w_g_lb, tol, what)
    _close_grad("grad_ulb_s", g_s, w_g_s, tol, what)
    return {"near_tau": int(near_tau.sum()), "near_tie": int(near_tie.sum()),
            "flipped": int(flipped.sum()), "masked": int(w_mask.sum()), "rows": n}


def assert_outputs_close(got, want, z_w, dtype, threshold=0.95, what="", args=None):
    """The comparison older test files call with precomputed reference outputs. Pass the op's
    `args` (8 entries) whenever the weak rows may contain exempt rows: without them an exempt
    row's loss contribution cannot be re-scored, and the call fails instead of skipping checks."""
    if args is None:
        exempt = excused_rows(z_w, threshold)
        if bool(exempt.any()):
            raise AssertionError(
                f"{what}: {int(exempt.sum())} weak row(s) are exempt (within {EXEMPT_WINDOW} of "
                "tau or of a tie); pass args= so that their loss contribution is re-scored")
        # without exempt rows only z_w and the threshold matter for the decisions; the other
        # entries are needed only to re-score exempt rows, so placeholders are enough
        zero = torch.zeros(z_w.shape[1], dtype=accumulate_dtype(dtype))
        hp = torch.ones(NUM_HPARAMS, dtype=accumulate_dtype(dtype))
        args = [torch.empty(got[5].shape, dtype=dtype, device=got[5].device), None, z_w, z_w,
                zero, zero, hp, threshold]
    return check_outputs(got, args, what=what, want=want)


# ---------------------------------------------------------------------------------------------
# The whole-step op: the reference view of one step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepConfig:
    total_steps: int = 20
    alpha_min: float = 0.1
    power: float = 2.0
    distill_start: int = 3
    lambda_u: float = 0.8
    lambda_d: float = 1.3
    eps: float = 1e-9
    flexda: bool = True
    threshold: float = 0.9
    prior_momentum: float = 0.7
    prior_em: bool = False
    gt_target: bool = False      # a fixed target prior (the released "adello_gt" mode)
    alpha_epoch_steps: int = 1   # alpha per epoch of this many steps (1: per step)
    weights: str = ""            # prior weights each step (random_weights kind; "" none)
    distill_all: bool = False    # every row distils

    def op_tail(self, update: bool, prior_target=None, prior_weight=None):
        """The op's arguments after `temperature`, in schema order (`prior_target`: the fixed
        target prior of a gt_target config; `prior_weight`: the step's [N] weights)."""
        return [self.total_steps, self.alpha_min, self.power, self.distill_start, self.lambda_u,
                self.lambda_d, self.eps, self.flexda, self.threshold, self.prior_momentum, update,
                self.prior_em, prior_target, self.alpha_epoch_steps, prior_weight,
                self.distill_all]


def step_fwd_args(z_l, y, z_w, z_s, prior_lb, prior_ulb, t: int, temperature: float,
                  cfg: StepConfig, prior_target=None):
    """The `flexda_fwd` arguments one step at state (Q = prior_ulb, step t, T) stands for:
    alpha_t from the schedule (per epoch of cfg.alpha_epoch_steps), ds, du in float64 rounded
    once to acc (zero without flexda; Qa from `prior_target` when given), the gate
    [t >= distill_start], the prior estimator -- the prologue of docs/contract.md, from host
    values."""
    acc = accumulate_dtype(z_l.dtype)
    c = z_l.shape[1]
    if cfg.flexda:
        alpha = alpha_schedule(t, cfg.total_steps, cfg.alpha_min, cfg.power,
                               cfg.alpha_epoch_steps)
        ds, du = adjustments(prior_lb.cpu(), prior_ulb.cpu(), alpha, cfg.eps, acc,
                             None if prior_target is None else prior_target.cpu())
    else:
        ds = du = torch.zeros(c, dtype=acc)
    hp = hparams_tensor(cfg.lambda_u, cfg.lambda_d, t >= cfg.distill_start, temperature, acc,
                        prior_em=cfg.prior_em)
    return [z_l, y, z_w, z_s, ds, du, hp, cfg.threshold]


def step_outputs_as_fwd(out):
    """The step op's 9 outputs in the fwd op's 7-output layout."""
    loss, l_s, l_u, l_d, mask, pl, prior, g_lb, g_s = out
    return (loss, torch.stack([l_s, l_u, l_d]), mask, pl, prior, g_lb, g_s)


# ---------------------------------------------------------------------------------------------
# The Triton interpreter's child process
# ---------------------------------------------------------------------------------------------

def triton_interpreted_here() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_in_triton_interpreter(test_file: str, *pytest_args: str, timeout: float = 900):
    """Runs `pytest test_file` in a fresh process with TRITON_INTERPRET=1 (the variable only
    takes effect if set before triton decorates the kernels, and setting it in this process
    would change what every later test sees). Returns (returncode, report tail)."""
    # the caller's PYTHONPATH first (it may point at another build of the package), then the
    # repository root, for a checkout that is not pip-installed
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), ROOT) if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
           "-W", "ignore::RuntimeWarning", *pytest_args, os.path.abspath(test_file)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    report = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:]).strip()
    return proc.returncode, report


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
