"""The op contract (docs/contract.md) held against every fused backend by one set of tests:

    cpu     adello::flexda_fwd and adello::flexda_step from the compiled extension
    cuda    the CUDA kernels' own source compiled for the CPU (tests/cuda_emu.py)
    triton  adello::flexda_fwd_triton and flexda_step_triton under TRITON_INTERPRET=1, in a
            child process started by test_triton_backend_in_interpreter (the interpreter must
            be switched on before triton is first imported; see tests/contract.py)

Each case is fresh random data (ADELLO_TEST_SEED=<int> draws other data) compared output by
output with the float64 reference by `contract.check_outputs`: losses, the three terms, mask,
pseudo-labels, the batch prior and both gradients, exempt rows re-scored, never skipped. Cases
draw B, N from 1 to 1000, C from 1 to 4097 (non-powers of two and block edges), every dtype,
logit scales 1 to 30, T = 1 and T != 1, the gate on and off, lambdas including 0, priors with
zero entries, planted exact and near ties, thresholds set to a row's exact probability. Shapes
are capped per backend (the emulator and the interpreter are slow). The whole-step op is run
over several steps of state, and labels outside [0, C) must give that row NaN, nothing else.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import contract as K
import pytest
import torch

from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.ops.state import momentum_update
from adello_kernels.reference import flexda_fwd_reference

INTERPRETED = K.triton_interpreted_here()
if INTERPRETED:
    # the interpreter's numpy warnings (0 * inf on padding lanes in tl.where's discarded branch)
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fused:
    name: str
    fwd: Callable                     # the flexda_fwd schema
    step: Optional[Callable]          # the flexda_step schema, or None (then `step_missing`)
    step_missing: str
    step_differentiable: bool         # autograd through `step` returns its gradient outputs


# (max rows, max C, max rows * C per tensor, number of random cases)
LIMITS = {"cpu": (1000, 4097, 1_500_000, 40), "cuda": (40, 4097, 40_000, 14),
          "triton": (40, 600, 8_000, 16)}
# In a child process with the interpreter on, only the Triton backend runs (the others ran in
# the parent); in the parent, the Triton cases run in that child.
BACKEND_NAMES = ["triton"] if INTERPRETED else ["cpu", "cuda"]


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """(Fused, None) or (None, reason it is unavailable)."""
    if name == "cpu":
        if not (backends._load_extension() and flexda_ops.has_kernel("flexda_fwd", "CPU")):
            return None, "adello_kernels._C is not built with the CPU kernel"
        has_step = flexda_ops.has_kernel("flexda_step", "CPU")
        return Fused("cpu", torch.ops.adello.flexda_fwd.default,
                     torch.ops.adello.flexda_step.default if has_step else None,
                     "flexda_step not rebuilt yet", True), None
    if name == "cuda":
        try:
            import cuda_emu
        except ImportError:
            return None, "tests/cuda_emu.py (the CPU emulator of the CUDA kernels) is not there"
        try:
            ops = cuda_emu.emulator_ops()
        except pytest.skip.Exception as exc:
            return None, str(exc)
        step = ops.flexda_step if hasattr(ops, "flexda_step") else None
        return Fused("cuda", ops.flexda_fwd, step,
                     "the CUDA emulator has no flexda_step yet", False), None
    if name == "triton":
        from adello_kernels.ops import flexda_triton
        if not getattr(flexda_triton, "INTERPRETED", False):
            return None, "the Triton kernels were not built for the interpreter"
        step = getattr(flexda_triton, "flexda_step_triton", None)
        return Fused("triton", torch.ops.adello.flexda_fwd_triton.default, step,
                     "flexda_step_triton has not landed in ops/flexda_triton.py yet", True), None
    raise KeyError(name)


def fused(name: str) -> Fused:
    be, why = _load(name)
    if be is None:
        pytest.skip(why)
    return be


def fused_step(name: str) -> Fused:
    be = fused(name)
    if be.step is None:
        pytest.skip(be.step_missing)
    return be


# ---------------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------------

# class counts at the edges of the kernels' regimes: 1, vector tails, 127/128/129, block sizes
# around powers of two, the contract's upper end 4096 and one past it
C_POOL = [1, 2, 3, 7, 10, 16, 31, 100, 127, 128, 129, 255, 257, 300, 1000, 1023, 2048, 4095,
          4096, 4097]
LAMBDAS = [0.0, 0.5, 1.0, 1.3, 2.0]
TEMPERATURES = [1.0, 0.5, 2.5, 1.0, 0.7]
THRESHOLDS = [0.5, 0.7, 0.95, 0.99]


@dataclass(frozen=True)
class Case:
    b: int
    n: int
    c: int
    dtype: torch.dtype
    seed: int
    scale: float
    alpha: float
    lambda_u: float
    lambda_d: float
    gate: bool
    temperature: float
    threshold: float
    threshold_on_row: bool
    ties: bool
    prior_zeros: bool
    confident_frac: float
    prior_em: bool
    weights: str = ""   # prior_weight: "" none, "01", "pos", "zero" (contract.fwd_args)
    distill_all: bool = False   # every row distils (the released distill_all)

    @property
    def id(self):
        tau = "tau=row" if self.threshold_on_row else f"tau{self.threshold}"
        return (f"B{self.b}-N{self.n}-C{self.c}-{K.DTYPE_IDS[self.dtype]}-T{self.temperature}-"
                f"{'gate' if self.gate else 'nogate'}-lu{self.lambda_u}-ld{self.lambda_d}-{tau}"
                f"{'-ties' if self.ties else ''}{'-p0' if self.prior_zeros else ''}"
                f"{'-em' if self.prior_em else ''}{'-w' + self.weights if self.weights else ''}"
                f"{'-dall' if self.distill_all else ''}")

    def args(self):
        return K.fwd_args(self.b, self.n, self.c, self.dtype, seed=self.seed, scale=self.scale,
                          alpha=self.alpha, lambda_u=self.lambda_u, lambda_d=self.lambda_d,
                          gate=self.gate, temperature=self.temperature,
                          threshold=self.threshold, threshold_on_row=self.threshold_on_row,
                          ties=self.ties, prior_zeros=self.prior_zeros,
                          confident_frac=self.confident_frac, prior_em=self.prior_em,
                          weights=self.weights, distill_all=self.distill_all)


def _log_uniform_int(gen, lo: int, hi: int) -> int:
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return max(lo, min(hi, int(round(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))))


def contract_cases(backend: str) -> list[Case]:
    max_rows, max_c, max_elems, count = LIMITS[backend]
    gen = torch.Generator().manual_seed(K.SEED * 7 + {"cpu": 1, "cuda": 2, "triton": 3}[backend])
    pool = [c for c in C_POOL if c <= max_c]
    if count - 1 < len(pool):  # fewer cases than class counts: spread them over the range
        pool = [pool[round(i * (len(pool) - 1) / (count - 2))] for i in range(count - 1)]
    pick = lambda seq: seq[int(torch.randint(0, len(seq), (1,), generator=gen))]  # noqa: E731
    cases = []
    for k in range(count):
        c = pool[k] if k < len(pool) else int(torch.randint(1, max_c + 1, (1,), generator=gen))
        rows_cap = max(1, min(max_rows, max_elems // c))
        b = 1 if k % 9 == 4 else _log_uniform_int(gen, 1, rows_cap)
        n = 1 if k % 9 == 7 else _log_uniform_int(gen, 1, rows_cap)
        if k == count - 1:  # the largest rows the backend affords, at a small C
            c, b, n = min(10, max_c), max_rows, max_rows
        cases.append(Case(
            b=b, n=n, c=c, dtype=K.DTYPES[k % len(K.DTYPES)], seed=K.SEED * 1000 + 17 * k + 1,
            scale=float(torch.empty(()).uniform_(1.0, 30.0, generator=gen)),
            alpha=float(torch.rand((), generator=gen)),
            lambda_u=pick(LAMBDAS), lambda_d=pick(LAMBDAS), gate=k % 3 != 2,
            temperature=TEMPERATURES[k % len(TEMPERATURES)], threshold=pick(THRESHOLDS),
            threshold_on_row=k % 4 == 1, ties=k % 3 == 0, prior_zeros=k % 2 == 1,
            confident_frac=float(torch.rand((), generator=gen)), prior_em=k % 4 in (1, 2),
            weights={1: "01", 3: "pos", 5: "zero" if k % 10 == 5 else "01"}.get(k % 6, ""),
            distill_all=k % 5 == 2))
    return cases


CASES = [(be, case) for be in BACKEND_NAMES for case in contract_cases(be)]


# ---------------------------------------------------------------------------------------------
# The harness itself (parent process only: it does not depend on a backend)
# ---------------------------------------------------------------------------------------------

harness_only = pytest.mark.skipif(INTERPRETED, reason="backend-independent: runs in the parent")


@harness_only
@pytest.mark.parametrize("seed", range(6))
def test_row_terms_reproduce_the_reference(seed):
    """`unlabeled_row_terms` (used to re-score exempt rows) summed over the rows with the
    reference's own decisions gives the reference's L_u, L_d, loss and grad_ulb_s (seeds 4, 5:
    distill_all)."""
    gate, t = seed != 2, [1.0, 0.6, 2.0, 1.0, 1.0, 0.6][seed]
    dall = seed >= 4
    args = K.fwd_args(9, 23, [2, 5, 64, 300, 7, 40][seed], torch.float64, seed=seed,
                      temperature=t, gate=gate, prior_zeros=seed % 2 == 1, threshold=0.8,
                      distill_all=dall)
    want = K.reference_outputs(args)
    u, d, g = K.unlabeled_row_terms(args[2], args[3], args[5], args[6], want[2], want[3],
                                    distill_all=dall)
    torch.testing.assert_close(u.sum(), want[1][1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.sum(), want[1][2], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g, want[6], rtol=1e-12, atol=1e-15)
    assert bool(want[1][1] > 0) and (bool(want[1][2] > 0) == gate)


def as_fp32(out):
    """Reference outputs (fp64) in the dtypes an fp32 backend returns."""
    return tuple(x if x.dtype == torch.int64 else x.float() for x in out)


def _flip_exempt_row(args, want):
    """The reference's outputs as a backend that decided one near-tau row the other way would
    report them, correctly re-scored (float64)."""
    z_w, z_s, du, hp = args[2], args[3], args[5], args[6]
    near_tau, _ = K.exempt_rows(z_w, args[7])
    i = int(near_tau.nonzero()[0, 0])
    mask = want[2].clone()
    mask[i] = 1 - mask[i]
    n = z_w.shape[0]
    u0, d0, _ = K.unlabeled_row_terms(z_w, z_s, du, hp, want[2], want[3], n)
    u1, d1, g1 = K.unlabeled_row_terms(z_w, z_s, du, hp, mask, want[3], n)
    terms = want[1].clone()
    terms[1] += (u1 - u0).sum()
    terms[2] += (d1 - d0).sum()
    loss = terms[0] + hp[0] * terms[1] + hp[1] * terms[2]
    return (loss, terms, mask, want[3], want[4], want[5], g1), i


@harness_only
def test_check_outputs_catches_planted_bugs():
    """Each plausible kernel bug, planted in the reference's own outputs, is caught; the
    reference itself and a correctly re-scored flip of an exempt row pass."""
    args = K.fwd_args(16, 40, 33, torch.float32, seed=3, threshold_on_row=True, ties=True,
                      temperature=0.7)
    want = K.reference_outputs(args)
    counts = K.check_outputs(as_fp32(want), args, what="reference")
    assert counts["near_tau"] >= 1 and counts["near_tie"] >= 1, counts

    flipped, i = _flip_exempt_row(args, want)
    counts = K.check_outputs(as_fp32(flipped), args, what="exempt flip")
    assert counts["flipped"] == 1
    # the same flip without re-scoring the losses and the gradient row is wrong
    stale = (want[0], want[1], flipped[2], want[3], want[4], want[5], want[6])
    with pytest.raises(AssertionError):
        K.check_outputs(as_fp32(stale), args, what="stale losses")

    ok_row = int((~K.excused_rows(args[2], args[7])).nonzero()[0, 0])
    one = torch.tensor([ok_row])

    def planted(k, f, base=want):
        out = [x.clone() for x in base]
        out[k] = f(out[k])
        return as_fp32(out)

    bugs = {
        "loss 2e-5 relative off": planted(0, lambda x: x * (1 + 2e-5)),
        "L_u 2e-5 relative off": planted(1, lambda x: x * torch.tensor([1, 1 + 2e-5, 1])),
        "L_s and L_u swapped": planted(1, lambda x: x[[1, 0, 2]]),
        "mask flipped on a clear row": planted(2, lambda x: x.index_fill(0, one, 1 - x[ok_row])),
        "pseudo-label off by one on a clear row": planted(
            3, lambda x: x.index_fill(0, one, (int(x[ok_row]) + 1) % 33)),
        "prior_batch 2e-6 off": planted(4, lambda x: x + 2e-6),
        "grad_lb one entry 2e-6 off": planted(5, lambda x: x.index_put(
            (torch.tensor([0]), torch.tensor([0])), x[0, 0] + 2e-6)),
        "grad_lb scaled by B/(B-1)": planted(5, lambda x: x * 16 / 15),
        "grad_ulb_s sign flipped": planted(6, lambda x: -x),
        "grad_ulb_s NaN row": planted(6, lambda x: x.index_fill(0, one, math.nan)),
    }
    for name, out in bugs.items():
        with pytest.raises(AssertionError):
            K.check_outputs(out, args, what=name)
    # the gate: with distillation off terms[2] must be exactly 0
    off = list(args)
    off[6] = K.hparams_tensor(0.8, 1.3, False, 0.7, torch.float32)
    with pytest.raises(AssertionError):
        K.check_outputs(planted(1, lambda x: x + torch.tensor([0, 0, 1e-30]),
                                base=K.reference_outputs(off)), off, what="gate ignored")
    # the prior estimator: the raw batch prior where EM was asked for (and the other way) fails
    em = list(args)
    em[6] = K.hparams_tensor(0.8, 1.3, True, 0.7, torch.float32, prior_em=True)
    want_em = K.reference_outputs(em)
    K.check_outputs(as_fp32(want_em), em, what="EM reference")
    assert float((want_em[4] - want[4]).abs().max()) > 1e-3  # the two estimators differ here
    with pytest.raises(AssertionError, match="prior_batch"):
        K.check_outputs(as_fp32(want), em, what="raw prior under EM")
    with pytest.raises(AssertionError, match="prior_batch"):
        K.check_outputs(as_fp32(want_em), args, what="EM prior under raw")
    # NaN expectations: a finite loss or gradient row where the reference is NaN fails
    bad = list(args)
    bad[1] = args[1].clone()
    bad[1][0] = 33
    w_bad = K.reference_outputs(bad)
    assert math.isnan(float(w_bad[0])) and bool(torch.isnan(w_bad[5][0]).all())
    K.check_outputs(as_fp32(w_bad), bad, what="NaN row")
    with pytest.raises(AssertionError, match="NaN"):
        K.check_outputs(planted(0, lambda x: torch.ones_like(x), base=w_bad), bad, what="NaN lost")
    with pytest.raises(AssertionError, match="NaN"):
        K.check_outputs(planted(5, lambda x: torch.nan_to_num(x), base=w_bad), bad,
                        what="NaN row lost")


# ---------------------------------------------------------------------------------------------
# The fused row op on random cases
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,case", CASES, ids=[f"{b}-{k:02d}-{c.id}"
                                                      for k, (b, c) in enumerate(CASES)])
def test_fwd_matches_reference(backend, case):
    be = fused(backend)
    args = case.args()
    K.check_outputs(be.fwd(*args), args, what=f"{backend} {case.id} (seed {case.seed})")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_low_precision_logits_accumulate_in_fp32(backend):
    """bf16/fp16 logits are upcast before any arithmetic: on the same rounded inputs the losses
    meet the fp32 bound, far inside the bf16 one (a kernel summing in bf16 misses it by ~1e-3)."""
    be = fused(backend)
    for dtype in (torch.bfloat16, torch.float16):
        args = K.fwd_args(12, 18, 100, dtype, seed=5, temperature=2.0, threshold=0.7)
        got, want = be.fwd(*args), K.reference_outputs(args)
        assert int(want[2].sum()) not in (0, 18)
        for name, a, b in (("loss", got[0], want[0]), ("L_s", got[1][0], want[1][0]),
                           ("L_u", got[1][1], want[1][1]), ("L_d", got[1][2], want[1][2])):
            assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b)), f"{dtype} {name}"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("c", [2, 100, 1000])
def test_every_row_masked_and_no_row_masked(backend, c):
    """The two ends the random cases rarely reach: every row confident (pure consistency,
    L_d = 0) and none (pure distillation, L_u = 0), with T != 1."""
    be = fused(backend)
    for threshold, frac in ((1e-6, 0.5), (0.999, 0.0)):
        args = K.fwd_args(9, 21, c, torch.float32, seed=c, scale=1.0, threshold=threshold,
                          temperature=2.0, confident_frac=frac)
        got = be.fwd(*args)
        assert float(got[2].sum()) == (21.0 if threshold < 0.5 else 0.0)
        K.check_outputs(got, args, what=f"{backend} C={c} tau={threshold}")
        assert float(got[1][2 if threshold < 0.5 else 1]) == 0.0


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_pseudo_label_is_the_first_index_of_an_exact_tie(backend):
    """Exact ties are decided by the contract (first index of the max), not by rounding: at the
    ends of a row, across 128-column block edges and far apart, in fp32 and bf16."""
    be = fused(backend)
    c = 300
    ties = [(5, 200), (127, 128), (0, 299), (128, 129), (255, 256), (250, 251), (1, 2)]
    for dtype in (torch.float32, torch.bfloat16):
        args = K.fwd_args(3, len(ties), c, dtype, seed=8, threshold=0.3)
        z_w = torch.randn(len(ties), c, generator=torch.Generator().manual_seed(1))
        for i, (k1, k2) in enumerate(ties):
            z_w[i, k1] = z_w[i, k2] = 9.0
        args[2] = z_w.to(dtype)
        got = be.fwd(*args)
        assert got[3].tolist() == [k1 for k1, _ in ties], f"{dtype}: {got[3].tolist()}"


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=K.DTYPE_IDS.get)
def test_threshold_is_inclusive_and_rounded_to_acc(backend, dtype):
    """M = [max pw >= (acc) tau]: four equal logits give max pw = 0.25 exactly; tau = 0.25 is
    inclusive; tau = 0.25 + 1e-9 rounds to 0.25 in fp32 but not in fp64; 0.25 + 1e-7 is above
    0.25 in both. The reference in the same dtype agrees."""
    be = fused(backend)
    z = torch.zeros(2, 4, dtype=dtype)
    z[1, 0] = -1.0                                   # max pw = 1 / (e^-1 + 3) > 0.25
    zero = torch.zeros(4, dtype=dtype)
    hp = K.hparams_tensor(1.0, 1.0, True, 1.0, dtype)
    base = [z, torch.tensor([0, 1]), z, z, zero, zero, hp]
    expect = {0.25: [1.0, 1.0], 0.25 + 1e-9: [1.0, 1.0] if dtype == torch.float32 else [0.0, 1.0],
              0.25 + 1e-7: [0.0, 1.0]}
    for tau, want in expect.items():
        assert be.fwd(*base, tau)[2].tolist() == want, f"tau {tau!r}"
        assert flexda_fwd_reference(*base, tau)[2].tolist() == want


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=K.DTYPE_IDS.get)
def test_labels_outside_the_classes_give_a_nan_row(backend, dtype):
    """With validation off, a label outside [0, C) makes that row's CE NaN and its gradient row
    all NaN: loss and L_s are NaN, every other row and output is unaffected (the reference
    defines the same, and check_outputs holds the NaN pattern exactly)."""
    be = fused(backend)
    b, c = 7, 37
    args = K.fwd_args(b, 9, c, dtype, seed=12, temperature=0.8, threshold=0.7)
    bad = {1: c, 4: -1, 5: c + 1000}
    for row, label in bad.items():
        args[1][row] = label
    got = be.fwd(*args)
    want = K.reference_outputs(args)
    for ref_or_got, who in ((want, "reference"), (got, backend)):
        loss, terms, g_lb = ref_or_got[0], ref_or_got[1], ref_or_got[5]
        assert math.isnan(float(loss)) and math.isnan(float(terms[0])), who
        assert math.isfinite(float(terms[1])) and math.isfinite(float(terms[2])), who
        rows = torch.isnan(g_lb.double()).all(1)
        assert rows.tolist() == [i in bad for i in range(b)], f"{who}: NaN rows {rows.tolist()}"
        assert bool(torch.isfinite(g_lb[~rows].double()).all()), who
    K.check_outputs(got, args, what=f"{backend} bad labels")


# ---------------------------------------------------------------------------------------------
# The whole-step op over several steps of state
# ---------------------------------------------------------------------------------------------

# (what the step exercises, update, a non-finite weak row, a label outside [0, C))
STEP_PLAN = [
    ("before distill_start", True, False, False),
    ("the step that reaches distill_start", True, False, False),
    ("a non-finite weak row: the update is skipped", True, True, False),
    ("update=False: the state is left alone", False, False, False),
    ("a label outside [0, C)", True, False, True),
    ("after the skipped and the untouched steps", True, False, False),
]
STEP_VARIANTS = {  # name: (dtype, StepConfig overrides, T)
    "fp32-flexda-T1": (torch.float32, {}, 1.0),
    "bf16-noflexda-T0.6": (torch.bfloat16, dict(flexda=False, lambda_u=1.0), 0.6),
    "fp64-flexda-T2": (torch.float64, dict(threshold=0.6, lambda_d=0.0), 2.0),
    "fp32-flexda-T0.8-em": (torch.float32, dict(prior_em=True), 0.8),
    "fp16-noflexda-T1-em": (torch.float16, dict(flexda=False, prior_em=True), 1.0),
    # the released options: a fixed target prior ("adello_gt"), alpha by epoch
    "fp32-flexda-T1-gt-epoch3": (torch.float32, dict(gt_target=True, alpha_epoch_steps=3), 1.0),
    # (T exact in fp32: the op reads the fp32 temperature buffer, the reference the float)
    "fp64-flexda-T0.625-gt-em-epoch2": (torch.float64, dict(gt_target=True, prior_em=True,
                                                            alpha_epoch_steps=2), 0.625),
    "bf16-flexda-T1-epoch4": (torch.bfloat16, dict(alpha_epoch_steps=4), 1.0),
    # per-row prior weights (the released lb_in_ulb_mask); the last step's are all 0
    "fp32-flexda-T1-w01": (torch.float32, dict(weights="01"), 1.0),
    "fp64-flexda-T0.5-wpos-em": (torch.float64, dict(weights="pos", prior_em=True), 0.5),
    # distillation on every row (the released distill_all), T = 1 and T != 1
    "fp32-flexda-T1-dall": (torch.float32, dict(distill_all=True, threshold=0.5), 1.0),
    "bf16-flexda-T0.5-dall-w01": (torch.bfloat16, dict(distill_all=True, weights="01",
                                                       threshold=0.5), 0.5),
}
ALL_ZERO_STEP = len(STEP_PLAN) - 1   # with weights: no row to estimate from
STEP_SHAPES = {"cpu": (33, 70, 257), "cuda": (5, 12, 130), "triton": (6, 10, 37)}


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_step_op_over_several_steps(backend, variant):
    """Each step's outputs against the reference for the state on entry (alpha_schedule,
    adjustments in float64 rounded once to acc, the gate [t >= t0]), and the state after it:
    Q <- momentum_update(Q, prior_batch), step + 1; a non-finite batch prior keeps Q and counts
    in skipped_updates; update=False changes nothing."""
    be = fused_step(backend)
    dtype, overrides, temperature = STEP_VARIANTS[variant]
    b, n, c = STEP_SHAPES[backend]
    gen = torch.Generator().manual_seed(K.SEED + 41)
    t0 = 2
    cfg = K.StepConfig(distill_start=t0 + 1, **overrides)
    p_l = K.random_prior(c, gen, zeros=True)
    q = K.random_prior(c, gen, zeros=True)
    # (a fixed target prior far from Q, zeros included, so that Qa from it differs visibly)
    p_t = K.random_prior(c, gen, zeros=True).pow(3) if cfg.gt_target else None
    if p_t is not None:
        p_t = p_t / p_t.sum()
    step = torch.tensor(t0, dtype=torch.int64)
    skipped = torch.tensor(0, dtype=torch.int64)
    temp = torch.tensor(temperature, dtype=torch.float32)
    for k, (what, update, nan_row, bad_label) in enumerate(STEP_PLAN):
        what = f"{backend} {variant} step {k} ({what})"
        z_l, y, z_w, z_s, _, _ = K.make_inputs(b, n, c, dtype=dtype, seed=K.SEED + 100 + k,
                                               scale=4.0)
        if nan_row:
            z_w[n // 2, 3] = math.nan
        if bad_label:
            y[b // 3] = c
        q_prev, t_prev, skipped_prev = q.clone(), int(step), int(skipped)
        args = K.step_fwd_args(z_l, y, z_w, z_s, p_l, q_prev, t_prev, temperature, cfg, p_t)
        w = None
        if cfg.weights:
            w = K.random_weights("zero" if k == ALL_ZERO_STEP else cfg.weights, n, gen,
                                 args[4].dtype)
            if nan_row:
                w[n // 2] = 1.0   # the NaN row counts (a weight-0 NaN row: the fwd cases)
            args.append(w)
        if cfg.distill_all:
            args += [None, True] if w is None else [True]
        zl, zs = z_l.clone(), z_s.clone()
        if be.step_differentiable:
            zl.requires_grad_()
            zs.requires_grad_()
        out = be.step(zl, y, z_w, zs, p_l, q, step, skipped, temp,
                      *cfg.op_tail(update, p_t, w))
        assert len(out) == 9, what
        got = K.step_outputs_as_fwd([x.detach() for x in out])
        if nan_row:
            # the labeled rows never see the weak view; the batch prior must show the NaN
            want = K.reference_outputs(args)
            tol = K.TOLERANCES[dtype]
            assert abs(float(got[1][0]) - float(want[1][0])) <= tol.loss_rtol * float(want[1][0])
            err = float((got[5].double() - want[5]).abs().max())
            assert err <= tol.grad_tol * max(1.0, float(want[5].abs().max())), what
            assert not bool(torch.isfinite(got[4]).all()), f"{what}: prior_batch is finite"
        else:
            K.check_outputs(got, args, what=what)
        if be.step_differentiable and not nan_row:
            g = torch.autograd.grad(out[0], (zl, zs))
            for a, o in zip(g, got[5:]):  # bitwise, NaN rows included
                torch.testing.assert_close(a, o, rtol=0, atol=0, equal_nan=True,
                                           msg=f"{what}: autograd does not return the op's "
                                               "gradients")
        # the state
        if not update:
            assert torch.equal(q, q_prev) and int(step) == t_prev and int(skipped) == \
                skipped_prev, f"{what}: update=False changed the state"
            continue
        assert int(step) == t_prev + 1, f"{what}: step {int(step)}, expected {t_prev + 1}"
        if nan_row:
            assert torch.equal(q, q_prev), f"{what}: Q changed on a non-finite batch prior"
            assert int(skipped) == skipped_prev + 1, f"{what}: skipped_updates not counted"
            continue
        assert int(skipped) == skipped_prev, f"{what}: skipped_updates changed"
        if w is not None and not bool((w > 0).any()):
            assert torch.equal(q, q_prev), f"{what}: Q changed with every prior weight 0"
            continue
        assert q.dtype == torch.float32
        q_want, ok = momentum_update(q_prev, got[4].float(), cfg.prior_momentum)
        assert bool(ok)
        err = float((q - q_want).abs().max())
        assert err <= 2e-7, f"{what}: Q is {err:.3g} from momentum_update of its batch prior"
        q_ref, _ = momentum_update(q_prev.double(), K.reference_outputs(args)[4],
                                   cfg.prior_momentum)
        err = float((q.double() - q_ref).abs().max())
        assert err <= K.TOLERANCES[torch.float32].prior_tol + 2e-7, f"{what}: Q err {err:.3g}"
    assert int(step) == t0 + len(STEP_PLAN) - 1 and int(skipped) == 1


# ---------------------------------------------------------------------------------------------
# The Triton backend, in its interpreter child
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter's child process")
def test_triton_backend_in_interpreter():
    """Every test above for the triton backend, in a process started with TRITON_INTERPRET=1;
    fails with the child's report if any of them fails, or if none ran."""
    pytest.importorskip("triton")
    rc, report = K.run_in_triton_interpreter(__file__)
    last = report.splitlines()[-1] if report else ""
    print(last)
    assert rc == 0, f"interpreter run failed (exit {rc}):\n{report}"
    assert " passed" in last, f"the interpreter run passed nothing:\n{report}"
