"""The Triton kernels (adello_kernels/ops/flexda_triton.py) of `adello::flexda_fwd_triton` and of
the whole training step `adello::flexda_step_triton` (prologue from the state, rows, reduce,
prior/step update, and the in-place scale of the backward) against the float64 reference, on CPU
under Triton's interpreter and, when present, on a GPU.

How the interpreter tests run. TRITON_INTERPRET=1 only takes effect if it is set before the
kernels are decorated (when adello_kernels.ops.flexda_triton is first imported). `pytest tests/`
imports every test file into one process, where triton may already have been imported without the
interpreter (tests/test_triton_compile.py does), and setting the variable in that process would
change what every later test sees (`available_backends()` on CPU). So this file runs itself:
  * in a process started with TRITON_INTERPRET=1 the interpreter tests below run directly
    (`TRITON_INTERPRET=1 pytest tests/test_triton_kernel.py -m "not gpu"`);
  * in any other process, `test_interpreter_suite` runs exactly that command in a subprocess (with
    the repository root on PYTHONPATH) and fails with the child's output if any child test fails.
The GPU tests (marked `gpu`) run in the normal process, without the interpreter, on CUDA.

Tolerances (docs/contract.md): fp32 losses rel 1e-5 and gradients 1e-6 * max(1, max|grad|);
bf16/fp16 losses rel 1e-2 and gradients 2e-2 * max|grad|; masks and pseudo-labels exact except
rows whose weak max probability is within 1e-5 of tau or whose top two weak logits tie within 1e-5.
The reference runs in float64 on the same (already rounded) inputs.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

if INTERPRETED:
    # The child process: make the numpy warnings of the interpreter (0 * inf on padding columns,
    # computed by tl.where's discarded branch) quiet; they are not errors on a GPU either.
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

FLOAT_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64"}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def make_case(b, n, c, dtype, *, scale=3.0, confident=0.5, seed=0, device="cpu"):
    """Logits with both confident (M = 1) and unconfident weak rows, labels, adjustments."""
    g = torch.Generator().manual_seed(seed)
    z_l = torch.randn(b, c, generator=g) * scale
    z_w = torch.randn(n, c, generator=g) * scale
    peaked = torch.rand(n, generator=g) < confident
    cls = torch.randint(0, c, (n,), generator=g)
    z_w[peaked, cls[peaked]] += 8 * scale
    z_s = 0.5 * z_w + torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ds = (torch.randn(c, generator=g) * 0.7).to(acc)
    du = (torch.randn(c, generator=g) * 0.7).to(acc)
    to = dict(device=device)
    return (z_l.to(dtype).to(**to), y.to(**to), z_w.to(dtype).to(**to), z_s.to(dtype).to(**to),
            ds.to(**to), du.to(**to))


def hparams(lambda_u, lambda_d, gate, temperature, dtype, device="cpu", prior_em=False):
    """The op's hparams vector, each value in its named slot (ops/flexda.py)."""
    from adello_kernels.ops import flexda as ops
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    hp = torch.zeros(ops.NUM_HPARAMS, dtype=acc)
    hp[ops.HP_LAMBDA_U], hp[ops.HP_LAMBDA_D] = lambda_u, lambda_d
    hp[ops.HP_GATE], hp[ops.HP_TEMPERATURE] = gate, temperature
    hp[ops.HP_PRIOR_EM] = float(bool(prior_em))
    return hp.to(device)


def ambiguous_rows(z_w: torch.Tensor, tau: float) -> torch.Tensor:
    """Rows exempt from exact mask / pseudo-label equality (docs/contract.md): max probability
    within 1e-5 of tau, or top two logits within 1e-5 of each other. Exact ties (frequent in
    bf16) are not exempt: the contract takes the first index of the max, which is exact."""
    z = z_w.double()
    pmax = torch.softmax(z, -1).amax(-1)
    near_tau = (pmax - tau).abs() < 1e-5
    if z.shape[1] < 2:
        return near_tau
    top2 = z.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    return near_tau | ((gap > 0) & (gap < 1e-5))


def reference(args, hp, tau):
    from adello_kernels.reference import flexda_fwd_reference
    z_l, y, z_w, z_s, ds, du = args
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), tau)


def assert_close_loss(x, r, dtype, what):
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
    x, r = float(torch.as_tensor(x).detach()), float(torch.as_tensor(r).detach())
    assert abs(x - r) <= rtol * abs(r) + 1e-7, f"{what}: {x!r} vs reference {r!r}"


def assert_close_grad(g, r, dtype, what):
    r = r.double().cpu()
    err = (g.double().cpu() - r).abs().max().item()
    big = r.abs().max().item()
    tol = 1e-6 * max(1.0, big) if dtype in (torch.float32, torch.float64) else 2e-2 * big
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"


def assert_matches(out, ref, args, tau, dtype, *, both_masks=True):
    """Every output of the op against the float64 reference, at docs/contract.md tolerances."""
    loss, terms, mask, plab, prior, g_l, g_s = out
    r_loss, r_terms, r_mask, r_plab, r_prior, r_gl, r_gs = ref
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == acc and terms.shape == (3,) and terms.dtype == acc
    assert mask.dtype == acc and plab.dtype == torch.int64 and prior.dtype == acc
    assert g_l.dtype == dtype and g_s.dtype == dtype
    z_w = args[2]
    amb = ambiguous_rows(z_w, tau).cpu()
    # a row whose mask flips changes L_u and L_d by O(1/N): the cases are built without such rows
    assert not amb.any(), "test data has rows at the tau / tie boundary; pick another seed"
    assert torch.equal(mask.cpu(), r_mask.to(acc).cpu()), "mask"
    assert torch.equal(plab.cpu(), r_plab.cpu()), "pseudo_labels"
    if both_masks:
        assert 0 < int(r_mask.sum()) < r_mask.numel(), "test data should mix M = 0 and M = 1"
    assert_close_loss(loss, r_loss, dtype, "loss")
    for k, name in enumerate(("L_s", "L_u", "L_d")):
        assert_close_loss(terms[k], r_terms[k], dtype, name)
    assert (prior.double().cpu() - r_prior.cpu()).abs().max().item() <= 1e-6, "prior_batch"
    assert_close_grad(g_l, r_gl, dtype, "grad_lb")
    assert_close_grad(g_s, r_gs, dtype, "grad_ulb_s")


def run_op(args, hp, tau):
    z_l, y, z_w, z_s, ds, du = args
    return torch.ops.adello.flexda_fwd_triton(z_l, y, z_w, z_s, ds, du, hp, tau)


# ---------------------------------------------------------------------------------------------
# The normal process: run the interpreter tests in a child, check the registration
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the child process already")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_suite():
    """Runs this file under TRITON_INTERPRET=1 in a fresh process (see the module docstring)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    report = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:]).strip()
    print(report.splitlines()[-1] if report else "")
    assert proc.returncode == 0, f"interpreter tests failed (exit {proc.returncode}):\n{report}"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("op_name", ["flexda_fwd_triton", "flexda_step_triton"])
def test_op_has_cuda_kernel_after_import(op_name):
    """Every adello:: op needs a CUDA-key kernel: importing the Triton module registers it, and
    the CPU key only under the interpreter. (That the CUDA kernel is the Triton launcher, not
    just any kernel, is checked by test_cuda_key_runs_the_triton_launcher in the child.)"""
    from adello_kernels.ops import flexda as ops
    from adello_kernels.ops import flexda_triton
    assert ops.has_kernel(op_name, "CUDA")
    assert ops.has_kernel(op_name, "CPU") == flexda_triton.INTERPRETED
    dump = torch._C._dispatch_dump("adello::" + op_name)
    cuda_line = next(line for line in dump.splitlines() if line.startswith("CUDA:"))
    assert "torch/library.py" in cuda_line or "flexda_triton" in cuda_line, cuda_line


# ---------------------------------------------------------------------------------------------
# Interpreter tests (CPU tensors, TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------

interp = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton is "
                            "imported: runs in the child process of test_interpreter_suite")


@pytest.fixture
def ft():
    from adello_kernels.ops import flexda_triton
    assert flexda_triton.INTERPRETED
    return flexda_triton


@pytest.fixture
def column_loop(ft, monkeypatch):
    """Forces the large-C regime at small C: whole rows only up to 128 classes, 128-column blocks
    (C = 300 gives three blocks, the last one partial)."""
    monkeypatch.setattr(ft, "MAX_FUSED_BLOCK_C", 128)
    monkeypatch.setattr(ft, "LOOP_BLOCK_C", 128)
    return ft


# (B, N, C, dtype, T, gate, tau): rows never a multiple of the tile (16 rows at C <= 128, 8 at
# 256, 2 at 1024), every dtype, T != 1 and distillation on and off.
FUSED_CASES = [
    (37, 45, 100, torch.float32, 1.0, 1.0, 0.9),
    (37, 45, 100, torch.float32, 2.5, 1.0, 0.9),
    (37, 45, 100, torch.float32, 2.0, 0.0, 0.9),
    (21, 34, 127, torch.bfloat16, 1.0, 1.0, 0.95),
    (21, 34, 200, torch.float16, 0.5, 1.0, 0.9),
    (19, 23, 100, torch.bfloat16, 1.5, 0.0, 0.9),
    (5, 7, 1000, torch.float32, 1.0, 1.0, 0.6),
    (1, 1, 10, torch.float32, 2.0, 1.0, 0.5),
]


def _case_id(case):
    b, n, c, dtype, t, gate, tau = case
    return f"B{b}-N{n}-C{c}-{FLOAT_IDS[dtype]}-T{t}-{'distill' if gate else 'nodistill'}"


@interp
@pytest.mark.parametrize("case", FUSED_CASES, ids=_case_id)
def test_fused_rows_match_reference(ft, case):
    b, n, c, dtype, t, gate, tau = case
    assert not ft.kernel_config(c, dtype).loop_c
    args = make_case(b, n, c, dtype, seed=b + c)
    hp = hparams(1.3, 0.7, gate, t, dtype)
    out = run_op(args, hp, tau)
    assert_matches(out, reference(args, hp, tau), args, tau, dtype, both_masks=n > 1)
    if not gate:
        assert float(out[1][2]) == 0.0, "distillation off: terms[2] must be exactly 0"


LOOP_CASES = [
    (11, 13, 300, torch.float32, 1.0, 1.0, 0.9),
    (11, 13, 300, torch.float32, 2.0, 1.0, 0.9),
    (9, 10, 260, torch.bfloat16, 1.0, 0.0, 0.9),
    (9, 10, 257, torch.float16, 0.7, 1.0, 0.9),
]


@interp
@pytest.mark.parametrize("case", LOOP_CASES, ids=_case_id)
def test_column_loop_matches_reference(column_loop, case):
    b, n, c, dtype, t, gate, tau = case
    cfg = column_loop.kernel_config(c, dtype)
    assert cfg.loop_c and cfg.block_c < c
    args = make_case(b, n, c, dtype, seed=c)
    hp = hparams(0.8, 1.4, gate, t, dtype)
    assert_matches(run_op(args, hp, tau), reference(args, hp, tau), args, tau, dtype)


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_pseudo_label_is_first_index_of_tied_max(ft, monkeypatch, regime):
    """yhat = first index of the max weak logit, within a column block and across blocks of the
    large-C loop (a later block's max replaces the running one only when strictly larger)."""
    if regime == "loop":
        monkeypatch.setattr(ft, "MAX_FUSED_BLOCK_C", 128)
        monkeypatch.setattr(ft, "LOOP_BLOCK_C", 128)
    c = 300
    assert ft.kernel_config(c, torch.float32).loop_c == (regime == "loop")
    ties = [(5, 200), (130, 131), (0, 299), (127, 128), (250, 251)]
    z_l, y, z_w, z_s, ds, du = make_case(4, len(ties), c, torch.float32, seed=8)
    z_w = torch.randn(len(ties), c, generator=torch.Generator().manual_seed(1))
    for i, (k1, k2) in enumerate(ties):
        z_w[i, k1] = z_w[i, k2] = 9.0
    args = (z_l, y, z_w, z_s, ds, du)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    out = run_op(args, hp, 0.3)
    assert out[3].tolist() == [k1 for k1, _ in ties]
    ref = reference(args, hp, 0.3)
    assert torch.equal(out[3], ref[3])
    assert_close_loss(out[0], ref[0], torch.float32, "loss")


@interp
def test_float64_logits_match_reference(ft):
    """fp64 (allowed by the op schema) runs its own column-loop configuration, fp64 throughout."""
    args = make_case(13, 15, 700, torch.float64, seed=3)
    hp = hparams(1.0, 1.0, 1.0, 1.5, torch.float64)
    out = run_op(args, hp, 0.9)
    ref = reference(args, hp, 0.9)
    assert_matches(out, ref, args, 0.9, torch.float64)
    assert abs(float(out[0]) - float(ref[0])) <= 1e-12 * abs(float(ref[0]))


@interp
def test_bf16_accumulates_in_fp32(ft):
    """Same bf16 inputs, fp32 math: the losses must meet the fp32 bound, far inside the bf16 one
    (a kernel computing in bf16 would be off by ~1e-3)."""
    args = make_case(30, 40, 100, torch.bfloat16, seed=5)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.bfloat16)
    out, ref = run_op(args, hp, 0.9), reference(args, hp, 0.9)
    assert_close_loss(out[0], ref[0], torch.float32, "loss")
    for k in range(3):
        assert_close_loss(out[1][k], ref[1][k], torch.float32, f"terms[{k}]")


