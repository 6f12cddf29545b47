"""The fused CUDA kernels (csrc/cuda/): `adello::flexda_fwd`, `adello::flexda_step` (one training
step: prologue from the state, fused rows, reduce, prior update) and `adello::scale_grads_`.

GPU tests (marked `gpu`, skipped without a GPU or without the compiled CUDA kernels): every output
against the float64 closed-form reference at the docs/contract.md tolerances, one class count per
kernel regime, each dtype, temperature != 1, distillation on and off; strided / unaligned inputs;
bit-identical repeats; opcheck; the step op over several steps with its state; CUDA-graph capture
and sync-free steps.

CPU tests (run in CI):
- `test_emulated_*`: the same kernel sources compiled for the CPU by tests/cuda_emulator.cpp
  (CUDA threads as OS threads, __syncthreads and shuffles as barriers; loaded by tests/cuda_emu.py),
  every kernel regime of both row kernels against the float64 reference, the step's prologue and
  epilogue over several steps, bad labels, input layouts, and the scale kernel; the per-row prior
  weights (prior_weight) in every tier, raw and EM, zero-weight NaN rows, W = 0 and the step's
  epilogue with weights. This checks the kernels' logic without a GPU.
- `test_*_in_a_cuda_build`: where torch is a CUDA build and a CUDA toolkit exists, the built
  extension registers a CUDA kernel for every adello:: op, and for the ones implemented in
  csrc/cuda (CPP_CUDA_OPS) the C++ one, not a Python function. CI runs them in the CUDA venv
  through tests/cuda_build_check.sh (they skip under a CPU build of torch).
"""
import copy

import pytest
import torch
from contract import hparams_tensor
from cuda_emu import emulator_ops

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.ops import step as step_ops
from adello_kernels.ops.state import momentum_update
from adello_kernels.reference import (
    accumulate_dtype,
    alpha_schedule,
    flexda_fwd_reference,
    logit_adjustments,
)

from utils import (
    TOLERANCES,
    assert_outputs_close,
    check_outputs,
    make_inputs,
    reference_outputs,
    step_without_host_sync,
)


def _cuda_kernel_built() -> bool:
    return backends._load_extension() and flexda_ops.has_kernel("flexda_fwd", "CUDA")


needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda_kernel_built()),
    reason="needs a CUDA GPU and adello_kernels._C built with the CUDA kernel")

# One class count per kernel regime of choose_config (fp32/bf16/fp16), plus common class counts:
#   1, 10, 100, 127 -> warp, 4 elements per lane (127: odd rows are never 16-byte aligned)
#   200 -> warp/8, 500 -> warp/16, 1000 -> warp/32 (bandwidth shape)
#   2000 -> block of 128, 3000 -> block of 256, 4097 -> block of 512 (one column past 4096)
#   9000, 32768 -> looped kernel (online softmax over chunks)
CLASS_COUNTS = [1, 10, 100, 127, 200, 500, 1000, 2000, 3000, 4097, 9000, 32768]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = {  # name: (distill, temperature)
    "distill-T1": (True, 1.0),
    "distill-T0.6": (True, 0.6),
    "nodistill-T2.5": (False, 2.5),
}


def rows_for(c: int) -> tuple[int, int]:
    """(B, N): enough rows for several blocks per role, bounded memory for the large C."""
    if c >= 9000:
        return 33, 70
    if c >= 2000:
        return 65, 130
    return 150, 301


def op_inputs(z_l, prior_lb, prior_ulb, alpha, *, lambda_u=1.0, lambda_d=0.7, distill=True,
              temperature=1.0, prior_em=False):
    """The op's vector inputs (ds, du, hparams) in the accumulate dtype, as flexda_loss builds
    them."""
    acc = torch.float64 if z_l.dtype == torch.float64 else torch.float32
    ds, du = logit_adjustments(prior_lb, prior_ulb, alpha, 1e-9, dtype=acc)
    hp = hparams_tensor(lambda_u, lambda_d, distill, temperature, acc, z_l.device,
                        prior_em=prior_em)
    return ds, du, hp


def reference(z_l, y, z_w, z_s, ds, du, hp, threshold):
    """The float64 closed-form reference on exactly the kernel's inputs (adjustments included)."""
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), threshold)


def cuda_case(b, n, c, dtype, *, seed=0, scale=5.0, distill=True, temperature=1.0,
              threshold=0.95, alpha=0.6, confident_frac=0.5, prior_em=False):
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale,
                                           device="cuda", confident_frac=confident_frac)
    ds, du, hp = op_inputs(z_l, p_l, q, alpha, distill=distill, temperature=temperature,
                           prior_em=prior_em)
    return [z_l, y, z_w, z_s, ds, du, hp, threshold]


def run(args):
    return torch.ops.adello.flexda_fwd(*args)


# ------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_matches_reference(c, dtype, mode):
    distill, temperature = MODES[mode]
    b, n = rows_for(c)
    args = cuda_case(b, n, c, dtype, seed=c, distill=distill, temperature=temperature)
    got = run(args)
    torch.cuda.synchronize()
    assert got[5].dtype == dtype and got[6].dtype == dtype  # gradients in the logits' dtype
    assert got[5].is_contiguous() and got[6].is_contiguous()
    if not distill:
        assert float(got[1][2]) == 0.0
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"C={c} {dtype} {mode}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_em_prior_matches_reference(c, dtype):
    """hparams[HP_PRIOR_EM] = 1: prior_batch = mean_i softmax(z_w[i] + du) in every regime (fp64:
    its warp and looped tiers), repeated runs bit-identical."""
    if dtype == torch.float64 and c > 9000:
        pytest.skip("fp64 at C = 32768 adds nothing over C = 9000 (same looped kernel)")
    b, n = rows_for(c)
    args = cuda_case(b, n, c, dtype, seed=c + 2, temperature=0.8, prior_em=True)
    got = run(args)
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"em C={c} {dtype}",
                         args=args)
    again = run(args)
    for i, (g, w) in enumerate(zip(again, got)):
        assert torch.equal(g, w), f"output {i} differs between runs"


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [10, 300, 1000, 5000])  # fp64: warp/4, warp/16, looped, looped
def test_float64_matches_reference(c):
    args = cuda_case(40, 90, c, torch.float64, seed=1, temperature=0.8)
    assert_outputs_close(run(args), reference(*args), args[2], torch.float64, what=f"fp64 C={c}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [10, 127, 1000, 32768])
def test_many_rows_per_block(c):
    """More rows than the grid caps (1024 labeled / <= 1024 unlabeled blocks): each warp or
    block loops over several rows, and the batch prior accumulates across them."""
    b, n = (5000, 4500) if c <= 1000 else (300, 600)
    args = cuda_case(b, n, c, torch.float32, seed=3, temperature=0.7)
    assert_outputs_close(run(args), reference(*args), args[2], torch.float32, what=f"C={c}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [127, 1000, 9000])
def test_large_strong_logits_no_cancellation(c):
    """Strong logits ~1e4 on unconfident rows, T != 1: the distillation term is written with
    per-element differences (m - a_c) / T, all >= 0, so fp32 keeps the reference's accuracy where
    lse(a/T) - sum_c q_c a_c / T would cancel to ~1e-3 absolute. du = 0 keeps a = z_s exact in
    fp32 (a rounded z_s + du at 1e4 would move near-tied probabilities by ~1e-3, an input
    rounding no fp32 kernel can avoid)."""
    args = cuda_case(20, 40, c, torch.float32, seed=5, scale=1.0, temperature=0.5)
    args[3] = args[3] * 3000.0 + 1.0e4
    args[5] = torch.zeros_like(args[5])
    assert_outputs_close(run(args), reference(*args), args[2], torch.float32, what="large logits")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [100, 2000, 9000])
def test_all_rows_masked_or_none(c):
    """threshold 1e-6 masks every row (pure consistency); unconfident rows under threshold 0.99
    mask none (pure distillation)."""
    for threshold, frac in ((1e-6, 0.5), (0.99, 0.0)):
        args = cuda_case(30, 64, c, torch.float32, seed=6, scale=1.0, threshold=threshold,
                         temperature=2.0, confident_frac=frac)
        got = run(args)
        assert float(got[2].mean()) == (1.0 if threshold < 0.5 else 0.0)
        assert_outputs_close(got, reference(*args), args[2], torch.float32, threshold=threshold,
                             what=f"threshold={threshold}")


@pytest.mark.gpu
@needs_cuda_kernel
def test_non_finite_logits_do_not_crash():
    """NaN / inf logits give non-finite losses (as the reference), valid pseudo-labels, no fault."""
    args = cuda_case(8, 8, 300, torch.float32, seed=7)
    args[0][0, 3] = float("nan")
    args[2][1, 5] = float("nan")
    args[2][2] = float("-inf")
    args[3][3, 7] = float("inf")
    got = run(args)
    torch.cuda.synchronize()
    assert not bool(torch.isfinite(got[0]))
    assert bool(((got[3] >= 0) & (got[3] < 300)).all())


# ------------------------------------------------------------------------------------------------
# Layouts: strided and unaligned inputs take the scalar-load path and must give the same bits
# ------------------------------------------------------------------------------------------------

def unaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


def transposed(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with column stride != 1 (a transposed view)."""
    return x.t().contiguous().t()


def row_padded(x: torch.Tensor) -> torch.Tensor:
    """A copy of x living in a wider buffer (row stride > C, column stride 1)."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype, device=x.device)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def strided_vector(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0]


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("layout", [unaligned, transposed, row_padded], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [100, 128, 1000, 4097, 9000])
def test_strided_and_unaligned_inputs(c, dtype, layout):
    """Vector and scalar loads fetch the same elements and every sum has an order fixed by
    (B, N, C): any layout gives bit-identical outputs, and they match the reference."""
    args = cuda_case(37, 70, c, dtype, seed=11, temperature=1.3)
    want = run(args)
    odd = list(args)
    for i in (0, 2, 3):
        odd[i] = layout(args[i])
    odd[1] = strided_vector(args[1])
    odd[4] = strided_vector(args[4])
    odd[5] = unaligned(args[5])
    got = run(odd)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} depends on the input layout"
    assert_outputs_close(got, reference(*args), args[2], dtype, what=layout.__name__)


# ------------------------------------------------------------------------------------------------
# Determinism, opcheck, graphs, sync-freedom
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [100, 1000, 4097, 32768])
def test_bit_identical_repeats(c):
    """No float atomics: repeated runs give the same bits (including the batch prior and loss,
    which are multi-block reductions)."""
    b, n = (4096, 8192) if c <= 1000 else (64, 512)
    args = cuda_case(b, n, c, torch.bfloat16, seed=12, temperature=0.9)
    first = run(args)
    for _ in range(3):
        again = run(args)
        for i, (g, w) in enumerate(zip(again, first)):
            assert torch.equal(g, w), f"output {i} differs between runs"


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c,dtype", [(7, torch.float32), (1000, torch.bfloat16),
                                     (9000, torch.float64)], ids=str)
