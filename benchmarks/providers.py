"""Benchmark shapes and providers, declared once for `compare.py` and the pytest-benchmark suite.

One step = forward + backward (gradients of the loss w.r.t. the labeled and strong-view logits)
+ prior update, exactly what a training loop runs per iteration.

Providers:
    eager         ADELLOLoss(backend="reference"): the library's own plain-PyTorch path, with its
                  state handling and float64 adjustments (heavier than hand-written code)
    compile       torch.compile(ADELLOLoss(backend="reference"), fullgraph=True)
    lean          the step as a user writes it by hand in the released code's style
                  (`LeanADELLO`: about a dozen PyTorch ops, no validation, Python step counter)
    lean-compile  torch.compile of that same step function
    cpu / triton / cuda   ADELLOLoss(backend=...), the fused kernels
    cpu-em / cuda-em      the same with prior_estimator="em" (what the EM prior estimator costs)

Only the public API is used (ak.ADELLOLoss, ak.flexda_loss, ak.available_backends,
ak.alpha_schedule, ak.FlexDAOutput), so the providers do not depend on how the library is built
inside. The lean step is checked against ADELLOLoss(backend="reference") once per process and
device before it is timed (`check_lean`): a faster baseline that computed something else would
make every ratio meaningless.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

import adello_kernels as ak


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    b: int
    n: int
    c: int
    gpu_only: bool = False

    def step_bytes(self, itemsize: int) -> int:
        """Compulsory traffic of one step: read z_l, z_w, z_s once, write both gradients once."""
        return itemsize * self.c * (2 * self.b + 3 * self.n)


SHAPES = {s.name: s for s in [
    Shape("cifar100", 64, 128, 100),
    Shape("imagenet127", 256, 512, 127),
    Shape("imagenet127-large", 1024, 2048, 127),
    Shape("large-c", 512, 1024, 8192),
    Shape("bandwidth", 65536, 65536, 1000, gpu_only=True),
]}


def shapes_for(device: str) -> list[Shape]:
    return [s for s in SHAPES.values() if device == "cuda" or not s.gpu_only]


TOTAL_STEPS = 262_144
START_STEP = 10_000  # alpha < 1 and a non-uniform target prior, so every adjustment is exercised


def bench_prior(c: int, device: str) -> torch.Tensor:
    """The long-tailed labeled prior every provider starts from."""
    prior = torch.linspace(1.0, 0.01, c, device=device)
    return prior / prior.sum()


def _criterion(backend: str, shape: Shape, device: str, **kw) -> ak.ADELLOLoss:
    crit = ak.ADELLOLoss(bench_prior(shape.c, device), TOTAL_STEPS, backend=backend,
                         validate=False, **kw)
    crit.step.fill_(START_STEP)
    return crit


# ---------------------------------------------------------------------------------------------
# The hand-written step (lean): what a user of the released code runs, one op per equation.

def lean_step_fn(z_l, y, z_w, z_s, log_p_l, prior_ulb, alpha, *, threshold: float,
                 lambda_u: float, lambda_d: float, distill: bool, temperature: float,
                 momentum: float, eps: float = 1e-9) -> ak.FlexDAOutput:
    """One ADELLO step in plain PyTorch, updating `prior_ulb` in place (Q_{t-1} -> Q_t).

    alpha is a 0-d tensor so that torch.compile of this function does not recompile as the
    schedule moves (`distill` is a Python bool: it flips once, at t0). No validation, no
    logging: the fewest ops a correct hand-written step can use in this structure.
    """
    z_l, z_w, z_s = z_l.float(), z_w.detach().float(), z_s.float()  # CE in fp32, as under autocast
    # FlexDA targets from Q_{t-1}: Qa = Q**alpha / sum, ds = log P_L - log Qa, du = log Q - log Qa
    q_alpha = prior_ulb.pow(alpha)
    log_qa = torch.log(q_alpha / q_alpha.sum() + eps)
    loss_sup = F.cross_entropy(z_l + (log_p_l - log_qa), y)           # logit-adjusted CE
    probs_w = torch.softmax(z_w, dim=-1)
    max_probs, pseudo_labels = probs_w.max(dim=-1)
    mask = max_probs.ge(threshold).float()
    logits_s = z_s + (torch.log(prior_ulb + eps) - log_qa)
    loss_unsup = (F.cross_entropy(logits_s, pseudo_labels, reduction="none") * mask).mean()
    if distill:  # soft-target CE on the complement of the mask, at temperature T
        targets = probs_w if temperature == 1.0 else torch.softmax(z_w / temperature, dim=-1)
        log_p = F.log_softmax(logits_s / temperature, dim=-1)
        loss_distill = (-(targets * log_p).sum(dim=-1) * (1.0 - mask)).mean()
        loss = loss_sup + lambda_u * loss_unsup + lambda_d * loss_distill
    else:
        loss_distill = torch.zeros_like(loss_sup)
        loss = loss_sup + lambda_u * loss_unsup
    prior_batch = probs_w.mean(dim=0)
    prior_ulb.mul_(momentum).add_(prior_batch, alpha=1.0 - momentum)   # EMA of the unlabeled prior
    return ak.FlexDAOutput(loss, loss_sup.detach(), loss_unsup.detach(), loss_distill.detach(),
                           mask, pseudo_labels, prior_batch)


class LeanADELLO:
    """The state a hand-written training loop keeps (a Python step counter, the prior tensor)
    around `lean_step_fn`; `compiled=True` wraps the step function in torch.compile."""

    def __init__(self, prior_lb: torch.Tensor, total_steps: int, *, step: int = 0,
                 alpha_min: float = 0.1, power: float = 2.0, threshold: float = 0.95,
                 prior_momentum: float = 0.999, distill_start: int = 0,
                 temperature: float = 1.0, lambda_u: float = 1.0, lambda_d: float = 1.0,
                 compiled: bool = False, eps: float = 1e-9):
        c = prior_lb.shape[0]
        self.log_p_l = torch.log(prior_lb.float() + eps)
        self.prior_ulb = torch.full((c,), 1.0 / c, device=prior_lb.device)
        self.alpha = torch.ones((), device=prior_lb.device)
        self.step, self.total_steps = step, total_steps
        self.alpha_min, self.power, self.distill_start = alpha_min, power, distill_start
        self.kw = dict(threshold=threshold, lambda_u=lambda_u, lambda_d=lambda_d,
                       temperature=temperature, momentum=prior_momentum, eps=eps)
        self.fn = torch.compile(lean_step_fn, fullgraph=True) if compiled else lean_step_fn

    def __call__(self, z_l, y, z_w, z_s) -> ak.FlexDAOutput:
        self.alpha.fill_(ak.alpha_schedule(self.step, self.total_steps, self.alpha_min,
                                           self.power))
        out = self.fn(z_l, y, z_w, z_s, self.log_p_l, self.prior_ulb, self.alpha,
                      distill=self.step >= self.distill_start, **self.kw)
        self.step += 1
        return out


def _lean(shape: Shape, device: str, compiled: bool = False) -> LeanADELLO:
    check_lean(device)
    return LeanADELLO(bench_prior(shape.c, device), TOTAL_STEPS, step=START_STEP,
                      compiled=compiled)


CHECK_SHAPE = Shape("check", 48, 96, 37)


@functools.lru_cache(maxsize=None)
def check_lean(device: str, steps: int = 3) -> None:
    """AssertionError unless LeanADELLO computes what ADELLOLoss(backend="reference") does, to
    1e-5: every output, both gradients and the updated prior, over `steps` consecutive steps
    (so the prior it reads has moved), on rows both above and below the threshold."""
    s = CHECK_SHAPE
    ref = _criterion("reference", s, device)
    lean = LeanADELLO(bench_prior(s.c, device), TOTAL_STEPS, step=START_STEP)
    for k in range(steps):
        z_l, y, z_w, z_s = make_inputs(s, device, seed=100 + k)
        with torch.no_grad():  # rows from flat to very peaked: both sides of the threshold
            z_w.mul_(torch.linspace(0.1, 6.0, s.n, device=device)[:, None])
        outs = []
        for crit in (ref, lean):
            out = crit(z_l, y, z_w, z_s)
            outs.append((out, torch.autograd.grad(out.loss, (z_l, z_s))))
        (o_ref, g_ref), (o_lean, g_lean) = outs
        m = o_ref.mask
        assert 0 < float(m.sum()) < s.n, f"check inputs give a one-sided mask ({m.sum()})"
        for name in ak.FlexDAOutput._fields:
            a, b = getattr(o_lean, name), getattr(o_ref, name)
            _assert_close(a, b.to(a.dtype), f"lean {name}, step {k}")
        for name, a, b in zip(("grad logits_lb", "grad logits_ulb_s"), g_lean, g_ref):
            assert bool(torch.isfinite(a).all()), f"lean {name}, step {k}: not finite"
            rows = torch.isfinite(b).all(dim=1)
            if not bool(rows.all()):  # valid labels only: a finite reference gradient is due
                warnings.warn(f"ADELLOLoss(backend='reference') gives a non-finite {name} on "
                              f"{int((~rows).sum())} of {rows.numel()} rows with valid labels "
                              "(a reference bug); the lean gradient is compared on the other "
                              "rows only", stacklevel=2)
            _assert_close(a[rows], b[rows], f"lean {name}, step {k}")
        _assert_close(lean.prior_ulb, ref.prior_ulb, f"lean prior_ulb after step {k}", atol=1e-7)


def _assert_close(actual, expected, what: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol,
                               msg=lambda err: f"{what}: {err}")


# ---------------------------------------------------------------------------------------------

def _plain(backend: str, **kw) -> Callable[[Shape, str], Callable]:
    return lambda shape, device: _criterion(backend, shape, device, **kw)


def _compiled(backend: str) -> Callable[[Shape, str], Callable]:
    return lambda shape, device: torch.compile(_criterion(backend, shape, device),
                                               fullgraph=True)


# name -> (backend that must be available, factory(shape, device) -> callable criterion)
PROVIDERS: dict[str, tuple[str, Callable]] = {
    "eager": ("reference", _plain("reference")),
    "compile": ("reference", _compiled("reference")),
    "lean": ("reference", lambda shape, device: _lean(shape, device)),
    "lean-compile": ("reference", lambda shape, device: _lean(shape, device, compiled=True)),
    "cpu": ("cpu", _plain("cpu")),
    "triton": ("triton", _plain("triton")),
    "cuda": ("cuda", _plain("cuda")),
    "cpu-em": ("cpu", _plain("cpu", prior_estimator="em")),
    "cuda-em": ("cuda", _plain("cuda", prior_estimator="em")),
}
BASELINES = ("eager", "compile", "lean", "lean-compile")


# The device each fused backend is benchmarked on (Triton on CPU is the interpreter: a
# correctness tool, not a provider to time).
FUSED_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def providers_for(device: str) -> list[str]:
    """Providers that can run on `device` in this process."""
    avail = ak.available_backends()
    return [name for name, (backend, _) in PROVIDERS.items()
            if backend in avail and FUSED_DEVICE.get(backend, device) == device]


def make_inputs(shape: Shape, device: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype, generator=gen)
    z_l = (torch.randn(shape.b, shape.c, **kw) * 4).requires_grad_()
    z_w = torch.randn(shape.n, shape.c, **kw) * 4
    z_s = (torch.randn(shape.n, shape.c, **kw) * 4).requires_grad_()
    y = torch.randint(0, shape.c, (shape.b,), device=device, generator=gen)
    return z_l, y, z_w, z_s


def make_step(provider: str, shape: Shape, device: str, dtype=torch.float32):
    """A zero-argument function running one full step with fresh-per-run gradients."""
    crit = PROVIDERS[provider][1](shape, device)
    z_l, y, z_w, z_s = make_inputs(shape, device, dtype)

    def step():
        out = crit(z_l, y, z_w, z_s)
        return torch.autograd.grad(out.loss, (z_l, z_s))

    return step