@interp
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_large_logits_do_not_cancel(ft, temperature):
    """Logits around 1e4: the cross-entropies are formed from per-element differences
    (log s + (m - x[y]), log s' + sum_c q_c (m - a_c) / T), which are exact here, so fp32 keeps
    the contract's tolerance; the naive lse(x) - x[y] or lse(a/T) - sum_c q_c a_c / T loses ~1e-3.
    The adjustments are zero: x = z + ds is rounded to fp32 by contract, and at 1e4 that rounding
    alone (ulp 1e-3) would move the losses by more than the fp32 tolerance, in any fp32 kernel."""
    b, n, c = 10, 12, 100
    z_l, y, z_w, z_s, ds, du = make_case(b, n, c, torch.float32, seed=7)
    args = (z_l + 1e4, y, z_w + 1e4, z_s + 1e4, torch.zeros_like(ds), torch.zeros_like(du))
    hp = hparams(1.0, 1.0, 1.0, temperature, torch.float32)
    assert_matches(run_op(args, hp, 0.9), reference(args, hp, 0.9), args, 0.9, torch.float32)


@interp
def test_results_are_deterministic(ft):
    """Per-program partials reduced in a fixed order: two runs agree bit for bit."""
    args = make_case(40, 50, 130, torch.float32, seed=11)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    a, b = run_op(args, hp, 0.9), run_op(args, hp, 0.9)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=FLOAT_IDS.get)
def test_threshold_is_inclusive_in_acc_dtype(ft, dtype):
    """M = [max pw >= (acc) tau]: equal logits over 4 classes give max pw = 0.25 exactly. tau = 0.25
    is inclusive; tau = 0.25 + 1e-9 rounds to 0.25 in fp32 (confident) but not in fp64; tau =
    0.25 + 1e-7 is above 0.25 in both."""
    z = torch.zeros(2, 4, dtype=dtype)
    z[1, 0] = -1.0                                   # max pw = e^0 / (e^-1 + 3) > 0.25
    acc_zero = torch.zeros(4, dtype=dtype)
    args = (z, torch.tensor([0, 1]), z, z, acc_zero, acc_zero)
    hp = hparams(1.0, 1.0, 1.0, 1.0, dtype)
    assert run_op(args, hp, 0.25)[2].tolist() == [1.0, 1.0]
    expect = [1.0, 1.0] if dtype == torch.float32 else [0.0, 1.0]
    assert run_op(args, hp, 0.25 + 1e-9)[2].tolist() == expect
    assert run_op(args, hp, 0.25 + 1e-7)[2].tolist() == [0.0, 1.0]
    from adello_kernels.reference import flexda_fwd_reference
    for tau in (0.25, 0.25 + 1e-9, 0.25 + 1e-7):   # the reference in the same dtype agrees
        assert torch.equal(run_op(args, hp, tau)[2], flexda_fwd_reference(*args, hp, tau)[2])


@interp
def test_non_finite_logits_do_not_crash(ft):
    args = list(make_case(6, 8, 50, torch.float32, seed=2))
    args[2] = args[2].clone()
    args[2][3, 5] = float("nan")
    args[0] = args[0].clone()
    args[0][1, 2] = float("inf")
    out = run_op(tuple(args), hparams(1.0, 1.0, 1.0, 2.0, torch.float32), 0.9)
    assert not torch.isfinite(out[0])
    assert out[3].min() >= 0 and out[3].max() < 50


@interp
def test_opcheck(ft):
    args = make_case(5, 6, 20, torch.float32, seed=1)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    torch.library.opcheck(torch.ops.adello.flexda_fwd_triton, (*args, hp, 0.9),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@interp
def test_cuda_key_runs_the_triton_launcher(ft):
    """The CUDA-key kernel is the Triton launcher itself: called through that key with CPU
    tensors (which the interpreter runs), it gives the reference's results. A CUDA key holding a
    stub, the reference or another backend's kernel fails here (the registration test in the
    parent only sees that some kernel is there)."""
    args = make_case(9, 11, 40, torch.float32, seed=17)
    hp = hparams(1.1, 0.9, 1.0, 2.0, torch.float32)
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    out = torch.ops.adello.flexda_fwd_triton.default.redispatch(keys, *args, hp, 0.9)
    assert_matches(out, reference(args, hp, 0.9), args, 0.9, torch.float32)


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_labels_out_of_range_give_nan_rows(ft, monkeypatch, regime):
    """flexda_fwd_triton: a label outside [0, C) (here -1 and C) gives that row a NaN CE (so loss
    and L_s are NaN) and an all-NaN gradient row, with no out-of-bounds access; every other row,
    and the unlabeled side, match the reference computed with valid labels there. A kernel that
    ignored the range would give a finite CE and a -onehot-less gradient row."""
    if regime == "loop":
        monkeypatch.setattr(ft, "MAX_FUSED_BLOCK_C", 128)
        monkeypatch.setattr(ft, "LOOP_BLOCK_C", 128)
    c = 300
    z_l, y, z_w, z_s, ds, du = make_case(7, 9, c, torch.float32, seed=23)
    assert ft.kernel_config(c, torch.float32).loop_c == (regime == "loop")
    bad = torch.tensor([1, 4])
    y_bad = y.clone()
    y_bad[1], y_bad[4] = -1, c
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    out = run_op((z_l, y_bad, z_w, z_s, ds, du), hp, 0.9)
    ref = reference((z_l, y, z_w, z_s, ds, du), hp, 0.9)
    assert torch.isnan(out[0]) and torch.isnan(out[1][0])
    assert torch.isnan(out[5][bad]).all()
    good = torch.ones(7, dtype=torch.bool)
    good[bad] = False
    assert_close_grad(out[5][good], ref[5][good], torch.float32, "grad_lb (valid rows)")
    assert_close_grad(out[6], ref[6], torch.float32, "grad_ulb_s")
    for k in (1, 2):
        assert_close_loss(out[1][k], ref[1][k], torch.float32, f"terms[{k}]")


def _set_regime(ft, monkeypatch, regime):
    """'loop': the column_loop fixture's small blocks (C = 300 -> three 128-column blocks);
    'fused' and 'native' (fp64's own loop, C > 4096's real blocks): the launcher's defaults."""
    if regime == "loop":
        monkeypatch.setattr(ft, "MAX_FUSED_BLOCK_C", 128)
        monkeypatch.setattr(ft, "LOOP_BLOCK_C", 128)


def _assert_only_prior_differs(em, raw, what, min_diff=1e-4):
    """The estimator changes prior_batch only: every other output bitwise equal, and the two
    priors apart by more than the contract's 1e-6 (the case tells em from raw)."""
    k_prior = len(em) - 3       # prior_batch: 4 of the fwd's 7 outputs, 6 of the step's 9
    for k, (x, y) in enumerate(zip(em, raw)):
        if k != k_prior:
            assert torch.equal(x, y), f"{what}: output {k} depends on the estimator"
    diff = (em[k_prior].double() - raw[k_prior].double()).abs().max().item()
    assert diff > min_diff, f"{what}: em and raw priors only {diff:.3g} apart"


# (B, N, C, dtype, T, regime): the packed-row regime (C = 100: 16 rows a tile; C = 1000: 2 rows),
# the column loop at small C (three blocks, the last partial), fp64's own column loop (512-column
# blocks: C = 700 gives two), and the real large-C configuration (C = 4097: 2048-column blocks,
# the last holding one column). The contract's Triton cases (C <= 600, em never with fp64) reach
# only the first regime with em.
EM_CASES = [
    (37, 45, 100, torch.float32, 1.0, "fused"),
    (21, 34, 127, torch.bfloat16, 2.0, "fused"),
    (5, 7, 1000, torch.float16, 0.5, "fused"),
    (11, 13, 300, torch.float32, 2.0, "loop"),
    (9, 10, 257, torch.bfloat16, 1.0, "loop"),
    (13, 15, 700, torch.float64, 1.5, "native"),
    (3, 6, 4097, torch.float32, 1.0, "native"),
]


def _em_id(case):
    b, n, c, dtype, t, regime = case
    return f"B{b}-N{n}-C{c}-{FLOAT_IDS[dtype]}-T{t}-{regime}"


@interp
@pytest.mark.parametrize("case", EM_CASES, ids=_em_id)
def test_prior_em_matches_reference(ft, monkeypatch, case):
    """hparams[HP_PRIOR_EM] = 1 (read on the device): prior_batch = mean_i softmax(z_w + du), the
    reference's, from the weak exps of the row pass (the column loop sums e_w r in its first
    pass); the other six outputs bitwise those of raw mode."""
    b, n, c, dtype, t, regime = case
    _set_regime(ft, monkeypatch, regime)
    assert ft.kernel_config(c, dtype).loop_c == (regime != "fused")
    args = make_case(b, n, c, dtype, seed=c + 1)
    hp_em = hparams(1.1, 0.8, 1.0, t, dtype, prior_em=True)
    out = run_op(args, hp_em, 0.9)
    assert_matches(out, reference(args, hp_em, 0.9), args, 0.9, dtype, both_masks=False)
    raw = run_op(args, hparams(1.1, 0.8, 1.0, t, dtype), 0.9)
    _assert_only_prior_differs(out, raw, "fwd")


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_prior_em_non_finite_weak_row_gives_nan_prior(ft, monkeypatch, regime):
    """EM mode: a NaN or +inf weak logit makes that row's pe NaN in every column, so prior_batch
    is NaN everywhere (as raw mode and the reference give); the finite rows' other outputs are
    unaffected."""
    _set_regime(ft, monkeypatch, regime)
    c = 300 if regime == "loop" else 100
    for bad in (float("nan"), float("inf")):
        args = list(make_case(6, 8, c, torch.float32, seed=5))
        args[2] = args[2].clone()
        args[2][3, 7] = bad
        out = run_op(tuple(args), hparams(1.0, 1.0, 1.0, 2.0, torch.float32, prior_em=True), 0.9)
        raw = run_op(tuple(args), hparams(1.0, 1.0, 1.0, 2.0, torch.float32), 0.9)
        ref = reference(tuple(args), hparams(1.0, 1.0, 1.0, 2.0, torch.float64, prior_em=True),
                        0.9)
        assert torch.isnan(out[4]).all() and torch.isnan(raw[4]).all()
        assert torch.isnan(ref[4]).all()
        keep = torch.arange(8) != 3
        assert torch.equal(out[2][keep], raw[2][keep]) and torch.equal(out[3][keep], raw[3][keep])


# ---- adello::flexda_step_triton: the whole training step -----------------------------------

STEP_KW = dict(total_steps=10, alpha_min=0.1, power=2.0, distill_start=2, lambda_u=1.3,
               lambda_d=0.7, eps=1e-9, flexda=True, threshold=0.9, prior_momentum=0.9,
               update=True, prior_em=False, distill_all=False)


def _step_state(c, seed, t=0):
    _, q = _priors(c, seed)
    return q, torch.tensor(t, dtype=torch.int64), torch.zeros((), dtype=torch.int64)


def run_step(ft, args, p_l, state, temperature, fn=None, **over):
    """One call of flexda_step_triton (or `fn`, same arguments) on the state tuple (q, t, k).
    The schema's defaulted arguments are passed only when needed: prior_em when it is on,
    and with distill_all every trailing one (prior_target=None, alpha_epoch_steps=1,
    prior_weight=None, distill_all=True); the raw calls go through the defaults."""
    kw = {**STEP_KW, **over}
    z_l, y, z_w, z_s = args
    q, t, k = state
    fn = fn or ft.flexda_step_triton
    tail = (kw["prior_em"],) if kw["prior_em"] else ()
    if kw["distill_all"]:
        tail = (kw["prior_em"], None, 1, None, True)
    return fn(z_l, y, z_w, z_s, p_l, q, t, k, temperature, kw["total_steps"], kw["alpha_min"],
              kw["power"], kw["distill_start"], kw["lambda_u"], kw["lambda_d"], kw["eps"],
              kw["flexda"], kw["threshold"], kw["prior_momentum"], kw["update"], *tail)


def step_reference(args, p_l, q, t, temperature, **over):
    """The step's outputs in float64 from the state (Q_{t-1}, t): alpha_schedule,
    logit_adjustments (or zeros when flexda is off), the gate [t >= t0], then the closed-form
    reference of the rows; and the state after it (ops/state.py momentum_update on fp32 Q)."""
    from adello_kernels.ops.state import momentum_update
    from adello_kernels.reference import alpha_schedule, flexda_fwd_reference, logit_adjustments
    kw = {**STEP_KW, **over}
    z_l, y, z_w, z_s = args
    c = z_l.shape[1]
    if kw["flexda"]:
        alpha = alpha_schedule(int(t), kw["total_steps"], kw["alpha_min"], kw["power"])
        ds, du = logit_adjustments(p_l, q, alpha, kw["eps"], dtype=torch.float64)
    else:
        ds = du = torch.zeros(c, dtype=torch.float64)
    gate = float(int(t) >= kw["distill_start"])
    hp = hparams(kw["lambda_u"], kw["lambda_d"], gate, float(temperature), torch.float64,
                 prior_em=kw["prior_em"])
    ref = flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds, du, hp,
                               kw["threshold"], distill_all=kw["distill_all"])
    q_new, ok = momentum_update(q, ref[4].float(), kw["prior_momentum"])
    return ref, q_new, bool(ok)