def test_opcheck_cuda(c, dtype):
    args = cuda_case(5, 9, c, dtype, seed=13, temperature=1.5)
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(torch.ops.adello.flexda_fwd.default, args)


def _step_inputs(seed, c=100, dtype=torch.float32):
    z_l, y, z_w, z_s, _, _ = make_inputs(48, 96, c, dtype=dtype, seed=seed, device="cuda")
    return z_l, y, z_w, z_s


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_graph_capture_of_a_training_step():
    """An ADELLOLoss(backend='cuda', validate=False) step captured once and replayed equals the
    eager steps bit for bit (losses, mask, pseudo-labels, updated prior, step counter)."""
    c = 100
    prior_lb = make_inputs(1, 1, c, seed=20)[4].cuda()
    kw = dict(backend="cuda", validate=False, distill_start=1, temperature=0.8)
    eager = ak.ADELLOLoss(prior_lb, 1000, **kw).cuda()
    graphed = copy.deepcopy(eager)
    static = [t.clone() for t in _step_inputs(0, c)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy init)
        for _ in range(2):
            graphed(*static)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(eager.state_dict())  # in-place: the captured buffers stay the same

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = graphed(*static)

    for step in range(4):  # steps 0..3 cross distill_start = 1
        data = _step_inputs(100 + step, c)
        for s, d in zip(static, data):
            s.copy_(d)
        graph.replay()
        want = eager(*data)
        torch.cuda.synchronize()
        for name, g, w in zip(want._fields, out_static, want):
            assert torch.equal(g, w), f"step {step}: {name} differs from the eager step"
        assert torch.equal(graphed.prior_ulb, eager.prior_ulb)
        assert int(graphed.step) == int(eager.step) == step + 1


@pytest.mark.gpu
@needs_cuda_kernel
def test_op_does_not_synchronize():
    args = cuda_case(64, 128, 1000, torch.bfloat16, seed=21, temperature=0.7)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda_kernel
def test_training_step_does_not_synchronize():
    """A whole ADELLOLoss step (forward, prior update, backward) with validate=False."""
    c = 127
    prior_lb = make_inputs(1, 1, c, seed=22)[4].cuda()
    crit = ak.ADELLOLoss(prior_lb, 1000, backend="cuda", validate=False, distill_start=0,
                         temperature=0.5).cuda()
    z_l, y, z_w, z_s = _step_inputs(23, c)
    z_l.requires_grad_()
    z_s.requires_grad_()
    step_without_host_sync(crit, z_l, y, z_w, z_s)
    assert z_l.grad is not None and z_s.grad is not None


@pytest.mark.gpu
@needs_cuda_kernel
def test_flexda_loss_cuda_backend_gradients():
    """backend='cuda' through flexda_loss: autograd returns the kernel's gradients scaled by the
    incoming gradient, matching autograd of the reference."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(20, 40, 127, seed=24, device="cuda")
    grads = []
    for backend in ("cuda", "reference"):
        a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = ak.flexda_loss(a, y, z_w, s, p_l, q, 0.4, temperature=0.7, backend=backend)
        (2.5 * out.loss).backward()
        grads.append((a.grad, s.grad))
    for g, w in zip(grads[0], grads[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * 2.5)


# ------------------------------------------------------------------------------------------------
# adello::flexda_step and adello::scale_grads_: shared helpers (device "cpu" runs the emulator)
# ------------------------------------------------------------------------------------------------

STEP_DEFAULTS = dict(total_steps=50, alpha_min=0.1, power=2.0, distill_start=0, lambda_u=1.0,
                     lambda_d=0.7, eps=1e-9, flexda=True, threshold=0.95, prior_momentum=0.9,
                     update=True, prior_em=False)


def make_state(prior_ulb, step=0, skipped=0, temperature=1.0):
    dev = prior_ulb.device
    return {"prior_ulb": prior_ulb.clone(), "step": torch.tensor(step, device=dev),
            "skipped": torch.tensor(skipped, device=dev),
            "temperature": torch.tensor(temperature, device=dev)}


def step_args(logits, prior_lb, state, **kw):
    """The op's arguments in schema order; the state tensors are passed (and mutated) as given."""
    o = {**STEP_DEFAULTS, **kw}
    z_l, y, z_w, z_s = logits
    return [z_l, y, z_w, z_s, prior_lb, state["prior_ulb"], state["step"], state["skipped"],
            state["temperature"], o["total_steps"], o["alpha_min"], o["power"],
            o["distill_start"], o["lambda_u"], o["lambda_d"], o["eps"], o["flexda"],
            o["threshold"], o["prior_momentum"], o["update"], o["prior_em"]]


def step_fwd_equivalent(args, prior_ulb, t):
    """The flexda_fwd arguments one step stands for, from the state on entry (Q = prior_ulb,
    step = t): the prologue in float64 rounded once to the accumulate dtype (as the kernels do),
    hparams (lambda_u, lambda_d, [t >= t0], T, prior_em). check_outputs / reference_outputs take
    these."""
    (z_l, y, z_w, z_s, p_l, _q, _t, _k, temp, total, amin, power, t0, lu, ld, eps, flexda, tau,
     _m, _u, em) = args
    acc = accumulate_dtype(z_l.dtype)
    if flexda:
        alpha = alpha_schedule(t, total, amin, power)
        ds, du = logit_adjustments(p_l, prior_ulb, alpha, eps, dtype=torch.float64)
        ds, du = ds.to(acc), du.to(acc)
    else:
        ds = du = torch.zeros(z_l.shape[1], dtype=acc, device=z_l.device)
    hp = hparams_tensor(lu, ld, t >= t0, float(temp), acc, z_l.device, prior_em=em)
    return [z_l, y, z_w, z_s, ds, du, hp, tau]


def as_fwd_outputs(out):
    """flexda_step's nine outputs in flexda_fwd's layout (loss, terms[3], mask, ...)."""
    loss, l_s, l_u, l_d, mask, pl, prior, g_lb, g_s = out
    return loss, torch.stack([l_s, l_u, l_d]), mask, pl, prior, g_lb, g_s


def check_step(op, logits, prior_lb, state, dtype, what, **kw):
    """One call of the step op against the reference, and its effect on the state: Q_t from the
    kernel's own prior_batch exactly as momentum_update computes it (or Q unchanged when it is not
    finite), step + 1, skipped + !finite; nothing changed when update=False."""
    q0, t0, k0 = (state["prior_ulb"].clone(), int(state["step"]), int(state["skipped"]))
    args = step_args(logits, prior_lb, state, **kw)
    out = op(*args)
    assert len(out) == 9
    for i in range(4):
        assert out[i].dim() == 0, f"{what}: output {i} is not 0-d"
    assert out[7].dtype == dtype and out[8].dtype == dtype
    update = args[19]
    prior = out[6]
    finite = bool(torch.isfinite(prior).all())
    if update:
        want_q, ok = momentum_update(q0, prior, args[18])
        assert bool(ok) == finite
        assert torch.equal(state["prior_ulb"], want_q), f"{what}: prior update differs"
        assert int(state["step"]) == t0 + 1, f"{what}: step not advanced"
        assert int(state["skipped"]) == k0 + (0 if finite else 1), f"{what}: skipped count"
    else:
        assert torch.equal(state["prior_ulb"], q0) and int(state["step"]) == t0
        assert int(state["skipped"]) == k0, f"{what}: update=False changed the state"
    if finite:
        check_outputs(as_fwd_outputs(out), step_fwd_equivalent(args, q0, t0), what=what)
        if not (t0 >= args[12]):
            assert float(out[3]) == 0.0, f"{what}: distillation term before distill_start"
    return out