def assert_step_matches(out, ref, args, tau, dtype, what):
    """The step's nine outputs against the fwd reference's seven (terms split in three)."""
    loss, l_s, l_u, l_d, mask, plab, prior, g_l, g_s = out
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for x in (loss, l_s, l_u, l_d):
        assert x.shape == () and x.dtype == acc
    packed = (loss, torch.stack([l_s, l_u, l_d]), mask, plab, prior, g_l, g_s)
    try:
        assert_matches(packed, ref, args, tau, dtype, both_masks=False)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


# (B, N, C, dtype, T): the packed-row regime (C = 100: 16 rows a tile; C = 1000: 2 rows), every
# dtype (fp64 takes its column-loop configuration), T == 1 and T != 1.
STEP_CASES = [
    (37, 45, 100, torch.float32, 1.0),
    (37, 45, 100, torch.float32, 2.5),
    (21, 34, 127, torch.bfloat16, 1.0),
    (19, 23, 200, torch.float16, 0.5),
    (13, 15, 70, torch.float64, 1.5),
    (5, 7, 1000, torch.float32, 2.0),
]


def _step_id(case):
    b, n, c, dtype, t = case
    return f"B{b}-N{n}-C{c}-{FLOAT_IDS[dtype]}-T{t}"


def _trajectory(ft, b, n, c, dtype, temperature, steps=4, seed=0, device="cpu", **over):
    """`steps` successive steps on one mutating state against the reference run alongside it
    (its own state, updated by momentum_update): outputs, prior trajectory, step, skipped.
    distill_start = 2: the gate flips on at the third step."""
    kw = {**STEP_KW, **over}
    p_l, _ = _priors(c, seed + 50)
    state = tuple(x.to(device) for x in _step_state(c, seed + 51))
    q_ref = state[0].cpu().clone()
    temp = torch.tensor(temperature, device=device)
    for k in range(steps):
        z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=seed + 7 * k)
        args = (z_l, y, z_w, z_s)
        t_before = int(state[1])
        ref, q_next, ok = step_reference(args, p_l, q_ref, t_before, temperature, **over)
        out = run_step(ft, tuple(x.to(device) for x in args), p_l.to(device), state, temp,
                       **over)
        out = tuple(x.cpu() for x in out)
        assert_step_matches(out, ref, args, kw["threshold"], dtype, f"step {k}")
        if t_before < kw["distill_start"]:
            assert float(out[3]) == 0.0, f"step {k}: gate off, L_d must be exactly 0"
        else:
            assert float(out[3]) > 0.0, f"step {k}: gate on, L_d must count"
        if kw["update"]:
            q_ref = q_next
            assert ok
            assert int(state[1]) == t_before + 1, f"step {k}: step counter"
        else:
            assert int(state[1]) == t_before
        err = (state[0].double().cpu() - q_ref.double()).abs().max().item()
        assert err <= 1e-6, f"step {k}: prior_ulb trajectory off by {err:.3g}"
        assert int(state[2]) == 0
    return state


@interp
@pytest.mark.parametrize("case", STEP_CASES, ids=_step_id)
def test_step_trajectory_matches_reference(ft, case):
    b, n, c, dtype, temperature = case
    _trajectory(ft, b, n, c, dtype, temperature, seed=b + c)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
def test_step_column_loop_matches_reference(column_loop, dtype):
    """The column-loop regime (C = 300 in 128-column blocks), where each program recomputes the
    adjustments of every block it reads."""
    assert column_loop.kernel_config(300, dtype).loop_c
    _trajectory(column_loop, 11, 13, 300, dtype, 2.0, steps=3, seed=5)


@interp
def test_step_flexda_off_uses_zero_adjustments(ft):
    _trajectory(ft, 17, 19, 100, torch.float32, 2.0, steps=3, seed=9, flexda=False)


@interp
@pytest.mark.parametrize("case", EM_CASES, ids=_em_id)
def test_step_prior_em_matches_reference(ft, monkeypatch, case):
    """prior_em=True (the PRIOR_EM specialisation of the row kernel) from a state at t = 5, where
    alpha_t < 1 makes du far from 0: the outputs against the float64 reference with the EM
    batch prior, Q updated with that prior, and every output but prior_batch bitwise the raw
    step's from the same state."""
    b, n, c, dtype, t, regime = case
    _set_regime(ft, monkeypatch, regime)
    assert ft.kernel_config(c, dtype).loop_c == (regime != "fused")
    p_l, _ = _priors(c, c + 2)
    state = _step_state(c, c + 3, t=5)
    raw_state = tuple(x.clone() for x in state)
    z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=c + 4)
    args = (z_l, y, z_w, z_s)
    ref, q_next, ok = step_reference(args, p_l, state[0].clone(), 5, t, prior_em=True)
    out = run_step(ft, args, p_l, state, torch.tensor(t), prior_em=True)
    assert_step_matches(out, ref, args, STEP_KW["threshold"], dtype, "em step")
    assert ok and int(state[1]) == 6 and int(state[2]) == 0
    err = (state[0].double() - q_next.double()).abs().max().item()
    assert err <= 1e-6, f"prior_ulb off by {err:.3g}"
    raw = run_step(ft, args, p_l, raw_state, torch.tensor(t))
    _assert_only_prior_differs(out, raw, "step", min_diff=1e-5)
    assert not torch.equal(state[0], raw_state[0])


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_step_prior_em_trajectory(ft, monkeypatch, regime):
    """Four EM steps on one mutating state (alpha falling fast: total_steps = 4) against the
    reference run alongside it: the EM prior feeds Q, which feeds the next step's du."""
    _set_regime(ft, monkeypatch, regime)
    c = 300 if regime == "loop" else 100
    _trajectory(ft, 11, 13, c, torch.float32, 2.0, steps=4, seed=c + 5, prior_em=True,
                total_steps=4)


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_step_prior_em_without_flexda_is_raw(ft, monkeypatch, regime):
    """flexda off: du = 0, r = exp(0) = 1 and e_w * 1 = e_w exactly, so the EM step gives the raw
    step's outputs and state bit for bit."""
    _set_regime(ft, monkeypatch, regime)
    c = 300 if regime == "loop" else 100
    p_l, _ = _priors(c, 1)
    z_l, y, z_w, z_s, _, _ = make_case(9, 12, c, torch.float32, seed=c + 6)
    s_em = _step_state(c, 2, t=5)
    s_raw = tuple(x.clone() for x in s_em)
    em = run_step(ft, (z_l, y, z_w, z_s), p_l, s_em, torch.tensor(1.5), flexda=False,
                  prior_em=True)
    raw = run_step(ft, (z_l, y, z_w, z_s), p_l, s_raw, torch.tensor(1.5), flexda=False)
    for x, y_ in zip(em + s_em, raw + s_raw):
        assert torch.equal(x, y_)


@interp
def test_step_without_update_leaves_the_state(ft):
    """update=False: same outputs as update=True from the same state, and prior_ulb, step and
    skipped_updates bitwise untouched (the all-reduced path updates them itself)."""
    c = 100
    p_l, _ = _priors(c, 3)
    z_l, y, z_w, z_s, _, _ = make_case(20, 30, c, torch.float32, seed=31)
    args = (z_l, y, z_w, z_s)
    s1 = _step_state(c, 4, t=3)
    s2 = tuple(x.clone() for x in s1)
    before = tuple(x.clone() for x in s1)
    a = run_step(ft, args, p_l, s1, torch.tensor(2.0), update=False)
    b = run_step(ft, args, p_l, s2, torch.tensor(2.0), update=True)
    for x, y_ in zip(a, b):
        assert torch.equal(x, y_)
    for x, y_ in zip(s1, before):
        assert torch.equal(x, y_)
    assert not torch.equal(s2[0], before[0]) and int(s2[1]) == 4
    _trajectory(ft, 9, 12, 100, torch.float32, 1.0, steps=2, seed=2, update=False)


@interp
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_step_non_finite_weak_logits_skip_the_update(ft, monkeypatch, regime, prior_em):
    """A NaN (or inf) weak logit makes prior_batch non-finite (raw or EM estimator): Q stays
    bitwise as it was, skipped_updates += 1, step still advances; the next finite step updates
    again."""
    _set_regime(ft, monkeypatch, regime)
    c = 300 if regime == "loop" else 100
    p_l, _ = _priors(c, 6)
    state = _step_state(c, 7, t=5)
    temp = torch.tensor(1.0)
    for k, bad in enumerate([float("nan"), float("inf")]):
        z_l, y, z_w, z_s, _, _ = make_case(8, 10, c, torch.float32, seed=40 + k)
        z_w = z_w.clone()
        z_w[3, 7] = bad
        q_before = state[0].clone()
        out = run_step(ft, (z_l, y, z_w, z_s), p_l, state, temp, prior_em=prior_em)
        assert not torch.isfinite(out[6]).all()
        assert torch.equal(state[0], q_before), "non-finite batch prior must not update Q"
        assert int(state[2]) == k + 1 and int(state[1]) == 6 + k
    z_l, y, z_w, z_s, _, _ = make_case(8, 10, c, torch.float32, seed=49)
    q_before = state[0].clone()
    ref, q_next, ok = step_reference((z_l, y, z_w, z_s), p_l, q_before, int(state[1]), 1.0,
                                     prior_em=prior_em)
    run_step(ft, (z_l, y, z_w, z_s), p_l, state, temp, prior_em=prior_em)
    assert ok and int(state[2]) == 2 and int(state[1]) == 8
    assert (state[0] - q_next).abs().max() <= 1e-7


@interp
def test_step_labels_out_of_range(ft):
    """The step: a label outside [0, C) -> loss and loss_sup NaN, that gradient row NaN; the
    unlabeled terms, the other rows and the prior update are unaffected."""
    c = 100
    p_l, _ = _priors(c, 8)
    z_l, y, z_w, z_s, _, _ = make_case(6, 9, c, torch.float32, seed=61)
    y_bad = y.clone()
    y_bad[2] = c + 5
    state = _step_state(c, 9, t=4)
    q0 = state[0].clone()
    out = run_step(ft, (z_l, y_bad, z_w, z_s), p_l, state, torch.tensor(1.0))
    ref, q_next, _ = step_reference((z_l, y, z_w, z_s), p_l, q0, 4, 1.0)
    assert torch.isnan(out[0]) and torch.isnan(out[1])
    assert torch.isnan(out[7][2]).all()
    keep = torch.arange(6) != 2
    assert_close_grad(out[7][keep], ref[5][keep], torch.float32, "grad_lb (valid rows)")
    assert_close_grad(out[8], ref[6], torch.float32, "grad_ulb_s")
    assert_close_loss(out[2], ref[1][1], torch.float32, "L_u")
    assert (state[0] - q_next).abs().max() <= 1e-7 and int(state[2]) == 0


def _grad_case(ft, dtype=torch.float32, c=100):
    p_l, _ = _priors(c, 10)
    z_l, y, z_w, z_s, _, _ = make_case(12, 16, c, dtype, seed=71)
    return p_l, (z_l, y, z_w, z_s)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_step_backward_scales_saved_gradients(ft, dtype, scale):
    """loss.backward() (incoming grad 1) hands on the forward's gradients unchanged; (scale *
    loss).backward() multiplies them exactly as torch would (the grad rounded to the logits'
    dtype, the product rounded once); both against the float64 reference."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft, dtype)
    zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
    state = _step_state(100, 11, t=3)
    q0 = state[0].clone()
    out = run_step(ft, (zl, y, z_w, zs), p_l, state, torch.tensor(2.0), update=False)
    fwd_l, fwd_s = out[7].clone(), out[8].clone()
    (out[0] * scale).backward() if scale != 1.0 else out[0].backward()
    g = torch.tensor(scale, dtype=dtype)
    if dtype == torch.float32:
        assert torch.equal(zl.grad, fwd_l * g) and torch.equal(zs.grad, fwd_s * g)
    else:  # the interpreter's fp32 -> bf16 rounding is not always torch's round-to-nearest-even
        for got, want in ((zl.grad, fwd_l * g), (zs.grad, fwd_s * g)):
            assert ((got.double() - want.double()).abs() <= want.double().abs() * 2**-7).all()
    ref, _, _ = step_reference((z_l, y, z_w, z_s), p_l, q0, 3, 2.0)
    assert_close_grad(zl.grad, ref[5].double() * scale, dtype, "dloss/dlogits_lb")
    assert_close_grad(zs.grad, ref[6].double() * scale, dtype, "dloss/dlogits_ulb_s")


@interp
def test_scale_kernel_direct(ft):
    """scale_grads_triton_: both tensors in one launch, each block once (sizes not multiples of
    the block, so the grid-stride loop and both tails run), and nothing touched when g == 1."""
    a = torch.randn(3 * ft.SCALE_BLOCK + 5)
    b = torch.randn(2 * ft.SCALE_BLOCK + 7)
    a0, b0 = a.clone(), b.clone()
    ft.scale_grads_triton_(a, b, torch.tensor(1.0))
    assert torch.equal(a, a0) and torch.equal(b, b0)
    ft.scale_grads_triton_(a, b, torch.tensor(-0.75))
    assert torch.equal(a, a0 * -0.75) and torch.equal(b, b0 * -0.75)
    ft.scale_grads_triton_(None, b, torch.tensor(2.0))
    assert torch.equal(a, a0 * -0.75) and torch.equal(b, b0 * -1.5)


@interp
def test_step_backward_retain_graph_gives_fresh_products(ft):
    """retain_graph: the saved gradients must not be scaled in place, or the second backward
    would see them scaled twice."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
    out = run_step(ft, (zl, y, z_w, zs), p_l, _step_state(100, 12), torch.tensor(1.0),
                   update=False)
    fwd_l = out[7].clone()
    (out[0] * 2.5).backward(retain_graph=True)
    first = zl.grad.clone()
    zl.grad = zs.grad = None
    (out[0] * 2.5).backward()
    assert torch.equal(first, fwd_l * 2.5) and torch.equal(zl.grad, first)