def run_steps(op, b, n, c, dtype, *, device="cpu", steps=4, nan_step=None, seed=0, **kw):
    """`steps` consecutive steps with the state carried over: fresh logits each step, the prior
    trajectory, step counter and skip count checked after every one. On `nan_step` one weak
    logit is NaN, so prior_batch is not finite and the update is skipped."""
    first = make_inputs(b, n, c, dtype=dtype, seed=seed, device=device)
    prior_lb, prior_ulb = first[4], first[5]
    state = make_state(prior_ulb, temperature=kw.pop("temperature", 1.0))
    for k in range(steps):
        logits = list(make_inputs(b, n, c, dtype=dtype, seed=seed + 1 + k, device=device)[:4])
        if k == nan_step:
            logits[2] = logits[2].clone()
            logits[2][n // 2, c // 2] = float("nan")
        out = check_step(op, logits, prior_lb, state, dtype, f"C={c} {dtype} step {k}", **kw)
        if k == nan_step:
            assert not bool(torch.isfinite(out[6]).all())
    update = kw.get("update", True)
    assert int(state["step"]) == (steps if update else 0)
    assert int(state["skipped"]) == (1 if nan_step is not None and update else 0)
    return state


def bad_label_case(op_name, op, b, n, c, dtype, device="cpu"):
    """Labels -1 and C on two rows (validation off): those rows get CE = NaN (so loss and loss_sup
    are NaN) and an all-NaN gradient row; every other output matches the reference computed with
    valid labels in their place."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=c + 7, device=device)
    bad = torch.tensor([0, b - 1], device=device)
    y_bad = y.clone()
    y_bad[0], y_bad[b - 1] = -1, c
    if op_name == "flexda_fwd":
        ds, du, hp = op_inputs(z_l, p_l, q, 0.6, temperature=0.8)
        out = op(z_l, y_bad, z_w, z_s, ds, du, hp, 0.95)
        fwd = [z_l, y, z_w, z_s, ds, du, hp, 0.95]
        loss, terms, mask, pl, prior, g_lb, g_s = out
        l_s, l_u, l_d = terms.unbind()
    else:
        state = make_state(q, temperature=0.8)
        args = step_args((z_l, y_bad, z_w, z_s), p_l, state)
        loss, l_s, l_u, l_d, mask, pl, prior, g_lb, g_s = op(*args)
        fwd = step_fwd_equivalent(args, q, 0)
        fwd[1] = y
    want = reference(*fwd)
    assert bool(torch.isnan(loss)) and bool(torch.isnan(l_s)), "bad label: loss is not NaN"
    assert bool(torch.isnan(g_lb[bad]).all()), "bad label: gradient row is not all NaN"
    good = torch.ones(b, dtype=torch.bool, device=device)
    good[bad] = False
    assert bool(torch.isfinite(g_lb[good]).all()), "bad label leaked into other rows"
    # The other outputs are those of the valid-label reference (L_u, L_d included); loss, L_s and
    # the two bad rows are taken from it, having been checked above.
    acc = accumulate_dtype(dtype)
    got = (want[0].to(acc).to(device), torch.stack([want[1][0].to(acc).to(device), l_u, l_d]),
           mask, pl, prior, torch.where(good[:, None], g_lb, want[5].to(dtype).to(device)), g_s)
    check_outputs(got, fwd, what=f"bad labels C={c}")


def scale_case(op, dtype, device, n_lb, n_s, g, g_dtype=torch.float32, offset=0):
    """scale_grads_ against `saved * grad.to(saved.dtype)`, bit for bit; `offset` elements of
    misalignment put both tensors on the scalar path."""
    gen = torch.Generator().manual_seed(n_lb + n_s)
    def make(n):
        buf = torch.randn(n + offset, generator=gen, dtype=torch.float64).to(dtype).to(device)
        return buf[offset:]
    a, s = make(n_lb), make(n_s)
    grad = torch.tensor(g, dtype=g_dtype, device=device)
    want_a, want_s = a * grad.to(dtype), s * grad.to(dtype)
    ptrs = (a.data_ptr(), s.data_ptr())
    op(a, s, grad)
    assert (a.data_ptr(), s.data_ptr()) == ptrs
    assert torch.equal(a, want_a) and torch.equal(s, want_s), f"scale_grads_ {dtype} g={g}"


# ------------------------------------------------------------------------------------------------
# CPU emulation of the CUDA kernels (tests/cuda_emulator.cpp): runs in CI without a GPU
# ------------------------------------------------------------------------------------------------

def emulated_op():
    return emulator_ops().flexda_fwd


def cpu_case(b, n, c, dtype, mode, seed=0, prior_em=False):
    distill, temperature = MODES[mode]
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed)
    ds, du, hp = op_inputs(z_l, p_l, q, 0.6, distill=distill, temperature=temperature,
                           prior_em=prior_em)
    return [z_l, y, z_w, z_s, ds, du, hp, 0.95]


# (C, dtype, B, N, mode): every regime once, the modes and dtypes spread over them. With the grid
# capped at 4 blocks per role, N > 16 (warp regime) or N > 4 (pair / block regimes) loops over
# rows.
EMULATED_CASES = [
    (1, torch.float32, 5, 9, "distill-T0.6"),         # warp/4, a single class
    (10, torch.bfloat16, 5, 21, "distill-T1"),        # warp/4, rows loop in the warps
    (127, torch.float16, 9, 40, "distill-T0.6"),      # warp/4, odd rows unaligned
    (200, torch.float32, 7, 30, "nodistill-T2.5"),    # warp/8
    (500, torch.bfloat16, 9, 33, "distill-T0.6"),     # warp/16
    (1000, torch.float32, 6, 18, "distill-T0.6"),     # pair of warps, 16 per lane
    (777, torch.float16, 5, 11, "distill-T1"),        # pair of warps, odd C
    (2000, torch.float16, 3, 9, "distill-T1"),        # block of 128
    (3000, torch.float32, 3, 9, "distill-T0.6"),      # block of 256
    (4097, torch.bfloat16, 3, 9, "nodistill-T2.5"),   # block of 512
    (9000, torch.float32, 3, 9, "distill-T0.6"),      # looped
    (9000, torch.bfloat16, 2, 5, "distill-T1"),       # looped, 16-bit loads
    (10, torch.float64, 5, 40, "distill-T0.6"),       # fp64 warp/4
    (300, torch.float64, 5, 30, "nodistill-T2.5"),    # fp64 warp/16
    (600, torch.float64, 3, 9, "distill-T0.6"),       # fp64 looped
]
CASE_IDS = [f"C{c}-{str(d)[6:]}-{m}" for c, d, _, _, m in EMULATED_CASES]


@pytest.mark.parametrize("c,dtype,b,n,mode", EMULATED_CASES, ids=CASE_IDS)
def test_emulated_kernel_matches_reference(c, dtype, b, n, mode):
    args = cpu_case(b, n, c, dtype, mode, seed=c)
    got = emulated_op()(*args)
    assert got[5].dtype == dtype and got[6].dtype == dtype
    if not MODES[mode][0]:
        assert float(got[1][2]) == 0.0
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"emulated C={c} {mode}",
                         args=args)


@pytest.mark.parametrize("c,dtype", [(127, torch.float16), (1000, torch.float32),
                                     (4097, torch.bfloat16), (9000, torch.float32)])
def test_emulated_kernel_layouts_bit_identical(c, dtype):
    """Scalar strided / unaligned loads and 16-byte vector loads give the same bits."""
    args = cpu_case(3, 9, c, dtype, "distill-T0.6", seed=1)
    want = emulated_op()(*args)
    odd = list(args)
    odd[0], odd[2], odd[3] = transposed(args[0]), unaligned(args[2]), row_padded(args[3])
    odd[1], odd[4], odd[5] = strided_vector(args[1]), strided_vector(args[4]), unaligned(args[5])
    got = emulated_op()(*odd)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} depends on the input layout"


def test_emulated_kernel_large_strong_logits():
    """The distillation term at strong logits ~1e4 (as test_large_strong_logits_no_cancellation)."""
    args = cpu_case(4, 20, 127, torch.float32, "distill-T0.6", seed=5)
    args[2] = args[2] / 5.0                       # unconfident weak rows
    args[3] = args[3] * 600.0 + 1.0e4
    args[5] = torch.zeros_like(args[5])
    got = emulated_op()(*args)
    assert float(got[2].sum()) < 20               # some rows distil
    assert_outputs_close(got, reference(*args), args[2], torch.float32, what="large logits")


# The EM batch prior (hparams[HP_PRIOR_EM] != 0: prior_batch = mean_i softmax(z_w[i] + du)) in
# every row regime, including those the contract's cuda cases (tests/test_contract.py LIMITS: C
# <= 4097, <= 40 rows, <= 40000 elements) may not draw: warp/8, warp/16, the blocks of 256 and
# 512, the looped kernel (online sum of exp(z_w - m) r in the weak pass) and fp64's tiers.
EM_CASES = [
    (10, torch.float32, 5, 21, "distill-T1"),          # warp/4, rows loop
    (200, torch.bfloat16, 5, 21, "distill-T0.6"),      # warp/8
    (500, torch.float16, 5, 21, "nodistill-T2.5"),     # warp/16
    (1000, torch.float32, 3, 9, "distill-T1"),         # pair of warps
    (3000, torch.bfloat16, 2, 6, "distill-T0.6"),      # block of 256
    (4097, torch.float32, 2, 5, "distill-T1"),         # block of 512, odd C
    (9000, torch.float32, 2, 5, "distill-T0.6"),       # looped
    (9000, torch.bfloat16, 2, 5, "distill-T1"),        # looped, 16-bit loads, q = pw
    (10, torch.float64, 5, 21, "distill-T0.6"),        # fp64 warp/4
    (300, torch.float64, 3, 9, "distill-T1"),          # fp64 warp/16
    (600, torch.float64, 3, 9, "distill-T0.6"),        # fp64 looped
]
EM_IDS = [f"C{c}-{str(d)[6:]}-{m}" for c, d, _, _, m in EM_CASES]


def with_prior_em(args, on):
    """args with hparams[HP_PRIOR_EM] set to `on` (a copy of hparams, the rest shared)."""
    out = list(args)
    out[6] = args[6].clone()
    out[6][flexda_ops.HP_PRIOR_EM] = float(on)
    return out


@pytest.mark.parametrize("c,dtype,b,n,mode", EM_CASES, ids=EM_IDS)
def test_emulated_kernel_em_prior(c, dtype, b, n, mode):
    """The EM prior against the reference; it differs from the raw prior (du != 0) while every
    other output keeps the raw bits (the mask and pseudo-labels come from the same s_w; the host
    compiler contracts nothing, so the looped kernel's online s_w is the raw one bit for bit);
    with du = 0 (flexda off) em gives the raw bits everywhere (r = exp(0) = 1)."""
    args = cpu_case(b, n, c, dtype, mode, seed=c + 1, prior_em=True)
    got = emulated_op()(*args)
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"em C={c} {mode}",
                         args=args)
    raw = emulated_op()(*with_prior_em(args, False))
    for i, (g, w) in enumerate(zip(got, raw)):
        if i != 4:
            assert torch.equal(g, w), f"output {i} depends on prior_em"
    assert not torch.allclose(got[4], raw[4], rtol=0, atol=1e-4), "em prior equals the raw one"
    args[5] = torch.zeros_like(args[5])
    got = emulated_op()(*args)
    raw = emulated_op()(*with_prior_em(args, False))
    for i, (g, w) in enumerate(zip(got, raw)):
        assert torch.equal(g, w), f"du = 0: output {i} differs between em and raw"


@pytest.mark.parametrize("c,dtype", [(127, torch.float32), (1000, torch.bfloat16),
                                     (3000, torch.float32), (9000, torch.float32),
                                     (600, torch.float64)])
def test_emulated_kernel_em_nan_weak_row(c, dtype):
    """A NaN weak logit makes that row's EM prior, hence every entry of prior_batch, NaN (as the
    reference and raw mode); the pseudo-labels stay in range."""
    args = cpu_case(3, 9, c, dtype, "distill-T0.6", seed=2, prior_em=True)
    args[2] = args[2].clone()
    args[2][4, c // 3] = float("nan")
    got = emulated_op()(*args)
    want = reference(*args)
    assert bool(torch.isnan(want[4]).all())
    assert bool(torch.isnan(got[4]).all()), "a NaN weak row left prior_batch entries finite"
    assert bool(((got[3] >= 0) & (got[3] < c)).all())


# flexda_step: (C, dtype, B, N, temperature, steps). Every regime; with the emulator's 16 KB
# budget for the adjustment vector, the looped fp32/bf16 cases at C = 9000 (C > 8192) and fp64
# at C = 3000 recompute each adjustment per element, fp64 at C = 600 keeps it in shared memory.
# The wide regimes run fewer, smaller steps: the emulator runs a 512- or 1024-thread block as OS
# threads meeting at barriers, ~100x slower per element than the warp regimes.
STEP_CASES = [
    (1, torch.float32, 5, 9, 0.6, 4),        # warp/4, a single class
    (10, torch.bfloat16, 5, 21, 1.0, 4),     # warp/4, rows loop
    (127, torch.float16, 9, 40, 0.6, 4),     # warp/4, odd C
    (200, torch.float32, 7, 30, 2.5, 4),     # warp/8
    (500, torch.bfloat16, 9, 33, 0.6, 4),    # warp/16
    (1000, torch.float32, 6, 18, 0.7, 4),    # pair of warps
    (2000, torch.float16, 3, 9, 1.0, 3),     # block of 128
    (3000, torch.float32, 2, 6, 0.6, 3),     # block of 256
    (4097, torch.bfloat16, 2, 5, 2.5, 3),    # block of 512, odd C
    (9000, torch.float32, 2, 5, 0.6, 3),     # looped, adjustments recomputed per element
    (10, torch.float64, 5, 40, 0.6, 4),      # fp64 warp/4
    (300, torch.float64, 5, 30, 2.5, 4),     # fp64 warp/16
    (600, torch.float64, 3, 9, 0.6, 4),      # fp64 looped, adjustments in shared memory
    (3000, torch.float64, 2, 5, 1.0, 3),     # fp64 looped, recomputed
]
STEP_IDS = [f"C{c}-{str(d)[6:]}-T{t}" for c, d, _, _, t, _ in STEP_CASES]


@pytest.mark.parametrize("c,dtype,b,n,temperature,steps", STEP_CASES, ids=STEP_IDS)
def test_emulated_step_over_several_steps(c, dtype, b, n, temperature, steps):
    """Consecutive steps with the state carried over: the prologue reads the mutated Q and t each
    step (alpha_t moves, the distillation gate flips on at t = 2), step 1 has a NaN weak logit so
    the prior update is skipped (and counted), every finite step matches the reference."""
    run_steps(emulator_ops().flexda_step, b, n, c, dtype, steps=steps, nan_step=1, seed=c,
              temperature=temperature, distill_start=2, total_steps=5)


# prior_em=True (the contract's step variants run it at C = 130 only): the looped kernel with
# each adjustment recomputed per element (C = 9000 fp32, 3000 fp64: past the emulator's 16 KB
# ADELLO_ADJ_SMEM_BYTES; r = exp(du) from the recomputed du) and in shared memory (fp64 600),
# the blocks of 128 and 512, warp/8. Each with a NaN step (the update skipped).
EM_STEP_CASES = [
    (200, torch.float32, 7, 30, 2.5, 3),     # warp/8
    (2000, torch.float16, 3, 9, 1.0, 3),     # block of 128
    (4097, torch.bfloat16, 2, 5, 0.6, 3),    # block of 512
    (9000, torch.float32, 2, 5, 1.0, 3),     # looped, recomputed
    (600, torch.float64, 3, 9, 0.6, 3),      # fp64 looped, shared memory
    (3000, torch.float64, 2, 5, 1.0, 3),     # fp64 looped, recomputed
]


@pytest.mark.parametrize("c,dtype,b,n,temperature,steps", EM_STEP_CASES,
                         ids=[f"C{c}-{str(d)[6:]}-T{t}" for c, d, _, _, t, _ in EM_STEP_CASES])
def test_emulated_step_em_over_several_steps(c, dtype, b, n, temperature, steps):
    """flexda_step(prior_em=True): each step's EM prior against the reference and Q updated from
    it, across steps whose du changes with Q and alpha_t."""
    run_steps(emulator_ops().flexda_step, b, n, c, dtype, steps=steps, nan_step=1, seed=c + 5,
              temperature=temperature, distill_start=1, total_steps=5, prior_em=True)


# (update=False and flexda=False at one small shape each are also in tests/test_contract.py; these
# add the pair-of-warps regime.)
@pytest.mark.parametrize("c,dtype", [(127, torch.float32), (1000, torch.bfloat16)])
def test_emulated_step_without_update_leaves_state(c, dtype):
    """update=False: outputs as usual (from the unchanged state every time), state untouched,
    even on a step whose batch prior is not finite."""
    run_steps(emulator_ops().flexda_step, 3, 9, c, dtype, steps=3, nan_step=1, seed=3,
              update=False, temperature=0.8)


@pytest.mark.parametrize("c,dtype", [(10, torch.float32), (1000, torch.float16)])
def test_emulated_step_flexda_off(c, dtype):
    """flexda=False: no logit adjustment (ds = du = 0) in every regime, the update still runs."""
    run_steps(emulator_ops().flexda_step, 3, 9, c, dtype, steps=2, seed=4, flexda=False,
              temperature=1.5, lambda_u=0.5, lambda_d=2.0)


def test_emulated_step_state_dtypes_and_layouts():
    """A float64 prior_ulb (updated in float64), a strided prior_lb, a bf16 temperature tensor,
    and training past total_steps (alpha clamps at alpha_min)."""
    ops = emulator_ops()
    z_l, y, z_w, z_s, p_l, q = make_inputs(5, 21, 100, seed=8)
    state = make_state(q.double(), step=70)
    state["temperature"] = torch.tensor(0.75, dtype=torch.bfloat16)
    check_step(ops.flexda_step, (z_l, y, z_w, z_s), strided_vector(p_l), state, torch.float32,
               "state layouts", total_steps=50)
    assert state["prior_ulb"].dtype == torch.float64


@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
def test_emulated_step_agrees_with_fwd(prior_em):
    """flexda_step = its prologue + flexda_fwd: fed the same adjustments (computed by the
    reference in float64 and rounded once, as the prologue does) and hyperparameters (the step's
    prior_em argument = flexda_fwd's hparams slot), the rows and the reduce are the same code, so
    the outputs agree to the last few ulp."""
    ops = emulator_ops()
    z_l, y, z_w, z_s, p_l, q = make_inputs(6, 22, 64, seed=9)
    state = make_state(q, step=7, temperature=0.9)
    args = step_args((z_l, y, z_w, z_s), p_l, state, update=False, distill_start=3,
                     prior_em=prior_em)
    got = as_fwd_outputs(ops.flexda_step(*args))
    alpha = alpha_schedule(7, args[9], args[10], args[11])
    ds, du = logit_adjustments(p_l, q, alpha, args[15], dtype=torch.float64)
    hp = hparams_tensor(args[13], args[14], True, 0.9, torch.float32, prior_em=prior_em)
    want = ops.flexda_fwd(z_l, y, z_w, z_s, ds.float(), du.float(), hp, args[17])
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.allclose(g.double(), w.double(), rtol=1e-6, atol=1e-7), f"output {i}"


@pytest.mark.parametrize("op_name", ["flexda_fwd", "flexda_step"])
@pytest.mark.parametrize("c,dtype", [(10, torch.float32), (1000, torch.bfloat16),
                                     (3000, torch.float32), (600, torch.float64)])
def test_emulated_bad_labels_give_a_nan_row(op_name, c, dtype):
    """warp, pair, block and looped regimes (the looped one in fp64, where it starts at C > 512)."""
    ops = emulator_ops()
    bad_label_case(op_name, getattr(ops, op_name), 6, 9, c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_emulated_scale_grads(dtype):
    """Both tensors scaled in place in one grid (vectors, then the tails; misaligned tensors take
    the scalar path), a grad of exactly 1 leaves them untouched, a tensor with no elements is
    skipped, and a grad of another dtype is rounded to the gradient dtype first."""
    op = emulator_ops().scale_grads_
    for n_lb, n_s, offset in ((3000, 5001, 0), (7, 9, 1), (0, 130, 0), (130, 0, 1), (0, 0, 0)):
        scale_case(op, dtype, "cpu", n_lb, n_s, 2.5, offset=offset)
        scale_case(op, dtype, "cpu", n_lb, n_s, 1.0, offset=offset)
    scale_case(op, dtype, "cpu", 1000, 999, -0.3, g_dtype=torch.float64)
    scale_case(op, dtype, "cpu", 1000, 999, 1.7, g_dtype=torch.bfloat16)


def test_emulated_scale_grads_rejects_bad_input():
    op = emulator_ops().scale_grads_
    a, s = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="grad_loss"):
        op(a, s, torch.ones(2))
    with pytest.raises(ValueError, match="grad_ulb_s"):
        op(a, torch.zeros(5, 3).t(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="share a dtype"):
        op(a, s.double(), torch.tensor(1.0))


# ------------------------------------------------------------------------------------------------
# flexda_step / scale_grads_ on the GPU
# ------------------------------------------------------------------------------------------------

def _cuda_step_built() -> bool:
    return (backends._load_extension() and flexda_ops.has_kernel("flexda_step", "CUDA")
            and flexda_ops.has_kernel("scale_grads_", "CUDA"))


needs_cuda_step = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda_step_built()),
    reason="needs a CUDA GPU and adello_kernels._C built with the CUDA step kernels")


def _cuda_step_op(*args):
    # Below autograd: the kernel itself (the module's autograd wraps the same call).
    with torch.no_grad():
        return torch.ops.adello.flexda_step(*args)


@pytest.mark.gpu
@needs_cuda_step
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("c", [1, 10, 127, 500, 1000, 3000, 4097, 9000, 32768])
def test_cuda_step_over_several_steps(c, dtype):
    if dtype == torch.float64 and c > 9000:
        pytest.skip("fp64 at C = 32768 adds nothing over C = 9000 (same looped kernel)")
    b, n = rows_for(c)
    run_steps(_cuda_step_op, b, n, c, dtype, device="cuda", steps=4, nan_step=1, seed=c,
              temperature=0.7, distill_start=2, total_steps=5)


@pytest.mark.gpu
@needs_cuda_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", [10, 500, 1000, 4097, 9000, 32768])
def test_cuda_step_em_over_several_steps(c, dtype):
    """prior_em=True: the EM batch prior and the Q trajectory it drives; at C = 32768 (fp32
    128 KB > ADELLO_ADJ_SMEM_BYTES) the looped kernel recomputes each adjustment, r included."""
    if dtype == torch.float64 and c > 9000:
        pytest.skip("fp64 at C = 32768 adds nothing over C = 9000 (same looped kernel)")
    b, n = rows_for(c)
    run_steps(_cuda_step_op, b, n, c, dtype, device="cuda", steps=3, nan_step=1, seed=c + 3,
              temperature=0.7, distill_start=1, total_steps=5, prior_em=True)


@pytest.mark.gpu
@needs_cuda_step
@pytest.mark.parametrize("c", [127, 1000, 9000])
def test_cuda_step_update_off_and_flexda_off(c):
    run_steps(_cuda_step_op, 40, 90, c, torch.float32, device="cuda", steps=2, nan_step=0,
              seed=31, update=False)
    run_steps(_cuda_step_op, 40, 90, c, torch.float32, device="cuda", steps=2, seed=32,
              flexda=False, temperature=2.0)


@pytest.mark.gpu
@needs_cuda_step
@pytest.mark.parametrize("op_name", ["flexda_fwd", "flexda_step"])
@pytest.mark.parametrize("c", [10, 1000, 3000, 9000])
def test_cuda_bad_labels_give_a_nan_row(op_name, c):
    bad_label_case(op_name, getattr(torch.ops.adello, op_name), 33, 70, c, torch.float32, "cuda")


@pytest.mark.gpu
@needs_cuda_step
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_cuda_scale_grads(dtype):
    op = torch.ops.adello.scale_grads_
    for n_lb, n_s, offset in ((65536 * 3, 100003, 0), (7, 9, 1), (0, 130, 0), (0, 0, 0)):
        scale_case(op, dtype, "cuda", n_lb, n_s, 2.5, offset=offset)
        scale_case(op, dtype, "cuda", n_lb, n_s, 1.0, offset=offset)


@pytest.mark.gpu
@needs_cuda_step
def test_cuda_step_bit_identical_and_sync_free():
    """No float atomics, no host sync: repeated steps from the same state give the same bits, and
    a step plus scale_grads_ runs under sync debug mode "error"."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(2048, 4096, 1000, dtype=torch.bfloat16, seed=40,
                                           device="cuda")
    outs = []
    for _ in range(3):
        state = make_state(q, step=3, temperature=0.9)
        out = _cuda_step_op(*step_args((z_l, y, z_w, z_s), p_l, state))
        outs.append(out + (state["prior_ulb"],))
    for again in outs[1:]:
        for i, (g, w) in enumerate(zip(again, outs[0])):
            assert torch.equal(g, w), f"output {i} differs between runs"
    state = make_state(q, temperature=0.9)
    args = step_args((z_l, y, z_w, z_s), p_l, state)
    grad = torch.tensor(2.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _cuda_step_op(*args)
        torch.ops.adello.scale_grads_(out[7], out[8], grad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda_step
def test_cuda_step_graph_capture():
    """flexda_step (update on) + scale_grads_ captured once and replayed: each replay advances the
    state exactly as eager calls do."""
    c = 100
    z_l, y, z_w, z_s, p_l, q = make_inputs(48, 96, c, seed=41, device="cuda")
    eager, graphed = make_state(q, temperature=0.8), make_state(q, temperature=0.8)
    static = [t.clone() for t in (z_l, y, z_w, z_s)]
    grad = torch.tensor(3.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        _cuda_step_op(*step_args(static, p_l, make_state(q)))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = _cuda_step_op(*step_args(static, p_l, graphed, distill_start=1))
        torch.ops.adello.scale_grads_(out_static[7], out_static[8], grad)
    for k in range(3):
        data = make_inputs(48, 96, c, seed=50 + k, device="cuda")[:4]
        for s_, d in zip(static, data):
            s_.copy_(d)
        graph.replay()
        want = _cuda_step_op(*step_args(data, p_l, eager, distill_start=1))
        torch.ops.adello.scale_grads_(want[7], want[8], grad)
        torch.cuda.synchronize()
        for i, (g, w) in enumerate(zip(out_static, want)):
            assert torch.equal(g, w), f"replay {k}: output {i} differs from the eager step"
        for key in ("prior_ulb", "step", "skipped"):
            assert torch.equal(graphed[key], eager[key]), f"replay {k}: {key}"


# ------------------------------------------------------------------------------------------------
# Build check (CPU; meaningful in the CUDA venv of tests/cuda_build_check.sh)
# ------------------------------------------------------------------------------------------------

# The ops implemented in csrc/cuda: their CUDA kernel must be the C++ one.
CPP_CUDA_OPS = ("adello::flexda_fwd", "adello::flexda_step", "adello::scale_grads_")


def _adello_ops() -> list[str]:
    backends._load_triton()  # adello::*_triton register their kernels on import
    names = {"adello::" + n for n in flexda_ops.OP_NAMES} | set(CPP_CUDA_OPS)
    names |= {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("adello::")}
    return sorted(names)


def _require_cuda_build():
    if torch.version.cuda is None:
        pytest.skip("CPU build of torch: the CUDA build check runs in the CUDA venv "
                    "(tests/cuda_build_check.sh)")
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit found (set CUDA_HOME): the CUDA sources cannot be built")
    assert backends._load_extension(), "adello_kernels._C is not built or failed to load"


def cuda_registration(op: str) -> str | None:
    """The dispatcher's line for op's CUDA kernel ("CUDA: registered at <file>:<line> :: ..."),
    or None."""
    for line in torch._C._dispatch_dump(op).splitlines():
        if line.startswith("CUDA:"):
            return line
    return None


@pytest.mark.parametrize("op", _adello_ops())
def test_every_adello_op_has_a_cuda_kernel_in_a_cuda_build(op):
    _require_cuda_build()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), \
        f"{op} has no kernel for the CUDA dispatch key in this CUDA build"


@pytest.mark.parametrize("op", CPP_CUDA_OPS)
def test_cuda_kernel_is_the_cpp_one_in_a_cuda_build(op):
    """A Python function registered for CUDA (a leftover PyTorch fallback) would pass the check
    above while running ~20 ATen launches instead of the fused kernel."""
    _require_cuda_build()
    line = cuda_registration(op)
    assert line is not None, f"{op}: no CUDA kernel registered"
    where = line.split("registered at", 1)[-1].split("::", 1)[0].strip()
    assert "csrc/cuda/" in where and ".py" not in where, f"{op}: CUDA kernel from {where}"
    assert "unboxed" in line, f"{op}: CUDA kernel is not a C++ function: {line}"


# ------------------------------------------------------------------------------------------------
# Per-row prior weights (prior_weight, the released lb_in_ulb_mask) in the CUDA kernels, emulated:
# the weighted batch prior in every row tier (warp/4, /8, /16, the pair of warps, the blocks of
# 128/256/512, the looped kernel; fp64's warp and looped tiers), raw and EM, against the float64
# reference; the rows a zero weight must keep out of the prior (NaN weak rows); W = 0; the step
# op's epilogue with weights.
# ------------------------------------------------------------------------------------------------

def prior_weights(n, kind, dtype, seed=0):
    """[N] prior weights in the accumulate dtype of `dtype` logits. "binary": random 0/1 (row 0,
    the first row of the first block, weighs 0; the last row 1); "positive": random in [0.05,
    2.05); "mixed": random in [0, 3) with about a third exact zeros, half of them -0.0."""
    gen = torch.Generator().manual_seed(1000 + seed)
    if kind == "binary":
        w = (torch.rand(n, generator=gen) < 0.6).double()
        w[0], w[-1] = 0.0, 1.0
    elif kind == "positive":
        w = torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.05
    elif kind == "mixed":
        w = torch.rand(n, generator=gen, dtype=torch.float64) * 3
        zero = torch.rand(n, generator=gen) < 1 / 3
        zero[0] = True
        w[zero] = 0.0
        w[zero & (torch.arange(n) % 2 == 1)] = -0.0
    else:
        raise KeyError(kind)
    return w.to(accumulate_dtype(dtype))


def assert_same_bits(got, want, what, skip=()):
    """Every output but those in `skip` identical to `want`'s (NaN where it has NaN)."""
    for i, (g, w) in enumerate(zip(got, want)):
        if i not in skip:
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, i=i: f"{what}: output {i}: {m}")


def _schema_parts(schema: str) -> tuple[list[str], str]:
    """(argument declarations, returns) of "name(args) -> (returns)" as written by torch (no
    argument type of these ops contains a comma)."""
    args, returns = schema[schema.index("(") + 1:].split(") -> ", 1)
    return args.split(", "), returns


def test_emulated_schema_drifts_from_the_ops():
    """The emulator's schemas are exactly the adello:: ones (names, types, defaults, mutability,
    returns; the trailing Tensor? prior_weight=None, bool distill_all=False included), so that
    tests call it as the real ops are called."""
    ops = emulator_ops()
    for name, schema in (("flexda_fwd", flexda_ops.SCHEMA), ("flexda_step", step_ops.SCHEMA)):
        got, got_ret = _schema_parts(str(getattr(ops, name).default._schema))
        want, want_ret = _schema_parts(str(torch._C.parse_schema(f"adello::{name}{schema}")))
        assert got_ret == want_ret, f"{name}: returns {got_ret} vs {want_ret}"
        assert got == want, f"{name}: {got} vs {want}"
        assert got[-1] == "bool distill_all=False", f"{name}: ends with {got[-1]}"


# (C, dtype, B, N, mode, prior_em, weights): every row tier, raw and EM, each weight kind
WEIGHT_CASES = [
    (10, torch.float32, 5, 21, "distill-T1", False, "binary"),        # warp/4, rows loop
    (127, torch.float16, 9, 40, "distill-T0.6", True, "positive"),    # warp/4, odd rows
    (200, torch.bfloat16, 7, 30, "nodistill-T2.5", False, "mixed"),   # warp/8
    (500, torch.bfloat16, 9, 33, "distill-T0.6", True, "binary"),     # warp/16
    (1000, torch.float32, 6, 18, "distill-T0.6", False, "positive"),  # pair of warps
    (777, torch.float16, 5, 11, "distill-T1", True, "mixed"),         # pair of warps, odd C
    (2000, torch.float16, 3, 9, "distill-T1", False, "binary"),       # block of 128
    (3000, torch.float32, 3, 9, "distill-T0.6", True, "positive"),    # block of 256
    (4097, torch.bfloat16, 3, 9, "nodistill-T2.5", False, "mixed"),   # block of 512
    (9000, torch.float32, 3, 9, "distill-T0.6", False, "binary"),     # looped
    (9000, torch.float32, 2, 5, "distill-T1", True, "mixed"),         # looped, EM
    (10, torch.float64, 5, 40, "distill-T0.6", True, "binary"),       # fp64 warp/4
    (300, torch.float64, 5, 30, "nodistill-T2.5", False, "positive"), # fp64 warp/16
    (600, torch.float64, 3, 9, "distill-T0.6", True, "mixed"),        # fp64 looped, EM
    (600, torch.float64, 3, 9, "distill-T1", False, "binary"),        # fp64 looped
]
WEIGHT_IDS = [f"C{c}-{str(d)[6:]}-{m}-{'em' if e else 'raw'}-{k}"
              for c, d, _, _, m, e, k in WEIGHT_CASES]


@pytest.mark.parametrize("c,dtype,b,n,mode,prior_em,kind", WEIGHT_CASES, ids=WEIGHT_IDS)
def test_emulated_prior_weight_ignored_or_misapplied_in_a_tier(c, dtype, b, n, mode, prior_em,
                                                               kind):
    """prior_batch = sum_{w_i > 0} w_i p_i / W in this tier, against the float64 reference (which
    differs from the unweighted prior here, so ignored weights fail); every other output keeps
    the unweighted run's bits (the weights reach nothing but the prior); weights of all 1 give
    the unweighted bits everywhere (the weighted path adds no rounding of its own: w_i = 1 folds
    into the row scale exactly and W = N)."""
    args = cpu_case(b, n, c, dtype, mode, seed=c + 11, prior_em=prior_em)
    w = prior_weights(n, kind, dtype, seed=c)
    want = reference_outputs(args + [w])
    plain_want = reference(*args)
    assert float((want[4] - plain_want[4]).abs().max()) > 100 * TOLERANCES[dtype].prior_tol
    got = emulated_op()(*args, w)
    what = f"weighted C={c} {dtype} {mode} em={prior_em} {kind}"
    check_outputs(got, args, what=what, want=want)
    plain = emulated_op()(*args)
    assert_same_bits(got, plain, what, skip=(4,))
    assert_same_bits(emulated_op()(*args, torch.ones_like(w)), plain, what + " (all ones)")


def after_poison(args, weight):
    """The emulated flexda_fwd(*args, weight) right after a call whose weak logits are all NaN,
    which leaves NaN partials behind in freed memory of the workspace's size (a partial row the
    weighted call failed to write would show up as NaN)."""
    poisoned = list(args)
    poisoned[2] = torch.full_like(args[2], float("nan"))
    assert bool(torch.isnan(emulated_op()(*poisoned)[4]).all())
    return emulated_op()(*args, weight)


def test_emulated_prior_weight_stale_partial_or_stride_in_zero_weight_blocks():
    """A strided weight vector reads the same weights as a contiguous one (bits), and in the
    looped kernel (fp64 at C = 600; one row per block, the grid capped at 4 blocks) a block whose
    rows all weigh 0 still writes its partial (zeros) and a block whose first row weighs 0 starts
    its partial at its first weighted row, not at stale workspace; the same weights in the
    pair-of-warps tier."""
    for c, dtype in ((600, torch.float64), (1000, torch.float32)):
        args = cpu_case(2, 6, c, dtype, "distill-T0.6", seed=c + 3)
        w = prior_weights(6, "positive", dtype, seed=c)
        w[torch.tensor([0, 1, 5])] = 0.0   # block 0: rows 0, 4 (the first weighs 0); block 1: 1, 5
        got = after_poison(args, w)
        check_outputs(got, args, what=f"zero blocks C={c}", want=reference_outputs(args + [w]))
        buf = torch.zeros(2 * 6, dtype=w.dtype)
        buf[::2] = w
        assert_same_bits(after_poison(args, buf[::2]), got, f"strided weights C={c}")


# (C, dtype): the NaN-row cases, one per tier family: warp, pair, block, looped (fp32 and fp64)
NAN_WEIGHT_CASES = [(127, torch.float32), (1000, torch.bfloat16), (3000, torch.float32),
                    (9000, torch.float32), (10, torch.float64), (600, torch.float64)]


@pytest.mark.parametrize("prior_em", [False, True], ids=["raw", "em"])
@pytest.mark.parametrize("c,dtype", NAN_WEIGHT_CASES, ids=[f"C{c}-{str(d)[6:]}"
                                                           for c, d in NAN_WEIGHT_CASES])
def test_emulated_zero_weight_nan_weak_row_leaks_into_prior(c, dtype, prior_em):
    """A weak row with a NaN logit (and one with +inf) at weight 0 adds nothing to the prior: it
    stays finite and matches the reference (not 0 * NaN); the same NaN row at weight 1 makes
    every prior entry NaN. The other outputs (NaN rows included) are the unweighted run's."""
    args = cpu_case(3, 9, c, dtype, "distill-T0.6", seed=2, prior_em=prior_em)
    args[2] = args[2].clone()
    args[2][4, c // 3] = float("nan")
    args[2][6, c // 2] = float("inf")
    w = prior_weights(9, "positive", dtype, seed=c)
    w[4] = w[6] = 0.0
    plain = emulated_op()(*args)
    got = emulated_op()(*args, w)
    want = reference_outputs(args + [w])
    assert bool(torch.isfinite(want[4]).all())
    assert bool(torch.isfinite(got[4]).all()), "a zero-weight NaN row reached prior_batch"
    p_err = float((got[4].double() - want[4]).abs().max())
    assert p_err <= TOLERANCES[dtype].prior_tol, f"prior_batch err {p_err:.3g}"
    assert_same_bits(got, plain, f"NaN row C={c}", skip=(4,))
    w[4] = 1.0
    got = emulated_op()(*args, w)
    assert bool(torch.isnan(reference_outputs(args + [w])[4]).all())
    assert bool(torch.isnan(got[4]).all()), "a weighted NaN row left prior_batch entries finite"
    assert_same_bits(got, plain, f"NaN row C={c}", skip=(4,))


ZERO_WEIGHT_CASES = [(10, torch.float32), (1000, torch.bfloat16), (2000, torch.float16),
                     (9000, torch.float32), (10, torch.float64)]
# the step epilogue does not depend on the tier: one register tier each of fp32, 16-bit, fp64
ZERO_WEIGHT_STEP_CASES = [(10, torch.float32), (1000, torch.bfloat16), (600, torch.float64)]


@pytest.mark.parametrize("c,dtype", ZERO_WEIGHT_CASES,
                         ids=[f"C{c}-{str(d)[6:]}" for c, d in ZERO_WEIGHT_CASES])
def test_emulated_all_zero_weights_prior_not_nan(c, dtype):
    """W = 0: prior_batch is all NaN (no estimate, not 0 / 0 in some entries and 0 in others),
    in raw and EM mode; the other outputs are the unweighted run's."""
    for prior_em in (False, True):
        args = cpu_case(3, 9, c, dtype, "distill-T1", seed=c + 4, prior_em=prior_em)
        w = torch.zeros(9, dtype=accumulate_dtype(dtype))
        got = emulated_op()(*args, w)
        assert bool(torch.isnan(reference_outputs(args + [w])[4]).all())
        assert bool(torch.isnan(got[4]).all()), f"C={c} em={prior_em}: W = 0 prior not NaN"
        assert_same_bits(got, emulated_op()(*args), f"W = 0 C={c}", skip=(4,))


def weighted_step(op, logits, prior_lb, state, w, **kw):
    """One step-op call with prior weights `w`; returns (outputs, the flexda_fwd arguments the
    step stands for, the weighted reference outputs, (Q, step, skipped) on entry)."""
    entry = (state["prior_ulb"].clone(), int(state["step"]), int(state["skipped"]))
    args = step_args(logits, prior_lb, state, **kw)
    out = op(*args, None, 1, w)
    fwd = step_fwd_equivalent(args, entry[0], entry[1])
    return out, fwd, reference_outputs(fwd + [w]), entry


@pytest.mark.parametrize("c,dtype", ZERO_WEIGHT_STEP_CASES,
                         ids=[f"C{c}-{str(d)[6:]}" for c, d in ZERO_WEIGHT_STEP_CASES])
def test_emulated_step_all_zero_weights_update_q_or_count_a_skip(c, dtype):
    """flexda_step with every weight 0: prior_batch NaN, Q unchanged (bits), skipped_updates
    unchanged, step + 1; with update=False nothing changes."""
    op = emulator_ops().flexda_step
    z_l, y, z_w, z_s, p_l, q = make_inputs(3, 9, c, dtype=dtype, seed=c + 6)
    w = torch.zeros(9, dtype=accumulate_dtype(dtype))
    for update, prior_em in ((True, False), (True, True), (False, False)):
        state = make_state(q, step=2, skipped=1, temperature=0.8)
        out, _, want, (q0, t0, k0) = weighted_step(op, (z_l, y, z_w, z_s), p_l, state, w,
                                                   update=update, prior_em=prior_em)
        assert bool(torch.isnan(want[4]).all()) and bool(torch.isnan(out[6]).all())
        assert torch.equal(state["prior_ulb"], q0), "W = 0 changed Q"
        assert int(state["skipped"]) == k0, "W = 0 counted a skipped update"
        assert int(state["step"]) == t0 + (1 if update else 0)


# (C, dtype, B, N, prior_em): the step op over several weighted steps, one case per tier family,
# the looped kernel with each adjustment in shared memory (fp64 600) and recomputed (9000: past
# the emulator's 16 KB ADELLO_ADJ_SMEM_BYTES)
WEIGHT_STEP_CASES = [
    (10, torch.float32, 5, 21, False),      # warp/4
    (200, torch.bfloat16, 7, 30, True),     # warp/8
    (1000, torch.float32, 6, 18, False),    # pair of warps
    (2000, torch.float16, 3, 9, True),      # block of 128
    (9000, torch.float32, 2, 5, False),     # looped, recomputed
    (10, torch.float64, 5, 21, True),       # fp64 warp/4
    (600, torch.float64, 3, 9, True),       # fp64 looped, shared memory
]


@pytest.mark.parametrize("c,dtype,b,n,prior_em", WEIGHT_STEP_CASES,
                         ids=[f"C{c}-{str(d)[6:]}-{'em' if e else 'raw'}"
                              for c, d, _, _, e in WEIGHT_STEP_CASES])
def test_emulated_step_prior_weight_update_wrong_over_steps(c, dtype, b, n, prior_em):
    """Four steps with the state carried over: binary weights (every output against the weighted
    reference, Q <- m Q + (1 - m) prior_batch); positive weights with a NaN weak row of weight 0
    (prior finite and as the reference, Q updated); the NaN row at weight 1 (Q kept, counted as
    skipped); all weights 0 (Q kept, nothing counted). step advances every time."""
    op = emulator_ops().flexda_step
    acc = accumulate_dtype(dtype)
    first = make_inputs(b, n, c, dtype=dtype, seed=c + 8)
    prior_lb = first[4]
    state = make_state(first[5], temperature=0.7)
    kw = dict(total_steps=5, distill_start=1, prior_em=prior_em)
    for k in range(4):
        logits = list(make_inputs(b, n, c, dtype=dtype, seed=c + 9 + k)[:4])
        w = prior_weights(n, "binary" if k == 0 else "positive", dtype, seed=c + k)
        if k in (1, 2):
            logits[2] = logits[2].clone()
            logits[2][n // 2, c // 2] = float("nan")
            w[n // 2] = 0.0 if k == 1 else 1.0
        if k == 3:
            w = torch.zeros(n, dtype=acc)
        out, fwd, want, (q0, t0, k0) = weighted_step(op, logits, prior_lb, state, w, **kw)
        what = f"weighted step {k} C={c} {dtype}"
        prior = out[6]
        if k == 0:
            check_outputs(as_fwd_outputs(out), fwd, what=what, want=want)
        elif k == 1:
            assert bool(torch.isfinite(prior).all()), f"{what}: zero-weight NaN row in the prior"
            p_err = float((prior.double() - want[4]).abs().max())
            assert p_err <= TOLERANCES[dtype].prior_tol, f"{what}: prior_batch err {p_err:.3g}"
        else:
            assert bool(torch.isnan(prior).all()), f"{what}: prior_batch not all NaN"
        if k <= 1:
            want_q, ok = momentum_update(q0, prior, STEP_DEFAULTS["prior_momentum"])
            assert bool(ok)
            assert torch.equal(state["prior_ulb"], want_q), f"{what}: prior update differs"
            assert not torch.equal(state["prior_ulb"], q0)
        else:
            assert torch.equal(state["prior_ulb"], q0), f"{what}: Q changed"
        assert int(state["skipped"]) == k0 + (1 if k == 2 else 0), f"{what}: skipped count"
        assert int(state["step"]) == t0 + 1, f"{what}: step not advanced"
    assert int(state["step"]) == 4 and int(state["skipped"]) == 1


def test_emulated_step_prior_weight_diverges_from_fwd():
    """flexda_step(prior_weight=w) = its prologue + flexda_fwd(prior_weight=w): the same weighted
    rows and reduce, so the outputs agree to the last few ulp."""
    ops = emulator_ops()
    z_l, y, z_w, z_s, p_l, q = make_inputs(6, 22, 64, seed=19)
    w = prior_weights(22, "mixed", torch.float32, seed=5)
    for prior_em in (False, True):
        state = make_state(q, step=7, temperature=0.9)
        args = step_args((z_l, y, z_w, z_s), p_l, state, update=False, distill_start=3,
                         prior_em=prior_em)
        got = as_fwd_outputs(ops.flexda_step(*args, None, 1, w))
        alpha = alpha_schedule(7, args[9], args[10], args[11])
        ds, du = logit_adjustments(p_l, q, alpha, args[15], dtype=torch.float64)
        hp = hparams_tensor(args[13], args[14], True, 0.9, torch.float32, prior_em=prior_em)
        want = ops.flexda_fwd(z_l, y, z_w, z_s, ds.float(), du.float(), hp, args[17], w)
        for i, (g, x) in enumerate(zip(got, want)):
            assert torch.allclose(g.double(), x.double(), rtol=1e-6, atol=1e-7), f"output {i}"


def test_emulated_prior_weight_bad_input_accepted():
    """Shape, dtype (the accumulate dtype) and device of prior_weight are checked by both ops."""
    ops = emulator_ops()
    args = cpu_case(3, 9, 10, torch.float32, "distill-T1")
    with pytest.raises(ValueError, match="prior_weight must have shape"):
        ops.flexda_fwd(*args, torch.ones(8))
    with pytest.raises(ValueError, match="prior_weight must be"):
        ops.flexda_fwd(*args, torch.ones(9, dtype=torch.float64))
    z_l, y, z_w, z_s, p_l, q = make_inputs(3, 9, 10, seed=1)
    state = make_state(q)
    with pytest.raises(ValueError, match="prior_weight must have shape"):
        ops.flexda_step(*step_args((z_l, y, z_w, z_s), p_l, state), None, 1, torch.ones(9, 1))


# ------------------------------------------------------------------------------------------------
# distill_all (the trailing bool of both ops): with the gate on every row distils, an M = 1 row
# has both terms (compile-time DALL in the row kernels; T = 1 shares one exp pass)
# ------------------------------------------------------------------------------------------------

# (C, dtype, B, N, mode, prior_em): every unlabeled-row tier, T = 1 and T != 1, fp32/fp64/16-bit
DALL_CASES = [
    (1, torch.float32, 5, 9, "distill-T0.6", False),       # warp/4, a single class (all M = 1)
    (10, torch.float32, 5, 21, "distill-T1", False),       # warp/4, rows loop
    (127, torch.bfloat16, 9, 40, "distill-T0.6", True),    # warp/4, odd rows, EM
    (200, torch.float32, 7, 30, "distill-T1", False),      # warp/8
    (500, torch.bfloat16, 9, 33, "distill-T0.6", False),   # warp/16
    (1000, torch.float32, 6, 18, "distill-T0.6", False),   # pair of warps
    (777, torch.float16, 5, 11, "distill-T1", True),       # pair of warps, odd C, EM
    (2000, torch.bfloat16, 3, 9, "distill-T1", False),     # block of 128
    (3000, torch.float32, 3, 9, "distill-T0.6", False),    # block of 256
    (4097, torch.bfloat16, 3, 9, "distill-T0.6", True),    # block of 512, EM
    (9000, torch.float32, 3, 9, "distill-T0.6", False),    # looped, two exp scales
    (9000, torch.bfloat16, 2, 5, "distill-T1", True),      # looped, one exp pass, EM
    (10, torch.float64, 5, 40, "distill-T0.6", False),     # fp64 warp/4
    (300, torch.float64, 5, 30, "distill-T1", True),       # fp64 warp/16
    (600, torch.float64, 3, 9, "distill-T0.6", False),     # fp64 looped
    (600, torch.float64, 3, 9, "distill-T1", False),       # fp64 looped, one exp pass
]
DALL_IDS = [f"C{c}-{str(d)[6:]}-{m}-{'em' if e else 'raw'}" for c, d, _, _, m, e in DALL_CASES]


def confident_rows(args):
    """[N] bool: the weak rows over the threshold (by the reference's decision)."""
    return reference_outputs(args)[2] > 0.5


@pytest.mark.parametrize("c,dtype,b,n,mode,prior_em", DALL_CASES, ids=DALL_IDS)
def test_emulated_distill_all_in_a_tier(c, dtype, b, n, mode, prior_em):
    """distill_all against the float64 reference (which differs from distill_all=False here:
    the M = 1 rows distil too); the labeled loss and gradient, mask, pseudo-labels and batch prior
    keep the distill_all=False bits; with the gate off distill_all changes no bit."""
    args = cpu_case(b, n, c, dtype, mode, seed=c + 21, prior_em=prior_em)
    m = confident_rows(args)
    assert bool(m.any()), "no confident row: the both-terms path is not exercised"
    want = reference_outputs(args + [None, True])
    if c > 1:  # (one class: H = 0 on every row)
        assert float(want[1][2]) != float(reference(*args)[1][2])
    got = emulated_op()(*args, None, True)
    what = f"distill_all C={c} {dtype} {mode} em={prior_em}"
    check_outputs(got, args + [None, True], what=what, want=want)
    off = with_gate(args, False)
    if rerouted_by_distill_all(c, dtype):
        # another tier (the looped kernel) than distill_all=False: the same values, other bits
        check_outputs(emulated_op()(*off, None, True), off, what=what + " (gate off)")
        return
    plain = emulated_op()(*args)
    for i in (2, 3, 4, 5):
        assert torch.equal(got[i], plain[i]), f"{what}: output {i} depends on distill_all"
    assert torch.equal(got[1][:2], plain[1][:2]), f"{what}: L_s or L_u depends on distill_all"
    assert_same_bits(emulated_op()(*off, None, True), emulated_op()(*off), what + " (gate off)")


def rerouted_by_distill_all(c, dtype):
    """The class counts whose tier distill_all changes to the looped kernel (choose_config:
    block/512 and fp64 warp/16 would spill with both terms)."""
    return 128 < c <= 512 if dtype == torch.float64 else 4096 < c <= 8192


def with_gate(args, on):
    out = list(args)
    out[6] = args[6].clone()
    out[6][flexda_ops.HP_GATE] = float(on)
    return out


@pytest.mark.parametrize("c,dtype,mode", [(10, torch.float32, "distill-T1"),
                                          (1000, torch.bfloat16, "distill-T0.6"),
                                          (3000, torch.float32, "distill-T1"),
                                          (9000, torch.float32, "distill-T0.6"),
                                          (600, torch.float64, "distill-T1")])
def test_emulated_distill_all_every_row_confident(c, dtype, mode):
    """Every row over the threshold: with distill_all every row has both terms (L_d over all
    rows), against the reference; without it L_d is 0."""
    args = cpu_case(3, 9, c, dtype, mode, seed=c + 5)
    args[7] = 0.0  # threshold 0: M = 1 everywhere
    got = emulated_op()(*args, None, True)
    want = reference_outputs(args + [None, True])
    assert bool((want[2] == 1).all()) and float(want[1][2]) > 0
    check_outputs(got, args + [None, True], what=f"all confident C={c}", want=want)
    assert float(emulated_op()(*args)[1][2]) == 0.0


@pytest.mark.parametrize("c,dtype,mode", [(127, torch.float32, "distill-T0.6"),
                                          (1000, torch.bfloat16, "distill-T1"),
                                          (3000, torch.float32, "distill-T0.6"),
                                          (9000, torch.float32, "distill-T0.6"),
                                          (9000, torch.float32, "distill-T1"),
                                          (10, torch.float64, "distill-T1"),
                                          (600, torch.float64, "distill-T0.6")])
def test_emulated_distill_all_nan_strong_row_of_a_confident_row(c, dtype, mode):
    """A NaN strong logit on an M = 1 row: L_u and L_d NaN, that gradient row all NaN; every other
    gradient row, the mask, pseudo-labels and prior as without the NaN."""
    args = cpu_case(3, 9, c, dtype, mode, seed=c + 7)
    args[7] = 0.0
    clean = emulated_op()(*args, None, True)
    args[3] = args[3].clone()
    args[3][4, c // 3] = float("nan")
    want = reference_outputs(args + [None, True])
    assert bool(torch.isnan(want[1][1:]).all()) and bool(torch.isnan(want[6][4]).all())
    got = emulated_op()(*args, None, True)
    assert bool(torch.isnan(got[1][1:]).all()) and bool(torch.isnan(got[0]))
    assert bool(torch.isnan(got[6][4]).all()), "the NaN row's gradient is not all NaN"
    keep = torch.arange(9) != 4
    assert torch.equal(got[6][keep], clean[6][keep])
    for i in (2, 3, 4, 5):
        assert torch.equal(got[i], clean[i]), f"output {i}"


@pytest.mark.parametrize("c,dtype,kind", [(10, torch.float32, "mixed"),
                                          (1000, torch.float32, "binary"),
                                          (2000, torch.bfloat16, "positive"),
                                          (9000, torch.float32, "mixed"),
                                          (600, torch.float64, "binary")])
def test_emulated_distill_all_with_prior_weights(c, dtype, kind):
    """distill_all with prior weights: against the reference; the weights reach only the prior
    (every other output as the unweighted distill_all call)."""
    args = cpu_case(3, 9, c, dtype, "distill-T0.6", seed=c + 9)
    w = prior_weights(9, kind, dtype, seed=c)
    got = emulated_op()(*args, w, True)
    check_outputs(got, args + [w, True], what=f"distill_all weighted C={c}",
                  want=reference_outputs(args + [w, True]))
    assert_same_bits(got, emulated_op()(*args, None, True), f"weighted C={c}", skip=(4,))


@pytest.mark.parametrize("c,dtype,b,n,temperature", [(10, torch.float32, 5, 21, 1.0),
                                                     (200, torch.bfloat16, 7, 30, 0.6),
                                                     (1000, torch.float32, 6, 18, 0.7),
                                                     (9000, torch.float32, 2, 5, 0.6),
                                                     (600, torch.float64, 3, 9, 1.0)])
def test_emulated_step_distill_all_over_steps(c, dtype, b, n, temperature):
    """flexda_step(distill_all=True) over three steps with the state carried over (the gate on
    from step 1): every output against the reference of the step's flexda_fwd equivalent with
    distill_all, the prior update as momentum_update of the kernel's prior; before the gate the
    bits of distill_all=False."""
    op = emulator_ops().flexda_step
    first = make_inputs(b, n, c, dtype=dtype, seed=c + 30)
    prior_lb = first[4]
    state = make_state(first[5], temperature=temperature)
    twin = make_state(first[5], temperature=temperature)
    kw = dict(total_steps=5, distill_start=1, threshold=0.5)
    for k in range(3):
        logits = list(make_inputs(b, n, c, dtype=dtype, seed=c + 31 + k)[:4])
        q0, t0 = state["prior_ulb"].clone(), int(state["step"])
        args = step_args(logits, prior_lb, state, **kw)
        out = op(*args, None, 1, None, True)
        fwd = step_fwd_equivalent(args, q0, t0)
        what = f"distill_all step {k} C={c} {dtype}"
        check_outputs(as_fwd_outputs(out), fwd + [None, True], what=what,
                      want=reference_outputs(fwd + [None, True]))
        plain = op(*step_args(logits, prior_lb, twin, **kw))
        if k == 0:
            assert_same_bits(out, plain, what + " (gate off)")
        else:
            assert float(out[3]) != float(plain[3])
        want_q, ok = momentum_update(q0, out[6], STEP_DEFAULTS["prior_momentum"])
        assert bool(ok) and torch.equal(state["prior_ulb"], want_q), f"{what}: prior update"
        assert int(state["step"]) == t0 + 1