@interp
def test_step_create_graph_raises(ft):
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    zl = z_l.clone().requires_grad_()
    out = run_step(ft, (zl, y, z_w, z_s), p_l, _step_state(100, 13), torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad(out[0], zl, create_graph=True)


@interp
def test_step_only_loss_is_differentiable(ft):
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
    out = run_step(ft, (zl, y, z_w, zs), p_l, _step_state(100, 14), torch.tensor(1.0))
    assert out[0].requires_grad
    assert not any(x.requires_grad for x in out[1:])


@interp
def test_step_direct_op_call_is_differentiable(ft):
    """torch.ops.adello.flexda_step_triton called directly goes through the op's Autograd kernel:
    same outputs and gradients as flexda_step_triton."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    grads = []
    for fn in (ft.flexda_step_triton, torch.ops.adello.flexda_step_triton):
        zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = run_step(ft, (zl, y, z_w, zs), p_l, _step_state(100, 15), torch.tensor(2.0),
                       fn=fn)
        (out[0] * 1.5).backward()
        grads.append((out[0].detach(), zl.grad, zs.grad))
    for x, y_ in zip(*grads):
        assert torch.equal(x, y_)


@interp
def test_step_bumps_state_versions_only_when_updating(ft):
    """The kernel writes the state without ATen: the autograd path bumps the version counters,
    so autograd notices a saved state tensor that the step changed."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    state = _step_state(100, 16)
    v0 = [x._version for x in state]
    run_step(ft, (z_l, y, z_w, z_s), p_l, state, torch.tensor(1.0), update=False)
    assert [x._version for x in state] == v0
    run_step(ft, (z_l, y, z_w, z_s), p_l, state, torch.tensor(1.0))
    assert all(x._version > v for x, v in zip(state, v0))
    w = torch.ones(100, requires_grad=True)
    saved = w * state[0]                     # saves prior_ulb for its backward
    run_step(ft, (z_l, y, z_w, z_s), p_l, state, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@interp
def test_step_is_deterministic(ft):
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    a = run_step(ft, (z_l, y, z_w, z_s), p_l, _step_state(100, 17), torch.tensor(2.0))
    b = run_step(ft, (z_l, y, z_w, z_s), p_l, _step_state(100, 17), torch.tensor(2.0))
    for x, y_ in zip(a, b):
        assert torch.equal(x, y_)


@interp
def test_step_rejects_bad_state(ft):
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    q, t, k = _step_state(100, 18)
    with pytest.raises(ValueError, match="step"):
        run_step(ft, (z_l, y, z_w, z_s), p_l, (q, t.float(), k), torch.tensor(1.0))
    with pytest.raises(ValueError, match="prior_ulb"):
        run_step(ft, (z_l, y, z_w, z_s), p_l, (q[:50], t, k), torch.tensor(1.0))
    with pytest.raises(ValueError, match="labels_lb"):
        run_step(ft, (z_l, y.int(), z_w, z_s), p_l, (q, t, k), torch.tensor(1.0))


@interp
@pytest.mark.parametrize("update, prior_em", [(False, None), (True, None), (True, True)],
                         ids=["noupdate", "update", "update-em"])
def test_step_opcheck(ft, update, prior_em):
    """The schema's mutation annotations (prior_ulb, step, skipped_updates written only when
    `update`) and the fake agree with what the kernel does; prior_em left to its default, or
    given."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft, c=20)
    q, t, k = _step_state(20, 19)
    kw = STEP_KW
    args = (z_l[:, :20].contiguous(), y % 20, z_w[:, :20].contiguous(), z_s[:, :20].contiguous(),
            p_l[:20] / p_l[:20].sum(), q[:20] / q[:20].sum(), t, k, torch.tensor(1.5),
            kw["total_steps"], kw["alpha_min"], kw["power"], kw["distill_start"],
            kw["lambda_u"], kw["lambda_d"], kw["eps"], True, kw["threshold"],
            kw["prior_momentum"], update) + ((prior_em,) if prior_em is not None else ())
    torch.library.opcheck(torch.ops.adello.flexda_step_triton, args,
                          test_utils=("test_schema", "test_faketensor"))


@interp
@pytest.mark.parametrize("update", [True, False])
def test_step_torch_compile_fullgraph(ft, update):
    """torch.compile(fullgraph=True) of a step's forward calling flexda_step_triton, with the
    state update inside the op (update=True) or in PyTorch after it (update=False), then its
    backward: no graph break, and the same losses, gradients and state as eager over steps.
    (dynamo does not trace Tensor.backward(), so backward is called on the compiled output.)"""
    from adello_kernels.ops.state import update_prior_
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft, c=30)
    kw = dict(STEP_KW, update=update)
    z_l, z_w, z_s = z_l[:, :30].contiguous(), z_w[:, :30].contiguous(), z_s[:, :30].contiguous()
    y = y % 30
    p_l = p_l[:30] / p_l[:30].sum()

    def loss_step(zl, zs, q, t, k):
        out = run_step(ft, (zl, y, z_w, zs), p_l, (q, t, k), torch.tensor(2.0), **kw)
        if not update:
            update_prior_(q, t, k, out[6], kw["prior_momentum"])
        return out[0], out[6]

    results = []
    for fn in (loss_step, torch.compile(loss_step, fullgraph=True, backend="aot_eager")):
        zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        state = _step_state(30, 20, t=1)
        steps = []
        for _ in range(3):                                # crosses distill_start = 2
            loss, prior = fn(zl, zs, *state)
            (2.0 * loss).backward()                       # the compiled backward, grad 2
            steps.append((loss.detach(), prior))
        results.append((steps, zl.grad, zs.grad, state))
    (e_steps, e_gl, e_gs, e_state), (c_steps, c_gl, c_gs, c_state) = results
    for (el, ep), (cl, cp) in zip(e_steps, c_steps):
        assert_close_loss(cl, el, torch.float32, "loss")
        assert (cp - ep).abs().max() <= 1e-7
    assert_close_grad(c_gl, e_gl.double(), torch.float32, "grad_lb")
    assert_close_grad(c_gs, e_gs.double(), torch.float32, "grad_ulb_s")
    assert (c_state[0] - e_state[0]).abs().max() <= 1e-7
    assert int(c_state[1]) == int(e_state[1]) == 4


# ---- public API on the triton backend -------------------------------------------------------

def _priors(c, seed):
    g = torch.Generator().manual_seed(seed)
    p_l = torch.rand(c, generator=g) + 0.05
    q = torch.rand(c, generator=g) + 0.05
    return p_l / p_l.sum(), q / q.sum()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_flexda_loss_triton_backend(ft, dtype, temperature):
    """ak.flexda_loss(..., backend="triton") against flexda_reference (autograd) in float64."""
    import adello_kernels as ak
    from adello_kernels.reference import flexda_reference
    assert "triton" in ak.available_backends()
    b, n, c = 24, 40, 100
    z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=21)
    p_l, q = _priors(c, 4)
    kw = dict(threshold=0.9, lambda_u=1.2, lambda_d=0.8, distill=True, temperature=temperature)
    zl_t, zs_t = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
    out = ak.flexda_loss(zl_t, y, z_w, zs_t, p_l, q, 0.6, backend="triton", **kw)
    out.loss.backward()
    zl_r, zs_r = z_l.double().requires_grad_(), z_s.double().requires_grad_()
    ref = flexda_reference(zl_r, y, z_w.double(), zs_r, p_l.double(), q.double(), 0.6, **kw)
    ref.loss.backward()
    assert 0 < int(ref.mask.sum()) < n
    for name in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
        assert_close_loss(getattr(out, name), getattr(ref, name), dtype, name)
    assert torch.equal(out.mask, ref.mask.float())
    assert torch.equal(out.pseudo_labels, ref.pseudo_labels)
    assert (out.prior_batch.double() - ref.prior_batch).abs().max() <= 1e-6
    assert zl_t.grad.dtype == dtype and zs_t.grad.dtype == dtype
    assert_close_grad(zl_t.grad, zl_r.grad, dtype, "dloss/dlogits_lb")
    assert_close_grad(zs_t.grad, zs_r.grad, dtype, "dloss/dlogits_ulb_s")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
def test_adello_loss_triton_backend(ft, dtype):
    """ADELLOLoss(backend="triton") step by step against ADELLOLoss(backend="reference") fed
    float64 copies: losses, gradients and the prior estimate after each update. distill_start=2
    turns the distillation on mid-run; "imbalance_aware" freezes T at that step."""
    import adello_kernels as ak
    b, n, c = 16, 32, 100
    p_l, _ = _priors(c, 9)
    kw = dict(distill_start=2, temperature="imbalance_aware", threshold=0.9, prior_momentum=0.9)
    crit_t = ak.ADELLOLoss(p_l, 10, backend="triton", **kw)
    crit_r = ak.ADELLOLoss(p_l, 10, backend="reference", **kw)
    for step in range(4):
        z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=100 + step)
        zl_t, zs_t = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = crit_t(zl_t, y, z_w, zs_t)
        out.loss.backward()
        zl_r, zs_r = z_l.double().requires_grad_(), z_s.double().requires_grad_()
        ref = crit_r(zl_r, y, z_w.double(), zs_r)
        ref.loss.backward()
        for name in ("loss", "loss_sup", "loss_unsup", "loss_distill"):
            assert_close_loss(getattr(out, name), getattr(ref, name), dtype, f"{name}@{step}")
        assert torch.equal(out.mask, ref.mask.float())
        assert torch.equal(out.pseudo_labels, ref.pseudo_labels)
        assert_close_grad(zl_t.grad, zl_r.grad, dtype, f"grad_lb@{step}")
        assert_close_grad(zs_t.grad, zs_r.grad, dtype, f"grad_ulb_s@{step}")
        assert (crit_t.prior_ulb - crit_r.prior_ulb).abs().max() <= 1e-6, f"prior@{step}"
        assert torch.equal(crit_t.step, crit_r.step)
        assert abs(float(crit_t.temperature) - float(crit_r.temperature)) <= 1e-6
    assert float(crit_t.temperature) > 1.0 and bool(crit_t.temperature_frozen)


@interp
def test_torch_compile_fullgraph(ft):
    """The op is opaque to torch.compile (register_fake): a fullgraph capture of flexda_loss on
    the triton backend traces without graph breaks and gives the eager result."""
    import adello_kernels as ak
    z_l, y, z_w, z_s, _, _ = make_case(8, 12, 30, torch.float32, seed=13)
    p_l, q = _priors(30, 1)

    def step(z_l, z_w, z_s, distill):
        return ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.5, distill=distill, temperature=2.0,
                              backend="triton", validate=False).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    gate = torch.tensor(True)
    assert torch.equal(compiled(z_l, z_w, z_s, gate), step(z_l, z_w, z_s, gate))


# ---------------------------------------------------------------------------------------------
# GPU tests (normal process, real Triton kernels on CUDA)
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [
    (512, 1024, 8192, torch.bfloat16),     # large-c, fused 4096 < C: column loop
    (512, 1024, 8192, torch.float32),
    (64, 128, 32768, torch.float32),       # column loop, 16 blocks
    (4096, 8192, 1000, torch.bfloat16),    # 16-byte rows, 1024 block
    (4096, 8192, 1000, torch.float32),
    (1024, 2048, 127, torch.bfloat16),     # unaligned rows
    (777, 1001, 100, torch.float16),
    (256, 512, 4096, torch.float32),       # largest fused block
    (100, 200, 3000, torch.float64),
]


@pytest.mark.parametrize("case", GPU_SHAPES,
                         ids=lambda s: f"B{s[0]}-N{s[1]}-C{s[2]}-{FLOAT_IDS[s[3]]}")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.gpu
def test_gpu_matches_reference(case, temperature):
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels  # noqa: F401
    from adello_kernels.ops import flexda_triton  # noqa: F401
    b, n, c, dtype = case
    args = make_case(b, n, c, dtype, seed=c, device="cuda")
    hp = hparams(1.0, 1.0, 1.0, temperature, dtype, device="cuda")
    tau = 0.9
    out = run_op(args, hp, tau)
    ref = reference(args, hp, tau)
    amb = ambiguous_rows(args[2], tau)
    keep = ~amb
    assert torch.equal(out[2][keep].cpu(), ref[2].float()[keep].to(out[2].dtype).cpu())
    assert torch.equal(out[3][keep].cpu(), ref[3][keep].cpu())
    if not amb.any():
        assert_close_loss(out[0], ref[0], dtype, "loss")
        for k in range(3):
            assert_close_loss(out[1][k], ref[1][k], dtype, f"terms[{k}]")
        assert_close_grad(out[5], ref[5], dtype, "grad_lb")
        assert_close_grad(out[6], ref[6], dtype, "grad_ulb_s")
    assert (out[4].double() - ref[4]).abs().max().item() <= 1e-6


GPU_STEP_SHAPES = [
    (4096, 8192, 1000, torch.float32, 2.0),    # the bandwidth configuration: 2 rows a tile
    (4096, 8192, 1000, torch.bfloat16, 1.0),
    (1024, 2048, 127, torch.bfloat16, 2.0),    # unaligned rows
    (512, 1024, 8192, torch.float32, 1.5),     # column loop
    (100, 200, 3000, torch.float64, 1.0),
]


@pytest.mark.parametrize("case", GPU_STEP_SHAPES, ids=_step_id)
@pytest.mark.gpu
def test_gpu_step_trajectory_matches_reference(case):
    """flexda_step_triton on CUDA over three steps of a mutating state (gate flip included)
    against the float64 reference, at the grid the launcher sizes from the device's occupancy."""
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels  # noqa: F401
    from adello_kernels.ops import flexda_triton as ft
    b, n, c, dtype, temperature = case
    _trajectory(ft, b, n, c, dtype, temperature, steps=3, seed=c, device="cuda")


GPU_EM_SHAPES = [
    (4096, 8192, 1000, torch.float32, 2.0),    # the bandwidth configuration
    (1024, 2048, 127, torch.bfloat16, 1.0),    # unaligned rows
    (512, 1024, 8192, torch.bfloat16, 1.5),    # column loop
    (100, 200, 3000, torch.float64, 1.0),
]


@pytest.mark.parametrize("case", GPU_EM_SHAPES, ids=_step_id)
@pytest.mark.gpu
def test_gpu_prior_em_matches_reference(case):
    """The EM batch prior on CUDA: flexda_fwd_triton with hparams[HP_PRIOR_EM] = 1 (the runtime
    branch of the one fwd kernel) against the reference, and flexda_step_triton with
    prior_em=True (its PRIOR_EM specialisation) over three steps of a mutating state."""
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels  # noqa: F401
    from adello_kernels.ops import flexda_triton as ft
    b, n, c, dtype, temperature = case
    args = make_case(b, n, c, dtype, seed=c + 1, device="cuda")
    hp = hparams(1.0, 1.0, 1.0, temperature, dtype, device="cuda", prior_em=True)
    out, ref = run_op(args, hp, 0.9), reference(args, hp, 0.9)
    assert (out[4].double().cpu() - ref[4].cpu()).abs().max().item() <= 1e-6
    raw = run_op(args, hparams(1.0, 1.0, 1.0, temperature, dtype, device="cuda"), 0.9)
    assert (out[4] - raw[4]).abs().max().item() > 1e-4, "em and raw priors should differ"
    for k in (2, 3):
        assert torch.equal(out[k], raw[k])
    _trajectory(ft, b, n, c, dtype, temperature, steps=3, seed=c, device="cuda", prior_em=True,
                total_steps=4)


def _gpu_step_inputs(b=256, n=512, c=127, dtype=torch.bfloat16, seed=0):
    z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=seed, device="cuda")
    return z_l, y, z_w, z_s


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_of_a_step():
    """A full ADELLOLoss step (forward, backward, prior update) on the triton backend captures
    into a CUDA graph, and replays match eager steps from the same state."""
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels as ak
    c = 127
    p_l = torch.softmax(torch.randn(c, device="cuda"), 0)
    kw = dict(distill_start=3, backend="triton", validate=False, temperature=2.0)
    crit_g = ak.ADELLOLoss(p_l, 100, **kw)
    crit_e = ak.ADELLOLoss(p_l, 100, **kw)
    z_l, y, z_w, z_s = _gpu_step_inputs(c=c)
    s_l = z_l.clone().requires_grad_()
    s_s = z_s.clone().requires_grad_()
    s_y, s_w = y.clone(), z_w.clone()

    def step():
        out = crit_g(s_l, s_y, s_w, s_s)
        out.loss.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # warm up: compiles the kernels, fills the caches
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    crit_g.load_state_dict(crit_e.state_dict())          # back to the initial state
    s_l.grad = s_s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    crit_g.load_state_dict(crit_e.state_dict())

    for k in range(5):                      # crosses distill_start: the gate is device data
        z_l, y, z_w, z_s = _gpu_step_inputs(c=c, seed=k + 1)
        s_l.data.copy_(z_l)
        s_s.data.copy_(z_s)
        s_y.copy_(y)
        s_w.copy_(z_w)
        graph.replay()
        e_l, e_s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        ref = crit_e(e_l, y, z_w, e_s)
        ref.loss.backward()
        torch.testing.assert_close(static_out.loss, ref.loss)
        torch.testing.assert_close(static_out.loss_distill, ref.loss_distill)
        torch.testing.assert_close(s_l.grad, e_l.grad)
        torch.testing.assert_close(s_s.grad, e_s.grad)
        torch.testing.assert_close(crit_g.prior_ulb, crit_e.prior_ulb)
        assert torch.equal(crit_g.step, crit_e.step)


@pytest.mark.gpu
def test_gpu_step_has_no_host_sync():
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: a training step
    (ADELLOLoss(validate=False), forward + backward + prior update) must not make one."""
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels as ak
    c = 127
    p_l = torch.softmax(torch.randn(c, device="cuda"), 0)
    crit = ak.ADELLOLoss(p_l, 100, backend="triton", validate=False, temperature="imbalance_aware")
    z_l, y, z_w, z_s = _gpu_step_inputs(c=c)
    z_l.requires_grad_()
    z_s.requires_grad_()
    from utils import step_without_host_sync
    out = step_without_host_sync(crit, z_l, y, z_w, z_s)
    assert torch.isfinite(out.loss)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    if INTERPRETED or not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and compiled (not interpreted) Triton kernels")
    import adello_kernels as ak
    c = 127
    z_l, y, z_w, z_s = _gpu_step_inputs(c=c, dtype=torch.float32)
    p_l = torch.softmax(torch.randn(c, device="cuda"), 0)
    q = torch.full((c,), 1.0 / c, device="cuda")

    def step(z_l, z_w, z_s):
        return ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.5, backend="triton",
                              validate=False).loss

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(z_l, z_w, z_s), step(z_l, z_w, z_s))


# ---- per-row prior weights (prior_weight: the released lb_in_ulb_mask) ----------------------

def _weights(n, kind, dtype, seed):
    """[N] prior weights in the acc dtype of `dtype`: 'binary' random 0/1 (at least one of
    each when N > 1), 'positive' random in [0.05, 2.05), 'zeros' all 0."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(n, dtype=acc)
    if kind == "binary":
        w = (torch.rand(n, generator=g) < 0.6).to(acc)
        w[0] = 0.0
        if n > 1:
            w[1] = 1.0
        return w
    return (torch.rand(n, generator=g, dtype=torch.float64) * 2.0 + 0.05).to(acc)


def run_op_w(args, hp, tau, w):
    z_l, y, z_w, z_s, ds, du = args
    return torch.ops.adello.flexda_fwd_triton(z_l, y, z_w, z_s, ds, du, hp, tau, w)


def reference_w(args, hp, tau, w):
    from adello_kernels.reference import flexda_fwd_reference
    z_l, y, z_w, z_s, ds, du = args
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), tau, prior_weight=w.double())


def _same(x, y):
    """Bitwise equal, NaN in the same places counting as equal."""
    if x.is_floating_point():
        return (torch.equal(torch.isnan(x), torch.isnan(y))
                and torch.equal(torch.nan_to_num(x, nan=0.0), torch.nan_to_num(y, nan=0.0)))
    return torch.equal(x, y)


def _assert_same_but_prior(a, b, what):
    k_prior = len(a) - 3        # prior_batch: 4 of the fwd's 7 outputs, 6 of the step's 9
    for k, (x, y) in enumerate(zip(a, b)):
        if k != k_prior:
            assert _same(x, y), f"{what}: output {k} depends on the prior weights"


# (B, N, C, dtype, T, regime): packed rows, the column loop at small C (three 128-column
# blocks), fp64's own column loop (two 512-column blocks) and the real large-C loop (C = 4097).
W_CASES = [
    (37, 45, 100, torch.float32, 1.0, "fused"),
    (11, 13, 300, torch.float32, 2.0, "loop"),
    (13, 15, 700, torch.float64, 1.5, "native"),
    (3, 6, 4097, torch.float32, 1.0, "native"),
]


@interp
@pytest.mark.parametrize("kind", ["binary", "positive"])
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("case", W_CASES, ids=_em_id)
def test_prior_weight_fwd_gives_the_weighted_mean_not_the_plain_one(ft, monkeypatch, case,
                                                                     prior_em, kind):
    """flexda_fwd_triton(..., prior_weight=w): prior_batch = sum_{w_i > 0} w_i p_i / W against
    the float64 reference (raw and EM rows, both regimes, fp32 and fp64); every other output
    bitwise the unweighted call's (the losses and gradients do not depend on w), the prior
    clearly not the unweighted mean (weights ignored would pass the rest), and two weighted
    runs bitwise equal (W summed by the finalize kernel in a fixed order)."""
    b, n, c, dtype, t, regime = case
    _set_regime(ft, monkeypatch, regime)
    assert ft.kernel_config(c, dtype).loop_c == (regime != "fused")
    args = make_case(b, n, c, dtype, seed=c + 1)
    hp = hparams(1.1, 0.8, 1.0, t, dtype, prior_em=prior_em)
    w = _weights(n, kind, dtype, seed=c + n)
    out = run_op_w(args, hp, 0.9, w)
    ref = reference_w(args, hp, 0.9, w)
    assert_matches(out, ref, args, 0.9, dtype, both_masks=False)
    if dtype == torch.float64:
        err = (out[4] - ref[4]).abs().max().item()
        assert err <= 1e-12, f"fp64 weighted prior off by {err:.3g} (W not accumulated in fp64?)"
    plain = run_op(args, hp, 0.9)
    _assert_only_prior_differs(out, plain, "weighted fwd", min_diff=1e-5)
    again = run_op_w(args, hp, 0.9, w)
    for x, y_ in zip(out, again):
        assert torch.equal(x, y_)


@interp
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64"])
def test_prior_weight_zero_keeps_a_non_finite_weak_row_out_of_the_prior(ft, monkeypatch, regime,
                                                                        prior_em, bad):
    """A weak row with a NaN/inf logit has a NaN prior row. With weight 0 it must add nothing
    (masked, not multiplied by 0: 0 * NaN = NaN): prior_batch finite and the reference's. With
    weight 1 the NaN reaches every column, as without weights. The other outputs are the
    unweighted call's either way."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = torch.float64 if regime == "fp64" else torch.float32
    args = list(make_case(6, 8, c, dtype, seed=5))
    args[2] = args[2].clone()
    args[2][3, 7] = bad
    args = tuple(args)
    hp = hparams(1.0, 1.0, 1.0, 2.0, dtype, prior_em=prior_em)
    w = _weights(8, "positive", dtype, seed=9)
    w[3] = 0.0
    out = run_op_w(args, hp, 0.9, w)
    ref = reference_w(args, hp, 0.9, w)
    assert torch.isfinite(ref[4]).all()
    assert torch.isfinite(out[4]).all(), "a weight-0 NaN row leaked into prior_batch"
    assert (out[4].double() - ref[4]).abs().max().item() <= 1e-6
    w[3] = 1.0
    out1 = run_op_w(args, hp, 0.9, w)
    assert torch.isnan(out1[4]).all() and torch.isnan(reference_w(args, hp, 0.9, w)[4]).all()
    plain = run_op(args, hp, 0.9)
    _assert_same_but_prior(out, plain, "weight 0")
    _assert_same_but_prior(out1, plain, "weight 1")


@interp
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64"])
def test_prior_weight_all_zero_gives_nan_prior_not_zero(ft, monkeypatch, regime, prior_em):
    """Every weight 0: W = 0, no estimate, prior_batch all NaN (as the reference: 0 / 0), not the
    0 of the empty partial sums nor the unweighted mean; the other outputs unchanged."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = torch.float64 if regime == "fp64" else torch.float32
    args = make_case(7, 9, c, dtype, seed=23)
    hp = hparams(1.0, 1.0, 1.0, 2.0, dtype, prior_em=prior_em)
    w = _weights(9, "zeros", dtype, seed=0)
    out = run_op_w(args, hp, 0.9, w)
    assert torch.isnan(out[4]).all()
    assert torch.isnan(reference_w(args, hp, 0.9, w)[4]).all()
    _assert_same_but_prior(out, run_op(args, hp, 0.9), "all-zero weights")


@interp
def test_prior_weight_is_converted_not_misread(ft):
    """The launcher reads the weights as contiguous acc-dtype values: a strided view, or fp64
    weights with fp32 logits, give the contiguous fp32 weights' result (a raw pointer read of
    the strided or fp64 storage would not); a wrong shape is refused."""
    args = make_case(9, 11, 40, torch.float32, seed=17)
    hp = hparams(1.1, 0.9, 1.0, 2.0, torch.float32)
    w = _weights(11, "positive", torch.float32, seed=3)
    want = run_op_w(args, hp, 0.9, w)
    strided = torch.zeros(22)
    strided[::2] = w
    for given in (strided[::2], w.double()):
        got = run_op_w(args, hp, 0.9, given)
        for x, y_ in zip(got, want):
            assert torch.equal(x, y_)
    with pytest.raises(ValueError, match="prior_weight"):
        run_op_w(args, hp, 0.9, w[:10])


def _opcheck_step_args(ft, step: int, *tail):
    """flexda_step_triton's arguments for an opcheck at C = 20, N = 6 (step counter `step`),
    the schema's trailing arguments after update=True, prior_em=False, no target, n = 1:
    `tail` (prior_weight[, distill_all])."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft, c=20)
    q, t, k = _step_state(20, 19, t=step)
    kw = STEP_KW
    return (z_l[:, :20].contiguous(), y % 20, z_w[:6, :20].contiguous(),
            z_s[:6, :20].contiguous(), p_l[:20] / p_l[:20].sum(), q[:20] / q[:20].sum(), t,
            k, torch.tensor(1.5),
            kw["total_steps"], kw["alpha_min"], kw["power"], kw["distill_start"],
            kw["lambda_u"], kw["lambda_d"], kw["eps"], True, kw["threshold"],
            kw["prior_momentum"], True, False, None, 1, *tail)


@interp
def test_prior_weight_opcheck(ft):
    """Schema, fake and autograd registration of both ops with prior_weight given."""
    args = make_case(5, 6, 20, torch.float32, seed=1)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    w = _weights(6, "binary", torch.float32, seed=2)
    torch.library.opcheck(torch.ops.adello.flexda_fwd_triton, (*args, hp, 0.9, w),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    step_args = _opcheck_step_args(ft, 0, w)
    torch.library.opcheck(torch.ops.adello.flexda_step_triton, step_args,
                          test_utils=("test_schema", "test_faketensor"))


def run_step_w(ft, args, p_l, state, temperature, w, fn=None, **over):
    """run_step with every trailing argument given: prior_em, prior_target=None,
    alpha_epoch_steps=1, prior_weight=w, distill_all."""
    kw = {**STEP_KW, **over}
    z_l, y, z_w, z_s = args
    q, t, k = state
    fn = fn or ft.flexda_step_triton
    return fn(z_l, y, z_w, z_s, p_l, q, t, k, temperature, kw["total_steps"], kw["alpha_min"],
              kw["power"], kw["distill_start"], kw["lambda_u"], kw["lambda_d"], kw["eps"],
              kw["flexda"], kw["threshold"], kw["prior_momentum"], kw["update"],
              kw["prior_em"], None, 1, w, kw["distill_all"])


def step_reference_w(args, p_l, q, t, temperature, w, **over):
    """step_reference with the weighted batch prior: the float64 rows, then momentum_update
    of fp32 Q with that prior."""
    from adello_kernels.ops.state import momentum_update
    from adello_kernels.reference import alpha_schedule, flexda_fwd_reference, logit_adjustments
    kw = {**STEP_KW, **over}
    z_l, y, z_w, z_s = args
    alpha = alpha_schedule(int(t), kw["total_steps"], kw["alpha_min"], kw["power"])
    ds, du = logit_adjustments(p_l, q, alpha, kw["eps"], dtype=torch.float64)
    gate = float(int(t) >= kw["distill_start"])
    hp = hparams(kw["lambda_u"], kw["lambda_d"], gate, float(temperature), torch.float64,
                 prior_em=kw["prior_em"])
    ref = flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds, du, hp,
                               kw["threshold"], prior_weight=w.double(),
                               distill_all=kw["distill_all"])
    q_new, ok = momentum_update(q, ref[4].float(), kw["prior_momentum"])
    return ref, q_new, bool(ok)


# (B, N, C, dtype, T, regime, seed): the seeds of the unweighted step tests' data (no row at the
# tau / tie boundary in any of the three steps).
W_STEP_CASES = [
    (37, 45, 100, torch.float32, 2.5, "fused", 137),
    (11, 13, 300, torch.float32, 2.0, "loop", 5),
    (13, 15, 70, torch.float64, 1.5, "native", 83),
]


@interp
@pytest.mark.parametrize("kind", ["binary", "positive"])
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("case", W_STEP_CASES, ids=lambda s: f"C{s[2]}-{FLOAT_IDS[s[3]]}-{s[5]}")
def test_step_prior_weight_trajectory_updates_q_with_the_weighted_prior(ft, monkeypatch, case,
                                                                       prior_em, kind):
    """Three steps on one mutating state with new weights each step, against the float64
    reference run alongside (weighted prior, then the momentum update): outputs, Q, step,
    skipped_updates. On the first step the unweighted step from the same state gives the same
    outputs but prior_batch and a different Q (the weighted prior reaches the epilogue)."""
    b, n, c, dtype, temperature, regime, seed = case
    _set_regime(ft, monkeypatch, regime)
    assert ft.kernel_config(c, dtype).loop_c == (regime != "fused")
    p_l, _ = _priors(c, seed + 50)
    state = _step_state(c, seed + 51)
    q_ref = state[0].clone()
    temp = torch.tensor(temperature)
    for k in range(3):
        z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=seed + 7 * k)
        args = (z_l, y, z_w, z_s)
        w = _weights(n, kind, dtype, seed=seed + k)
        t_before = int(state[1])
        ref, q_next, ok = step_reference_w(args, p_l, q_ref, t_before, temperature, w,
                                           prior_em=prior_em)
        plain_state = tuple(x.clone() for x in state)
        out = run_step_w(ft, args, p_l, state, temp, w, prior_em=prior_em)
        assert_step_matches(out, ref, args, STEP_KW["threshold"], dtype, f"step {k}")
        assert ok and int(state[1]) == t_before + 1 and int(state[2]) == 0
        q_ref = q_next
        err = (state[0].double() - q_ref.double()).abs().max().item()
        assert err <= 1e-6, f"step {k}: prior_ulb trajectory off by {err:.3g}"
        if k == 0:
            plain = run_step(ft, args, p_l, plain_state, temp, prior_em=prior_em)
            _assert_only_prior_differs(out, plain, "weighted step", min_diff=1e-5)
            assert not torch.equal(plain_state[0], state[0])


@interp
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64"])
def test_step_all_zero_weights_keep_q_and_count_no_skip(ft, monkeypatch, regime, prior_em):
    """Every weight 0 (no row to estimate from): prior_batch NaN, Q bitwise unchanged,
    skipped_updates unchanged (not counted as a non-finite skip), step + 1; the other outputs
    are the unweighted step's. Then a NaN weak row still counts a skip when its weight is 1,
    and is left out (Q updated as the reference) when its weight is 0."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = torch.float64 if regime == "fp64" else torch.float32
    p_l, _ = _priors(c, 6)
    q0, _, _ = _step_state(c, 7)
    state = (q0, torch.tensor(5, dtype=torch.int64), torch.tensor(2, dtype=torch.int64))
    temp = torch.tensor(1.0)
    z_l, y, z_w, z_s, _, _ = make_case(8, 10, c, dtype, seed=40)
    args = (z_l, y, z_w, z_s)
    plain_state = tuple(x.clone() for x in state)
    q_before = state[0].clone()
    out = run_step_w(ft, args, p_l, state, temp, _weights(10, "zeros", dtype, 0),
                     prior_em=prior_em)
    assert torch.isnan(out[6]).all()
    assert torch.equal(state[0], q_before), "W = 0 must leave Q as it is"
    assert int(state[2]) == 2, "W = 0 is no estimate, not a non-finite skip"
    assert int(state[1]) == 6
    plain = run_step(ft, args, p_l, plain_state, temp, prior_em=prior_em)
    _assert_same_but_prior(out, plain, "all-zero weights step")

    z_w = z_w.clone()
    z_w[3, 7] = float("nan")
    w = _weights(10, "binary", dtype, seed=11)
    w[3] = 1.0
    run_step_w(ft, (z_l, y, z_w, z_s), p_l, state, temp, w, prior_em=prior_em)
    assert torch.equal(state[0], q_before) and int(state[2]) == 3 and int(state[1]) == 7
    w[3] = 0.0
    ref, q_next, ok = step_reference_w((z_l, y, z_w, z_s), p_l, q_before, 7, 1.0, w,
                                       prior_em=prior_em)
    out = run_step_w(ft, (z_l, y, z_w, z_s), p_l, state, temp, w, prior_em=prior_em)
    assert ok and torch.isfinite(out[6]).all()
    assert int(state[2]) == 3 and int(state[1]) == 8
    assert (state[0] - q_next).abs().max() <= 1e-7


@interp
def test_step_prior_weight_backward_has_a_slot_per_argument(ft):
    """flexda_step_triton(..., prior_weight=w) and the direct op call (its Autograd kernel):
    the backward returns one gradient slot per forward argument and the gradients are the
    unweighted step's, bit for bit; the fwd op's autograd with prior_weight too."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    w = _weights(z_w.shape[0], "binary", torch.float32, seed=4)
    grads = []
    for fn, weight in ((ft.flexda_step_triton, None), (ft.flexda_step_triton, w),
                       (torch.ops.adello.flexda_step_triton, w)):
        zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        state = _step_state(100, 15)
        kw = STEP_KW
        out = fn(zl, y, z_w, zs, p_l, *state, torch.tensor(2.0), kw["total_steps"],
                 kw["alpha_min"], kw["power"], kw["distill_start"], kw["lambda_u"],
                 kw["lambda_d"], kw["eps"], kw["flexda"], kw["threshold"],
                 kw["prior_momentum"], kw["update"], prior_weight=weight)
        (out[0] * 1.5).backward()
        grads.append((out[0].detach(), zl.grad, zs.grad))
    for other in grads[1:]:
        for x, y_ in zip(grads[0], other):
            assert torch.equal(x, y_)
    args = make_case(12, 16, 100, torch.float32, seed=71)
    zl, zs = args[0].clone().requires_grad_(), args[3].clone().requires_grad_()
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    out = torch.ops.adello.flexda_fwd_triton(zl, args[1], args[2], zs, args[4], args[5], hp, 0.9,
                                             w)
    out[0].backward()
    assert torch.equal(zl.grad, out[5]) and torch.equal(zs.grad, out[6])


# ---- distill_all: every row distils (the released distill_all) ------------------------------

def run_op_da(args, hp, tau, w=None, distill_all=True):
    z_l, y, z_w, z_s, ds, du = args
    return torch.ops.adello.flexda_fwd_triton(z_l, y, z_w, z_s, ds, du, hp, tau, w, distill_all)


def reference_da(args, hp, tau, w=None):
    from adello_kernels.reference import flexda_fwd_reference
    z_l, y, z_w, z_s, ds, du = args
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), tau,
                                prior_weight=None if w is None else w.double(), distill_all=True)


def _assert_distill_all_only_adds_rows(da, plain, what):
    """distill_all against the plain call on the same inputs, gate on: the weak-view outputs,
    L_s, L_u and grad_lb bitwise equal; the gradient rows of M = 0 rows bitwise equal (their
    distillation factor 1 - M = 1 is exact); L_d larger by the M = 1 rows' H > 0, and their
    gradient rows changed."""
    loss, terms, mask, plab, prior, g_l, g_s = da
    for k in (2, 3, 4, 5):
        assert _same(da[k], plain[k]), f"{what}: output {k} depends on distill_all"
    assert _same(terms[:2], plain[1][:2]), f"{what}: L_s / L_u depend on distill_all"
    low = mask == 0
    assert _same(g_s[low], plain[6][low]), f"{what}: an M = 0 row's gradient changed"
    if bool((mask == 1).any()):
        assert float(terms[2]) > float(plain[1][2]), f"{what}: M = 1 rows add no L_d"
        assert not torch.equal(g_s[~low], plain[6][~low]), f"{what}: M = 1 rows not distilled"


# (B, N, C, dtype, T, regime, tau, seed): the data of the tests above (no row at the tau / tie
# boundary), every tier: packed rows (16 a tile at C = 100, 2 at C = 1000), the column loop at
# small C (three 128-column blocks), fp64's own loop, the real large-C loop (C = 4097); T == 1
# (one exp pass shared) and T != 1 (the second pass at 1/T).
DA_CASES = [
    (37, 45, 100, torch.float32, 1.0, "fused", 0.9, 137),
    (37, 45, 100, torch.float32, 2.5, "fused", 0.9, 137),
    (21, 34, 127, torch.bfloat16, 1.0, "fused", 0.95, 148),
    (21, 34, 200, torch.float16, 0.5, "fused", 0.9, 221),
    (5, 7, 1000, torch.float32, 1.0, "fused", 0.6, 1005),
    (11, 13, 300, torch.float32, 1.0, "loop", 0.9, 300),
    (11, 13, 300, torch.float32, 2.0, "loop", 0.9, 300),
    (9, 10, 260, torch.bfloat16, 1.5, "loop", 0.9, 260),
    (13, 15, 700, torch.float64, 1.5, "native", 0.9, 3),
    (13, 15, 700, torch.float64, 1.0, "native", 0.9, 3),
    (3, 6, 4097, torch.float32, 1.0, "native", 0.9, 4098),
    (3, 6, 4097, torch.float32, 2.0, "native", 0.9, 4098),
]


def _da_id(case):
    b, n, c, dtype, t, regime, tau, seed = case
    return f"B{b}-N{n}-C{c}-{FLOAT_IDS[dtype]}-T{t}-{regime}"


@interp
@pytest.mark.parametrize("case", DA_CASES, ids=_da_id)
def test_distill_all_fwd_matches_reference(ft, monkeypatch, case):
    """flexda_fwd_triton(..., distill_all=True), gate on: every row has the distillation term
    and its gradient, M = 1 rows both terms; against the float64 reference, and against the
    plain call (only L_d, loss and the M = 1 rows' gradients change)."""
    b, n, c, dtype, t, regime, tau, seed = case
    _set_regime(ft, monkeypatch, regime)
    assert ft.kernel_config(c, dtype).loop_c == (regime != "fused")
    args = make_case(b, n, c, dtype, seed=seed)
    hp = hparams(1.3, 0.7, 1.0, t, dtype)
    out = run_op_da(args, hp, tau)
    ref = reference_da(args, hp, tau)
    assert_matches(out, ref, args, tau, dtype, both_masks=False)
    if dtype == torch.float64:
        assert abs(float(out[1][2]) - float(ref[1][2])) <= 1e-12 * abs(float(ref[1][2]))
    _assert_distill_all_only_adds_rows(out, run_op(args, hp, tau), "fwd")
    again = run_op_da(args, hp, tau)
    for x, y_ in zip(out, again):
        assert torch.equal(x, y_)


@interp
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64", "bf16"])
def test_distill_all_with_every_row_confident(ft, monkeypatch, regime, temperature):
    """Every weak row confident (M = 1): the plain call distils nothing (L_d exactly 0), the
    distill_all call distils every row (L_d and the gradient the reference's)."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(regime, torch.float32)
    args = make_case(9, 12, c, dtype, confident=1.0, seed=31)
    hp = hparams(1.0, 1.2, 1.0, temperature, dtype)
    out = run_op_da(args, hp, 0.5)
    ref = reference_da(args, hp, 0.5)
    assert bool((out[2] == 1).all()) and bool((ref[2] == 1).all()), "every row should be M = 1"
    assert_matches(out, ref, args, 0.5, dtype, both_masks=False)
    plain = run_op(args, hp, 0.5)
    assert float(plain[1][2]) == 0.0 and float(out[1][2]) > 0.0
    _assert_distill_all_only_adds_rows(out, plain, "all confident")


@interp
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64"])
def test_distill_all_with_the_gate_off_changes_nothing(ft, monkeypatch, regime, temperature):
    """Gate off (hparams gate 0): no row distils whatever distill_all says; the seven outputs
    bitwise the plain call's, L_d exactly 0."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = torch.float64 if regime == "fp64" else torch.float32
    args = make_case(10, 14, c, dtype, seed=12)
    hp = hparams(1.1, 0.9, 0.0, temperature, dtype)
    out = run_op_da(args, hp, 0.9)
    assert float(out[1][2]) == 0.0
    for k, (x, y_) in enumerate(zip(out, run_op(args, hp, 0.9))):
        assert _same(x, y_), f"output {k}"
    explicit = run_op_da(args, hparams(1.1, 0.9, 1.0, temperature, dtype), 0.9,
                         distill_all=False)
    for x, y_ in zip(explicit, run_op(args, hparams(1.1, 0.9, 1.0, temperature, dtype), 0.9)):
        assert _same(x, y_), "distill_all=False given is not the default"


@interp
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("regime", ["fused", "loop", "fp64"])
def test_distill_all_non_finite_strong_row_of_a_confident_row(ft, monkeypatch, regime,
                                                              temperature, bad):
    """A NaN/inf strong logit on an M = 1 row with distill_all: L_u and L_d NaN (the row has
    both terms), that gradient row NaN; the other rows' gradients and the weak-view outputs
    finite and the reference's."""
    _set_regime(ft, monkeypatch, "loop" if regime == "loop" else "fused")
    c = 300 if regime == "loop" else 100
    dtype = torch.float64 if regime == "fp64" else torch.float32
    args = list(make_case(6, 9, c, dtype, confident=1.0, seed=44))
    args[3] = args[3].clone()
    args[3][4, 11] = bad
    args = tuple(args)
    hp = hparams(1.0, 1.0, 1.0, temperature, dtype)
    out = run_op_da(args, hp, 0.5)
    ref = reference_da(args, hp, 0.5)
    assert float(out[2][4]) == 1.0
    assert torch.isnan(out[1][1:]).all() and torch.isnan(out[0]), "L_u and L_d must be NaN"
    assert torch.isnan(ref[1][1:]).all()
    assert torch.isnan(out[6][4]).all(), "the bad row's gradient must be NaN"
    keep = torch.arange(9) != 4
    assert torch.isfinite(out[6][keep]).all()
    assert_close_grad(out[6][keep], ref[6][keep], dtype, "other rows' grad_ulb_s")
    assert torch.equal(out[2], ref[2].to(out[2].dtype)) and torch.equal(out[3], ref[3])
    assert (out[4].double() - ref[4]).abs().max().item() <= 1e-6
    assert_close_grad(out[5], ref[5], dtype, "grad_lb")


@interp
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("case", [DA_CASES[1], DA_CASES[6], DA_CASES[8], DA_CASES[10]],
                         ids=_da_id)
def test_distill_all_with_prior_weights(ft, monkeypatch, case, prior_em):
    """distill_all and prior_weight together (both specialisations): against the reference;
    prior_batch bitwise the weighted plain call's, everything else the unweighted distill_all
    call's."""
    b, n, c, dtype, t, regime, tau, seed = case
    _set_regime(ft, monkeypatch, regime)
    args = make_case(b, n, c, dtype, seed=seed)
    hp = hparams(1.3, 0.7, 1.0, t, dtype, prior_em=prior_em)
    w = _weights(n, "positive", dtype, seed=seed + 1)
    out = run_op_da(args, hp, tau, w)
    assert_matches(out, reference_da(args, hp, tau, w), args, tau, dtype, both_masks=False)
    assert _same(out[4], run_op_w(args, hp, tau, w)[4])
    _assert_same_but_prior(out, run_op_da(args, hp, tau), "weighted distill_all")


@interp
def test_distill_all_opcheck(ft):
    """Schema and fake of both ops with distill_all=True given."""
    args = make_case(5, 6, 20, torch.float32, seed=1)
    hp = hparams(1.0, 1.0, 1.0, 2.0, torch.float32)
    torch.library.opcheck(torch.ops.adello.flexda_fwd_triton, (*args, hp, 0.9, None, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    step_args = _opcheck_step_args(ft, 3, None, True)
    torch.library.opcheck(torch.ops.adello.flexda_step_triton, step_args,
                          test_utils=("test_schema", "test_faketensor"))


# (B, N, C, dtype, T, regime, seed): the step tests' data; distill_start = 2, so the gate turns
# on at the third of four steps.
DA_STEP_CASES = [
    (37, 45, 100, torch.float32, 1.0, "fused", 137),
    (21, 34, 127, torch.bfloat16, 2.0, "fused", 148),
    (11, 13, 300, torch.float32, 2.0, "loop", 5),
    (13, 15, 70, torch.float64, 1.5, "native", 83),
]


@interp
@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("case", DA_STEP_CASES, ids=lambda s: f"C{s[2]}-{FLOAT_IDS[s[3]]}-"
                         f"T{s[4]}-{s[5]}")
def test_step_distill_all_trajectory(ft, monkeypatch, case, prior_em):
    """flexda_step_triton(..., distill_all=True) over four steps (gate off, off, on, on) against
    the float64 reference run alongside; and beside it the plain step on its own copy of the
    state: the states stay bitwise equal (the prior does not depend on distill_all), the
    outputs bitwise equal while the gate is off, and once it is on only L_d, loss and the
    M = 1 rows' gradients differ."""
    b, n, c, dtype, temperature, regime, seed = case
    _set_regime(ft, monkeypatch, regime)
    steps = 3 if regime == "loop" else 4
    _trajectory(ft, b, n, c, dtype, temperature, steps=steps, seed=seed, distill_all=True,
                prior_em=prior_em)
    p_l, _ = _priors(c, seed + 50)
    s_da = _step_state(c, seed + 51)
    s_plain = tuple(x.clone() for x in s_da)
    temp = torch.tensor(temperature)
    for k in range(steps):
        z_l, y, z_w, z_s, _, _ = make_case(b, n, c, dtype, seed=seed + 7 * k)
        args = (z_l, y, z_w, z_s)
        gate_on = int(s_da[1]) >= STEP_KW["distill_start"]
        da = run_step(ft, args, p_l, s_da, temp, distill_all=True, prior_em=prior_em)
        plain = run_step(ft, args, p_l, s_plain, temp, prior_em=prior_em)
        for x, y_ in zip(s_da, s_plain):
            assert torch.equal(x, y_), f"step {k}: the state depends on distill_all"
        if not gate_on:
            for j, (x, y_) in enumerate(zip(da, plain)):
                assert _same(x, y_), f"step {k} (gate off): output {j}"
        else:
            fwd_like = (da[0], torch.stack(da[1:4]), *da[4:])
            plain_like = (plain[0], torch.stack(plain[1:4]), *plain[4:])
            _assert_distill_all_only_adds_rows(fwd_like, plain_like, f"step {k}")


@interp
@pytest.mark.parametrize("regime", ["fused", "loop"])
def test_step_distill_all_with_prior_weights(ft, monkeypatch, regime):
    """The step with prior weights and distill_all (gate on): the reference's outputs and Q."""
    _set_regime(ft, monkeypatch, regime)
    b, n, c, seed = (37, 45, 100, 137) if regime == "fused" else (11, 13, 300, 5)
    p_l, _ = _priors(c, seed + 50)
    state = _step_state(c, seed + 51, t=3)
    z_l, y, z_w, z_s, _, _ = make_case(b, n, c, torch.float32, seed=seed)
    args = (z_l, y, z_w, z_s)
    w = _weights(n, "binary", torch.float32, seed=seed)
    ref, q_next, ok = step_reference_w(args, p_l, state[0].clone(), 3, 2.0, w, distill_all=True)
    out = run_step_w(ft, args, p_l, state, torch.tensor(2.0), w, distill_all=True)
    assert_step_matches(out, ref, args, STEP_KW["threshold"], torch.float32, "weighted dall")
    assert ok and int(state[1]) == 4 and int(state[2]) == 0
    assert (state[0].double() - q_next.double()).abs().max().item() <= 1e-6


@interp
def test_step_distill_all_backward(ft):
    """distill_all through the autograd Function and the op's Autograd kernel (25 forward
    arguments): the input gradients are the forward's saved ones scaled, the same for both."""
    p_l, (z_l, y, z_w, z_s) = _grad_case(ft)
    grads = []
    for fn in (ft.flexda_step_triton, torch.ops.adello.flexda_step_triton):
        zl, zs = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        state = _step_state(100, 15, t=5)
        kw = STEP_KW
        out = fn(zl, y, z_w, zs, p_l, *state, torch.tensor(2.0), kw["total_steps"],
                 kw["alpha_min"], kw["power"], kw["distill_start"], kw["lambda_u"],
                 kw["lambda_d"], kw["eps"], kw["flexda"], kw["threshold"],
                 kw["prior_momentum"], kw["update"], distill_all=True)
        want_s = out[8].detach().clone() * 1.5
        (out[0] * 1.5).backward()
        assert torch.equal(zs.grad, want_s)
        grads.append((out[0].detach(), zl.grad, zs.grad))
    for x, y_ in zip(grads[0], grads[1]):
        assert torch.equal(x, y_)
